"""evaluate: batched greedy generation and teacher-forced loss on the test split, for the base or tuned model.

Classification: accuracy and macro-F1 of the generated label (exact match after whitespace/case
normalisation). Generation: ROUGE-L F1 (rouge-score), corpus BLEU (sacrebleu) and exact match — of the whole
text, or of the final answer an ``eval.answer_pattern`` extracts (gsm8k's ``#### <number>``). Both:
completion-token eval loss and perplexity = exp(eval loss).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from configs.schema import EvalConfig
from tasks.base_model import autocast, load_model, load_tokenizer, use_bf16
from tasks.chat import batches, generate, prompt_ids, tokenize_with_completion_mask
from tasks.files import atomic_dir, read_jsonl, write_json, write_jsonl
from tasks.metrics import score, task_kind

log = logging.getLogger(__name__)
GENERATION_MAX_NEW_TOKENS = 256


class EvalResult(BaseModel):
    """What ``evaluate`` returns and writes as ``metrics.json``: the task kind it scored, that kind's quality
    metrics as further fields (``tasks.metrics.TASK_KINDS``: ``accuracy``, ``macro_f1``, ...; ``answer_found``
    with ``eval.answer_pattern``), the teacher-forced loss and how the evaluation ran."""

    model_config = ConfigDict(extra="allow")

    task: str
    eval_loss: float  # mean nats per completion token
    perplexity: float  # exp(eval_loss)
    n_examples: int
    bf16: bool
    max_new_tokens: int
    wall_seconds: float

    @model_validator(mode="after")
    def _has_its_metrics(self) -> EvalResult:
        missing = [m for m in task_kind(self.task).metrics if not isinstance(getattr(self, m, None), (int, float))]
        if missing:
            raise ValueError(f"a {self.task} evaluation needs the numeric metrics {missing}")
        return self

    def metric(self, name: str) -> float:
        """One quality or loss metric by name (``tasks.metrics.ALL_METRICS``).

        Raises:
            KeyError: this evaluation did not report ``name``.
        """
        value = getattr(self, name, None)
        if value is None:
            raise KeyError(f"{name!r}: a {self.task} evaluation reports {sorted(self.model_dump())}")
        return value


def evaluate(model_path: str, test_file: str, task: str, cfg: EvalConfig, out_dir: str | Path,
             trust_remote_code: bool = False) -> EvalResult:
    """Evaluate the model at ``model_path`` on ``test_file``; publish ``metrics.json`` + ``predictions.jsonl``
    in ``out_dir`` atomically.

    Args:
        task: ``"classification"`` or ``"generation"`` (``cfg.task`` overrides it unless ``"auto"``).

    Returns:
        ``EvalResult``.
    """
    start = time.perf_counter()
    task = task if cfg.task == "auto" else cfg.task
    records = read_jsonl(test_file)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_model(model_path, trust_remote_code)
    prompts = [prompt_ids(tokenizer, r) for r in records]
    references = [r["messages"][-1]["content"] for r in records]
    max_new = cfg.max_new_tokens or _default_max_new_tokens(tokenizer, references, task)
    bf16 = use_bf16(cfg.bf16)
    with autocast(bf16):
        predictions = generate(model, tokenizer, prompts, max_new, cfg.batch_size)
        loss = completion_loss(model, tokenizer, records, cfg.batch_size)
    scores = score(task, predictions, references, cfg.answer_pattern)
    metrics = EvalResult(task=task, **scores, eval_loss=loss, perplexity=math.exp(loss), n_examples=len(records),
                         bf16=bf16, max_new_tokens=max_new, wall_seconds=time.perf_counter() - start)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "predictions.jsonl", [{"prompt": r["messages"][:-1], "reference": ref, "prediction": p}
                                                for r, ref, p in zip(records, references, predictions)])
        write_json(tmp / "metrics.json", metrics.model_dump(mode="json"))
    log.info("evaluate %s: %s", model_path, metrics.model_dump_json())
    return metrics


def _default_max_new_tokens(tokenizer, references: list[str], task: str) -> int:
    if task != "classification":
        return GENERATION_MAX_NEW_TOKENS
    return max(len(tokenizer(label, add_special_tokens=False).input_ids) for label in set(references)) + 2


def completion_loss(model, tokenizer, records: list[dict], batch_size: int) -> float:
    """Mean cross-entropy (nats) over completion tokens only, teacher-forced, summed over the whole split."""
    import torch
    from tqdm.auto import tqdm

    rows = tokenize_with_completion_mask(tokenizer, records)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    total, count = 0.0, 0
    for idx in tqdm(list(batches(order, batch_size)), desc="eval loss"):
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
