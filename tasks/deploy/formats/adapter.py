"""The per-run half of the int4 adapter export: a PEFT LoRA adapter as an ONNX Runtime adapter file for the int4
base of ``tasks/deploy/builders/int4_base.py``, and that adapter baked into a copy of the base graph.

``convert_adapter`` writes ``adapter.onnx_adapter`` (onnxruntime's adapter format, written with
``onnxruntime.AdapterFormat``: one parameter per LoRA weight input of the base graph, ``lora_A`` as ``[in, r]``
and ``lora_B`` times the LoRA scaling as ``[r, out]``, the builder's layout) and ``adapter.json``;
``bake_adapter`` writes the whole model with the weights as constants. The runtime's checks of what is written
here are ``tasks/deploy/runtime/adapters.py``. Only onnx, onnxruntime, numpy and safetensors are imported: no
torch.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

from tasks.common.files import file_sha256, unshare_hard_links
from tasks.deploy.formats.int4 import builder_node, pack_nibbles, unpack_nibbles
from tasks.deploy.runtime.adapters import (ADAPTER_FILE, ADAPTER_INFO, BAKED_FILES, LORA_INPUTS_FILE, AdapterError,
                                           base_identity, check_parameters, lora_inputs)


def convert_adapter(adapter_dir: str | Path, base_onnx: str | Path, out: Path) -> dict:
    """Write ``adapter_dir`` (a PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``) as
    ``out/adapter.onnx_adapter`` for the int4 base ``base_onnx``, and ``out/adapter.json``; returns the latter.

    The LoRA scaling is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; peft's
    ``LoraLayer.update_layer``), folded into ``lora_B`` as the model builder does.

    Raises:
        AdapterError: DoRA, trained biases or extra saved modules (the base graph has no place for them), or a
            module / shape the base has no LoRA slot for.
    """
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file
    from tqdm.auto import tqdm

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora") or config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError(f"{adapter_dir / 'adapter_config.json'}: only a plain LoRA adapter (no DoRA, bias or "
                           "modules_to_save) converts to the int4 adapter form")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    params = {}
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key, value in tqdm(weights.items(), total=len(weights), desc="adapter to .onnx_adapter", unit="tensor",
                           file=sys.stderr):
        module, _, kind = key.rpartition(".lora_")  # ...self_attn.q_proj.lora_A.weight
        ab = kind.removesuffix(".weight")
        name = builder_node(module).removesuffix("/MatMul")[1:].replace("/", ".") + f".lora_{ab}.MatMul.weight"
        params[name] = np.ascontiguousarray((value.T if ab == "A" else value.T * scaling).astype(np.float32))
    check_parameters({k: list(v.shape) for k, v in params.items()}, lora_inputs(base_onnx),
                     adapter_dir / "adapter_model.safetensors")
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    adapter.export_adapter(str(out / ADAPTER_FILE))
    info = {"base": str(Path(base_onnx).resolve()), "base_sha256": base_identity(base_onnx),
            "sha256": file_sha256(out / ADAPTER_FILE), "r": r, "lora_alpha": alpha,
            "target_modules": sorted({k.split(".lora_")[0] for k in params}), "parameters": len(params)}
    (out / ADAPTER_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


class LoraModule(NamedTuple):
    """One adapted projection of the int4 base graph: ``base(x) + (x @ lora_A) @ lora_B`` (the builder's nodes)."""

    prefix: str  # /model/layers.3/attn/q_proj
    a: Any  # onnx NodeProto: MatMul(x, lora_A weight)
    b: Any  # MatMul(x A, lora_B weight)
    add: Any  # Add(base output, lora_B output)
    base: Any  # the projection's MatMulNBits


def bake_adapter(folder: str | Path, base_onnx: str | Path, weights: str = "folded") -> int:
    """Write into the adapter export ``folder`` (after ``convert_adapter``) a whole ONNX Runtime GenAI model: the
    int4 base ``base_onnx`` with the adapter's LoRA weights as constants of its graph; returns its node count.

    Why: ONNX Runtime GenAI feeds an ``.onnx_adapter``'s weights as graph inputs, which the CPU kernels cannot
    pre-pack, and the builder's graph runs three small nodes per adapted projection, each reading its weights
    cold: the adapter form decoded at 0.58-0.76x the merged int4 export (docs/benchmarks.md, issue 18). Here the
    weights are initializers and the projections that read one input (q/k/v, gate/up) share one ``lora_A``:
    ``t = x @ [A_q | A_k | A_v]``.

    Args:
        weights: ``"folded"`` (``export.adapter_weights`` default): ``lora_A`` as 8-bit MatMulNBits
            (onnxruntime's ``MatMulNBitsQuantizer``: symmetric, blocks of 16, the base's ``accuracy_level``), and
            ``lora_B`` folded into each projection's own MatMulNBits as extra rows of its weight,
            ``[x | t] @ [[W], [B]]``, quantized like ``W`` (its bits and block size, min/max per block): per
            layer the graph gains one ``lora_A`` and one Concat per input instead of three nodes per projection.
            ``"fp32"``: the LoRA weights as trained, ``x @ A_cat`` then ``@ blockdiag(B_q, B_k, B_v)``, added to
            the base outputs (packed into one MatMulNBits where their settings match): the arithmetic of the
            adapter file on the base, up to float summation order (tests/test_int4_adapter.py).

    Writes ``model.onnx`` and ``model.onnx.data`` (the weights the graph uses; their SHA-256 go into
    ``adapter.json`` as ``baked``, checked by ``check_baked``) and the base's ``genai_config.json`` and tokenizer
    files, so ``folder`` loads like any ``genai-*`` export. Decode speed and accuracy of each form:
    docs/benchmarks.md.

    A base file that other paths hard-link to is given its own inode first (``tasks.common.files.unshare_hard_links``:
    onnx refuses linked external data).

    Raises:
        AdapterError: the base graph lacks the builder's LoRA pattern (``lora_A``/``lora_B`` MatMuls into an Add).
        ValueError: ``weights`` is neither ``"folded"`` nor ``"fp32"``, or a hard-linked base file is not the
            content its manifest records.
    """
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort

    if weights not in ("folded", "fp32"):
        raise ValueError(f"adapter weights {weights!r}: expected 'folded' or 'fp32'")
    folder, base_onnx = Path(folder), Path(base_onnx)
    adapter_file = ort.AdapterFormat.read_adapter(str(folder / ADAPTER_FILE))  # owns the arrays' memory
    params = {k: np.array(v.numpy(), copy=True) for k, v in adapter_file.get_parameters().items()}
    unshare_hard_links(base_onnx)  # a shared store that another folder hard-links into: onnx would refuse it
    model = onnx.load(str(base_onnx / "model.onnx"))  # with its weights: the used ones are written again below
    graph, slots = model.graph, lora_inputs(base_onnx)
    weights_of = {t.name: t for t in graph.initializer}
    new_inits, removed, new_nodes, int8 = [], set(), {}, []  # new nodes go where their group's first node was
    order = {n.name: i for i, n in enumerate(graph.node)}
    for x, group in _lora_groups(graph, base_onnx).items():
        present = [m for m in group if m.a.input[1] in params]
        for m in group:
            removed |= {m.a.name, m.b.name, m.add.name}
            if m.a.input[1] not in params:
                m.base.output[0] = m.add.output[0]  # a projection the adapter leaves alone: the base output as is
        if not present:
            continue
        bake = Baker(x, present, params, weights_of, new_inits, removed)
        folds = weights == "folded" and all(m.base.op_type == "MatMulNBits" for m in present)
        new_nodes[min(order[n.name] for m in group for n in m[1:])] = made = bake.folded() if folds else bake.fp32()
        int8 += [made[0].name] if folds else []
    kept = []
    for i, node in enumerate(graph.node):
        kept.extend(new_nodes.get(i, []))
        if node.name not in removed:
            kept.append(node)
    _replace(graph.node, kept)
    _replace(graph.value_info, [v for v in graph.value_info if "/lora" not in v.name])  # rank-1 placeholder shapes
    _replace(graph.input, [i for i in graph.input if i.name not in slots])
    used = {i for n in graph.node for i in n.input}
    _replace(graph.initializer, [t for t in graph.initializer if t.name not in slots and t.name in used] + new_inits)
    if int8:
        model = _quantize_int8(model, int8)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    for file in base_onnx.iterdir():
        if file.is_file() and file.name not in ("model.onnx", "model.onnx.data", LORA_INPUTS_FILE):
            shutil.copy2(file, folder / file.name)
    info = json.loads((folder / ADAPTER_INFO).read_text(encoding="utf-8"))
    info["baked"] = {"weights": weights, "sha256": {name: file_sha256(folder / name) for name in BAKED_FILES}}
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return len(model.graph.node)


def _lora_groups(graph, base_onnx: Path) -> dict[str, list[LoraModule]]:
    """The base graph's adapted projections, grouped by the tensor their ``lora_A`` reads (q/k/v share one)."""
    nodes, made_by = {n.name: n for n in graph.node}, {o: n for n in graph.node for o in n.output}
    groups: dict[str, list[LoraModule]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.endswith("/lora_A/MatMul"):
            prefix = node.name.removesuffix("/lora_A/MatMul")
            b, add = nodes.get(prefix + "/lora_B/MatMul"), nodes.get(prefix + "/lora/Add")
            if b is None or add is None:
                raise AdapterError(f"{base_onnx / 'model.onnx'}: {node.name} has no lora_B MatMul and Add")
            base = made_by[next(i for i in add.input if i != b.output[0])]
            groups.setdefault(node.input[0], []).append(LoraModule(prefix, node, b, add, base))
    return groups


def _replace(field, items: list) -> None:
    del field[:]
    field.extend(items)


def _quantize_int8(model, nodes: list[str]):
    """``model`` with the MatMuls ``nodes`` (constant weights) as 8-bit MatMulNBits at the accuracy level of the
    model's own MatMulNBits (onnxruntime.quantization's ``MatMulNBitsQuantizer``)."""
    from onnx import helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    level = next((helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "accuracy_level"), 4)
    config = DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=True, accuracy_level=level, bits=8)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=16, is_symmetric=True, accuracy_level=level,
                                     nodes_to_include=nodes, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def block_quantize(w, bits: int, block: int):
    """``w`` float32 [K, N] (K a multiple of ``block``) in MatMulNBits' layout (onnxruntime ContribOperators.md):
    ``(blobs uint8 [N, K/block, block*bits/8], scales float32 [N, K/block], zero points uint8 [N, K/block])``,
    min/max per block (0 inside the range), de-quantized as ``(q - zero_point) * scale``; 4-bit values two per
    byte, the lower index in the low nibble."""
    import numpy as np

    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    levels = 2**bits - 1
    scale = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, levels).astype(np.uint8)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
    return (pack_nibbles(q) if bits == 4 else q), scale, zero


