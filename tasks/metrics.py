"""The task kinds and their metrics: the one registry that the evaluation, the report tables, the promotion gate,
the sweep objective, the export gate and the config validation read.

Adding a metric: compute it in ``tasks/evaluate.py`` (``classification_metrics`` / ``generation_metrics``) and
name it here; adding a task kind: one ``TaskKind`` entry and its scoring function in ``tasks/evaluate.py``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskKind:
    """What an evaluation of one kind of task reports.

    Attributes:
        metrics: the quality metrics ``tasks.evaluate.evaluate`` returns for it, in report order (fractions in
            [0, 1], greater is better).
        primary: the one the promotion gate, the export gate and ``sweep.metric: auto`` use.
    """

    metrics: tuple[str, ...]
    primary: str


TASK_KINDS = {
    "classification": TaskKind(metrics=("accuracy", "macro_f1"), primary="accuracy"),
    "generation": TaskKind(metrics=("rouge_l", "bleu", "exact_match"), primary="rouge_l"),
}
# every evaluation also reports these (teacher-forced completion loss in nats per token, and exp of it)
LOSS_METRICS = ("eval_loss", "perplexity")
ALL_METRICS = tuple(dict.fromkeys(m for kind in TASK_KINDS.values() for m in kind.metrics)) + LOSS_METRICS


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
