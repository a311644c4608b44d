"""``train``: the trainer's settings (tasks/stages/train.py; fields named as TRL's SFTConfig)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from configs.base import Section
from tasks.common.metrics import QUALITY_METRICS


class TrainConfig(Section):
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="Overrides epochs when > 0.")
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(32, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_length: int = Field(512, gt=0, description="Tokens per training sequence (prompt + answer, chat "
                                                       "template included).")
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Training/validation examples longer than max_seq_length: drop them, keep them cut "
        "at max_seq_length (the end of the answer is lost), or stop before training naming the first one's file "
        "and row. Counted in train.json and the report.")
    padding_free: bool = Field(True, description="Lay each batch's examples end to end instead of padding them to "
                                                 "the longest: position ids restart at every example and no example "
                                                 "attends to another. Same batches, same loss, no compute spent on "
                                                 "padding (tasks/common/padding_free.py).")
    packing: bool = Field(False, description="Pack several examples into each max_seq_length sequence (TRL best-fit "
                                             "decreasing, padding-free), so a step holds more examples than "
                                             "per_device_train_batch_size. Examples never attend to each other "
                                             "(flash-attention varlen on a GPU; with sdpa/eager, transformers builds "
                                             "a block-diagonal mask from the position ids).")
    bf16: Literal["auto"] | bool = Field("auto", description="bf16 autocast; auto = where the CPU/GPU supports it.")
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding); only used "
                                                    "with padding_free: false.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="Recompute activations in the backward pass (less memory, ~30 % more compute); auto = "
        "on for qlora (its purpose is memory), off otherwise.")
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the base weights that LoRA, DoRA and QLoRA leave frozen (QLoRA: those it does "
        "not quantize: embeddings, norms, LM head); adapters stay float32. auto = bfloat16 on a GPU under bf16 "
        "autocast (no float32 copy in memory, no cast at every matmul: what TRL's and PEFT's GPU examples load), "
        "float32 elsewhere (the CPU path the banking77 figures were measured on). Full fine-tuning keeps float32.")
    use_liger_kernel: Literal["auto"] | bool = Field(
        "auto", description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU; TRL >= 1.0 keeps its fused "
        "cross-entropy off) on a GPU where liger-kernel is installed; auto = off (measured slower on an H200: "
        "docs/gpu-check/2026-11-28-h200).")
    num_processes: Literal["auto"] | Annotated[int, Field(gt=0)] = Field(
        "auto", description="Training processes (one per GPU, data parallel, started with torchrun by the train "
        "task); auto = the number of visible GPUs, 1 on a CPU.")
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Eval-loss interval in steps; None = once per epoch.")
    save_steps: int = Field(200, gt=0, description="Checkpoint interval in steps.")
    save_total_limit: int = Field(2, gt=0)
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without an improvement of metric_for_best_model "
        "larger than early_stopping_min_delta (transformers EarlyStoppingCallback); None = train to the end. Needs "
        "eval_steps; implies load_best_model_at_end.")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest improvement of metric_for_best_model "
                                                                   "that counts (nats/token for eval_loss).")
    load_best_model_at_end: bool = Field(False, description="Publish the checkpoint with the best "
                                                            "metric_for_best_model instead of the last one. Needs "
                                                            "eval_steps.")
    metric_for_best_model: str = Field(
        "eval_loss", description="What early stopping and the best checkpoint go by: eval_loss, or eval_<metric> "
        "for a quality metric of the task (eval_accuracy, eval_macro_f1, eval_rouge_l, ...), generated on the "
        "validation split at every evaluation as the test evaluation does (classification data always reports "
        "it; generation data only when named here, its generations being long).")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"], description="Where the trainer logs train loss, learning rate and the validation metrics "
        "(transformers' integrations): tensorboard = the adapter's tensorboard/ folder (the run folder's "
        "tensorboard/ gets the test metrics); mlflow = MLFLOW_TRACKING_URI's server, one MLflow run per flow run with "
        "the curves, test metrics, config and published folders, a promoted nightly model registered as champion "
        "(flows/tracking.py; the mlflow extra); [] = "
        "nowhere.")
    seed: int = 42

    @model_validator(mode="after")
    def _check_best_model(self) -> "TrainConfig":
        if (self.early_stopping_patience or self.load_best_model_at_end) and self.eval_steps is None:
            raise ValueError("early_stopping_patience / load_best_model_at_end need train.eval_steps (validation "
                             "loss every N steps, with save_steps a multiple of it)")
        allowed = ["eval_loss"] + [f"eval_{m}" for m in QUALITY_METRICS]
        if self.metric_for_best_model not in allowed:
            raise ValueError(f"metric_for_best_model={self.metric_for_best_model!r}: expected one of {allowed}")
        return self
