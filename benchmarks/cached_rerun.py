"""An identical re-run of a finetune job, timed: every stage should come back ``Cached``.

Two arms side by side, ``--runs`` times each: against a running Prefect server (started here on 127.0.0.1 with its
own PREFECT_HOME, ``PREFECT_API_URL`` set) and with Prefect's temporary server (no ``PREFECT_API_URL``). The
job's stages must already be in the cache (run the same command once first). Per run it prints the wall time of
the whole command and where it goes: importing the flow (a fresh ``python -c "import flows.finetune"``, median of
3), the stages (``metrics.json``'s ``stage_seconds``: cache lookups, folder checks against their manifests), and the
rest (Prefect start-up — the temporary server's, measured on its own too —, the flow run's bookkeeping, the
report, exit).

    python benchmarks/cached_rerun.py --config configs/banking77.yaml --set data.path=../shared/data/banking77
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_seconds(env: dict) -> float:
    """Median wall time of 3 fresh interpreters importing ``flows.finetune``."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import flows.finetune"], cwd=ROOT, env=env, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def temporary_server_seconds(env: dict) -> float:
    """Median wall time, over 3 fresh interpreters, of Prefect starting its temporary server (``SubprocessASGIServer``,
    what a run without ``PREFECT_API_URL`` waits for) until its health check answers; the import is not counted."""
    code = ("import time; from prefect.server.api.server import SubprocessASGIServer as S; t = time.perf_counter(); "
            "s = S(); s.start(); print(time.perf_counter() - t); s.stop()")
    times = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                  check=True).stdout.split()[-1]) for _ in range(3)]
    return statistics.median(times)


@contextmanager
def running_server(env: dict):
    """A Prefect server on a free 127.0.0.1 port with a throw-away PREFECT_HOME; yields its API URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="prefect-home-") as home:
        server_env = {**env, "PREFECT_HOME": home}
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=server_env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.time() + 180
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise RuntimeError("the Prefect server did not start") from None
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            server.wait(30)


def timed_run(command: list[str], env: dict) -> dict:
    """Run the job once; return wall seconds, stage seconds (sum) and the stage states from its metrics.json.

    Raises:
        RuntimeError: the command failed or printed no run folder.
    """
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
    run_dir = next((line.removeprefix("run: ") for line in done.stdout.splitlines() if line.startswith("run: ")),
                   None)
    if run_dir is None:
        raise RuntimeError(f"no 'run: <folder>' line in the output: {done.stdout[-2000:]}")
    metrics = json.loads((ROOT / run_dir / "metrics.json").read_text())
    return {"wall_seconds": round(wall, 2), "stage_seconds": round(sum(metrics["stage_seconds"].values()), 2),
            "states": metrics["stage_states"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/banking77.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    command = [sys.executable, "-m", "flows.finetune", "--config", args.config]
    for override in args.set:
        command += ["--set", override]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    imports, server = import_seconds(env), temporary_server_seconds(env)
    results = {"imports_seconds": round(imports, 2), "temporary_server_start_seconds": round(server, 2),
               "command": command[1:], "arms": {}}
    with running_server(env) as url:
        results["arms"]["running server"] = [timed_run(command, {**env, "PREFECT_API_URL": url})
                                             for _ in range(args.runs)]
    results["arms"]["temporary server"] = [timed_run(command, env) for _ in range(args.runs)]
    print(f"importing flows.finetune: {imports:.2f} s; Prefect's temporary server starting: {server:.2f} s "
          "(medians of 3 fresh interpreters)")
    print("| arm | run | wall s | stages s | imports s | rest s | states |")
    print("|---|---|---|---|---|---|---|")
    for arm, runs in results["arms"].items():
        for i, r in enumerate(runs, 1):
            states = set(r["states"].values())
            state = "all Cached" if states == {"Cached"} else json.dumps(r["states"])
            rest = r["wall_seconds"] - r["stage_seconds"] - imports
            print(f"| {arm} | {i} | {r['wall_seconds']:.1f} | {r['stage_seconds']:.1f} | {imports:.1f} | "
                  f"{rest:.1f} | {len(r['states'])} stages, {state} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
