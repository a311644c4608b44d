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
    banking77 = steps["banking77-smollm2"]  # the dry run: the flow on the tiny model, 50 test rows, no staging
    assert banking77["status"] == "ok", (banking77, log[-3000:])
    assert banking77["figures"]["test rows"] == 50 and banking77["figures"]["accuracy"].endswith(")")
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


def test_the_model_travels_in_parts_and_is_joined_only_when_whole(tmp_path, monkeypatch):
    """prepare cuts the model's wheel into parts (one device call each); stage keeps each outside the tree on the
    box; assemble joins them only when every part of this machine's boot is there and the whole matches."""
    whole = tmp_path / "model.whl"
    whole.write_bytes(bytes(range(256)) * 1001)  # 256,256 bytes: parts of 128,128
    parts = gpu_check.split_file(whole, tmp_path / "kit" / "model", 2)
    assert [sorted(f.name for f in d.iterdir()) for d in parts] == [
        ["manifest.json", "model.whl.part-1"], ["manifest.json", "model.whl.part-2"]]
    box = tmp_path / "stage"
    assert "no model staged" in gpu_check.assemble(box, tmp_path / "out")
    assert gpu_check.stage(parts[0], box) == "staged model.whl.part-1 (1 of 2 parts here)"
    lost = gpu_check.assemble(box, tmp_path / "out")  # the second call landed on this machine without part 2
    assert "['model.whl.part-2'] not staged" in lost and not (tmp_path / "out" / "model.whl").exists()
    assert gpu_check.stage(parts[1], box) == "staged model.whl.part-2 (2 of 2 parts here)"
    joined = gpu_check.assemble(box, tmp_path / "out")
    assert joined == tmp_path / "out" / "model.whl" and joined.read_bytes() == whole.read_bytes()

    monkeypatch.setattr(gpu_check, "boot_id", lambda: "another-boot")  # a fresh machine between the calls
    assert "another boot: the machine was lost" in gpu_check.assemble(box, tmp_path / "again")
    said = gpu_check.stage(parts[1], box)  # staging there starts over, and says so
    assert said.startswith("the stage held parts from another machine") and said.endswith("(1 of 2 parts here)")
    assert "['model.whl.part-1'] not staged" in gpu_check.assemble(box, tmp_path / "again")


def test_a_damaged_part_is_refused_and_a_damaged_whole_never_joined(tmp_path):
    whole = tmp_path / "model.whl"
    whole.write_bytes(b"x" * 1000 + b"y" * 1000)
    parts = gpu_check.split_file(whole, tmp_path / "kit", 2)
    part = parts[1] / "model.whl.part-2"
    good = part.read_bytes()
    part.write_bytes(b"z" + good[1:])
    with pytest.raises(SystemExit, match="not the part its manifest names"):
        gpu_check.stage(parts[1], tmp_path / "stage")
    part.write_bytes(good)
    for d in parts:
        gpu_check.stage(d, tmp_path / "stage")
    (tmp_path / "stage" / "model.whl.part-1").write_bytes(b"w" * 1000)  # damaged on the box after staging
    assert "do not match" in gpu_check.assemble(tmp_path / "stage", tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # no partial or damaged file left


def test_banking77_without_a_staged_model_is_recorded_as_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STAGE", tmp_path / "nothing-staged")
    record = gpu_check.banking77_step(False, tmp_path, "tok", tmp_path / "work", tmp_path / "log.txt")
    assert record["status"] == "not run (model not staged)" and "figures" not in record
    assert "no model staged on this machine" in record["note"]
