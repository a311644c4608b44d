"""validate: check the data, the base model and the sequence lengths before anything is trained or written.

The flow's first check and ``python -m flows.finetune --dry-run``. It runs the real ingest and split code into a
temporary folder outside ``output.dir`` (so it finds exactly the errors those stages would), checks the base
model folder without loading its weights, and tokenises every train/validation example, so a bad run ends in
seconds with one line naming the file, the row and the field, and leaves ``output.dir`` untouched.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from pydantic import BaseModel

from configs.schema import ConfigError, FinetuneConfig
from tasks.base_model import ModelError, pickle_files
from tasks.common.chat import tokenize_with_completion_mask
from tasks.common.files import read_jsonl
from tasks.stages.ingest import DataError, SplitCounts, SplitRecords, publish, read_records
from tasks.stages.split import split

log = logging.getLogger(__name__)

# the fields that hold an example's prompt and answer, per record format (for naming an over-long row's field)
PROMPT_FIELD = {"chat": "messages", "alpaca": "instruction", "prompt_completion": "prompt", "classification": "text"}
ANSWER_FIELD = {"chat": "messages", "alpaca": "output", "prompt_completion": "completion", "classification": "label"}


class LengthCounts(BaseModel):
    """Examples of one split, how many are longer than ``train.max_seq_length`` tokens, the longest (tokens)."""

    examples: int
    over_max_seq_length: int
    longest: int


class ValidateResult(BaseModel):
    """What ``validate`` returns: what a run of this config would train on."""

    format: str
    task: str
    labels: int
    counts: dict[str, SplitCounts]
    split: dict[str, int]
    sequence_lengths: dict[str, LengthCounts]
    base_model: str


def validate(cfg: FinetuneConfig, base_model: str) -> ValidateResult:
    """Check ``cfg``'s data and base model as the run would use them; write nothing under ``output.dir``.

    Args:
        base_model: the resolved base model (a local folder, or a Hub id), as the train stage gets it.

    Returns:
        ``ValidateResult``.

    Raises:
        DataError: bad data (file, row, field), a split that ends up empty, a validation/test label the train
            split lacks, or over-long examples (``train.overlength: error``, or none left to train on).
        ModelError: the base model folder is missing, has no safetensors weights (pickle files are never
            loaded), has a truncated/corrupt weight file, or its tokenizer cannot be loaded.
        ConfigError: an export target needs packages this environment lacks (``check_export_packages``), or
            ``qnn-npu`` for a model family it does not take (``check_export_architecture``).
    """
    check_export_packages(cfg)
    splits, fmt = read_records(cfg.data)
    with tempfile.TemporaryDirectory(prefix="finetune-validate-") as tmp:
        data = publish(splits, fmt, Path(tmp) / "ingest")
        try:
            parts = split(data, cfg.split, Path(tmp) / "split")
        except ValueError as e:
            raise DataError(f"{cfg.data.path}: {e}") from None
        if data.task == "classification":
            check_split_labels(parts.files, cfg.data.path)
    tokenizer = check_base_model(base_model, cfg.model.trust_remote_code)
    check_export_architecture(cfg, base_model)
    lengths = {name: check_lengths(tokenizer, s, fmt, cfg.train.max_seq_length, cfg.train.overlength)
               for name, s in splits.items() if name in ("train", "validation")}
    summary = ValidateResult(format=fmt, task=data.task, labels=len(data.labels), counts=data.counts,
                             split=parts.counts, sequence_lengths=lengths, base_model=base_model)
    log.info("validate: %s", summary.model_dump_json())
    return summary


# export targets whose packages are an extra of their own: {target: (modules it imports, how to install them)}
NPU_PACKAGES = (("openvino_genai", "openvino_tokenizers", "nncf", "optimum.intel"),
                "pip install 'finetune-flow[npu]' && pip install --no-deps optimum-intel==2.2.0 "
                "(make install does both)")
QNN_PACKAGES = (("onnxruntime_qnn",), "pip install 'finetune-flow[npu]' (make install does it; onnxruntime-qnn has "
                "wheels for Linux x86-64 and Windows)")
EXPORT_PACKAGES = {"openvino-npu": NPU_PACKAGES, "openvino-npu-adapter": NPU_PACKAGES, "qnn-npu": QNN_PACKAGES}


def check_export_packages(cfg: FinetuneConfig) -> None:
    """Refuse, before anything is trained, an enabled export target whose packages are not installed.

    Raises:
        ConfigError: naming the target, the missing module and how to install it.
    """
    import importlib.util

    for target in cfg.export.targets if cfg.export.enabled else []:
        modules, install = EXPORT_PACKAGES.get(target, ((), ""))
        missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None
                   or importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"export.targets: {target} needs {', '.join(missing)}, which this environment lacks: "
                              f"{install}")


def check_export_architecture(cfg: FinetuneConfig, base_model: str) -> None:
    """Refuse, before anything is trained, ``qnn-npu`` for a model family its static graph does not cover
    (``tasks.deploy.builders.qnn.STATIC_FAMILIES``; the base model's ``config.json`` ``model_type``).

    Raises:
        ConfigError: naming the target, the model type and the families it takes.
    """
    if not (cfg.export.enabled and "qnn-npu" in cfg.export.targets):
        return
    from transformers import AutoConfig

    from tasks.deploy.builders.qnn import STATIC_FAMILIES

    model_type = AutoConfig.from_pretrained(base_model, trust_remote_code=cfg.model.trust_remote_code).model_type
    if model_type not in STATIC_FAMILIES:
        raise ConfigError(f"export.targets: qnn-npu has no static graph for model type {model_type!r} "
                          f"({base_model}); it takes {', '.join(STATIC_FAMILIES)}")


def check_split_labels(files: dict[str, str], data_path: str) -> None:
    """Raise ``DataError`` when a validation/test label has no train example after splitting and subsampling
    (a rare label carved out whole, or dropped by ``split.max_train_examples``)."""
    train = {r["label"] for r in read_jsonl(files["train"])}
    for name in ("validation", "test"):
        missing = sorted({r["label"] for r in read_jsonl(files[name])} - train)
        if missing:
            raise DataError(f"{data_path}: field 'label': {missing[0]!r} is in the {name} split but in no train "
                            f"example after splitting and subsampling ({len(missing)} such labels); add examples "
                            "of it, or raise split.max_train_examples")


def check_lengths(tokenizer, split_records: SplitRecords, fmt: str, max_seq_length: int, overlength: str) -> dict:
    """Tokenise every example as training does (chat template, prompt + answer) and apply ``train.overlength``.

    Returns:
        ``{"examples", "over_max_seq_length", "longest"}`` (token counts).

    Raises:
        DataError: with ``overlength="error"``, for the first example longer than ``max_seq_length`` (its row,
            and the prompt or answer field, whichever is longer); in any mode, when no example would be left
            to train on (all over length; ``truncate`` still drops an example whose prompt alone fills it).
    """
    tokenized = tokenize_with_completion_mask(tokenizer, [record for _, record in split_records.records])
    counts = [(row, len(ids), prompt) for (row, _), (ids, prompt) in zip(split_records.records, tokenized)]
    over = [c for c in counts if c[1] > max_seq_length]
    origin = split_records.origin
    if over and overlength == "error":
        row, n, prompt = over[0]
        field = PROMPT_FIELD[fmt] if prompt >= n - prompt else ANSWER_FIELD[fmt]
        raise DataError(f"{origin}: row {row}: field {field!r}: the example is {n} tokens (prompt {prompt}, answer "
                        f"{n - prompt}), longer than train.max_seq_length={max_seq_length} ({len(over)} of "
                        f"{len(counts)} examples are; train.overlength: error — drop or truncate goes on without "
                        "them)")
    unusable = over if overlength != "truncate" else [o for o in over if o[2] >= max_seq_length]
    if len(unusable) == len(counts):
        row, n, _ = over[0]
        raise DataError(f"{origin}: row {row}: every example is longer than train.max_seq_length={max_seq_length} "
                        f"tokens (this one {n}); nothing would be left to train on: raise train.max_seq_length")
    return {"examples": len(counts), "over_max_seq_length": len(over), "longest": max(c[1] for c in counts)}


def check_base_model(name_or_path: str, trust_remote_code: bool = False):
    """Check a local model folder without loading its weights (``check_model_folder``), then load its tokenizer.

    A Hub id (anything that is not an existing local path and does not start with ``.``, ``/`` or ``~``) is
    only checked by loading its tokenizer (from the local Hugging Face cache when offline).

    Returns:
        the tokenizer (``tasks.base_model.load_tokenizer``).

    Raises:
        ModelError: naming ``model.name_or_path`` and the missing or bad file.
    """
    from tasks.base_model import load_tokenizer

    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        check_model_folder(name_or_path)
        check_weight_shapes(name_or_path, trust_remote_code)
    try:
        return load_tokenizer(name_or_path, trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/EnvironmentError variously
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.name_or_path: cannot load the tokenizer of {name_or_path}: {reason}") from None


def check_weight_shapes(name_or_path: str, trust_remote_code: bool = False) -> None:
    """The safetensors weights have the shapes ``config.json`` gives the model (a folder whose config was edited,
    or weights of another size saved beside it): the model is built on PyTorch's meta device (no memory, no
    weights read) and each of its parameters compared with the safetensors header of the same name. Quantized
    checkpoints (``quantization_config``) and models with their own code are not compared.

    Raises:
        ModelError: naming the folder, the file, the first weight that differs, both shapes and config.json.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(name_or_path).expanduser()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) or getattr(config, "auto_map", None):
        return
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                found = tuple(f.get_slice(name).get_shape())
                if name in expected and expected[name] != found:
                    raise ModelError(f"model.name_or_path: {name_or_path}: {file.name}: {name} is {list(found)}, "
                                     f"but config.json makes it {list(expected[name])}: the weights do not belong "
                                     "to this config.json (was it edited, or the weights of another size saved "
                                     "beside it?)")


