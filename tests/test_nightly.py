"""The nightly retrain on the tiny model: the first run is promoted, an unchanged re-run is a no-op, changed
data retrains, and a worse model is not promoted; plus the quality gate's rules on their own."""
import json
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.nightly import nightly_retrain
from tasks.stages.promote import quality_gate
from tests.conftest import classification_rows, tiny_config, write_classification_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


@pytest.mark.parametrize("candidate, base, incumbent, promote, reason", [
    (0.80, 0.10, None, True, None),
    (0.80, 0.10, 0.805, True, None),                 # within the 0.01 margin
    (0.80, 0.10, 0.82, False, "more than 0.01 below the promoted model's 0.8200"),
    (0.10, 0.10, None, False, "not above the base model's 0.1000"),
    (0.05, 0.10, 0.90, False, "not above the base model's"),
])
def test_quality_gate(candidate, base, incumbent, promote, reason):
    decision = quality_gate("classification", {"accuracy": candidate}, {"accuracy": base},
                            None if incumbent is None else {"accuracy": incumbent}, margin=0.01)
    assert decision["promote"] is promote and decision["metric"] == "accuracy"
    if reason:
        assert any(reason in r for r in decision["reasons"]), decision["reasons"]
    else:
        assert decision["reasons"] == []


def test_quality_gate_uses_rouge_for_generation_and_needs_the_base_score():
    decision = quality_gate("generation", {"rouge_l": 0.5}, None, None, margin=0.01)
    assert decision["metric"] == "rouge_l" and not decision["promote"]
    assert "not evaluated" in decision["reasons"][0]


def _artifact(flow_run_id, key: str) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return next(a.data for a in found if a.key == key)


def _run_folders(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith((".", "stages"))}


def test_nightly_promotes_skips_unchanged_data_and_keeps_a_worse_model_out(tmp_path, tiny_model_dir):
    data, out = write_classification_dir(tmp_path / "cls"), tmp_path / "out"
    # the promotion is under test: constrained, the barely trained tiny model and its base model both answer at
    # chance (1/3), so the free-running answers are scored (eval.constrain: none)
    cfg = tiny_config(data, out, tiny_model_dir, output={"run_name": None}, export={"enabled": False},
                      eval={"constrain": "none"})

    first = nightly_retrain(cfg)
    assert first["promote"], first
    latest = json.loads((out / "latest.json").read_text())
    assert latest["run_dir"] == str(Path(first["run_dir"]).resolve()) and latest["source"] == first["source"]

    start = time.perf_counter()
    state = nightly_retrain(cfg, return_state=True)
    seconds = time.perf_counter() - start
    second = state.result()
    assert "unchanged since the promoted run" in second["skipped"] and not second["promote"]
    assert _run_folders(out) == {Path(first["run_dir"]).name}, "a no-op must not train or write a run"
    assert seconds < 30, seconds  # generous: no stage runs at all
    assert "No-op" in _artifact(state.state_details.flow_run_id, "promotion")

    with open(data / "train.jsonl", "a") as f:  # new data arrives...
        f.writelines(json.dumps(r) + "\n" for r in classification_rows(2, seed=7))
    worse = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 1, "learning_rate": 1e-5})})
    state = nightly_retrain(worse, return_state=True)  # ...and a (deliberately) barely trained model
    third = state.result()
    assert not third["promote"] and Path(third["run_dir"], "metrics.json").is_file()
    assert any("not above the base model" in r for r in third["reasons"]), third["reasons"]
    assert third["incumbent"] is not None  # the promoted model, evaluated on the new test split
    assert json.loads((out / "latest.json").read_text()) == latest, "a rejected model must not move latest"
    artifact = _artifact(state.state_details.flow_run_id, "promotion")
    assert "Not promoted" in artifact and "not above the base model" in artifact

    fourth = nightly_retrain(cfg.model_copy(update={"promotion": cfg.promotion.model_copy(update={"margin": 1.0})}))
    assert fourth["promote"], fourth  # the changed data with the good config: retrained and promoted
    assert json.loads((out / "latest.json").read_text())["run_dir"] == str(Path(fourth["run_dir"]).resolve())


def test_a_failed_retrain_records_why_and_leaves_the_promoted_model(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "latest.json").write_text('{"run_dir": "previous", "source": null}')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": ["x"]}\n')
    state = nightly_retrain(tiny_config(bad, out, tiny_model_dir), return_state=True)
    assert state.is_failed()
    artifact = _artifact(state.state_details.flow_run_id, "promotion")
    assert "the retrain failed" in artifact and "DataError" in artifact and "row 1" in artifact
    assert json.loads((out / "latest.json").read_text())["run_dir"] == "previous"
