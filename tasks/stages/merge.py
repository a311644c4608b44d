"""merge: fold the LoRA adapter into the base weights (peft ``merge_and_unload``) and check the result.

A QLoRA adapter is never merged into 4-bit weights (rounding the sum back to 4 bits would lose most of the
adapter): the base is reloaded in float32, merged there, and the merged model is compared with the adapter on the
4-bit base, the model as trained. Full fine-tuning has no adapter: the trained model is copied, with its checks
(``copy_full_model``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, Field

from configs.schema import LoraConfig, MergeConfig
from tasks.base_model import load_4bit, load_adapter, load_model, load_tokenizer
from tasks.common.chat import tokenize_with_completion_mask
from tasks.common.files import atomic_dir, read_json, read_jsonl

log = logging.getLogger(__name__)


class MergeCheckError(RuntimeError):
    """The merged model does not reproduce base+adapter, or the adapter changed nothing."""


class MergeChecks(BaseModel):
    """The merge's checks (``metrics.json["merge"]``)."""

    max_abs_logit_diff: float = Field(description="merged vs base+adapter, over non-pad check positions")
    max_abs_weight_diff: float = Field(description="largest change of any weight from the base's")
    qlora_vs_4bit: dict | None = Field(description="compare_with_4bit's figures for a qlora adapter, else None")


class MergeResult(MergeChecks):
    """What ``merge`` returns: its checks, the merged model's folder and the adapter's training method."""

    merged: str
    method: str = Field(description="from the adapter's train.json; lora without one")


def merge(base_model: str, adapter: str, check_file: str, cfg: MergeConfig, out_dir: str | Path,
          trust_remote_code: bool = False) -> MergeResult:
    """Write a standalone merged model (safetensors, tokenizer, generation config) to ``out_dir``, atomically.

    Checks, before anything is published: (1) some merged weight differs from the base weight; (2) on the
    first ``cfg.n_check_prompts`` examples of ``check_file`` the merged model's logits match the
    base+adapter model's logits within ``cfg.logit_atol`` (max abs difference over non-pad positions); (3) for
    a QLoRA adapter (``method: qlora`` in the adapter's ``train.json``), the merged float32 model's next-token
    choice agrees with the adapter on the 4-bit base at ``cfg.min_qlora_top1_agreement`` of the answer
    positions at least (:func:`compare_with_4bit`; the logit differences are reported). A fully fine-tuned
    model (``method: full``) is copied instead (:func:`copy_full_model`).

    Returns:
        ``MergeResult``.

    Raises:
        MergeCheckError: a check fails; nothing is written to ``out_dir`` then.
    """
    import torch

    trained = _train_record(adapter)
    if trained.get("method") == "full":
        return copy_full_model(base_model, adapter, check_file, cfg, out_dir, trust_remote_code)
    tokenizer = load_tokenizer(adapter, trust_remote_code)
    base = load_model(base_model, trust_remote_code)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    tuned = load_adapter(base, adapter).eval()
    rows, batch = check_batch(tokenizer, check_file, cfg.n_check_prompts, base.device)
    with torch.inference_mode():
        adapter_logits = tuned(**batch).logits
        merged = tuned.merge_and_unload()
        merged_logits = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    logit_diff = (adapter_logits - merged_logits).abs()[mask].max().item()
    weight_diff = max_weight_change(merged, before)
    log.info("merge: max abs logit diff %.3g (tolerance %.3g), max abs weight change %.3g",
             logit_diff, cfg.logit_atol, weight_diff)
    if weight_diff == 0:
        raise MergeCheckError("merge: merged weights equal the base weights: the adapter changed nothing")
    if not logit_diff <= cfg.logit_atol:
        raise MergeCheckError(f"merge: merged logits differ from base+adapter logits by {logit_diff:.3g} "
                              f"> merge.logit_atol={cfg.logit_atol:g}")
    del before, adapter_logits
    vs_4bit = None
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if trained.get("method") == "qlora":
            answers = torch.zeros_like(mask)
            for i, (ids, prompt_len) in enumerate(rows):  # logits at t predict token t+1: the answer's predictors
                answers[i, prompt_len - 1:len(ids) - 1] = True
            merged_answers = merged_logits[answers].float().cpu()
            del base, tuned, merged, merged_logits  # saved: free the float32 model before loading the 4-bit one
            _free_memory()
            vs_4bit = compare_with_4bit(merged_answers, answers, base_model, adapter,
                                        LoraConfig(method="qlora", **trained["bnb_4bit"]), batch, trust_remote_code)
            log.info("merge: merged float32 vs adapter on the 4-bit base: %s", json.dumps(vs_4bit))
            if vs_4bit["top1_agreement"] < cfg.min_qlora_top1_agreement:
                raise MergeCheckError(
                    f"merge: the merged model picks the same next token as the adapter on the 4-bit base at "
                    f"{vs_4bit['top1_agreement']:.1%} of the answer positions < merge.min_qlora_top1_agreement="
                    f"{cfg.min_qlora_top1_agreement:.0%}")
    return MergeResult(merged=str(out_dir), max_abs_logit_diff=logit_diff, max_abs_weight_diff=weight_diff,
                       method=trained.get("method", "lora"), qlora_vs_4bit=vs_4bit)


