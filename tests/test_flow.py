"""The whole flow on the tiny model through Prefect (a temporary server): output contract, content caching,
artifacts (read back through Prefect's client API), the latest pointer, and the CLI's failure contract."""
import json
import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.finetune import finetune, main
from tests.conftest import tiny_config, write_classification_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

ALL_STAGES = {"validate", "ingest", "split", "evaluate_base", "evaluate_fewshot", "train", "merge",
              "evaluate_finetuned", "export_genai-int4"}


def _rename(cfg, run_name, **sections):
    update = {"output": cfg.output.model_copy(update={"run_name": run_name})}
    for name, values in sections.items():
        update[name] = getattr(cfg, name).model_copy(update=values)
    return cfg.model_copy(update=update)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_model_dir):
    """The whole flow once on the tiny model: (config, final state, output dir)."""
    root = tmp_path_factory.mktemp("flow")
    cfg = tiny_config(write_classification_dir(root / "cls"), root / "out", tiny_model_dir,
                      eval={"baseline_examples": 6, "few_shot": 3})  # the base on 6 of the 12 test rows
    state = finetune(cfg, return_state=True)
    assert state.is_completed(), state.message
    return cfg, state, root / "out"


def test_whole_flow_meets_the_output_contract(flow_run):
    cfg, state, out = flow_run
    result = state.result()
    run = out / "run"
    assert result["run_dir"] == str(run)
    for folder in ("adapter", "merged", "onnx/genai-int4", "data", "eval/base", "eval/base-few-shot",
                   "eval/finetuned"):
        assert (run / folder).is_dir() and any((run / folder).iterdir()), folder
    assert (run / "merged" / "model.safetensors").is_file()
    assert (run / "onnx" / "genai-int4" / "model.onnx").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for side in ("base", "base_few_shot", "finetuned"):
        assert {"accuracy", "macro_f1", "eval_loss", "perplexity", "n_examples", "interval95"} <= set(metrics[side])
    assert (metrics["base"]["n_examples"], metrics["base"]["population"], metrics["base"]["few_shot"]) == (6, 12, 0)
    assert (metrics["base_few_shot"]["n_examples"], metrics["base_few_shot"]["few_shot"]) == (6, 3)
    assert metrics["finetuned"]["n_examples"] == metrics["finetuned"]["population"] == 12  # always every row
    base_rows = [json.loads(line)["prompt"] for line in (run / "eval" / "base" / "predictions.jsonl").open()]
    shot_rows = [json.loads(line)["prompt"] for line in (run / "eval" / "base-few-shot" / "predictions.jsonl").open()]
    assert [p[-1] for p in shot_rows] == [p[-1] for p in base_rows]  # the same sampled rows, 3 shots before each
    assert all(len(s) == len(b) + 6 for s, b in zip(shot_rows, base_rows))
    assert metrics["finetuned"]["eval_loss"] < metrics["base"]["eval_loss"]
    int4 = metrics["onnx"]["genai-int4"]
    assert int4["tokenizer_mismatches"] == 0 and int4["greedy_agreement"] >= cfg.export.min_greedy_agreement
    assert int4["accuracy"] >= int4["reference_accuracy"] - cfg.export.max_quality_drop
    assert int4["reference_accuracy"] == pytest.approx(metrics["finetuned"]["accuracy"])
    assert {"train_tokens", "tokens_per_second", "wall_seconds"} <= set(metrics["train"])
    assert metrics["merge"]["max_abs_logit_diff"] <= cfg.merge.logit_atol
    assert metrics["config"]["data"]["path"] == cfg.data.path
    assert set(metrics["stage_seconds"]) == ALL_STAGES
    assert set(metrics["stage_states"].values()) == {"Completed"}
    report = (run / "report.md").read_text()
    assert "| accuracy |" in report and "greedy agreement" in report and "loss_curve.png" in report
    assert "| metric | base | base 3-shot | fine-tuned | delta |" in report and "6 of 12 (stratified)" in report
    samples = json.loads((run / "samples.json").read_text())
    tuned = [json.loads(line) for line in (run / "eval" / "finetuned" / "predictions.jsonl").open()]
    base = {row["prompt"][-1]["content"]: row["prediction"]
            for row in map(json.loads, (run / "eval" / "base" / "predictions.jsonl").open())}
    shown = [t for t in tuned if t["prompt"][-1]["content"] in base][:5]  # the first test rows the base answered
    assert [s["prompt"] for s in samples] == [t["prompt"][-1]["content"] for t in shown]
    assert [(s["base"], s["fine-tuned"]) for s in samples] == [(base[s["prompt"]], t["prediction"])
                                                                for s, t in zip(samples, shown)]
    assert all(s["base"] is not None and s["prompt"] in report for s in samples)
    assert (run / "loss_curve.png").read_bytes() == (run / "adapter" / "loss_curve.png").read_bytes()  # train drew it
    assert not list(out.rglob(".*tmp-*"))


