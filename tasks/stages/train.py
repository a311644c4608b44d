"""train: LoRA / QLoRA / DoRA fine-tuning with TRL's SFTTrainer, completion-only loss on the model's chat
template; padding-free batches; one process per GPU (torchrun) when several are visible."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from configs.schema import ConfigError, LoraConfig, ModelConfig, TrainConfig
from tasks.base_model import (attention_implementation, attention_only, device, load_4bit, load_model,
                                     load_tokenizer, use_bf16)
from tasks.common.chat import to_prompt_completion, tokenize_with_completion_mask
from tasks.common.files import atomic_dir, read_json, read_jsonl, verify_folder, write_json, write_manifest
from tasks.common.labels import label_set
from tasks.stages.split import SplitResult

log = logging.getLogger(__name__)


def fit_to_length(tokenizer, records: list[dict], max_seq_length: int, overlength: str) -> tuple[list[dict], dict]:
    """Apply ``train.overlength`` to the examples longer than ``max_seq_length`` tokens (prompt + answer, as
    tokenised for training): ``"error"`` raises ``ValueError`` (the flow's validation has named the row
    already); ``"drop"`` removes them; ``"truncate"`` keeps them (the trainer cuts them at
    ``max_seq_length``, losing the end of the answer) unless the prompt alone fills the window, which would
    leave no answer token to learn from: those are dropped in both modes.

    Returns:
        ``(kept records, {"examples", "over_max_seq_length", "dropped", "truncated", "longest"})`` (token counts).
    """
    lengths = [(len(ids), prompt) for ids, prompt in tokenize_with_completion_mask(tokenizer, records)]
    over = {i for i, (n, _) in enumerate(lengths) if n > max_seq_length}
    if over and overlength == "error":
        raise ValueError(f"{len(over)} examples are longer than train.max_seq_length={max_seq_length} tokens "
                         "(train.overlength: error)")
    drop = over if overlength == "drop" else {i for i in over if lengths[i][1] >= max_seq_length}
    kept = [r for i, r in enumerate(records) if i not in drop]
    return kept, {"examples": len(records), "over_max_seq_length": len(over), "dropped": len(drop),
                  "truncated": len(over) - len(drop), "longest": max((n for n, _ in lengths), default=0)}


def sequence_lengths(tokenizer, files: dict, cfg: TrainConfig) -> tuple[dict, dict]:
    """``fit_to_length`` on the train and validation splits: ``({split: records}, report)``, where the report
    is ``{"max_seq_length", "overlength", "train": counts, "validation": counts}`` (logged as a warning when
    anything was over length).

    Raises:
        ValueError: no training (or validation) example is left within ``train.max_seq_length``.
    """
    records, report = {}, {"max_seq_length": cfg.max_seq_length, "overlength": cfg.overlength}
    for split in ("train", "validation"):
        records[split], report[split] = fit_to_length(tokenizer, read_jsonl(files[split]), cfg.max_seq_length,
                                                      cfg.overlength)
        counts = report[split]
        if counts["over_max_seq_length"]:
            log.warning("train: %d of %d %s examples are longer than train.max_seq_length=%d tokens (longest %d): "
                        "%d dropped, %d truncated (train.overlength=%s)", counts["over_max_seq_length"],
                        counts["examples"], split, cfg.max_seq_length, counts["longest"], counts["dropped"],
                        counts["truncated"], cfg.overlength)
        if not records[split]:
            raise ValueError(f"{files[split]}: all {counts['examples']} {split} examples are longer than "
                             f"train.max_seq_length={cfg.max_seq_length} tokens (longest {counts['longest']}); "
                             "raise train.max_seq_length")
    return records, report


def checkpoint_manifest_callback():
    """A ``transformers.TrainerCallback`` that writes a manifest (``tasks.common.files.write_manifest``: size and sha256
    of every file) into each ``checkpoint-<step>`` folder once the Trainer has saved it (``on_save`` runs after
    ``Trainer._save_checkpoint``), so that :func:`latest_complete_checkpoint` can tell an intact checkpoint from
    one cut off or corrupted later."""
    from transformers import TrainerCallback

    class CheckpointManifest(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every rank has written its part (rng_state_<rank>.pth) before it is hashed
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_manifest(folder)

    return CheckpointManifest()


def latest_complete_checkpoint(checkpoint_dir: str | Path) -> tuple[str | None, dict]:
    """The newest ``checkpoint-<step>`` folder that is complete and intact, and its trainer state.

    A checkpoint with a manifest (:func:`checkpoint_manifest_callback`) must match it
    (``tasks.common.files.verify_folder``); one without (killed between the save and the manifest, or saved before
    manifests existed) must have a readable ``trainer_state.json``, which the Trainer writes last. Newer
    checkpoints that fail (cut off while saving, truncated or corrupted later) are deleted here, with a warning
    naming the reason, so that neither the resume nor the checkpoint rotation picks them up: the resume falls
    back to the previous checkpoint, or to a fresh start.

    Returns:
        ``(path, trainer_state)``, or ``(None, {})`` when there is no complete checkpoint.
    """
    folders = Path(checkpoint_dir).glob("checkpoint-*") if Path(checkpoint_dir).is_dir() else []
    folders = [f for f in folders if f.name.rsplit("-", 1)[1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        problem = verify_folder(folder)
        if problem is None:
            try:
                return str(folder), json.loads((folder / "trainer_state.json").read_text())
            except (OSError, ValueError):
                problem = "no readable trainer_state.json (cut off while saving)"
        log.warning("train: removing checkpoint %s: %s", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
    return None, {}


class TrainSummary(BaseModel):
    """The figures of a training run (``metrics.json["train"]``)."""

    train_tokens: int = Field(description="non-pad tokens seen (padding-free: tokens other than the pad token)")
    tokens_per_second: float = Field(description="train_tokens of this run (not of a resumed-from run) / wall")
    wall_seconds: float = Field(description="training, with its evaluations")
    steps: int
    train_loss: float
    eval_loss: float | None = Field(description="the published adapter's: the best one's with "
                                                "load_best_model_at_end; None without an evaluation")
    validation: dict[str, float] = Field(default={}, description="the published adapter's generated quality "
                                                                 "metrics on the validation split (accuracy, ...)")
    bf16: bool
    method: str
    bnb_4bit: dict | None = Field(description="qlora's 4-bit settings (LoraConfig bnb_4bit_*)")
    attn_implementation: str
    padding_free: bool
    gradient_checkpointing: bool
    liger_kernel: bool
    frozen_dtype: str = Field("float32", description="the frozen base weights' dtype (see frozen_dtype)")
    processes: int
    peak_memory_bytes: int = Field(description="see peak_memory_bytes")
    resumed_from: str | None = Field(description="checkpoint folder the run resumed from")
    stopped_early: bool
    best_checkpoint: str | None = Field(description="folder name of the published checkpoint (best-model runs)")
    metric_for_best_model: str | None = Field(default=None, description="what chose it (best-model runs)")
    sequence_lengths: dict = Field(description="see sequence_lengths")


class TrainResult(TrainSummary):
    """What ``train`` returns and publishes as ``train.json``: the figures and the adapter's folder."""

    adapter: str


