"""Serving an ``openvino-npu`` export (``tasks/deploy/export.py``) on the Intel NPU's static-shape pipeline, without
torch or transformers: ``openvino_genai.LLMPipeline(folder, "NPU", MAX_PROMPT_LEN=..., MIN_RESPONSE_LEN=...)``.

The NPU pipeline compiles the model for fixed shapes: batch 1, a prompt window of ``max_prompt_len`` tokens (a
longer prompt is refused: ``PromptTooLongError``) and at least ``MIN_RESPONSE_LEN`` new tokens. On a machine without
an NPU the same static pipeline runs on the CPU (``NPUW_DEVICES=CPU``, ``NPUW_ONLINE_PIPELINE=NONE``: how
openvino.genai's own tests run it, ``tests/python_tests/test_llm_pipeline_static.py``); ``NPUPredictor.device``
says which. That proves the export, its shapes and its answers, not the NPU compiler, its numerics or its speed.

Answers to a prompt format with ``labels`` are constrained to them by the pipeline's structured output (a regular
expression of the label alternatives, ``openvino_genai.StructuredOutputConfig``): the static pipeline exposes no
logits, so the label tree of the ONNX runtime (``tasks.common.labels``) cannot drive it; the regular expression
allows any tokenisation of a label, the tree only the trained one. ``npu.json`` records the SHA-256 of the IR files;
a folder whose bytes changed is refused. An ``openvino-npu-adapter`` folder holds a PEFT adapter and names the NPU base
IR it runs on (``openvino_genai.Adapter`` in the pipeline's ``AdapterConfig``, scaled by ``alpha``); an adapter made
for another base is refused. Only ``openvino``, ``openvino_genai`` and ``numpy`` are imported.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.common.files import changed_file, file_sha256
from tasks.common.metrics import strip_reasoning
from tasks.deploy.runtime.predict import INFERENCE_FILE, InputError, Predictor, adapter_name, split_model_arg

NPU_INFO = "npu.json"  # {"max_prompt_len", "sha256": {file: digest}} (+ "base", "base_sha256", "alpha": adapters)
NPU_ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's file, as openvino_genai.Adapter reads it
HASHED_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_tokenizer.bin",
                "openvino_detokenizer.xml", "openvino_detokenizer.bin")
# the NPU's static pipeline run on the CPU (openvino.genai tests/python_tests/test_llm_pipeline_static.py)
NPU_ON_CPU = {"NPUW_DEVICES": "CPU", "NPUW_ONLINE_PIPELINE": "NONE"}


class PromptTooLongError(ValueError):
    """A prompt is longer than the export's static prompt window (``max_prompt_len``)."""


class NPUExportError(RuntimeError):
    """The folder is not a whole ``openvino-npu`` export, or a file's bytes are not the ones the export wrote."""


