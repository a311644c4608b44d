"""MLflow for real: a tracking server started here (SQLite backend store, a file artifact store, 127.0.0.1) and the
nightly retrain of the tiny job with ``train.report_to: [tensorboard, mlflow]``. The run is tracked (the trainer's
live curves, the test metrics, the config, the published folders as artifacts), the promoted model is registered
in the Model Registry under the alias ``champion`` and loads from there; an unchanged nightly registers nothing; a
later run whose training comes from the cache still gets its curves (from ``train_log.json``)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import tiny_config, write_classification_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free 127.0.0.1 port with a SQLite store and a file artifact root; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                               "--default-artifact-root", (root / "artifacts").as_uri(), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the MLflow server did not answer /health within 180 s"
        time.sleep(1)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


def test_a_promoted_nightly_run_is_tracked_and_registered_as_champion(mlflow_server, prefect_server, tmp_path,
                                                                       tiny_model_dir, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from flows.finetune import finetune
    from flows.nightly import nightly_retrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    cfg = tiny_config(write_classification_dir(tmp_path / "cls"), tmp_path / "out", tiny_model_dir,
                      train={"report_to": ["tensorboard", "mlflow"]},
                      eval={"baseline_examples": 6, "few_shot": 0, "constrain": "none"},  # as in test_nightly
                      output={"run_name": None})
    client = MlflowClient(mlflow_server)
    decision = nightly_retrain(cfg)
    assert decision["promote"] and decision["mlflow_model_version"] == "1", decision
    run_dir = Path(decision["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    experiment = client.get_experiment_by_name("tiny")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    curve = client.get_metric_history(run.info.run_id, "loss")  # logged by the trainer, live
    assert len(curve) >= 3 and [m.step for m in curve] == sorted(m.step for m in curve)
    assert run.data.metrics["test/finetuned/accuracy"] == pytest.approx(metrics["finetuned"]["accuracy"])
    exported = metrics["onnx"]["genai-int4"]["accuracy"]
    assert run.data.metrics["export/genai-int4/accuracy"] == pytest.approx(exported)
    assert run.data.params["lora.r"] == "8" and run.data.params["train.learning_rate"] == "0.01"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.md", "config.yaml", "loss_curve.png", "adapter", "merged", "onnx"} <= top
    assert "merged/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "merged")}
    onnx = {a.path for a in client.list_artifacts(run.info.run_id, "onnx/genai-int4")}
    assert "onnx/genai-int4/model.onnx" in onnx

    champion = client.get_model_version_by_alias("tiny", "champion")
    assert champion.run_id == run.info.run_id and champion.version == "1"
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny@champion", dst_path=str(tmp_path / "got")))
    published = (run_dir / "merged" / "model.safetensors").resolve().read_bytes()
    assert (local / "model.safetensors").read_bytes() == published  # the model that was measured

    assert nightly_retrain(cfg)["skipped"]  # unchanged: no retrain, no new version
    assert [v.version for v in client.search_model_versions("name='tiny'")] == ["1"]

    again = finetune(cfg.model_copy(update={"output": cfg.output.model_copy(update={"run_name": "again"})}))
    assert again["stage_states"]["train"] == "Cached"
    cached_curve = client.get_metric_history(again["mlflow_run_id"], "loss")  # from train_log.json
    assert [(m.step, m.value) for m in cached_curve] == [(m.step, m.value) for m in curve]
