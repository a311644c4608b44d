"""merge: fold the LoRA adapter into the base weights (peft ``merge_and_unload``) and check the result."""
from __future__ import annotations

import logging
from pathlib import Path

from configs.schema import MergeConfig
from tasks.base_model import load_adapter, load_model, load_tokenizer
from tasks.evaluate import tokenize_with_completion_mask
from tasks.files import atomic_dir, read_jsonl

log = logging.getLogger(__name__)


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce base+adapter, or the adapter changed nothing."""


def merge(base_model: str, adapter: str, check_file: str, cfg: MergeConfig, out_dir: str | Path,
          trust_remote_code: bool = False) -> dict:
    """Write a standalone merged model (safetensors, tokenizer, generation config) to ``out_dir``, atomically.

    Checks, before anything is published: (1) some merged weight differs from the base weight; (2) on the
    first ``cfg.n_check_prompts`` examples of ``check_file`` the merged model's logits match the
    base+adapter model's logits within ``cfg.logit_atol`` (max abs difference over non-pad positions).

    Returns:
        ``{"merged": path, "max_abs_logit_diff": float, "max_abs_weight_diff": float}``.

    Raises:
        MergeCheckError: either check fails; nothing is written to ``out_dir`` then.
    """
    import torch

    tokenizer = load_tokenizer(adapter, trust_remote_code)
    base = load_model(base_model, trust_remote_code)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    tuned = load_adapter(base, adapter).eval()
    rows = tokenize_with_completion_mask(tokenizer, read_jsonl(check_file)[: cfg.n_check_prompts])
    batch = tokenizer.pad({"input_ids": [ids for ids, _ in rows]}, padding=True, return_tensors="pt",
                          padding_side="right").to(base.device)
    with torch.inference_mode():
        adapter_logits = tuned(**batch).logits
        merged = tuned.merge_and_unload()
        merged_logits = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    logit_diff = (adapter_logits - merged_logits).abs()[mask].max().item()
    weight_diff = max((p.detach() - before[name]).abs().max().item() for name, p in merged.named_parameters())
    log.info("merge: max abs logit diff %.3g (tolerance %.3g), max abs weight change %.3g",
             logit_diff, cfg.logit_atol, weight_diff)
    if weight_diff == 0:
        raise MergeCheckError("merge: merged weights equal the base weights: the adapter changed nothing")
    if not logit_diff <= cfg.logit_atol:
        raise MergeCheckError(f"merge: merged logits differ from base+adapter logits by {logit_diff:.3g} "
                              f"> merge.logit_atol={cfg.logit_atol:g}")
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"merged": str(out_dir), "max_abs_logit_diff": logit_diff, "max_abs_weight_diff": weight_diff}
