"""The fine-tuning DAG: prepare base model → ingest → split → evaluate base → train → merge → evaluate tuned →
export → report → publish. Run it with ``python -m flows.finetune [--config PATH] [--set dotted.key=value ...]``.

Each stage is a plain function in ``tasks/``; here they become Prefect tasks, cached by content
(``flows/caching.py``) and retried on transient failures (``flows/retries.py``). Tasks pass paths and small
JSON-able dicts, never models or tensors.
"""
from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.exceptions import MissingContextError

from configs.schema import ConfigError, FinetuneConfig, load_config
from flows import artifacts
from flows.caching import cached, fingerprint, source_fingerprint, stage_key
from flows.gpu import holds_gpu_slot
from flows.retries import with_retries
from tasks import base_model, evaluate, export, ingest, merge, predict, report, split, train, validate
from tasks.files import content_digest, verify_folder

logging.getLogger("tasks").setLevel(logging.INFO)  # stage logs: terminal + Prefect run logs (flows/__init__)

convert_task = task(base_model.convert_gguf, name="prepare-base-model")
ingest_task = task(ingest.ingest, name="ingest")
split_task = task(split.split, name="split")
train_task = task(holds_gpu_slot(train.train), name="train")  # GPU stages hold a `gpu` slot (flows/gpu.py)
evaluate_task = task(holds_gpu_slot(evaluate.evaluate), name="evaluate")
merge_task = task(holds_gpu_slot(merge.merge), name="merge")
export_task = task(export.export, name="export")
report_task = task(report.write_report, name="report")
publish_task = task(report.update_latest, name="publish-latest")
validate_task = task(validate.validate, name="validate")


def run_dir_for(cfg: FinetuneConfig) -> Path:
    """``<output.dir>/<run_name>``; the default run name is ``<name>-<UTC timestamp>-<4 hex>``."""
    name = cfg.output.run_name or f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    return Path(cfg.output.dir) / name


def stage_dir(cfg: FinetuneConfig, stage_task, *key_parts) -> str:
    """The content-addressed folder ``<output.dir>/stages/<task name>/<key>`` of one stage's output. A key part
    that is an upstream stage folder counts with its published content (``tasks.files.content_digest``, from its
    manifest), so an upstream folder rebuilt with different bytes gives this stage a new folder instead of
    rewriting the one earlier runs link to."""
    def with_content(part):
        digest = content_digest(part) if isinstance(part, str) and Path(part).is_dir() else None
        return (part, digest) if digest else part

    parts = [with_content(part) for part in key_parts]
    return str(Path(cfg.output.dir) / "stages" / stage_task.name / stage_key(stage_task, *parts))


def run_stage(cfg: FinetuneConfig, stage_task, out_dir: str | Path, *args) -> tuple[object, dict]:
    """Run ``stage_task(*args)`` cached by content and retried on transient failures.

    A cache hit is checked after the task returns (a run that waited for a concurrent one's lock finds the
    folder it published): if ``out_dir`` is missing or fails ``tasks.files.verify_folder`` (truncated or
    corrupted files), a warning names the reason and the task runs again with ``refresh_cache``.

    Returns ``(result, {"seconds": wall time, "state": "Completed" | "Cached"})``; raises the task's error."""
    start = time.perf_counter()
    # the converted base model is shared by every output.dir: its cache record lives beside it, in model.cache_dir
    store = Path(cfg.model.cache_dir).expanduser().resolve() / ".prefect-results" if stage_task is convert_task \
        else None
    stage = with_retries(cached(stage_task, cfg, store), cfg.retry)
    state = stage(*args, return_state=True)
    if state.name == "Cached" and (problem := verify_folder(out_dir)):
        try:
            logger = get_run_logger()
        except MissingContextError:
            logger = logging.getLogger(__name__)
        logger.warning("%s: the cached output is unusable (%s); running the stage again", stage_task.name, problem)
        state = stage.with_options(refresh_cache=True)(*args, return_state=True)
    return state.result(), {"seconds": time.perf_counter() - start, "state": state.name}


def base_model_source(cfg: FinetuneConfig) -> tuple[str | None, str]:
    """``(embedded GGUF path or None, content key of the base model)``: the GGUF's content for the embedded
    model, a local folder's content, or a Hub id's string."""
    if not base_model.is_embedded(cfg.model):
        return None, fingerprint(cfg.model.name_or_path)
    gguf = str(base_model.embedded_gguf())
    return gguf, stage_key(convert_task, fingerprint(gguf))


