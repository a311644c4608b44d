"""The fine-tuning DAG: prepare base model → validate → ingest → split → evaluate base → train → merge → evaluate
tuned → export → report → publish. Run it with ``python -m flows.finetune [--config PATH] [--set dotted.key=value]``.

Each stage is declared once in ``flows/stages.py`` (its plain function in ``tasks/``, the config it reads, what it
needs upstream, whether it holds the GPU slot); here each is one ``run(...)`` line, cached by content and retried
on transient failures (``flows/caching.py``). Tasks pass paths and small JSON-able dicts, never models or tensors.
"""
from __future__ import annotations

import argparse
import logging
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from configs.schema import ConfigError, FinetuneConfig, load_config
from flows import artifacts
from flows.caching import fingerprint, run_stage, source_fingerprint, stage_dir, stage_key
from flows.stages import (EVALUATE, EXPORT, INGEST, MERGE, PREPARE_BASE_MODEL, PUBLISH_LATEST, REPORT, SPLIT,
                          TRAIN, VALIDATE)
from tasks import base_model, ingest, predict, report, validate
from tasks.files import verify_folder

logging.getLogger("tasks").setLevel(logging.INFO)  # stage logs: terminal + Prefect run logs (flows/__init__)


def run_dir_for(cfg: FinetuneConfig) -> Path:
    """``<output.dir>/<run_name>``; the default run name is ``<name>-<UTC timestamp>-<4 hex>``."""
    name = cfg.output.run_name or f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    return Path(cfg.output.dir) / name


def shared_store(cfg: FinetuneConfig) -> Path:
    """The result store of what is shared by every ``output.dir`` and must not write under it: the converted base
    model and the validation (a bad input leaves ``output.dir`` absent)."""
    return Path(cfg.model.cache_dir).expanduser().resolve() / ".prefect-results"


def base_model_source(cfg: FinetuneConfig) -> tuple[str | None, str]:
    """``(embedded GGUF path or None, content key of the base model)``: the GGUF's content for the embedded
    model, a local folder's content, or a Hub id's string."""
    if not base_model.is_embedded(cfg.model):
        return None, fingerprint(cfg.model.name_or_path)
    gguf = str(base_model.embedded_gguf())
    return gguf, stage_key(PREPARE_BASE_MODEL, None, fingerprint(gguf))


def embedded_base_dir(cfg: FinetuneConfig, base_key: str) -> Path:
    """Where the embedded GGUF is converted to: ``<model.cache_dir>/SmolLM2-135M-Instruct-<key>``."""
    return Path(cfg.model.cache_dir).expanduser() / f"SmolLM2-135M-Instruct-{base_key}"


def prepare(cfg: FinetuneConfig, run) -> tuple[str, str, dict, str, str, dict]:
    """The stages every training run starts with: prepare the base model, validate (``tasks/validate.py``:
    data, base model and sequence lengths, before anything is written under ``output.dir``; cached by content in
    ``shared_store``), ingest, split.

    ``run(stage, out_dir, *args, **options)`` runs one stage (cached, retried) and records its time.

    Returns:
        ``(base model path or id, base-model content key, ingest result, data fingerprint, split folder,
        split result)``.

    Raises:
        DataError, ModelError: from the validation; nothing has been written under ``output.dir`` then.
    """
    gguf, base_key = base_model_source(cfg)
    base = cfg.model.name_or_path
    if gguf:
        base_dir = embedded_base_dir(cfg, base_key)
        base = run(PREPARE_BASE_MODEL, base_dir, gguf, str(base_dir), store=shared_store(cfg))
    data_fingerprint = fingerprint(cfg.data.path)
    run(VALIDATE, None, cfg, base, store=shared_store(cfg), key=stage_key(VALIDATE, cfg, data_fingerprint, base_key))
    ingest_dir = stage_dir(cfg, INGEST, data_fingerprint)
    data = run(INGEST, ingest_dir, cfg.data, ingest_dir)
    split_dir = stage_dir(cfg, SPLIT, ingest_dir)
    splits = run(SPLIT, split_dir, data, cfg.split, split_dir)
    return base, base_key, data, data_fingerprint, split_dir, splits


