"""evaluate: batched greedy generation and teacher-forced loss on the test split, for the base or tuned model.

Classification: accuracy and macro-F1 of the generated label (exact match after whitespace/case
normalisation). Generation: ROUGE-L F1 (rouge-score), corpus BLEU (sacrebleu) and exact match — of the whole
text, or of the final answer an ``eval.answer_pattern`` extracts (gsm8k's ``#### <number>``). Both:
completion-token eval loss and perplexity = exp(eval loss).
"""
from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

from configs.schema import EvalConfig
from tasks.base_model import autocast, load_model, load_tokenizer, use_bf16
from tasks.files import atomic_dir, read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)
GENERATION_MAX_NEW_TOKENS = 256


def normalise_answer(text: str) -> str:
    """Lower-case, trim and collapse whitespace; for classification only the first line counts."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first).strip().lower()


def classification_metrics(predictions: list[str], references: list[str]) -> dict:
    """Accuracy and macro-F1 (scikit-learn, averaged over the reference label set, zero_division=0)."""
    from sklearn.metrics import f1_score

    pred = [normalise_answer(p) for p in predictions]
    ref = [normalise_answer(r) for r in references]
    labels = sorted(set(ref))
    return {"accuracy": sum(p == r for p, r in zip(pred, ref)) / len(ref),
            "macro_f1": float(f1_score(ref, pred, labels=labels, average="macro", zero_division=0))}


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The final answer in ``text``: the first group (or the whole match) of ``pattern``'s last match, commas
    removed, or ``None`` when it does not match; without a pattern, the whitespace/case-normalised text."""
    if pattern is None:
        return " ".join(text.split()).lower()
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).replace(",", "").strip()


def generation_metrics(predictions: list[str], references: list[str], answer_pattern: str | None = None) -> dict:
    """Mean ROUGE-L F1 (Lin 2004, via rouge-score with stemming), corpus BLEU (Papineni et al. 2002, sacrebleu's
    default 13a tokenisation, 0–100) and exact match of ``extract_answer`` (a prediction without an answer
    never matches); with ``answer_pattern``, also ``answer_found``: the fraction of predictions it matched."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    answers = [extract_answer(p, answer_pattern) for p in predictions]
    exact = [a is not None and a == extract_answer(r, answer_pattern) for a, r in zip(answers, references)]
    scores = {"rouge_l": sum(rouge) / len(rouge), "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
              "exact_match": sum(exact) / len(exact)}
    if answer_pattern is not None:
        scores["answer_found"] = sum(a is not None for a in answers) / len(answers)
    return scores


def evaluate(model_path: str, test_file: str, task: str, cfg: EvalConfig, out_dir: str | Path,
             trust_remote_code: bool = False) -> dict:
    """Evaluate the model at ``model_path`` on ``test_file``; publish ``metrics.json`` + ``predictions.jsonl``
    in ``out_dir`` atomically.

    Args:
        task: ``"classification"`` or ``"generation"`` (``cfg.task`` overrides it unless ``"auto"``).

    Returns:
        ``{"task": the kind scored, ...}`` with that kind's metrics (``tasks.metrics.TASK_KINDS``:
        ``"accuracy", "macro_f1"`` or ``"rouge_l", "bleu", "exact_match"``; and ``"answer_found"`` with
        ``cfg.answer_pattern``), plus ``eval_loss`` (mean nats per completion token), ``perplexity``,
        ``n_examples``, ``bf16``, ``max_new_tokens`` and ``wall_seconds``.
    """
    start = time.perf_counter()
    task = task if cfg.task == "auto" else cfg.task
    records = read_jsonl(test_file)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_model(model_path, trust_remote_code)
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True) for r in records]
    references = [r["messages"][-1]["content"] for r in records]
    max_new = cfg.max_new_tokens or _default_max_new_tokens(tokenizer, references, task)
    bf16 = use_bf16(cfg.bf16)
    with autocast(bf16):
        predictions = generate(model, tokenizer, prompts, max_new, cfg.batch_size)
        loss = completion_loss(model, tokenizer, records, cfg.batch_size)
    if task == "classification":
        scores = classification_metrics(predictions, references)
    else:
        scores = generation_metrics(predictions, references, cfg.answer_pattern)
    metrics = {"task": task, **scores, "eval_loss": loss, "perplexity": math.exp(loss), "n_examples": len(records),
               "bf16": bf16, "max_new_tokens": max_new, "wall_seconds": time.perf_counter() - start}
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "predictions.jsonl", [{"prompt": r["messages"][:-1], "reference": ref, "prediction": p}
                                                for r, ref, p in zip(records, references, predictions)])
        write_json(tmp / "metrics.json", metrics)
    log.info("evaluate %s: %s", model_path, metrics)
    return metrics


def _default_max_new_tokens(tokenizer, references: list[str], task: str) -> int:
    if task != "classification":
        return GENERATION_MAX_NEW_TOKENS
    return max(len(tokenizer(label, add_special_tokens=False).input_ids) for label in set(references)) + 2


def _batches(order: list[int], size: int):
    for i in range(0, len(order), size):
        yield order[i:i + size]


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             desc: str = "generate") -> list[str]:
    """Greedy-decode each tokenised prompt (left-padded batches, longest first); returns the new text only,
    special tokens removed, in the input order."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for idx in tqdm(list(_batches(order, batch_size)), desc=desc):
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding=True, return_tensors="pt",
                              padding_side="left").to(model.device)
        with torch.inference_mode():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch["input_ids"].shape[1]:]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


def tokenize_with_completion_mask(tokenizer, records: list[dict]) -> list[tuple[list[int], int]]:
    """``(prompt+completion ids, prompt length)`` per record, built exactly as TRL does for training."""
    rows = []
    for r in records:
        prompt = tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(r["messages"])
        rows.append((full, len(prompt)))
    return rows


def completion_loss(model, tokenizer, records: list[dict], batch_size: int) -> float:
    """Mean cross-entropy (nats) over completion tokens only, teacher-forced, summed over the whole split."""
    import torch
    from tqdm.auto import tqdm

    rows = tokenize_with_completion_mask(tokenizer, records)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    total, count = 0.0, 0
    for idx in tqdm(list(_batches(order, batch_size)), desc="eval loss"):
        batch = tokenizer.pad({"input_ids": [rows[i][0] for i in idx]}, padding=True, return_tensors="pt",
                              padding_side="right").to(model.device)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        for j, i in enumerate(idx):
            labels[j, : rows[i][1]] = -100
        with torch.inference_mode():
            logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((target != -100).sum())
    return total / max(count, 1)
