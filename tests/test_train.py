import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.evaluate import tokenize_with_completion_mask
from tasks.base_model import load_tokenizer
from tasks.files import read_jsonl
from tasks.train import to_prompt_completion, train


def test_training_writes_a_lora_adapter_and_reports_figures(tiny_trained):
    result = tiny_trained["trained"]
    adapter = Path(result["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # B starts at 0: it learned
    assert (adapter / "tokenizer.json").is_file()
    assert result["steps"] == 15 and result["train_tokens"] > 0 and result["tokens_per_second"] > 0
    log = json.loads((adapter / "train_log.json").read_text())
    assert json.loads((adapter / "train.json").read_text()) == result
    losses = [h["loss"] for h in log if "loss" in h]
    assert losses[-1] < losses[0]
    eval_losses = [h["eval_loss"] for h in log if "eval_loss" in h]
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0]  # one validation pass per epoch
    assert result["eval_loss"] == eval_losses[-1]
    kept = sorted(p.name for p in (tiny_trained["run"] / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-12", "checkpoint-15"]  # every 4 steps + the last, save_total_limit=2


def test_prompt_completion_rows_split_off_the_answer():
    ds = to_prompt_completion([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                             {"role": "assistant", "content": "a"}], "label": None}])
    assert ds[0]["prompt"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert ds[0]["completion"] == [{"role": "assistant", "content": "a"}]


def test_completion_mask_covers_exactly_the_answer_and_its_end_token(tiny_trained):
    tok = load_tokenizer(tiny_trained["base"])
    record = read_jsonl(tiny_trained["splits"]["files"]["test"])[0]
    (ids, prompt_len), = tokenize_with_completion_mask(tok, [record])
    completion = tok.decode(ids[prompt_len:])
    assert completion == record["messages"][-1]["content"] + "<|im_end|>\n"
    assert tok.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")


def test_training_resumes_from_the_latest_checkpoint_and_matches_an_uninterrupted_run(tmp_path, tiny_trained):
    cfg = tiny_trained["cfg"]
    train_cfg = cfg.train.model_copy(update={"group_by_length": False})  # see the note in tasks/train.py
    full_run, resumed_run = tmp_path / "full", tmp_path / "resumed"
    full = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora, train_cfg,
                 full_run / "adapter", full_run / "checkpoints")
    (resumed_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "checkpoint-12", resumed_run / "checkpoints" / "checkpoint-12")
    resumed = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora, train_cfg,
                    resumed_run / "adapter", resumed_run / "checkpoints")
    assert full["resumed_from"] is None and resumed["resumed_from"].endswith("checkpoint-12")
    assert resumed["steps"] == full["steps"] == 15
    a = load_file(Path(full["adapter"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


def test_a_checkpoint_cut_off_while_saving_is_skipped_and_removed(tmp_path):
    from tasks.train import latest_complete_checkpoint

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
