"""The int4 base with LoRA slots, its de-quantized twin, the adapter export and multi-adapter serving, on tiny
models: the training base equals the exported weights layer by layer (ONNX Runtime itself is the oracle), the
gate refuses an adapter on a mismatched base, adapters that do not fit are refused naming the file, and two
adapters from two jobs answer from one process exactly as each does alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs.schema import ConfigError, FinetuneConfig, MergeConfig
from tasks.deploy.export import ExportCheckError, export
from tasks.deploy.builders.genai import int4_options
from tasks.common.files import read_jsonl
from tasks.deploy.builders.int4_base import export_base
from tasks.deploy.formats.int4 import parameter_name
from tasks.deploy.runtime.adapters import ADAPTER_FILE, AdapterError, check_adapter, check_parameters
from tasks.deploy.formats.adapter import convert_adapter
from tasks.deploy.runtime.predict import Predictor, load

from conftest import tiny_config, write_classification_dir
from test_predict import NO_TORCH, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir):
    """The tiny model's int4 base (tiny config's int4 settings, LoRA slots on all linear layers)."""
    cfg = tiny_config("unused", "unused", tiny_model_dir).export
    return export_base(tiny_model_dir, "all-linear", int4_options(cfg), tmp_path_factory.mktemp("int4") / "base")


def _job(root: Path, base, uppercase: bool) -> dict:
    """One fine-tuning job on the matched base: train, merge, evaluate on test, export the adapter form.
    ``uppercase`` gives the second job other answers (its labels upper-cased)."""
    from tasks.stages.evaluate import evaluate
    from tasks.stages.ingest import ingest
    from tasks.stages.merge import merge
    from tasks.common.labels import label_set
    from tasks.deploy.runtime.predict import inference_settings
    from tasks.stages.split import split
    from tasks.stages.train import train

    data = write_classification_dir(root / "cls")
    if uppercase:
        for name in ("train.jsonl", "test.jsonl"):
            rows = read_jsonl(data / name)
            (data / name).write_text("".join(json.dumps({**r, "label": r["label"].upper()}) + "\n" for r in rows))
    cfg = tiny_config(data, root / "out", base.matched_model)
    cfg = cfg.model_copy(update={"name": "upper" if uppercase else "lower"})
    splits = split(ingest(cfg.data, root / "ingested"), cfg.split, root / "data")
    trained = train(base.matched_model, splits, cfg.model, cfg.lora, cfg.train, root / "adapter",
                    root / "checkpoints")
    test = splits.files["test"]
    merged = merge(base.matched_model, trained.adapter, test, MergeConfig(), root / "merged").merged
    evaluated = evaluate(merged, test, "classification", cfg.eval, root / "eval")
    inference = inference_settings(cfg.data, "classification", evaluated.max_new_tokens, cfg.name,
                                   label_set(read_jsonl(splits.files["train"])))
    exported = export("genai-int4-adapter", merged, test, str(root / "eval"), inference, cfg.export,
                      root / "export", adapter=trained.adapter, int4_base=base.onnx)
    answers = [r["prediction"] for r in read_jsonl(root / "eval" / "predictions.jsonl")]
    texts = [r["prompt"][-1]["content"] for r in read_jsonl(root / "eval" / "predictions.jsonl")]
    return {"cfg": cfg, "adapter": trained.adapter, "merged": merged, "test": test, "eval": str(root / "eval"),
            "inference": inference, "export": exported, "answers": answers, "texts": texts}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, base) -> dict:
    return {"lower": _job(tmp_path_factory.mktemp("job-lower"), base, False),
            "upper": _job(tmp_path_factory.mktemp("job-upper"), base, True)}


def _oracle_weight(graph, node, initializers):
    """What ONNX Runtime computes for ``node`` alone: a MatMulNBits fed the identity (fp32 activations) gives
    its weight transposed; a GatherBlockQuantized fed every index gives the whole table."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    made_by = {out: n for n in graph.node for out in n.output}
    one = onnx.NodeProto()
    one.CopyFrom(node)
    if node.op_type == "MatMulNBits":
        k = next(a.i for a in node.attribute if a.name == "K")
        one.input[0] = "x"
        for attr in one.attribute:
            if attr.name == "accuracy_level":
                attr.i = 1
        feed, x = {"x": np.eye(k, dtype=np.float32)}, helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])
    else:
        vocab = initializers[node.input[2]].dims[0]
        one.input[1] = "ids"
        feed, x = {"ids": np.arange(vocab)}, helper.make_tensor_value_info("ids", TensorProto.INT64, [vocab])
    before, todo = [], [i for i in one.input if i in made_by]
    while todo:  # the Reshape (and its Constant) that feeds a tied embedding
        producer = made_by[todo.pop()]
        before.insert(0, producer)
        todo += [i for i in producer.input if i in made_by]
    names = {i for n in [*before, one] for i in n.input if i in initializers}
    model = helper.make_model(
        helper.make_graph([*before, one], "one", [x], [helper.make_tensor_value_info(one.output[0], 1, None)],
                          [initializers[n] for n in names]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return out.T if node.op_type == "MatMulNBits" else out


def test_training_base_equals_the_exported_weights_layer_by_layer(base):
    import onnx
    from safetensors.numpy import load_file

    graph = onnx.load(str(Path(base.onnx) / "model.onnx")).graph
    initializers = {i.name: i for i in graph.initializer}
    matched = load_file(str(Path(base.matched_model) / "model.safetensors"))
    quantized = [n for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert len(quantized) == base.quantized_weights
    # every projection of both decoder layers is quantized (2 layers x 7), and the LM head
    assert {parameter_name(n.name) for n in quantized if n.op_type == "MatMulNBits"} >= {
        f"model.layers.{i}.{block}.{p}.weight" for i in range(2)
        for block, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in
        ([f"{x}_proj" for x in ps])} | {"lm_head.weight"}
    for node in quantized:
        name = "model.embed_tokens.weight" if node.op_type == "GatherBlockQuantized" else parameter_name(node.name)
        name = name if name in matched else "model.embed_tokens.weight"  # a tied LM head is saved once
        oracle = _oracle_weight(graph, node, initializers)
        assert np.array_equal(oracle, matched[name]), name


def test_lora_slots_are_optional_inputs_with_a_dynamic_rank(base):
    import onnx

    graph = onnx.load(str(Path(base.onnx) / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    slots = {name: dims for name, dims in inputs.items() if ".lora_" in name}
    assert len(slots) == base.lora_inputs == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    assert slots["model.layers.0.attn.q_proj.lora_A.MatMul.weight"] == [64, "lora_r"]
    assert slots["model.layers.1.mlp.down_proj.lora_B.MatMul.weight"] == ["lora_r", 64]
    defaults = {i.name: list(i.dims) for i in graph.initializer if i.name in slots}
    assert all(0 in dims for dims in defaults.values()) and len(defaults) == len(slots)  # empty: adds nothing


def test_the_lora_matmuls_stay_float_and_the_base_is_int4_as_configured(base):
    """Read from the built graph, not the options passed: onnxruntime-genai 0.18 ignores the old int4_* option
    names without a word, which left the LoRA MatMuls quantized and the LM head int4 under k_quant_mixed."""
    from tasks.deploy.builders.genai import quantized_matmuls

    nodes = quantized_matmuls(Path(base.onnx) / "model.onnx")
    assert not [name for name in nodes if "/lora_" in name]  # every LoRA MatMul stayed float
    assert {a["block_size"] for a in nodes.values()} == {32} and {a["accuracy_level"] for a in nodes.values()} == {4}
    head = [a for name, a in nodes.items() if name.startswith("/lm_head/")]
    assert head == [{"bits": 8, "block_size": 32, "accuracy_level": 4}]  # k_quant_mixed: int8 LM head


def test_deployed_adapter_passes_the_one_point_gate(jobs):
    for job in jobs.values():
        result = job["export"]
        assert job["cfg"].export.max_quality_drop == 0.01 and result.same_answer == 1.0
        assert result.accuracy == result.reference_accuracy and result.greedy_agreement >= 0.6
        files = {p.name for p in Path(result.path).iterdir()}
        assert {".manifest.json", "adapter.json", ADAPTER_FILE, "export.json", "inference.json", "model.onnx",
                "model.onnx.data", "genai_config.json", "tokenizer.json"} <= files
        assert "lora_inputs.json" not in files and result.precision == "int4 + folded LoRA"


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tiny_model_dir):
    """The int4 base of another model with the tiny model's shapes (its weights perturbed by their own std)."""
    import torch

    from tasks.base_model import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("other")
    model = load_model(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * param.std())
    model.save_pretrained(root / "model")
    load_tokenizer(tiny_model_dir).save_pretrained(root / "model")
    cfg = tiny_config("unused", "unused", tiny_model_dir).export
    return export_base(str(root / "model"), "all-linear", int4_options(cfg), root / "base")


def test_gate_fails_on_a_mismatched_base(jobs, other_base, tmp_path):
    """The adapter converts onto another base of the same shapes, and the deployed form then answers
    differently from the evaluated model: the gate refuses to publish."""
    job = jobs["lower"]
    with pytest.raises(ExportCheckError, match="greedy agreement"):
        export("genai-int4-adapter", job["merged"], job["test"], job["eval"], job["inference"], job["cfg"].export,
               tmp_path / "export", adapter=job["adapter"], int4_base=other_base.onnx)
    assert not (tmp_path / "export").exists()


def test_two_adapters_from_two_jobs_serve_from_one_process(jobs, base):
    lower, upper = jobs["lower"], jobs["upper"]
    alone = {name: Predictor(job["export"].path)(job["texts"]) for name, job in jobs.items()}
    served = Predictor(base.onnx, adapters={name: job["export"].path for name, job in jobs.items()})
    assert served.adapters == ["lower", "upper"]
    assert served(lower["texts"], adapter="lower") == alone["lower"] == lower["answers"]
    assert served(upper["texts"], adapter="upper") == alone["upper"] == upper["answers"]
    assert alone["lower"] != alone["upper"]  # the adapter chosen per request decides the answer
    mixed = served(lower["texts"][:2] + upper["texts"][:2], adapter=["lower", "lower", "upper", "upper"])
    assert mixed == alone["lower"][:2] + alone["upper"][:2]
    with pytest.raises(ValueError, match="no adapter was chosen; loaded adapters: lower, upper"):
        served("hello")


def test_cli_batch_chooses_the_adapter_per_row_without_torch(jobs, tmp_path):
    lower, upper = jobs["lower"], jobs["upper"]
    rows = [{"text": t, "adapter": "upper"} for t in upper["texts"][:3]] + [{"text": lower["texts"][0]}]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", NO_TORCH, "--model", lower["export"].path, "--model",
                           upper["export"].path, "--adapter", "lower", "--input", str(inputs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    predictions = [r["prediction"] for r in read_jsonl(Path(done.stdout.strip().splitlines()[-1]))]
    assert predictions == upper["answers"][:3] + lower["answers"][:1]


def test_a_corrupted_adapter_file_is_refused_naming_it(jobs, base, tmp_path):
    from tests.conftest import tampered_copy

    folder = tampered_copy(jobs["lower"]["export"].path, tmp_path / "copy", ADAPTER_FILE)
    with pytest.raises(AdapterError, match=f"{folder / ADAPTER_FILE}: corrupted"):
        Predictor(base.onnx, adapters={"lower": folder})
    with pytest.raises(AdapterError, match=f"{folder / ADAPTER_FILE}: corrupted"):
        load([str(folder), jobs["upper"]["export"].path])


def test_a_corrupted_baked_model_is_refused_naming_the_file(jobs, tmp_path):
    import shutil

    folder = Path(shutil.copytree(jobs["lower"]["export"].path, tmp_path / "copy"))
    assert Predictor(folder).adapters == ["lower"]  # the copy loads as published
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[len(data) // 3] ^= 0x01
    (folder / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=f"{folder / 'model.onnx.data'}: corrupted"):
        Predictor(folder)


def prefill_logits(folder: Path, prompt: list[int], feeds: dict | None = None):
    """float32 [1, vocab]: the last position's logits (the builder prunes the LM head to it) of one prefill pass of
    the GenAI graph in ``folder`` (plain onnxruntime, empty KV cache), with extra graph inputs ``feeds`` (LoRA
    weights)."""
    import onnxruntime as ort

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {"input_ids": np.array([prompt], dtype=np.int64),
              "attention_mask": np.ones((1, len(prompt)), dtype=np.int64), **(feeds or {})}
    for i in range(config["num_hidden_layers"]):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = np.zeros(
                (1, config["num_key_value_heads"], 0, config["head_size"]), dtype=np.float32)
    return session.run(["logits"], inputs)[0][0]


def test_the_baked_model_computes_what_the_adapter_file_does_on_the_base(jobs, base, tmp_path):
    """The published folder's graph (the adapter baked in) against the base graph fed the adapter file's
    weights, the runtime form: fp32 baking gives the same logits up to summation order; the default folded
    form (int8 lora_A, lora_B quantized into each projection's MatMulNBits) the same next token after the prompt
    (and the same answers: the test above), its logits off by a small fraction of what the adapter changes in
    them (against the base alone). Each projection's own
    MatMulNBits reads ``[x | x A]``: no separate lora_B MatMul or Add is left."""
    import shutil

    import onnx
    import onnxruntime as ort

    from tasks.deploy.formats.adapter import bake_adapter

    job = jobs["lower"]
    published = Path(job["export"].path)
    prompt = Predictor(published).prompt_ids([{"role": "user", "content": job["texts"][0]}])
    adapter = ort.AdapterFormat.read_adapter(str(published / ADAPTER_FILE))
    runtime = prefill_logits(Path(base.onnx), prompt, {k: v.numpy() for k, v in adapter.get_parameters().items()})
    fp32 = Path(shutil.copytree(published, tmp_path / "fp32"))
    bake_adapter(fp32, base.onnx, "fp32")
    np.testing.assert_allclose(prefill_logits(fp32, prompt), runtime, atol=1e-4, rtol=1e-4)
    packed = [n for n in onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph.node
              if n.name.endswith("gate_up_proj/MatMulNBits")]
    assert len(packed) == 2  # gate and up quantized alike: one MatMulNBits per layer, bit for bit
    folded = prefill_logits(published, prompt)
    assert folded[-1].argmax() == runtime[-1].argmax()
    effect, error = np.abs(prefill_logits(Path(base.onnx), prompt) - runtime), np.abs(folded - runtime)
    assert 0 < error.max() < 0.1 * effect.max() and error.mean() < 0.05 * effect.mean()  # 6 % and 2.5 % here

    graph = onnx.load(str(published / "model.onnx"), load_external_data=False).graph
    assert not [i.name for i in graph.input if ".lora_" in i.name]
    lora = sorted(n.name.split("/")[4] for n in graph.node if "/lora_A/" in n.name and "layers.0/" in n.name)
    assert lora == ["down_proj", "gate_up_proj", "o_proj", "q_k_v_proj"]
    assert {n.op_type for n in graph.node if "/lora" in n.name} == {"MatMulNBits"}  # only lora_A, int8
    folds = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[0].endswith("/lora/x")]
    attrs = [{a.name: a.i for a in n.attribute} for n in folds if "down_proj" not in n.name]
    assert len(folds) == 7 * 2 and all(a["K"] > 64 and (a["K"] - 64) % a["block_size"] == 0 for a in attrs)


def test_an_adapter_for_another_base_is_refused(jobs, other_base):
    with pytest.raises(AdapterError, match="adapter.onnx_adapter: converted for another int4 base"):
        Predictor(other_base.onnx, adapters={"lower": jobs["lower"]["export"].path})


def test_an_adapter_with_other_targets_is_refused(jobs, tiny_model_dir, tmp_path):
    """The same base weights with LoRA slots on q_proj and v_proj only: an all-linear adapter does not fit."""
    slim = export_base(tiny_model_dir, ["q_proj", "v_proj"], int4_options(jobs["lower"]["cfg"].export),
                       tmp_path / "base")
    with pytest.raises(AdapterError, match=r"adapter.onnx_adapter: model.layers.0.attn.k_proj has no LoRA slot"):
        check_adapter(jobs["lower"]["export"].path, slim.onnx)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: model.layers.0.attn.k_proj has no LoRA slot"):
        convert_adapter(jobs["lower"]["adapter"], slim.onnx, tmp_path)


def test_rank_and_shape_mismatches_are_refused():
    slots = {"m.lora_A.MatMul.weight": [64, "lora_r"], "m.lora_B.MatMul.weight": ["lora_r", 64]}
    check_parameters({"m.lora_A.MatMul.weight": [64, 8], "m.lora_B.MatMul.weight": [8, 64]}, slots, Path("f"))
    with pytest.raises(AdapterError, match="f: m.lora_A.MatMul.weight has rank 8 but its lora_B has 4"):
        check_parameters({"m.lora_A.MatMul.weight": [64, 8], "m.lora_B.MatMul.weight": [4, 64]}, slots, Path("f"))
    with pytest.raises(AdapterError, match=r"f: m.lora_A.MatMul.weight is \[96, 8\], the int4 base takes"):
        check_parameters({"m.lora_A.MatMul.weight": [96, 8], "m.lora_B.MatMul.weight": [8, 64]}, slots, Path("f"))


def test_two_adapters_with_one_name_need_names(jobs):
    path = jobs["lower"]["export"].path
    with pytest.raises(ValueError, match="two adapters named 'lower'"):
        load([path, path])
    assert load([f"a={path}", f"b={path}"]).adapters == ["a", "b"]


def test_adapter_export_needs_plain_lora():
    tree = {"data": {"path": "x"}, "lora": {"method": "qlora"}, "export": {"targets": ["genai-int4-adapter"]}}
    with pytest.raises((ConfigError, ValueError), match="genai-int4-adapter needs lora.method lora"):
        FinetuneConfig.model_validate(tree)
