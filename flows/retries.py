"""Which failures a task retries: transient ones (out of memory, I/O, timeouts), never bad input or failed checks."""
from __future__ import annotations

import httpx
from prefect.tasks import Task, exponential_backoff

from configs.schema import RetryConfig

# Errors that say "the input is wrong" or "a check failed": running again gives the same answer.
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: ``MemoryError``, CPU/CUDA out-of-memory, I/O errors and timeouts, and
    httpx's connection errors and timeouts (huggingface_hub >= 1 talks httpx; they are not ``OSError``s).

    Validation errors (``ValueError``: config and data errors), failed merge/export checks and missing files
    are permanent.
    """
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return True
    if isinstance(exc, OSError):  # disk, network, broken pipes; also TimeoutError and ConnectionError
        return not isinstance(exc, _PERMANENT_OS_ERRORS)
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the task failed with a transient error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def with_retries(task: Task, cfg: RetryConfig) -> Task:
    """``task`` with ``cfg.retries`` retries, exponential backoff from ``cfg.delay_seconds``, transient only."""
    return task.with_options(retries=cfg.retries, retry_delay_seconds=exponential_backoff(cfg.delay_seconds),
                             retry_condition_fn=retry_if_transient)