@dataclass(frozen=True)
class Settings:
    """The ``auto`` and derived settings of one training run, resolved for this machine and config."""

    processes: int
    bf16: bool
    attn_implementation: str
    gradient_checkpointing: bool
    liger_kernel: bool
    frozen_dtype: str  # "float32" or "bfloat16" (frozen_dtype)
    best_model: bool  # publish the checkpoint with the lowest validation loss
    collator: str  # "padding-free" (tasks/common/padding_free.py), "packing" (TRL's), "padded"


def resolve_settings(model_cfg: ModelConfig, lora_cfg: LoraConfig, cfg: TrainConfig, processes: int) -> Settings:
    """Resolve ``train.bf16``, ``model.attn_implementation``, ``train.gradient_checkpointing`` and
    ``train.use_liger_kernel`` (``auto``: off, see ``liger_kernel``), ``train.frozen_dtype`` (``frozen_dtype``)
    for ``tasks.base_model.device``, and choose
    the batch layout: padding-free rows (``tasks.common.padding_free``: rows of ``max_seq_length`` with sdpa/eager, the
    whole batch in one row for flash attention's varlen kernel), TRL's packing, or padded batches."""
    bf16 = use_bf16(cfg.bf16)
    attn = attention_implementation(model_cfg.attn_implementation, bf16, cfg.max_seq_length)
    collator = "packing" if cfg.packing else "padding-free" if cfg.padding_free else "padded"
    return Settings(processes=processes, bf16=bf16, attn_implementation=attn,
                    gradient_checkpointing=gradient_checkpointing(lora_cfg, cfg),
                    liger_kernel=liger_kernel(cfg.use_liger_kernel),
                    frozen_dtype=frozen_dtype(cfg.frozen_dtype, lora_cfg.method, bf16, device().type),
                    best_model=cfg.load_best_model_at_end or cfg.early_stopping_patience is not None,
                    collator=collator)


