"""The pipeline's one config tree (pydantic): ``FinetuneConfig`` composes one section per stage (``configs/data.py``,
``split.py``, ``model.py``, ``lora.py``, ``train.py``, ``eval.py``, ``merge.py``, ``export.py``, ``retry.py``,
``promotion.py``, ``output.py``; a sweep's file: ``sweep.py``), loaded from YAML with ``--set dotted.key=value``
overrides. The sections are importable from here too (``from configs.schema import TrainConfig``).

Every section forbids unknown keys, so a misspelt key fails with its dotted path instead of being ignored.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from configs.base import CONFIG_DIR, EMBEDDED_MODEL, HF_TOKEN_PATTERN, HUB_REPO_ID, ConfigError, Section
from configs.data import DataConfig
from configs.eval import EvalConfig, EvalTask
from configs.export import ExportConfig
from configs.lora import LoraConfig
from configs.merge import MergeConfig
from configs.model import ModelConfig
from configs.output import HubPushConfig, OutputConfig
from configs.promotion import PromotionConfig
from configs.retry import RetryConfig
from configs.split import SplitConfig
from configs.sweep import SearchDimension, SweepConfig, SweepMetric
from configs.train import TrainConfig

__all__ = ["CONFIG_DIR", "EMBEDDED_MODEL", "HUB_REPO_ID", "ConfigError", "DataConfig", "EvalConfig", "EvalTask",
           "ExportConfig", "FinetuneConfig", "HubPushConfig", "LoraConfig", "MergeConfig", "ModelConfig",
           "OutputConfig", "PromotionConfig", "RetryConfig", "SearchDimension", "SplitConfig", "SweepConfig",
           "SweepMetric", "TrainConfig", "apply_overrides", "deployment_parameters", "field_lines", "get_dotted",
           "load_config", "load_sweep", "merge_trees", "parse_override", "read_yaml_mapping", "set_dotted",
           "trial_config", "validate_config", "validate_sweep"]


class FinetuneConfig(Section):
    """The whole pipeline's configuration: one section per stage."""

    name: str = "finetune"
    data: DataConfig
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    merge: MergeConfig = MergeConfig()
    export: ExportConfig = ExportConfig()
    retry: RetryConfig = RetryConfig()
    promotion: PromotionConfig = PromotionConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_tokens(cls, tree: Any) -> Any:
        """Refuse a value (or key) that looks like a Hugging Face token, naming where it is but not echoing it.
        Runs before field validation, so no field error can print the value either."""
        def find(node: Any, where: str) -> str | None:
            if isinstance(node, str):
                return where if HF_TOKEN_PATTERN.search(node) else None
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for key, value in items:
                if isinstance(key, str) and HF_TOKEN_PATTERN.search(key):
                    return where or "<root>"
                if found := find(value, f"{where}.{key}" if where else str(key)):
                    return found
            return None

        if where := find(tree, ""):
            raise PydanticCustomError(
                "secret_in_config", "{where}: looks like a Hugging Face token; a secret must not be in a config "
                "(configs are saved with the run): set HF_TOKEN in the environment, or save the token in a Prefect "
                "Secret block and name the block in model.hf_token_secret", {"where": where})
        return tree

    @model_validator(mode="after")
    def _check_adapter_export(self) -> "FinetuneConfig":
        for target, merged in (("genai-int4-adapter", "genai-int4"), ("openvino-npu-adapter", "openvino-npu")):
            if self.export.enabled and target in self.export.targets and self.lora.method != "lora":
                raise ValueError(f"export.targets {target} needs lora.method lora (got {self.lora.method!r}: the "
                                 f"base takes plain LoRA weights); export {merged} instead")
        return self

    @model_validator(mode="after")
    def _check_eval_steps(self) -> "FinetuneConfig":
        if self.train.eval_steps is not None and self.train.save_steps % self.train.eval_steps:
            raise ValueError("train.save_steps must be a multiple of train.eval_steps")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        shown = e["type"] != "missing" and not isinstance(e["input"], dict)
        got = f" (got {e['input']!r})" if shown and not HF_TOKEN_PATTERN.search(repr(e["input"])) else ""
        parts.append(f"{where}: {e['msg']}{got}")
    return f"{source}: invalid config: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], value)``; the value is parsed as YAML (numbers, lists...).

    Raises:
        ConfigError: if there is no ``=`` or the key is empty.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Return a copy of ``tree`` with each ``dotted.key=value`` override set (creating sections as needed)."""
    tree = yaml.safe_load(yaml.safe_dump(tree, sort_keys=False))  # deep copy of plain data, order kept
    for item in overrides:
        set_dotted(tree, *parse_override(item))
    return tree


def set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    """Set ``tree[keys[0]][keys[1]]...`` to ``value`` in place, creating sections as needed."""
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def get_dotted(tree: dict, key: str) -> Any:
    """``tree``'s value at the dotted ``key`` (``"lora.r"``).

    Raises:
        KeyError: some part of the key is not there.
    """
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Load a YAML config (default ``configs/banking77.yaml``) and apply ``--set`` overrides.

    Relative ``data.path`` values in the file stay relative to the current directory (as typed by the user).

    Raises:
        ConfigError: the file is missing or not a YAML mapping, or a key is unknown or a value invalid; the
            message names the file and the field's dotted path, e.g. ``train.learning_rate``.
    """
    path = Path(path) if path else CONFIG_DIR / "banking77.yaml"
    return validate_config(apply_overrides(read_yaml_mapping(path, "config file"), overrides or []), str(path))


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The YAML mapping in ``path`` (``{}`` for an empty file).

    Raises:
        ConfigError: ``path`` is a folder or missing, not valid YAML, or not a mapping at the top level; the
            message names the file and says which ``what`` (e.g. "sweep file") was expected.
    """
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    return tree


def load_sweep(path: str | Path | None = None,
               overrides: list[str] | None = None) -> tuple[SweepConfig, FinetuneConfig]:
    """Load a sweep YAML (``configs/sweeps/``) with ``--set`` overrides of its own keys (``n_trials=8``,
    ``finetune.data.path=...``); return it with the baseline finetune config (``config`` + ``finetune``).

    Raises:
        ConfigError: the sweep file or its finetune config is missing or invalid, a ``space`` key is not a
            finetune-config field, or a sampled value would be invalid (e.g. ``lora.r: {choice: [0]}``).
    """
    path = Path(path) if path else CONFIG_DIR / "sweeps" / "banking77.yaml"
    sweep = validate_sweep(apply_overrides(read_yaml_mapping(path, "sweep file"), overrides or []), str(path))
    return sweep, sweep_baseline(sweep, str(path))


def validate_sweep(tree: dict, source: str) -> SweepConfig:
    """Validate a plain sweep-config tree.

    Raises:
        ConfigError: naming ``source`` and each bad field's dotted path.
    """
    try:
        return SweepConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def sweep_baseline(sweep: SweepConfig, source: str) -> FinetuneConfig:
    """The finetune config every trial starts from: ``sweep.config`` (relative to the current folder) with
    ``sweep.finetune`` on top, after checking that every end of each ``space`` range makes a valid config.

    Raises:
        ConfigError: naming ``source``: the finetune config is missing or invalid, a ``space`` key is not a
            finetune-config field, or a sampled value would be invalid.
    """
    base = load_config(sweep.config)
    baseline = validate_config(merge_trees(base.model_dump(mode="json"), sweep.finetune), f"{source}: finetune")
    for key, dim in sweep.space.items():
        for value in dim.choice if dim.choice is not None else (dim.log_uniform or dim.uniform or dim.integer):
            trial_config(baseline, {key: value}, f"{source}: space.{key}")
    return baseline


def deployment_parameters(config: str | None = None, sweep: str | None = None, overrides: list[str] | None = None,
                          extra: str = "") -> dict:
    """A deployment's default parameters, read from ``configs/`` at deploy time (a build step of
    ``deployments/prefect.yaml``, so the deployments have no copy of a config to keep in step).

    Args:
        config: a finetune YAML → ``{"cfg": <config as JSON>}``.
        sweep: or a sweep YAML → ``{"spec": <sweep as JSON>}`` (the sweep flow reads its baseline from it).
        overrides: ``--set`` items (``data.path=...``; for a sweep, of its own keys).
        extra: more finetune ``--set`` items in one shell-quoted string, e.g. the deployer's
            ``FINETUNE_DEPLOY_SET="output.dir=/mnt/shared/outputs"`` (a sweep gets them under ``finetune.``).

    Raises:
        ConfigError: a bad file, key or value, as ``load_config``/``load_sweep``.
    """
    import shlex

    more = shlex.split(extra)
    if sweep:
        spec, _ = load_sweep(sweep, [*(overrides or []), *(f"finetune.{item}" for item in more)])
        return {"spec": spec.model_dump(mode="json")}
    return {"cfg": load_config(config, [*(overrides or []), *more]).model_dump(mode="json")}


def merge_trees(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s values set, recursing into nested mappings (a deep merge; copies)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def trial_config(baseline: FinetuneConfig, params: dict[str, Any], source: str) -> FinetuneConfig:
    """``baseline`` with dotted-key ``params`` set (e.g. ``{"lora.r": 8}``).

    Raises:
        ConfigError: a key is not a config field, or a value is invalid there.
    """
    tree = baseline.model_dump(mode="json")
    for key in params:
        try:
            get_dotted(tree, key)
        except KeyError:
            raise ConfigError(f"{source}: {key!r} is not a finetune config field") from None
        set_dotted(tree, key.split("."), params[key])
    return validate_config(tree, source)


def validate_config(tree: dict, source: str) -> FinetuneConfig:
    """Validate a plain config tree.

    Raises:
        ConfigError: naming ``source`` (a file, a deployment) and each bad field's dotted path.
    """
    try:
        return FinetuneConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def field_lines(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """One line per config field, read from the pydantic schema: ``dotted.key  type = default  description``
    (nested sections recursed), for the CLI's ``--help``; ``model`` defaults to ``FinetuneConfig``."""
    model = model or FinetuneConfig
    lines = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            lines += field_lines(kind, f"{prefix}{name}.")
            continue
        default = "(required)" if field.is_required() else f"= {field.get_default(call_default_factory=True)!r}"
        text = kind.__name__ if isinstance(kind, type) else re.sub(  # Annotated[int, Field(gt=0)] → int
            r"Annotated\[(\w+), FieldInfo\(.*?\]\)\]", r"\1", str(kind).replace("typing.", ""))
        lines.append(f"  {prefix}{name}: {text} {default}" + (f"  {field.description}" if field.description
                                                               else ""))
    return lines

