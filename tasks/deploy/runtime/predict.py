"""predict: greedy generation with an exported ONNX Runtime GenAI folder, on its own — no torch, no transformers.

An exported folder (``tasks/deploy/export.py``, targets ``genai-*``) holds the ONNX model, ``genai_config.json`` (which
names the execution provider), the tokenizer with its chat template, and ``inference.json``: how the training
data turned an input text into chat messages (``system_prompt``, ``prompt_template``) and how many tokens an
answer takes (``max_new_tokens``). So ``Predictor(folder)("some text")`` builds the same prompt the model was
trained on. An adapter export (``genai-int4-adapter``) is a whole model (its int4 base with the adapter baked in,
what the export gate measured) and also holds the adapter file alone, naming its int4 base; one ``Predictor``
serves any number of such adapters on one shared base, chosen per request (``adapter=``), each with its own
prompt format. Only ``onnxruntime``, ``onnxruntime-genai``, ``numpy`` and ``safetensors`` are imported.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tasks.common.labels import LabelTree, constrained_greedy
from tasks.common.metrics import strip_reasoning
from tasks.deploy.runtime.adapters import ADAPTER_INFO, AdapterError, base_identity, check_adapter, check_baked

INFERENCE_FILE = "inference.json"


def inference_settings(data_cfg, task: str, max_new_tokens: int, name: str | None = None,
                       labels: list[str] | None = None) -> dict:
    """The ``inference.json`` of an export: the run config's ``name`` (an adapter serves under it), how
    ``tasks/stages/ingest.py`` made chat messages of an input text (``data.system_prompt``; ``data.prompt_template``
    for classification), the answer length in tokens and, for answers constrained to a label set, its ``labels``
    (the export adds each one's answer token ids, ``label_token_ids``)."""
    return {"name": name, "task": task, "system_prompt": data_cfg.system_prompt, "max_new_tokens": max_new_tokens,
            "prompt_template": data_cfg.prompt_template if task == "classification" else "{text}"} | (
        {"labels": sorted(labels)} if labels else {})


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path if it is a GenAI export: a whole model, or an adapter export whose int4 base is
    where its ``adapter.json`` says.

    Raises:
        FileNotFoundError: it lacks ``genai_config.json`` or ``inference.json``, or its base is gone.
    """
    model_dir = Path(model_dir)
    folder = base_of(model_dir) if runs_on_base(model_dir) else model_dir
    for path in (folder / "genai_config.json", model_dir / INFERENCE_FILE):
        if not path.is_file():
            missing = path.name if path.parent == model_dir else f"{path} (its int4 base)"
            raise FileNotFoundError(f"{model_dir}: no {missing}; expected a folder exported with a genai-* target "
                                    "(export.targets)")
    return model_dir


def runs_on_base(folder: Path) -> bool:
    """Whether ``folder`` is an adapter export that holds no model of its own (exported before adapters were
    baked in), so that it runs on its int4 base."""
    return (folder / ADAPTER_INFO).is_file() and not (folder / "genai_config.json").is_file()


def base_of(adapter_export: str | Path) -> Path:
    """The int4 base folder an adapter export (``genai-int4-adapter``) runs on, from its ``adapter.json``."""
    return Path(json.loads((Path(adapter_export) / ADAPTER_INFO).read_text(encoding="utf-8"))["base"])


def adapter_name(adapter_export: str | Path) -> str:
    """The name an adapter export serves under: the run config's ``name`` (``inference.json``), else its folder's."""
    settings = json.loads((Path(adapter_export) / INFERENCE_FILE).read_text(encoding="utf-8"))
    return settings.get("name") or Path(adapter_export).name


def runtime_config(model_dir: Path):
    """The folder's ``genai_config.json`` as an ``onnxruntime_genai.Config``, with the CPU thread pool sized to the
    CPUs this process may use unless the file sets ``intra_op_num_threads`` itself (faster than the runtime's
    own default on small machines: docs/benchmarks.md)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    declared = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    if "intra_op_num_threads" not in declared["model"]["decoder"].get("session_options", {}):
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return config


class Predictor:
    """An exported GenAI model with its tokenizer and prompt format, loaded once: a whole model (``genai-int4``, or
    a ``genai-int4-adapter`` export with its adapter baked in, served under the adapter's name), or one int4 base
    with any number of adapters (``genai-int4-adapter`` exports), chosen per request.

    Args:
        model_dir: a ``genai-*`` export (an adapter export made before adapters were baked in: its base is loaded
            and the adapter with it).
        adapters: ``{name: adapter export folder}`` to load as well, all for the same int4 base; ``model_dir``
            may then be that base's folder itself.

    Raises:
        FileNotFoundError: ``model_dir`` is not a GenAI export.
        tasks.deploy.runtime.adapters.AdapterError: an adapter (or a baked model's file) is corrupted, made for another
            base, or its rank/targets do not fit the base (one line naming the file).
    """

    def __init__(self, model_dir: str | Path, adapters: dict[str, str | Path] | None = None):
        import onnxruntime_genai as og

        folder, adapters = Path(model_dir), dict(adapters or {})
        baked = None
        if (folder / ADAPTER_INFO).is_file() and not adapters and not runs_on_base(folder):
            baked = adapter_name(check_baked(check_model_dir(folder)))
        elif (folder / ADAPTER_INFO).is_file():
            check_model_dir(folder)
            adapters = {adapter_name(folder): folder, **adapters}
            folder = base_of(folder)
        elif not adapters:
            check_model_dir(folder)
        elif not (folder / "genai_config.json").is_file():
            raise FileNotFoundError(f"{folder}: no genai_config.json; expected an int4 base folder")
        self.model_dir, self._og = folder, og
        own = folder / INFERENCE_FILE
        self.prompt_formats = {baked: json.loads(own.read_text(encoding="utf-8"))} if own.is_file() else {}
        self.model = og.Model(runtime_config(folder))
        self.tokenizer = og.Tokenizer(self.model)
        self._adapters = og.Adapters(self.model) if adapters else None
        identity = base_identity(folder) if adapters else None  # hashed once, not per adapter
        for name, path in adapters.items():
            file = check_adapter(path, folder, identity)
            try:
                self._adapters.load(str(file), name)
            except Exception as e:  # noqa: BLE001 - the runtime's own error types; one line naming the file
                raise AdapterError(f"{file}: ONNX Runtime GenAI cannot load it ({str(e).splitlines()[0]})") from None
            self.prompt_formats[name] = json.loads((Path(path) / INFERENCE_FILE).read_text(encoding="utf-8"))
        self.default = baked or (None if None in self.prompt_formats or len(adapters) != 1 else next(iter(adapters)))
        self._trees: dict[str | None, LabelTree | None] = {}

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return [name for name in self.prompt_formats if name is not None]

    @property
    def settings(self) -> dict:
        """The default prompt format (``inference.json``): the model's own, or its only adapter's."""
        return self.prompt_formats[self._choose(None)]

    def _choose(self, adapter: str | None) -> str | None:
        adapter = adapter or self.default
        if adapter not in self.prompt_formats:
            wanted = "no adapter was chosen" if adapter is None else f"no adapter named {adapter!r}"
            raise InputError(f"{self.model_dir}: {wanted}; loaded adapters: {', '.join(self.adapters)}")
        return adapter

    def messages(self, text: str, adapter: str | None = None) -> list[dict]:
        """The chat messages the training data (of ``adapter``) made of ``text``: optional system turn +
        templated user turn."""
        settings = self.prompt_formats[self._choose(adapter)]
        system = settings.get("system_prompt")
        user = {"role": "user", "content": settings.get("prompt_template", "{text}").format(text=text)}
        return ([{"role": "system", "content": system}] if system is not None else []) + [user]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered by the folder's chat template with the generation prompt, encoded
        by the folder's tokenizer (both as ONNX Runtime GenAI loads them)."""
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(text)]

    def generate_ids(self, prompt: list[int], max_new_tokens: int, min_new_tokens: int = 0,
                     on_token=None, adapter: str | None = None) -> list[int]:
        """Greedy-decode up to ``max_new_tokens`` after ``prompt`` (one sequence, KV cache in the runtime), with
        ``adapter`` active (default: the only one loaded).

        Stops at the end-of-sequence token unless ``min_new_tokens`` are not reached yet (benchmarks use it to
        decode a fixed length). ``on_token()`` is called after each generated token (for timing).

        Returns:
            the new token ids, end-of-sequence token excluded.
        """
        generator = self._generator(prompt, adapter, max_length=len(prompt) + max_new_tokens,
                                    min_length=len(prompt) + min_new_tokens)
        while not generator.is_done():
            generator.generate_next_token()
            if on_token:
                on_token()
        new = [int(i) for i in generator.get_sequence(0)[len(prompt):]]
        eos = set(int(i) for i in self.tokenizer.eos_token_ids)
        return new[:-1] if new and new[-1] in eos else new

    def _generator(self, prompt: list[int], adapter: str | None, **search):
        """A greedy ONNX Runtime GenAI generator with ``adapter`` active (default: the only one loaded) that has
        read ``prompt``; ``search``: its length options (``max_length``, ``min_length``)."""
        og, name = self._og, self._choose(adapter)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, **search)
        generator = og.Generator(self.model, params)
        if self._adapters is not None and name is not None:
            generator.set_active_adapter(self._adapters, name)
        generator.append_tokens([prompt])
        return generator

    def label_tree(self, adapter: str | None = None) -> LabelTree | None:
        """The label tree of the prompt format of ``adapter`` (``inference.json``'s ``label_token_ids``: the token
        ids of each label's answer, as the export wrote them with the training tokenizer), or None: free text."""
        name = self._choose(adapter)
        if name not in self._trees:
            ids = self.prompt_formats[name].get("label_token_ids")
            self._trees[name] = LabelTree.build(ids) if ids else None
        return self._trees[name]

    def answer(self, prompt: list[int], max_new_tokens: int, adapter: str | None = None) -> str:
        """The answer to ``prompt`` (token ids): a label of ``label_tree`` (decoded along it: only its branch points
        call the model, ``tasks.common.labels.constrained_greedy``), or free greedy text (``generate_ids`` then
        ``decode``) when the folder has no label set."""
        tree = self.label_tree(adapter)
        if tree is None:
            return self.decode(self.generate_ids(prompt, max_new_tokens, adapter=adapter))
        longest = max(map(len, tree.sequences.values()))
        generator = self._generator(prompt, adapter, max_length=len(prompt) + longest + 1)

        def next_logits(tokens: list[int]):
            generator.append_tokens([tokens])
            return generator.get_logits()[0, -1]

        label, _, _ = constrained_greedy(tree, generator.get_logits()[0, -1], next_logits)
        return label

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens and without a leading reasoning block
        (``tasks.common.metrics.strip_reasoning``: Qwen3 writes ``<think>...</think>`` before every answer),
        stripped."""
        return strip_reasoning(self.tokenizer.decode(ids)) if ids else ""

    def __call__(self, texts: str | list[str], max_new_tokens: int | None = None,
                 adapter: str | list[str | None] | None = None) -> str | list[str]:
        """Answer one input text (returns a str) or a list of them (returns a list, same order), with ``adapter``
        (one name for all, or one per text; None = the default). A list shows a progress bar on stderr: rows done,
        rows/s and the time left."""
        from tqdm.auto import tqdm

        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        chosen = adapter if isinstance(adapter, list) else [adapter] * len(texts)
        answers = []
        rows = tqdm(zip(texts, chosen), total=len(texts), desc="predict", unit="row", file=sys.stderr,
                    disable=single)
        for text, name in rows:
            max_new = max_new_tokens or self.prompt_formats[self._choose(name)]["max_new_tokens"]
            answers.append(self.answer(self.prompt_ids(self.messages(text, name)), max_new, adapter=name))
        return answers[0] if single else answers


def load(models: list[str]) -> Predictor:
    """One ``Predictor`` for ``models``: one export folder, or adapter exports on one int4 base, each given as
    ``DIR`` (served under ``adapter_name(DIR)``) or ``NAME=DIR``.

    Raises:
        InputError: two adapters with one name, or several folders that are not adapter exports of one base.
    """
    if len(models) == 1 and not split_model_arg(models[0])[0]:
        return Predictor(models[0])
    named = {}
    for name, folder in map(split_model_arg, models):
        if not (Path(folder) / ADAPTER_INFO).is_file():
            raise InputError(f"{folder}: only adapter exports (genai-int4-adapter) can be served together")
        check_model_dir(folder)
        name = name or adapter_name(folder)
        if name in named:
            raise InputError(f"two adapters named {name!r} ({named[name]}, {folder}); name them: --model NAME=DIR")
        named[name] = folder
    bases = {json.loads((Path(f) / ADAPTER_INFO).read_text(encoding="utf-8"))["base_sha256"] for f in named.values()}
    if len(bases) > 1:
        raise InputError(f"the adapters run on {len(bases)} different int4 bases; one process serves one base")
    return Predictor(base_of(next(iter(named.values()))), adapters=named)


def split_model_arg(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` -> ``(NAME, DIR)``; ``DIR`` (also one that contains ``=``) -> ``("", DIR)``."""
    name, sep, folder = spec.partition("=")
    return (name, folder) if sep and not Path(spec).exists() else ("", spec)


