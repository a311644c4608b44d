"""QLoRA, DoRA and full fine-tuning on the tiny model (CPU: bitsandbytes 4-bit works there), and their merges."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs.schema import MergeConfig
from tasks.base_model import load_4bit, load_model
from tasks.stages.merge import MergeCheckError, merge
from tasks.stages.train import train


def train_with(tiny_trained, out: Path, lora: dict, **train_settings) -> dict:
    cfg = tiny_trained["cfg"]
    return train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora.model_copy(update=lora),
                 cfg.train.model_copy(update={"num_train_epochs": 1, **train_settings}), out / "adapter",
                 out / "checkpoints")


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, tiny_trained) -> dict:
    out = tmp_path_factory.mktemp("qlora")
    trained = train_with(tiny_trained, out, {"method": "qlora"})
    test = tiny_trained["splits"].files["test"]
    merged = merge(tiny_trained["base"], trained.adapter, test, MergeConfig(min_qlora_top1_agreement=0), out / "m")
    return {"out": out, "trained": trained, "merged": merged, "test": test}


def test_the_4bit_base_is_nf4_with_double_quantization_and_bf16_compute(tiny_trained):
    from bitsandbytes.nn import Linear4bit

    model = load_4bit(tiny_trained["base"], tiny_trained["cfg"].lora.model_copy(update={"method": "qlora"}))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit)
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantization
    assert layer.compute_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # not quantized


def test_qlora_trains_an_adapter_with_gradient_checkpointing(qlora):
    trained = qlora["trained"]
    assert trained.method == "qlora" and trained.gradient_checkpointing is True
    assert trained.bnb_4bit == {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                   "bnb_4bit_compute_dtype": "bfloat16"}
    weights = load_file(Path(trained.adapter) / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # it learned
    losses = [h["loss"] for h in json.loads((Path(trained.adapter) / "train_log.json").read_text()) if "loss" in h]
    assert losses[-1] < losses[0]


def test_qlora_merges_into_a_float32_reload_of_the_base(qlora, tiny_trained):
    merged = qlora["merged"]
    model, base = load_model(merged.merged), load_model(tiny_trained["base"])
    config = json.loads((Path(merged.merged) / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the merged weight is the float32 base weight + scale·B·A exactly (a merge into 4-bit weights would carry
    # the 4-bit rounding error, ~1e-2 here, instead)
    adapter = load_file(Path(qlora["trained"].adapter) / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    scale = tiny_trained["cfg"].lora.lora_alpha / tiny_trained["cfg"].lora.r
    expected = base.model.layers[0].self_attn.q_proj.weight + scale * (b.float() @ a.float())
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)


def test_qlora_merge_reports_its_difference_from_the_4bit_model(qlora):
    report = qlora["merged"].qlora_vs_4bit
    assert qlora["merged"].method == "qlora"
    assert report["positions"] > 0 and 0 < report["mean_abs_logit_diff"] <= report["max_abs_logit_diff"]
    assert 0 <= report["top1_agreement"] <= 1
    print("tiny model, merged float32 vs adapter on 4-bit:", report)


def test_qlora_merge_refuses_below_the_agreement_threshold(qlora, tiny_trained, tmp_path, monkeypatch):
    import tasks.stages.merge

    measured = tasks.stages.merge.compare_with_4bit
    calls = []

    def half_agreement(*args, **kwargs):  # the real comparison, then a merge that agrees on half the positions
        calls.append(measured(*args, **kwargs))
        return {**calls[-1], "top1_agreement": 0.5}

    monkeypatch.setattr(tasks.stages.merge, "compare_with_4bit", half_agreement)
    with pytest.raises(MergeCheckError, match=r"50.0% of the answer positions < merge.min_qlora_top1_agreement=90%"):
        merge(tiny_trained["base"], qlora["trained"].adapter, qlora["test"], MergeConfig(), tmp_path / "m")
    assert calls and not (tmp_path / "m").exists()


def test_dora_trains_and_merges(tiny_trained, tmp_path):
    trained = train_with(tiny_trained, tmp_path, {"method": "dora"})
    config = json.loads((Path(trained.adapter) / "adapter_config.json").read_text())
    assert config["use_dora"] is True and trained.method == "dora"
    weights = load_file(Path(trained.adapter) / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)  # DoRA's learned magnitude
    merged = merge(tiny_trained["base"], trained.adapter, tiny_trained["splits"].files["test"], MergeConfig(),
                   tmp_path / "merged")
    assert merged.max_abs_weight_diff > 0 and merged.qlora_vs_4bit is None


def test_full_fine_tuning_trains_every_weight_and_the_merge_is_a_checked_copy(tiny_trained, tmp_path):
    trained = train_with(tiny_trained, tmp_path, {"method": "full"}, learning_rate=1e-3)
    folder = Path(trained.adapter)
    assert trained.method == "full" and not (folder / "adapter_config.json").exists()
    weights, base = load_file(folder / "model.safetensors"), load_model(tiny_trained["base"])
    changed = {name for name, p in base.named_parameters() if not torch.equal(weights[name], p.detach())}
    assert changed == {name for name, _ in base.named_parameters()}  # every weight trained, not only adapters
    merged = merge(tiny_trained["base"], trained.adapter, tiny_trained["splits"].files["validation"], MergeConfig(),
                   tmp_path / "merged")
    assert merged.method == "full" and merged.max_abs_weight_diff > 0 and merged.max_abs_logit_diff == 0
    published = load_file(Path(merged.merged) / "model.safetensors")
    assert published.keys() == weights.keys() and all(torch.equal(published[k], weights[k]) for k in weights)
    assert not (Path(merged.merged) / "train.json").exists()  # the model and tokenizer only


def test_the_full_fine_tuning_merge_refuses_an_unchanged_model(tiny_trained, tmp_path):
    import shutil

    untrained = tmp_path / "untrained"
    shutil.copytree(tiny_trained["base"], untrained)
    (untrained / "train.json").write_text(json.dumps({"method": "full"}))
    with pytest.raises(MergeCheckError, match="training changed nothing"):
        merge(tiny_trained["base"], str(untrained), tiny_trained["splits"].files["validation"], MergeConfig(),
              tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_full_fine_tuning_cannot_export_as_an_adapter():
    from configs.schema import ConfigError, load_config

    with pytest.raises(ConfigError, match="genai-int4-adapter needs lora.method lora \\(got 'full'"):
        load_config(None, ["lora.method=full"])
    assert load_config(None, ["lora.method=full", "export.targets=[genai-int4]"]).lora.method == "full"


def test_two_training_processes_share_the_batches(tiny_trained, tmp_path):
    # what the train task does when it sees two GPUs (torchrun, data parallel), here on CPU with gloo
    one = train_with(tiny_trained, tmp_path / "one", {})
    two = train_with(tiny_trained, tmp_path / "two", {}, num_processes=2)
    assert (one.processes, two.processes) == (1, 2)
    assert one.steps == 5 and two.steps == 3  # 38 rows: batches of 8, then 2 × 8 per step
    assert two.train_tokens > 0 and two.eval_loss is not None
    assert (Path(two.adapter) / "adapter_model.safetensors").is_file()
    assert json.loads((Path(two.adapter) / "train.json").read_text()) == two.model_dump(mode="json")
