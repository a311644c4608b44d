"""The fine-tuning DAG: prepare base model → validate → ingest → split → evaluate base → train → merge → evaluate
tuned → export → report → publish. Run it with ``python -m flows.finetune [--config PATH] [--set dotted.key=value]``.

Each stage is declared once in ``flows/stages.py`` (its plain function in ``tasks/``, the config it reads, what it
needs upstream, whether it holds the GPU slot); here each is one ``run(...)`` line, cached by content and retried
on transient failures (``flows/caching.py``), its folder derived from the declaration and what it is computed
from (``after=``). Stages pass paths and small typed results (pydantic models), never models or tensors.
"""
from __future__ import annotations

if __name__ == "__main__":  # a command-line run: Prefect's temporary server starts while the rest imports
    from flows.api_server import begin

    begin()

import argparse
import logging
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from prefect import flow

from configs.schema import ConfigError, FinetuneConfig, load_config
from flows import artifacts, tracking
from flows.api_server import cancel, temporary_server
from flows.caching import StageRun, fingerprint, run_stage, source_fingerprint, stage_key
from flows.retries import with_retries
from flows.stages import (EVALUATE, EXPORT, INGEST, INT4_BASE, MERGE, NPU_BASE, PREPARE_BASE_MODEL, PUBLISH_LATEST,
                          PUSH_TO_HUB, REPORT, SPLIT, TRAIN, VALIDATE)
from tasks import base_model
from tasks.deploy.builders import genai
from tasks.deploy.runtime import predict
from tasks.stages import hub, report, validate
from tasks.common.files import read_jsonl, verify_folder
from tasks.common.labels import label_set
from tasks.stages.merge import MergeChecks
from tasks.stages.report import DataSummary, RunMetrics
from tasks.stages.train import TrainSummary

