"""The training memory model (benchmarks/memory_model.py): its prediction, extrapolated from one- and two-layer
measurements at short sequences, against the full-depth measurement of real training steps at toy widths on the
CPU (the same quantity ``torch.cuda.max_memory_allocated`` reports on a GPU); and its check of a GPU check's
results file."""
import json
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory_model import (LiveBytes, check, check_table, frozen_weight_bytes, predict,  # noqa: E402
                                     step_peak, trained_parameters)

TOY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
           head_dim=32, vocab_size=4096, tie_word_embeddings=False)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


@pytest.mark.parametrize("method, frozen, checkpointing, tokens, targets", [
    ("lora", "bfloat16", False, 1024, 40),  # the GPU default: a bf16 frozen base
    ("lora", "float32", True, 768, 16),  # autocast's bf16 weight copies; recomputation
    ("qlora", "bfloat16", True, 1024, 8),  # bf16 adapters, input gradients
    ("full", "float32", False, 512, 24),
])
def test_prediction_is_within_15_percent_of_the_full_depth_measurement(method, frozen, checkpointing, tokens,
                                                                       targets):
    config = LlamaConfig(**TOY)
    shape = dict(method=method, frozen=frozen, checkpointing=checkpointing, **LORA)
    measured = step_peak(config, **shape, layers=config.num_hidden_layers, tokens=tokens, targets=targets)
    got = predict(config, **shape, tokens=tokens, targets=targets)
    if method == "qlora":  # the measured model holds its linear weights in bf16 where the prediction has nf4
        measured += frozen_weight_bytes(config, "qlora", frozen) - frozen_weight_bytes(config, "lora", frozen)
    assert abs(got.total / measured - 1) < 0.15, (got, measured)
    assert got.activations_and_transient > 0
    if method != "full":  # the adapters' state: a small part of the peak, counted from the config
        assert got.trained_state == trained_parameters(config, method, 16, "all-linear") * 5 * (
            2 if method == "qlora" else 4)


def test_live_bytes_counts_storages_until_they_are_freed():
    import torch

    with LiveBytes() as live:
        a = torch.zeros(1024, dtype=torch.float32)  # 4 KiB
        b = torch.zeros(2048, dtype=torch.bfloat16)  # 4 KiB
        view = a[:10]  # shares a's storage: not counted again
        assert live.live == 8192
        del a, view
        c = torch.ones(256, dtype=torch.float32)  # 1 KiB, after a's 4 KiB were freed
        assert live.live == 4096 + 1024
    assert live.peak == 8192 and b.numel() == c.numel() * 8


def results_file(tmp_path: Path, model: str, mode: str = "GPU") -> Path:
    """A results.json as benchmarks/gpu_check.py writes it: one measured step with its largest batch, one step from
    before batches were recorded, one that timed out, and two batch-1 steps that recorded only the process's peak
    (model loading included), one of them below any training peak."""
    ours = "900 tokens/s, peak {peak} GiB, eval loss 3.1000, MFU n/a"
    steps = [
        {"step": "environment", "status": "ok", "figures": {}},
        {"step": "lora-toy-512", "status": "ok", "command": f"--model {model} --arms ours --set train.bf16=auto",
         "figures": {"ours": ours.format(peak="0.0500"), "training peak (ours)": "0.0123 GiB",
                     "largest batch (ours)": "512 tokens, 12 targets",
                     "settings (ours)": json.dumps({"method": "lora", "gradient_checkpointing": False,
                                                    "frozen_dtype": "bfloat16", "bf16": True})}},
        {"step": "before-batches", "status": "ok", "command": f"--model {model} --arms ours",
         "figures": {"ours": ours.format(peak="1.00"), "settings (ours)": json.dumps({"method": "lora"})}},
        {"step": "slow", "status": "timed out", "command": f"--model {model}"},
    ]
    batch_1 = f"--model {model} --arms ours --seq-len 256 --set train.per_device_train_batch_size=1"
    for name, peak in (("process-peak", "1.00"), ("process-peak-too-low", "0.0001")):  # GPU checks before 2026-12-07
        steps.append({"step": name, "status": "ok", "command": batch_1, "figures": {"ours": ours.format(peak=peak)}})
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"mode": mode, "started": "2026-12-07 12:00:00", "command": "x", "steps": steps}))
    return path


def test_check_predicts_each_measured_peak_and_says_why_others_are_not_checked(tmp_path, tiny_model_dir):
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    rows = {r["step"]: r for r in check(results_file(tmp_path, tiny_model_dir))}
    assert set(rows) == {"lora-toy-512", "before-batches", "slow", "process-peak", "process-peak-too-low"}
    row = rows["lora-toy-512"]
    assert (row["tokens"], row["targets"], row["measured_gib"]) == (512, 12, 0.0123)  # training, not loading
    assert row["shape"]["frozen"] == "bfloat16" and row["shape"]["checkpointing"] is False
    expected = predict(config, **row["shape"], tokens=512, targets=12)  # the run's settings, its largest batch
    assert row["predicted"] == expected.gib()
    assert row["error_pct"] == round(100 * (expected.total / 2**30 / 0.0123 - 1), 1)
    assert "not recorded" in rows["before-batches"]["not checked"]
    assert rows["slow"]["not checked"] == "no ours arm measured"
    bound, low = rows["process-peak"], rows["process-peak-too-low"]
    assert (bound["measured"], bound["tokens"], bound["targets"]) == ("process", 256, 8)  # --seq-len, 8 assumed
    assert "error_pct" not in bound and "error_pct" not in low  # loading may set a process's peak: no error
    assert bound["within_bound"] is True and low["within_bound"] is False
    table = check_table(list(rows.values()), Path("results.json"))
    assert "| 1.00 (model loading included) |" in table and "| within the bound (the process's peak" in table
    assert "| above the process's peak: a miss |" in table
    assert "| lora-toy-512 | lora r16, frozen bfloat16, gradient checkpointing off | 512 tokens, 12 targets | 0.01 |" \
        in table
    assert "| before-batches | | | | not checked: its largest batch was not recorded" in table


def test_check_refuses_a_cpu_dry_run(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="RSS, not tensor bytes"):
        check(results_file(tmp_path, tiny_model_dir, mode="CPU dry run (toy-width models)"))
