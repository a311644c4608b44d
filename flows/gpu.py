"""One training job per GPU: the stages that put a model on the accelerator hold a slot of a Prefect global
concurrency limit while they run; CPU-only stages (ingest, split, export, report) never wait for it.

The limit's name comes from the worker's environment, ``FINETUNE_GPU_SLOT`` (set by ``deployments/worker.sh``,
which creates a limit with one slot per GPU: ``gpu-<host>-<index>``). A worker given several GPUs (``GPU=0,1``)
names one limit per GPU, comma-separated, and its jobs hold a slot of each, all at once or none (Prefect takes
the slots of several limits in one server call), so a two-GPU job never starts while a one-GPU job holds either
of its GPUs. Unset — a laptop run, the CPU pool — means no slot is taken. Slots are taken with ``strict=True``:
a limit that does not exist on the server is an error, never a silent free-for-all. A cache hit never calls the
function, so a cached stage does not wait for the GPU either.
"""
from __future__ import annotations

import functools
import os

from prefect import get_run_logger

GPU_SLOT_ENV = "FINETUNE_GPU_SLOT"


def holds_gpu_slot(fn):
    """``fn`` wrapped to hold one slot of each concurrency limit named by ``$FINETUNE_GPU_SLOT`` (if set;
    several names comma-separated, one per GPU the job uses) for the whole call. ``functools.wraps`` keeps
    ``fn``'s signature and source for Prefect (parameters, cache key).

    Raises (from the wrapped call):
        prefect.concurrency ConcurrencySlotAcquisitionError: the named limit does not exist on the server.
    """

    @functools.wraps(fn)
    def holding_gpu_slot(*args, **kwargs):
        limits = [name.strip() for name in os.environ.get(GPU_SLOT_ENV, "").split(",") if name.strip()]
        if not limits:
            return fn(*args, **kwargs)
        from prefect.concurrency.sync import concurrency

        log, names = get_run_logger(), ", ".join(map(repr, limits))
        log.info("%s: waiting for a slot of concurrency limit %s", fn.__name__, names)
        with concurrency(limits, occupy=1, strict=True):
            log.info("%s: holding a slot of %s", fn.__name__, names)
            try:
                return fn(*args, **kwargs)
            finally:
                log.info("%s: releasing the slot of %s", fn.__name__, names)

    return holding_gpu_slot
