"""Adapter exports as the runtime serves them, without torch: an adapter file's identity and the checks that refuse
one that does not fit an int4 base (``tasks/deploy/formats/adapter.py`` writes them).

An adapter export folder holds ``adapter.onnx_adapter`` (onnxruntime's adapter format: one parameter per LoRA
weight input of the base graph), ``adapter.json`` (the base it belongs to, its SHA-256, rank and targets, the
SHA-256 of a baked model's files) and ``inference.json``. The int4 base lists its LoRA weight inputs in
``lora_inputs.json`` (``[in, lora_r]`` / ``[lora_r, out]``). Only onnxruntime and the standard library are imported.
"""
from __future__ import annotations

import json
from pathlib import Path

from tasks.common.files import changed_file, file_sha256

ADAPTER_FILE = "adapter.onnx_adapter"
ADAPTER_INFO = "adapter.json"
BAKED_FILES = ("model.onnx", "model.onnx.data")  # what bake_adapter writes and adapter.json's "baked" hashes
LORA_INPUTS_FILE = "lora_inputs.json"
RANK_DIM = "lora_r"


class AdapterError(ValueError):
    """An adapter that cannot serve on a base: corrupted, made for another base, or a rank/target mismatch. The
    message is one line and names the file."""


def base_identity(base_onnx: str | Path) -> str:
    """SHA-256 (hex) of the int4 base's weights file ``model.onnx.data``: the identity an adapter records."""
    return file_sha256(Path(base_onnx) / "model.onnx.data")


def lora_inputs(base_onnx: str | Path) -> dict:
    """``{input name: [dim, dim]}`` of the base's LoRA weight inputs (``lora_inputs.json``)."""
    return json.loads((Path(base_onnx) / LORA_INPUTS_FILE).read_text(encoding="utf-8"))


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
    _check_sha256(path, actual, info.get("sha256"))
    if info.get("base_sha256") != (base_sha256 or base_identity(base_onnx)):
        raise AdapterError(f"{path}: converted for another int4 base ({info.get('base')}), not {base_onnx}")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; one line naming the file
        raise AdapterError(f"{path}: unreadable adapter file ({str(e).splitlines()[0]})") from None
    check_parameters({k: list(v.shape()) for k, v in params.items()}, lora_inputs(base_onnx), path)
    return path


def check_baked(folder: str | Path) -> Path:
    """``folder`` if its baked model files (``bake_adapter``) have the SHA-256 its ``adapter.json`` records.

    Raises:
        AdapterError: a file is missing or its bytes changed (one line naming the file).
    """
    folder = Path(folder)
    recorded = json.loads((folder / ADAPTER_INFO).read_text(encoding="utf-8")).get("baked", {}).get("sha256", {})
    changed = changed_file(folder, {name: recorded.get(name) for name in BAKED_FILES}, ADAPTER_INFO)
    if changed:
        raise AdapterError(changed)
    return folder


def _check_sha256(path: Path, actual: str, recorded) -> None:
    """Raise AdapterError naming ``path`` unless its SHA-256 ``actual`` is the one ``adapter.json`` records."""
    if actual != recorded:
        raise AdapterError(f"{path}: corrupted (SHA-256 {actual[:12]}…, adapter.json records {str(recorded)[:12]}…)")
