"""The ``openvino-npu`` export on the tiny model: its ladder of NPU weight forms, its gate run through the NPU's own
static pipeline (on the CPU here: ``NPUW_DEVICES=CPU``), the prompt window, the tokenizer IRs, refusal of a
tampered folder, and serving it with ``flows.predict``."""
import json
import shutil
from pathlib import Path

import pytest

from configs.schema import ExportConfig
from tasks.common.chat import chat_ids
from tasks.deploy import export
from tasks.deploy.builders import openvino as builder
from tasks.deploy.runtime.openvino import NPUExportError, NPUPredictor, PromptTooLongError, npu_manifest
from tests.conftest import predict_cli, tampered_copy

CFG = ExportConfig(n_check_prompts=3, max_new_tokens=6, targets=["openvino-npu"])


@pytest.fixture(scope="module")
def npu_export(tiny_merged, tmp_path_factory):
    m = tiny_merged
    return export.export("openvino-npu", m["merged"], m["test"], m["eval"], m["inference"], CFG,
                         tmp_path_factory.mktemp("npu") / "openvino-npu")


def test_the_npu_export_climbs_past_a_group_size_the_model_cannot_take_and_passes_its_gate(npu_export):
    """The tiny model's hidden size (64) is not divisible by 128: NNCF refuses int4 per group of 128 (as for
    SmolLM2's 576), the ladder records why and goes on; the rung published passed the gate on every test row."""
    ladder = npu_export.ladder
    assert ladder[0]["rung"] == "int4-g128" and not ladder[0]["passed"]
    assert "group size value 128" in ladder[0]["failures"][0]
    assert ladder[-1]["passed"] and npu_export.precision == ladder[-1]["rung"] != "int4-g128"
    assert npu_export.tokenizer_mismatches == 0 and npu_export.greedy_agreement >= CFG.min_greedy_agreement
    assert npu_export.accuracy >= npu_export.reference_accuracy - CFG.max_quality_drop
    assert npu_export.n_examples == 12 and npu_export.device.startswith("NPU static pipeline on the CPU")
    folder = Path(npu_export.path)
    for name in builder.IR_FILES + ("npu.json", "inference.json", "export.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert not [p for p in folder.iterdir() if p.name.startswith(".rung")]
    assert json.loads((folder / "export.json").read_text())["execution_provider"] == "OpenVINO NPU"


def test_the_npu_pipeline_answers_a_label_and_refuses_a_prompt_over_its_window(npu_export, tiny_merged):
    predictor = NPUPredictor(npu_export.path)
    assert predictor.window == json.loads((Path(npu_export.path) / "npu.json").read_text())["max_prompt_len"]
    labels = set(tiny_merged["inference"]["labels"])
    assert predictor("I want the apple number 3") in labels
    assert predictor(["a nonsense input", "pear 9"]) and set(predictor(["zzz qqq", "pear 9"])) <= labels
    with pytest.raises(PromptTooLongError, match=rf"prompt has {predictor.window + 1} tokens; .* window is "):
        predictor.generate_ids([5] * (predictor.window + 1), 4)


def test_the_tokenizer_irs_encode_as_the_training_tokenizer_even_from_a_gguf_style_tokenizer(tiny_merged, tmp_path):
    """transformers' GGUF conversion (the embedded SmolLM2) writes a SentencePiece-style decoder on a byte-level
    BPE, which openvino_tokenizers cannot convert; the builder rewrites it to the plain form first, and the IRs
    give the training tokenizer's ids."""
    from transformers import AutoTokenizer

    model = tmp_path / "gguf-style"
    shutil.copytree(tiny_merged["merged"], model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, spec["decoder"]]}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "ir"
    builder.build_openvino_folder(str(model), out, "int8")
    (out / "inference.json").write_text(json.dumps(tiny_merged["inference"]))
    (out / "npu.json").write_text(json.dumps(npu_manifest(out, 256)))
    predictor, tokenizer = NPUPredictor(out), AutoTokenizer.from_pretrained(model)
    for text in ("I want the apple number 7", "  two  spaces\nand a newline"):
        messages = [{"role": "user", "content": text}]
        assert predictor.prompt_ids(messages) == chat_ids(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert predictor.decode(ids) == tokenizer.decode(ids).strip()


def test_a_missing_tokenizer_ir_fails_the_build_loudly(tiny_merged, tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "write_tokenizer_irs", lambda tokenizer, out: None)
    with pytest.raises(builder.OpenVINOBuildError, match="lacks openvino_tokenizer.xml, openvino_detokenizer.xml"):
        builder.build_openvino_folder(tiny_merged["merged"], tmp_path / "ir", "int8")


def test_the_data_aware_int4_rung_calibrates_on_train_rows_and_changes_the_weights(tiny_merged, tmp_path):
    """int4-channel-awq is NNCF's AWQ and scale estimation on the given rows: int4 weights on the same grid as
    int4-channel, with other values; without calibration rows it is refused."""
    from tasks.common.files import read_jsonl
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_merged["merged"])
    rows = read_jsonl(Path(tiny_merged["test"]).with_name("train.jsonl"))[:16]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    with pytest.raises(builder.OpenVINOBuildError, match="int4-channel-awq weights need calibration rows"):
        builder.build_openvino_folder(tiny_merged["merged"], tmp_path / "none", "int4-channel-awq")
    builder.build_openvino_folder(tiny_merged["merged"], tmp_path / "awq", "int4-channel-awq", calibration=texts)
    builder.build_openvino_folder(tiny_merged["merged"], tmp_path / "rtn", "int4-channel")
    xml = (tmp_path / "awq" / "openvino_model.xml").read_text()
    assert 'element_type="i4"' in xml or 'element_type="u4"' in xml
    awq, rtn = ((tmp_path / f / "openvino_model.bin").read_bytes() for f in ("awq", "rtn"))
    assert awq != rtn


