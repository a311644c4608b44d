"""The task kinds and their metrics: the one registry that the evaluation, the report tables, the promotion gate,
the sweep objective, the export gate and the config validation read.

Adding a metric: compute it in its kind's scoring function below (``classification_metrics`` /
``generation_metrics``) and name it in ``TASK_KINDS``; adding a task kind: one ``TaskKind`` entry and its scoring
function, called by ``score``.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskKind:
    """What an evaluation of one kind of task reports.

    Attributes:
        metrics: the quality metrics ``tasks.stages.evaluate.evaluate`` returns for it, in report order (fractions in
            [0, 1], greater is better).
        primary: the one the promotion gate, the export gate and ``sweep.metric: auto`` use.
        per_row: the metric that is the fraction of rows answered right (its 95 % interval is reported).
    """

    metrics: tuple[str, ...]
    primary: str
    per_row: str


TASK_KINDS = {
    "classification": TaskKind(metrics=("accuracy", "macro_f1"), primary="accuracy", per_row="accuracy"),
    "generation": TaskKind(metrics=("rouge_l", "bleu", "exact_match"), primary="rouge_l",
                           per_row="exact_match"),
}
# every evaluation also reports these (teacher-forced completion loss in nats per token, and exp of it)
LOSS_METRICS = ("eval_loss", "perplexity")
QUALITY_METRICS = tuple(dict.fromkeys(m for kind in TASK_KINDS.values() for m in kind.metrics))
ALL_METRICS = QUALITY_METRICS + LOSS_METRICS


def task_kind(name: str) -> TaskKind:
    """The registry entry of ``name``.

    Raises:
        ValueError: ``name`` is no task kind (the message lists the known ones).
    """
    if name not in TASK_KINDS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASK_KINDS)}")
    return TASK_KINDS[name]


def greater_is_better(metric: str) -> bool:
    """False for the loss metrics (``LOSS_METRICS``), True for every quality metric."""
    return metric not in LOSS_METRICS


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of a proportion ``successes / n`` (Wilson 1927, via scipy's
    ``BinomTestResult.proportion_ci(method="wilson")``); ``(0.0, 1.0)`` for ``n`` = 0."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


# a reasoning block ahead of the answer, as reasoning models (Qwen3, DeepSeek-R1 distills, SmolLM3) write it
REASONING_BLOCK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """``text`` without a leading ``<think>...</think>`` block (complete, empty or not) and the whitespace around
    it: the answer a reasoning model gives after it. Qwen3's chat template opens every trained answer with an
    empty block, and its tokenizer does not count ``<think>`` as a special token, so decoding keeps it. An
    unterminated block (cut off by ``max_new_tokens``) is left as it is: there is no answer after it."""
    return REASONING_BLOCK.sub("", text, count=1).strip()


def normalise_answer(text: str) -> str:
    """Lower-case, trim and collapse whitespace, after a leading reasoning block (``strip_reasoning``); for
    classification only the first line counts."""
    text = strip_reasoning(text)
    first = text.split("\n", 1)[0] if text else ""
    return re.sub(r"\s+", " ", first).strip().lower()


def answer_decided(text: str, labels: Collection[str]) -> bool:
    """Whether more text after ``text`` can no longer change what ``normalise_answer`` makes of it, as far as
    ``labels`` (already normalised) go: its first line is complete (a line break follows it), or no label starts
    with what it says so far (it can then only end as no label). A leading reasoning block still open is never
    decided. Free-running classification answers stop there: their accuracy and off-label share are those of
    the whole answer."""
    if "<think>" in text and "</think>" not in text:
        return False
    body = strip_reasoning(text)
    if "\n" in body:
        return True
    said = re.sub(r"\s+", " ", body).lower()
    return not any(label.startswith(said) for label in labels)


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
    removed, or ``None`` when it does not match; without a pattern, the whitespace/case-normalised text. A
    leading reasoning block (``strip_reasoning``) never counts."""
    text = strip_reasoning(text)
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

    predictions = [strip_reasoning(p) for p in predictions]  # the answer after a reasoning model's <think> block
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    answers = [extract_answer(p, answer_pattern) for p in predictions]
    exact = [a is not None and a == extract_answer(r, answer_pattern) for a, r in zip(answers, references)]
    scores = {"rouge_l": sum(rouge) / len(rouge), "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
              "exact_match": sum(exact) / len(exact)}
    if answer_pattern is not None:
        scores["answer_found"] = sum(a is not None for a in answers) / len(answers)
    return scores


def score(task: str, predictions: list[str], references: list[str], answer_pattern: str | None = None) -> dict:
    """The quality metrics of ``task`` (``TASK_KINDS[task].metrics``, plus ``answer_found`` with
    ``answer_pattern`` for generation) of ``predictions`` against ``references`` (same length, in order).

    Raises:
        ValueError: ``task`` is no task kind.
    """
    task_kind(task)
    if task == "classification":
        return classification_metrics(predictions, references)
    return generation_metrics(predictions, references, answer_pattern)