def for_architecture(settings: Settings, config) -> Settings:
    """``settings`` with padded batches when the model (``config``) is not attention-only
    (``tasks.base_model.attention_only``: LFM2's convolutions, Mamba layers): examples laid end to end in one row
    would leak into each other through such a layer's state. A warning says so."""
    if settings.collator == "padded" or attention_only(config):
        return settings
    types = sorted(set(config.get_text_config().layer_types))
    log.warning("train: %s has %s layers, which carry a state across an example boundary: padded batches instead "
                "of %s", type(config).__name__, "/".join(types), settings.collator)
    return dataclasses.replace(settings, collator="padded")


def liger_kernel(setting: str | bool) -> bool:
    """Resolve ``train.use_liger_kernel``: ``"auto"`` is off. The one measurement (an H200, Llama-3.2-1B config,
    banking77 rows: docs/gpu-check/2026-11-28-h200) trained at 9,686 tokens/s with Liger against 20,049 without,
    and TRL >= 1.0 turns Liger's fused linear cross-entropy off anyway (the LM head here runs only at the answer
    tokens, ``tasks/common/loss.py``); ``true`` still applies its RMSNorm, RoPE and SwiGLU kernels where installed."""
    return setting is True


def frozen_dtype(setting: str, method: str, bf16: bool, device_type: str) -> str:
    """Resolve ``train.frozen_dtype``, the dtype of the frozen base weights: ``"auto"`` is ``"bfloat16"`` on a GPU
    (``device_type`` "cuda") under bf16 autocast, else ``"float32"``; method ``full`` (every weight trained, float32
    master weights) is always ``"float32"``.

    Why: with float32 frozen weights, bf16 autocast casts each weight to bf16 at every matmul of the forward and
    backward passes (autocast caches casts only of weights that require gradients), and the float32 copy doubles
    the weights' memory; peft's ``prepare_model_for_kbit_training`` upcasts QLoRA's embedding and LM head to
    float32 (2 × 2.1 GB on Llama-3.1-8B). The CPU keeps float32 by default: the CPU figures (docs/results.md) were
    measured so, and bf16 weights change the residual stream's precision there too.
    """
    if method == "full":
        return "float32"
    if setting != "auto":
        return setting
    return "bfloat16" if bf16 and device_type == "cuda" else "float32"


# TrainConfig fields that are not SFTConfig's, those train resolves (Settings) before handing them on, and those
# transformers 5 renamed (handed on under the new name); every other TrainConfig field has SFTConfig's name and
# meaning and passes through unchanged (tests/test_train.py)
NOT_SFT_CONFIG = {"max_seq_length", "overlength", "num_processes", "early_stopping_patience",
                  "early_stopping_min_delta", "frozen_dtype"}
RESOLVED = {"bf16", "gradient_checkpointing", "use_liger_kernel", "padding_free", "packing", "load_best_model_at_end",
            "metric_for_best_model"}
RENAMED = {"warmup_ratio": "warmup_steps", "group_by_length": "train_sampling_strategy"}


