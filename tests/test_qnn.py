"""The ``qnn-npu`` export (the Qualcomm NPU) on the tiny model: the static graph against PyTorch, its QDQ ladder
and gate on ONNX Runtime's CPU provider, the EPContext model on the QNN HTP emulator with CPU fallback disabled,
the window, refusal of a tampered folder, and serving it with ``flows.predict``."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from configs.schema import ExportConfig
from tasks.common.chat import chat_ids
from tasks.deploy import export
from tasks.deploy.builders import qnn as builder
from tasks.deploy.runtime.openvino import PromptTooLongError
from tasks.deploy.runtime.qnn import CONTEXT_MODEL, QDQ_MODEL, QNNExportError, QNNPredictor
from tests.conftest import predict_cli, tampered_copy

CFG = ExportConfig(n_check_prompts=3, max_new_tokens=6, targets=["qnn-npu"], qnn_emulator_rows=3)


@pytest.fixture(scope="module")
def qnn_export(tiny_merged, tmp_path_factory):
    m = tiny_merged
    return export.export("qnn-npu", m["merged"], m["test"], m["eval"], m["inference"], CFG,
                         tmp_path_factory.mktemp("qnn") / "qnn-npu")


@pytest.mark.parametrize("family", ["smollm2", "qwen2", "qwen3", "mistral"])
def test_the_static_graph_gives_pytorchs_logits_with_one_fused_node_per_rms_norm(family, tmp_path):
    """Right-padded to the window, the graph's logits at ``last`` are PyTorch's for the prompt alone (the causal mask
    keeps the padding out), and no RMSNorm is left as ``x²`` / mean / ``sqrt`` (whose 16-bit quantization broke
    SmolLM2: module doc of tasks/deploy/builders/qnn.py)."""
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    model = build_tiny_model(tmp_path / family, family)
    builder.export_static(model, tmp_path / "static.onnx", 32)
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "static.onnx")).graph.node)
    norms = 2 * 2 + 1 + (2 * 2 if family == "qwen3" else 0)  # 2 per layer, the final one, Qwen3's q/k norms
    assert ops["SimplifiedLayerNormalization"] == norms and not ops["Pow"] and not ops["Sqrt"]
    session = ort.InferenceSession(str(tmp_path / "static.onnx"), providers=["CPUExecutionProvider"])
    prompt = [3, 17, 42, 99, 7, 250, 11]
    window = np.full((1, 32), 0, dtype=np.int32)
    window[0, : len(prompt)] = prompt
    got = session.run(None, {"input_ids": window, "last": np.array([len(prompt) - 1], dtype=np.int32)})[0][0]
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        expected = net(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_a_model_family_without_a_static_graph_is_refused_by_the_builder_and_before_training(tmp_path):
    from configs.schema import ConfigError
    from tasks.stages import validate
    from tests.conftest import build_tiny_model, tiny_config, write_classification_dir

    model = build_tiny_model(tmp_path / "phi3", "phi3")
    with pytest.raises(builder.QNNBuildError, match="model type 'phi3' has no static QNN graph"):
        builder.export_static(model, tmp_path / "static.onnx", 32)
    cfg = tiny_config(write_classification_dir(tmp_path / "cls"), tmp_path / "out", model,
                      export={"targets": ["qnn-npu"]})
    with pytest.raises(ConfigError, match="qnn-npu has no static graph for model type 'phi3'"):
        validate.validate(cfg, model)
    assert not (tmp_path / "out").exists()


def test_the_qnn_export_passes_its_gate_on_the_cpu_provider_and_agrees_on_the_emulator(qnn_export):
    assert qnn_export.ladder[0]["rung"] == "w8a16" and qnn_export.ladder[-1]["passed"]
    assert qnn_export.precision == qnn_export.ladder[-1]["rung"]
    assert qnn_export.tokenizer_mismatches == 0 and qnn_export.greedy_agreement >= CFG.min_greedy_agreement
    assert qnn_export.accuracy >= qnn_export.reference_accuracy - CFG.max_quality_drop
    assert qnn_export.n_examples == 12 and qnn_export.device.startswith("CPU provider (the QDQ model")
    emulator = qnn_export.emulator
    assert emulator["rows"] == 3 and emulator["agreement"] == 1.0 and emulator["differ"] == []
    assert emulator["device"].startswith("QNN HTP emulator on the CPU")
    folder = Path(qnn_export.path)
    for name in (QDQ_MODEL, CONTEXT_MODEL, "model_ctx_qnn.bin", "qnn.json", "inference.json", "export.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not [p for p in folder.iterdir() if p.name.startswith(".rung")]
    info = json.loads((folder / "qnn.json").read_text())
    assert info["soc_model"] == 60 and info["htp_arch"] == 73 and info["weights"] == qnn_export.precision
    assert set(info["sha256"]) >= {QDQ_MODEL, CONTEXT_MODEL, "model_ctx_qnn.bin", "tokenizer.json"}


def test_the_qnn_runtime_encodes_as_the_training_tokenizer_answers_a_label_and_refuses_a_long_prompt(
        qnn_export, tiny_merged):
    from transformers import AutoTokenizer

    predictor = QNNPredictor(qnn_export.path)
    assert predictor.device.startswith("CPU provider")  # no Qualcomm NPU here
    tokenizer = AutoTokenizer.from_pretrained(tiny_merged["merged"])
    messages = predictor.messages("I want the apple number 3")
    assert predictor.prompt_ids(messages) == chat_ids(tokenizer, messages, add_generation_prompt=True)
    labels = set(tiny_merged["inference"]["labels"])
    assert predictor("I want the apple number 3") in labels
    assert set(predictor(["zzz qqq", "pear 9"])) <= labels
    longest = predictor.max_prompt_len
    assert predictor.generate_ids([5] * longest, 2) is not None
    with pytest.raises(PromptTooLongError, match=rf"prompt has {longest + 1} tokens; .* window of "):
        predictor.generate_ids([5] * (longest + 1), 2)


def test_every_node_runs_on_the_qnn_htp_backend_and_answers_as_the_cpu_provider(qnn_export, tiny_merged):
    """The EPContext model reloads on the HTP backend with CPU fallback disabled (a node QNN cannot run would fail
    the session) and greedy decoding there follows the CPU provider's QDQ model token for token."""
    htp, cpu = QNNPredictor(qnn_export.path, backend="htp"), QNNPredictor(qnn_export.path, backend="cpu")
    assert htp.device.startswith("QNN HTP emulator") and htp.session.get_providers()[0] == "QNNExecutionProvider"
    prompt = cpu.prompt_ids(cpu.messages("I want the pear number 5"))
    assert htp.generate_ids(prompt, 4, min_new_tokens=4) == cpu.generate_ids(prompt, 4, min_new_tokens=4)


