"""``eval``: how the base and fine-tuned models are evaluated (tasks/stages/evaluate.py)."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from configs.base import Section
from tasks.common.metrics import TASK_KINDS

# choices read from the metric registry (tasks/common/metrics.py): a new task kind is valid config at once
EvalTask = Literal[("auto", *TASK_KINDS)]


class EvalConfig(Section):
    task: EvalTask = Field("auto", description="auto (the data's kind) or a task kind of tasks/common/metrics.py: "
                                               "classification or generation.")
    batch_size: int = Field(64, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="None = longest label + 2 tokens for "
                                                              "classification, 256 for generation.")
    answer_pattern: str | None = Field(
        None, description="Regular expression that extracts the final answer from a generation (its first group, "
        "or the whole match); exact_match then compares the extracted answers, commas removed. gsm8k: "
        "'####\\s*\\$?(-?[\\d,]*\\.?\\d+)'. None = exact match of the whole text.")
    evaluate_base: bool = True
    baseline_examples: int | None = Field(
        300, gt=0, description="The base model's evaluations (zero-shot and few_shot) run on a stratified sample "
        "of this many test rows (seeded by split.seed), reported with a 95 % interval; None = every row. The "
        "fine-tuned model is always evaluated on every row.")
    few_shot: int = Field(5, ge=0, description="k: also evaluate the base model with k training examples (one "
                                               "per label, up to k, for classification) as earlier chat turns "
                                               "of every prompt: what prompting alone gets; 0 = off.")
    bf16: Literal["auto"] | bool = Field("auto", description="bf16 autocast for generation and eval loss; "
                                                             "auto = where the CPU/GPU supports it.")
    constrain: Literal["labels", "none"] = Field(
        "labels", description="Classification answers: labels = decoded along the prefix tree of the train split's "
        "labels, so every answer is a label (the same constraint in the export gate and in every deployed form: "
        "tasks/common/labels.py); none = free-running greedy text, scored by exact match. Generation is never "
        "constrained.")
    compare_unconstrained: bool = Field(
        True, description="With constrained answers, also decode free-running from the same prefill and report "
        "its accuracy and the share of its answers that are no label (unconstrained_accuracy, off_label_share).")
    label_list: bool = Field(True, description="The base model's evaluations (zero-shot and few_shot) name the "
                                               "label set in the prompt: the prompting arm at its best.")

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return pattern
