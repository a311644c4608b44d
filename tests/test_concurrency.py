"""Two runs at once on one output folder, as from two terminals (each CLI starts its own temporary Prefect
server, both on the same ``PREFECT_HOME``): identical runs compute each stage once (the second waits on the
cache key's lock, then reuses the result), different runs do not clobber each other, and the lock of a killed
run does not block the next one."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.caching import ProcessLockManager
from tests.conftest import tiny_config, write_classification_dir
from tests.faults import (ROOT, assert_intact, cli_env, finish, linked_stage_folders, stage_states, start,
                          temporaries, write_config)

pytestmark = pytest.mark.slow

STAGES = ("ingest", "split", "train", "merge", "evaluate_finetuned", "export_genai-int4")


def test_a_lock_held_by_a_killed_process_is_free_and_a_live_holder_keeps_it(tmp_path):
    locks = tmp_path / "locks"
    hold = ("import time; from pathlib import Path; from flows.caching import ProcessLockManager; "
            f"manager = ProcessLockManager(Path({str(locks)!r})); manager.acquire_lock('key', 'holder'); "
            "print('held', flush=True); "
            "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        manager = ProcessLockManager(locks)
        assert manager.is_locked("key")
        assert not manager.acquire_lock("key", "me", acquire_timeout=0.5)  # a live holder keeps it
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (locks / "key.lock").exists() and not manager.is_locked("key")  # killed: the kernel dropped its lock
    assert manager.acquire_lock("key", "me", acquire_timeout=5) and manager.is_lock_holder("key", "me")
    assert manager.is_locked("key") and not manager.is_lock_holder("key", "someone else")
    manager.release_lock("key", "me")
    assert not manager.is_locked("key")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """``(output dir, environment, data folder)`` shared by two terminals: one output folder, one Prefect home."""
    root = tmp_path_factory.mktemp("concurrency")
    return root, root / "out", cli_env(root / "prefect-home"), write_classification_dir(root / "cls")


def _config(shared, name: str, tiny_model_dir: str, **sections):
    root, out, _, data = shared
    cfg = tiny_config(data, out, tiny_model_dir, eval={"evaluate_base": False}, output={"run_name": None},
                      **sections)
    return write_config(root / f"{name}.yaml", cfg)


def _run_two_at_once(shared, configs, name: str) -> list:
    """Start a CLI run per config at the same time; wait for both; return their run folders (from the output)."""
    root, _, env, _ = shared
    logs = [root / f"{name}-{i}.log" for i in range(len(configs))]
    procs = [start(config, env, log) for config, log in zip(configs, logs)]
    outputs = [finish(proc, log) for proc, log in zip(procs, logs)]
    return [next(Path(line.removeprefix("run: ")) for line in o.splitlines() if line.startswith("run: "))
            for o in outputs]


def test_two_identical_runs_at_once_compute_each_stage_once(shared, tiny_model_dir):
    config = _config(shared, "same", tiny_model_dir)
    first, second = _run_two_at_once(shared, [config, config], "same")
    assert first != second and first.parent == second.parent == shared[1]
    states = [stage_states(first), stage_states(second)]
    for stage in STAGES:  # one run computed it, the other waited for the lock and reused the result
        assert sorted(s[stage] for s in states) == ["Cached", "Completed"], (stage, states)
    for run_dir in (first, second):
        assert_intact(run_dir)
    assert linked_stage_folders(first) == linked_stage_folders(second)
    assert temporaries(shared[1]) == []


def test_two_different_runs_at_once_do_not_clobber_each_other(shared, tiny_model_dir):
    configs = [_config(shared, f"r{r}", tiny_model_dir, lora={"r": r}) for r in (2, 4)]
    before = {p: p.stat().st_mtime_ns for p in shared[1].glob("stages/*/*") if not p.name.startswith(".")}
    runs = _run_two_at_once(shared, configs, "different")
    folders = [linked_stage_folders(run_dir) for run_dir in runs]
    for run_dir, links, r in zip(runs, folders, (2, 4)):
        assert json.loads((run_dir / "metrics.json").read_text())["config"]["lora"]["r"] == r
        assert json.loads((links["adapter"] / "adapter_config.json").read_text())["r"] == r
        assert stage_states(run_dir)["train"] == "Completed"
        assert_intact(run_dir)
    for link in ("adapter", "merged", "onnx/genai-int4"):
        assert folders[0][link] != folders[1][link], link
    assert folders[0]["data"] == folders[1]["data"]  # the same data: one split, shared
    for path, mtime in before.items():  # what earlier runs published is untouched
        assert path.stat().st_mtime_ns == mtime, path
    assert temporaries(shared[1]) == []