def is_openvino_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an ``openvino-npu`` export (it has ``npu.json``)."""
    return (Path(folder) / NPU_INFO).is_file()


def npu_manifest(folder: str | Path, max_prompt_len: int) -> dict:
    """The ``npu.json`` of an export folder: its prompt window and the SHA-256 of each of ``HASHED_FILES``."""
    return {"max_prompt_len": max_prompt_len, "sha256": {name: file_sha256(Path(folder) / name)
                                                         for name in HASHED_FILES}}


def npu_info(folder: str | Path, base: bool = False) -> dict:
    """``npu.json`` of ``folder`` once it and ``inference.json`` (not in a ``base`` folder) are there; no file is
    hashed (``check_npu_folder`` does that).

    Raises:
        NPUExportError: a file is missing (one line naming it).
    """
    folder = Path(folder)
    for name in (NPU_INFO,) if base else (NPU_INFO, INFERENCE_FILE):
        if not (folder / name).is_file():
            raise NPUExportError(f"{folder}: no {name}; expected a folder exported with the openvino-npu target")
    return json.loads((folder / NPU_INFO).read_text(encoding="utf-8"))


def check_npu_folder(folder: str | Path, base: bool = False) -> dict:
    """``npu_info`` of ``folder`` once every file it records has that SHA-256; for an adapter folder, also once its
    NPU base is the one it was exported for (the base's ``npu.json``; the base's own files are checked once, by
    ``check_npu_folder(base, base=True)``, however many adapters run on it: ``serving_plan``).

    Raises:
        NPUExportError: a file is missing or changed, or the base is another one (one line naming the file).
    """
    folder = Path(folder)
    info = npu_info(folder, base)
    changed = changed_file(folder, info["sha256"], NPU_INFO)
    if changed:
        raise NPUExportError(changed)
    if "base" in info:
        base_info = Path(info["base"]) / NPU_INFO
        npu_info(base_info.parent, base=True)
        if file_sha256(base_info) != info["base_sha256"]:
            raise NPUExportError(f"{folder / NPU_INFO}: made for another NPU base than {base_info.parent} "
                                 "(its npu.json differs)")
    return info


def npu_device() -> tuple[str, dict]:
    """``("NPU", {})`` when OpenVINO sees an NPU, else the NPU pipeline's settings for running it on the CPU
    (``NPU_ON_CPU``) with a description of that."""
    import openvino as ov

    if "NPU" in ov.Core().available_devices:
        return "NPU", {}
    return "NPU static pipeline on the CPU (no NPU here: NPUW_DEVICES=CPU)", dict(NPU_ON_CPU)


def label_regex(labels: list[str]) -> str:
    """A regular expression that matches exactly one of ``labels`` (escaped, longest first)."""
    return "(" + "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True)) + ")"


def serving_plan(folder: Path, adapters: dict[str, str | Path]) -> tuple[str, dict, dict[str | None, Path]]:
    """What ``NPUPredictor`` loads for ``folder`` and ``adapters`` (its arguments): ``(the folder the pipeline
    loads, {name: npu.json}, {name: export folder})``, the name None for a whole model, each folder and the base
    checked once (``check_npu_folder``).

    Raises:
        NPUExportError: as ``check_npu_folder``.
        InputError: the adapters run on different NPU bases, or ``folder`` is a whole model given with adapters.
    """
    is_base = bool(adapters) and not (folder / INFERENCE_FILE).is_file()
    info = check_npu_folder(folder, base=is_base)
    if "base" in info:  # an adapter export: served on its base, under its run's name
        adapters = {adapter_name(folder): folder, **adapters}
    elif adapters and not is_base:
        raise InputError(f"{folder}: a whole model (openvino-npu); adapters run on their NPU base folder")
    if not adapters:
        return str(folder), {None: info}, {None: folder}
    infos = {name: info if Path(path) == folder else check_npu_folder(path) for name, path in adapters.items()}
    bases = {str(Path(i["base"]).resolve()) for i in infos.values()} | ({str(folder.resolve())} if is_base else set())
    if len(bases) > 1:
        raise InputError(f"the adapters run on {len(bases)} different NPU bases; one process serves one base")
    base = bases.pop()
    if not is_base:  # (a base given as the folder was checked above)
        check_npu_folder(base, base=True)
    return base, infos, {name: Path(path) for name, path in adapters.items()}


class NPUPredictor(Predictor):
    """An ``openvino-npu`` export (or an ``openvino-npu-adapter`` one on its NPU base) loaded once in
    ``openvino_genai.LLMPipeline`` on the NPU (or its static pipeline on the CPU, see the module doc), answering as
    ``Predictor`` does: same prompt format (``inference.json``), greedy.

    Several ``openvino-npu-adapter`` exports of one NPU base are served by one pipeline, each chosen per request
    (``adapter=``), as ``Predictor`` serves GenAI adapters: all of them in the pipeline's ``AdapterConfig``, the
    chosen one in each request's generation config.

    Args:
        model_dir: an ``openvino-npu`` or ``openvino-npu-adapter`` export folder, or, with ``adapters``, their NPU
            base folder.
        adapters: ``{name: openvino-npu-adapter export folder}`` to load as well, all for the same NPU base.

    Raises:
        NPUExportError: not such a folder, a file changed since the export, or an adapter made for another base
            (``check_npu_folder``).
        tasks.deploy.runtime.predict.InputError: the adapters run on different NPU bases.
    """

    genai = False

    def __init__(self, model_dir: str | Path, adapters: dict[str, str | Path] | None = None):
        import openvino_genai as ov_genai

        folder = Path(model_dir)
        model, infos, folders = serving_plan(folder, dict(adapters or {}))
        self.model_dir, self._ov_genai, self._trees, self._adapters = folder, ov_genai, {}, None
        self.prompt_formats = {name: json.loads((path / INFERENCE_FILE).read_text(encoding="utf-8"))
                               for name, path in folders.items()}
        self.window = max(info["max_prompt_len"] for info in infos.values())
        named = [name for name in folders if name is not None]
        self.default = named[0] if len(named) == 1 else None
        self.device, settings = npu_device()
        loaded = {name: (ov_genai.Adapter(str(folders[name] / NPU_ADAPTER_FILE)), infos[name]["alpha"])
                  for name in named}
        self._adapter_configs = {name: ov_genai.AdapterConfig(*pair) for name, pair in loaded.items()}
        if loaded:  # every adapter in the pipeline; each request names its own (generate_ids)
            settings["adapters"] = every = ov_genai.AdapterConfig()
            for adapter, alpha in loaded.values():
                every.add(adapter, alpha)
        response = max(f["max_new_tokens"] for f in self.prompt_formats.values())
        self.pipe = ov_genai.LLMPipeline(model, "NPU", MAX_PROMPT_LEN=self.window, MIN_RESPONSE_LEN=response,
                                         **settings)
        self.tokenizer = self.pipe.get_tokenizer()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered by the folder's chat template with the generation prompt and encoded
        by its tokenizer IR (no special tokens added: the template writes them)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]]

    def generate_ids(self, prompt: list[int], max_new_tokens: int, min_new_tokens: int = 0, on_token=None,
                     adapter: str | None = None, regex: str | None = None) -> list[int]:
        """Greedy continuation of ``prompt`` (up to ``max_new_tokens``; at least ``min_new_tokens``), constrained
        to ``regex`` when given; ``on_token()`` after each token.

        Returns:
            the new token ids, end-of-sequence token excluded.

        Raises:
            PromptTooLongError: ``prompt`` is longer than the static prompt window.
        """
        import numpy as np
        import openvino as ov

        name = self._choose(adapter)
        if len(prompt) > self.window:
            raise PromptTooLongError(f"{self.model_dir}: the prompt has {len(prompt)} tokens; this NPU export's "
                                     f"static prompt window is {self.window} (export.npu_max_prompt_len)")
        config = self.pipe.get_generation_config()  # a fresh GenerationConfig() would drop the pipeline's settings
        config.do_sample, config.max_new_tokens, config.min_new_tokens = False, max_new_tokens, min_new_tokens
        if name in self._adapter_configs:
            config.adapters = self._adapter_configs[name]
        if regex is not None:
            config.structured_output_config = self._ov_genai.StructuredOutputConfig(regex=regex)
        ids = ov.Tensor(np.array([prompt], dtype=np.int64))
        inputs = self._ov_genai.TokenizedInputs(ids, ov.Tensor(np.ones_like(ids.data)))
        new = [int(i) for i in self.pipe.generate(inputs, config, self._streamer(on_token)).tokens[0]]
        return new[:-1] if new and new[-1] == config.eos_token_id else new

    def _streamer(self, on_token):
        """An ``openvino_genai.StreamerBase`` that calls ``on_token()`` per generated token (None without one)."""
        if on_token is None:
            return None
        ov_genai = self._ov_genai

        class TokenStreamer(ov_genai.StreamerBase):
            def write(self, token):
                for _ in (token if isinstance(token, list) else [token]):
                    on_token()
                return ov_genai.StreamingStatus.RUNNING

            def end(self):
                pass

        return TokenStreamer()

    def answer(self, prompt: list[int], max_new_tokens: int, adapter: str | None = None) -> str:
        """The answer to ``prompt`` (token ids): one of the prompt format's ``labels`` (structured output, see the
        module doc) or free greedy text."""
        labels = self.prompt_formats[self._choose(adapter)].get("labels")
        regex = label_regex(labels) if labels else None
        return self.decode(self.generate_ids(prompt, max_new_tokens, adapter=adapter, regex=regex))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` by the detokenizer IR, as ``Predictor.decode``."""
        return strip_reasoning(self.tokenizer.decode(ids, skip_special_tokens=True)).strip() if ids else ""


def load_npu(models: list[str]) -> NPUPredictor:
    """One ``NPUPredictor`` for ``models``: one ``openvino-npu`` or ``openvino-npu-adapter`` folder, or several
    ``openvino-npu-adapter`` exports of one NPU base, each given as ``DIR`` (served under ``adapter_name(DIR)``)
    or ``NAME=DIR`` (as ``tasks.deploy.runtime.predict.load`` for GenAI folders).

    Raises:
        InputError: two adapters with one name, or several folders that are not adapter exports.
        NPUExportError: as ``check_npu_folder`` (``NPUPredictor`` checks every folder).
    """
    if len(models) == 1 and not split_model_arg(models[0])[0]:
        return NPUPredictor(models[0])
    named: dict[str, str] = {}
    for name, folder in map(split_model_arg, models):
        if "base" not in npu_info(folder):
            raise InputError(f"{folder}: only adapter exports (openvino-npu-adapter) can be served together")
        name = name or adapter_name(folder)
        if name in named:
            raise InputError(f"two adapters named {name!r} ({named[name]}, {folder}); name them: --model NAME=DIR")
        named[name] = folder
    return NPUPredictor(npu_info(next(iter(named.values())))["base"], adapters=named)
