from pathlib import Path

import pytest

from configs.schema import CONFIG_DIR, ConfigError, FinetuneConfig, apply_overrides, load_config


def test_banking77_config_loads_with_its_documented_values():
    cfg = load_config(CONFIG_DIR / "banking77.yaml")
    assert cfg.data.path == "PolyAI/banking77"
    assert cfg.data.columns == {"category": "label"}
    assert cfg.model.name_or_path == "embedded:SmolLM2-135M-Instruct"
    assert cfg.model.trust_remote_code is False
    assert cfg.lora.target_modules == "all-linear"


def test_default_config_is_banking77():
    assert load_config().name == "banking77"


def test_overrides_are_typed_and_reach_nested_fields():
    cfg = load_config(None, ["data.path=../shared/data/banking77", "output.dir=/tmp/x", "lora.r=8",
                             "train.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                             "train.bf16=false"])
    assert cfg.data.path == "../shared/data/banking77"
    assert cfg.output.dir == "/tmp/x"
    assert cfg.lora.r == 8
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.bf16 is False


def test_unknown_key_is_rejected_with_its_dotted_path():
    with pytest.raises(ConfigError, match=r"banking77.yaml.*lora\.rank: Extra inputs are not permitted"):
        load_config(None, ["lora.rank=8"])


def test_bad_value_is_rejected_with_path_and_value():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: Input should be greater than 0 \(got -1\)"):
        load_config(None, ["train.learning_rate=-1"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["data.path"])


def test_missing_required_field_names_it(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"c.yaml: invalid config: data: Field required"):
        load_config(f)


def test_missing_and_non_mapping_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(f)


def test_apply_overrides_does_not_mutate_input():
    tree = {"data": {"path": "a"}}
    out = apply_overrides(tree, ["data.path=b", "output.dir=o"])
    assert tree == {"data": {"path": "a"}}
    assert out == {"data": {"path": "b"}, "output": {"dir": "o"}}


def test_config_round_trips_through_json():
    cfg = load_config()
    assert FinetuneConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize("name", ["gsm8k", "alpaca_en_demo", "code_alpaca_2k", "poem_sentiment", "banking77"])
def test_shipped_configs_ingest_their_real_data(name, shared_data, tmp_path):
    from tasks.stages.ingest import ingest

    cfg = load_config(CONFIG_DIR / f"{name}.yaml", [f"data.path={shared_data / name}"])
    data = ingest(cfg.data, tmp_path / "ingested")
    expected = "classification" if name in ("banking77", "poem_sentiment") else "generation"
    assert data.task == expected and data.counts["train"].kept > 500


@pytest.mark.parametrize("override, message", [
    ("train.early_stopping_patience=2", "need train.eval_steps"),
    ("train.load_best_model_at_end=true", "need train.eval_steps"),
    ("eval.answer_pattern='####(('", "eval.answer_pattern: Value error, not a valid regular expression"),
    ("train.overlength=cut", "train.overlength: Input should be 'drop', 'truncate' or 'error'"),
    ("train.metric_for_best_model=accuracy", "metric_for_best_model='accuracy': expected one of"),
])
def test_new_training_and_eval_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, ["train.eval_steps=null", override])


def _sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"config: {CONFIG_DIR / 'banking77.yaml'}\n{text}", encoding="utf-8")
    return path


def test_sweep_loads_the_space_and_the_baseline_with_its_overrides(tmp_path):
    from configs.schema import load_sweep

    spec, baseline = load_sweep(CONFIG_DIR / "sweeps" / "banking77.yaml",
                                ["n_trials=6", "finetune.data.path=/data/b77"])
    assert spec.n_trials == 6 and spec.sampler == "random" and list(spec.space) == [
        "train.learning_rate", "lora.r", "train.per_device_train_batch_size"]
    assert spec.space["train.learning_rate"].log_uniform == (3e-4, 5e-3)
    assert baseline.data.path == "/data/b77" and baseline.split.max_train_examples == 800
    assert baseline.train.learning_rate == load_config().train.learning_rate  # the job's own value


@pytest.mark.parametrize("text, message", [
    ("space: {train.learnin_rate: {choice: [0.1]}}", "'train.learnin_rate' is not a finetune config field"),
    ("space: {lora.r: {choice: [8, 0]}}", "space.lora.r: invalid config: lora.r: Input should be greater than 0"),
    ("space: {lora.r: {choice: [8]}, train.learning_rate: {log_uniform: [0, 1]}}", "low > 0 for log_uniform"),
    ("space: {lora.r: {integer: [8, 4]}}", "expected \\[low, high\\] with low < high"),
    ("space: {lora.r: {choice: [8], integer: [1, 4]}}", "set exactly one of"),
    ("sampler: grid\nspace: {train.learning_rate: {log_uniform: [0.001, 0.01]}}", "grid needs a choice list"),
    ("space: {lora.r: {choice: [8]}}\nn_trial: 3", "n_trial: Extra inputs are not permitted"),
    ("space: {split.max_train_examples: {choice: [800, 1600]}}",
     "space \\['split.max_train_examples'\\]: trials share the baseline's data, split and base model"),
])
def test_bad_sweeps_are_rejected_naming_the_file_and_key(tmp_path, text, message):
    from configs.schema import load_sweep

    path = _sweep(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("- n_trials: 3\n", encoding="utf-8"), "expected a mapping at the top level, got list"),
    (lambda p: p.mkdir(), "is a folder, not a sweep file"),
    (lambda p: None, "sweep file not found"),
], ids=["a list", "a folder", "missing"])
def test_a_sweep_file_that_is_not_a_yaml_mapping_is_one_error_naming_it(tmp_path, make, message):
    from configs.schema import load_sweep

    path = tmp_path / "sweep.yaml"
    make(path)
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: ")