class InputError(ValueError):
    """An input file of batch prediction is unreadable or a row lacks its text (names the file, row, field)."""


def read_inputs(path: str | Path) -> list[str]:
    """Input texts of a batch (``read_requests`` without the adapter names)."""
    return [text for text, _ in read_requests(path)]


def read_requests(path: str | Path) -> list[tuple[str, str | None]]:
    """``(text, adapter name or None)`` per input of a batch: ``.jsonl`` rows with a non-empty string field
    ``text`` and an optional string field ``adapter``, or any other file as one input per non-empty line
    (UTF-8).

    Raises:
        InputError: missing file, undecodable bytes, bad JSON, or a row without a usable ``text`` field or with
            a non-string ``adapter``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read inputs: {e}") from None
    if path.suffix != ".jsonl":
        return [(line, None) for line in lines if line.strip()]
    requests = []
    for rowno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: row {rowno}: not valid JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}: row {rowno}: field 'text': expected a non-empty string, got {text!r}"[:200])
        adapter = row.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise InputError(f"{path}: row {rowno}: field 'adapter': expected an adapter name, got {adapter!r}"[:200])
        requests.append((text, adapter))
    return requests


def predict(model_dir: str | Path | list[str], texts: list[str], max_new_tokens: int | None = None,
            adapter: str | list[str | None] | None = None) -> list[str]:
    """Greedy answers of the exported model in ``model_dir`` (or the adapter exports listed, see ``load``) to
    ``texts`` (plain function; see ``Predictor``).

    Args:
        texts: raw inputs, formatted into chat messages as the training data was (``inference.json``).
        max_new_tokens: answer length limit in tokens; default the folder's (the evaluation's) setting.
        adapter: the adapter to answer with, one for all texts or one per text (None: the default).

    Returns:
        one answer per input text, special tokens removed, whitespace stripped.
    """
    models = model_dir if isinstance(model_dir, list) else [str(model_dir)]
    return load(models)(list(texts), max_new_tokens, adapter)