def training_arguments(cfg: TrainConfig, settings: Settings, checkpoint_dir: str | Path):
    """The ``trl.SFTConfig``: ``cfg``'s fields named as SFTConfig's passed through, ``settings`` for the resolved
    ones, completion-only loss, checkpoints every ``save_steps`` into ``checkpoint_dir``, ``cfg.report_to``'s
    integrations, evaluation without gathered logits (``prediction_loss_only``).

    transformers 5 names: ``warmup_ratio`` goes in as ``warmup_steps`` (a value below 1 is a fraction of the
    steps), ``group_by_length`` as ``train_sampling_strategy="group_by_length"``; TensorBoard's folder is set by
    ``make_trainer`` (``tensorboard_dir``)."""
    from trl import SFTConfig

    from tasks.common.metrics import greater_is_better

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    passed = cfg.model_dump(include=names - RESOLVED - NOT_SFT_CONFIG - set(RENAMED))
    best = settings.best_model
    grouped = cfg.group_by_length and settings.collator == "padded"
    return SFTConfig(
        **passed,
        output_dir=str(checkpoint_dir),
        max_length=cfg.max_seq_length,
        warmup_steps=cfg.warmup_ratio,
        completion_only_loss=True,
        padding_free=False,  # tasks.common.padding_free's collator lays the rows out (TRL's needs max_length=None)
        packing=settings.collator == "packing",
        train_sampling_strategy="group_by_length" if grouped else "random",
        gradient_checkpointing=settings.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=settings.liger_kernel,
        bf16=settings.bf16,
        fp16=False,
        use_cpu=device().type == "cpu",
        eval_strategy="steps" if cfg.eval_steps else "epoch",
        save_strategy="steps",
        load_best_model_at_end=best,
        metric_for_best_model=cfg.metric_for_best_model if best else None,
        greater_is_better=greater_is_better(cfg.metric_for_best_model) if best else None,  # eval_loss: False
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,  # evaluation needs the loss only: no logits gathered
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if settings.processes > 1 else None,
    )


def tensorboard_dir(checkpoint_dir: str | Path) -> Path:
    """Where the trainer writes TensorBoard events: ``<checkpoint_dir>/tensorboard`` (kept across a resume;
    published with the adapter)."""
    return Path(checkpoint_dir) / "tensorboard"


