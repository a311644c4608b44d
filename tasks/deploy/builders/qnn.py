"""A static QDQ ONNX decoder for the Qualcomm NPU (``qnn-npu``), and its graph compiled for one Snapdragon SoC.

1. ``export_static``: the merged transformers model as one fp32 ONNX graph of fixed shape — ``input_ids``
   ``[1, context_len]`` int32 (right-padded) and ``last`` ``[1]`` int32 (the position whose next-token logits are
   wanted) to ``logits`` ``[1, vocab]`` float32 — with no KV cache (the QNN HTP backend compiles static shapes),
   a constant causal mask, and each RMSNorm as one ``SimplifiedLayerNormalization`` node (ONNX Runtime's RMSNorm,
   which the QNN provider maps to its RmsNorm op). Left as the exporter writes it (``x²``, mean, ``sqrt``, divide),
   the norm's ``x²`` spans ~10⁶ on SmolLM2, and its 16-bit quantization rounds the small rows' variance to zero:
   the QDQ model then answered 1 of the first 100 banking77 test rows right (docs/results.md, NPU).
   Torch's TorchScript exporter (``dynamo=False``), then ONNX Runtime's basic graph optimizations (constant
   folding of the mask and the rotary tables) and its symbolic shape inference (which knows the fused node).
2. ``quantize_qdq``: ONNX Runtime's QNN quantization config (``get_qnn_qdq_config``: what the QNN provider takes)
   and static quantization, activations uint16, weights per channel at the rung's width (``QNN_WEIGHTS``),
   min/max calibrated on train rows (their prompt and answer, as training saw them).
3. ``compile_context``: the QNN HTP backend compiles the QDQ model ahead of time for ``soc_model`` / ``htp_arch``
   into an EPContext model (``ep.context_enable``), with CPU fallback disabled, so a node QNN cannot run fails the
   build.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from tasks.common.files import write_json
from tasks.deploy.builders import BuildError
from tasks.deploy.runtime.qnn import CONTEXT_MODEL, QDQ_MODEL, QNN_INFO, htp_options, qnn_ep_devices, qnn_manifest, \
    qnn_session_options

# export.qnn_weights' rungs: (weight type, activation type) of onnxruntime.quantization.QuantType. The QNN HTP
# backend takes 8-bit and 16-bit weights with 16-bit activations (Qualcomm's w8a16 / w16a16), and 4-bit weights
# per channel on HTP v73 and newer.
QNN_WEIGHTS = {"w4a16": ("QInt4", "QUInt16"), "w8a16": ("QUInt8", "QUInt16"), "w16a16": ("QUInt16", "QUInt16")}
# model families whose decoder layers export as the static graph above (tested: llama, qwen2; docs/deploy.md)
STATIC_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
MASKED = -120.0  # the causal mask's additive value: exp(-120) is 0 in float32, and 16-bit steps stay fine (~0.002)


class QNNBuildError(BuildError):
    """The QNN export cannot be built: a model family the static graph does not cover, or a node the QNN provider
    refuses."""


def export_static(model: str, out: Path, context_len: int, trust_remote_code: bool = False) -> None:
    """Export the transformers folder ``model`` as the static fp32 graph (module doc, step 1) to ``out``.

    Raises:
        QNNBuildError: the model's ``model_type`` is not in ``STATIC_FAMILIES``.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager",
                                               trust_remote_code=trust_remote_code).eval()
    if net.config.model_type not in STATIC_FAMILIES:
        raise QNNBuildError(f"export qnn-npu: model type {net.config.model_type!r} has no static QNN graph here "
                            f"(supported: {', '.join(STATIC_FAMILIES)})")
    fuse_rms_norms(net)
    ids, last = torch.zeros((1, context_len), dtype=torch.int32), torch.zeros((1,), dtype=torch.int32)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        # opset 21, the first with 16-bit Q/DQ: ONNX's version converter cannot lift a graph holding ONNX Runtime's
        # SimplifiedLayerNormalization, so the quantizer cannot upgrade it; the TorchScript exporter writes 21 with a
        # warning that it supports up to 20 (none of this graph's ops changed meaning in 21; the tests compare logits)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Exporting to ONNX opset version 21 is not supported")
            torch.onnx.export(StaticDecoder(net, context_len), (ids, last), str(raw), input_names=["input_ids", "last"],
                              output_names=["logits"], opset_version=21, dynamo=False)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])
    onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(str(out))), str(out))


def fuse_rms_norms(net) -> None:
    """Replace every ``*RMSNorm`` module of ``net`` in place by ``FusedRMSNorm`` with the same effect."""
    for name, child in list(net.named_children()):
        if type(child).__name__.endswith("RMSNorm"):
            setattr(net, name, FusedRMSNorm(child))
        else:
            fuse_rms_norms(child)


class _RMSNormFunction(torch.autograd.Function):
    """``x / sqrt(mean(x², last axis) + eps) * scale``, exported as ONNX Runtime's ``SimplifiedLayerNormalization``
    (float32 statistics: ``stash_type`` 1)."""

    @staticmethod
    def forward(ctx, x, scale, eps):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * scale

    @staticmethod
    def symbolic(g, x, scale, eps):
        return g.op("SimplifiedLayerNormalization", x, scale, axis_i=-1, epsilon_f=eps, stash_type_i=1)


