"""train: LoRA fine-tuning with TRL's SFTTrainer, completion-only loss on the model's chat template."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from configs.schema import LoraConfig, ModelConfig, TrainConfig
from tasks.base_model import load_model, load_tokenizer, use_bf16
from tasks.files import atomic_dir, read_jsonl, write_json

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


def to_prompt_completion(records: list[dict]) -> datasets.Dataset:
    """Conversational prompt/completion rows for TRL: ``prompt`` = every message but the last, ``completion`` =
    ``[last message]``. TRL then masks the prompt tokens out of the loss (completion-only loss)."""
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])


def latest_complete_checkpoint(checkpoint_dir: str | Path) -> tuple[str | None, dict]:
    """The newest ``checkpoint-<step>`` folder that was written completely, and its trainer state.

    The Trainer writes ``trainer_state.json`` last, so a checkpoint without a readable one was cut off (e.g.
    the process was killed while saving); such partial checkpoints are deleted here, so that neither the
    resume nor the checkpoint rotation picks them up.

    Returns:
        ``(path, trainer_state)``, or ``(None, {})`` when there is no complete checkpoint.
    """
    folders = Path(checkpoint_dir).glob("checkpoint-*") if Path(checkpoint_dir).is_dir() else []
    for folder in sorted(folders, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        try:
            return str(folder), json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("train: removing incomplete checkpoint %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return None, {}


def train(base_model: str, splits: dict, model_cfg: ModelConfig, lora_cfg: LoraConfig, cfg: TrainConfig,
          out_dir: str | Path, checkpoint_dir: str | Path, callback_factories: list | None = None) -> dict:
    """Train a LoRA adapter on ``splits["files"]["train"]``, with eval loss on the validation split.

    Checkpoints go to ``checkpoint_dir`` every ``cfg.save_steps`` steps; a run restarted with the same
    ``checkpoint_dir`` resumes from the latest one (optimizer, scheduler, RNG and data position). With
    ``cfg.group_by_length`` (on by default: much less padding) a resume in the middle of an epoch sees a
    different batch order for the rest of that epoch, because transformers' LengthGroupedSampler draws its
    permutation from the global RNG; turn it off for bit-exact resumes. The adapter (safetensors + tokenizer)
    and the trainer's log history (``train_log.json``) are published atomically in ``out_dir``.
    ``callback_factories`` are zero-argument callables returning extra ``transformers.TrainerCallback``
    objects (e.g. progress reporting), called here so that their callers need not import transformers.

    Returns:
        ``{"adapter": path, "train_tokens": non-pad tokens seen, "tokens_per_second": float,
        "wall_seconds": float, "steps": int, "train_loss": float, "eval_loss": float | None, "bf16": bool,
        "resumed_from": checkpoint path | None}``.
    """
    import peft
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(base_model, model_cfg.trust_remote_code)
    tokenizer.padding_side = "right"
    model = load_model(base_model, model_cfg.trust_remote_code)
    files = splits["files"]
    train_ds = to_prompt_completion(read_jsonl(files["train"]))
    eval_ds = to_prompt_completion(read_jsonl(files["validation"]))
    bf16 = use_bf16(cfg.bf16)
    ckpt_dir = Path(checkpoint_dir)
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_seq_length,
        completion_only_loss=True,
        packing=False,
        group_by_length=cfg.group_by_length,
        bf16=bf16,
        fp16=False,
        use_cpu=model.device.type == "cpu",
        eval_strategy="steps" if cfg.eval_steps else "epoch",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        dataloader_num_workers=0,
    )
    lora = peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout,
                           target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=lora,
                         callbacks=[make() for make in callback_factories or []])
    resume, state = latest_complete_checkpoint(ckpt_dir)
    tokens_before = int(state.get("num_input_tokens_seen", 0))
    if resume:
        log.info("train: resuming from %s (step %s)", resume, state.get("global_step"))
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen)
    tokens_this_run = tokens - tokens_before
    result = {
        "adapter": str(out_dir),
        "train_tokens": tokens,
        "tokens_per_second": tokens_this_run / wall if wall > 0 else 0.0,
        "wall_seconds": wall,
        "steps": trainer.state.global_step,
        "train_loss": output.training_loss,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "bf16": bf16,
        "resumed_from": resume,
    }
    with atomic_dir(out_dir) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_log.json", history)
        write_json(tmp / "train.json", result)
    log.info("train: %s", json.dumps(result))
    return result