def test_artifacts_are_in_prefect(flow_run):
    _, state, out = flow_run
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert {"metrics", "loss-curve", "model-card", "run-folder", "training-progress",
            "sample-generations"} <= set(by_key)
    table = json.loads(by_key["metrics"].data) if isinstance(by_key["metrics"].data, str) else by_key["metrics"].data
    assert {row["metric"] for row in table} == {"accuracy", "macro_f1", "unconstrained_accuracy", "off_label_share",
                                                "eval_loss", "perplexity"}
    assert set(table[0]) == {"metric", "base", "base 3-shot", "fine-tuned", "delta"}
    assert "data:image/png;base64," in by_key["loss-curve"].data
    assert "from_pretrained" in by_key["model-card"].data and "sha256" in by_key["model-card"].data
    assert float(by_key["training-progress"].data) == pytest.approx(100.0)
    samples = by_key["sample-generations"].data
    samples = json.loads(samples) if isinstance(samples, str) else samples
    assert samples == json.loads((out / "run" / "samples.json").read_text())
    assert f"]({(out / 'run').resolve().as_uri()})" in by_key["run-folder"].data  # a markdown link


def test_identical_rerun_is_all_cached(flow_run):
    cfg, _, out = flow_run
    result = finetune(_rename(cfg, "again"))
    assert set(result["stage_states"].values()) == {"Cached"}, result["stage_states"]
    first = json.loads((out / "run" / "metrics.json").read_text())
    assert result["finetuned"] == first["finetuned"]
    assert (out / "again" / "adapter").resolve() == (out / "run" / "adapter").resolve()


def test_changing_only_evaluation_reruns_only_evaluation_and_its_gate(flow_run):
    cfg, _, _ = flow_run
    result = finetune(_rename(cfg, "eval-change", eval={"batch_size": 3}))
    states = result["stage_states"]
    # the export's quality gate is measured against the merged model's evaluation, so it reruns with it
    assert states["evaluate_base"] == states["evaluate_fewshot"] == states["evaluate_finetuned"] == "Completed"
    assert states["export_genai-int4"] == "Completed"
    assert {states[s] for s in ("ingest", "split", "train", "merge")} == {"Cached"}, states


def test_changed_data_reruns_from_ingest_and_a_deleted_output_is_rebuilt(flow_run, tmp_path):
    cfg, _, out = flow_run
    data = tmp_path / "cls"
    shutil.copytree(cfg.data.path, data)
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "I want the hammer number 1000", "label": "tool"}) + "\n")
    states = finetune(_rename(cfg, "new-data", data={"path": str(data)}))["stage_states"]
    assert set(states.values()) == {"Completed"}, states
    shutil.rmtree((out / "run" / "merged").resolve())
    states = finetune(_rename(cfg, "rebuilt"))["stage_states"]
    assert states["merge"] == "Completed" and states["train"] == "Cached", states
    assert (out / "rebuilt" / "merged" / "model.safetensors").is_file()


def test_the_same_data_at_another_path_reuses_every_stage(flow_run, tmp_path):
    cfg, _, out = flow_run
    moved = tmp_path / "elsewhere" / "cls"
    shutil.copytree(cfg.data.path, moved)
    result = finetune(_rename(cfg, "moved-data", data={"path": str(moved)}))
    assert set(result["stage_states"].values()) == {"Cached"}, result["stage_states"]
    assert (out / "moved-data" / "adapter").resolve() == (out / "run" / "adapter").resolve()


