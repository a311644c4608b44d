"""The fine-tuning DAG: prepare base model → ingest → split → evaluate base → train → merge → evaluate tuned →
export → report. Run it with ``python -m flows.finetune [--config PATH] [--set dotted.key=value ...]``.

Each stage is a plain function in ``tasks/``; here they become Prefect tasks. Tasks pass paths and small
JSON-able dicts, never models or tensors.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, task

from configs.schema import ConfigError, FinetuneConfig, load_config
from flows.retries import with_retries
from tasks import base_model, evaluate, export, ingest, merge, report, split, train

logging.getLogger("tasks").setLevel(logging.INFO)  # stage logs: terminal + Prefect run logs (flows/__init__)

prepare_base_model_task = task(base_model.prepare_base_model, name="prepare-base-model")
ingest_task = task(ingest.ingest, name="ingest")
split_task = task(split.split, name="split")
train_task = task(train.train, name="train")
evaluate_task = task(evaluate.evaluate, name="evaluate")
merge_task = task(merge.merge, name="merge")
export_task = task(export.export_onnx, name="export-onnx")
report_task = task(report.write_report, name="report")
publish_task = task(report.update_latest, name="publish-latest")


def run_dir_for(cfg: FinetuneConfig) -> Path:
    """``<output.dir>/<run_name>``; the default run name is ``<name>-<UTC timestamp>``."""
    name = cfg.output.run_name or f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return Path(cfg.output.dir) / name


@flow(name="finetune")
def finetune(cfg: FinetuneConfig) -> dict:
    """Run the whole pipeline for ``cfg``; return ``metrics.json``'s content (its path is under ``run_dir``)."""
    run = run_dir_for(cfg)
    stages: dict[str, float] = {}

    def timed(name, stage_task, *args):
        start = time.perf_counter()
        out = with_retries(stage_task, cfg.retry)(*args)
        stages[name] = time.perf_counter() - start
        return out

    trc = cfg.model.trust_remote_code
    base = timed("prepare_base_model", prepare_base_model_task, cfg.model)
    data = timed("ingest", ingest_task, cfg.data, run / "data" / "ingested")
    splits = timed("split", split_task, data, cfg.split, run / "data")
    test_file = splits["files"]["test"]
    base_metrics = (timed("evaluate_base", evaluate_task, base, test_file, data["task"], cfg.eval,
                          run / "eval" / "base", trc) if cfg.eval.evaluate_base else None)
    trained = timed("train", train_task, base, splits, cfg.model, cfg.lora, cfg.train, run)
    merged = timed("merge", merge_task, base, trained["adapter"], test_file, cfg.merge, run / "merged", trc)
    tuned_metrics = timed("evaluate_finetuned", evaluate_task, merged["merged"], test_file, data["task"],
                          cfg.eval, run / "eval" / "finetuned", trc)
    onnx = (timed("export", export_task, merged["merged"], test_file, cfg.export, run / "onnx")
            if cfg.export.enabled else None)
    metrics = report.build_metrics(
        cfg.model_dump(mode="json"), data["task"], base_metrics, tuned_metrics, trained, merged, onnx,
        {"ingest": data["counts"], "split": splits["counts"], "leaked_dropped": splits["leaked_dropped"],
         "labels": len(data["labels"])}, stages)
    paths = report_task(run, metrics)
    publish_task(cfg.output.dir, run)
    print(summary(run, metrics, paths))
    return metrics | {"run_dir": str(run)}


def summary(run: Path, metrics: dict, paths: dict) -> str:
    """A one-screen end-of-run summary: where things are, quality base vs tuned, time per stage."""
    stage_line = ", ".join(f"{k} {v:.0f}s" for k, v in metrics["stage_seconds"].items())
    onnx = metrics["onnx"]
    return "\n".join([
        f"run: {run}",
        report.metrics_table(metrics),
        f"adapter: {run / 'adapter'}  merged: {run / 'merged'}  onnx: {run / 'onnx' if onnx else 'disabled'}",
        f"onnx greedy agreement: {onnx['greedy_agreement']:.0%}" if onnx else "",
        f"stages: {stage_line}",
        f"metrics: {paths['metrics']}  report: {paths['report']}",
    ])


class _DropTraceback(logging.Filter):
    """For the terminal only: keep a failure's one-line message, drop its traceback (``--debug`` keeps it).

    Installed on the root (console) handler, which sees a record after Prefect's API handler has sent it
    to the run logs with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: configs/banking77.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.path=../shared/data/banking77 (repeatable)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 1 with a one-line reason on failure (``--debug`` for traceback)."""
    args = parse_args(argv)
    if not args.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropTraceback())
    try:
        cfg = load_config(args.config, args.overrides)
        finetune(cfg)
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one line per failure
        if args.debug:
            raise
        kind = "" if isinstance(e, (ConfigError, ingest.DataError)) else f"{type(e).__name__}: "
        print(f"error: {kind}{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
