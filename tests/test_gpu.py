"""The GPU slot wrapper (flows/gpu.py): no slot without FINETUNE_GPU_SLOT, strict with it, and invisible to
Prefect's parameter mapping and to the content cache keys."""
import inspect

import pytest
from prefect import flow, task

from flows.caching import stage_key
from flows.gpu import GPU_SLOT_ENV, holds_gpu_slot
from flows.stages import Stage
from tasks.stages import train


def add(a: int, b: int = 1) -> int:
    """Add."""
    return a + b


def test_without_the_variable_no_slot_is_taken(monkeypatch):
    monkeypatch.delenv(GPU_SLOT_ENV, raising=False)
    assert holds_gpu_slot(add)(2, b=3) == 5  # no Prefect server needed at all


def test_wrapper_keeps_signature_source_and_stage_key():
    wrapped = holds_gpu_slot(train.train)
    assert inspect.signature(wrapped) == inspect.signature(train.train)
    assert inspect.getsource(wrapped) == inspect.getsource(train.train)
    assert stage_key(Stage("train", wrapped), None, "x") == stage_key(Stage("train", train.train), None, "x")


def test_a_missing_limit_is_an_error_not_a_free_for_all(monkeypatch, prefect_server):
    monkeypatch.setenv(GPU_SLOT_ENV, "no-such-limit")
    add_task = task(holds_gpu_slot(add), name="add")

    @flow
    def one():
        return add_task(1)

    with pytest.raises(Exception, match="no-such-limit"):
        one()


def test_an_existing_limit_is_held_during_the_call_and_released(monkeypatch, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    monkeypatch.setenv(GPU_SLOT_ENV, "gpu-test")
    seen = []

    def probe() -> int:
        with get_client(sync_client=True) as client:
            seen.append(client.read_global_concurrency_limit_by_name("gpu-test").active_slots)
        return 7

    probe_task = task(holds_gpu_slot(probe), name="probe")

    @flow
    def one():
        return probe_task()

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-test", limit=1))
    assert one() == 7
    with get_client(sync_client=True) as client:
        after = client.read_global_concurrency_limit_by_name("gpu-test").active_slots
    assert seen == [1] and after == 0


def test_a_job_on_two_gpus_holds_a_slot_of_each_or_waits(monkeypatch, prefect_server):
    """FINETUNE_GPU_SLOT="gpu-a,gpu-b" (a worker started with GPU=0,1): the call holds a slot of both limits; while
    another job holds gpu-b, it takes neither and waits, then runs once gpu-b is free."""
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency

    def active() -> dict:
        with get_client(sync_client=True) as client:
            return {n: client.read_global_concurrency_limit_by_name(n).active_slots for n in ("gpu-a", "gpu-b")}

    seen = []
    probe_task = task(holds_gpu_slot(lambda: seen.append(active()) or 7), name="probe")

    @flow
    def one():
        return probe_task()

    with get_client(sync_client=True) as client:
        for name in ("gpu-a", "gpu-b"):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    monkeypatch.setenv(GPU_SLOT_ENV, "gpu-a, gpu-b")
    assert one() == 7 and seen == [{"gpu-a": 1, "gpu-b": 1}] and active() == {"gpu-a": 0, "gpu-b": 0}

    seen.clear()
    waiting = threading.Thread(target=one)
    with concurrency("gpu-b", occupy=1, strict=True):  # a one-GPU job holds gpu-b
        waiting.start()
        time.sleep(5)
        assert seen == [] and active() == {"gpu-a": 0, "gpu-b": 1}  # waits, and holds nothing of gpu-a meanwhile
    waiting.join(timeout=60)
    assert seen == [{"gpu-a": 1, "gpu-b": 1}] and active() == {"gpu-a": 0, "gpu-b": 0}
