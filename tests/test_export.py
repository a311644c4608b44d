from pathlib import Path

import onnxruntime
import pytest

from configs.schema import ExportConfig, MergeConfig
from tasks import export
from tasks.export import ExportCheckError, export_onnx
from tasks.merge import merge


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, tiny_trained) -> str:
    out = tmp_path_factory.mktemp("export") / "merged"
    return merge(tiny_trained["base"], tiny_trained["trained"]["adapter"],
                 tiny_trained["splits"]["files"]["test"], MergeConfig(), out)["merged"]


def test_onnx_export_with_kv_cache_agrees_with_pytorch(tmp_path, merged_dir, tiny_trained):
    result = export_onnx(merged_dir, tiny_trained["splits"]["files"]["test"],
                         ExportConfig(n_check_prompts=3, max_new_tokens=6), tmp_path / "onnx")
    assert result["greedy_agreement"] == 1.0 and result["n_prompts"] == 3
    onnx_file = Path(result["onnx"]) / "model.onnx"
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    assert "past_key_values.0.key" in inputs  # decoder with KV cache
    assert (Path(result["onnx"]) / "tokenizer.json").is_file()


def test_disagreeing_export_fails_the_gate_and_publishes_nothing(tmp_path, merged_dir, tiny_trained, monkeypatch):
    real = export._greedy

    def onnx_answers_differently(model, tokenizer, prompt, n):
        out = real(model, tokenizer, prompt, n)
        return out + [0] if type(model).__name__ == "ORTModelForCausalLM" else out

    monkeypatch.setattr(export, "_greedy", onnx_answers_differently)
    with pytest.raises(ExportCheckError, match="agree on 0/2 prompts"):
        export_onnx(merged_dir, tiny_trained["splits"]["files"]["test"],
                    ExportConfig(n_check_prompts=2, max_new_tokens=4), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    assert not list(tmp_path.glob(".onnx.tmp-*"))
