"""Helpers for the tests that run the CLI in subprocesses (``test_faults``, ``test_concurrency``): a YAML config
for the tiny model, an environment with its own Prefect home, runs that complete or are killed at a known point
(``tests.faults.stall``), and what a run folder says about its stages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, cfg) -> Path:
    """Write ``cfg`` (a ``FinetuneConfig``, e.g. ``tests.conftest.tiny_config(...)``) as the CLI's YAML."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def cli_env(prefect_home: Path) -> dict:
    """The environment of a CLI run: no ``PREFECT_API_URL`` (each run starts its own temporary server) and its
    own ``PREFECT_HOME`` (that server's SQLite database), given two minutes to start."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env["PREFECT_HOME"] = str(prefect_home)
    # a fresh home's database is created and migrated first: on a busy 2-core machine that can pass the 20 s default
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return env


def command(config: Path, *overrides: str, stall: tuple[str, Path] | None = None) -> list[str]:
    """``python -m flows.finetune --config config --set ...``; with ``stall=(stage, marker)`` the same run
    through ``tests.faults.stall``."""
    module = ["tests.faults.stall", stall[0], str(stall[1])] if stall else ["flows.finetune"]
    return [sys.executable, "-m", *module, "--config", str(config), *(a for o in overrides for a in ("--set", o))]


def start(config: Path, env: dict, log: Path, *overrides: str, stall: tuple[str, Path] | None = None):
    """Start a CLI run in its own process group (stdout and stderr to ``log``); returns the ``Popen``."""
    with open(log, "wb") as f:
        return subprocess.Popen(command(config, *overrides, stall=stall), cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Wait for a run started by :func:`start`; assert it succeeded; return its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    return output


def run(config: Path, env: dict, log: Path, *overrides: str) -> str:
    """Run the CLI to the end; assert it succeeded; return its output."""
    return finish(start(config, env, log, *overrides), log)


def stall_and_kill(config: Path, env: dict, log: Path, stage: str, *overrides: str, timeout: float = 300) -> Path:
    """Run the CLI until stage ``stage`` has written its folder but not published it (``tests.faults.stall``),
    then SIGKILL its whole process group (the flow and its Prefect server). Returns the temporary folder."""
    marker = log.with_suffix(".stalled")
    proc = start(config, env, log, *overrides, stall=(stage, marker))
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before stalling in {stage}:\n" + log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"no stall in {stage} within {timeout} s"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return Path(marker.read_text())


def stage_states(run_dir: Path) -> dict[str, str]:
    """``{stage: "Completed" | "Cached"}`` from a run folder's ``metrics.json``."""
    return json.loads((run_dir / "metrics.json").read_text())["stage_states"]


def linked_stage_folders(run_dir: Path) -> dict[str, Path]:
    """``{link name: stage folder}`` for every symlink in a run folder (``adapter``, ``onnx/genai-int4``, ...)."""
    return {p.relative_to(run_dir).as_posix(): p.resolve() for p in run_dir.rglob("*") if p.is_symlink()}


def temporaries(out: Path) -> list[Path]:
    """Temporary and half-replaced folders (``.<name>.tmp-*``, ``.<name>.old-*``) anywhere under ``out``."""
    return [p for pattern in (".*.tmp-*", ".*.old-*") for p in out.rglob(pattern)]


def assert_intact(run_dir: Path) -> None:
    """The run folder and every stage folder it links to have a manifest and match it."""
    from tasks.common.files import MANIFEST, verify_folder

    assert verify_folder(run_dir) is None and (run_dir / MANIFEST).is_file()
    for name, folder in linked_stage_folders(run_dir).items():
        assert (folder / MANIFEST).is_file(), name
        assert verify_folder(folder) is None, name
