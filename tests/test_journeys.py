"""The documented commands in the order a user runs them, each as its own process (``python -m flows.cli``, what
the ``finetune-flow`` command runs), on the tiny model: features that work alone must also work after each other.

A job, ``export-run`` of it, a zip of the copy, a second job on the same base model, predictions from both exports
(each baked folder alone, and both adapters on their one shared int4 base), the nightly retrain twice, a sweep of
two trials, a push to the stand-in Hub, the first job again (every stage ``Cached``) and the adapter-serving
benchmark; then a ``kill -9`` in the middle of ``export-run`` and of an export stage, and the same commands again.
After each journey every store is consistent: stage folders, the int4 base and the copies match their manifests,
no temporary folder is left, and no copied file shares an inode with a store."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tasks.common.files import MANIFEST, read_jsonl, verify_folder
from tests.conftest import tiny_config, write_classification_dir
from tests.faults import cli_env, stage_states, stall_and_kill, temporaries, write_config
from tests.test_hub import TOKEN, FakeHub

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "onnx/genai-int4-adapter"


def finetune_flow(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``finetune-flow ARGS`` (as ``python -m flows.cli``) from the repository root; asserts exit 0."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"finetune-flow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def job_config(root: Path, out: Path, model: str, name: str, upper: bool) -> Path:
    """A tiny classification job exporting the int4 adapter form; ``upper``: its labels upper-cased (the second
    job answers differently on the same base)."""
    data = write_classification_dir(root / f"data-{name}")
    if upper:
        for file in ("train.jsonl", "test.jsonl"):
            rows = read_jsonl(data / file)
            (data / file).write_text("".join(json.dumps({**r, "label": r["label"].upper()}) + "\n" for r in rows))
    # the nightly promotion is under test: constrained, the barely trained tiny model and its base model both
    # answer at chance (1/3), so the free-running answers are scored (eval.constrain: none)
    cfg = tiny_config(data, out, model, eval={"baseline_examples": 6, "few_shot": 0, "constrain": "none"},
                      export={"targets": ["genai-int4-adapter"]}, output={"run_name": None})
    return write_config(root / f"{name}.yaml", cfg.model_copy(update={"name": name}))


def latest_run(out: Path) -> Path:
    return Path(json.loads((out / "latest.json").read_text())["run_dir"])


def assert_stores_consistent(out: Path, cache: Path) -> None:
    """Every published stage folder and int4 base matches its manifest; no temporary folder anywhere."""
    folders = [f for stage in (out / "stages").iterdir() for f in stage.iterdir()
               if not f.name.startswith(".") and not f.name.endswith(".checkpoints")]
    folders += [f for f in cache.iterdir() if f.name.startswith("int4-base-")]
    assert folders and all((f / MANIFEST).is_file() for f in folders)
    assert [verify_folder(f) for f in folders] == [None] * len(folders)
    assert temporaries(out) == [] and temporaries(cache) == []


def assert_own_inodes(folder: Path) -> None:
    """No file under ``folder`` shares its inode with another path (a copy, not hard links into a store)."""
    shared = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_nlink > 1]
    assert shared == [], shared[:3]


@pytest.fixture(scope="module")
def first_job(tmp_path_factory, tiny_model_dir) -> dict:
    """Job A through the CLI: ``{"root", "out", "cache", "env", "a": config, "run_a": run folder}``."""
    root = tmp_path_factory.mktemp("journey")
    out = root / "out"
    env = cli_env(root / "prefect-home")
    env.pop("HF_HUB_OFFLINE", None)
    config = job_config(root, out, tiny_model_dir, "tiny-a", upper=False)
    finetune_flow(env, "run", "--config", str(config))
    return {"root": root, "out": out, "cache": root / "model-cache", "env": env, "a": config,
            "run_a": latest_run(out), "model": tiny_model_dir}


def test_the_documented_commands_one_after_another(first_job):
    root, out, env, run_a = first_job["root"], first_job["out"], first_job["env"], first_job["run_a"]
    texts = [r["prompt"][-1]["content"] for r in read_jsonl(run_a / "eval" / "finetuned" / "predictions.jsonl")]

    # a copyable run folder, zipped and unzipped elsewhere: real files, its own inodes, its manifest holds
    copy = root / "copy-a"
    done = finetune_flow(env, "export-run", str(run_a), str(copy))
    assert "export-run copy-a: 100%" in done.stderr  # its progress bar
    assert_own_inodes(copy)
    unzipped = root / "unzipped"
    shutil.unpack_archive(shutil.make_archive(str(root / "copy-a"), "zip", copy), unzipped)
    assert verify_folder(copy) is None and verify_folder(unzipped) is None

    # a second job on the same base model: its export reads the int4 base the copy was made beside
    config_b = job_config(root, out, first_job["model"], "tiny-b", upper=True)
    finetune_flow(env, "run", "--config", str(config_b))
    run_b = latest_run(out)
    assert run_b != run_a and json.loads((run_b / "metrics.json").read_text())["onnx"]["genai-int4-adapter"]
    bases = {json.loads((run / ADAPTER / "adapter.json").read_text())["base"] for run in (run_a, run_b)}
    assert len(bases) == 1  # one shared int4 base

    # predictions: each baked export alone (the unzipped copy of A), and both adapters on their shared base
    alone_a = finetune_flow(env, "predict", "--model", str(unzipped / ADAPTER), *texts[:3]).stdout.split()
    alone_b = finetune_flow(env, "predict", "--model", str(run_b / ADAPTER), *texts[:3]).stdout.split()
    shared = ["--model", str(run_a / ADAPTER), "--model", str(run_b / ADAPTER)]
    both_a = finetune_flow(env, "predict", *shared, "--adapter", "tiny-a", *texts[:3]).stdout.split()
    both_b = finetune_flow(env, "predict", *shared, "--adapter", "tiny-b", *texts[:3]).stdout.split()
    assert set(alone_a) <= {"fruit", "tool", "colour"} and alone_b != alone_a  # B answers otherwise (upper case)
    assert both_a == alone_a and both_b == alone_b

    # the nightly retrain twice: job A is retrained (all cached) and promoted over job B, then skipped as unchanged
    finetune_flow(env, "nightly", "--config", str(first_job["a"]))
    promoted = json.loads((out / "latest.json").read_text())
    assert Path(promoted["run_dir"]).name.startswith("tiny-a")
    finetune_flow(env, "nightly", "--config", str(first_job["a"]))
    assert json.loads((out / "latest.json").read_text()) == promoted

    # a sweep of two trials around job A
    sweep = root / "sweep.yaml"
    sweep.write_text(json.dumps({"config": str(first_job["a"]), "sampler": "random", "n_trials": 2, "seed": 0,
                                 "max_parallel": 1, "space": {"train.learning_rate": {"log_uniform": [1e-3, 3e-2]}},
                                 "finetune": {"eval": {"evaluate_base": False}, "export": {"enabled": False}}}))
    finetune_flow(env, "sweep", "--config", str(sweep))
    [trials] = out.glob("tiny-a-sweep-*/trials.json")
    assert [r["trial"] for r in json.loads(trials.read_text())] == ["baseline", "trial-0", "trial-1"]

    # a push to the stand-in Hub, then job A again: every stage served from the cache
    hub = FakeHub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        pushing = {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
        finetune_flow(pushing, "run", "--config", str(first_job["a"]), "--set", "output.push_to_hub.repo_id=org/a")
    finally:
        hub.shutdown()
        hub.server_close()
    [commit] = hub.commits
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "README.md"} <= set(commit["files"])
    finetune_flow(env, "run", "--config", str(first_job["a"]))
    assert set(stage_states(latest_run(out)).values()) == {"Cached"}

    # the adapter-serving benchmark bakes the shared int4 base again (no accuracy rows: speed only)
    done = subprocess.run([sys.executable, "benchmarks/adapter_serving.py", "--run", str(run_a), "--prompts", "1",
                           "--rounds", "1", "--new-tokens", "2", "--accuracy-rows", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "| engine |" in done.stdout and "deployed form" not in done.stdout, done.stderr

    assert_stores_consistent(out, first_job["cache"])
    assert verify_folder(copy) is None and verify_folder(unzipped) is None


def test_killed_in_the_middle_then_the_same_commands_again(first_job):
    root, out, env, run_a = first_job["root"], first_job["out"], first_job["env"], first_job["run_a"]

    # kill -9 while export-run copies: nothing at DEST; the same command then completes
    dest, marker = root / "copy-killed", root / "copy.stalled"
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.stall_copy", str(marker), str(run_a), str(dest)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert marker.exists(), "export-run never reached its second file"
    finally:
        proc.kill()
        proc.wait()
    partial = Path(marker.read_text())
    assert partial.is_dir() and not dest.exists()
    finetune_flow(env, "export-run", str(run_a), str(dest))
    assert not partial.exists() and verify_folder(dest) is None
    assert_own_inodes(dest)

    # kill -9 while an export stage has written its folder but not published it; the same command then re-runs
    # that stage alone
    tmp = stall_and_kill(first_job["a"], env, root / "export.log", "export", "export.n_check_prompts=2",
                         "output.run_name=killed-export")
    assert (tmp / "model.onnx").is_file() and not (out / "killed-export").exists()
    finetune_flow(env, "run", "--config", str(first_job["a"]), "--set", "export.n_check_prompts=2",
                  "--set", "output.run_name=after-export")
    states = stage_states(out / "after-export")
    assert states["export_genai-int4-adapter"] == "Completed" and states["train"] == states["merge"] == "Cached"
    assert not tmp.exists()
    assert_stores_consistent(out, first_job["cache"])
    assert os.path.samefile(latest_run(out), out / "after-export")
