"""OpenVINO IR for the Intel NPU: optimum-intel's exporter (the stateful decoder with its KV cache that
``openvino_genai.LLMPipeline`` loads) with NNCF weight compression at a precision the NPU takes
(``NPU_WEIGHTS``), and the tokenizer and detokenizer IRs (``openvino_tokenizers``), which the pipeline cannot run
without and which optimum-intel omits without a word when the conversion fails; the NPU base of a base model
(``export_npu_base``) and an adapter folder that runs on it (``write_npu_adapter``).
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from tasks.common.files import atomic_dir, file_sha256, read_json, write_json
from tasks.deploy.builders import BuildError
from tasks.deploy.formats.tokenizer import portable_tokenizer
from tasks.deploy.runtime.openvino import NPU_ADAPTER_FILE, NPU_INFO, npu_manifest

# export.npu_weights' rungs: NNCF weight compression (optimum.intel.OVWeightQuantizationConfig). The NPU takes int4
# weights only symmetric, per group of 128 or per output channel (OpenVINO's NPU guide for LLMs:
# docs.openvino.ai, "NPU with OpenVINO GenAI"); ratio 1.0 puts every weight of the decoder layers in int4 (NNCF keeps
# the embeddings and LM head at its 8-bit backup precision).
# int4-channel-awq: the same grid, data-aware — AWQ (activation-aware scaling, Lin et al. 2023) and NNCF's scale
# estimation on calibration rows of the train split (DATA_AWARE: build_openvino_folder needs them).
NPU_WEIGHTS = {"int4-g128": {"bits": 4, "sym": True, "group_size": 128, "ratio": 1.0},
               "int4-channel": {"bits": 4, "sym": True, "group_size": -1, "ratio": 1.0},
               "int4-channel-awq": {"bits": 4, "sym": True, "group_size": -1, "ratio": 1.0, "quant_method": "awq",
                                    "scale_estimation": True},
               "int8": {"bits": 8, "sym": True}}
DATA_AWARE = ("int4-channel-awq",)
IR_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")


class OpenVINOBuildError(BuildError):
    """The OpenVINO export cannot be built with these weights (e.g. NNCF's ``InvalidGroupSizeError``: a hidden size
    not divisible by the group size), or it came out without a file the pipeline needs."""


def build_openvino_folder(model: str, out: Path, weights: str, trust_remote_code: bool = False,
                          calibration: list[str] | None = None) -> None:
    """Export the transformers folder ``model`` to ``out`` as an OpenVINO IR with ``NPU_WEIGHTS[weights]``
    (optimum-intel's ``OVModelForCausalLM.from_pretrained(export=True, quantization_config=...)``, stateful: KV
    cache inside the model; a ``DATA_AWARE`` rung calibrates on ``calibration``, chat-formatted texts), beside the
    tokenizer files with the chat template and the tokenizer and detokenizer IRs
    (``openvino_tokenizers.convert_tokenizer``; a SentencePiece-style decoder on a byte-level BPE, as the embedded
    SmolLM2 carries, is first rewritten to the plain byte-level form it encodes identically with:
    ``tasks.deploy.formats.tokenizer.portable_tokenizer``).

    Raises:
        OpenVINOBuildError: NNCF refused the weights (naming why), a file of ``IR_FILES`` is missing, or a
            ``DATA_AWARE`` rung without calibration texts.
    """
    from nncf.errors import InvalidGroupSizeError
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
    from transformers import AutoTokenizer

    data = {}
    if weights in DATA_AWARE:
        if not calibration:
            raise OpenVINOBuildError(f"export openvino-npu: {weights} weights need calibration rows")
        data = {"dataset": list(calibration), "tokenizer": model, "num_samples": len(calibration)}
    out.mkdir(parents=True, exist_ok=True)
    try:
        ov_model = OVModelForCausalLM.from_pretrained(
            model, export=True, compile=False, trust_remote_code=trust_remote_code,
            quantization_config=OVWeightQuantizationConfig(**NPU_WEIGHTS[weights], **data))
    except InvalidGroupSizeError as e:
        raise OpenVINOBuildError(f"export openvino-npu: {weights} weights: {str(e).splitlines()[0]}") from None
    ov_model.save_pretrained(out)
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer in the form every runtime reads as transformers does
        AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        portable_tokenizer(Path(tmp) / "tokenizer.json")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        for path in Path(tmp).iterdir():
            shutil.copy2(path, out / path.name)
    write_tokenizer_irs(tokenizer, out)
    missing = [name for name in IR_FILES if not (out / name).is_file()]
    if missing:
        raise OpenVINOBuildError(f"export openvino-npu: {out} lacks {', '.join(missing)} after the export")


def write_tokenizer_irs(tokenizer, out: Path) -> None:
    """``openvino_tokenizer.xml`` and ``openvino_detokenizer.xml`` (with their ``.bin``) of a transformers
    tokenizer in ``out``.

    Raises:
        OpenVINOBuildError: openvino_tokenizers cannot convert it (its message).
    """
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    try:
        encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
    except Exception as e:  # noqa: BLE001 - the converter raises what its parsers raise; one line naming it
        raise OpenVINOBuildError(f"export openvino-npu: openvino_tokenizers cannot convert the tokenizer "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    ov.save_model(encoder, str(out / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(out / "openvino_detokenizer.xml"))


def export_npu_base(base_model: str, weights: str, out_dir: str | Path, trust_remote_code: bool = False) -> str:
    """The base model as an NPU IR (``build_openvino_folder`` at ``weights``) with its ``npu.json`` (the files'
    SHA-256; no prompt window: each adapter export sets its own), once per base model and weights (the flow's
    ``npu-base`` stage, under ``model.cache_dir``), for ``openvino-npu-adapter`` exports to run on. Written to a
    temporary folder and moved to ``out_dir`` when complete; returns ``out_dir``.

    Raises:
        OpenVINOBuildError: as ``build_openvino_folder``.
    """
    with atomic_dir(out_dir) as tmp:
        build_openvino_folder(base_model, tmp, weights, trust_remote_code)
        write_json(tmp / NPU_INFO, npu_manifest(tmp, None))
    return str(out_dir)


def write_npu_adapter(adapter: str | Path, npu_base: str | Path, out: Path, max_prompt_len: int) -> None:
    """An ``openvino-npu-adapter`` folder in ``out``: the PEFT adapter's ``adapter_model.safetensors`` and
    ``adapter_config.json`` as trained (``openvino_genai.Adapter`` reads PEFT's file) and ``npu.json``: the prompt
    window, the NPU base it runs on (its folder and the SHA-256 of the base's ``npu.json``), the LoRA scale
    ``alpha`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA: PEFT's ``LoraLayer.update_layer``) and
    the adapter file's SHA-256.

    Raises:
        OpenVINOBuildError: the adapter is not plain LoRA (DoRA or another PEFT method).
    """
    adapter, out = Path(adapter), Path(out)
    config = read_json(adapter / "adapter_config.json")
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise OpenVINOBuildError(f"export openvino-npu-adapter: {adapter} is not a plain LoRA adapter "
                                 "(OpenVINO GenAI's adapters are LoRA only); export openvino-npu instead")
    out.mkdir(parents=True, exist_ok=True)
    for name in (NPU_ADAPTER_FILE, "adapter_config.json"):
        shutil.copy2(adapter / name, out / name)
    r, lora_alpha = config["r"], config["lora_alpha"]
    write_json(out / NPU_INFO, {"max_prompt_len": max_prompt_len, "base": str(Path(npu_base).resolve()),
                                "base_sha256": file_sha256(Path(npu_base) / NPU_INFO),
                                "alpha": lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r),
                                "sha256": {NPU_ADAPTER_FILE: file_sha256(out / NPU_ADAPTER_FILE)}})
