from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig, get_peft_model
from safetensors.torch import load_file

from configs.schema import MergeConfig
from tasks.base_model import load_model
from tasks.stages.merge import MergeCheckError, merge


def test_merged_model_is_standalone_and_matches_base_plus_adapter(tmp_path, tiny_trained):
    test_file = tiny_trained["splits"].files["test"]
    result = merge(tiny_trained["base"], tiny_trained["trained"].adapter, test_file, MergeConfig(),
                   tmp_path / "merged")
    out = Path(result.merged)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert 0 <= result.max_abs_logit_diff <= 1e-3
    assert result.max_abs_weight_diff > 0
    merged, base = load_model(str(out)), load_model(tiny_trained["base"])
    ids = torch.tensor([[1, 5, 6, 7]])
    assert not torch.allclose(merged(ids).logits, base(ids).logits)


def test_an_adapter_that_changes_nothing_is_refused_and_nothing_is_written(tmp_path, tiny_trained):
    untrained = tmp_path / "untrained"
    model = get_peft_model(load_model(tiny_trained["base"]),
                           PeftLoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(untrained)  # lora_B is initialised to zero: the adapter is a no-op
    (untrained / "tokenizer.json").write_bytes((Path(tiny_trained["base"]) / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        src = Path(tiny_trained["base"]) / name
        if src.exists():
            (untrained / name).write_bytes(src.read_bytes())
    with pytest.raises(MergeCheckError, match="adapter changed nothing"):
        merge(tiny_trained["base"], str(untrained), tiny_trained["splits"].files["test"], MergeConfig(),
              tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged.tmp-*"))


def test_a_logit_mismatch_beyond_tolerance_fails(tmp_path, tiny_trained, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    real = BaseTuner.merge_and_unload

    def corrupt(self, *a, **kw):
        merged = real(self, *a, **kw)
        with torch.no_grad():
            merged.model.layers[0].mlp.down_proj.weight.add_(0.5)
        return merged

    monkeypatch.setattr(BaseTuner, "merge_and_unload", corrupt)
    with pytest.raises(MergeCheckError, match="merged logits differ"):
        merge(tiny_trained["base"], tiny_trained["trained"].adapter, tiny_trained["splits"].files["test"],
              MergeConfig(), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
