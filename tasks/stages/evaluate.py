"""evaluate: batched greedy generation and teacher-forced loss on the test split, for the base or tuned model.

Classification: accuracy and macro-F1 of the generated label (exact match after whitespace/case
normalisation); with ``eval.constrain: labels`` (the default) the answer is decoded along the tree of the train
split's labels (``tasks.common.labels``), so it is a label by construction, and the unconstrained answer is
measured beside it (``eval.compare_unconstrained``: its accuracy and the share of answers that are no label).
Generation: ROUGE-L F1 (rouge-score), corpus BLEU (sacrebleu) and exact match — of the whole text, or of the final
answer an ``eval.answer_pattern`` extracts (gsm8k's ``#### <number>``). Both: completion-token eval loss and
perplexity = exp(eval loss).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from configs.schema import ConfigError, EvalConfig
from tasks.base_model import autocast, inference_attention, load_model, load_tokenizer, use_bf16
from tasks.common.chat import (answer_ids, batches, constrained_decode, default_max_new_tokens, generate,
                               generate_constrained, prompt_ids, tokenize_with_completion_mask)
from tasks.common.labels import LabelTree, label_set
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
    constrained: bool = False  # answers decoded along the label tree (eval.constrain: labels)
    label_list: bool = False  # the label set was in the prompt (the prompting baselines)
    # with constrained answers and eval.compare_unconstrained: the unconstrained answers' accuracy and the share
    # of them that are no label at all
    unconstrained_accuracy: float | None = None
    off_label_share: float | None = None
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
             train_file: str | None = None, seed: int = 0, label_list: bool = False) -> EvalResult:
    """Evaluate the model at ``model_path`` on ``test_file``; publish ``metrics.json`` + ``predictions.jsonl``
    in ``out_dir`` atomically.

    Args:
        task: ``"classification"`` or ``"generation"`` (``cfg.task`` overrides it unless ``"auto"``).
        max_examples: evaluate a stratified sample of this many rows (``tasks.stages.split.subsample`` with ``seed``);
            None = every row.
        few_shot: k; k of ``train_file``'s examples (``few_shot_examples``) precede every prompt as earlier chat
            turns.
        train_file: the train split (JSONL; default the ``train.jsonl`` beside ``test_file``, as the split stage
            writes them): the few-shot examples and, for classification with ``cfg.constrain: labels``, the label
            set answers are constrained to.
        label_list: tell the model the label set in the prompt (``with_label_list``; the prompting baselines).

    Returns:
        ``EvalResult``, with the Wilson 95 % interval of its per-row proportion metric
        (``tasks.common.metrics.TaskKind.per_row``).

    Raises:
        ValueError: ``few_shot``, constrained answers or ``label_list`` without ``train_file``.
        tasks.common.labels.LabelTreeError: the labels' answer tokens cannot be told apart (a ValueError).
    """
    from tasks.stages.split import subsample

    start = time.perf_counter()
    task = task if cfg.task == "auto" else cfg.task
    records = read_jsonl(test_file)
    population = len(records)
    records = subsample(records, max_examples, seed)
    constrain = task == "classification" and cfg.constrain == "labels"
    beside = Path(test_file).with_name("train.jsonl")  # the split stage's folder holds train.jsonl beside it
    train_file = train_file or (str(beside) if beside.is_file() else None)
    if (few_shot or constrain or label_list) and train_file is None:
        raise ValueError("evaluate: few_shot, constrained answers and label_list need train_file (the train split)")
    train = read_jsonl(train_file) if train_file else []
    labels = label_set(train)
    shots = few_shot_examples(train, few_shot, seed) if few_shot else []
    records = [with_shots(r, shots) for r in records] if shots else records
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    if label_list and labels:
        records = [with_label_list(r, labels, tokenizer) for r in records]
    model = load_model(model_path, trust_remote_code, attn_implementation=inference_attention(model_path))
    prompts = [prompt_ids(tokenizer, r) for r in records]
    references = [r["messages"][-1]["content"] for r in records]
    max_new = cfg.max_new_tokens or default_max_new_tokens(tokenizer, references, task)
    tree = LabelTree.build(answer_ids(tokenizer, labels)) if constrain else None
    bf16 = use_bf16(cfg.bf16)
    with autocast(bf16):
        predictions, loss, free = generate_with_loss(model, tokenizer, records, prompts, max_new, cfg.batch_size,
                                                     tree, compare=constrain and cfg.compare_unconstrained)
    scores = score(task, predictions, references, cfg.answer_pattern)
    per_row = task_kind(task).per_row
    extra = unconstrained_figures(free, references, labels) if free is not None else {}
    metrics = EvalResult(task=task, **scores, eval_loss=loss, perplexity=math.exp(loss), n_examples=len(records),
                         bf16=bf16, max_new_tokens=max_new, wall_seconds=time.perf_counter() - start,
                         population=population, few_shot=len(shots), constrained=constrain,
                         label_list=bool(label_list and labels), **extra,
                         interval95={per_row: wilson_interval(round(scores[per_row] * len(records)), len(records))})
    rows = [{"prompt": r["messages"][:-1], "reference": ref, "prediction": p}
            | ({"unconstrained": free[i]} if free is not None else {})
            for i, (r, ref, p) in enumerate(zip(records, references, predictions))]
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "predictions.jsonl", rows)
        write_json(tmp / "metrics.json", metrics.model_dump(mode="json"))
    log.info("evaluate %s: %s", model_path, metrics.model_dump_json())
    return metrics


def unconstrained_figures(answers: list[str], references: list[str], labels: list[str]) -> dict:
    """``{"unconstrained_accuracy", "off_label_share"}`` of free-running answers: the fraction equal to the
    reference (``classification_metrics``), and the fraction that is none of ``labels`` (after
    ``normalise_answer``)."""
    from tasks.common.metrics import classification_metrics, normalise_answer

    known = {normalise_answer(label) for label in labels}
    return {"unconstrained_accuracy": classification_metrics(answers, references)["accuracy"],
            "off_label_share": sum(normalise_answer(a) not in known for a in answers) / max(len(answers), 1)}


def with_label_list(record: dict, labels: list[str], tokenizer) -> dict:
    """``record`` with the label set named in its prompt — in its system turn, or (a template without a system
    role, e.g. Gemma's) at the head of its first user turn: "Answer with exactly one of these labels: a, b, ...".
    What a prompt engineer adds for a base model that was never trained on the label names."""
    note = "Answer with exactly one of these labels: " + ", ".join(labels) + "."
    messages = [dict(m) for m in record["messages"]]
    if messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{note}"
    elif accepts_system_role(tokenizer):
        messages.insert(0, {"role": "system", "content": note})
    else:
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = f"{note}\n\n{first['content']}"
    return {**record, "messages": messages}


def accepts_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system turn (Gemma's raises on one)."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False)
    except Exception:  # noqa: BLE001 - jinja's TemplateError from raise_exception, or a template's own error
        return False
    return True


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
                       batch_size: int, tree: LabelTree | None = None,
                       compare: bool = False) -> tuple[list[str], float, list[str] | None]:
    """Greedy answers and ``completion_loss``'s loss, from one prefill of each prompt.

    One forward pass over [left-padded prompt | right-padded reference answer] gives the teacher-forced loss at
    the answer tokens and, at the prompt's last position (which predicts the first answer token), the first
    greedy token; the KV cache of that pass, cropped to the prompt (causal attention: the prompt's keys and
    values never see the answer), then continues decoding: along the label tree ``tree``
    (``tasks.common.chat.constrained_decode``), or free-running (``model.generate`` with ``past_key_values``).
    Falls back to separate passes when a record's chat template does not render its prompt as a prefix of
    prompt + answer, or the model's cache cannot be cropped.

    Prefix caching: when every prompt starts with the same ``SHARED_PREFIX_MIN`` or more tokens (the prompting
    baselines: the system turn naming the labels and the k examples, identical in every row), that prefix is
    run once and its KV cache is repeated across each batch (as vLLM's automatic prefix caching does), so each
    row pays only for its own tokens.

    Args:
        prompts: ``prompt_ids`` of each record (generation prompt included).
        max_new_tokens: free-running tokens per row at most; a row ends at the tokenizer's end-of-sequence token.
        tree: constrain the answers to its labels (None: free-running).
        compare: with ``tree``, also decode free-running from the same prefill (a copy of the cache).

    Returns:
        ``(answers in input order, mean cross-entropy in nats per completion token, the free-running answers
        with ``compare`` else None)``.
    """
    from tqdm.auto import tqdm

    rows = tokenize_with_completion_mask(tokenizer, records)
    compare = tree is not None and compare
    if any(full[:n] != prompt for (full, n), prompt in zip(rows, prompts)) or not _croppable(model):
        loss = completion_loss(model, tokenizer, records, batch_size)
        free = generate(model, tokenizer, prompts, max_new_tokens, batch_size) if tree is None or compare else None
        if tree is None:
            return free, loss, None
        return generate_constrained(model, tokenizer, prompts, tree, batch_size), loss, free
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out, free, total, count = [""] * len(prompts), [""] * len(prompts) if compare else None, 0.0, 0
    prefix = shared_prefix(prompts)
    prefix = (prefix, _prefix_cache(model, prefix)) if len(prefix) >= SHARED_PREFIX_MIN else None
    for idx in tqdm(list(batches(order, batch_size)), desc="generate + eval loss"):
        texts, nll, n, free_texts = _generate_with_loss_batch(model, tokenizer, [prompts[i] for i in idx],
                                                              [rows[i][0][rows[i][1]:] for i in idx],
                                                              max_new_tokens, tree, compare, prefix)
        for j, i in enumerate(idx):
            out[i] = texts[j]
            if compare:
                free[i] = free_texts[j]
        total, count = total + nll, count + n
    return out, total / max(count, 1), free


SHARED_PREFIX_MIN = 64  # tokens: below this, running a common prefix once saves less than it costs to set up


def shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The token ids every prompt starts with, leaving each prompt at least its last token (whose logits predict
    the answer's first token)."""
    if len(prompts) < 2:
        return []
    limit, first = min(map(len, prompts)) - 1, prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return first[:n]


def _prefix_cache(model, prefix: list[int]):
    """The KV cache of ``prefix`` (one row), positions 0 .. len - 1."""
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True).past_key_values


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
                              max_new_tokens: int, tree: LabelTree | None = None, free_running: bool = True,
                              prefix=None) -> tuple[list[str], float, int, list[str] | None]:
    """One batch of ``generate_with_loss``: ``(answers, summed cross-entropy in nats, completion tokens,
    free-running answers or None)``; ``free_running``: decode free-running too (always when ``tree`` is None);
    ``prefix``: ``(token ids every prompt starts with, their one-row KV cache)`` or None."""
    import copy

    import torch

    from tasks.common.loss import IGNORE_INDEX, completion_logits

    head, cache = prefix if prefix else ([], None)
    prompts = [p[len(head):] for p in prompts]
    width, tail = max(map(len, prompts)), max(map(len, answers))
    ids = torch.full((len(prompts), width + tail), tokenizer.pad_token_id, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE_INDEX)
    for j, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids[j, width - len(prompt): width + len(answer)] = torch.tensor(prompt + answer)
        mask[j, width - len(prompt): width + len(answer)] = 1
        labels[j, width: width + len(answer)] = torch.tensor(answer)
    ids, mask, labels = ids.to(model.device), mask.to(model.device), labels.to(model.device)
    inputs = {"input_ids": ids, "use_cache": True}
    if head:  # [shared prefix | pad | row's own prompt | answer]: the prefix's cache, repeated for each row
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(prompts))
        shared = torch.tensor([head], dtype=torch.long, device=model.device).expand(len(prompts), -1)
        ids, mask = torch.cat([shared, ids], 1), torch.cat([torch.ones_like(shared), mask], 1)
        inputs["past_key_values"], width = cache, width + len(head)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded prompt
    inputs |= {"attention_mask": mask, "position_ids": positions[:, len(head):]}
    with torch.inference_mode():
        logits, targets, outputs = completion_logits(model, inputs, labels)
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        counts = (labels != IGNORE_INDEX).sum(-1)
        first_logits = logits[counts.cumsum(0) - counts]  # each row's first kept position: the prompt's last
        cache = outputs.past_key_values
        if tail:  # drop the answer's keys/values (a negative count: transformers 5 refuses a positive one)
            cache.crop(-tail)
        free = None
        if tree is None or free_running:
            free = _free_running(model, tokenizer, ids[:, :width], mask[:, :width], first_logits,
                                 copy.deepcopy(cache) if tree is not None else cache, max_new_tokens,
                                 list(tree.sequences) if tree is not None else None)
        if tree is None:
            return free, nll, targets.numel(), None
        chosen = constrained_decode(model, ids[:, :width], mask[:, :width], tree, tokenizer.pad_token_id, cache,
                                    first_logits)
    return chosen, nll, targets.numel(), free