def check_model_folder(name_or_path: str) -> None:
    """A loadable model folder: ``config.json`` is JSON, the weights are safetensors (all shards an index names
    are there) and every ``*.safetensors`` header parses and covers its file (catches truncated or garbage
    files; reads headers only, not the weights).

    Raises:
        ModelError: the folder is missing or a file, ``config.json`` is missing/invalid, only pickle weights
            (``*.bin``, ``*.pt``...) are present (never loaded: unpickling can run code), or a weight file is
            missing, truncated or corrupt.
    """
    from safetensors import safe_open

    folder = Path(name_or_path).expanduser()
    where = f"model.name_or_path: {name_or_path}"
    if not folder.exists():
        raise ModelError(f"{where}: no such folder")
    if not folder.is_dir():
        raise ModelError(f"{where} is a file; expected a model folder (config.json, *.safetensors, tokenizer)")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{where}: config.json: missing") from None
    except (ValueError, OSError) as e:
        raise ModelError(f"{where}: config.json: not valid JSON ({e})") from None
    weights = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelError(f"{where}: {missing[0]}: missing (named in model.safetensors.index.json)")
    if not weights:
        pickles = pickle_files(folder)
        what = (f"only pickle weights ({', '.join(pickles)}), which are never loaded because unpickling can run "
                "code; convert them to safetensors") if pickles else "no *.safetensors weights"
        raise ModelError(f"{where}: {what}")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError is not importable across versions
            raise ModelError(f"{where}: {file.name}: truncated or corrupt ({e})") from None
