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
                          timeout=4 * gpu_check.DRY_RUN_BUDGET + 120)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {s["step"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    assert list(steps) == ["environment", "throughput-llama-3.2-1b", "ours-with-liger-llama-3.2-1b",
                           "qlora-llama-3.1-8b", "cuda-oom-retry", "banking77-smollm2"]
    log = (out / "log.txt").read_text()
    for name in list(steps)[1:5]:
        assert steps[name]["status"] == "ok", (name, steps[name], log[-3000:])
    throughput = steps["throughput-llama-3.2-1b"]["figures"]
    assert "tokens/s" in throughput["baseline"] and "tokens/s" in throughput["ours"]
    assert throughput["ratio ours/baseline"].endswith("x")
    assert '"method": "qlora"' in steps["qlora-llama-3.1-8b"]["figures"]["settings (ours)"]
    oom = steps["cuda-oom-retry"]["figures"]
    assert oom["attempts"] == 2 and oom["oom_raised"] and oom["resumed_from"].endswith("checkpoint-2")
    assert oom["steps"] == 4
    assert steps["banking77-smollm2"]["status"] == "not run"
    assert "| cuda-oom-retry | ok |" in (out / "results.md").read_text()


@pytest.mark.parametrize("mode", ["", "nonsense"])
def test_usage_errors(mode):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", mode], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