ADAPTER_TARGET, NPU_ADAPTER_TARGET = "genai-int4-adapter", "openvino-npu-adapter"
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
    model, a local folder's content, or a Hub id's string with its commit sha (``model.revision`` as
    ``tasks.stages.hub.resolve_revisions`` resolved it: a re-pushed model gets a new key)."""
    if not base_model.is_embedded(cfg.model):
        name, revision = cfg.model.name_or_path, cfg.model.revision
        return None, fingerprint(f"{name}@{revision}" if revision and hub.is_hub_model(name) else name)
    gguf = str(base_model.embedded_gguf())
    return gguf, stage_key(PREPARE_BASE_MODEL, None, fingerprint(gguf))


def data_fingerprint(cfg: FinetuneConfig) -> str:
    """The data's content key: a local file's or folder's content (not where it lives), or a Hub dataset id's
    string with its commit sha (``data.revision`` as ``tasks.stages.hub.resolve_revisions`` resolved it)."""
    path, revision = cfg.data.path, cfg.data.revision
    return fingerprint(f"{path}@{revision}" if revision and hub.is_hub_dataset(path) else path)


def embedded_base_dir(cfg: FinetuneConfig, base_key: str) -> Path:
    """Where the embedded GGUF is converted to: ``<model.cache_dir>/SmolLM2-135M-Instruct-<key>``."""
    return Path(cfg.model.cache_dir).expanduser() / f"SmolLM2-135M-Instruct-{base_key}"


def prepare(cfg: FinetuneConfig, run) -> tuple[str, str, str, StageRun, StageRun, StageRun | None]:
    """The stages every training run starts with: prepare the base model, validate (``tasks/stages/validate.py``:
    data, base model and sequence lengths, before anything is written under ``output.dir``; cached by content in
    ``shared_store``), export the int4 base when ``genai-int4-adapter`` is a target (``export_int4_base``),
    ingest, split.

    ``run(stage, *args, **options)`` runs one stage (``flows.caching.run_stage``) and records its time.

    Returns:
        ``(base model path or id, base-model content key, data content key, the ingest run, the split run, the
        int4-base run or None)``. With ``export.match_quantization`` the base model is the int4 base's
        de-quantized twin, keyed by its weights' digest.

    Raises:
        DataError, ModelError: from the validation; nothing has been written under ``output.dir`` then.
    """
    gguf, base_key = base_model_source(cfg)
    base = cfg.model.name_or_path
    if gguf:
        base = run(PREPARE_BASE_MODEL, gguf, out_dir=embedded_base_dir(cfg, base_key), store=shared_store(cfg)).dir
    elif hub.is_hub_model(base):  # every stage loads the snapshot of the resolved commit
        base = hub.model_snapshot(cfg.model)
    data_key = data_fingerprint(cfg)  # the data's content, not where it lives
    run(VALIDATE, cfg, base, store=shared_store(cfg), key=stage_key(VALIDATE, cfg, data_key, base_key))
    int4 = export_int4_base(run, cfg, base, base_key)
    if int4 and cfg.export.match_quantization:
        base, base_key = int4.result.matched_model, int4.result.matched_digest
    data = run(INGEST, cfg.data, after=(data_key,))
    split = run(SPLIT, data.result, cfg.split, after=(data.dir,))
    return base, base_key, data_key, data, split, int4


def export_int4_base(run, cfg: FinetuneConfig, base: str, base_key: str) -> StageRun | None:
    """The int4 base with LoRA slots on ``lora.target_modules`` and its de-quantized twin
    (``tasks/deploy/builders/int4_base.py``), once per base model, LoRA targets and int4 settings, under
    ``model.cache_dir`` (shared by every run and ``output.dir``); None unless ``genai-int4-adapter`` is an enabled
    export target."""
    if not (cfg.export.enabled and ADAPTER_TARGET in cfg.export.targets):
        return None
    trc, options = cfg.model.trust_remote_code, genai.int4_options(cfg.export)
    key = stage_key(INT4_BASE, None, base_key, cfg.lora.target_modules, options, trc)
    return run(INT4_BASE, base, cfg.lora.target_modules, options, trust_remote_code=trc,
               out_dir=Path(cfg.model.cache_dir).expanduser() / f"int4-base-{key}", store=shared_store(cfg))


def export_npu_base(run, cfg: FinetuneConfig, base: str, base_key: str) -> StageRun | None:
    """The NPU base IR of the base model the adapter trains on (``tasks.deploy.builders.openvino.export_npu_base``,
    at ``export.npu_adapter_weights``), once per base model and weights, under ``model.cache_dir``; None unless
    ``openvino-npu-adapter`` is an enabled export target."""
    if not (cfg.export.enabled and NPU_ADAPTER_TARGET in cfg.export.targets):
        return None
    trc, weights = cfg.model.trust_remote_code, cfg.export.npu_adapter_weights
    key = stage_key(NPU_BASE, None, base_key, weights, trc)
    return run(NPU_BASE, base, weights, trust_remote_code=trc,
               out_dir=Path(cfg.model.cache_dir).expanduser() / f"npu-base-{key}", store=shared_store(cfg))


@flow(name="finetune")
def finetune(cfg: FinetuneConfig, publish_latest: bool = True) -> dict:
    """Run the whole pipeline for ``cfg``; return ``metrics.json``'s content plus ``run_dir``, ``test_file``
    and ``source`` (see ``flows.caching.source_fingerprint``). ``publish_latest=False`` leaves
    ``latest.json`` alone (the nightly retrain decides promotion itself).

    With ``output.push_to_hub``, a run that passed every gate and published ``latest.json`` is then uploaded
    to the Hub (``push-to-hub``, ``tasks.stages.hub.push_run``; the result is under ``"hub"``). With ``mlflow`` in
    ``train.report_to`` the run is tracked in MLflow (``flows.tracking``; its id under ``"mlflow_run_id"``).

    Raises:
        ConfigError: ``output.dir`` or ``model.cache_dir`` cannot be a folder (``check_folders``),
            ``model.hf_token_secret`` names no Prefect Secret block, a Hub model or dataset revision cannot be
            resolved (``tasks.stages.hub.resolve_revisions``), or ``output.push_to_hub`` is set without a token (before
            any stage runs).
    """
    check_folders(cfg)
    base_model.use_hub_token(cfg.model)  # HF_TOKEN from the environment or model.hf_token_secret; never logged
    cfg = hub.resolve_revisions(cfg)  # Hub ids pinned to a commit sha: in every key, metrics.json, model cards
    hub.require_push_token(cfg.output.push_to_hub)
    runs: dict[str, StageRun] = {}

    def run(stage, *args, label: str | None = None, **options) -> StageRun:
        # metrics.json names: evaluate-base -> evaluate_base, export-genai-int4 -> export_genai-int4
        name = stage.name.replace("-", "_") + (label or stage.name).removeprefix(stage.name).replace("-", "_", 1)
        runs[name] = run_stage(cfg, stage, *args, label=label, **options)
        return runs[name]

    trc, run_dir = cfg.model.trust_remote_code, run_dir_for(cfg)
    with tracking.tracked(cfg, run_dir.name) as mlflow_run:  # None unless train.report_to names mlflow
        base, base_key, data_key, data, split, int4 = prepare(cfg, run)
        npu_base = export_npu_base(run, cfg, base, base_key)  # on the base the adapter trains on
        test_file, kind = split.result.files["test"], data.result.task
        base_eval = evaluate_baselines(run, cfg, base, base_key, split, kind) if cfg.eval.evaluate_base else None
        adapter, merged = train_and_merge(run, cfg, base, base_key, split)
        tuned = evaluate_on(run, cfg, merged.dir, merged.dir, split.dir, "test", kind, label="evaluate-finetuned")
        labels = label_set(read_jsonl(split.result.files["train"])) if tuned.result.constrained else None
        inference = predict.inference_settings(cfg.data, tuned.result.task, tuned.result.max_new_tokens, cfg.name,
                                               labels)
        onnx = {}
        for target in cfg.export.targets if cfg.export.enabled else []:
            form = {"adapter": adapter.dir, "int4_base": int4.result.onnx} if target == ADAPTER_TARGET else {}
            form = {"adapter": adapter.dir, "npu_base": npu_base.dir} if target == NPU_ADAPTER_TARGET else form
            onnx[target] = run(EXPORT, target, merged.dir, test_file, tuned.dir, inference, cfg.export, **form,
                               trust_remote_code=trc, label=f"export-{target}",
                               after=(merged.dir, tuned.dir, target, inference, trc, *form.values()))

        metrics = run_metrics(cfg, data_key, runs)
        links = {"data": split.dir, "adapter": adapter.dir, "merged": merged.dir, "eval/finetuned": tuned.dir}
        links |= ({"eval/base": base_eval.dir} if base_eval else {}) | {f"onnx/{t}": r.dir for t, r in onnx.items()}
        links |= {"eval/base-few-shot": runs["evaluate_fewshot"].dir} if "evaluate_fewshot" in runs else {}
        links |= {"onnx/int4-base": int4.result.onnx} if int4 else {}
        links |= {"onnx/npu-base": npu_base.dir} if npu_base else {}
        metrics_json = metrics.model_dump(mode="json")
        train_log = Path(adapter.dir) / "train_log.json"
        paths = REPORT.task(run_dir, metrics_json, links, str(Path(adapter.dir) / "loss_curve.png"))
        source = source_fingerprint(cfg, data_key, base_key)
        if publish_latest:  # every gate passed (a failed merge/export check raised before the report)
            PUBLISH_LATEST.task(cfg.output.dir, run_dir, source)
        artifacts.publish(run_dir, metrics_json, paths)
        if mlflow_run:
            mlflow_run.log_results(cfg, run_dir, metrics_json, links, train_log, adapter.state == "Cached")
    print(summary(run_dir, metrics_json, paths))
    pushed = push_to_hub(cfg, run_dir) if publish_latest else None  # only a published run (output.push_to_hub)
    return metrics_json | {"run_dir": str(run_dir), "test_file": test_file, "source": source,
                           "hub": pushed.model_dump(mode="json") if pushed else None,
                           "mlflow_run_id": mlflow_run.run_id if mlflow_run else None}


def check_folders(cfg: FinetuneConfig) -> None:
    """``output.dir``, ``model.cache_dir`` and a folder ``output.result_storage`` are folders or can be made
    ones: neither they nor a parent is an existing file.

    Raises:
        ConfigError: naming the field, the path and the file in the way.
    """
    storage = cfg.output.result_storage
    fields = {"output.dir": cfg.output.dir, "model.cache_dir": cfg.model.cache_dir}
    fields |= {"output.result_storage": storage} if storage and not storage.startswith("block:") else {}
    for field, value in fields.items():
        path = Path(value).expanduser().absolute()
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            where = "is a file" if blocker == path else f"is under {blocker}, which is a file"
            raise ConfigError(f"{field}: {value} {where}; expected a folder (created if missing)")


def push_to_hub(cfg: FinetuneConfig, run_dir: str | Path) -> hub.HubPushResult | None:
    """Upload the published ``run_dir`` to ``output.push_to_hub`` (the ``push-to-hub`` stage, retried on transient
    failures as every stage; never cached: each published run is pushed); None when the field is unset."""
    if cfg.output.push_to_hub is None:
        return None
    return with_retries(PUSH_TO_HUB.task, cfg.retry)(str(run_dir), cfg.output.push_to_hub)


def train_and_merge(run, cfg: FinetuneConfig, base: str, base_key: str, split: StageRun) -> tuple[StageRun, StageRun]:
    """Train ``cfg``'s adapter on ``split`` and merge it into ``base`` (checked on validation rows), keyed alike
    in every flow: a sweep trial and a finetune run of the same config share both folders.

    Returns:
        ``(the train run, the merge run)``.
    """
    trc = cfg.model.trust_remote_code
    adapter = run(TRAIN, base, split.result, cfg.model, cfg.lora, cfg.train,
                  callback_factories=[artifacts.training_progress], after=(base_key, split.dir))
    merged = run(MERGE, base, adapter.dir, split.result.files["validation"], cfg.merge, trust_remote_code=trc,
                 after=(base_key, adapter.dir, split.dir, trc))
    return adapter, merged


def evaluate_on(run, cfg: FinetuneConfig, model: str, model_key: str, split_dir: str, rows: str, kind: str,
                label: str | None = None, sample: int | None = None, few_shot: int = 0,
                label_list: bool = False) -> StageRun:
    """Evaluate ``model`` (content key ``model_key``: the base model's key, or a merged folder) on the ``rows``
    split (``<split_dir>/<rows>.jsonl``, as ``tasks.stages.split`` writes it) — a stratified ``sample`` of it, with
    ``few_shot`` training examples before every prompt and, with ``label_list``, the label set named in it; the
    answers constrained to the train split's labels as ``eval.constrain`` says — keyed alike in every flow, so
    that the finetune, sweep and nightly flows share an evaluation of the same model on the same rows."""
    trc, seed, train = cfg.model.trust_remote_code, cfg.split.seed, str(Path(split_dir) / "train.jsonl")
    return run(EVALUATE, model, str(Path(split_dir) / f"{rows}.jsonl"), kind, cfg.eval, trust_remote_code=trc,
               max_examples=sample, seed=seed, few_shot=few_shot, train_file=train, label_list=label_list,
               after=(model_key, split_dir, rows, kind, trc, sample, seed, few_shot, label_list), label=label)


def evaluate_baselines(run, cfg: FinetuneConfig, base: str, base_key: str, split: StageRun, kind: str) -> StageRun:
    """The base model zero-shot and, with ``eval.few_shot`` k, k-shot, on a stratified sample of
    ``eval.baseline_examples`` test rows: what prompting alone gets, beside what fine-tuning gets.

    Returns:
        the zero-shot run (``metrics.json["base"]``; the k-shot one is ``runs["evaluate_fewshot"]``).
    """
    sample, named = cfg.eval.baseline_examples, cfg.eval.label_list and kind == "classification"
    if cfg.eval.few_shot:
        evaluate_on(run, cfg, base, base_key, split.dir, "test", kind, label="evaluate-fewshot", sample=sample,
                    few_shot=cfg.eval.few_shot, label_list=named)
    return evaluate_on(run, cfg, base, base_key, split.dir, "test", kind, label="evaluate-base", sample=sample,
                       label_list=named)


def run_metrics(cfg: FinetuneConfig, data_key: str, runs: dict[str, StageRun]) -> RunMetrics:
    """``metrics.json`` from the flow's stage runs (keyed as in ``stage_seconds``: ``evaluate_base``,
    ``evaluate_finetuned``, ``export_<target>``, ...)."""
    data, split, tuned = runs["ingest"].result, runs["split"].result, runs["evaluate_finetuned"]
    onnx = {name.removeprefix("export_"): r.result for name, r in runs.items() if name.startswith("export_")}
    return RunMetrics(
        task=tuned.result.task, base=runs["evaluate_base"].result if "evaluate_base" in runs else None,
        base_few_shot=runs["evaluate_fewshot"].result if "evaluate_fewshot" in runs else None,
        finetuned=tuned.result, onnx=onnx or None,
        train=TrainSummary(**runs["train"].result.model_dump(exclude={"adapter"})),
        merge=MergeChecks(**runs["merge"].result.model_dump()),
        data=DataSummary(ingest=data.counts, split=split.counts, leaked_dropped=split.leaked_dropped,
                         labels=len(data.labels), fingerprint=data_key),
        stage_seconds={k: r.seconds for k, r in runs.items()}, stage_states={k: r.state for k, r in runs.items()},
        config=cfg.model_dump(mode="json"))


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


def parse_args(argv: list[str] | None, prog: str, description: str, fields: str = "") -> argparse.Namespace:
    """The CLI's options; ``--help`` ends with every config field (``configs.schema.field_lines``) under the
    ``--set`` prefix ``fields`` (``""`` for a finetune config, ``"finetune."`` for a sweep's)."""
    from configs.schema import field_lines

    epilog = (f"config fields (--set {fields}KEY=VALUE; YAML files in configs/):\n"
              + "\n".join(line.replace("  ", f"  {fields}", 1) for line in field_lines()))
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: configs/banking77.yaml; sweeps: "
                                    "configs/sweeps/banking77.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.path=../shared/data/banking77 (repeatable)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    p.add_argument("--dry-run", action="store_true", help="check the config, the data and the base model "
                   "(tasks/stages/validate.py) and stop: nothing is trained or written under output.dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (the file with every "
                   "default and --set applied) as YAML and stop")
    return p.parse_args(argv)