@pytest.mark.parametrize("weights", ["w4a16", "w16a16"])
def test_the_other_weight_rungs_compile_for_the_htp_and_answer_as_their_qdq_model(weights, tiny_merged, tmp_path):
    """The rungs after w8a16 (which the gate above publishes) build, compile for the SoC with CPU fallback disabled,
    and decode on the emulator as on the CPU provider."""
    from transformers import AutoTokenizer

    from tasks.common.chat import tokenize_with_completion_mask
    from tasks.common.files import read_jsonl, write_json

    tokenizer = AutoTokenizer.from_pretrained(tiny_merged["merged"])
    rows = read_jsonl(Path(tiny_merged["test"]).with_name("train.jsonl"))[:8]
    calibration = [ids for ids, _ in tokenize_with_completion_mask(tokenizer, rows)]
    builder.export_static(tiny_merged["merged"], tmp_path / "fp32.onnx", 64)
    folder = tmp_path / weights
    builder.build_qnn_folder(tiny_merged["merged"], tmp_path / "fp32.onnx", folder, weights, calibration, 64, 60, 73)
    write_json(folder / "inference.json", tiny_merged["inference"])
    htp, cpu = QNNPredictor(folder, backend="htp"), QNNPredictor(folder, backend="cpu")
    prompt = cpu.prompt_ids(cpu.messages("I want the pear number 5"))
    assert htp.generate_ids(prompt, 3, min_new_tokens=3) == cpu.generate_ids(prompt, 3, min_new_tokens=3)


def test_no_rung_passing_the_gate_refuses_the_target_with_each_rungs_figures(tiny_merged, tmp_path):
    m = tiny_merged
    strict = CFG.model_copy(update={"max_quality_drop": -1.0, "qnn_weights": ["w8a16"]})  # no model can pass
    with pytest.raises(export.ExportCheckError, match=r"no rung passed the gate: w8a16: accuracy .* below"):
        export.export("qnn-npu", m["merged"], m["test"], m["eval"], m["inference"], strict, tmp_path / "qnn")
    assert not (tmp_path / "qnn").exists()


def test_a_tampered_qnn_folder_is_refused_by_the_runtime_and_the_cli(qnn_export, tmp_path):
    folder = tampered_copy(qnn_export.path, tmp_path / "tampered", "model_ctx_qnn.bin")
    with pytest.raises(QNNExportError, match=r"model_ctx_qnn.bin: corrupted \(SHA-256"):
        QNNPredictor(folder)
    done = predict_cli("--model", str(folder), "I want the apple number 3")
    assert done.returncode == 1 and "model_ctx_qnn.bin: corrupted" in done.stderr


def test_flows_predict_serves_the_qnn_folder_and_names_the_device(qnn_export, tiny_merged):
    done = predict_cli("--model", qnn_export.path, "I want the apple number 3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in tiny_merged["inference"]["labels"]
    assert "CPU provider (the QDQ model; no Qualcomm NPU here)" in done.stderr


def test_a_config_exporting_to_qnn_without_its_package_is_refused_before_training(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from configs.schema import ConfigError
    from tasks.stages import validate
    from tests.conftest import tiny_config, write_classification_dir

    cfg = tiny_config(write_classification_dir(tmp_path / "cls"), tmp_path / "out", tiny_model_dir,
                      export={"targets": ["genai-int4", "qnn-npu"]})
    validate.check_export_packages(cfg)  # installed here (make install)
    monkeypatch.setitem(validate.EXPORT_PACKAGES, "qnn-npu", (("no_such_qnn_module",), "pip install it"))
    with pytest.raises(ConfigError, match="export.targets: qnn-npu needs no_such_qnn_module, .*: pip install"):
        validate.validate(cfg, tiny_model_dir)
    assert not (tmp_path / "out").exists()