@contextlib.contextmanager
def _environment(**values: str):
    """``os.environ`` with ``values`` set within the block, restored after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_trainer(model, tokenizer, records: dict[str, list[dict]], lora_cfg: LoraConfig, cfg: TrainConfig,
                 settings: Settings, checkpoint_dir: str | Path, callback_factories: list | None):
    """The SFT trainer (``sft_trainer_class``) on ``records["train"]`` with eval loss on ``records["validation"]``:
    the adapter of ``peft_config(lora_cfg)``, the callbacks (``callback_factories``' products, checkpoint
    manifests, early stopping with ``cfg.early_stopping_patience``) and the collator of ``settings``."""
    from transformers import EarlyStoppingCallback, set_seed

    # imports torch: not at module level (a cached run skips it)
    from tasks.common.padding_free import PaddingFreeCollator

    callbacks = [make() for make in callback_factories or []] + [checkpoint_manifest_callback()]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_min_delta))
    one_row = settings.attn_implementation.startswith("flash")  # transformers' varlen path: a batch of one row
    collator = (PaddingFreeCollator(tokenizer.pad_token_id, None if one_row else cfg.max_seq_length)
                if settings.collator == "padding-free" else None)
    # TRL adds the LoRA weights (random lora_A) before the Trainer seeds the RNGs: seed them here, so that the
    # same config gives the same adapter whatever ran before in this process
    set_seed(cfg.seed)
    # transformers 5's TensorBoard callback takes its folder from TENSORBOARD_LOGGING_DIR when it is created
    with _environment(TENSORBOARD_LOGGING_DIR=str(tensorboard_dir(checkpoint_dir))):
        trainer = sft_trainer_class()(
            model=model, args=training_arguments(cfg, settings, checkpoint_dir),
            train_dataset=to_prompt_completion(records["train"]),
            eval_dataset=to_prompt_completion(records["validation"]), processing_class=tokenizer,
            peft_config=peft_config(lora_cfg), callbacks=callbacks, data_collator=collator)
    trainer.validation_scorer = validation_scorer(tokenizer, records["validation"], cfg, settings.bf16,
                                                  label_set(records["train"]))
    return trainer


def validation_scorer(tokenizer, records: list[dict], cfg: TrainConfig, bf16: bool, labels: list[str] | None = None):
    """The task's quality metrics on the validation rows, answered greedily as ``tasks.stages.evaluate`` does (same
    prompts, ``max_new_tokens`` and scoring), as a function of the model: ``scorer(model) -> {"accuracy": ...}``.
    Classification rows are answered along the prefix tree of ``labels`` (the train split's label set:
    ``tasks.common.chat.generate_constrained``, the evaluation's and every deployed form's default,
    ``eval.constrain: labels``), so every answer is a label and only the tree's branch points call the model;
    without ``labels``, or when their answer tokens cannot be told apart (``LabelTreeError``: a chat template
    that ends no answer with the end-of-sequence token; a warning says so), they are generated free-running. None
    for generation data unless ``cfg.metric_for_best_model`` names one of its metrics (long generations).
    """
    from tasks.common.metrics import score

    task = "classification" if all(r.get("label") is not None for r in records) else "generation"
    if task == "generation" and cfg.metric_for_best_model == "eval_loss":
        return None
    from tasks.base_model import autocast
    from tasks.common.chat import (answer_ids, default_max_new_tokens, generate, generate_constrained,
                                   prompt_ids)
    from tasks.common.labels import LabelTree, LabelTreeError

    prompts = [prompt_ids(tokenizer, r) for r in records]
    references = [r["messages"][-1]["content"] for r in records]
    max_new = default_max_new_tokens(tokenizer, references, task)
    tree = None
    if task == "classification" and labels:
        try:
            tree = LabelTree.build(answer_ids(tokenizer, labels))
        except LabelTreeError as e:
            log.warning("train: validation answers generated free-running: %s", e)

    def scorer(model) -> dict[str, float]:
        training = model.training
        model.eval()
        batch = cfg.per_device_eval_batch_size
        with autocast(bf16):
            predictions = (generate_constrained(model, tokenizer, prompts, tree, batch, desc="validation answers")
                           if tree is not None else
                           generate(model, tokenizer, prompts, max_new, batch, desc="validation generate"))
        model.train(training)
        return score(task, predictions, references)

    return scorer


def run_training(trainer, checkpoint_dir: str | Path, best_model: bool = False) -> tuple[object, dict]:
    """``trainer.train()``, resumed from the latest complete checkpoint in ``checkpoint_dir`` if there is one,
    then one more evaluation unless the last one was at the final step (transformers evaluates every
    ``eval_steps`` only) or ``best_model`` publishes an evaluated checkpoint: the published adapter's validation
    figures are its own.

    Returns:
        ``(trainer.train's output, {"resumed_from": path | None, "tokens_before": tokens seen before the resume,
        "wall_seconds": float})``.
    """
    resume, state = latest_complete_checkpoint(checkpoint_dir)
    if resume:
        log.info("train: resuming from %s (step %s)", resume, state.get("global_step"))
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    if not best_model and evaluated[-1:] != [trainer.state.global_step]:
        trainer.evaluate()
    return output, {"resumed_from": resume, "tokens_before": int(state.get("num_input_tokens_seen", 0)),
                    "wall_seconds": time.perf_counter() - start}


def train_result(trainer, output, run: dict, settings: Settings, lora_cfg: LoraConfig, out_dir: str | Path,
                 lengths: dict) -> TrainResult:
    """The ``TrainResult`` of a finished ``run_training`` (``output``, ``run``)."""
    from tasks.common.metrics import QUALITY_METRICS

    state, wall = trainer.state, run["wall_seconds"]
    evaluations = [h for h in state.log_history if "eval_loss" in h]
    if settings.best_model and state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
        evaluations = [h for h in evaluations if h["step"] == best_step]
    published = evaluations[-1] if evaluations else {}
    tokens = int(state.num_input_tokens_seen)
    return TrainResult(
        adapter=str(out_dir), train_tokens=tokens,
        tokens_per_second=(tokens - run["tokens_before"]) / wall if wall > 0 else 0.0,
        wall_seconds=wall, steps=state.global_step, train_loss=output.training_loss,
        eval_loss=published.get("eval_loss"),
        validation={m: published[f"eval_{m}"] for m in QUALITY_METRICS if f"eval_{m}" in published},
        bf16=settings.bf16, method=lora_cfg.method,
        bnb_4bit=lora_cfg.model_dump(include={"bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                                              "bnb_4bit_compute_dtype"}) if lora_cfg.method == "qlora" else None,
        attn_implementation=settings.attn_implementation, padding_free=settings.collator != "padded",
        gradient_checkpointing=settings.gradient_checkpointing, liger_kernel=settings.liger_kernel,
        frozen_dtype=settings.frozen_dtype, processes=int(os.environ.get("WORLD_SIZE", 1)),
        peak_memory_bytes=peak_memory_bytes(trainer.model.device),
        resumed_from=run["resumed_from"], stopped_early=state.global_step < state.max_steps,
        best_checkpoint=Path(state.best_model_checkpoint).name if settings.best_model else None,
        metric_for_best_model=trainer.args.metric_for_best_model,
        sequence_lengths=lengths)


def plot_loss_curve(history: list[dict], path: str | Path) -> Path:
    """Plot train loss (per logging step) and validation loss (per evaluation) against the step, and on a second
    axis the validation quality metrics the trainer logged (``eval_accuracy``, ...), from ``history``
    (the trainer's ``log_history``), as a PNG at ``path`` (matplotlib, Agg backend). Returns ``path``."""
    import matplotlib

    from tasks.common.metrics import QUALITY_METRICS

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in (("loss", "train loss"), ("eval_loss", "validation loss")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    handles, labels = ax.get_legend_handles_labels()
    quality = [m for m in QUALITY_METRICS if any(f"eval_{m}" in h for h in history)]
    if quality:
        right = ax.twinx()
        for name, style in zip(quality, ("s--", "^:", "v-.")):
            right.plot(*zip(*[(h["step"], h[f"eval_{name}"]) for h in history if f"eval_{name}" in h]), style,
                       color=f"C{2 + quality.index(name)}", label=f"validation {name}")
        right.set_ylabel("validation metric")
        right.set_ylim(0, 1)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def publish_adapter(trainer, tokenizer, out_dir: str | Path, result: TrainResult) -> None:
    """Publish the adapter (safetensors + tokenizer; the whole model for full fine-tuning), the trainer's log
    history (``train_log.json``) and its plot (``loss_curve.png``, ``plot_loss_curve``: drawn once here, so a
    cached re-run's report only copies it), its TensorBoard events (``tensorboard/``, with ``report_to:
    [tensorboard]``) and ``train.json`` (``result``) in ``out_dir``, atomically."""
    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        events = tensorboard_dir(trainer.args.output_dir)
        if events.is_dir() and "tensorboard" in trainer.args.report_to:
            for callback in trainer.callback_handler.callbacks:  # the final evaluation's events, flushed
                if getattr(callback, "tb_writer", None) is not None:
                    callback.tb_writer.close()
                    callback.tb_writer = None
            shutil.copytree(events, tmp / "tensorboard")
        write_json(tmp / "train_log.json", trainer.state.log_history)
        plot_loss_curve(trainer.state.log_history, tmp / "loss_curve.png")
        write_json(tmp / "train.json", result.model_dump(mode="json"))
    log.info("train: %s", result.model_dump_json())


def train(base_model: str, splits: SplitResult, model_cfg: ModelConfig, lora_cfg: LoraConfig, cfg: TrainConfig,
          out_dir: str | Path, checkpoint_dir: str | Path | None = None,
          callback_factories: list | None = None) -> TrainResult:
    """Train a LoRA, QLoRA or DoRA adapter (``lora_cfg.method``) on ``splits.files["train"]``, with eval loss and
    the task's generated quality metrics (``validation_scorer``) on the validation split, and publish it in
    ``out_dir`` (``publish_adapter``); with method ``full`` every weight is trained and ``out_dir`` holds the
    whole model (safetensors) instead of an adapter.

    Batches are padding-free by default (``cfg.padding_free``: examples end to end, position ids restarting, no
    cross-example attention; same loss as padded batches). Examples longer than ``cfg.max_seq_length`` are
    dropped or truncated as ``cfg.overlength`` says (counted in the result). With
    ``cfg.early_stopping_patience`` training stops once validation loss has not improved for that many
    evaluations; with it or ``cfg.load_best_model_at_end`` the published adapter is the checkpoint with the
    lowest validation loss. Checkpoints go to ``checkpoint_dir`` (default ``<out_dir>.checkpoints``) every
    ``cfg.save_steps`` steps; a run restarted with the same ``checkpoint_dir`` resumes from the latest one
    (optimizer, scheduler, RNG and data position). With ``padding_free: false`` and ``cfg.group_by_length`` a
    resume in the middle of an epoch sees a different batch order for the rest of that epoch, because
    transformers' LengthGroupedSampler draws its permutation from the global RNG. With ``cfg.num_processes``
    (auto: the visible GPUs) above 1, this call runs itself in that many torchrun processes
    (``launch_processes``). ``callback_factories`` are zero-argument callables returning extra
    ``transformers.TrainerCallback`` objects (e.g. progress reporting), called here so that their callers need
    not import transformers.

    Steps: ``resolve_settings`` → ``base_for_training`` → ``sequence_lengths`` → ``make_trainer`` →
    ``run_training`` → ``train_result`` → ``publish_adapter`` (rank 0).

    Raises:
        ValueError: no example fits ``cfg.max_seq_length``.
        RuntimeError: a torchrun training process failed.
    """
    checkpoint_dir = checkpoint_dir or f"{out_dir}.checkpoints"
    processes = num_processes(cfg.num_processes)
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        return launch_processes(processes, base_model, splits, model_cfg, lora_cfg, cfg, out_dir, checkpoint_dir)
    settings = resolve_settings(model_cfg, lora_cfg, cfg, processes)
    tokenizer = load_tokenizer(base_model, model_cfg.trust_remote_code)
    tokenizer.padding_side = "right"
    model = base_for_training(base_model, model_cfg.trust_remote_code, lora_cfg, settings.attn_implementation,
                              settings.gradient_checkpointing, settings.frozen_dtype)
    settings = for_architecture(settings, model.config)
    records, lengths = sequence_lengths(tokenizer, splits.files, cfg)
    trainer = make_trainer(model, tokenizer, records, lora_cfg, cfg, settings, checkpoint_dir, callback_factories)
    output, run = run_training(trainer, checkpoint_dir, settings.best_model)
    result = train_result(trainer, output, run, settings, lora_cfg, out_dir, lengths)
    if trainer.is_world_process_zero():
        publish_adapter(trainer, tokenizer, out_dir, result)
    return result


def sft_trainer_class():
    """TRL's ``SFTTrainer`` with the LM head only where the completion-only loss needs it.

    ``compute_loss`` runs the head at the completion targets' positions only (``tasks.common.loss.completion_logits``):
    the same loss and gradients as TRL's (the causal-LM cross-entropy, ``num_items_in_batch`` and the
    multi-process scaling as ``Trainer.compute_loss``); TRL's logged ``mean_token_accuracy`` and ``entropy`` (both
    over target tokens, as TRL) come from the gathered logits. TRL >= 1.15's own fused LM head does the same on
    CUDA/XPU with Triton, but on a CPU it scores every position (``trl.kernels.chunked_logprob._use_triton``):
    on the banking77 job, where the prompt is most of every row, that is the slower path (docs/benchmarks.md).
    MoE router losses and pre-shifted labels (context parallelism) take TRL's own path.
    """
    from trl import SFTTrainer

    class CompletionOnlySFTTrainer(SFTTrainer):
        validation_scorer = None  # make_trainer sets it: generated quality metrics at every evaluation

        def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
            output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
            if self.validation_scorer is not None:
                scores = self.validation_scorer(self.model)
                output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in scores.items()})
            return output

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.aux_loss_enabled or "labels" not in inputs or "shift_labels" in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            return self._completion_loss(model, inputs, return_outputs, num_items_in_batch)

        def _completion_loss(self, model, inputs, return_outputs, num_items_in_batch):
            import torch
            from trl.trainer.utils import entropy_from_logits

            from tasks.common.loss import completion_logits, cross_entropy

            inputs = dict(inputs, use_cache=False)
            labels = inputs.pop("labels")
            logits, targets, outputs = completion_logits(model, inputs, labels, self.accelerator.unwrap_model(model))
            loss = cross_entropy(logits, targets, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages gradients
            mode = "train" if model.training else "eval"
            with torch.no_grad():
                correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == targets).sum())
                count = self.accelerator.gather_for_metrics(torch.tensor(targets.numel(), device=logits.device))
                entropy = self.accelerator.gather_for_metrics(entropy_from_logits(logits).mean()).mean().item()
            self._metrics[mode]["mean_token_accuracy"].append(correct.sum().item() / max(count.sum().item(), 1))
            self._metrics[mode]["entropy"].append(entropy)
            if mode == "train":
                tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(
                    inputs["input_ids"].numel(), device=logits.device)
                self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

    return CompletionOnlySFTTrainer