def dry_run(cfg: FinetuneConfig) -> validate.ValidateResult:
    """``--dry-run``: resolve the base model (converting the embedded GGUF into ``model.cache_dir`` if it is not
    there yet), run ``tasks.stages.validate.validate`` without Prefect, and print what a run would train on.

    Raises:
        ConfigError, DataError, ModelError: as ``validate``.
    """
    check_folders(cfg)
    base_model.use_hub_token(cfg.model)
    cfg = hub.resolve_revisions(cfg)
    gguf, base_key = base_model_source(cfg)
    base = cfg.model.name_or_path
    if gguf:
        base = str(embedded_base_dir(cfg, base_key))
        if verify_folder(base):  # missing, or truncated/corrupted since: convert again
            base_model.convert_gguf(gguf, base)
    elif hub.is_hub_model(base):
        base = hub.model_snapshot(cfg.model)
    checked = validate.validate(cfg, base)
    lengths = "; ".join(f"{name}: {c.over_max_seq_length} of {c.examples} over {cfg.train.max_seq_length} tokens "
                        f"(longest {c.longest})" for name, c in checked.sequence_lengths.items())
    print(f"ok: {cfg.data.path}: {checked.format} ({checked.task}, {checked.labels} labels), rows kept "
          f"{ {k: v.kept for k, v in checked.counts.items()} }, split {checked.split}; {lengths}; "
          f"base model {base}: ok. Nothing was trained or written.")
    return checked


