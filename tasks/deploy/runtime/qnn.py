"""Serving a ``qnn-npu`` export (``tasks/deploy/export.py``) for the Qualcomm NPU, without torch or transformers:
ONNX Runtime with the QNN execution provider (the ``onnxruntime-qnn`` plugin), ``tokenizers`` and ``jinja2``.

The folder holds one static-shape decoder (batch 1, a window of ``context_len`` tokens, no KV cache: every step
runs the whole window, right-padded; a causal mask keeps the padding from reaching the tokens before it), quantized
to QDQ (uint16 activations, the rung's weights), in two forms:

- ``model.qdq.onnx``: the QDQ graph. ONNX Runtime's CPU provider runs it (the export gate scores every test row
  so), and a QNN device compiles it when it loads it.
- ``model_ctx.onnx`` + ``model_ctx_qnn.bin``: an EPContext model, the graph compiled ahead of time by the QNN HTP
  backend for one Snapdragon SoC (``qnn.json``'s ``soc_model`` / ``htp_arch``). On x86-64 Linux the HTP backend
  executes it in its emulator (slow; the gate checks a few rows so, with CPU fallback disabled: every node on QNN).

``QNNPredictor`` answers as ``tasks.deploy.runtime.predict.Predictor`` does: the same prompt format
(``inference.json``), greedy, classification answers along the label tree (``tasks.common.labels``: each branch
point is one model call over the window). A prompt that leaves no room in the window for the answer is refused
(``PromptTooLongError``). ``qnn.json`` records the SHA-256 of every model and tokenizer file: a folder whose bytes
changed is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.common.files import changed_file, file_sha256
from tasks.common.labels import constrained_greedy
from tasks.common.metrics import strip_reasoning
from tasks.deploy.runtime.openvino import PromptTooLongError
from tasks.deploy.runtime.predict import INFERENCE_FILE, Predictor

QNN_INFO = "qnn.json"  # {"context_len", "pad_token_id", "weights", "soc_model", "htp_arch", "sha256": {file: digest}}
QDQ_MODEL = "model.qdq.onnx"
CONTEXT_MODEL = "model_ctx.onnx"  # its compiled graph: model_ctx_qnn.bin (ONNX Runtime names it after the model)
QNN_EP = "QNNExecutionProvider"
BACKENDS = ("auto", "cpu", "htp")


class QNNExportError(RuntimeError):
    """The folder is not a whole ``qnn-npu`` export, a file's bytes are not the ones the export wrote, or the QNN
    execution provider cannot run it."""


def is_qnn_export(folder: str | Path) -> bool:
    """Whether ``folder`` is a ``qnn-npu`` export (it has ``qnn.json``)."""
    return (Path(folder) / QNN_INFO).is_file()


def qnn_manifest(folder: str | Path, **fields) -> dict:
    """The ``qnn.json`` of an export folder: ``fields`` and the SHA-256 of every file in it (``qnn.json`` aside)."""
    folder = Path(folder)
    return {**fields, "sha256": {p.name: file_sha256(p) for p in sorted(folder.iterdir())
                                 if p.is_file() and p.name != QNN_INFO}}


def check_qnn_folder(folder: str | Path) -> dict:
    """``qnn.json`` of ``folder`` once it and ``inference.json`` are there and every file it records has that
    SHA-256.

    Raises:
        QNNExportError: a file is missing or changed (one line naming it).
    """
    folder = Path(folder)
    for name in (QNN_INFO, INFERENCE_FILE):
        if not (folder / name).is_file():
            raise QNNExportError(f"{folder}: no {name}; expected a folder exported with the qnn-npu target")
    info = json.loads((folder / QNN_INFO).read_text(encoding="utf-8"))
    changed = changed_file(folder, info["sha256"], QNN_INFO)
    if changed:
        raise QNNExportError(changed)
    return info


def qnn_ep_devices() -> list:
    """ONNX Runtime's devices of the QNN execution provider (``onnxruntime.get_ep_devices()``), its plugin library
    registered first; ``[]`` without the ``onnxruntime-qnn`` package."""
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError:
        return []
    if not any(d.ep_name == QNN_EP for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
    return [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]


def htp_options(info: dict) -> dict:
    """The QNN provider's options for the HTP backend and the export's SoC (``qnn.json``)."""
    import onnxruntime_qnn

    return {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": str(info["soc_model"]),
            "htp_arch": str(info["htp_arch"])}


def qnn_session_options(devices: list, options: dict):
    """Session options that put the whole graph on the QNN provider (``session.disable_cpu_ep_fallback``: creating
    the session fails if a node would run on the CPU) with provider ``options``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices, options)
    return so


def open_session(folder: Path, info: dict, backend: str):
    """``(an onnxruntime.InferenceSession of the folder for backend, where it runs in words)``.

    ``backend``: ``htp`` the EPContext model on the QNN HTP backend (on an NPU, else its emulator on x86-64),
    ``cpu`` the QDQ model on the CPU provider, ``auto`` the former where ONNX Runtime sees a Qualcomm NPU, else the
    latter.

    Raises:
        QNNExportError: ``htp`` without the onnxruntime-qnn package, or the QNN provider refused the model.
        ValueError: an unknown backend.
    """
    import onnxruntime as ort

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    devices = qnn_ep_devices() if backend != "cpu" else []
    npu = [d for d in devices if d.device.type == ort.OrtHardwareDeviceType.NPU]
    if backend == "cpu" or (backend == "auto" and not npu):
        so = ort.SessionOptions()
        so.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        return (ort.InferenceSession(str(folder / QDQ_MODEL), so, providers=["CPUExecutionProvider"]),
                "CPU provider (the QDQ model" + ("; no Qualcomm NPU here)" if backend == "auto" else ")"))
    if not devices:
        raise QNNExportError(f"{folder}: the QNN HTP backend needs the onnxruntime-qnn package "
                             "(pip install 'finetune-flow[npu]')")
    where = (f"QNN HTP (NPU, compiled for SoC {info['soc_model']})" if npu else
             f"QNN HTP emulator on the CPU (no Qualcomm NPU here; compiled for SoC {info['soc_model']})")
    try:
        session = ort.InferenceSession(str(folder / CONTEXT_MODEL), qnn_session_options(npu or devices,
                                                                                          htp_options(info)))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types; one line naming the file
        raise QNNExportError(f"{folder / CONTEXT_MODEL}: the QNN HTP backend cannot load it "
                             f"({str(e).splitlines()[0][:300]})") from None
    return session, where


