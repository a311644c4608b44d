"""kill -9 during training, then the same command again: training resumes from its last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import write_classification_dir

ROOT = Path(__file__).resolve().parents[1]


def _command(config: Path) -> list[str]:
    return [sys.executable, "-m", "flows.finetune", "--config", str(config)]


def _readable(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except ValueError:
        return False


def test_sigkill_during_training_then_rerun_resumes_from_the_checkpoint(tmp_path, tiny_model_dir):
    data = write_classification_dir(tmp_path / "cls")
    out = tmp_path / "out"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "name": "kill", "data": {"path": str(data)}, "split": {"validation_size": 0.2},
        "model": {"name_or_path": tiny_model_dir},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "train": {"learning_rate": 1e-2, "num_train_epochs": 20, "per_device_train_batch_size": 8,
                  "max_seq_length": 64, "save_steps": 5, "save_total_limit": 1, "bf16": False},
        "eval": {"batch_size": 8, "bf16": False, "evaluate_base": False},
        "export": {"enabled": False},
        "output": {"dir": str(out), "run_name": "run"},
    }))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a temporary local server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen(_command(config), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not list(out.glob("stages/train/*.checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    complete = [int(p.parent.name.split("-")[1])
                for p in out.glob("stages/train/*.checkpoints/checkpoint-*/trainer_state.json") if _readable(p)]
    killed_at = max(complete)  # a newer checkpoint cut off mid-save, if any, is discarded on the re-run
    published = [p for p in (out / "stages" / "train").iterdir() if not p.name.endswith(".checkpoints")]
    assert not (out / "run").exists() and published == []  # a killed run publishes nothing

    rerun = subprocess.run(_command(config), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "train: resuming from" in rerun.stderr + rerun.stdout
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith(f"checkpoint-{killed_at}")
    assert metrics["train"]["steps"] == 100  # 38 rows / batch 8 = 5 steps x 20 epochs
