import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from configs.schema import TrainConfig
from tasks.base_model import load_tokenizer
from tasks.common.chat import to_prompt_completion, tokenize_with_completion_mask
from tasks.common.files import read_jsonl
from tasks.stages.train import train


def test_training_writes_a_lora_adapter_and_reports_figures(tiny_trained):
    result = tiny_trained["trained"]
    adapter = Path(result.adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # B starts at 0: it learned
    assert (adapter / "tokenizer.json").is_file()
    assert result.steps == 15 and result.train_tokens > 0 and result.tokens_per_second > 0
    log = json.loads((adapter / "train_log.json").read_text())
    assert json.loads((adapter / "train.json").read_text()) == result.model_dump(mode="json")
    losses = [h["loss"] for h in log if "loss" in h]
    assert losses[-1] < losses[0]
    eval_losses = [h["eval_loss"] for h in log if "eval_loss" in h]
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0]  # one validation pass per epoch
    assert result.eval_loss == eval_losses[-1]
    assert (adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn once, here
    kept = sorted(p.name for p in (tiny_trained["run"] / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-12", "checkpoint-15"]  # every 4 steps + the last, save_total_limit=2


def test_the_trainer_logs_its_curves_to_tensorboard_in_the_adapter_folder(tiny_trained):
    """``train.report_to: [tensorboard]`` (the default): the published adapter holds the trainer's TensorBoard
    events, read back with TensorBoard's own reader: train loss at every logging step and, at every evaluation,
    validation loss and the generated validation accuracy, equal to ``train_log.json``."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    adapter = Path(tiny_trained["trained"].adapter)
    runs = EventMultiplexer().AddRunsFromDirectory(str(adapter / "tensorboard"))
    runs.Reload()
    [run] = runs.Runs()
    scalars = {tag: [(e.step, e.value) for e in runs.Scalars(run, tag)] for tag in runs.Runs()[run]["scalars"]}
    log = json.loads((adapter / "train_log.json").read_text())
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("eval/accuracy", "eval_accuracy")):
        expected = [(h["step"], h[key]) for h in log if key in h]
        assert len(expected) >= 3 and [s for s, _ in scalars[tag]] == [s for s, _ in expected], tag
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(scalars[tag], expected)), tag


def test_prompt_completion_rows_split_off_the_answer():
    ds = to_prompt_completion([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}], "label": None}])
    assert ds[0]["prompt"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert ds[0]["completion"] == [{"role": "assistant", "content": "a"}]


def test_prompt_ids_are_the_token_ids_of_the_rendered_prompt(tiny_model_dir):
    """transformers 5's apply_chat_template returns a BatchEncoding (len() 2) unless return_dict=False."""
    from tasks.common.chat import prompt_ids

    tok = load_tokenizer(tiny_model_dir)
    record = _records([(4, 1)])[0]
    text = tok.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
    ids = prompt_ids(tok, record)
    assert ids == tok(text, add_special_tokens=False).input_ids and len(ids) > 2


def test_trls_prepared_rows_train_on_the_answers_only(tiny_trained, tmp_path):
    """TRL >= 1.0 folds the completion mask into a ``labels`` column while preparing the data and drops
    ``completion_mask``; the padding-free collator takes those labels (one reading ``completion_mask`` would train
    on every prompt token). Every target span of a real training batch is an answer and its end-of-turn token."""
    from tasks.base_model import load_model
    from tasks.stages.train import make_trainer, resolve_settings, sequence_lengths

    cfg = tiny_trained["cfg"]
    settings = resolve_settings(cfg.model, cfg.lora, cfg.train, 1)
    tok = load_tokenizer(tiny_trained["base"])
    tok.padding_side = "right"
    records, _ = sequence_lengths(tok, tiny_trained["splits"].files, cfg.train)
    trainer = make_trainer(load_model(tiny_trained["base"], attn_implementation="sdpa"), tok, records, cfg.lora,
                           cfg.train, settings, tmp_path, None)
    assert settings.collator == "padding-free" and "completion_mask" not in trainer.train_dataset.column_names
    batch = next(iter(trainer.get_train_dataloader()))
    answers = {r["messages"][-1]["content"] + "<|im_end|>\n" for r in records["train"]}
    spans = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = (labels != -100).int().tolist()
        starts = [i for i, k in enumerate(kept) if k and (i == 0 or not kept[i - 1])]
        spans += [tok.decode(ids[s:s + next((j for j, k in enumerate(kept[s:]) if not k), len(kept) - s)])
                  for s in starts]
    assert len(spans) == cfg.train.per_device_train_batch_size and set(spans) <= answers


def test_completion_mask_covers_exactly_the_answer_and_its_end_token(tiny_trained):
    tok = load_tokenizer(tiny_trained["base"])
    record = read_jsonl(tiny_trained["splits"].files["test"])[0]
    (ids, prompt_len), = tokenize_with_completion_mask(tok, [record])
    completion = tok.decode(ids[prompt_len:])
    assert completion == record["messages"][-1]["content"] + "<|im_end|>\n"
    assert tok.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")


def test_training_resumes_from_the_latest_checkpoint_and_matches_an_uninterrupted_run(tmp_path, tiny_trained):
    cfg = tiny_trained["cfg"]
    train_cfg = cfg.train.model_copy(update={"group_by_length": False})  # see the note in tasks/stages/train.py
    full_run, resumed_run = tmp_path / "full", tmp_path / "resumed"
    full = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora, train_cfg,
                 full_run / "adapter", full_run / "checkpoints")
    (resumed_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "checkpoint-12", resumed_run / "checkpoints" / "checkpoint-12")
    resumed = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora, train_cfg,
                    resumed_run / "adapter", resumed_run / "checkpoints")
    assert full.resumed_from is None and resumed.resumed_from.endswith("checkpoint-12")
    assert resumed.steps == full.steps == 15
    a = load_file(Path(full.adapter) / "adapter_model.safetensors")
    b = load_file(Path(resumed.adapter) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


def test_a_checkpoint_cut_off_while_saving_is_skipped_and_removed(tmp_path):
    from tasks.stages.train import latest_complete_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    path, state = latest_complete_checkpoint(tmp_path)
    assert path == str(tmp_path / "checkpoint-5") and state == {"global_step": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    assert latest_complete_checkpoint(tmp_path / "missing") == (None, {})


def _records(lengths: list[tuple[int, int]]) -> list[dict]:
    """Chat records whose prompt/answer have about the given numbers of words."""
    return [{"messages": [{"role": "user", "content": " ".join(["apple"] * p)},
                          {"role": "assistant", "content": " ".join(["plum"] * a)}], "label": None}
            for p, a in lengths]


def test_overlength_examples_are_counted_then_dropped_or_truncated(tiny_model_dir):
    from tasks.stages.train import fit_to_length

    tok = load_tokenizer(tiny_model_dir)
    records = _records([(2, 2), (2, 100), (3, 3), (150, 2)])  # short, long answer, short, prompt alone too long
    sizes = [len(ids) for ids, _ in tokenize_with_completion_mask(tok, records)]
    limit = 80
    assert sizes[0] < limit and sizes[2] < limit and sizes[1] > limit and sizes[3] > limit
    kept, counts = fit_to_length(tok, records, limit, "drop")
    assert kept == [records[0], records[2]]
    assert counts == {"examples": 4, "over_max_seq_length": 2, "dropped": 2, "truncated": 0, "longest": max(sizes)}
    kept, counts = fit_to_length(tok, records, limit, "truncate")
    assert kept == records[:3]  # the answer of row 2 is cut; row 4 would have no answer token left: dropped
    assert counts["dropped"] == 1 and counts["truncated"] == 1


def test_training_reports_overlength_and_refuses_when_nothing_fits(tmp_path, tiny_trained):
    cfg = tiny_trained["cfg"]
    splits = tiny_trained["splits"]
    short = cfg.train.model_copy(update={"max_seq_length": 8})
    with pytest.raises(ValueError, match=r"train\.jsonl: all \d+ train examples are longer than "
                                         r"train.max_seq_length=8"):
        train(tiny_trained["base"], splits, cfg.model, cfg.lora, short, tmp_path / "a", tmp_path / "c")
    assert not (tmp_path / "a").exists()
    lengths = tiny_trained["trained"].sequence_lengths
    assert lengths["max_seq_length"] == 64 and lengths["overlength"] == "drop"
    assert lengths["train"]["examples"] == len(read_jsonl(splits.files["train"]))
    assert lengths["train"]["over_max_seq_length"] == 0 and lengths["train"]["longest"] <= 64


def test_early_stopping_stops_and_publishes_the_best_checkpoint(tmp_path, tiny_trained):
    cfg = tiny_trained["cfg"]
    # every evaluation after the first must beat the best by 100 nats to count: patience 2 stops at step 3
    stop = cfg.train.model_copy(update={"eval_steps": 1, "save_steps": 1, "early_stopping_patience": 2,
                                        "early_stopping_min_delta": 100.0, "save_total_limit": 1})
    result = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora, stop, tmp_path / "adapter",
                   tmp_path / "checkpoints")
    log = json.loads((tmp_path / "adapter" / "train_log.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in log if "eval_loss" in h}
    assert result.steps == 3 and result.stopped_early and sorted(evals) == [1, 2, 3]
    best_step = min(evals, key=evals.get)
    assert result.best_checkpoint == f"checkpoint-{best_step}" and result.eval_loss == evals[best_step]
    published = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    best = load_file(tmp_path / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert all((published[k] - best[k]).abs().max() == 0 for k in best)


def test_validation_accuracy_is_answered_at_every_evaluation_and_can_choose_the_checkpoint(tmp_path, tiny_trained):
    from peft import PeftModel

    from tasks.base_model import load_model, load_tokenizer
    from tasks.common.chat import answer_ids, generate_constrained, prompt_ids
    from tasks.common.labels import LabelTree, label_set
    from tasks.common.metrics import classification_metrics

    cfg = tiny_trained["cfg"]
    best = cfg.train.model_copy(update={"eval_steps": 4, "save_steps": 4, "load_best_model_at_end": True,
                                        "metric_for_best_model": "eval_accuracy", "save_total_limit": 5})
    result = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora, best, tmp_path / "adapter",
                   tmp_path / "checkpoints")
    log = json.loads((tmp_path / "adapter" / "train_log.json").read_text())
    evals = {h["step"]: h for h in log if "eval_loss" in h}
    assert len(evals) >= 3 and all({"eval_accuracy", "eval_macro_f1"} <= h.keys() for h in evals.values())
    best_step = int(result.best_checkpoint.rsplit("-", 1)[1])
    assert evals[best_step]["eval_accuracy"] == max(h["eval_accuracy"] for h in evals.values())
    assert result.metric_for_best_model == "eval_accuracy"
    assert result.validation == {"accuracy": evals[best_step]["eval_accuracy"],
                                 "macro_f1": evals[best_step]["eval_macro_f1"]}
    assert result.eval_loss == evals[best_step]["eval_loss"]
    # it is the evaluation's accuracy of the published adapter: the same greedy answers on the validation rows,
    # along the train split's label tree (every answer a label), as the evaluation answers by default
    records = read_jsonl(tiny_trained["splits"].files["validation"])
    tok = load_tokenizer(tiny_trained["base"])
    model = PeftModel.from_pretrained(load_model(tiny_trained["base"], attn_implementation=result.attn_implementation),
                                      tmp_path / "adapter").eval()
    labels = label_set(read_jsonl(tiny_trained["splits"].files["train"]))
    references = [r["messages"][-1]["content"] for r in records]
    answers = generate_constrained(model, tok, [prompt_ids(tok, r) for r in records],
                                   LabelTree.build(answer_ids(tok, labels)), best.per_device_eval_batch_size)
    assert set(answers) <= set(labels)
    assert classification_metrics(answers, references)["accuracy"] == result.validation["accuracy"]


def test_validation_falls_back_to_free_answers_when_labels_cannot_be_told_apart(tiny_trained, monkeypatch, caplog):
    """A chat template that ends no answer with the end-of-sequence token makes one label's answer tokens a prefix
    of another's (``LabelTreeError``): validation then generates free-running answers, with a warning, instead of
    failing the training run."""
    import tasks.common.chat as chat
    from tasks.base_model import load_model
    from tasks.stages.train import validation_scorer

    cfg = tiny_trained["cfg"]
    records = read_jsonl(tiny_trained["splits"].files["validation"])
    tok = load_tokenizer(tiny_trained["base"])
    monkeypatch.setattr(chat, "answer_ids", lambda tokenizer, labels: {label: [5, 6][: i + 1]
                                                                        for i, label in enumerate(labels[:2])})
    scorer = validation_scorer(tok, records, cfg.train, False, ["fruit", "fruit_salad"])
    assert "generated free-running" in caplog.text
    scores = scorer(load_model(tiny_trained["base"]).eval())
    assert set(scores) == {"accuracy", "macro_f1"} and 0 <= scores["accuracy"] <= 1


def test_the_published_adapter_is_evaluated_at_the_last_step(tmp_path, tiny_trained):
    cfg = tiny_trained["cfg"]
    result = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora,
                   cfg.train.model_copy(update={"eval_steps": 4, "save_steps": 4}), tmp_path / "adapter",
                   tmp_path / "checkpoints")
    log = json.loads((tmp_path / "adapter" / "train_log.json").read_text())
    evals = [h for h in log if "eval_loss" in h]
    assert result.steps % 4 and [h["step"] for h in evals] == [*range(4, result.steps, 4), result.steps]
    assert result.eval_loss == evals[-1]["eval_loss"] and result.validation["accuracy"] == evals[-1]["eval_accuracy"]


def test_packing_fits_several_examples_per_sequence(tmp_path, tiny_trained):
    cfg = tiny_trained["cfg"]
    packed = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora,
                   cfg.train.model_copy(update={"packing": True, "max_seq_length": 200}), tmp_path / "adapter",
                   tmp_path / "checkpoints")
    # the same 3 epochs of the same examples (30-40 tokens each) in fewer, fuller sequences of up to 200 tokens
    assert packed.steps < tiny_trained["trained"].steps
    assert packed.train_tokens == tiny_trained["trained"].train_tokens
    assert packed.train_loss < 6.0  # log(512) = 6.24: it learned something


def test_train_config_fields_named_as_sft_config_pass_through(tmp_path):
    """A TrainConfig field is either SFTConfig's own (same name, same meaning, handed on unchanged unless train
    resolves it first) or declared as not SFTConfig's: a new field cannot be silently dropped."""
    import dataclasses

    from trl import SFTConfig

    from tasks.stages.train import NOT_SFT_CONFIG, RENAMED, RESOLVED, Settings, training_arguments

    sft = {f.name for f in dataclasses.fields(SFTConfig)}
    assert set(TrainConfig.model_fields) - sft - set(RENAMED) == NOT_SFT_CONFIG and RESOLVED <= sft
    assert set(RENAMED.values()) <= sft  # transformers 5's names (the old ones are gone from 5.6 on)
    cfg = TrainConfig(learning_rate=3e-4, num_train_epochs=2.5, max_steps=40, per_device_train_batch_size=3,
                      per_device_eval_batch_size=5, gradient_accumulation_steps=2, lr_scheduler_type="cosine",
                      warmup_ratio=0.1, weight_decay=0.01, logging_steps=7, eval_steps=5, save_steps=10,
                      save_total_limit=3, seed=11, max_seq_length=99)
    settings = Settings(processes=1, bf16=False, attn_implementation="sdpa", gradient_checkpointing=True,
                        liger_kernel=False, frozen_dtype="float32", best_model=True, collator="padding-free")
    args = training_arguments(cfg, settings, tmp_path)
    for name in set(TrainConfig.model_fields) & sft - RESOLVED - set(RENAMED):
        assert getattr(args, name) == getattr(cfg, name), name
    assert (args.max_length, args.completion_only_loss, args.output_dir) == (99, True, str(tmp_path))
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(40) == 4  # a fraction below 1: 10 % of the steps
    assert args.gradient_checkpointing and args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.train_sampling_strategy == "random"  # group_by_length only for padded batches
    padded = training_arguments(cfg, Settings(**{**settings.__dict__, "collator": "padded"}), tmp_path)
    assert padded.train_sampling_strategy == "group_by_length"
    assert not args.padding_free  # our padding-free collator, not TRL's


def test_training_attention_is_eager_on_a_cpu_for_short_rows_and_flash_or_sdpa_elsewhere(monkeypatch):
    """``model.attn_implementation: auto`` for training: eager on a CPU for padding-free rows of at most 512 tokens
    (faster there than SDPA's CPU kernel under the rows' mask, docs/benchmarks.md), SDPA for longer rows (eager
    keeps each layer's (rows, heads, width, width) weights), flash attention on a GPU that has it; a named
    implementation is kept."""
    import importlib.util

    import torch

    from configs.schema import LoraConfig, ModelConfig
    from tasks.base_model import attention_implementation
    from tasks.stages.train import resolve_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [attention_implementation("auto", True, n) for n in (128, 512, 513, None)] == [
        "eager", "eager", "sdpa", "sdpa"]
    assert attention_implementation("sdpa", False, 128) == "sdpa"
    assert resolve_settings(ModelConfig(), LoraConfig(), TrainConfig(max_seq_length=128), 1).attn_implementation \
        == "eager"
    assert resolve_settings(ModelConfig(), LoraConfig(), TrainConfig(max_seq_length=1024), 1).attn_implementation \
        == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    assert attention_implementation("auto", True, 128) == "flash_attention_2"
    assert attention_implementation("auto", False, 128) == "sdpa"


def test_liger_kernels_are_off_unless_asked_for():
    """``train.use_liger_kernel: auto`` is never the slower path measured on a GPU (Liger on: 9,686 tokens/s against
    20,049 off, H200, docs/gpu-check/2026-11-28-h200): off; ``true`` still turns them on."""
    from configs.schema import LoraConfig, ModelConfig
    from tasks.stages.train import liger_kernel, resolve_settings

    assert [liger_kernel(s) for s in ("auto", True, False)] == [False, True, False]
    assert not resolve_settings(ModelConfig(), LoraConfig(), TrainConfig(), 1).liger_kernel


def test_frozen_base_weights_are_bf16_on_a_gpu_under_bf16_and_float32_elsewhere():
    """``train.frozen_dtype: auto``: bf16 frozen weights only where autocast already computes in bf16 on a GPU (no
    float32 copy, no cast per matmul); the measured CPU path keeps float32; full fine-tuning trains every weight
    and keeps float32 master weights whatever is asked."""
    from tasks.stages.train import frozen_dtype

    assert frozen_dtype("auto", "lora", True, "cuda") == "bfloat16"
    assert frozen_dtype("auto", "qlora", True, "cuda") == "bfloat16"
    assert frozen_dtype("auto", "lora", False, "cuda") == "float32"
    assert frozen_dtype("auto", "lora", True, "cpu") == "float32"
    assert frozen_dtype("bfloat16", "dora", False, "cpu") == "bfloat16"
    assert frozen_dtype("float32", "lora", True, "cuda") == "float32"
    assert frozen_dtype("bfloat16", "full", True, "cuda") == "float32"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_bf16_frozen_base_keeps_no_float32_weight_but_the_adapters(tiny_trained, method):
    """With ``frozen_dtype: bfloat16`` no frozen weight is float32 after the adapter is added — for QLoRA also not the
    embedding and LM head that peft's ``prepare_model_for_kbit_training`` upcasts (the old behaviour: float32, 2 ×
    2.1 GB on Llama-3.1-8B) — while the trainable LoRA weights stay float32."""
    import peft
    import torch

    from tasks.stages.train import base_for_training, peft_config

    lora_cfg = tiny_trained["cfg"].lora.model_copy(update={"method": method})
    model = base_for_training(tiny_trained["base"], False, lora_cfg, "sdpa", method == "qlora", "bfloat16")
    model = peft.get_peft_model(model, peft_config(lora_cfg))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    if method == "qlora":
        assert any(p.dtype == torch.uint8 for p in model.parameters())  # the 4-bit weights, packed