class QNNPredictor(Predictor):
    """A ``qnn-npu`` export loaded once (see the module doc), answering as ``Predictor`` does.

    Args:
        model_dir: a ``qnn-npu`` export folder.
        backend: ``auto`` (the Qualcomm NPU where there is one, else the CPU provider), ``cpu`` or ``htp``
            (``open_session``); ``device`` says which ran.

    Raises:
        QNNExportError: not such a folder, a file changed since the export, or the backend cannot load it.
    """

    genai = False

    def __init__(self, model_dir: str | Path, backend: str = "auto"):
        from tokenizers import Tokenizer

        folder = Path(model_dir)
        self.info = check_qnn_folder(folder)
        self.model_dir, self.default, self._trees = folder, None, {}
        self.prompt_formats = {None: json.loads((folder / INFERENCE_FILE).read_text(encoding="utf-8"))}
        self.session, self.device = open_session(folder, self.info, backend)
        self.context_len, self.pad = self.info["context_len"], self.info["pad_token_id"]
        self.max_prompt_len = self.context_len - self.prompt_formats[None]["max_new_tokens"]
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.template, self.specials = chat_template(folder)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered by the folder's chat template with the generation prompt, encoded
        without added special tokens (the template writes them), as transformers' ``apply_chat_template`` does."""
        text = self.template.render(messages=messages, add_generation_prompt=True, **self.specials)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def logits(self, ids: list[int]):
        """The model's logits for the token after ``ids`` (float32, ``[vocab]``): one run over the window."""
        import numpy as np

        window = np.full((1, self.context_len), self.pad, dtype=np.int32)
        window[0, : len(ids)] = ids
        last = np.array([len(ids) - 1], dtype=np.int32)
        return self.session.run(None, {"input_ids": window, "last": last})[0][0]

    def _check_length(self, prompt: list[int]) -> None:
        if len(prompt) > self.max_prompt_len:
            raise PromptTooLongError(f"{self.model_dir}: the prompt has {len(prompt)} tokens; this QNN export's "
                                     f"window of {self.context_len} tokens leaves {self.max_prompt_len} for the "
                                     "prompt (export.qnn_context_len)")

    def generate_ids(self, prompt: list[int], max_new_tokens: int, min_new_tokens: int = 0, on_token=None,
                     adapter: str | None = None) -> list[int]:
        """Greedy continuation of ``prompt`` (up to ``max_new_tokens``, and no further than the window; the
        end-of-sequence token suppressed until ``min_new_tokens``); ``on_token()`` after each token.

        Returns:
            the new token ids, end-of-sequence token excluded.

        Raises:
            PromptTooLongError: the prompt leaves no room for the answer in the window.
        """
        self._choose(adapter)
        self._check_length(prompt)
        eos, ids, new = self.eos_token_id, list(prompt), []
        while len(new) < max_new_tokens and len(ids) < self.context_len:
            logits = self.logits(ids)
            if len(new) < min_new_tokens:
                logits[eos] = float("-inf")
            token = int(logits.argmax())
            if on_token:
                on_token()
            if token == eos:
                break
            ids.append(token)
            new.append(token)
        return new

    @property
    def eos_token_id(self) -> int:
        """The id of the tokenizer's end-of-sequence token (``tokenizer_config.json``'s ``eos_token``)."""
        return self.tokenizer.token_to_id(self.specials["eos_token"])

    def answer(self, prompt: list[int], max_new_tokens: int, adapter: str | None = None) -> str:
        """The answer to ``prompt`` (token ids): a label along ``label_token_ids``' tree, or free greedy text."""
        tree = self.label_tree(adapter)
        if tree is None:
            return self.decode(self.generate_ids(prompt, max_new_tokens, adapter=adapter))
        self._check_length(prompt)
        ids = list(prompt)

        def next_logits(tokens: list[int]):
            ids.extend(tokens)
            return self.logits(ids)

        return constrained_greedy(tree, self.logits(ids), next_logits)[0]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens or a leading reasoning block, stripped (as ``Predictor``)."""
        return strip_reasoning(self.tokenizer.decode(ids, skip_special_tokens=True)).strip() if ids else ""


def chat_template(folder: Path):
    """``(the folder's chat template as a jinja2 template, the special tokens it may name)``, compiled as
    transformers compiles one (``transformers.utils.chat_template_utils``: a sandboxed environment with
    ``trim_blocks``, ``lstrip_blocks``, loop controls and ``raise_exception``); the template from
    ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``.

    Raises:
        QNNExportError: the folder has no chat template.
    """
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    source = (folder / "chat_template.jinja").read_text(encoding="utf-8") if (
        folder / "chat_template.jinja").is_file() else config.get("chat_template")
    if not isinstance(source, str):
        raise QNNExportError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json)")

    def raise_exception(message):
        raise QNNExportError(f"{folder}: the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    specials = {key: value if isinstance(value, str) else value.get("content") for key, value in config.items()
                if key.endswith("_token") and isinstance(value, (str, dict))}
    return env.from_string(source), specials
