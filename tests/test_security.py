"""Security defaults (issue 7): a Hub token comes from HF_TOKEN or a Prefect Secret block and never shows up in
outputs, logs, artifacts, parameters or the terminal; a token in a config is refused without being echoed; a
model's own code runs only with ``model.trust_remote_code``; weights and adapters load from safetensors only.

The server's loopback-only binding is tests/test_deployments.py::test_server_listens_on_loopback_only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                            FlowRunFilterId, LogFilter, LogFilterFlowRunId)
from prefect.exceptions import ParameterTypeError
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

import flows.finetune
from configs.schema import ConfigError, FinetuneConfig, ModelConfig, load_config
from flows.finetune import finetune, main
from flows.retries import is_transient
from tasks.base_model import UnsafeModelError, load_adapter, load_model, load_tokenizer, use_hub_token
from tests.conftest import tiny_config, write_classification_dir

# Recognisable fake tokens in the Hugging Face format ("hf_" + 34 letters/digits).
ENV_TOKEN = "hf_EnvTokenForTheSecurityTest0000000001"
BLOCK_TOKEN = "hf_BlockTokenForTheSecurityTest000000002"
BLOCK_NAME = "security-test-hub-token"
TOKENS = (ENV_TOKEN, BLOCK_TOKEN)

# What the libraries would send to the Hub, as seen from inside the flow run's ingest task.
SEEN: dict[str, str | None] = {}


def _ingest_seeing_the_token(data, out_dir):
    """The ingest stage, first recording the token huggingface_hub (hence transformers, datasets, peft) would
    send with a Hub request from this task: ``get_token()`` and the ``authorization`` header it builds."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import build_hf_headers

    from tasks.stages import ingest

    SEEN["get_token"] = get_token()
    SEEN["authorization"] = build_hf_headers().get("authorization")
    return ingest.ingest(data, out_dir)


def _leaks(text: str | bytes) -> list[str]:
    """Which of the test tokens occur in ``text``."""
    return [t for t in TOKENS if (t.encode() if isinstance(text, bytes) else t) in text]