def print_config(loaded: FinetuneConfig | tuple) -> None:
    """``--print-config``: the loaded config as YAML (a sweep's: its own config, ``load_sweep``'s first item)."""
    config = loaded[0] if isinstance(loaded, tuple) else loaded
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")


def ours(error: BaseException) -> bool:
    """Whether ``error`` is one of this project's exceptions (defined in ``configs``, ``flows`` or ``tasks``): its
    message names the field, file or check in our words, so the ``error:`` line leaves out its class name. Any
    other exception's line starts with its class name (``OSError: [Errno 28] No space left on device``)."""
    return type(error).__module__.split(".")[0] in ("configs", "flows", "tasks")


def main(argv: list[str] | None = None, flow_fn=None, prog: str = "python -m flows.finetune",
         description: str = __doc__.split("\n\n")[0], load=load_config, check=dry_run) -> int:
    """CLI entry point of ``flow_fn`` (default ``finetune``; any flow taking what ``load(--config, --set
    overrides)`` returns): exit 0 on success, 1 with a one-line reason on failure (``--debug`` for the
    traceback). ``--dry-run`` calls ``check`` on the loaded config instead of the flow; ``--print-config``
    prints it."""
    flow_fn = flow_fn or finetune
    args = parse_args(argv, prog, description, fields="" if load is load_config else "finetune.")
    if not args.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_DropTraceback())
    try:
        cfg = load(args.config, args.overrides)
        if args.dry_run or args.print_config:
            cancel()  # begin()'s server, not needed
            (check if args.dry_run else print_config)(cfg)
        else:
            with temporary_server():  # Prefect's temporary server when no API is configured (flows/api_server.py)
                flow_fn(cfg)
    except Exception as e:  # noqa: BLE001 - the CLI's contract is one line per failure
        if args.debug:
            raise
        kind = "" if ours(e) else f"{type(e).__name__}: "
        print(f"error: {kind}{e}", file=sys.stderr)
        return 1
    finally:
        cancel()  # begin()'s server if nothing took it (a bad config): it has opened no database
    return 0


if __name__ == "__main__":
    sys.exit(main())
