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