def test_generation_scoring_on_classification_data_reports_generation_metrics(flow_run):
    cfg, _, out = flow_run
    result = finetune(_rename(cfg, "gen-eval", eval={"task": "generation"}, export={"enabled": False}),
                      publish_latest=False)
    assert result["task"] == "generation"
    metrics = json.loads((out / "gen-eval" / "metrics.json").read_text())
    assert {"rouge_l", "bleu", "exact_match"} <= set(metrics["finetuned"]) and "accuracy" not in metrics["finetuned"]
    assert "| rouge_l |" in (out / "gen-eval" / "report.md").read_text()
    assert result["stage_states"]["train"] == "Cached"


def test_latest_points_at_the_last_good_run_and_a_failed_run_leaves_it(flow_run, tmp_path, capsys):
    cfg, _, out = flow_run
    latest = json.loads((out / "latest.json").read_text())
    assert Path(latest["merged"], "model.safetensors").is_file()
    assert Path(latest["onnx"], "genai-int4", "model.onnx").is_file()
    before = (out / "latest.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": ["x"]}\n')
    assert main(["--set", f"data.path={bad}", "--set", f"model.name_or_path={cfg.model.name_or_path}",
                 "--set", f"output.dir={out}", "--set", "output.run_name=broken"]) == 1
    assert "row 1: field 'label'" in capsys.readouterr().err
    assert (out / "latest.json").read_bytes() == before
    assert not (out / "broken").exists()


