"""What the Prefect UI shows about a run: metrics table, loss curve, model card, output links, training progress."""
from __future__ import annotations

import base64
import json
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from tasks.common.metrics import QUALITY_METRICS
from tasks.stages.report import metrics_rows, model_card


def training_progress():
    """A ``transformers.TrainerCallback`` that keeps a ``training-progress`` artifact (percent of optimizer
    steps done, the latest train loss and validation metrics) up to date at every logging step and
    puts the trainer's log lines (loss, learning rate, eval loss, validation accuracy) in the Prefect run logs.
    Built on call, so importing this module does not import transformers."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        def __init__(self) -> None:
            self.artifact_id = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.artifact_id = create_progress_artifact(
                progress=100.0 * state.global_step / max(state.max_steps, 1), key="training-progress",
                description=f"training: {state.max_steps} optimizer steps")

        def on_log(self, args, state, control, logs=None, **kwargs):
            get_run_logger().info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(logs or {}))
            if self.artifact_id is not None:
                loss = (logs or {}).get("loss")
                latest = next((h for h in reversed(state.log_history) if "eval_loss" in h), {})
                validation = ", ".join(f"validation {m} {latest[f'eval_{m}']:.4f}" for m in QUALITY_METRICS
                                       if f"eval_{m}" in latest)
                update_progress_artifact(self.artifact_id, 100.0 * state.global_step / max(state.max_steps, 1),
                                         description=f"step {state.global_step}/{state.max_steps}"
                                                     + (f", train loss {loss:.4f}" if loss is not None else "")
                                                     + (f", {validation}" if validation else ""))

    return TrainingProgress()


def publish(run_dir: Path, metrics: dict, paths: dict) -> None:
    """Create the run's artifacts: ``metrics`` table, ``loss-curve``, ``sample-generations`` table,
    ``model-card``, ``run-folder`` link."""
    create_table_artifact(metrics_rows(metrics), key="metrics",
                          description=f"{metrics['task']}: base vs fine-tuned on the test split")
    if paths.get("loss_curve"):
        png = base64.b64encode(Path(paths["loss_curve"]).read_bytes()).decode()
        create_markdown_artifact(f"![loss curve](data:image/png;base64,{png})\n\n`{paths['loss_curve']}`",
                                 key="loss-curve", description="train and validation loss by step")
    if paths.get("samples"):
        create_table_artifact(json.loads(Path(paths["samples"]).read_text()), key="sample-generations",
                              description="first test prompts: reference, base and fine-tuned answers")
    create_markdown_artifact(model_card(run_dir, metrics), key="model-card", description="model card")
    create_link_artifact(Path(run_dir).resolve().as_uri(), link_text=str(run_dir), key="run-folder",
                         description="adapter/, merged/, onnx/, metrics.json, report.md")
