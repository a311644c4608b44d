"""The int4 base's file format, read and edited without torch: the model builder's node and weight names, the LoRA
weight inputs (``make_lora_inputs``: optional graph inputs with a dynamic rank, the form an ``.onnx_adapter``
overrides), and block-quantized weights read back as ONNX Runtime computes with them (``read_back``,
``dequantize``: ``W = (q - zero_point) * scale`` per block of ``block_size`` along K; docs/ContribOperators.md
in onnxruntime) and packed again (``pack_nibbles``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from configs.base import ConfigError
from tasks.deploy.runtime.adapters import LORA_INPUTS_FILE, RANK_DIM

# the builder's names: /model/layers.3/attn/q_proj/MatMul_Q4 (int4) ... its LoRA weight model.layers.3.attn.q_proj
# .lora_A.MatMul.weight; the transformers module model.layers.3.self_attn.q_proj
LAYER_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul(?:_Q\d+)?$")
LORA_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_([AB])\.MatMul\.weight$")
HF_MODULE = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
BUILDER_BLOCK = {"self_attn": "attn", "mlp": "mlp"}


def builder_node(module: str) -> str:
    """The model builder's MatMul node of a transformers module: ``model.layers.3.self_attn.q_proj`` (any prefix)
    -> ``/model/layers.3/attn/q_proj/MatMul``.

    Raises:
        ConfigError: not an attention or MLP projection of a decoder layer.
    """
    match = HF_MODULE.search(module)
    if not match:
        raise ConfigError(f"lora.target_modules: {module} is not an attention or MLP projection of a decoder "
                          "layer; the int4 adapter export (genai-int4-adapter) can only adapt those")
    layer, block, proj = match.groups()
    return f"/model/layers.{layer}/{BUILDER_BLOCK[block]}/{proj}/MatMul"


def make_lora_inputs(folder: Path) -> int:
    """Turn the LoRA weight initializers of ``folder/model.onnx`` into optional graph inputs (empty default,
    dynamic ``lora_r``) and list them in ``lora_inputs.json`` (``{name: [dim, dim]}``); returns how many."""
    import onnx
    from onnx import helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))  # with its external data: the file is rewritten below
    shapes = {}
    for init in model.graph.initializer:
        match = LORA_WEIGHT.match(init.name)
        if not match:
            continue
        a = match.group(4) == "A"
        dims = [init.dims[0], RANK_DIM] if a else [RANK_DIM, init.dims[1]]
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.ClearField("external_data")
        init.data_location = onnx.TensorProto.DEFAULT
        init.dims[:] = [init.dims[0], 0] if a else [0, init.dims[1]]
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, dims))
        shapes[init.name] = dims
    for stale in (path, folder / "model.onnx.data"):
        stale.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    (folder / LORA_INPUTS_FILE).write_text(json.dumps(shapes, indent=1), encoding="utf-8")
    return len(shapes)


def read_back(folder: str | Path) -> dict:
    """The weights the int4 export in ``folder`` computes with, de-quantized, by transformers parameter name.

    Returns:
        ``{"model.layers.0.self_attn.q_proj.weight": float32 ndarray [out_features, in_features], ...,
        "lm_head.weight": [vocab, hidden], "model.embed_tokens.weight": [vocab, hidden]}`` for every
        MatMulNBits and GatherBlockQuantized node (float MatMuls and Gathers keep the model's own weights).

    Raises:
        ConfigError: a quantized node this reader cannot map to a transformers parameter (named).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(Path(folder) / "model.onnx")).graph
    tensors = {init.name: init for init in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}

    def array(name: str):
        while name not in tensors and made_by.get(name) is not None and made_by[name].op_type == "Reshape":
            name = made_by[name].input[0]  # GatherBlockQuantized reads the tied lm_head weight through a Reshape
        return numpy_helper.to_array(tensors[name]) if name in tensors else None

    weights = {}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            zero = array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            weights[parameter_name(node.name)] = dequantize(array(node.input[1]), array(node.input[2]), zero,
                                                            attrs["bits"], attrs["block_size"], attrs["K"])
        elif node.op_type == "GatherBlockQuantized":
            if attrs.get("gather_axis", 0) != 0 or attrs.get("quantize_axis", 1) != 1:
                raise ConfigError(f"{folder}: {node.name}: only gather_axis 0, quantize_axis 1 is supported")
            data, scales = array(node.input[0]), array(node.input[2])
            zero = array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            bits, block = attrs.get("bits", 4), attrs["block_size"]
            width = data.size * 8 // bits // data.shape[0]  # the lm_head weight may come un-reshaped
            weights["model.embed_tokens.weight"] = dequantize(data.reshape(data.shape[0], -1, block * bits // 8),
                                                              scales, zero, bits, block, width)
    return weights


def parameter_name(node: str) -> str:
    """The transformers parameter a MatMulNBits node quantized: ``/model/layers.3/attn/q_proj/MatMul_Q4`` ->
    ``model.layers.3.self_attn.q_proj.weight``; ``/lm_head/MatMul_Q4`` -> ``lm_head.weight``.

    Raises:
        ConfigError: a packed or unknown node (e.g. ``qkv_proj``, which the builder packs without LoRA slots).
    """
    if re.match(r"^/lm_head/MatMul(?:_Q\d+)?$", node):
        return "lm_head.weight"
    match = LAYER_NODE.match(node)
    if not match or match.group(3) in ("qkv_proj", "gate_up_proj"):
        raise ConfigError(f"int4 base: cannot map the quantized node {node} to a transformers weight")
    layer, block, proj = match.groups()
    return f"model.layers.{layer}.{'self_attn' if block == 'attn' else 'mlp'}.{proj}.weight"


def dequantize(packed, scales, zero_points, bits: int, block_size: int, k: int):
    """De-quantize block-quantized weights as ONNX Runtime's MatMulNBits / GatherBlockQuantized define them.

    Args:
        packed: uint8 ``[N, n_blocks, block_size * bits / 8]``; with ``bits`` 4 each byte holds two values, the
            first in its low nibble.
        scales: float ``[N, n_blocks]`` (or flat ``[N * n_blocks]``).
        zero_points: uint8, ``[N, n_blocks]`` for 8 bits or ``[N, ceil(n_blocks / 2)]`` packed for 4 bits;
            None = ``2 ** (bits - 1)`` (the spec's default for unsigned storage).
        k: the real K (the last block is padded).

    Returns:
        float32 ndarray ``[N, k]``: ``(q - zero_point) * scale`` per block.

    Raises:
        ConfigError: ``bits`` other than 4 or 8, or float zero points.
    """
    import numpy as np

    if bits not in (4, 8):
        raise ConfigError(f"int4 base: {bits}-bit weights are not supported (4 or 8)")
    n, blocks = packed.shape[0], packed.shape[1]
    q = packed.astype(np.int32)
    if bits == 4:
        q = unpack_nibbles(q).reshape(n, blocks, -1)
    if zero_points is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), dtype=np.int32)
    elif zero_points.dtype != np.uint8:
        raise ConfigError("int4 base: float zero points are not supported")
    else:
        zero = zero_points.reshape(n, -1).astype(np.int32)
        if bits == 4:
            zero = unpack_nibbles(zero).reshape(n, -1)
        zero = zero[:, :blocks]
    weights = (q - zero[..., None]).astype(np.float32) * scales.reshape(n, blocks, 1).astype(np.float32)
    return weights.reshape(n, -1)[:, :k]


def unpack_nibbles(packed):
    """4-bit values stored two per byte (the first in the low nibble, as MatMulNBits stores them): ``[..., m]``
    -> ``[..., m, 2]``, same integer dtype."""
    import numpy as np

    return np.stack([packed & 0x0F, packed >> 4], axis=-1)


def pack_nibbles(values):
    """The inverse of ``unpack_nibbles`` along the last axis: ``[..., 2m]`` values 0-15 -> ``[..., m]`` bytes."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(values.dtype)
