"""A 4-trial hyperparameter sweep on the tiny model through Prefect: trials as mapped tasks (two at a time),
Optuna's samples inside the space, best picked on validation, best + baseline measured on test, results table
and best config written, and a re-run served from the cache."""
import json
import shutil
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from configs.schema import load_config, load_sweep, trial_config
from flows.sweep import sweep
from tests.conftest import tiny_config, write_classification_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

SPACE = {"train.learning_rate": {"log_uniform": [1e-3, 3e-2]}, "lora.r": {"choice": [4, 8]},
         "train.per_device_train_batch_size": {"choice": [4, 8]}}


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(write_classification_dir(root / "cls"), root / "out", tiny_model_dir,
                      train={"num_train_epochs": 2}, output={"run_name": "sweep"})
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    spec = {"config": str(root / "tiny.yaml"), "sampler": "random", "n_trials": 4, "seed": 3, "max_parallel": 2,
            "finetune": {"eval": {"evaluate_base": False}, "export": {"enabled": False}}, "space": SPACE}
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def _task_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return runs, {a.key: a for a in artifacts}


def _trial_runs(runs):
    return [r for r in runs if r.name.startswith("trial")]


@pytest.fixture(scope="module")
def first_sweep(sweep_files):
    spec, baseline = load_sweep(sweep_files / "sweep.yaml")
    state = sweep(spec, baseline, return_state=True)
    assert state.is_completed(), state.message
    return spec, baseline, state


def test_four_trials_and_the_baseline_run_with_samples_inside_the_space(first_sweep):
    spec, baseline, state = first_sweep
    result = state.result()
    rows = result["trials"]
    assert [r["trial"] for r in rows] == ["baseline", "trial-0", "trial-1", "trial-2", "trial-3"]
    assert all(r["error"] is None and 0 <= r["validation_accuracy"] <= 1 and r["steps"] > 0 for r in rows)
    assert rows[0]["train.learning_rate"] == baseline.train.learning_rate and rows[0]["lora.r"] == baseline.lora.r
    sampled = [(r["train.learning_rate"], r["lora.r"], r["train.per_device_train_batch_size"]) for r in rows[1:]]
    assert len(set(sampled)) == 4
    assert all(1e-3 <= lr <= 3e-2 and r in (4, 8) and b in (4, 8) for lr, r, b in sampled)
    # the trials really trained with their own settings: batch size sets the number of optimizer steps
    by_batch = {b: {r["steps"] for r in rows if r["train.per_device_train_batch_size"] == b} for b in (4, 8)}
    assert all(len(steps) == 1 for steps in by_batch.values() if steps)
    if by_batch[4] and by_batch[8]:
        assert by_batch[4].pop() > by_batch[8].pop()


def test_best_is_chosen_on_validation_then_measured_on_test_with_the_baseline(first_sweep):
    spec, baseline, state = first_sweep
    result = state.result()
    rows = result["trials"]
    best = max(rows, key=lambda r: r["validation_accuracy"])  # ties: the first, as Python's max
    assert result["best"]["trial"] == best["trial"]
    assert result["best"]["validation_accuracy"] == best["validation_accuracy"]
    for entry in (result["best"], result["baseline"]):
        assert entry["test"]["n_examples"] == 12 and 0 <= entry["test"]["accuracy"] <= 1
    paths = result["paths"]
    written = load_config(paths["best_config"])
    assert written == trial_config(baseline, result["best"]["params"], "test")
    assert json.loads(Path(paths["trials"]).read_text()) == rows
    summary = Path(paths["summary"]).read_text()
    assert f"**Best: {best['trial']}**" in summary and "test accuracy" in summary


def test_trials_are_mapped_tasks_running_two_at_a_time_with_artifacts(first_sweep):
    _, _, state = first_sweep
    runs, artifacts = _task_runs(state.state_details.flow_run_id)
    runs = _trial_runs(runs)
    assert len(runs) == 5 and all(r.state.is_completed() for r in runs)
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # some overlap in time
    table = artifacts["sweep-trials"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["trial"] for row in table] == [r["trial"] for r in state.result()["trials"]]
    assert "Best:" in artifacts["sweep-summary"].data


