"""The nightly retrain: retrain only when something changed, promote only a model that is better.

    fingerprint data, base model and training config
      └─ same as the promoted model's (latest.json)?  → a completed no-op, in seconds
      └─ changed → finetune (subflow; every stage cached by content, latest.json untouched)
                 → the promoted model on the new test split (its own metrics if the split is the same,
                   otherwise a cached evaluation of its merged model)
                 → quality gate (tasks/stages/promote.py) → promote = move latest.json (and, with MLflow, a new
                   registered model version under the alias "champion"), or keep the old model
                 → the decision and its numbers as the `promotion` artifact

Deployed on a cron schedule by ``deployments/prefect.yaml``; run by hand with
``python -m flows.nightly [--config PATH] [--set key=value ...]``.
"""
from __future__ import annotations

if __name__ == "__main__":  # a command-line run: Prefect's temporary server starts while the rest imports
    from flows.api_server import begin

    begin()

import functools
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from configs.schema import ConfigError, FinetuneConfig
from flows import tracking
from flows.caching import run_stage, source_fingerprint
from flows.finetune import (base_model_source, data_fingerprint, evaluate_on, finetune, main as finetune_main,
                            push_to_hub)
from flows.stages import PUBLISH_LATEST
from tasks import base_model
from tasks.stages import hub, promote
from tasks.common.files import read_json

gate_task = task(promote.quality_gate, name="quality-gate")


@flow(name="nightly-retrain")
def nightly_retrain(cfg: FinetuneConfig) -> dict:
    """Retrain ``cfg`` if its data, base model or training config changed since the promoted model, and
    promote the new model only if it passes the quality gate (``promotion.margin``).

    Returns:
        The decision: ``{"skipped": reason, "promote": False, "run_dir"}`` for a no-op, otherwise
        ``tasks.stages.promote.quality_gate``'s dict plus ``run_dir`` (the new run) and ``source``.

    Raises:
        ConfigError: ``eval.evaluate_base`` is false (the gate needs the base model's score).
    """
    if not cfg.eval.evaluate_base:
        raise ConfigError("nightly-retrain needs eval.evaluate_base: true (the gate compares with the base model)")
    base_model.use_hub_token(cfg.model)
    cfg = hub.resolve_revisions(cfg)  # a re-pushed Hub model or dataset (new commit) is a change: retrain
    hub.require_push_token(cfg.output.push_to_hub)
    source = source_fingerprint(cfg, data_fingerprint(cfg), base_model_source(cfg)[1])
    promoted = promote.read_promoted(cfg.output.dir)
    if promoted and promoted.get("source") == source:
        decision = {"promote": False, "run_dir": promoted["run_dir"],
                    "skipped": f"data, base model and training config unchanged since the promoted run "
                               f"`{promoted['run_dir']}` (source {source})"}
    else:
        try:
            result = finetune(cfg, publish_latest=False)
        except Exception as e:  # bad data, a failed merge/export check...: say so where the decision goes
            _record({"promote": False, "failed": f"{type(e).__name__}: {e}"})
            raise
        incumbent = incumbent_metrics(cfg, promoted, result) if promoted else None
        decision = gate_task(result["task"], result["finetuned"], result["base"], incumbent,
                             cfg.promotion.margin)
        decision |= {"run_dir": result["run_dir"], "source": source}
        if decision["promote"]:  # only a promoted model is published, pushed and registered
            PUBLISH_LATEST.task(cfg.output.dir, result["run_dir"], source)
            pushed = push_to_hub(cfg, result["run_dir"])
            decision |= {"hub": pushed.model_dump(mode="json")} if pushed else {}
            if result.get("mlflow_run_id"):  # MLflow Model Registry: a new version, alias "champion"
                decision["mlflow_model_version"] = tracking.register_champion(cfg.name, result["mlflow_run_id"])
    _record(decision)
    return decision


def _record(decision: dict) -> None:
    """The decision as the run's ``promotion`` artifact and one log line."""
    create_markdown_artifact(promote.decision_markdown(decision), key="promotion",
                             description="nightly retrain: promotion decision and the numbers behind it")
    get_run_logger().info("nightly-retrain: %s", promote.decision_summary(decision))


def incumbent_metrics(cfg: FinetuneConfig, promoted: dict, result: dict) -> dict | None:
    """The promoted model's test metrics on the new run's test split: its own ``metrics.json`` when it was
    measured on the same split folder with the same ``eval`` settings, otherwise an evaluation of its merged
    model (a cached stage, so each model/split pair is evaluated once). None, with a warning, when its
    merged folder is gone (the gate then checks against the base model only)."""
    merged = Path(promoted["merged"]).resolve()
    if not merged.is_dir():
        get_run_logger().warning("promoted model %s is missing; gating against the base model only", merged)
        return None
    old = read_json(promoted["metrics"])
    split_dir = Path(result["test_file"]).parent
    if (Path(promoted["run_dir"]) / "data").resolve() == split_dir.resolve() and \
            old["config"]["eval"] == result["config"]["eval"]:
        return old["finetuned"]
    return evaluate_on(functools.partial(run_stage, cfg), cfg, str(merged), str(merged), str(split_dir), "test",
                       result["task"], label="evaluate-promoted").result.model_dump(mode="json")


def main(argv: list[str] | None = None, prog: str = "python -m flows.nightly") -> int:
    """CLI: ``--config``/``--set`` as ``flows.finetune``; exit 0 on success, 1 with a one-line reason."""
    return finetune_main(argv, flow_fn=nightly_retrain, prog=prog, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