@pytest.fixture(scope="module")
def secured_run(request, prefect_server, tmp_path_factory, tiny_model_dir) -> dict:
    """One whole tiny flow run (export off) with HF_TOKEN set to one fake token and a Secret block holding
    another named in the config; returns its outputs, its Prefect records and the captured terminal."""
    from prefect.blocks.system import Secret

    Secret(value=BLOCK_TOKEN).save(BLOCK_NAME, overwrite=True)
    root = tmp_path_factory.mktemp("secured")
    cfg = tiny_config(write_classification_dir(root / "cls"), root / "out", tiny_model_dir,
                      model={"hf_token_secret": BLOCK_NAME}, export={"enabled": False})
    capture = request.config.pluginmanager.getplugin("capturemanager")
    capture.read_global_capture()  # start from an empty terminal capture
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", ENV_TOKEN)
        mp.setattr(flows.finetune, "INGEST", dataclasses.replace(flows.finetune.INGEST, fn=_ingest_seeing_the_token))
        state = finetune(cfg, return_state=True)
        APILogHandler().flush()
    terminal = capture.read_global_capture()
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs, page = [], None
        while page is None or len(page) == 200:  # the API returns at most 200 per call
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                    limit=200, offset=len(logs))
            logs += page
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        flow_run = client.read_flow_run(run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    return {"out": root / "out", "logs": logs, "artifacts": artifacts, "flow_run": flow_run,
            "task_runs": task_runs, "terminal": terminal, "database": database, "seen": dict(SEEN)}


def test_the_secret_blocks_token_is_what_the_libraries_send_inside_the_run(secured_run):
    # the block, named in the config, wins over HF_TOKEN from the environment
    assert secured_run["seen"] == {"get_token": BLOCK_TOKEN, "authorization": f"Bearer {BLOCK_TOKEN}"}


def test_no_token_in_any_file_the_run_wrote(secured_run):
    out = secured_run["out"]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert {"metrics.json", "report.md", "train_log.json", "predictions.jsonl"} <= {f.name for f in files}
    assert any(".prefect-results" in f.parts for f in files) and any("stages" in f.parts for f in files)
    assert BLOCK_NAME in (out / "run" / "metrics.json").read_text()  # the config is there, by block name
    assert {str(f.relative_to(out)): _leaks(f.read_bytes()) for f in files if _leaks(f.read_bytes())} == {}


def test_no_token_in_the_runs_logs_artifacts_or_parameters(secured_run):
    messages = [log.message for log in secured_run["logs"]]
    assert any("Finished in state Completed" in m for m in messages)  # the flow's own log lines...
    assert any(m.startswith("step ") for m in messages)  # ...and its tasks' (the trainer's steps)
    assert [m for m in messages if _leaks(m)] == []
    artifacts = {a.key: a.model_dump_json() for a in secured_run["artifacts"]}
    assert {"metrics", "model-card", "run-folder", "training-progress"} <= set(artifacts)
    assert BLOCK_NAME in artifacts["model-card"]  # the card's config names the block
    assert {key: _leaks(text) for key, text in artifacts.items() if _leaks(text)} == {}
    flow_run = secured_run["flow_run"]
    assert flow_run.parameters["cfg"]["model"]["hf_token_secret"] == BLOCK_NAME
    assert _leaks(flow_run.model_dump_json()) == []
    assert len(secured_run["task_runs"]) >= 6
    assert [t.name for t in secured_run["task_runs"] if _leaks(t.model_dump_json())] == []


def test_no_token_in_clear_anywhere_in_prefects_database(secured_run):
    """Everything Prefect stored (logs, parameters, states, artifacts, the Secret block itself, which Prefect
    encrypts) is in its SQLite files; neither token is in them as text."""
    files = [f for f in secured_run["database"].parent.iterdir() if f.name.startswith("prefect-test.db")]
    content = b"".join(f.read_bytes() for f in files)
    assert BLOCK_NAME.encode() in content  # the flow run's parameters are in there
    assert _leaks(content) == []


def test_no_token_on_the_terminal(secured_run, request):
    if request.config.getoption("capture") == "no":
        pytest.skip("the terminal is not captured under -s")
    out, err = secured_run["terminal"]
    assert "metrics: " in out and "Finished in state Completed" in err  # the summary and Prefect's log lines
    assert f"Hub token: from Prefect Secret block {BLOCK_NAME!r}" in err  # said by name only
    assert _leaks(out + err) == []


def test_a_missing_secret_block_stops_the_run_before_any_stage_with_one_line(prefect_server, tmp_path, capsys,
                                                                          tiny_model_dir):
    with pytest.raises(ConfigError, match=r"^model\.hf_token_secret: no Prefect Secret block named 'no-such'"):
        use_hub_token(ModelConfig(hf_token_secret="no-such"))
    from prefect.blocks.system import Secret

    Secret(value={"user": "x"}).save("not-a-token", overwrite=True)
    with pytest.raises(ConfigError, match="does not hold a token string"):
        use_hub_token(ModelConfig(hf_token_secret="not-a-token"))
    out = tmp_path / "out"
    assert main(["--set", f"data.path={write_classification_dir(tmp_path / 'cls')}", "--set",
                 f"model.name_or_path={tiny_model_dir}", "--set", f"output.dir={out}", "--set",
                 "model.hf_token_secret=no-such"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: model.hf_token_secret: no Prefect Secret block")
    assert not (out / "stages").exists()


def test_without_a_block_the_environment_token_is_left_for_the_libraries(monkeypatch):
    from huggingface_hub import get_token

    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    use_hub_token(ModelConfig())
    assert os.environ["HF_TOKEN"] == get_token() == ENV_TOKEN


# --- a token in a config ---

@pytest.mark.parametrize("override, where", [
    (f"model.hf_token={BLOCK_TOKEN}", "model.hf_token"),  # an unknown key: refused as a token, not as extra
    (f"train.learning_rate={BLOCK_TOKEN}", "train.learning_rate"),  # a bad type would echo the value
    (f"data.path=https://user:{BLOCK_TOKEN}@example.com/data.jsonl", "data.path"),
    (f"lora.target_modules=[q_proj, {BLOCK_TOKEN}]", "lora.target_modules.1"),
])
def test_a_token_in_the_config_is_refused_without_echoing_it(override, where, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"{where}: looks like a Hugging Face token" in message
    assert "HF_TOKEN" in message and "model.hf_token_secret" in message
    assert BLOCK_TOKEN[:12] not in message and BLOCK_TOKEN[-12:] not in message
    assert main(["--set", override]) == 1  # the CLI: one line, no token
    terminal = capsys.readouterr()
    assert where in terminal.err and _leaks(terminal.out + terminal.err) == []


def test_the_same_error_path_echoes_ordinary_bad_values_and_hf_names_are_not_tokens():
    with pytest.raises(ConfigError, match="got 'not-a-number'"):  # what the token check keeps from happening
        load_config(None, ["train.learning_rate=not-a-number"])
    assert load_config(None, ["name=hf_demo"]).name == "hf_demo"


def test_a_token_in_a_deployments_parameters_is_refused_by_name(tiny_model_dir):
    """A deployment's run parameters are validated by Prefect on the worker; the failure names the field."""
    tree = {"data": {"path": "x"}, "model": {"name_or_path": tiny_model_dir, "hf_token": BLOCK_TOKEN}}
    with pytest.raises(ParameterTypeError) as err:
        finetune.validate_parameters({"cfg": tree})
    assert "model.hf_token: looks like a Hugging Face token" in str(err.value) and _leaks(str(err.value)) == []


# --- model code and weights ---

class _Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle ran')",)


def _pickle_bomb(path: Path, marker: Path) -> Path:
    """A ``torch.save`` file whose unpickling (``torch.load(weights_only=False)``) writes ``marker``."""
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, path)
    control = path.with_name(path.name + ".control")  # prove the payload is live, on a copy and another marker
    torch.save({"x": _Payload(marker.with_suffix(".control"))}, control)
    torch.load(control, weights_only=False)
    assert marker.with_suffix(".control").is_file()
    control.unlink()
    return path


def _custom_code_model(tiny_model_dir: str, folder: Path, marker: Path, model_type: str) -> Path:
    """The tiny model with ``auto_map`` pointing at its own ``custom_modeling.py``, which writes ``marker`` when
    imported (it subclasses llama, so it loads when trusted)."""
    shutil.copytree(tiny_model_dir, folder)
    (folder / "custom_modeling.py").write_text(f"""import pathlib
pathlib.Path({str(marker)!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class CustomConfig(LlamaConfig):
    model_type = {model_type!r}

class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
""")
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": model_type, "architectures": ["CustomForCausalLM"],
               "auto_map": {"AutoConfig": "custom_modeling.CustomConfig",
                            "AutoModelForCausalLM": "custom_modeling.CustomForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def modules_cache(tmp_path, monkeypatch) -> Path:
    """transformers copies trusted custom code into HF_MODULES_CACHE: a temporary one, not ~/.cache."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return tmp_path / "modules"


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
    assert FinetuneConfig.model_validate({"data": {"path": "x"}}).model.trust_remote_code is False


def test_custom_model_code_is_refused_and_never_run_unless_trusted(tiny_model_dir, tmp_path, modules_cache):
    marker = tmp_path / "custom-code-ran"
    folder = _custom_code_model(tiny_model_dir, tmp_path / "custom_llama", marker, "security-test-llama")
    with pytest.raises(UnsafeModelError, match="model.trust_remote_code: true") as err:
        load_model(str(folder))
    assert not is_transient(err.value)
    load_tokenizer(str(folder))  # its tokenizer files name a built-in class: no custom code involved
    assert not marker.exists()
    trusted = load_model(str(folder), trust_remote_code=True)  # control: the code is live when trusted
    assert type(trusted).__name__ == "CustomForCausalLM" and marker.is_file()


def test_custom_code_beside_a_builtin_architecture_is_not_run(tiny_model_dir, tmp_path, modules_cache):
    marker = tmp_path / "custom-code-ran"
    folder = _custom_code_model(tiny_model_dir, tmp_path / "llama_with_code", marker, "llama")
    assert type(load_model(str(folder))).__name__ == "LlamaForCausalLM"  # transformers' own class
    assert not marker.exists()


def test_pickle_weights_are_refused_and_never_unpickled(tiny_model_dir, tmp_path):
    marker = tmp_path / "pickle-ran"
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "pickled"))
    (folder / "model.safetensors").unlink()
    _pickle_bomb(folder / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeModelError, match=r"only as pickle \(pytorch_model\.bin\)") as err:
        load_model(str(folder))
    assert not is_transient(err.value)  # transformers' own OSError would be retried as an I/O error
    assert load_tokenizer(str(folder)).chat_template  # tokenizer files are JSON: the .bin is not touched
    assert not marker.exists()


def test_adapters_load_from_safetensors_only(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    assert isinstance(load_adapter(load_model(tiny_model_dir), adapter), PeftModel)  # control: it loads
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    _pickle_bomb(adapter / "adapter_model.bin", marker)
    with pytest.raises(UnsafeModelError, match=r"no adapter_model\.safetensors \(only pickle weights "
                                               r"adapter_model\.bin"):
        load_adapter(load_model(tiny_model_dir), adapter)
    # why load_adapter checks first: peft itself falls back to torch.load of the pickle (weights_only=True,
    # whose restricted unpickler refuses this payload; it is still an unpickling of an untrusted file)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PeftModel.from_pretrained(load_model(tiny_model_dir), str(adapter))
    assert not marker.exists()