def _leaf_keys(schema: dict, node: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the leaf fields of a pydantic JSON schema (``$ref`` sections recursed)."""
    keys = set()
    for name, prop in node.get("properties", {}).items():
        ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("allOf", []) if "$ref" in a), None)
        if ref:
            keys |= _leaf_keys(schema, schema["$defs"][ref.rsplit("/", 1)[1]], f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_the_console_script_lists_every_config_field_and_prints_the_resolved_config(tmp_path):
    """``finetune-flow`` (pyproject's [project.scripts]) is installed beside this Python: ``run --help`` lists every
    field of the JSON schema (``sweep --help`` under ``finetune.``), ``print-config`` prints what ``load_config``
    resolves, and a bad override or command is an error."""
    import subprocess
    import sys

    import yaml

    script = Path(sys.executable).with_name("finetune-flow")
    schema = FinetuneConfig.model_json_schema()
    fields = _leaf_keys(schema, schema)
    assert {"data.path", "lora.r", "train.report_to", "export.max_quality_drop"} <= fields

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)

    helped = cli("run", "--help")
    listed = {line.split(":")[0].strip() for line in helped.stdout.split("config fields")[1].splitlines()[1:]}
    assert helped.returncode == 0 and listed == fields
    swept = cli("sweep", "--help").stdout.split("config fields")[1]
    assert "  finetune.train.learning_rate: float = 0.0002" in swept

    printed = cli("print-config", "--set", "train.learning_rate=0.001", "--set", "lora.r=4")
    assert printed.returncode == 0, printed.stderr
    assert FinetuneConfig.model_validate(yaml.safe_load(printed.stdout)) == \
        load_config(None, ["train.learning_rate=0.001", "lora.r=4"])
    bad = cli("print-config", "--set", "lora.rank=4")
    assert bad.returncode == 1 and "lora.rank" in bad.stderr and bad.stdout == ""
    assert cli("train").returncode == 2 and cli("--help").returncode == 0


def test_the_published_json_schema_is_the_config_schema():
    """docs/config.schema.json (for editors and tools) is ``FinetuneConfig.model_json_schema()``; regenerate it with
    ``python -c "import json; from configs.schema import FinetuneConfig; print(json.dumps(
    FinetuneConfig.model_json_schema(), indent=2))" > docs/config.schema.json``."""
    import json

    published = Path(__file__).resolve().parents[1] / "docs" / "config.schema.json"
    assert json.loads(published.read_text()) == FinetuneConfig.model_json_schema()
