"""The prepared GPU check (benchmarks/gpu_check.py): its CPU dry run goes through every step, so the script cannot
rot between GPU windows; the wheel-kit helpers do what the carry limit needs."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_slim_bitsandbytes_keeps_cpu_and_cuda13_only(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda118.so", "libbitsandbytes_cuda128.so",
            "libbitsandbytes_cuda130.so", "libbitsandbytes_rocm64.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for lib in libs:
            z.writestr(f"bitsandbytes/{lib}", b"x" * 100)
        z.writestr("bitsandbytes/__init__.py", "")
        record = "".join(f"bitsandbytes/{n},sha256=abc,100\n" for n in libs) + "bitsandbytes/__init__.py,,\n"
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    gpu_check.slim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {n for n in names if n.endswith(".so")} == {"bitsandbytes/libbitsandbytes_cpu.so",
                                                       "bitsandbytes/libbitsandbytes_cuda130.so"}
    assert "cuda118" not in record and "rocm64" not in record and "cuda130" in record and "__init__" in record


def test_closure_follows_requirements_and_names_the_roots():
    found = gpu_check.closure(["trl"])
    assert {"trl", "transformers", "accelerate", "datasets", "tokenizers"} <= found.keys()
    assert all(v and v[0].isdigit() for v in found.values())


@pytest.mark.slow
def test_cpu_dry_run_goes_through_every_step(tmp_path, shared_data, tiny_model_dir):
    out = tmp_path / "out"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "dry-run", str(out), "--data",
                           str(shared_data / "banking77"), "--tokenizer", tiny_model_dir, "--cache",
                           str(tmp_path / "models")], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHON": sys.executable},
                          timeout=(len(gpu_check.benchmark_steps(True)) + 1) * gpu_check.DRY_RUN_BUDGET + 120)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {s["step"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    assert list(steps) == ["environment", "throughput-llama-3.2-1b", "ours-with-liger-llama-3.2-1b",
                           "ours-float32-frozen-llama-3.2-1b", "packed-llama-3.2-1b", "lora-llama-3.2-1b-2048",
                           "qlora-llama-3.1-8b", "lora-llama-3.1-8b-2048", "lora-llama-3.1-8b-4096",
                           "cuda-oom-retry", "banking77-smollm2"]
    log = (out / "log.txt").read_text()
    assert steps["ours-with-liger-llama-3.2-1b"]["status"] == "not run (dry run)"  # no liger-kernel on a CPU
    ran = [name for name in list(steps)[1:-1] if name != "ours-with-liger-llama-3.2-1b"]
    for name in ran:
        assert steps[name]["status"] == "ok", (name, steps[name], log[-3000:])
    for name in ran[:-1]:  # the throughput steps (not the OOM retry)
        assert "tokens/s" in steps[name]["figures"]["ours"], name
        # the ours arm's largest micro-batch, which benchmarks/memory_model.py --check predicts the peak for
        tokens, targets = (int(n) for n in steps[name]["figures"]["largest batch (ours)"].split()[::2])
        assert tokens > targets > 0, name
    for name in ("throughput-llama-3.2-1b", "lora-llama-3.2-1b-2048"):  # the baseline's two code paths
        figures = steps[name]["figures"]
        assert "tokens/s" in figures["baseline"] and figures["ratio ours/baseline"].endswith("x"), name
    settings = {name: json.loads(steps[name]["figures"]["settings (ours)"]) for name in ran[:-1]}
    # the dry run mirrors the GPU's auto settings (bf16, a bf16 frozen base) but in the float32-frozen arm
    assert {name: s["frozen_dtype"] for name, s in settings.items()} == {
        name: "float32" if "float32" in name else "bfloat16" for name in settings}
    assert all(s["bf16"] for s in settings.values())
    assert settings["qlora-llama-3.1-8b"]["method"] == "qlora"
    assert settings["qlora-llama-3.1-8b"]["gradient_checkpointing"] is True
    assert "--set train.packing=true" in steps["packed-llama-3.2-1b"]["command"]
    assert "--seq-len 64" in steps["lora-llama-3.1-8b-4096"]["command"]  # 4,096 tokens at the toy tokenizer's 1/64
    oom = steps["cuda-oom-retry"]["figures"]
    assert oom["attempts"] == 2 and oom["oom_raised"] and oom["resumed_from"].endswith("checkpoint-2")
    assert oom["steps"] == 4
    assert steps["banking77-smollm2"]["status"] == "not run"
    assert "| cuda-oom-retry | ok |" in (out / "results.md").read_text()


def test_steps_refuses_an_unknown_step_before_anything_runs(tmp_path):
    """``run --steps``: one device call cannot hold every step (their GPU boxes add up to more than 600 s), so a
    session picks; a misspelt name is refused before any step runs (not found out after minutes of device time)."""
    command = [sys.executable, "benchmarks/gpu_check.py", "run", "--dry-run", "--out", str(tmp_path / "out"),
               "--data", str(tmp_path / "banking77"), "--tokenizer", str(tmp_path / "tokenizer")]
    refused = subprocess.run(command + ["--steps", "throughput-llama-3.2-1b,lora-llama-3.1-8b-8192"], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "lora-llama-3.1-8b-8192" in refused.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["", "nonsense"])
def test_usage_errors(mode):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", mode], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
