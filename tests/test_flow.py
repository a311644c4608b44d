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


def test_whole_flow_meets_the_output_contract(tmp_path, classification_dir, tiny_model_dir):
    cfg = tiny_config(classification_dir, tmp_path / "out", tiny_model_dir)
    result = finetune(cfg)
    run = tmp_path / "out" / "run"
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
    assert metrics["config"]["data"]["path"] == str(classification_dir)
    assert set(metrics["stage_seconds"]) == {"prepare_base_model", "ingest", "split", "evaluate_base", "train",
                                             "merge", "evaluate_finetuned", "export"}
    report = (run / "report.md").read_text()
    assert "| accuracy |" in report and "greedy agreement" in report
    assert not list(run.glob(".*tmp-*"))


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
