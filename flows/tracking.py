"""MLflow tracking of a pipeline run, with ``train.report_to`` naming ``mlflow`` (the server is
``MLFLOW_TRACKING_URI``'s; the experiment is the config's ``name`` unless ``MLFLOW_EXPERIMENT_NAME`` says another).

One MLflow run per flow run, named as its run folder: created before the stages run, so that the trainer's own
MLflow callback (transformers' ``MLflowCallback``, which resumes the run named by ``MLFLOW_RUN_ID``) logs the
training curves into it live; when the train stage comes from the cache, the curves are logged from its
``train_log.json`` instead. At the end the run gets the config (as parameters and ``config.yaml``), the test
metrics of every evaluation and export, and the published folders as artifacts (the run folder's files, the
adapter, the merged model, each export). A promoted nightly run registers its merged model in the MLflow Model
Registry under the config's name and points the ``champion`` alias at that version (``register_champion``).

Everything goes through ``mlflow.MlflowClient`` with the run id, never the fluent API's thread-local active run:
Prefect may run a stage in another thread than the flow.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from configs.schema import FinetuneConfig

CHAMPION = "champion"  # the registry alias of the promoted model


def enabled(cfg: FinetuneConfig) -> bool:
    """Whether ``cfg`` asks for MLflow (``"mlflow" in train.report_to``)."""
    return "mlflow" in cfg.train.report_to


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"lora.r": "16", ...}``: a nested mapping as dotted keys, values as MLflow parameter strings."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]  # MLflow's parameter value limit
    return out


class TrackedRun:
    """The MLflow run of one flow run: ``run_id`` and the logging the flow does at its end.

    Args:
        cfg: the run's config (its ``name`` is the experiment, unless ``MLFLOW_EXPERIMENT_NAME`` is set).
        run_name: the run folder's name.
    """

    def __init__(self, cfg: FinetuneConfig, run_name: str):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=run_name, tags={"finetune-flow.job": cfg.name})
        self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri

    def log_results(self, cfg: FinetuneConfig, run_dir: Path, metrics: dict, links: dict[str, str],
                    train_log: Path, train_cached: bool) -> None:
        """Parameters (the config, flattened), test metrics (``test/<side>/<metric>``, ``export/<target>/<figure>``),
        the training curves from ``train_log`` when the train stage was ``train_cached`` (otherwise the trainer
        logged them live), and the artifacts: the run folder's own files, then each linked stage folder
        (``adapter``, ``merged``, ``onnx/<target>``...) under its link name."""
        import yaml
        from mlflow.entities import Metric, Param

        from tasks.common.files import read_json

        params = _flatten(cfg.model_dump(mode="json"))
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, 0, metrics["train"].get("steps") or 0)
                                                    for k, v in evaluation_metrics(metrics).items()])
        if train_cached and train_log.is_file():
            history = [Metric(k, float(v), 0, h["step"]) for h in read_json(train_log) if "step" in h
                       for k, v in h.items() if k not in ("step", "epoch") and isinstance(v, (int, float))]
            for i in range(0, len(history), 1000):
                self.client.log_batch(self.run_id, metrics=history[i:i + 1000])
        self.client.log_text(self.run_id, yaml.safe_dump(metrics["config"], sort_keys=False), "config.yaml")
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
                self.client.log_artifact(self.run_id, str(path))
        for name, folder in sorted(links.items()):
            self.client.log_artifacts(self.run_id, str(Path(folder).resolve()), artifact_path=name)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` (or ``FAILED``)."""
        self.client.set_terminated(self.run_id, status)


def evaluation_metrics(metrics: dict) -> dict[str, float]:
    """The numeric figures of ``metrics.json``'s evaluations and exports as MLflow metric names:
    ``test/finetuned/accuracy``, ``test/base/eval_loss``, ``export/genai-int4/same_answer``, ..."""
    out = {}
    for side in ("base", "base_few_shot", "finetuned"):
        for name, value in (metrics.get(side) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"test/{side}/{name}"] = float(value)
    for target, figures in (metrics.get("onnx") or {}).items():
        for name, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"export/{target}/{name}"] = float(value)
    return out


@contextmanager
def tracked(cfg: FinetuneConfig, run_name: str):
    """Within the block, the flow run's MLflow run (a ``TrackedRun``; None unless ``enabled(cfg)``) and
    ``MLFLOW_RUN_ID`` naming it, so that the trainer's MLflow callback logs into it. The run ends ``FINISHED``, or
    ``FAILED`` when the block raises.

    Raises:
        ImportError: ``mlflow`` is not installed though ``train.report_to`` names it (``pip install -e '.[mlflow]'``).
    """
    if not enabled(cfg):
        yield None
        return
    run = TrackedRun(cfg, run_name)
    saved = os.environ.get("MLFLOW_RUN_ID")
    os.environ["MLFLOW_RUN_ID"] = run.run_id
    try:
        yield run
    except BaseException:
        run.finish("FAILED")
        raise
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = saved
    run.finish()


def register_champion(name: str, run_id: str) -> str:
    """Register the merged model logged by MLflow run ``run_id`` (its ``merged`` artifacts) as a new version of
    the registered model ``name`` (created if missing) and point the ``champion`` alias at it; returns the version.

    The merged folder is a transformers model (safetensors, config, tokenizer), registered as it was published:
    ``MlflowClient.create_model_version`` with the run's artifact location as its source."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.create_registered_model(name, description="finetune-flow: the promoted merged model of this job")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    run = client.get_run(run_id)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/merged", run_id=run_id,
                                          description=f"run {run.info.run_name}")
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return version.version
