"""The one cache policy (flows/caching.py): a stage's key covers every first-party module its function imports
(directly or not), the library versions that shape it, its declared config sections and the data's content —
never where the data lives; sweep trials are keyed the same way."""
import shutil
from pathlib import Path

import pytest

import flows.caching as caching
from flows.caching import StageCache, code_fingerprint, import_closure, stage_key
from flows.stages import EVALUATE, INGEST, TRAIN
from tests.conftest import tiny_config


@pytest.fixture()
def source_copy(tmp_path, monkeypatch) -> Path:
    """A copy of the first-party packages, which the key functions read instead of the checkout."""
    for package in caching.FIRST_PARTY:
        shutil.copytree(caching.ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(caching, "ROOT", tmp_path)
    return tmp_path


def append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(f"\n{line}\n")


def test_the_closure_follows_lazy_and_indirect_imports():
    names = {str(p.relative_to(caching.ROOT)) for p in import_closure("tasks.stages.train")}
    # train imports padding_free, chat, loss, base_model and split directly, ingest through split, and
    # configs.schema, which imports tasks.common.metrics
    assert {"tasks/stages/train.py", "tasks/common/padding_free.py", "tasks/common/chat.py", "tasks/common/loss.py",
            "tasks/base_model.py", "tasks/stages/split.py", "tasks/stages/ingest.py", "tasks/common/files.py",
            "configs/schema.py", "tasks/common/metrics.py", "tasks/__init__.py"} <= names
    assert not {"tasks/deploy/export.py", "tasks/stages/evaluate.py", "flows/finetune.py"} & names


@pytest.mark.parametrize("helper", ["tasks/common/padding_free.py", "tasks/base_model.py",
                                    "tasks/common/chat.py", "tasks/stages/ingest.py", "configs/schema.py"])
def test_editing_a_helper_the_stage_imports_changes_its_key(source_copy, helper):
    before = stage_key(TRAIN, None, "x")
    append(source_copy / helper, "NEW_STATEMENT = 1")
    assert stage_key(TRAIN, None, "x") != before


def test_editing_an_unrelated_module_keeps_the_key(source_copy):
    before = stage_key(TRAIN, None, "x"), code_fingerprint(TRAIN.fn)
    append(source_copy / "tasks" / "export.py", "NEW_STATEMENT = 1")
    append(source_copy / "flows" / "finetune.py", "NEW_STATEMENT = 1")
    assert (stage_key(TRAIN, None, "x"), code_fingerprint(TRAIN.fn)) == before


def test_a_changed_library_version_changes_the_key(monkeypatch):
    before = stage_key(TRAIN, None, "x")
    real = caching.importlib.metadata.version
    monkeypatch.setattr(caching.importlib.metadata, "version",
                        lambda name: "99.0" if name == "transformers" else real(name))
    assert stage_key(TRAIN, None, "x") != before
    assert stage_key(INGEST, None, "x") == stage_key(INGEST, None, "x")


def test_keys_hold_the_data_content_not_its_path(tmp_path, tiny_model_dir):
    a = tiny_config(tmp_path / "a", tmp_path / "out", tiny_model_dir)
    b = tiny_config(tmp_path / "elsewhere" / "b", tmp_path / "out", tiny_model_dir)
    assert stage_key(INGEST, a, "same content") == stage_key(INGEST, b, "same content")
    assert stage_key(INGEST, a, "same content") != stage_key(INGEST, a, "other content")
    changed = a.model_copy(update={"data": a.data.model_copy(update={"format": "alpaca"})})
    assert stage_key(INGEST, changed, "same content") != stage_key(INGEST, a, "same content")


def test_only_the_declared_sections_count(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path / "d", tmp_path / "out", tiny_model_dir)
    other_eval = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 3})})
    assert stage_key(TRAIN, other_eval, "x") == stage_key(TRAIN, cfg, "x")
    assert stage_key(EVALUATE, other_eval, "x") != stage_key(EVALUATE, cfg, "x")


def test_the_prefect_key_is_the_folder_key():
    class Ctx:
        class task:  # noqa: N801 - stands in for the task run context's task
            name = "train"

    policy = StageCache()
    key = policy.compute_key(Ctx, {"out_dir": "/a/stages/train/abc", "callback_factories": [object()]}, {})
    assert key == policy.compute_key(Ctx, {"out_dir": "/elsewhere/stages/train/abc"}, {})
    assert key != policy.compute_key(Ctx, {"out_dir": "/a/stages/train/abd"}, {})
    assert StageCache(key="k").compute_key(Ctx, {}, {}) == "k"


def test_the_flow_imports_no_model_library_until_a_stage_runs():
    """A fully cached run never loads torch/transformers (about 2 s of the ~10 s budget of a cached re-run): the
    stages import them inside their functions."""
    import subprocess
    import sys

    code = ("import sys, flows.finetune, flows.sweep, flows.nightly; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=caching.ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
