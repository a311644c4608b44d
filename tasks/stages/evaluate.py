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

from configs.schema import ConfigError, EvalConfig
from tasks.base_model import autocast, load_model, load_tokenizer, use_bf16
from tasks.common.chat import batches, default_max_new_tokens, generate, prompt_ids, tokenize_with_completion_mask
from tasks.common.files import atomic_dir, read_jsonl, write_json, write_jsonl
from tasks.common.metrics import score, task_kind, wilson_interval

log = logging.getLogger(__name__)


class EvalResult(BaseModel):
    """What ``evaluate`` returns and writes as ``metrics.json``: the task kind it scored, that kind's quality
    metrics as further fields (``tasks.common.metrics.TASK_KINDS``: ``accuracy``, ``macro_f1``, ...; ``answer_found``
    with ``eval.answer_pattern``), the teacher-forced loss and how the evaluation ran."""

    model_config = ConfigDict(extra="allow")

    task: str
    eval_loss: float  # mean nats per completion token
    perplexity: float  # exp(eval_loss)
    n_examples: int
    bf16: bool
    max_new_tokens: int
    wall_seconds: float
    population: int | None = None  # rows in the split; n_examples < population: a stratified sample of it
    few_shot: int = 0  # training examples shown before every prompt (k-shot prompting)
    interval95: dict[str, tuple[float, float]] = {}  # Wilson 95 % interval of each per-row proportion metric

    @model_validator(mode="after")
    def _has_its_metrics(self) -> EvalResult:
        missing = [m for m in task_kind(self.task).metrics if not isinstance(getattr(self, m, None), (int, float))]
        if missing:
            raise ValueError(f"a {self.task} evaluation needs the numeric metrics {missing}")
        return self

    def metric(self, name: str) -> float:
        """One quality or loss metric by name (``tasks.common.metrics.ALL_METRICS``).

        Raises:
            KeyError: this evaluation did not report ``name``.
        """
        value = getattr(self, name, None)
        if value is None:
            raise KeyError(f"{name!r}: a {self.task} evaluation reports {sorted(self.model_dump())}")
        return value


def evaluate(model_path: str, test_file: str, task: str, cfg: EvalConfig, out_dir: str | Path,
             trust_remote_code: bool = False, max_examples: int | None = None, few_shot: int = 0,
             shots_file: str | None = None, seed: int = 0) -> EvalResult:
    """Evaluate the model at ``model_path`` on ``test_file``; publish ``metrics.json`` + ``predictions.jsonl``
    in ``out_dir`` atomically.

    Args:
        task: ``"classification"`` or ``"generation"`` (``cfg.task`` overrides it unless ``"auto"``).
        max_examples: evaluate a stratified sample of this many rows (``tasks.stages.split.subsample`` with ``seed``);
            None = every row.
        few_shot: k; with ``shots_file`` (a split's JSONL), k of its examples (``few_shot_examples``) precede every
            prompt as earlier chat turns.

    Returns:
        ``EvalResult``, with the Wilson 95 % interval of its per-row proportion metric
        (``tasks.common.metrics.TaskKind.per_row``).

    Raises:
        ValueError: ``few_shot`` without ``shots_file``.
    """
    from tasks.stages.split import subsample

    start = time.perf_counter()
    task = task if cfg.task == "auto" else cfg.task
    records = read_jsonl(test_file)
    population = len(records)
    records = subsample(records, max_examples, seed)
    if few_shot:
        if shots_file is None:
            raise ValueError("evaluate: few_shot needs shots_file (the split to draw the examples from)")
        shots = few_shot_examples(read_jsonl(shots_file), few_shot, seed)
        records = [with_shots(r, shots) for r in records]
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_model(model_path, trust_remote_code)
    prompts = [prompt_ids(tokenizer, r) for r in records]
    references = [r["messages"][-1]["content"] for r in records]
    max_new = cfg.max_new_tokens or default_max_new_tokens(tokenizer, references, task)
    bf16 = use_bf16(cfg.bf16)
    with autocast(bf16):
        predictions, loss = generate_with_loss(model, tokenizer, records, prompts, max_new, cfg.batch_size)
    scores = score(task, predictions, references, cfg.answer_pattern)
    per_row = task_kind(task).per_row
    metrics = EvalResult(task=task, **scores, eval_loss=loss, perplexity=math.exp(loss), n_examples=len(records),
                         bf16=bf16, max_new_tokens=max_new, wall_seconds=time.perf_counter() - start,
                         population=population, few_shot=len(shots) if few_shot else 0,
                         interval95={per_row: wilson_interval(round(scores[per_row] * len(records)), len(records))})
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "predictions.jsonl", [{"prompt": r["messages"][:-1], "reference": ref, "prediction": p}
                                                for r, ref, p in zip(records, references, predictions)])
        write_json(tmp / "metrics.json", metrics.model_dump(mode="json"))
    log.info("evaluate %s: %s", model_path, metrics.model_dump_json())
    return metrics


def few_shot_examples(records: list[dict], k: int, seed: int) -> list[dict]:
    """k of ``records`` for k-shot prompting, drawn with ``seed``: for labelled rows one per label (labels in a
    seeded random order, then a second round, ... until k), else k random rows.

    Raises:
        ConfigError: fewer than k records (names ``eval.few_shot``).
    """
    import random

    if len(records) < k:
        raise ConfigError(f"eval.few_shot={k} needs {k} training examples; the train split has {len(records)}")
    rng = random.Random(seed)
    shuffled = rng.sample(records, len(records))
    by_label: dict = {}
    for r in shuffled:
        by_label.setdefault(r.get("label"), []).append(r)
    rounds = [group[i] for i in range(max(map(len, by_label.values()))) for group in by_label.values()
              if i < len(group)]
    return rounds[:k]


