"""``retry``: retries of transient failures (flows/retries.py)."""
from __future__ import annotations

from pydantic import Field

from configs.base import Section


class RetryConfig(Section):
    retries: int = Field(2, ge=0, description="Retries per task for transient failures (out of memory, I/O); "
                                              "bad input and failed checks are never retried.")
    delay_seconds: float = Field(10, ge=0, description="First retry delay; doubles on each retry.")