def test_trials_run_the_declared_stages_named_by_trial(first_sweep):
    _, _, state = first_sweep
    runs, _ = _task_runs(state.state_details.flow_run_id)
    names = {r.name for r in runs}
    for trial in ("baseline", "trial-0", "trial-1", "trial-2", "trial-3"):
        assert {f"train-{trial}", f"merge-{trial}", f"evaluate-{trial}"} <= names, sorted(names)


def test_rerunning_the_same_sweep_is_served_from_the_cache(first_sweep, tmp_path):
    """A new study (another Optuna storage) of the same sweep draws the same samples: every stage is Cached."""
    spec, baseline, state = first_sweep
    again = sweep(spec.model_copy(update={"storage": str(tmp_path / "other.journal")}), baseline, return_state=True)
    runs, _ = _task_runs(again.state_details.flow_run_id)
    stages = [r for r in runs if r.name.split("-", 1)[0] in ("train", "merge", "evaluate", "ingest", "split")]
    assert len(stages) >= 17 and {r.state.name for r in stages} == {"Cached"}, [(r.name, r.state.name) for r in runs]
    assert again.result()["trials"] == state.result()["trials"]


def test_rerunning_a_finished_sweep_resumes_its_study_and_runs_no_trial(first_sweep):
    spec, baseline, state = first_sweep
    assert (Path(baseline.output.dir) / "sweeps" / "optuna.journal").is_file()
    again = sweep(spec, baseline, return_state=True)
    runs, _ = _task_runs(again.state_details.flow_run_id)
    assert _trial_runs(runs) == [], [r.name for r in runs]
    assert again.result()["trials"] == state.result()["trials"]
    assert again.result()["best"] == state.result()["best"]


def _fake_result(accuracy: float, merged: str):
    from tasks.stages.evaluate import EvalResult
    from tasks.stages.sweep import TrialResult
    from tasks.stages.train import TrainSummary

    validation = EvalResult(task="classification", accuracy=accuracy, macro_f1=accuracy, eval_loss=1.0,
                            perplexity=2.72, n_examples=4, bf16=False, max_new_tokens=4, wall_seconds=1.0)
    return TrialResult(validation=validation, merged=merged, train=TrainSummary.model_construct(
        steps=3, wall_seconds=2.0))


def _published(folder: Path) -> str:
    from tasks.common.files import atomic_dir

    with atomic_dir(folder) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
    return str(folder)


def test_an_interrupted_sweep_resumes_from_its_storage_without_rerunning_finished_trials(sweep_files, tmp_path):
    """The sweep is killed while its third trial runs: the next run keeps the baseline and trial-0 from the
    journal, runs the interrupted trial's sample again and then the rest; a merged model deleted since is
    trained again."""
    from flows.sweep import search
    from tasks.stages.sweep import make_study

    spec, baseline = load_sweep(sweep_files / "sweep.yaml")
    spec = spec.model_copy(update={"max_parallel": 1, "n_trials": 3})
    storage = str(tmp_path / "optuna.journal")
    ran, params = [], {}

    def run_configs(named):
        [(name, cfg)] = named
        ran.append(name)
        params[name] = (cfg.train.learning_rate, cfg.lora.r, cfg.train.per_device_train_batch_size)
        if name == "trial-1" and len(ran) == 3:
            raise KeyboardInterrupt  # the flow run is killed during this trial
        return [(_fake_result(cfg.train.learning_rate, _published(tmp_path / name)), None)]

    with pytest.raises(KeyboardInterrupt):
        search(spec, baseline, "accuracy", "maximize", run_configs, make_study(spec, "maximize", storage, "s"))
    assert ran == ["baseline", "trial-0", "trial-1"]

    ran.clear()
    rows, done = search(spec, baseline, "accuracy", "maximize", run_configs,
                        make_study(spec, "maximize", storage, "s"))
    assert ran == ["trial-2", "trial-3"]  # trial-1 (told failed) is sampled again as trial-2, then one more
    assert params["trial-2"] == params["trial-1"]
    assert [r["trial"] for r in rows] == ["baseline", "trial-0", "trial-2", "trial-3"] == list(done)
    assert done["trial-0"]["validation"] == params["trial-0"][0]

    shutil.rmtree(tmp_path / "trial-0")  # its merged model is gone: the study cannot vouch for it any more
    ran.clear()
    more = spec.model_copy(update={"n_trials": 4})  # and the sweep is extended by one trial
    rows, done = search(more, baseline, "accuracy", "maximize", run_configs,
                        make_study(more, "maximize", storage, "s"))
    assert ran == ["trial-4", "trial-5"] and params["trial-4"] == params["trial-0"]
    assert [r["trial"] for r in rows] == ["baseline", "trial-2", "trial-3", "trial-4", "trial-5"]

    ran.clear()
    rows_again, _ = search(more, baseline, "accuracy", "maximize", run_configs,
                           make_study(more, "maximize", storage, "s"))
    assert ran == [] and rows_again == rows


