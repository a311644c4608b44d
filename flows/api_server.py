"""Prefect's temporary API server for one command-line run, started without importing Prefect's server here.

A flow run without ``PREFECT_API_URL`` makes Prefect start a temporary server (``SubprocessASGIServer``): a
uvicorn subprocess serving ``prefect.server.api.server:create_app``. Prefect first imports that module into the
calling process only to build the command (FastAPI, SQLAlchemy and the ORM models: seconds on a small CPU), then
waits for the subprocess. ``temporary_server`` starts the same subprocess, with the same command and environment,
from this process without that import, sets ``PREFECT_API_URL`` to it for the run, and stops it at the end
(the cached re-run's figures: ``docs/benchmarks.md``).
With an API URL configured (a running server, Prefect Cloud, a test harness) it does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

log = logging.getLogger(__name__)
DRAIN_SECONDS = 10  # at most, for the run's last logs and events to reach the server
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind its port (SubprocessASGIServer starts again then)


def uvicorn_command(port: int) -> list[str]:
    """The command Prefect's ``SubprocessASGIServer._run_uvicorn_command`` runs (prefect 3.9), on ``port``."""
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level",
            "error", "--lifespan", "on"]


def server_environment() -> dict[str, str]:
    """The temporary server's environment, as Prefect builds it: this process's, the UI off, the ephemeral
    markers, then every Prefect setting set here (profile included) as an environment variable."""
    markers = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    return {**os.environ, **markers, **get_current_settings().to_environment_variables(exclude_unset=True)}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether the API at ``url`` answers its health check with 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def start(timeout: float) -> tuple[subprocess.Popen, str]:
    """Start the server and wait until it answers; ``(process, API URL)``. What it prints is kept only to explain
    a failed start (stopped with a client still connected, uvicorn prints a ``CancelledError`` traceback).

    Raises:
        RuntimeError: it exited or did not answer within ``timeout`` seconds (it is stopped then); the message
            ends with the last 1,000 characters it printed.
    """
    for _ in range(3):
        port = free_port()
        with tempfile.TemporaryFile() as stderr:  # its own log, read only to explain a failed start
            process = subprocess.Popen(uvicorn_command(port), env=server_environment(), stdout=subprocess.DEVNULL,
                                       stderr=stderr)
            url, deadline = f"http://127.0.0.1:{port}/api", time.monotonic() + timeout
            while process.poll() is None and time.monotonic() < deadline:
                if healthy(url):
                    return process, url
                time.sleep(0.05)
            stop(process)
            stderr.seek(0)
            said = stderr.read().decode(errors="replace").strip()[-1000:]
        if process.returncode != PORT_IN_USE:
            break
    raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:.0f} s "
                       f"(exit code {process.returncode}): {said or 'no output'}")


def stop(process: subprocess.Popen) -> None:
    """Terminate the server; kill it after 5 s (as ``SubprocessASGIServer.stop`` does)."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Within the block, Prefect talks to a temporary server started here (its API URL is yielded), or, where an
    API URL is configured or Prefect's ephemeral mode is off, to what Prefect would use anyway (None is yielded).
    A server that fails to start is logged and left to Prefect, which then starts its own as usual. The run's
    queued logs and events are sent (``drain_all``) before the server stops."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        yield None
        return
    try:
        process, url = start(settings.server.ephemeral.startup_timeout_seconds)
    except (OSError, RuntimeError) as e:
        log.warning("%s; Prefect starts its own", e)
        yield None
        return
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:  # what the run logged and emitted reaches the server before it stops
                APILogWorker.drain_all(timeout=DRAIN_SECONDS)
                EventsWorker.drain_all(timeout=DRAIN_SECONDS)
    finally:
        stop(process)