@flow(name="finetune")
def finetune(cfg: FinetuneConfig, publish_latest: bool = True) -> dict:
    """Run the whole pipeline for ``cfg``; return ``metrics.json``'s content plus ``run_dir``, ``test_file``
    and ``source`` (see ``flows.caching.source_fingerprint``). ``publish_latest=False`` leaves
    ``latest.json`` alone (the nightly retrain decides promotion itself).

    Raises:
        ConfigError: ``model.hf_token_secret`` names no Prefect Secret block (before any stage runs).
    """
    base_model.use_hub_token(cfg.model)  # HF_TOKEN from the environment or model.hf_token_secret; never logged
    stages: dict[str, dict] = {}

    def run(stage, out_dir, *args, label: str | None = None, **options):
        # metrics.json names: evaluate-base -> evaluate_base, export-genai-int4 -> export_genai-int4
        name = stage.name.replace("-", "_") + (label or stage.name).removeprefix(stage.name).replace("-", "_", 1)
        result, stages[name] = run_stage(cfg, stage, out_dir, *args, label=label, **options)
        return result

    trc = cfg.model.trust_remote_code
    base, base_key, data, data_fingerprint, split_dir, splits = prepare(cfg, run)
    test_file, kind = splits["files"]["test"], data["task"]

    base_metrics = None
    if cfg.eval.evaluate_base:
        base_eval = stage_dir(cfg, EVALUATE, base_key, split_dir, kind, trc)
        base_metrics = run(EVALUATE, base_eval, base, test_file, kind, cfg.eval, base_eval, trc, label="evaluate-base")
    adapter = stage_dir(cfg, TRAIN, base_key, split_dir)
    trained = run(TRAIN, adapter, base, splits, cfg.model, cfg.lora, cfg.train, adapter, adapter + ".checkpoints",
                  [artifacts.training_progress])
    merged = stage_dir(cfg, MERGE, base_key, adapter, trc)
    merge_result = run(MERGE, merged, base, adapter, test_file, cfg.merge, merged, trc)
    tuned_eval = stage_dir(cfg, EVALUATE, merged, split_dir, kind, trc)
    tuned_metrics = run(EVALUATE, tuned_eval, merged, test_file, kind, cfg.eval, tuned_eval, trc,
                        label="evaluate-finetuned")
    onnx = {}
    inference = predict.inference_settings(cfg.data, tuned_metrics["task"], tuned_metrics["max_new_tokens"])
    for target in cfg.export.targets if cfg.export.enabled else []:
        onnx_dir = stage_dir(cfg, EXPORT, merged, tuned_eval, target, inference, trc)
        onnx[target] = run(EXPORT, onnx_dir, target, merged, test_file, tuned_eval, inference, cfg.export, onnx_dir,
                           trc, label=f"export-{target}")

    metrics = report.build_metrics(
        cfg.model_dump(mode="json"), tuned_metrics["task"], base_metrics, tuned_metrics, trained, merge_result,
        onnx or None, {"ingest": data["counts"], "split": splits["counts"], "leaked_dropped": splits["leaked_dropped"],
                       "labels": len(data["labels"]), "fingerprint": data_fingerprint},
        {k: v["seconds"] for k, v in stages.items()})
    metrics["stage_states"] = {k: v["state"] for k, v in stages.items()}
    links = {"data": split_dir, "adapter": adapter, "merged": merged, "eval/finetuned": tuned_eval}
    links |= {"eval/base": base_eval} if base_metrics else {}
    links |= {f"onnx/{target}": result["path"] for target, result in onnx.items()}
    run_dir = run_dir_for(cfg)
    paths = REPORT.task(run_dir, metrics, links, str(Path(adapter) / "train_log.json"))
    source = source_fingerprint(cfg, data_fingerprint, base_key)
    if publish_latest:
        PUBLISH_LATEST.task(cfg.output.dir, run_dir, source)
    artifacts.publish(run_dir, metrics, paths)
    print(summary(run_dir, metrics, paths))
    return metrics | {"run_dir": str(run_dir), "test_file": test_file, "source": source}