def test_a_failed_trial_is_recorded_and_told_to_optuna_and_the_rest_go_on(sweep_files):
    from configs.schema import SweepConfig
    from flows.sweep import search
    from tasks.stages.sweep import make_study, tell

    spec, baseline = load_sweep(sweep_files / "sweep.yaml")
    spec = SweepConfig.model_validate(spec.model_dump() | {"sampler": "grid", "n_trials": 3, "space": {
        "lora.r": {"choice": [4, 8]}, "train.per_device_train_batch_size": {"choice": [4, 8]}}})
    waves = []

    def run_configs(named):  # stands in for the mapped trial tasks: the second trial of the first wave fails
        waves.append(len(named))
        return [(None, "MergeCheckError: merged weights equal the base weights") if len(waves) == 1 and i == 1
                else (_fake_result(c.lora.r / 10, f"m{i}"), None) for i, (_, c) in enumerate(named)]

    rows, done = search(spec, baseline, "accuracy", "maximize", run_configs)
    assert waves == [2, 2]  # the baseline + 3 grid trials, in waves of max_parallel=2
    assert [r["trial"] for r in rows] == ["baseline", "trial-0", "trial-1", "trial-2"]
    assert rows[1]["error"].startswith("MergeCheckError") and rows[1]["validation_accuracy"] is None
    assert set(done) == {"baseline", "trial-1", "trial-2"}
    study = make_study(spec, "maximize")
    trial = study.ask()
    tell(study, trial, None)
    assert study.trials[0].state.name == "FAIL"


def test_a_finetune_run_of_the_baseline_config_reuses_the_baseline_trial(first_sweep):
    """Trials run the declared stages keyed as in the finetune flow: the same config trains, merges and is
    evaluated on test once, whichever flow ran it first."""
    from flows.finetune import finetune

    _, baseline, state = first_sweep
    cfg = baseline.model_copy(update={"output": baseline.output.model_copy(update={"run_name": "baseline"})})
    result = finetune(cfg, publish_latest=False)
    states = result["stage_states"]
    assert states["train"] == states["merge"] == states["evaluate_finetuned"] == "Cached", states
    assert result["finetuned"] == state.result()["baseline"]["test"]


def test_a_trial_killed_between_keeping_its_result_and_telling_optuna_is_kept_on_resume():
    """``record`` writes the trial's entry, then tells Optuna: a sweep killed between the two leaves a RUNNING trial
    with its result; resuming keeps it (told its value now) instead of training it again, while a trial killed
    mid-training is told failed and run again."""
    import optuna
    from optuna.trial import TrialState

    from tasks.stages.sweep import restore

    study = optuna.create_study(direction="maximize")
    finished, cut, running = study.ask(), study.ask(), study.ask()
    for trial in (finished, cut, running):
        trial.suggest_float("train.learning_rate", 1e-3, 3e-2)
    entry = {"trial": "trial-0", "params": finished.params, "validation": 0.5, "merged": None}
    finished.set_user_attr("sweep", entry)
    study.tell(finished, 0.5)
    cut_entry = {"trial": "trial-1", "params": cut.params, "validation": 0.7, "merged": None}
    cut.set_user_attr("sweep", cut_entry)  # killed here, before study.tell
    kept, again = restore(study)
    assert kept == [entry, cut_entry] and again == [running.params]
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL] and study.trials[1].value == 0.7
