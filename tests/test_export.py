"""Export targets on the tiny model: what each folder holds, the gate passing a good export, and the gate
failing corrupted ones (weights, chat template, tokenizer) without publishing anything."""
import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from configs.schema import ConfigError, ExportConfig
from tasks.deploy import export
from tasks.deploy.builders import genai
from tasks.deploy.export import ExportCheckError, check_export
from tasks.deploy.formats.tokenizer import portable_tokenizer
from tasks.common.files import read_jsonl
from tasks.deploy.runtime.predict import Predictor

CFG = ExportConfig(n_check_prompts=3, max_new_tokens=6)  # the tiny config's, as tiny_int4 was exported with


def run_check(merged: dict, folder, cfg: ExportConfig = CFG) -> dict:
    return check_export("genai-int4", folder, merged["merged"], merged["test"], merged["eval"], cfg)


def run_export(merged: dict, target: str, out: Path, cfg: ExportConfig = CFG) -> dict:
    return export.export(target, merged["merged"], merged["test"], merged["eval"], merged["inference"], cfg, out)


def test_genai_int4_export_is_self_contained_int4_and_passes_the_gate(tiny_int4, tiny_merged):
    folder = Path(tiny_int4.path)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
                 "inference.json", "export.json"):
        assert (folder / name).is_file(), name
    ops = collections.Counter(n.op_type for n in onnx.load(folder / "model.onnx", load_external_data=False).graph.node)
    assert ops["MatMulNBits"] > 0 and ops["MatMul"] == 0  # every linear layer quantized
    assert genai.logits_positions(folder / "model.onnx") == 1  # the LM head runs on the last position only
    assert json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"] == 2
    assert tiny_int4.tokenizer_mismatches == 0 and tiny_int4.greedy_agreement == 1.0
    assert tiny_int4.accuracy >= tiny_int4.reference_accuracy - CFG.max_quality_drop
    reference = json.loads(Path(tiny_merged["eval"], "metrics.json").read_text())["accuracy"]
    assert tiny_int4.reference_accuracy == pytest.approx(reference)
    assert json.loads((folder / "export.json").read_text())["accuracy"] == tiny_int4.accuracy