class FusedRMSNorm(torch.nn.Module):
    """An RMSNorm module's effect with its effective per-channel scale (the module applied to a row of ones:
    ``weight`` for Llama, ``1 + weight`` for Gemma), computed once."""

    def __init__(self, norm):
        super().__init__()
        with torch.no_grad():
            scale = norm(torch.ones(1, norm.weight.shape[-1], dtype=norm.weight.dtype)).reshape(-1)
        self.register_buffer("scale", scale.clone())
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x):
        return _RMSNormFunction.apply(x, self.scale, self.eps)


class StaticDecoder(torch.nn.Module):
    """``(input_ids [1, L] int32, last [1] int32) -> logits [1, vocab]`` of a causal LM over a fixed window of L
    tokens: positions 0..L-1, the causal mask a constant (``MASKED`` above the diagonal), the LM head only at
    ``last``."""

    def __init__(self, net, context_len: int):
        super().__init__()
        self.net = net
        mask = torch.triu(torch.full((context_len, context_len), MASKED), diagonal=1)[None, None]
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("positions", torch.arange(context_len)[None], persistent=False)

    def forward(self, input_ids, last):
        hidden = self.net.model(input_ids=input_ids.long(), attention_mask=self.mask, position_ids=self.positions,
                                use_cache=False).last_hidden_state
        return self.net.lm_head(torch.index_select(hidden[0], 0, last.long()))


def quantize_qdq(fp32: Path, out: Path, weights: str, calibration: list[list[int]], context_len: int,
                 pad_token_id: int) -> None:
    """Quantize the static graph ``fp32`` to QDQ at ``QNN_WEIGHTS[weights]`` (weights per channel), activation
    ranges (min/max) calibrated on ``calibration`` (token id sequences, each at most ``context_len``; each run
    with ``last`` at its final token) — ONNX Runtime's ``get_qnn_qdq_config`` and ``quantize``."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Rows(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(calibration)

        def get_next(self):
            ids = next(self.rows, None)
            if ids is None:
                return None
            window = np.full((1, context_len), pad_token_id, dtype=np.int32)
            window[0, : len(ids)] = ids
            return {"input_ids": window, "last": np.array([len(ids) - 1], dtype=np.int32)}

    weight_type, activation_type = (getattr(QuantType, name) for name in QNN_WEIGHTS[weights])
    config = get_qnn_qdq_config(str(fp32), Rows(), activation_type=activation_type, weight_type=weight_type,
                                per_channel=True)
    quantize(str(fp32), str(out), config)


def compile_context(folder: Path, soc_model: int, htp_arch: int) -> None:
    """Compile ``folder``'s QDQ model for the SoC with the QNN HTP backend into ``CONTEXT_MODEL`` (and its
    ``_qnn.bin``) in ``folder``.

    Raises:
        QNNBuildError: without the onnxruntime-qnn package, or the backend refused the graph (its message).
    """
    import onnxruntime as ort

    devices = qnn_ep_devices()
    if not devices:
        raise QNNBuildError("export qnn-npu needs the onnxruntime-qnn package: pip install 'finetune-flow[npu]'")
    options = qnn_session_options(devices, htp_options({"soc_model": soc_model, "htp_arch": htp_arch}))
    options.add_session_config_entry("ep.context_enable", "1")
    options.add_session_config_entry("ep.context_file_path", str(folder / CONTEXT_MODEL))
    options.add_session_config_entry("ep.context_embed_mode", "0")
    try:
        ort.InferenceSession(str(folder / QDQ_MODEL), options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types; one line naming the cause
        raise QNNBuildError(f"export qnn-npu: the QNN HTP backend cannot compile the graph for SoC {soc_model} "
                            f"({str(e).splitlines()[0][:300]})") from None


def build_qnn_folder(model: str, fp32: Path, out: Path, weights: str, calibration: list[list[int]],
                     context_len: int, soc_model: int, htp_arch: int, trust_remote_code: bool = False) -> None:
    """A ``qnn-npu`` folder in ``out`` (without ``inference.json``): the QDQ model of ``fp32`` (``export_static``'s
    graph of ``model``) at ``weights``, its EPContext model for the SoC, the tokenizer files with the chat template,
    and ``qnn.json`` (``tasks.deploy.runtime.qnn.qnn_manifest``).

    Raises:
        QNNBuildError: as ``compile_context``.
    """
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    quantize_qdq(fp32, out / QDQ_MODEL, weights, calibration, context_len, pad)
    compile_context(out, soc_model, htp_arch)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (Path(tmp) / name).is_file():
                shutil.copy2(Path(tmp) / name, out / name)
    write_json(out / QNN_INFO, qnn_manifest(out, context_len=context_len, pad_token_id=pad, weights=weights,
                                            soc_model=soc_model, htp_arch=htp_arch))
