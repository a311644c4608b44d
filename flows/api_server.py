"""Prefect's temporary API server for one command-line run, started early and without importing Prefect's server
into the run.

A flow run without ``PREFECT_API_URL`` makes Prefect start a temporary server (``SubprocessASGIServer``): a
uvicorn subprocess serving ``prefect.server.api.server:create_app``. Prefect first imports that module into the
calling process only to build the command (FastAPI, SQLAlchemy and the ORM models: seconds on a small CPU), and
only once the flow is called, so the run waits for the whole start after its own imports. Here the same
subprocess, with the same uvicorn options and environment, is started from the first line of a command-line run
(``begin``): it imports Prefect's server while the run imports the pipeline and loads its config, and waits for
the word to serve. ``temporary_server`` then gives it that word (or stops it, where Prefect's settings name an
API after all, before it has opened any database), points ``PREFECT_API_URL`` at it for the run, and stops it at
the end (the cached re-run's figures: ``docs/benchmarks.md``).

Prefect is not imported at this module's import: ``begin`` runs before it.
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
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)
DRAIN_SECONDS = 10  # at most, for the run's last logs and events to reach the server
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind its port (SubprocessASGIServer starts again then)
SERVE = b"serve\n"  # the word on the server's stdin; end of input without it: exit before opening any database
# What the server process runs before uvicorn's command line: import Prefect's server (the slow part), then
# wait for the word. `python -c CODE ARGS` leaves ARGS in sys.argv[1:], where uvicorn's main reads them.
GATE = ("import sys; import prefect.server.api.server; "
        "sys.exit(0) if sys.stdin.buffer.readline() != b'serve\\n' else None; "
        "from uvicorn.main import main; main()")
EPHEMERAL = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


@dataclass
class Launch:
    """A server process started by ``launch``, waiting for the word to serve on ``port``; what it prints goes to
    ``stderr`` (read only to explain a failed start)."""
    process: subprocess.Popen
    port: int
    stderr: IO[bytes]


_early: Launch | None = None  # begin()'s server, until temporary_server takes it or cancel() stops it


def uvicorn_args(port: int) -> list[str]:
    """The uvicorn options of Prefect's ``SubprocessASGIServer._run_uvicorn_command`` (prefect 3.9), on ``port``."""
    site = str(Path(find_spec("prefect").origin).parent.parent)
    return ["--app-dir", site, "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "error", "--lifespan", "on"]


def server_command(port: int) -> list[str]:
    """The server's command: Prefect's uvicorn command line behind ``GATE``."""
    return [sys.executable, "-c", GATE, *uvicorn_args(port)]


def server_environment(settings: bool = True) -> dict[str, str]:
    """The temporary server's environment, as Prefect builds it: this process's, the UI off, the ephemeral
    markers, then (``settings``) every Prefect setting set here (profile included) as an environment variable.
    ``begin`` leaves the settings out (Prefect is not imported yet): the server reads the same environment,
    profile and settings files, and a command line has no temporary settings in effect before its flow runs."""
    environment = {**os.environ, **EPHEMERAL}
    if settings:
        from prefect.settings import get_current_settings

        environment |= get_current_settings().to_environment_variables(exclude_unset=True)
    return environment


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


def launch(settings: bool = True) -> Launch:
    """Start the server process on a free port; it imports Prefect's server and waits for ``serve``
    (``server_environment(settings)``)."""
    port, stderr = free_port(), tempfile.TemporaryFile()
    process = subprocess.Popen(server_command(port), env=server_environment(settings), stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=stderr, bufsize=0)  # unbuffered: the word, once
    return Launch(process, port, stderr)


def serve(launched: Launch, timeout: float) -> str:
    """Tell ``launched`` to serve and wait until it answers; its API URL. On failure it is stopped.

    Raises:
        RuntimeError: it exited or did not answer within ``timeout`` seconds; the message gives its exit code and
            ends with the last 1,000 characters it printed.
    """
    process, url = launched.process, f"http://127.0.0.1:{launched.port}/api"
    try:
        process.stdin.write(SERVE)
        process.stdin.close()
    except OSError:  # it has exited already; its exit code and output say why
        pass
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if healthy(url):
            launched.stderr.close()
            return url
        time.sleep(0.05)
    stop(process)
    launched.stderr.seek(0)
    said = launched.stderr.read().decode(errors="replace").strip()[-1000:]
    launched.stderr.close()
    raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:.0f} s "
                       f"(exit code {process.returncode}): {said or 'no output'}")


def start(timeout: float, launched: Launch | None = None) -> tuple[subprocess.Popen, str]:
    """``launched`` (or a new launch) serving; ``(process, API URL)``. A port taken meanwhile by another process
    (uvicorn exits ``PORT_IN_USE``) is retried on another port, twice. Stopped with a client still connected,
    uvicorn prints a ``CancelledError`` traceback: what it prints is kept only to explain a failed start.

    Raises:
        RuntimeError: as ``serve``.
    """
    for attempt in range(3):
        launched = launched if attempt == 0 and launched else launch()
        try:
            return launched.process, serve(launched, timeout)
        except RuntimeError:
            if launched.process.returncode != PORT_IN_USE or attempt == 2:
                raise


def stop(process: subprocess.Popen) -> None:
    """Terminate the server; kill it after 5 s (as ``SubprocessASGIServer.stop`` does)."""
    if process.stdin and not process.stdin.closed:
        process.stdin.close()  # one still waiting for the word exits on its own
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def begin() -> None:
    """Start the temporary server's process now, before Prefect and the pipeline are imported, unless
    ``PREFECT_API_URL`` is in the environment; ``temporary_server`` decides, from Prefect's settings, whether it
    serves. Call it first thing in a command-line entry point (``python -m flows.finetune``, ``finetune-flow
    run``, ...). If this process exits without using it, the server reads the end of its stdin and exits."""
    global _early
    if _early is None and not os.environ.get("PREFECT_API_URL"):
        try:
            _early = launch(settings=False)
        except OSError as e:  # no free port, cannot start Python: temporary_server tries again or leaves it
            log.warning("cannot start Prefect's temporary server early: %s", e)


def cancel() -> None:
    """Stop ``begin``'s server if nothing took it (a dry run, a config error); it has opened no database."""
    global _early
    if _early is not None:
        stop(_early.process)
        _early.stderr.close()
        _early = None


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Within the block, Prefect talks to a temporary server (``begin``'s, or one started now; its API URL is
    yielded), or, where an API URL is configured or Prefect's ephemeral mode is off, to what Prefect would use
    anyway (None is yielded; ``begin``'s server is stopped before it opens a database). A server that fails to
    start is logged and left to Prefect, which then starts its own as usual. The run's queued logs and events are
    sent (``drain_all``) before the server stops. Within the block flow runs send no heartbeats
    (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` None)."""
    global _early
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import (PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings,
                                  temporary_settings)

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        cancel()
        yield None
        return
    launched, _early = _early, None
    try:
        process, url = start(settings.server.ephemeral.startup_timeout_seconds, launched)
    except (OSError, RuntimeError) as e:
        log.warning("%s; Prefect starts its own", e)
        yield None
        return
    try:
        # no flow-run heartbeats: they let a server mark a run whose process died as crashed, and this server dies
        # with the run; their thread sleeps in 1-s steps and is joined at the run's end (~0.5 s lost on average)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            try:
                yield url
            finally:  # what the run logged and emitted reaches the server before it stops
                APILogWorker.drain_all(timeout=DRAIN_SECONDS)
                EventsWorker.drain_all(timeout=DRAIN_SECONDS)
    finally:
        stop(process)