def embedded_base_dir(cfg: FinetuneConfig, base_key: str) -> Path:
    """Where the embedded GGUF is converted to: ``<model.cache_dir>/SmolLM2-135M-Instruct-<key>``."""
    return Path(cfg.model.cache_dir).expanduser() / f"SmolLM2-135M-Instruct-{base_key}"


def prepare(cfg: FinetuneConfig, run) -> tuple[str, str, dict, str, str, dict]:
    """The stages every training run starts with: prepare the base model, validate (``tasks/validate.py``:
    data, base model and sequence lengths, before anything is written under ``output.dir``), ingest, split.

    ``run(name, stage_task, out_dir, *args)`` runs one stage (cached, retried) and records its time.

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
        base = run("prepare_base_model", convert_task, base_dir, gguf, str(base_dir))
    validate_task(cfg, base)  # not cached: a persisted result store would keep its failures under output.dir
    data_fingerprint = fingerprint(cfg.data.path)
    ingest_dir = stage_dir(cfg, ingest_task, cfg.data, data_fingerprint)
    data = run("ingest", ingest_task, ingest_dir, cfg.data, ingest_dir)
    split_dir = stage_dir(cfg, split_task, ingest_dir, cfg.split)
    splits = run("split", split_task, split_dir, data, cfg.split, split_dir)
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

    def run(name: str, stage_task, out_dir: str | Path, *args):
        result, stages[name] = run_stage(cfg, stage_task, out_dir, *args)
        return result

    def out(stage_task, *key_parts) -> str:
        return stage_dir(cfg, stage_task, *key_parts)

    trc = cfg.model.trust_remote_code
    base, base_key, data, data_fingerprint, split_dir, splits = prepare(cfg, run)
    test_file = splits["files"]["test"]

    base_metrics = None
    if cfg.eval.evaluate_base:
        base_eval_dir = out(evaluate_task, base_key, split_dir, data["task"], cfg.eval, trc)
        base_metrics = run("evaluate_base", evaluate_task, base_eval_dir, base, test_file, data["task"], cfg.eval,
                           base_eval_dir, trc)

    adapter_dir = out(train_task, base_key, split_dir, cfg.model, cfg.lora, cfg.train)
    trained = run("train", train_task, adapter_dir, base, splits, cfg.model, cfg.lora, cfg.train, adapter_dir,
                  adapter_dir + ".checkpoints", [artifacts.training_progress])
    merged_dir = out(merge_task, base_key, adapter_dir, cfg.merge, trc)
    merged = run("merge", merge_task, merged_dir, base, adapter_dir, test_file, cfg.merge, merged_dir, trc)
    tuned_eval_dir = out(evaluate_task, merged_dir, split_dir, data["task"], cfg.eval, trc)
    tuned_metrics = run("evaluate_finetuned", evaluate_task, tuned_eval_dir, merged_dir, test_file, data["task"],
                        cfg.eval, tuned_eval_dir, trc)
    onnx = {}
    inference = predict.inference_settings(cfg.data, data["task"], tuned_metrics["max_new_tokens"])
    for target in cfg.export.targets if cfg.export.enabled else []:
        onnx_dir = out(export_task, merged_dir, tuned_eval_dir, target, cfg.export, inference, trc)
        onnx[target] = run(f"export_{target}", export_task, onnx_dir, target, merged_dir, test_file,
                           tuned_eval_dir, inference, cfg.export, onnx_dir, trc)

    metrics = report.build_metrics(
        cfg.model_dump(mode="json"), data["task"], base_metrics, tuned_metrics, trained, merged, onnx or None,
        {"ingest": data["counts"], "split": splits["counts"], "leaked_dropped": splits["leaked_dropped"],
         "labels": len(data["labels"]), "fingerprint": data_fingerprint},
        {k: v["seconds"] for k, v in stages.items()})
    metrics["stage_states"] = {k: v["state"] for k, v in stages.items()}
    links = {"data": split_dir, "adapter": adapter_dir, "merged": merged_dir, "eval/finetuned": tuned_eval_dir}
    links |= {"eval/base": base_eval_dir} if base_metrics else {}
    links |= {f"onnx/{target}": result["path"] for target, result in onnx.items()}
    run_dir = run_dir_for(cfg)
    paths = report_task(run_dir, metrics, links, str(Path(adapter_dir) / "train_log.json"))
    source = source_fingerprint(cfg, data_fingerprint, base_key)
    if publish_latest:
        publish_task(cfg.output.dir, run_dir, source)
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
