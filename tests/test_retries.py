"""Retries through Prefect: transient failures are retried, bad input and failed checks are not."""
import httpx
import pytest
import torch
from prefect import flow, task

from configs.schema import RetryConfig
from flows.retries import is_transient, with_retries
from tasks.deploy.export import ExportCheckError
from tasks.stages.ingest import DataError
from tasks.stages.merge import MergeCheckError

pytestmark = pytest.mark.usefixtures("prefect_server")  # a temporary Prefect server (conftest)


@pytest.mark.parametrize("exc, transient", [
    (MemoryError(), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes ... out of memory"), True),
    (OSError(28, "No space left on device"), True),
    (TimeoutError(), True),
    (ConnectionResetError(), True),
    (httpx.ConnectError("[Errno 111] Connection refused"), True),  # huggingface_hub >= 1: not an OSError
    (httpx.ReadTimeout("timed out"), True),
    (FileNotFoundError("x"), False),
    (DataError("f.csv: row 2: field 'text'"), False),
    (ValueError("bad"), False),
    (MergeCheckError("logits differ"), False),
    (ExportCheckError("agreement"), False),
    (RuntimeError("shape mismatch"), False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def _attempts_of(exc: BaseException) -> int:
    attempts = []

    @task
    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise exc
        return "ok"

    @flow
    def run():
        return with_retries(flaky, RetryConfig(retries=2, delay_seconds=0))()

    try:
        assert run() == "ok"
    except type(exc):
        pass
    return len(attempts)


def test_a_transient_failure_is_retried_and_the_task_completes():
    assert _attempts_of(OSError(5, "Input/output error")) == 2


def test_bad_input_is_not_retried():
    assert _attempts_of(DataError("data.csv: row 3: field 'label': missing")) == 1
