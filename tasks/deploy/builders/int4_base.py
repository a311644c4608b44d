"""export-base: the base model exported once as ONNX Runtime GenAI int4 with LoRA slots, and its de-quantized
PyTorch twin, on which LoRA trains and the pipeline evaluates (quantization-matched training).

The int4 base (``onnx/``) is built by the ONNX Runtime GenAI model builder (``-p int4 -e cpu``) from the base
model with a placeholder rank-1 LoRA adapter (``--extra_options adapter_path=``: the builder then makes a
``lora_A``/``lora_B`` MatMul pair beside every adapted MatMul, ``builders/base.py: make_matmul_lora``). The LoRA
MatMuls are kept out of the int4 quantization (``nodes_to_exclude``), and their weights become graph inputs
of shape ``[in, lora_r]`` / ``[lora_r, out]`` whose default is an empty tensor (``lora_r`` = 0, so the base alone
adds nothing), the form of Olive's ``ExtractAdapters`` pass (``make_inputs``, ``optional_inputs``). An adapter
file (``.onnx_adapter``, ``tasks/deploy/formats/adapter.py``) overrides them per request. ``lora_inputs.json``
lists them with their shapes (the format: ``tasks/deploy/formats/int4.py``).

The matched base (``matched/``) is the base model with every weight the int4 export quantized replaced by what
the export computes with: MatMulNBits and GatherBlockQuantized weights de-quantized as the ONNX Runtime contrib-op
spec defines them (``W = (q - zero_point) * scale`` per block of ``block_size`` along K; docs/ContribOperators.md
in onnxruntime). So an adapter trained on it corrects the quantization error instead of meeting it after training,
and the model the pipeline evaluates is, up to activation rounding (``export.int4_accuracy_level``), the one it ships.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from configs.base import ConfigError
from tasks.common.files import atomic_dir, file_sha256
from tasks.deploy.formats.int4 import builder_node, make_lora_inputs, read_back

log = logging.getLogger(__name__)

class Int4BaseResult(BaseModel):
    """What ``export_base`` returns and writes as ``export_base.json``."""

    onnx: str  # the GenAI folder: int4 base with LoRA weight inputs (genai_config.json, model.onnx, tokenizer)
    matched_model: str  # transformers folder: the base with the de-quantized weights (safetensors)
    matched_digest: str  # SHA-256 of matched/'s files (16 hex): what training and evaluation are keyed by, so
    # that a change that leaves the weights alone (e.g. int4_accuracy_level) re-trains nothing
    quantized_weights: int  # weights the export quantized, each replaced by its de-quantized form
    lora_inputs: int  # LoRA weight graph inputs
    export_seconds: float


def export_base(base_model: str, target_modules: str | list[str], int4: dict, out_dir: str | Path,
                trust_remote_code: bool = False) -> Int4BaseResult:
    """Export ``base_model`` as an int4 GenAI base with LoRA slots on ``target_modules`` (``onnx/``) and write
    its de-quantized transformers twin (``matched/``), both under ``out_dir``.

    Args:
        target_modules: as ``lora.target_modules`` (``"all-linear"`` or module names): where adapters may go.
        int4: the model builder's int4 options (``tasks.deploy.builders.genai.int4_options``: ``algo_config``,
            ``block_size``, ``accuracy_level``, ``is_symmetric``).

    Raises:
        ConfigError: ``target_modules`` names a module outside the decoder layers (the builder puts LoRA only
            on attention and MLP projections), or the builder packed/fused a weight this reader cannot map.
    """
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        build_with_lora_slots(base_model, target_modules, int4, tmp / "onnx", trust_remote_code)
        n_inputs = make_lora_inputs(tmp / "onnx")
        n_weights = write_matched_base(base_model, tmp / "onnx", tmp / "matched", trust_remote_code)
        result = Int4BaseResult(onnx=str(Path(out_dir) / "onnx"), matched_model=str(Path(out_dir) / "matched"),
                                matched_digest=folder_digest(tmp / "matched"), quantized_weights=n_weights,
                                lora_inputs=n_inputs, export_seconds=round(time.perf_counter() - start, 1))
        (tmp / "export_base.json").write_text(result.model_dump_json(indent=1), encoding="utf-8")
    log.info("export-base: %s", result.model_dump_json())
    return result


def folder_digest(folder: Path) -> str:
    """SHA-256 (16 hex) over ``folder``'s files: each relative name and the SHA-256 of its bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}".encode())
    return digest.hexdigest()[:16]


def build_with_lora_slots(base_model: str, target_modules: str | list[str], int4: dict, out: Path,
                          trust_remote_code: bool) -> None:
    """The model builder on ``base_model`` plus a zero rank-1 LoRA on ``target_modules``, its LoRA MatMuls kept
    in float (the builder multiplies ``lora_B`` by the adapter's scaling; an adapter file brings its own)."""
    from peft import LoraConfig, get_peft_model

    from tasks.base_model import load_model
    from tasks.deploy.builders.genai import build_genai_folder

    model = get_peft_model(load_model(base_model, trust_remote_code),
                           LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=target_modules))
    with tempfile.TemporaryDirectory() as slots:
        model.save_pretrained(slots, safe_serialization=True)
        lora_nodes = [builder_node(module).removesuffix("MatMul") + f"{ab}/MatMul"
                      for module in model.targeted_module_names for ab in ("lora_A", "lora_B")]
        build_genai_folder(base_model, out, "int4", "cpu", trust_remote_code,
                           {**int4, "adapter_path": slots, "nodes_to_exclude": lora_nodes})


def write_matched_base(base_model: str, onnx_folder: Path, out: Path, trust_remote_code: bool) -> int:
    """Save ``base_model`` with every weight ``read_back(onnx_folder)`` returns put in place (safetensors, fp32),
    plus its tokenizer, to ``out``; returns how many weights were replaced.

    Raises:
        ConfigError: a read-back weight has another shape than the model's, or two read-back weights land on one
            tied parameter with different values.
    """
    import torch

    from tasks.base_model import load_model, load_tokenizer

    model = load_model(base_model, trust_remote_code, dtype=torch.float32)
    weights = read_back(onnx_folder)
    with torch.no_grad():
        for name, value in weights.items():
            param = model.get_parameter(name)
            if tuple(param.shape) != value.shape:
                raise ConfigError(f"int4 base: {name} is {tuple(param.shape)} in the model, {value.shape} in the "
                                  "export")
            param.copy_(torch.from_numpy(value))
        for name, value in weights.items():  # tied weights: the last copy must not have overwritten another one
            if not torch.equal(model.get_parameter(name), torch.from_numpy(value)):
                raise ConfigError(f"int4 base: {name} is tied to another weight that the export quantized "
                                  "differently")
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base_model, trust_remote_code).save_pretrained(out)
    return len(weights)