def base_for_training(path: str, trust_remote_code: bool, lora_cfg: LoraConfig, attn: str,
                      checkpointing: bool, dtype: str = "float32"):
    """The base model to put the adapter on (or to train whole, method full): its weights in ``dtype``
    (``frozen_dtype``: "float32" or "bfloat16") for lora/dora/full, or 4-bit (``tasks.base_model.load_4bit``) run
    through peft's ``prepare_model_for_kbit_training`` for qlora (input gradients on, gradient checkpointing as
    ``checkpointing``), after which the weights it left unquantized (embeddings, norms, LM head), which it
    upcasts to float32, are cast to ``dtype``."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if lora_cfg.method != "qlora":
        return load_model(path, trust_remote_code, dtype=torch_dtype, attn_implementation=attn)
    from peft import prepare_model_for_kbit_training

    model = load_4bit(path, lora_cfg, trust_remote_code, attn_implementation=attn)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():  # all frozen here; the 4-bit weights are uint8 (Params4bit)
        if param.is_floating_point() and param.dtype != torch_dtype:
            param.data = param.data.to(torch_dtype)
    return model


def peft_config(lora_cfg: LoraConfig):
    """The ``peft.LoraConfig`` for ``lora_cfg`` (``use_dora`` for method dora); None for full fine-tuning."""
    import peft

    if lora_cfg.method == "full":
        return None

    return peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout,
                           target_modules=lora_cfg.target_modules, use_dora=lora_cfg.method == "dora",
                           task_type="CAUSAL_LM")


def gradient_checkpointing(lora_cfg: LoraConfig, cfg: TrainConfig) -> bool:
    """Resolve ``train.gradient_checkpointing``: ``"auto"`` is on for qlora (its point is memory), else off."""
    return lora_cfg.method == "qlora" if cfg.gradient_checkpointing == "auto" else cfg.gradient_checkpointing


def num_processes(setting) -> int:
    """Resolve ``train.num_processes``: ``"auto"`` is the number of visible GPUs (at least 1).

    Raises:
        ValueError: more processes than visible GPUs asked for on a GPU machine (CPU processes are not limited).
    """
    import torch

    gpus = torch.cuda.device_count()
    if setting == "auto":
        return max(gpus, 1)
    if gpus and setting > gpus:
        raise ConfigError(f"train.num_processes={setting} but only {gpus} GPUs are visible (one process per GPU)")
    return setting


def peak_memory_bytes(device) -> int:
    """Peak memory of this process so far, in bytes: ``torch.cuda.max_memory_allocated`` on a GPU, the peak
    resident set size (``ru_maxrss``, KiB on Linux) on a CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def launch_processes(processes: int, base_model: str, splits: SplitResult, model_cfg: ModelConfig, lora_cfg: LoraConfig,
                     cfg: TrainConfig, out_dir: str | Path, checkpoint_dir: str | Path) -> TrainResult:
    """Run :func:`train` in ``processes`` data-parallel processes (``torchrun --standalone``, one per GPU; on a
    CPU, gloo) and return what rank 0 published in ``out_dir/train.json``. Progress callbacks stay in this
    process and are not forwarded.

    Raises:
        RuntimeError: a training process failed (its exit status; its output went to this process's stderr).
    """
    latest_complete_checkpoint(checkpoint_dir)  # drop broken checkpoints once, before the processes look
    request = {"base_model": base_model, "splits": splits.model_dump(), "model": model_cfg.model_dump(),
               "lora": lora_cfg.model_dump(), "train": cfg.model_dump(), "out_dir": str(out_dir),
               "checkpoint_dir": str(checkpoint_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        request_file = Path(tmp) / "train-request.json"
        request_file.write_text(json.dumps(request))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "tasks.stages.train", str(request_file)]
        log.info("train: %d processes: %s", processes, " ".join(command))
        root = str(Path(__file__).resolve().parents[2])
        env = {"OMP_NUM_THREADS": str(max((os.cpu_count() or 1) // processes, 1)),  # torchrun's default: 1
               **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, cwd=root, env=env)
    if done.returncode:
        raise RuntimeError(f"train: torchrun with {processes} processes exited with status {done.returncode}")
    return TrainResult.model_validate(read_json(Path(out_dir) / "train.json"))


if __name__ == "__main__":  # one torchrun process of launch_processes
    job = read_json(sys.argv[1])
    train(job["base_model"], SplitResult.model_validate(job["splits"]), ModelConfig(**job["model"]),
          LoraConfig(**job["lora"]), TrainConfig(**job["train"]), job["out_dir"], job["checkpoint_dir"])