def max_weight_change(model, reference: dict) -> float:
    """The largest absolute difference between any parameter of ``model`` and the same-named tensor of
    ``reference`` (``{name: tensor}``, e.g. the base model's ``named_parameters()``)."""
    return max((p.detach() - reference[name].detach()).abs().max().item() for name, p in model.named_parameters())


def check_batch(tokenizer, check_file: str, n: int, device) -> tuple[list[tuple[list[int], int]], dict]:
    """The first ``n`` examples of ``check_file`` as ``(prompt+answer ids, prompt length)`` rows and as one
    right-padded batch on ``device`` (``input_ids``, ``attention_mask``: int64 (n, longest))."""
    rows = tokenize_with_completion_mask(tokenizer, read_jsonl(check_file)[:n])
    batch = tokenizer.pad({"input_ids": [ids for ids, _ in rows]}, padding=True, return_tensors="pt",
                          padding_side="right").to(device)
    return rows, batch


def copy_full_model(base_model: str, trained: str, check_file: str, cfg: MergeConfig, out_dir: str | Path,
                    trust_remote_code: bool = False) -> MergeResult:
    """Full fine-tuning: publish the trained model (``trained``, written by the train task) as the merged model in
    ``out_dir``, atomically, after checking that (1) some weight differs from the base's and (2) the published
    copy, loaded back, gives the trained model's logits within ``cfg.logit_atol`` on the first
    ``cfg.n_check_prompts`` examples of ``check_file``.

    Raises:
        MergeCheckError: a check fails; nothing is written to ``out_dir`` then.
    """
    import torch

    tokenizer = load_tokenizer(trained, trust_remote_code)
    tuned = load_model(trained, trust_remote_code)
    weight_diff = max_weight_change(tuned, dict(load_model(base_model, trust_remote_code).named_parameters()))
    if weight_diff == 0:
        raise MergeCheckError("merge: the trained weights equal the base weights: training changed nothing")
    _, batch = check_batch(tokenizer, check_file, cfg.n_check_prompts, tuned.device)
    with atomic_dir(out_dir) as tmp:
        tuned.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with torch.inference_mode():
            expected, copied = tuned(**batch).logits, load_model(str(tmp), trust_remote_code)(**batch).logits
        logit_diff = (expected - copied).abs()[batch["attention_mask"].bool()].max().item()
        log.info("merge (full fine-tuning, a copy): max abs logit diff %.3g, max abs weight change %.3g",
                 logit_diff, weight_diff)
        if not logit_diff <= cfg.logit_atol:
            raise MergeCheckError(f"merge: the published copy's logits differ from the trained model's by "
                                  f"{logit_diff:.3g} > merge.logit_atol={cfg.logit_atol:g}")
    return MergeResult(merged=str(out_dir), max_abs_logit_diff=logit_diff, max_abs_weight_diff=weight_diff,
                       method="full", qlora_vs_4bit=None)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_with_4bit(merged_answers, answers, base_model: str, adapter: str, lora_cfg: LoraConfig, batch: dict,
                      trust_remote_code: bool = False) -> dict:
    """Compare the merged model's logits at the answer positions (float32, shape (positions, vocab), on CPU) with
    those of ``adapter`` on the base quantized as in training (``tasks.base_model.load_4bit``) on ``batch``, at
    the positions where ``answers`` (bool, (batch, seq)) is True.

    Returns:
        ``{"top1_agreement": fraction of positions with the same argmax token, "max_abs_logit_diff",
        "mean_abs_logit_diff": float, "positions": int}``.
    """
    import torch

    quantized = load_adapter(load_4bit(base_model, lora_cfg, trust_remote_code), adapter).eval()
    with torch.inference_mode():
        logits_4bit = quantized(**batch.to(quantized.device)).logits[answers.to(quantized.device)].float().cpu()
    diff = (merged_answers - logits_4bit).abs()
    same = merged_answers.argmax(-1) == logits_4bit.argmax(-1)
    return {"top1_agreement": same.float().mean().item(), "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(), "positions": int(answers.sum())}


def _train_record(adapter: str) -> dict:
    """The adapter's ``train.json`` (written by the train task: method, 4-bit settings), or {} without one."""
    path = Path(adapter) / "train.json"
    return read_json(path) if path.is_file() else {}