def test_onnx_fp32_export_has_a_kv_cache_and_matches_pytorch_exactly(tmp_path, tiny_merged):
    result = run_export(tiny_merged, "onnx-fp32", tmp_path / "onnx-fp32")
    session = onnxruntime.InferenceSession(str(Path(result.path) / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert "past_key_values.0.key" in {i.name for i in session.get_inputs()}  # decoder with KV cache
    assert not genai.quantized_matmuls(Path(result.path) / "model.onnx")  # fp32: no MatMulNBits
    assert result.greedy_agreement == 1.0 and result.same_answer == 1.0
    assert result.accuracy == result.reference_accuracy
    assert Predictor(result.path)("I want the apple number 3") in {"fruit", "tool", "colour"}  # served alone


def test_the_builders_int4_options_are_read_back_from_the_graph(tiny_merged, tmp_path):
    """onnxruntime-genai 0.18 renamed its int4 options and ignores the old names without a word: the export takes
    the new names, and a graph that does not follow the options it was built with is refused."""
    options = {"algo_config": "k_quant_last", "block_size": 16, "accuracy_level": 4, "is_symmetric": True}
    genai.build_genai_folder(tiny_merged["merged"], tmp_path / "last", "int4", "cpu", False, options)
    nodes = genai.quantized_matmuls(tmp_path / "last" / "model.onnx")
    head = nodes.pop(next(name for name in nodes if name.startswith("/lm_head/")))
    assert head["bits"] == 8 and {a["bits"] for a in nodes.values()} == {4}  # int8 LM head, int4 elsewhere
    assert {a["block_size"] for a in nodes.values()} == {16}  # the builder's default is 32
    old_names = {"int4_algo_config": "k_quant_last", "int4_block_size": 16}  # as onnxruntime-genai 0.11 took them
    genai.build_genai_folder(tiny_merged["merged"], tmp_path / "old", "int4", "cpu", False, old_names)
    with pytest.raises(genai.BuilderOptionsError, match="LM head is 4-bit"):
        genai.check_quantization(tmp_path / "old" / "model.onnx", "int4", options)
    genai.build_genai_folder(tiny_merged["merged"], tmp_path / "full", "fp32", "cpu", False, {"prune_lm_head": "false"})
    with pytest.raises(genai.BuilderOptionsError, match=r"prune_lm_head=true but the logits are \[batch, \w+, vocab"):
        genai.check_quantization(tmp_path / "full" / "model.onnx", "fp32", {"prune_lm_head": "true"})


def _corrupt_copy(exported: dict, tmp_path: Path) -> Path:
    folder = tmp_path / "corrupt"
    shutil.copytree(exported.path, folder)
    return folder


def test_corrupted_weights_fail_the_gate(tiny_int4, tiny_merged, tmp_path):
    folder = _corrupt_copy(tiny_int4, tmp_path)
    _shuffle_scales(folder)
    # constrained to the labels, the broken model still answers one (at the tiny reference's chance accuracy, so
    # the accuracy check may pass): the free greedy tokens against PyTorch's catch it
    with pytest.raises(ExportCheckError, match=r"greedy agreement with PyTorch 0\.00 ") as err:
        run_check(tiny_merged, folder)
    assert "tokenizer" not in str(err.value)


def test_chat_template_mismatch_fails_the_gate(tiny_int4, tiny_merged, tmp_path):
    folder = _corrupt_copy(tiny_int4, tmp_path)
    template = folder / "chat_template.jinja"  # the generation prompt loses its newline: a classic mismatch
    template.write_text(template.read_text().replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant'"))
    with pytest.raises(ExportCheckError, match=r"tokenizer: 12/12 test prompts encode to other token ids"):
        run_check(tiny_merged, folder)


def test_gguf_style_tokenizer_is_made_portable(tiny_int4, tiny_merged, tmp_path):
    """transformers' GGUF conversion writes byte-level BPEs with byte fallback; ORT GenAI then mis-encodes every
    space (the embedded SmolLM2's case). portable_tokenizer restores the ids the training tokenizer gives."""
    folder = _corrupt_copy(tiny_int4, tmp_path)
    tokenizer_json = folder / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [  # as transformers 4.57 converts SmolLM2's GGUF
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, spec["decoder"]]}
    tokenizer_json.write_text(json.dumps(spec))
    messages = [{"role": "user", "content": "I want the apple number 7"}]
    assert -1 in Predictor(folder).prompt_ids(messages)
    portable_tokenizer(tokenizer_json)
    assert run_check(tiny_merged, folder)["tokenizer_mismatches"] == 0


def test_failed_gate_publishes_nothing(tiny_merged, tmp_path, monkeypatch):
    def builds_then_quality_drops(*args, **kwargs):
        raise ExportCheckError("export genai-int4: accuracy below the tiny_merged model's")

    monkeypatch.setattr(export, "check_export", builds_then_quality_drops)
    with pytest.raises(ExportCheckError):
        run_export(tiny_merged, "genai-int4", tmp_path / "genai-int4")
    assert not (tmp_path / "genai-int4").exists() and not list(tmp_path.glob(".genai-int4.tmp-*"))


def test_quality_gate_uses_the_configured_margin(tiny_int4, tiny_merged, monkeypatch):
    reference = json.loads(Path(tiny_merged["eval"], "metrics.json").read_text())["accuracy"]
    assert reference > 0  # the tiny model answers some rows right, so a model that answers none drops below it
    monkeypatch.setattr(export.ExportRunner, "answers", lambda self, prompts, n: ["no idea"] * len(prompts))
    with pytest.raises(ExportCheckError, match=r"accuracy 0\.0000 on 12 test rows is .* below"):
        run_check(tiny_merged, tiny_int4.path)
    lenient = CFG.model_copy(update={"max_quality_drop": 1.0})
    assert run_check(tiny_merged, tiny_int4.path, lenient)["accuracy"] == 0.0


def test_genai_fp16_needs_cuda(tiny_merged, tmp_path):
    with pytest.raises(ConfigError, match="export.targets: fp16 for CUDA needs onnxruntime-genai-cuda and a GPU"):
        run_export(tiny_merged, "genai-fp16", tmp_path / "genai-fp16")
    assert not (tmp_path / "genai-fp16").exists()


def test_export_target_names_are_validated():
    with pytest.raises(ValueError):
        ExportConfig(targets=["genai-int3"])
    assert np.isclose(ExportConfig().max_quality_drop, 0.01)


def _shuffle_scales(folder: Path) -> None:
    """Shuffle every quantization scale of ``folder``'s model: a finite, wrong model."""
    model = onnx.load(folder / "model.onnx")
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if "scale" in init.name:
            init.CopyFrom(numpy_helper.from_array(rng.permutation(numpy_helper.to_array(init).ravel()).reshape(
                init.dims), init.name))
    (folder / "model.onnx.data").unlink()
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data")


def test_ladder_publishes_the_smallest_rung_that_passes(tiny_trained, tiny_merged, tmp_path, monkeypatch):
    """Stops at the first rung that passes; when the int4 rungs come out broken (their scales shuffled after the
    build), records why and publishes the next rung, fp32."""
    m, cfg = tiny_merged, tiny_trained["cfg"].export
    first = export.export("genai-ladder", m["merged"], m["test"], m["eval"], m["inference"], cfg, tmp_path / "a")
    assert [(r["rung"], r["passed"]) for r in first.ladder] == [("int4", True)] and first.precision == "int4"

    build = genai.build_genai_folder

    def broken_int4(model, out, precision, *args):
        build(model, out, precision, *args)
        if precision == "int4":
            _shuffle_scales(out)

    monkeypatch.setattr(export, "build_genai_folder", broken_int4)
    result = export.export("genai-ladder", m["merged"], m["test"], m["eval"], m["inference"], cfg, tmp_path / "b")
    assert [(r["rung"], r["passed"]) for r in result.ladder] == [
        ("int4", False), ("int4-int8-head", False), ("int4-mixed", False), ("fp32", True)]
    assert result.precision == "fp32" and result.greedy_agreement == 1.0 and result.same_answer == 1.0
    assert all("greedy agreement with PyTorch 0.00" in r["failures"][0] for r in result.ladder[:3])
    assert result.ladder[0]["size_mb"] < result.size_mb
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".rung")]
    assert json.loads((tmp_path / "b" / "export.json").read_text())["precision"] == "fp32"


def test_the_builder_shows_a_progress_bar_of_its_layers_and_prints_nothing_else(tiny_model_dir, tmp_path, capfd):
    genai.build_genai_folder(tiny_model_dir, tmp_path / "int4", "int4", "cpu", False, {})
    out, err = capfd.readouterr()
    assert out == ""  # the builder's own lines (every tensor it saves) are not the run's output
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    total = layers + len(genai.BUILDER_STEPS) - 1
    bar = err.split("\r")[-1]
    assert f"{total}/{total}" in bar and "int4 builder: tokenizer files" in bar, err[-500:]
    assert "Reading decoder layer" not in err and "Saving model.embed_tokens" not in err
    assert (tmp_path / "int4" / "model.onnx").is_file()


def test_the_gate_shows_its_progress_over_the_test_rows(tiny_int4, tiny_merged, capfd):
    run_check(tiny_merged, tiny_int4.path)
    rows = len(read_jsonl(tiny_merged["test"]))
    bar = capfd.readouterr().err.split("export gate: test rows")[-1]
    assert f"{rows}/{rows}" in bar
