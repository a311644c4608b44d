"""The per-run half of the int4 adapter export: a PEFT LoRA adapter as an ONNX Runtime adapter file for the int4
base of ``tasks/int4_base.py``, and the checks that refuse an adapter that does not fit a base.

An adapter export folder holds ``adapter.onnx_adapter`` (onnxruntime's adapter format, written with
``onnxruntime.AdapterFormat``: one parameter per LoRA weight input of the base graph, ``lora_A`` as
``[in, r]`` and ``lora_B`` times the LoRA scaling as ``[r, out]``, the builder's layout), ``adapter.json`` (the
base it belongs to, its SHA-256, rank and targets) and ``inference.json`` (the prompt format). Only onnxruntime,
numpy and safetensors are imported here: ``tasks/predict.py`` loads adapters without torch.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tasks.files import file_sha256
from tasks.int4_base import LORA_INPUTS_FILE, RANK_DIM, builder_node

ADAPTER_FILE = "adapter.onnx_adapter"
ADAPTER_INFO = "adapter.json"


class AdapterError(ValueError):
    """An adapter that cannot serve on a base: corrupted, made for another base, or a rank/target mismatch. The
    message is one line and names the file."""


def base_identity(base_onnx: str | Path) -> str:
    """SHA-256 (hex) of the int4 base's weights file ``model.onnx.data``: the identity an adapter records."""
    return file_sha256(Path(base_onnx) / "model.onnx.data")


def lora_inputs(base_onnx: str | Path) -> dict:
    """``{input name: [dim, dim]}`` of the base's LoRA weight inputs (``lora_inputs.json``)."""
    return json.loads((Path(base_onnx) / LORA_INPUTS_FILE).read_text(encoding="utf-8"))


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


def check_parameters(shapes: dict, slots: dict, source: Path) -> None:
    """Refuse adapter parameters ``{name: shape}`` that the base's LoRA inputs ``slots`` cannot take.

    Raises:
        AdapterError: a parameter for a module the base has no LoRA slot for, a shape that does not match the
            slot's fixed dimension, or ``lora_A``/``lora_B`` of one module with different ranks.
    """
    for name, shape in sorted(shapes.items()):
        slot = slots.get(name)
        if slot is None:
            raise AdapterError(f"{source}: {name.split('.lora_')[0]} has no LoRA slot in the int4 base (its "
                               "target_modules differ from the base's)")
        if len(shape) != 2 or any(want != RANK_DIM and want != got for want, got in zip(slot, shape)):
            raise AdapterError(f"{source}: {name} is {shape}, the int4 base takes {slot}: an adapter for another "
                               "base model")
        if name.endswith("lora_A.MatMul.weight"):
            other = shapes.get(name.replace("lora_A", "lora_B"))
            if other is None or other[0] != shape[1]:
                raise AdapterError(f"{source}: {name} has rank {shape[1]} but its lora_B has "
                                   f"{other[0] if other else 'no weight'}")


def check_adapter(folder: str | Path, base_onnx: str | Path, base_sha256: str | None = None) -> Path:
    """The adapter file of the adapter export ``folder`` if it may serve on ``base_onnx`` (whose
    ``base_identity`` the caller may pass as ``base_sha256``, to hash the base once for many adapters).

    Raises:
        AdapterError: no ``adapter.json`` or adapter file; the file's SHA-256 differs from the recorded one
            (corrupted); it was converted for another base; or ``check_parameters`` refuses it.
    """
    import onnxruntime as ort

    folder = Path(folder)
    path = folder / ADAPTER_FILE
    try:
        info = json.loads((folder / ADAPTER_INFO).read_text(encoding="utf-8"))
        actual = file_sha256(path)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{folder}: not an adapter export ({e})") from None
    if actual != info.get("sha256"):
        raise AdapterError(f"{path}: corrupted (SHA-256 {actual[:12]}…, adapter.json records "
                           f"{str(info.get('sha256'))[:12]}…)")
    if info.get("base_sha256") != (base_sha256 or base_identity(base_onnx)):
        raise AdapterError(f"{path}: converted for another int4 base ({info.get('base')}), not {base_onnx}")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; one line naming the file
        raise AdapterError(f"{path}: unreadable adapter file ({str(e).splitlines()[0]})") from None
    check_parameters({k: list(v.shape()) for k, v in params.items()}, lora_inputs(base_onnx), path)
    return path