def test_cli_bad_config_exits_non_zero_with_one_line(capsys):
    assert main(["--set", "lora.rank=4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lora.rank: Extra inputs are not permitted" in err


def test_adapter_export_trains_on_the_int4_base_and_an_accuracy_level_change_retrains_nothing(flow_run):
    cfg, _, out = flow_run
    adapter = {"targets": ["genai-int4-adapter"]}
    first = finetune(_rename(cfg, "adapter", export=adapter))
    states = first["stage_states"]
    assert states["int4_base"] == "Completed" and states["train"] == "Completed"  # the matched base: new weights
    assert first["onnx"]["genai-int4-adapter"]["same_answer"] == 1.0
    base = Path(first["onnx"]["genai-int4-adapter"]["base"])
    assert json.loads((out / "adapter/onnx/genai-int4-adapter/adapter.json").read_text())["base"] == str(base)
    assert (out / "adapter/onnx/int4-base").resolve() == base.resolve()
    # int4_accuracy_level changes the int4 graph, not its weights: only the base and the export run again
    states = finetune(_rename(cfg, "level", export={**adapter, "int4_accuracy_level": 1}))["stage_states"]
    assert states["int4_base"] == states["export_genai-int4-adapter"] == "Completed"
    assert {states[s] for s in ("train", "merge", "evaluate_base", "evaluate_finetuned")} == {"Cached"}


def test_the_npu_targets_export_through_the_flow_and_a_second_job_reuses_the_npu_base(flow_run):
    """openvino-npu, openvino-npu-adapter and qnn-npu as the flow runs them: the npu-base stage once per base model
    and weights (another job's export reuses it), every folder gated and linked from the run folder."""
    cfg, _, out = flow_run
    npu = {"targets": ["openvino-npu", "openvino-npu-adapter", "qnn-npu"], "npu_weights": ["int8"],
           "qnn_weights": ["w8a16"]}
    first = finetune(_rename(cfg, "npu", export=npu))
    assert first["stage_states"]["npu_base"] == "Completed"
    for target, manifest in zip(npu["targets"], ("npu.json", "npu.json", "qnn.json")):
        assert first["onnx"][target]["greedy_agreement"] >= 0.6 and (out / f"npu/onnx/{target}/{manifest}").is_file()
    assert first["onnx"]["qnn-npu"]["emulator"]["rows"] == 2
    base = Path(first["onnx"]["openvino-npu-adapter"]["base"])
    assert (out / "npu/onnx/npu-base").resolve() == base.resolve()
    again = finetune(_rename(cfg, "npu-again", export={**npu, "npu_max_prompt_len": 256}))["stage_states"]
    assert again["npu_base"] == again["train"] == "Cached" and again["export_openvino-npu-adapter"] == "Completed"


def test_export_run_makes_a_run_folder_that_survives_zip_with_model_cards(flow_run, tmp_path):
    """A run folder is links into ``stages/`` (a zip of it has no model); ``tasks.stages.portable`` materialises it:
    real files (copies, never hard links into the stages), one manifest that verifies, Hugging Face model cards in
    ``merged/`` and ``adapter/`` with the base model and the test metrics, and after zip → unzip elsewhere the
    merged model and the adapter load and answer like the originals."""
    import os
    import zipfile

    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.common.files import read_json, verify_folder
    from tasks.stages.portable import EMBEDDED_HUB_ID, ExportRunError, export_run, main as export_main, portable_base_id

    cfg, state, out = flow_run
    run = Path(state.result()["run_dir"])
    with zipfile.ZipFile(shutil.make_archive(str(tmp_path / "as-is"), "zip", run)) as z:
        assert "merged/model.safetensors" not in z.namelist()  # why export-run exists

    dest = tmp_path / "portable"
    assert export_main([str(run), str(dest)]) == 0
    assert not [p for p in dest.rglob("*") if p.is_symlink()] and verify_folder(dest) is None
    weights = dest / "merged" / "model.safetensors"
    stage_weights = (run / "merged" / "model.safetensors").resolve()
    assert os.stat(weights).st_ino != os.stat(stage_weights).st_ino  # a copy: editing it cannot change the stage
    assert weights.read_bytes() == stage_weights.read_bytes() and os.stat(stage_weights).st_nlink == 1
    metrics = read_json(run / "metrics.json")
    for folder, library in (("merged", "transformers"), ("adapter", "peft")):
        card = ModelCard.load(dest / folder / "README.md")
        assert card.data.base_model == cfg.model.name_or_path and card.data.library_name == library
        [result] = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
        assert result.metric_value == metrics["finetuned"]["accuracy"] and result.dataset_split == "test"
    stage_config = read_json((run / "adapter").resolve() / "adapter_config.json")
    assert read_json(dest / "adapter" / "adapter_config.json")["base_model_name_or_path"] == cfg.model.name_or_path
    assert stage_config == read_json(run / "adapter" / "adapter_config.json")  # the stage's own file untouched
    assert portable_base_id("embedded:SmolLM2-135M-Instruct") == EMBEDDED_HUB_ID

    unzipped = tmp_path / "elsewhere"
    shutil.unpack_archive(shutil.make_archive(str(tmp_path / "portable"), "zip", dest), unzipped)
    assert verify_folder(unzipped) is None
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(unzipped / "merged")(ids).logits
        original = AutoModelForCausalLM.from_pretrained(run / "merged")(ids).logits
        base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
        adapted = PeftModel.from_pretrained(base, unzipped / "adapter")(ids).logits
    assert torch.equal(merged, original) and torch.allclose(adapted, merged, atol=1e-4)

    with pytest.raises(ExportRunError, match="exists already"):
        export_run(run, dest)
    assert export_main([str(out), str(tmp_path / "x")]) == 1  # not a run folder: one line, no folder
    assert not (tmp_path / "x").exists()


def test_tensorboard_on_the_run_folder_shows_the_training_curves_and_the_test_metrics(flow_run):
    """``tensorboard --logdir <run>``: the trainer's curves (``adapter/tensorboard``, followed through the link)
    and the run's test metrics (``tensorboard/``: ``test/<side>/<metric>``, equal to ``metrics.json``)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    _, state, _ = flow_run
    run = Path(state.result()["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    runs = EventMultiplexer().AddRunsFromDirectory(str(run))
    runs.Reload()
    tags = {name: set(found["scalars"]) for name, found in runs.Runs().items()}
    assert {"adapter/tensorboard", "tensorboard"} <= set(tags), tags
    assert {"train/loss", "eval/loss", "eval/accuracy"} <= tags["adapter/tensorboard"]
    for side in ("base", "base_few_shot", "finetuned"):
        for name in ("accuracy", "macro_f1", "eval_loss"):
            [event] = runs.Scalars("tensorboard", f"test/{side}/{name}")
            assert abs(event.value - metrics[side][name]) < 1e-6 and event.step == metrics["train"]["steps"]
