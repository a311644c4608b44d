"""The pipeline's one config tree (pydantic), loaded from YAML with ``--set dotted.key=value`` overrides.

Every section forbids unknown keys, so a misspelt key fails with its dotted path instead of being ignored.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tasks.metrics import ALL_METRICS, QUALITY_METRICS, TASK_KINDS

# choices read from the metric registry (tasks/metrics.py): a new task kind or metric is valid config at once
EvalTask = Literal[("auto", *TASK_KINDS)]
SweepMetric = Literal[("auto", *ALL_METRICS)]

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field's dotted path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    path: str = Field(description="A data file, a folder with train/test (and optional validation/dev) files, "
                                  "or a Hugging Face Hub dataset id.")
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "classification"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="Rename map {source column: canonical column}, applied to the "
                                                "columns a source has, e.g. {category: label}.")
    column_names: list[str] | None = Field(None, description="Column names for header-less csv/tsv files.")
    label_names: dict[str, str] = Field(default_factory=dict,
                                        description="Map from raw label values to label text, e.g. {'-1': negative}.")
    system_prompt: str | None = Field(None, description="System message prepended to every example; None keeps "
                                                        "the chat template's default.")
    prompt_template: str = Field("{text}", description="User turn of a classification example; {text} is the input.")
    drop_empty_answers: bool = Field(False, description="Drop (and count) rows whose answer field (output, "
                                                        "completion, label, last message) is empty, instead of "
                                                        "failing on the first one.")
    revision: str | None = Field(
        None, min_length=1, description="A Hub dataset's branch, tag or commit sha (None = main). The flow resolves "
        "it to the commit sha once per run (offline: the locally cached snapshot's sha of that branch or tag) and "
        "reads the dataset at that commit; the sha is part of the data's cache key, so a re-pushed dataset re-runs "
        "from ingest. Only for a Hub id: a local file or folder is keyed by its content.")


class SplitConfig(_Section):
    seed: int = 42
    test_size: float = Field(0.1, gt=0, lt=1, description="Fraction held out for test when no test file is given.")
    validation_size: float = Field(0.05, gt=0, lt=1, description="Fraction of train held out for eval loss "
                                                                  "when no validation file is given.")
    max_train_examples: int | None = Field(None, gt=0, description="Stratified subsample of train (CPU sizing).")
    max_validation_examples: int | None = Field(None, gt=0)
    max_test_examples: int | None = Field(None, gt=0)


class ModelConfig(_Section):
    name_or_path: str = Field(EMBEDDED_MODEL, description="Hub id, local folder, or the embedded SmolLM2 model.")
    trust_remote_code: bool = Field(False, description="Run Python code that a model folder or Hub repo ships "
                                                       "(auto_map in its config); off, such a model is refused.")
    cache_dir: str = Field("~/.cache/finetune-flow/models",
                           description="Where converted base models (e.g. the embedded GGUF) are kept.")
    hf_token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding a Hugging Face Hub token (gated or private models "
        "and datasets); the flow puts its value in HF_TOKEN for the libraries at the start of a run. None = the "
        "HF_TOKEN environment variable, if set. The token itself never goes in a config.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel for training: auto = flash_attention_2 on a GPU where the flash-attn "
        "package is installed, else PyTorch SDPA.")
    revision: str | None = Field(
        None, min_length=1, description="A Hub model's branch, tag or commit sha (None = main). The flow resolves it "
        "to the commit sha once per run (offline: the locally cached snapshot's sha of that branch or tag), "
        "downloads that snapshot and loads every stage from it; the sha is part of the base model's cache key and "
        "recorded in metrics.json and the model cards. Only for a Hub id: local folders and the embedded model "
        "are keyed by content.")


class LoraConfig(_Section):
    method: Literal["lora", "qlora", "dora", "full"] = Field(
        "lora", description="lora: LoRA on the float32 base (Hu et al. 2021); qlora: LoRA on a 4-bit "
        "bitsandbytes base (Dettmers et al. 2023, settings below; the merge reloads the base in float32); dora: "
        "weight-decomposed LoRA (Liu et al. 2024, peft use_dora); full: full fine-tuning, every weight trained "
        "(no adapter: r, lora_alpha, lora_dropout and target_modules are unused; the merge stage copies the "
        "trained model and checks the copy; learning rates ~1e-5–1e-4 rather than LoRA's ~1e-4–2e-3).")
    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: 4-bit data type (QLoRA paper: nf4).")
    bnb_4bit_use_double_quant: bool = Field(True, description="qlora: quantize the quantization constants too "
                                                              "(double quantization, ~0.4 bit/parameter saved).")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="qlora: dtype the 4-bit weights are de-quantized to for each matmul.")


class TrainConfig(_Section):
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="Overrides epochs when > 0.")
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(32, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_length: int = Field(512, gt=0, description="Tokens per training sequence (prompt + answer, chat "
                                                       "template included).")
    overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Training/validation examples longer than max_seq_length: drop them, keep them cut "
        "at max_seq_length (the end of the answer is lost), or stop before training naming the first one's file "
        "and row. Counted in train.json and the report.")
    padding_free: bool = Field(True, description="Lay each batch's examples end to end instead of padding them to "
                                                 "the longest: position ids restart at every example and no example "
                                                 "attends to another. Same batches, same loss, no compute spent on "
                                                 "padding (tasks/padding_free.py).")
    packing: bool = Field(False, description="Pack several examples into each max_seq_length sequence (TRL best-fit "
                                             "decreasing, padding-free), so a step holds more examples than "
                                             "per_device_train_batch_size. Examples never attend to each other "
                                             "(flash-attention varlen on a GPU; with sdpa/eager, transformers builds "
                                             "a block-diagonal mask from the position ids).")
    bf16: Literal["auto"] | bool = Field("auto", description="bf16 autocast; auto = where the CPU/GPU supports it.")
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding); only used "
                                                    "with padding_free: false.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="Recompute activations in the backward pass (less memory, ~30 % more compute); auto = "
        "on for qlora (its purpose is memory), off otherwise.")
    use_liger_kernel: Literal["auto"] | bool = Field(
        "auto", description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU; TRL >= 1.0 keeps its fused "
        "cross-entropy off) on a GPU where liger-kernel is installed; auto = off (measured slower on an H200: "
        "docs/gpu-check/2026-11-28-h200).")
    num_processes: Literal["auto"] | Annotated[int, Field(gt=0)] = Field(
        "auto", description="Training processes (one per GPU, data parallel, started with torchrun by the train "
        "task); auto = the number of visible GPUs, 1 on a CPU.")
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Eval-loss interval in steps; None = once per epoch.")
    save_steps: int = Field(200, gt=0, description="Checkpoint interval in steps.")
    save_total_limit: int = Field(2, gt=0)
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without an improvement of metric_for_best_model "
        "larger than early_stopping_min_delta (transformers EarlyStoppingCallback); None = train to the end. Needs "
        "eval_steps; implies load_best_model_at_end.")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest improvement of metric_for_best_model "
                                                                   "that counts (nats/token for eval_loss).")
    load_best_model_at_end: bool = Field(False, description="Publish the checkpoint with the best "
                                                            "metric_for_best_model instead of the last one. Needs "
                                                            "eval_steps.")
    metric_for_best_model: str = Field(
        "eval_loss", description="What early stopping and the best checkpoint go by: eval_loss, or eval_<metric> "
        "for a quality metric of the task (eval_accuracy, eval_macro_f1, eval_rouge_l, ...), generated on the "
        "validation split at every evaluation as the test evaluation does (classification data always reports "
        "it; generation data only when named here, its generations being long).")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"], description="Where the trainer logs train loss, learning rate and the validation metrics "
        "(transformers' integrations): tensorboard = the adapter's tensorboard/ folder (the run folder's "
        "tensorboard/ gets the test metrics); mlflow = MLFLOW_TRACKING_URI's server (pip install mlflow); [] = "
        "nowhere.")
    seed: int = 42

    @model_validator(mode="after")
    def _check_best_model(self) -> "TrainConfig":
        if (self.early_stopping_patience or self.load_best_model_at_end) and self.eval_steps is None:
            raise ValueError("early_stopping_patience / load_best_model_at_end need train.eval_steps (validation "
                             "loss every N steps, with save_steps a multiple of it)")
        allowed = ["eval_loss"] + [f"eval_{m}" for m in QUALITY_METRICS]
        if self.metric_for_best_model not in allowed:
            raise ValueError(f"metric_for_best_model={self.metric_for_best_model!r}: expected one of {allowed}")
        return self


class EvalConfig(_Section):
    task: EvalTask = Field("auto", description="auto (the data's kind) or a task kind of tasks/metrics.py: "
                                               "classification or generation.")
    batch_size: int = Field(64, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="None = longest label + 2 tokens for "
                                                              "classification, 256 for generation.")
    answer_pattern: str | None = Field(
        None, description="Regular expression that extracts the final answer from a generation (its first group, "
        "or the whole match); exact_match then compares the extracted answers, commas removed. gsm8k: "
        "'####\\s*\\$?(-?[\\d,]*\\.?\\d+)'. None = exact match of the whole text.")
    evaluate_base: bool = True
    baseline_examples: int | None = Field(
        300, gt=0, description="The base model's evaluations (zero-shot and few_shot) run on a stratified sample "
        "of this many test rows (seeded by split.seed), reported with a 95 % interval; None = every row. The "
        "fine-tuned model is always evaluated on every row.")
    few_shot: int = Field(5, ge=0, description="k: also evaluate the base model with k training examples (one "
                                               "per label, up to k, for classification) as earlier chat turns "
                                               "of every prompt: what prompting alone gets; 0 = off.")
    bf16: Literal["auto"] | bool = Field("auto", description="bf16 autocast for generation and eval loss; "
                                                             "auto = where the CPU/GPU supports it.")

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return pattern


class MergeConfig(_Section):
    logit_atol: float = Field(1e-3, gt=0, description="Max abs difference allowed between merged and "
                                                      "base+adapter logits.")
    n_check_prompts: int = Field(4, gt=0)
    min_qlora_top1_agreement: float = Field(
        0.9, ge=0, le=1, description="qlora: the merged float32 model must pick the same next token as the "
        "adapter on the 4-bit base (the model as trained) at this fraction of the check prompts' answer positions "
        "at least; the two differ by the base's 4-bit rounding error.")


class ExportConfig(_Section):
    """ONNX export targets and the gate each must pass before it is published (tasks/export.py)."""

    enabled: bool = True
    targets: list[Literal["genai-int4-adapter", "genai-ladder", "onnx-fp32", "genai-int4", "genai-fp16"]] = Field(
        ["genai-int4"], min_length=1, description="genai-int4-adapter: the adapter alone, served on one int4 base per "
        "base model (ONNX Runtime GenAI, CPU; several adapters share one process); genai-ladder: the smallest rung "
        "of export.ladder that passes the gate (merged, GenAI CPU); onnx-fp32: the model builder at fp32, GenAI CPU; "
        "genai-int4: ONNX Runtime GenAI int4 (MatMulNBits) for CPU; genai-fp16: GenAI fp16 for CUDA "
        "(tasks/export.py).")
    ladder: list[Literal["int4", "int4-int8-head", "int4-mixed", "fp32"]] = Field(
        ["int4", "int4-int8-head", "int4-mixed", "fp32"], min_length=1, description="genai-ladder's rungs, tried "
        "in order: int4 (RTN), int4 with int8 LM head and embeddings (k_quant_last), int4 with int8 sensitive "
        "layers (k_quant_mixed), fp32 (tasks/export.py RUNGS).")
    match_quantization: bool = Field(True, description="With genai-int4-adapter: train and evaluate on the int4 "
                                     "base's de-quantized weights (tasks/int4_base.py), so that the model the "
                                     "pipeline measures is the one the adapter export ships.")
    adapter_weights: Literal["folded", "fp32"] = Field(
        "folded", description="genai-int4-adapter: how the exported graph holds the LoRA weights. folded: lora_A "
        "int8, lora_B quantized into each projection's own int4/int8 MatMulNBits beside the weights it corrects "
        "(decodes at ~0.85x the merged int4 export); fp32: as trained, in MatMuls of their own (the evaluation's "
        "arithmetic, ~0.7x). The export gate measures the form chosen (tasks/onnx_adapter.py, docs/benchmarks.md).")
    int4_algo_config: Literal["default", "rtn", "k_quant", "k_quant_mixed", "k_quant_last"] = Field(
        "k_quant_mixed", description="The model builder's int4 algorithm; k_quant_mixed keeps some layers in int8 "
        "(measured on banking77: docs/benchmarks.md).")
    int4_block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="Weights per int4 scale.")
    int4_accuracy_level: Literal[1, 2, 3, 4] = Field(4, description="Activation type of int4 MatMuls: 1 fp32, "
                                                                    "2 fp16, 3 bf16, 4 int8 (fastest on CPU).")
    int4_is_symmetric: bool = Field(True, description="Symmetric int4 (no zero point); False = uint4 with zero point.")
    n_check_prompts: int = Field(5, gt=0, description="Test prompts of the greedy-agreement check.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens decoded per greedy-agreement prompt.")
    min_greedy_agreement: float = Field(0.8, ge=0, le=1, description="Fraction of check prompts whose exported "
                                                                      "and PyTorch greedy outputs must match.")
    max_quality_drop: float = Field(0.01, ge=0, le=1, description="Largest allowed drop of the primary metric "
                                                                  "(accuracy / rouge_l) from the merged PyTorch "
                                                                  "model's on the same test rows (0.01 = 1 point).")
    max_eval_examples: int | None = Field(None, gt=0, description="Test rows of the quality check; None = all.")


class RetryConfig(_Section):
    retries: int = Field(2, ge=0, description="Retries per task for transient failures (out of memory, I/O); "
                                              "bad input and failed checks are never retried.")
    delay_seconds: float = Field(10, ge=0, description="First retry delay; doubles on each retry.")


class PromotionConfig(_Section):
    margin: float = Field(0.01, ge=0, le=1, description="Nightly retrain quality gate: a new model is promoted only "
                                                        "if its primary metric (accuracy, or rouge_l for "
                                                        "generation) is above the base model's and at most this "
                                                        "much below the promoted model's on the same test split "
                                                        "(0.01 = 1 point).")


class HubPushConfig(_Section):
    """Where ``output.push_to_hub`` uploads a published run (``tasks/hub.py``)."""

    repo_id: str = Field(description="Hub model repo, <user or org>/<name>; created if missing.")
    private: bool = Field(True, description="Create the repo private (an existing repo keeps its visibility).")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not HUB_REPO_ID.fullmatch(value) or ".." in value or "--" in value:
            raise ValueError("not a Hub repo id (<user or org>/<name>: letters, digits, '-', '_', '.')")
        return value


class OutputConfig(_Section):
    dir: str = "outputs"
    run_name: str | None = Field(None, description="Folder name of this run; None = <name>-<UTC timestamp>-<4 hex>.")
    result_storage: str | None = Field(None, description="Prefect result/cache store: a folder, or "
                                                         "block:<type>/<name> for a saved storage block; "
                                                         "None = <output.dir>/.prefect-results.")
    push_to_hub: HubPushConfig | None = Field(
        None, description="Upload the published run's merged model (repo root) and adapter (adapter/), with their "
        "model cards, to this Hub model repo after the run has passed every gate and published latest.json "
        "(the nightly retrain: only a promoted model); None = no upload. Token: HF_TOKEN or "
        "model.hf_token_secret.")


# A Hub repo id: namespace/name (huggingface_hub.utils.validate_repo_id's characters).
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# A Hugging Face user access token ("hf_" + 34 letters/digits today): refused anywhere in a config.
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")


class FinetuneConfig(_Section):
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
        if self.export.enabled and "genai-int4-adapter" in self.export.targets and self.lora.method != "lora":
            raise ValueError(f"export.targets genai-int4-adapter needs lora.method lora (got {self.lora.method!r}: "
                             "the int4 base takes plain LoRA weights); export genai-int4 instead")
        return self

    @model_validator(mode="after")
    def _check_eval_steps(self) -> "FinetuneConfig":
        if self.train.eval_steps is not None and self.train.save_steps % self.train.eval_steps:
            raise ValueError("train.save_steps must be a multiple of train.eval_steps")
        return self


class SearchDimension(_Section):
    """One hyperparameter's range; exactly one field is set (Optuna's suggest_float with log=True, suggest_float,
    suggest_int, suggest_categorical)."""

    log_uniform: tuple[float, float] | None = Field(None, description="[low, high], sampled log-uniformly.")
    uniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, description="[low, high], inclusive.")
    choice: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDimension":
        kinds = [k for k in ("log_uniform", "uniform", "integer", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"set exactly one of log_uniform, uniform, integer, choice (got {kinds or 'none'})")
        if kinds[0] != "choice":
            low, high = getattr(self, kinds[0])
            if not low < high or (kinds[0] == "log_uniform" and low <= 0):
                raise ValueError(f"{kinds[0]}: expected [low, high] with low < high (and low > 0 for log_uniform)")
        return self


class SweepConfig(_Section):
    """A hyperparameter search over a finetune config (flows/sweep.py): trials are train → merge → evaluate on
    the validation split; the best is chosen there and then measured on the test split with the baseline."""

    config: str = Field(description="The finetune YAML every trial starts from (relative to the current folder).")
    finetune: dict[str, Any] = Field(default_factory=dict, description="Config values for every trial and the "
                                     "baseline, on top of `config` (e.g. a smaller train budget).")
    space: dict[str, SearchDimension] = Field(min_length=1, description="Dotted finetune-config key -> range, "
                                              "e.g. train.learning_rate: {log_uniform: [1.0e-4, 3.0e-3]}.")
    sampler: Literal["random", "grid", "tpe"] = Field("random", description="Optuna RandomSampler, GridSampler "
                                                      "(choice dimensions only) or TPESampler.")
    n_trials: int = Field(4, gt=0, description="Sampled trials (grid: at most the grid's size); the baseline "
                                               "(the config's own values) runs in addition.")
    seed: int = 0
    metric: SweepMetric = \
        Field("auto", description="Validation metric to optimise; auto = accuracy (classification) or rouge_l.")
    max_parallel: int = Field(1, gt=0, description="Trials run at once (mapped Prefect tasks, or flow runs of "
                                                   "trial_deployment); each trial's GPU stages hold a `gpu` "
                                                   "concurrency slot where the worker sets one.")
    storage: str | None = Field(None, description="Optuna storage the study lives in, so an interrupted sweep "
                                "resumes where it stopped: a database URL (sqlite:///sweeps.db, postgresql://...) "
                                "or a journal file path; None = <output.dir>/sweeps/optuna.journal.")
    trial_deployment: str | None = Field(None, description="Run each trial as a flow run of this deployment "
                                         "(e.g. sweep-trial/trial, deployments/prefect.yaml) on its work pool, so "
                                         "idle workers on any host take them (output.dir must be storage every "
                                         "worker shares); None = trials as tasks in this flow run's processes.")

    @model_validator(mode="after")
    def _grid_needs_choices(self) -> "SweepConfig":
        if self.sampler == "grid" and any(d.choice is None for d in self.space.values()):
            raise ValueError("sampler grid needs a choice list for every space dimension")
        shared = [key for key in self.space if key.split(".", 1)[0] not in ("lora", "train")]
        if shared:
            raise ValueError(f"space {shared}: trials share the baseline's data, split and base model; only lora.* "
                             "and train.* keys vary per trial (set split.* etc. in finetune:)")
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