def with_shots(record: dict, shots: list[dict]) -> dict:
    """``record`` with each shot's user/assistant turns inserted after its system turn (if any), before its own."""
    system = [m for m in record["messages"] if m["role"] == "system"]
    turns = [m for shot in shots for m in shot["messages"] if m["role"] != "system"]
    return {**record, "messages": system + turns + [m for m in record["messages"] if m["role"] != "system"]}


def completion_loss(model, tokenizer, records: list[dict], batch_size: int) -> float:
    """Mean cross-entropy (nats) over completion tokens only, teacher-forced, summed over the whole split; the LM
    head runs only at the positions that predict a completion token (``tasks.common.loss``)."""
    import torch
    from tqdm.auto import tqdm

    from tasks.common.loss import IGNORE_INDEX, completion_logits

    rows = tokenize_with_completion_mask(tokenizer, records)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    total, count = 0.0, 0
    for idx in tqdm(list(batches(order, batch_size)), desc="eval loss"):
        batch = tokenizer.pad({"input_ids": [rows[i][0] for i in idx]}, padding=True, return_tensors="pt",
                              padding_side="right").to(model.device)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        for j, i in enumerate(idx):
            labels[j, : rows[i][1]] = IGNORE_INDEX
        with torch.inference_mode():
            logits, targets, _ = completion_logits(model, dict(batch), labels)
            total += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return total / max(count, 1)


def generate_with_loss(model, tokenizer, records: list[dict], prompts: list[list[int]], max_new_tokens: int,
                       batch_size: int) -> tuple[list[str], float]:
    """``generate``'s greedy answers and ``completion_loss``'s loss, from one prefill of each prompt.

    One forward pass over [left-padded prompt | right-padded reference answer] gives the teacher-forced loss at
    the answer tokens and, at the prompt's last position (which predicts the first answer token), the first
    greedy token; the KV cache of that pass, cropped to the prompt (causal attention: the prompt's keys and
    values never see the answer), then continues greedy decoding (``model.generate`` with ``past_key_values``).
    Falls back to the two separate passes when a record's chat template does not render its prompt as a prefix
    of prompt + answer, or the model's cache cannot be cropped.

    Args:
        prompts: ``prompt_ids`` of each record (generation prompt included).
        max_new_tokens: greedy tokens per row at most; a row ends at the tokenizer's end-of-sequence token.

    Returns:
        ``(answers in input order, mean cross-entropy in nats per completion token)``.
    """
    from tqdm.auto import tqdm

    rows = tokenize_with_completion_mask(tokenizer, records)
    if any(full[:n] != prompt for (full, n), prompt in zip(rows, prompts)) or not _croppable(model):
        return (generate(model, tokenizer, prompts, max_new_tokens, batch_size),
                completion_loss(model, tokenizer, records, batch_size))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out, total, count = [""] * len(prompts), 0.0, 0
    for idx in tqdm(list(batches(order, batch_size)), desc="generate + eval loss"):
        texts, nll, n = _generate_with_loss_batch(model, tokenizer, [prompts[i] for i in idx],
                                                  [rows[i][0][rows[i][1]:] for i in idx], max_new_tokens)
        for i, text in zip(idx, texts):
            out[i] = text
        total, count = total + nll, count + n
    return out, total / max(count, 1)


def _croppable(model) -> bool:
    """The model's default cache (transformers' ``DynamicCache``) can be cut back to the prompt: attention layers
    only (``tasks.base_model.attention_only``; a convolution's or SSM's state would keep the answer), no sliding
    window."""
    from transformers import DynamicCache

    from tasks.base_model import attention_only

    window = getattr(model.config, "sliding_window", None)
    return ((window is None or getattr(model.config, "use_sliding_window", None) is False)
            and attention_only(model.config) and hasattr(DynamicCache, "crop"))


def _generate_with_loss_batch(model, tokenizer, prompts: list[list[int]], answers: list[list[int]],
                              max_new_tokens: int) -> tuple[list[str], float, int]:
    """One batch of ``generate_with_loss``: ``(answers, summed cross-entropy in nats, completion tokens)``."""
    import torch

    from tasks.common.loss import IGNORE_INDEX, completion_logits

    width, tail = max(map(len, prompts)), max(map(len, answers))
    ids = torch.full((len(prompts), width + tail), tokenizer.pad_token_id, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE_INDEX)
    for j, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids[j, width - len(prompt): width + len(answer)] = torch.tensor(prompt + answer)
        mask[j, width - len(prompt): width + len(answer)] = 1
        labels[j, width: width + len(answer)] = torch.tensor(answer)
    ids, mask, labels = ids.to(model.device), mask.to(model.device), labels.to(model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded prompt
    with torch.inference_mode():
        logits, targets, outputs = completion_logits(
            model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}, labels)
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        counts = (labels != IGNORE_INDEX).sum(-1)
        first = logits[counts.cumsum(0) - counts].argmax(-1)  # each row's first kept position: the prompt's last
        new = first[:, None]
        if max_new_tokens > 1:
            cache = outputs.past_key_values
            if tail:  # drop the answer's keys/values (a negative count: transformers 5 refuses a positive one)
                cache.crop(-tail)
            generated = model.generate(input_ids=torch.cat([ids[:, :width], new], 1),
                                       attention_mask=torch.cat([mask[:, :width], torch.ones_like(new)], 1),
                                       past_key_values=cache, max_new_tokens=max_new_tokens - 1, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = generated[:, width:]
    eos = tokenizer.eos_token_id
    cut = [row[: row.index(eos)] if eos in row else row for row in new.tolist()]  # a row that ended stays ended
    texts = [text.strip() for text in tokenizer.batch_decode(cut, skip_special_tokens=True)]
    return texts, nll, targets.numel()
