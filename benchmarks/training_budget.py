"""Choose a job's training budget on validation: train its adapter with ``--set`` overrides (training rows, learning
rate, rank, batch size, ...) through the train stage itself and print the validation curve — accuracy and loss on
the validation split at every ``train.eval_steps``, answered as the evaluation answers (constrained to the labels) —
with the training seconds (evaluations left out) beside it. Each call appends one JSON line to ``--out``.

    python benchmarks/training_budget.py --config configs/banking77.yaml --base <base model folder> \\
        --set data.path=../shared/data/banking77 --set split.max_validation_examples=500 \\
        --set split.max_train_examples=5600 --set train.learning_rate=3e-3 --set train.eval_steps=44 \\
        --out budget.jsonl

``--base``: the folder the job trains on (for banking77 the de-quantized int4 base the flow's ``int4_base`` stage
writes under ``model.cache_dir``, ``int4-base-*/matched``). The split, tokenizer and training are the job's own.
Run it on an otherwise idle machine: the seconds are the budget's other half. It prints the CPU (``lscpu``'s model
name and bf16 support) with the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from configs.schema import load_config  # noqa: E402
from tasks.common.files import read_json  # noqa: E402


def validation_curve(log: list[dict], batch_size: int) -> list[dict]:
    """The evaluations of a ``train_log.json``: step, training rows seen (steps x ``batch_size``), validation
    accuracy (when scored) and loss, and the evaluation's seconds."""
    return [{"step": h["step"], "rows_seen": h["step"] * batch_size, "val_accuracy": h.get("eval_accuracy"),
             "val_loss": round(h["eval_loss"], 4), "eval_s": round(h.get("eval_runtime", 0.0), 1)}
            for h in log if "eval_loss" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--base", required=True, help="the base model folder the adapter trains on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="training_budget.jsonl", help="JSON lines, one per call (appended)")
    parser.add_argument("--work", default=None, help="folder for the split and adapter (default: a temporary one)")
    args = parser.parse_args()

    from tasks.stages.ingest import ingest
    from tasks.stages.split import split
    from tasks.stages.train import train

    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        splits = split(ingest(cfg.data, work / "ingested"), cfg.split, work / "data")
        start = time.perf_counter()
        result = train(args.base, splits, cfg.model, cfg.lora, cfg.train, work / "adapter", work / "checkpoints")
        wall = time.perf_counter() - start
        log = read_json(work / "adapter" / "train_log.json")
    curve = validation_curve(log, cfg.train.per_device_train_batch_size)
    eval_seconds = sum(point["eval_s"] for point in curve)
    line = {"sets": args.set, "machine": cpu(), "train_rows": result.sequence_lengths["train"]["examples"],
            "steps": result.steps, "train_s": round(wall - eval_seconds, 1), "eval_s": round(eval_seconds, 1),
            "attn_implementation": result.attn_implementation, "curve": curve}
    print(json.dumps(line, indent=1))
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
