"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case stops the run before training with one line
naming the file, the row and the field, exits 1, and leaves output.dir and its latest.json as they were — through
``--dry-run`` and through the real flow (a temporary Prefect server). Plus: inputs that look odd but are fine
(a UTF-8 byte-order mark, exact duplicates), the real CLI process with and without ``--debug``."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.finetune import main
from tasks.common.files import read_jsonl
from tests.bad_inputs import CASES, CORPUS, build_broken_models, case_argv, seed_output_dir, snapshot

pytestmark = pytest.mark.usefixtures("prefect_server")  # a temporary Prefect server (conftest)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    return build_broken_models(tiny_model_dir, tmp_path_factory.mktemp("broken-models"))


@pytest.fixture(scope="module", autouse=True)
def datasets_logs_to_the_current_stderr():
    """datasets' own log handler keeps the sys.stderr of the test that first used it (pytest closes it later),
    and a record logged to a closed stream prints "--- Logging error ---" with a traceback. Not the CLI's output
    (one process, one stderr): the handler is off here so that "no traceback" checks the CLI's own lines."""
    import logging

    __import__("datasets")  # configures its logger

    logger = logging.getLogger("datasets")
    handlers = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    for handler in handlers:
        logger.removeHandler(handler)
    yield
    for handler in handlers:
        logger.addHandler(handler)


@pytest.fixture()
def corpus_env(monkeypatch, tmp_path) -> Path:
    """Run from the corpus folder with Hub access off; returns an output.dir seeded as a previous run left it."""
    monkeypatch.chdir(CORPUS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    seed_output_dir(tmp_path / "out")
    return tmp_path / "out"


def test_the_corpus_is_large_and_every_case_is_distinct():
    assert len(CASES) >= 25
    assert len({c["id"] for c in CASES}) == len(CASES)
    assert len({json.dumps([c.get("set"), c.get("config"), c.get("model")]) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_stops_before_training_with_one_line_and_leaves_nothing(case, corpus_env, tiny_model_dir,
                                                                          broken_models, capsys):
    out = corpus_env
    before, latest = snapshot(out), (out / "latest.json").read_bytes()
    for mode in (["--dry-run"], []):  # the validate command, then the real flow
        code = main(case_argv(case, tiny_model_dir, broken_models, out) + mode)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1, (mode, err[-2000:])
        assert len(errors) == 1 and "Traceback" not in err, (mode, err[-3000:])
        assert re.search(case["error"], errors[0]), (mode, errors[0])
        assert snapshot(out) == before and (out / "latest.json").read_bytes() == latest, mode


def test_the_good_data_passes_the_dry_run_and_writes_nothing(corpus_env, tiny_model_dir, capsys):
    out = corpus_env
    before = snapshot(out)
    assert main(case_argv({}, tiny_model_dir, {}, out) + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "ok: good: classification" in printed and "Nothing was trained or written" in printed
    assert snapshot(out) == before


@pytest.mark.parametrize("odd, plain", [("bom.jsonl", "plain.jsonl"), ("bom.csv", "plain.jsonl")])
def test_a_utf8_byte_order_mark_is_accepted_and_changes_nothing(odd, plain, tmp_path):
    from configs.schema import DataConfig
    from tasks.stages.ingest import ingest

    records = [read_jsonl(ingest(DataConfig(path=str(CORPUS / name)), tmp_path / name).files["train"])
               for name in (odd, plain)]
    assert records[0] == records[1] and len(records[0]) == 12


def test_exact_duplicates_are_dropped_and_counted_not_an_error(tmp_path):
    from configs.schema import DataConfig
    from tasks.stages.ingest import ingest

    result = ingest(DataConfig(path=str(CORPUS / "exact_duplicates.jsonl")), tmp_path / "i")
    assert result.counts["train"].model_dump() == {"rows": 15, "empty_answers_dropped": 0, "duplicates_dropped": 3,
                                         "kept": 12}


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT)}  # run from the corpus folder: the clone's modules are not installed top-level
    return subprocess.run([sys.executable, "-m", "flows.finetune", *args], cwd=CORPUS, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_real_cli_process_prints_one_line_and_debug_prints_the_traceback(tmp_path, tiny_model_dir):
    case = next(c for c in CASES if c["id"] == "label-as-list")
    argv = case_argv(case, tiny_model_dir, {}, tmp_path / "out")
    plain = _cli(argv, tmp_path)
    assert plain.returncode == 1
    # the temporary Prefect server is a subprocess sharing stderr; what it logs while it stops is its own
    ours = plain.stderr.split("Stopping temporary server")[0]
    assert [line for line in ours.splitlines() if line.startswith("error:")] == [
        "error: label_list.jsonl: row 2: field 'label': expected a string or integer label, got list ['tool']"]
    assert "Traceback" not in ours
    assert not (tmp_path / "out").exists()
    debug = _cli(argv + ["--debug"], tmp_path)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "DataError: label_list.jsonl: row 2: field 'label'" in debug.stderr