def _free_running(model, tokenizer, ids, mask, first_logits, cache, max_new_tokens: int,
                  labels: list[str] | None = None) -> list[str]:
    """Greedy free-running answers after the prompts ``ids`` (left-padded, ``mask``) from their KV cache and the
    logits of the first answer token (``model.generate`` with ``past_key_values``). With ``labels`` (the comparison
    beside constrained answers) a row stops as soon as ``tasks.common.metrics.answer_decided`` says more tokens
    cannot change whether it is a label or which: its text is then cut there (an answer that left the label set
    is kept up to the token where it left), its accuracy and off-label share are the whole answer's."""
    import torch

    new = first_logits.argmax(-1)[:, None]
    if max_new_tokens > 1:
        stop = [LabelsDecided(tokenizer, labels, ids.shape[1])] if labels else None
        generated = model.generate(input_ids=torch.cat([ids, new], 1),
                                   attention_mask=torch.cat([mask, torch.ones_like(new)], 1),
                                   past_key_values=cache, max_new_tokens=max_new_tokens - 1, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   stopping_criteria=stop)
        new = generated[:, ids.shape[1]:]
    eos = tokenizer.eos_token_id
    cut = [row[: row.index(eos)] if eos in row else row for row in new.tolist()]  # a row that ended stays ended
    return [text.strip() for text in tokenizer.batch_decode(cut, skip_special_tokens=True)]


class LabelsDecided:
    """A ``transformers`` stopping criterion: True for each row whose answer so far (the tokens from column
    ``start``) is decided (``tasks.common.metrics.answer_decided`` against ``labels``, normalised here)."""

    def __init__(self, tokenizer, labels: list[str], start: int):
        from tasks.common.metrics import normalise_answer

        self.tokenizer, self.start = tokenizer, start
        self.labels = sorted({normalise_answer(label) for label in labels})

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        from tasks.common.metrics import answer_decided

        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([answer_decided(text, self.labels) for text in texts], device=input_ids.device)
