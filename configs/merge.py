"""``merge``: the checks the merged model must pass (tasks/stages/merge.py)."""
from __future__ import annotations

from pydantic import Field

from configs.base import Section


class MergeConfig(Section):
    logit_atol: float = Field(1e-3, gt=0, description="Max abs difference allowed between merged and "
                                                      "base+adapter logits.")
    n_check_prompts: int = Field(4, gt=0)
    min_qlora_top1_agreement: float = Field(
        0.9, ge=0, le=1, description="qlora: the merged float32 model must pick the same next token as the "
        "adapter on the 4-bit base (the model as trained) at this fraction of the check prompts' answer positions "
        "at least; the two differ by the base's 4-bit rounding error.")
