"""``split``: held-out fractions, seeds and CPU-sized subsamples (tasks/stages/split.py)."""
from __future__ import annotations

from pydantic import Field

from configs.base import Section


class SplitConfig(Section):
    seed: int = 42
    test_size: float = Field(0.1, gt=0, lt=1, description="Fraction held out for test when no test file is given.")
    validation_size: float = Field(0.05, gt=0, lt=1, description="Fraction of train held out for eval loss "
                                                                  "when no validation file is given.")
    max_train_examples: int | None = Field(None, gt=0, description="Stratified subsample of train (CPU sizing).")
    max_validation_examples: int | None = Field(None, gt=0)
    max_test_examples: int | None = Field(None, gt=0)
