"""The whole flow on the tiny model, through Prefect (a temporary local server), plus the CLI's failure contract."""
import json
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.finetune import finetune, main
from tests.conftest import tiny_config


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    """A temporary Prefect server and database for this module, stopped cleanly at the end."""
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, tiny_model_dir, prefect_server):
    """The whole flow once on the tiny model: (config, returned metrics, output dir)."""
    from tests.conftest import classification_rows, write_jsonl

    root = tmp_path_factory.mktemp("flow")
    data = root / "cls"
    data.mkdir()
    write_jsonl(data / "train.jsonl", classification_rows(16, seed=1))
    write_jsonl(data / "test.jsonl", classification_rows(4, seed=2))
    cfg = tiny_config(data, root / "out", tiny_model_dir)
    return cfg, finetune(cfg), root / "out"


def test_whole_flow_meets_the_output_contract(flow_run):
    cfg, result, out = flow_run
    run = out / "run"
    assert result["run_dir"] == str(run)
    for folder in ("adapter", "merged", "onnx"):
        assert (run / folder).is_dir() and any((run / folder).iterdir()), folder
    assert (run / "merged" / "model.safetensors").is_file() and (run / "onnx" / "model.onnx").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for side in ("base", "finetuned"):
        assert {"accuracy", "macro_f1", "eval_loss", "perplexity", "n_examples"} <= set(metrics[side])
    assert metrics["finetuned"]["eval_loss"] < metrics["base"]["eval_loss"]
    assert 0 <= metrics["onnx"]["greedy_agreement"] <= 1
    assert {"train_tokens", "tokens_per_second", "wall_seconds"} <= set(metrics["train"])
    assert metrics["merge"]["max_abs_logit_diff"] <= cfg.merge.logit_atol
    assert metrics["config"]["data"]["path"] == cfg.data.path
    assert set(metrics["stage_seconds"]) == {"prepare_base_model", "ingest", "split", "evaluate_base", "train",
                                             "merge", "evaluate_finetuned", "export"}
    report = (run / "report.md").read_text()
    assert "| accuracy |" in report and "greedy agreement" in report
    assert not list(run.glob(".*tmp-*"))


def test_latest_points_at_the_last_good_run_and_a_failed_run_leaves_it(flow_run, tmp_path, capsys):
    cfg, _, out = flow_run
    latest = json.loads((out / "latest.json").read_text())
    assert latest["run_dir"] == str((out / "run").resolve())
    assert Path(latest["merged"], "model.safetensors").is_file() and Path(latest["onnx"], "model.onnx").is_file()
    before = (out / "latest.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": ["x"]}\n')
    assert main(["--set", f"data.path={bad}", "--set", f"model.name_or_path={cfg.model.name_or_path}",
                 "--set", f"output.dir={out}", "--set", "output.run_name=broken"]) == 1
    assert "row 1: field 'label'" in capsys.readouterr().err
    assert (out / "latest.json").read_bytes() == before


def test_cli_bad_config_exits_non_zero_with_one_line(capsys):
    assert main(["--set", "lora.rank=4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lora.rank: Extra inputs are not permitted" in err


def test_cli_bad_data_fails_before_training_with_one_line(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n')
    code = main(["--set", f"data.path={bad}", "--set", f"model.name_or_path={tiny_model_dir}",
                 "--set", f"output.dir={tmp_path / 'out'}", "--set", "output.run_name=r"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {bad}: row 2: field 'text': expected a non-empty string, got str ''"
    assert not (tmp_path / "out" / "r" / "adapter").exists()