def summary(run: Path, metrics: dict, paths: dict) -> str:
    """A one-screen end-of-run summary: where things are, quality base vs tuned, time and state per stage."""
    stage_line = ", ".join(f"{k} {metrics['stage_seconds'][k]:.0f}s ({state})"
                           for k, state in metrics["stage_states"].items())
    lines = [f"run: {run}", report.metrics_table(metrics), f"adapter: {run / 'adapter'}  merged: {run / 'merged'}"]
    lines += [f"onnx/{line}" for line in report.export_lines(metrics)] or ["onnx: disabled"]
    lines += [f"stages: {stage_line}", f"metrics: {paths['metrics']}  report: {paths['report']}"]
    return "\n".join(lines)


class _DropTraceback(logging.Filter):
    """For the terminal only: keep a failure's one-line message, drop its traceback (``--debug`` keeps it).

    Installed on the root (console) handler, which sees a record after Prefect's API handler has sent it
    to the run logs with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def parse_args(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="YAML config (default: configs/banking77.yaml; sweeps: "
                                    "configs/sweeps/banking77.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.path=../shared/data/banking77 (repeatable)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    p.add_argument("--dry-run", action="store_true", help="check the config, the data and the base model "
                   "(tasks/validate.py) and stop: nothing is trained or written under output.dir")
    return p.parse_args(argv)


def dry_run(cfg: FinetuneConfig) -> dict:
    """``--dry-run``: resolve the base model (converting the embedded GGUF into ``model.cache_dir`` if it is not
    there yet), run ``tasks.validate.validate`` without Prefect, and print what a run would train on.

    Raises:
        ConfigError, DataError, ModelError: as ``validate``.
    """
    base_model.use_hub_token(cfg.model)
    gguf, base_key = base_model_source(cfg)
    base = cfg.model.name_or_path
    if gguf:
        base = str(embedded_base_dir(cfg, base_key))
        if verify_folder(base):  # missing, or truncated/corrupted since: convert again
            base_model.convert_gguf(gguf, base)
    checked = validate.validate(cfg, base)
    lengths = "; ".join(f"{name}: {c['over_max_seq_length']} of {c['examples']} over "
                        f"{cfg.train.max_seq_length} tokens (longest {c['longest']})"
                        for name, c in checked["sequence_lengths"].items())
    print(f"ok: {cfg.data.path}: {checked['format']} ({checked['task']}, {checked['labels']} labels), rows kept "
          f"{ {k: v['kept'] for k, v in checked['counts'].items()} }, split {checked['split']}; {lengths}; "
          f"base model {base}: ok. Nothing was trained or written.")
    return checked


def main(argv: list[str] | None = None, flow_fn=None, prog: str = "python -m flows.finetune",
         description: str = __doc__.split("\n\n")[0], load=load_config, check=dry_run) -> int:
    """CLI entry point of ``flow_fn`` (default ``finetune``; any flow taking what ``load(--config, --set
    overrides)`` returns): exit 0 on success, 1 with a one-line reason on failure (``--debug`` for the
    traceback). ``--dry-run`` calls ``check`` on the loaded config instead of the flow."""
    flow_fn = flow_fn or finetune
    args = parse_args(argv, prog, description)
    if not args.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropTraceback())
    try:
        (check if args.dry_run else flow_fn)(load(args.config, args.overrides))
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one line per failure
        if args.debug:
            raise
        kind = "" if isinstance(e, (ConfigError, ingest.DataError, validate.ModelError)) else f"{type(e).__name__}: "
        print(f"error: {kind}{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
