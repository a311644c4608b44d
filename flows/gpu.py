"""One training job per GPU: the stages that put a model on the accelerator hold a slot of a Prefect global
concurrency limit while they run; CPU-only stages (ingest, split, export, report) never wait for it.

The limit's name comes from the worker's environment, ``FINETUNE_GPU_SLOT`` (set by the GPU work pools'
job templates in ``deployments/pools/``; ``deployments/setup.sh`` creates the limit with one slot per GPU).
Unset — a laptop run, the CPU pool — means no slot is taken. The slot is taken with ``strict=True``: a limit
that does not exist on the server is an error, never a silent free-for-all. A cache hit never calls the
function, so a cached stage does not wait for the GPU either.
"""
from __future__ import annotations

import functools
import os

from prefect import get_run_logger

GPU_SLOT_ENV = "FINETUNE_GPU_SLOT"


def holds_gpu_slot(fn):
    """``fn`` wrapped to hold one slot of the concurrency limit named by ``$FINETUNE_GPU_SLOT`` (if set) for the
    whole call. ``functools.wraps`` keeps ``fn``'s signature and source for Prefect (parameters, cache key).

    Raises (from the wrapped call):
        prefect.concurrency ConcurrencySlotAcquisitionError: the named limit does not exist on the server.
    """

    @functools.wraps(fn)
    def holding_gpu_slot(*args, **kwargs):
        limit = os.environ.get(GPU_SLOT_ENV)
        if not limit:
            return fn(*args, **kwargs)
        from prefect.concurrency.sync import concurrency

        log = get_run_logger()
        log.info("%s: waiting for a slot of concurrency limit %r", fn.__name__, limit)
        with concurrency(limit, occupy=1, strict=True):
            log.info("%s: holding a slot of %r", fn.__name__, limit)
            try:
                return fn(*args, **kwargs)
            finally:
                log.info("%s: releasing the slot of %r", fn.__name__, limit)

    return holding_gpu_slot