def test_a_tampered_npu_folder_is_refused_by_the_runtime_and_the_cli(npu_export, tmp_path):
    folder = tampered_copy(npu_export.path, tmp_path / "tampered", "openvino_model.bin")
    with pytest.raises(NPUExportError, match=r"openvino_model.bin: corrupted \(SHA-256"):
        NPUPredictor(folder)
    done = predict_cli("--model", str(folder), "I want the apple number 3")
    assert done.returncode == 1 and "openvino_model.bin: corrupted" in done.stderr


def test_flows_predict_serves_the_npu_folder_and_names_the_device(npu_export, tiny_merged):
    done = predict_cli("--model", npu_export.path, "I want the apple number 3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in tiny_merged["inference"]["labels"]
    assert "NPU static pipeline on the CPU" in done.stderr


def test_a_config_exporting_to_the_npu_without_its_packages_is_refused_before_training(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    from configs.schema import ConfigError
    from tasks.stages import validate
    from tests.conftest import tiny_config, write_classification_dir

    cfg = tiny_config(write_classification_dir(tmp_path / "cls"), tmp_path / "out", tiny_model_dir,
                      export={"targets": ["genai-int4", "openvino-npu"]})
    validate.check_export_packages(cfg)  # installed here (make install)
    monkeypatch.setitem(validate.EXPORT_PACKAGES, "openvino-npu", (("openvino_genai", "no_such_npu_module"),
                                                                   "pip install it"))
    with pytest.raises(ConfigError, match="export.targets: openvino-npu needs no_such_npu_module, .*: pip install"):
        validate.validate(cfg, tiny_model_dir)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def npu_adapter_export(tiny_trained, tiny_merged, tmp_path_factory):
    """The tiny adapter exported as openvino-npu-adapter on an int8 NPU base of the tiny base model."""
    root = tmp_path_factory.mktemp("npu-adapter")
    base = builder.export_npu_base(tiny_trained["base"], "int8", root / "npu-base")
    m = tiny_merged
    return export.export("openvino-npu-adapter", m["merged"], m["test"], m["eval"], m["inference"], CFG,
                         root / "openvino-npu-adapter", adapter=tiny_trained["trained"].adapter, npu_base=base)


def test_the_adapter_on_the_npu_base_answers_as_the_merged_model(npu_adapter_export):
    """openvino_genai.Adapter on the NPU pipeline (scaled lora_alpha / r) gives PyTorch's merged model's greedy
    tokens on the gate's prompts, and its answers on the test rows."""
    result, folder = npu_adapter_export, Path(npu_adapter_export.path)
    assert result.greedy_agreement == 1.0 and result.same_answer >= 11 / 12 and result.tokenizer_mismatches == 0
    assert result.precision == "int8 + LoRA" and result.device.startswith("NPU static pipeline on the CPU")
    info = json.loads((folder / "npu.json").read_text())
    config = json.loads((folder / "adapter_config.json").read_text())
    assert info["alpha"] == config["lora_alpha"] / config["r"] and info["base"] == result.base
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "openvino_model.bin").exists()


def test_an_npu_adapter_is_refused_on_another_base(npu_adapter_export, tiny_trained, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(npu_adapter_export.path, folder)
    other = Path(builder.export_npu_base(tiny_trained["base"], "int4-channel", tmp_path / "other-base"))
    info = json.loads((folder / "npu.json").read_text())
    (folder / "npu.json").write_text(json.dumps(info | {"base": str(other)}))
    with pytest.raises(NPUExportError, match="made for another NPU base than"):
        NPUPredictor(folder)


def test_the_npu_adapter_changes_its_base_and_several_are_served_from_one_process(npu_adapter_export, tiny_merged,
                                                                                   tmp_path):
    """The adapter really runs: at scale 0 (the base alone) the greedy tokens differ. Both, loaded as two adapters
    of one NPU base in one pipeline (``load_npu``), answer per request exactly as each does alone."""
    from tasks.common.files import read_jsonl
    from tasks.deploy.runtime.openvino import load_npu

    folder = tmp_path / "unscaled"
    shutil.copytree(npu_adapter_export.path, folder)
    info = json.loads((folder / "npu.json").read_text())
    (folder / "npu.json").write_text(json.dumps(info | {"alpha": 0.0}))
    with_adapter, base_alone = NPUPredictor(npu_adapter_export.path), NPUPredictor(folder)
    prompts = [with_adapter.prompt_ids(r["messages"][:-1]) for r in read_jsonl(tiny_merged["test"])]
    alone = {"tuned": [with_adapter.generate_ids(p, 6) for p in prompts],
             "base": [base_alone.generate_ids(p, 6) for p in prompts]}
    assert sum(a != b for a, b in zip(alone["tuned"], alone["base"])) >= len(prompts) // 2
    served = load_npu([f"tuned={npu_adapter_export.path}", f"base={folder}"])
    assert sorted(served.adapters) == ["base", "tuned"]
    for name in ("base", "tuned", "base"):  # switching back and forth
        assert [served.generate_ids(p, 6, adapter=name) for p in prompts] == alone[name], name
    with pytest.raises(ValueError, match="no adapter was chosen"):
        served.generate_ids(prompts[0], 6)
