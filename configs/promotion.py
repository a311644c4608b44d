"""``promotion``: the nightly retrain's quality gate (tasks/stages/promote.py)."""
from __future__ import annotations

from pydantic import Field

from configs.base import Section


class PromotionConfig(Section):
    margin: float = Field(0.01, ge=0, le=1, description="Nightly retrain quality gate: a new model is promoted only "
                                                        "if its primary metric (accuracy, or rouge_l for "
                                                        "generation) is above the base model's and at most this "
                                                        "much below the promoted model's on the same test split "
                                                        "(0.01 = 1 point).")