class Baker:
    """The nodes and constants that replace the LoRA nodes of ``modules``, the projections reading ``x``
    (see ``bake_adapter``); constants go to ``new_inits``, replaced base nodes' names to ``removed``."""

    def __init__(self, x: str, modules: list[LoraModule], params: dict, weights_of: dict, new_inits: list,
                 removed: set):
        from onnx import helper

        self.x, self.modules, self.params, self.weights_of = x, modules, params, weights_of
        self.new_inits, self.removed = new_inits, removed
        self.attrs = [{a.name: helper.get_attribute_value(a) for a in m.base.attribute} for m in modules]
        self.ranks = [params[m.a.input[1]].shape[1] for m in modules]
        self.name = modules[0].prefix.rsplit("/", 1)[0] + "/" + "_".join(
            m.prefix.rsplit("/", 1)[1].removesuffix("_proj") for m in modules) + "_proj"  # .../q_k_v_proj

    def const(self, name: str, value) -> str:
        import numpy as np
        from onnx import numpy_helper

        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def array(self, name: str):
        from onnx import numpy_helper

        return numpy_helper.to_array(self.weights_of[name])

    def lora_a(self, width: int) -> list:
        """``[MatMul(x, [A_1 | A_2 | ... | 0])]``: the group's ``lora_A`` side by side, zero-padded to ``width``."""
        import numpy as np
        from onnx import helper

        a = np.zeros((self.params[self.modules[0].a.input[1]].shape[0], width), dtype=np.float32)
        a[:, : sum(self.ranks)] = np.concatenate([self.params[m.a.input[1]] for m in self.modules], axis=1)
        return [helper.make_node("MatMul", [self.x, self.const(f"{self.name[1:]}.lora_A.weight", a)],
                                 [f"{self.name}/lora_A/out"], name=f"{self.name}/lora_A/MatMul")]

    def lora_b_rows(self, i: int, width: int, columns: int):
        """float32 [width, columns]: module ``i``'s ``lora_B`` at its rank's rows of the shared ``lora_A`` output."""
        import numpy as np

        b = np.zeros((width, columns), dtype=np.float32)
        b[sum(self.ranks[:i]): sum(self.ranks[: i + 1])] = self.params[self.modules[i].b.input[1]]
        return b

    def folded(self) -> list:
        """``t = x @ A_cat`` (int8 later), ``[x | t]`` into each projection's MatMulNBits with ``lora_B`` as its
        extra K rows (padded to whole blocks)."""
        import numpy as np
        from onnx import helper

        block = self.attrs[0]["block_size"]
        width = sum(self.ranks) + (-sum(self.ranks) % block)
        nodes = self.lora_a(width) + [helper.make_node("Concat", [self.x, f"{self.name}/lora_A/out"],
                                                       [f"{self.name}/lora/x"], axis=-1, name=f"{self.name}/Concat")]
        for i, (m, attrs) in enumerate(zip(self.modules, self.attrs)):
            n, bits = attrs["N"], attrs["bits"]
            if attrs["block_size"] != block:
                raise AdapterError(f"{m.base.name}: block size {attrs['block_size']}, its group's is {block}")
            if len(m.base.input) < 4 or not m.base.input[3]:
                raise AdapterError(f"{m.base.name}: no zero points; folding needs the builder's asymmetric blocks")
            q, scale, zero = block_quantize(self.lora_b_rows(i, width, n), bits, block)
            w, s, z = (self.array(name) for name in m.base.input[1:4])
            scales = np.concatenate([s.reshape(n, -1), scale], axis=1)
            zeros = z.reshape(n, -1)
            if bits == 4:  # unpack, append, pack again (an odd block count leaves a half-used byte)
                zeros = unpack_nibbles(zeros).reshape(n, -1)[:, : w.shape[1]]
                zeros = np.concatenate([zeros, zero], axis=1)
                zeros = pack_nibbles(np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2))))
            else:
                zeros = np.concatenate([zeros, zero], axis=1)
            stem = m.prefix[1:].replace("/", ".")
            m.base.input[0] = f"{self.name}/lora/x"
            m.base.input[1] = self.const(f"{stem}.folded.weight", np.concatenate([w, q], axis=1))
            m.base.input[2] = self.const(f"{stem}.folded.scales", scales if s.ndim > 1 else scales.ravel())
            m.base.input[3] = self.const(f"{stem}.folded.zero_points", zeros if z.ndim > 1 else zeros.ravel())
            next(a for a in m.base.attribute if a.name == "K").i += width
            m.base.output[0] = m.add.output[0]
        return nodes

    def fp32(self) -> list:
        """``x @ A_cat @ blockdiag(B_1, B_2, ...)`` added to the projections' outputs, fp32 as trained; the
        projections' MatMulNBits packed into one where their settings match (blocks concatenated along N)."""
        import numpy as np
        from onnx import helper

        widths = [a["N"] for a in self.attrs]
        b = np.concatenate([self.lora_b_rows(i, sum(self.ranks), n) for i, n in enumerate(widths)], axis=1)
        nodes = self.lora_a(sum(self.ranks)) + [helper.make_node(
            "MatMul", [f"{self.name}/lora_A/out", self.const(f"{self.name[1:]}.lora_B.weight", b)],
            [f"{self.name}/lora_B/out"], name=f"{self.name}/lora_B/MatMul")]
        outs = [m.add.output[0] for m in self.modules]
        if len(self.modules) == 1:
            return nodes + [helper.make_node("Add", [self.modules[0].base.output[0], f"{self.name}/lora_B/out"],
                                             outs, name=f"{self.name}/lora/Add")]
        split = self.const(f"{self.name[1:]}.split", np.array(widths, dtype=np.int64))
        same = [{k: v for k, v in a.items() if k != "N"} for a in self.attrs]
        if not (all(m.base.op_type == "MatMulNBits" and len(m.base.input) <= 4 for m in self.modules)
                and all(s == same[0] for s in same)):  # one delta per projection, added to its own output
            deltas = [f"{self.name}/lora/delta_{i}" for i in range(len(self.modules))]
            return nodes + [helper.make_node("Split", [f"{self.name}/lora_B/out", split], deltas, axis=-1,
                                             name=f"{self.name}/Split")] + [
                helper.make_node("Add", [m.base.output[0], d], [o], name=m.add.name)
                for m, d, o in zip(self.modules, deltas, outs)]
        packed = []
        for k, role in zip(range(1, len(self.modules[0].base.input)), ("weight", "scales", "zero_points")):
            parts = [self.array(m.base.input[k]) for m in self.modules]
            joined = np.concatenate([p.reshape(n, -1) for p, n in zip(parts, widths)])
            packed.append(self.const(f"{self.name[1:]}.{role}", joined.reshape(-1, *parts[0].shape[1:])))
        self.removed |= {m.base.name for m in self.modules}
        return nodes + [
            helper.make_node("MatMulNBits", [self.x, *packed], [f"{self.name}/MatMul/out"], domain="com.microsoft",
                             name=f"{self.name}/MatMulNBits", **{**self.attrs[0], "N": sum(widths)}),
            helper.make_node("Add", [f"{self.name}/MatMul/out", f"{self.name}/lora_B/out"],
                             [f"{self.name}/lora/out"], name=f"{self.name}/lora/Add"),
            helper.make_node("Split", [f"{self.name}/lora/out", split], outs, axis=-1, name=f"{self.name}/Split")]
