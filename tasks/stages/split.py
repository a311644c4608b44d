"""split: seeded, deterministic train/validation/test splits, stratified by label, with no prompt in two splits."""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

from configs.schema import SplitConfig
from tasks.common.files import atomic_dir, read_jsonl, write_json, write_jsonl
from tasks.stages.ingest import IngestResult, prompt_key

log = logging.getLogger(__name__)


class SplitResult(BaseModel):
    """What ``split`` returns and writes as ``split.json``: per split (train, validation, test) its JSONL file,
    its number of examples, and the examples dropped because their prompt is in a later split."""

    files: dict[str, str]
    counts: dict[str, int]
    leaked_dropped: dict[str, int]


def split(ingested: IngestResult, cfg: SplitConfig, out_dir: str | Path) -> SplitResult:
    """Write ``<out_dir>/{train,validation,test}.jsonl`` from the ingest result (``out_dir`` published atomically).

    Given test/validation files are used as they are; otherwise ``cfg.test_size`` / ``cfg.validation_size``
    fractions are carved from train (stratified by label where every label has two or more examples).
    Training/validation examples whose prompt also appears in test (or training ones also in validation) are
    dropped and counted, so no normalised prompt is in two splits. ``max_*_examples`` then subsample each
    split (stratified).

    Returns:
        ``SplitResult``.

    Raises:
        ValueError: train has too few rows to split off the held-out fractions (the message says how many
            it has and needs), or a split ends up empty.
    """
    files = ingested.files
    train = read_jsonl(files["train"])
    test = read_jsonl(files["test"]) if "test" in files else None
    validation = read_jsonl(files["validation"]) if "validation" in files else None
    carved = [size for size, given in ((cfg.test_size, test), (cfg.validation_size, validation)) if given is None]
    needed = rows_needed(carved)
    if len(train) < needed:
        held_out = " and ".join(f"{name}_size={size}" for name, size, given in (
            ("test", cfg.test_size, test), ("validation", cfg.validation_size, validation)) if given is None)
        raise ValueError(f"the train file has {len(train)} row(s); splitting off {held_out} needs at least "
                         f"{needed} (one or more rows in every split): add rows, or give the held-out splits as "
                         "their own files (validation.jsonl, test.jsonl)")
    if test is None:
        train, test = _split_off(train, cfg.test_size, cfg.seed)
    if validation is None:
        train, validation = _split_off(train, cfg.validation_size, cfg.seed)

    leaked = {}
    test_keys = {prompt_key(r) for r in test}
    validation, leaked["validation"] = _drop_keys(validation, test_keys)
    train, leaked["train"] = _drop_keys(train, test_keys | {prompt_key(r) for r in validation})

    splits = {
        "train": subsample(train, cfg.max_train_examples, cfg.seed),
        "validation": subsample(validation, cfg.max_validation_examples, cfg.seed),
        "test": subsample(test, cfg.max_test_examples, cfg.seed),
    }
    check_disjoint(splits)
    out_dir = Path(out_dir)
    for name, records in splits.items():
        if not records:
            raise ValueError(f"split: the {name} split is empty")
    result = SplitResult(files={name: str(out_dir / f"{name}.jsonl") for name in splits},
                         counts={name: len(records) for name, records in splits.items()}, leaked_dropped=leaked)
    with atomic_dir(out_dir) as tmp:
        for name, records in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", records)
        write_json(tmp / "split.json", result.model_dump(mode="json"))
    log.info("split: %s (dropped for leakage: %s)", result.counts, leaked)
    return result


def rows_needed(sizes: list[float]) -> int:
    """The fewest rows from which every fraction in ``sizes`` can be split off in turn (each part ``ceil(size *
    n)`` rows, as scikit-learn's ``train_test_split`` rounds it) leaving at least one row for train."""
    n = 1
    while True:
        left = n
        for size in sizes:
            left -= math.ceil(size * left)
        if left >= 1:
            return n
        n += 1


def _labels(records: list[dict]) -> list[str] | None:
    labels = [r["label"] for r in records]
    if any(label is None for label in labels) or min(Counter(labels).values()) < 2:
        return None
    return labels


def _split_off(records: list[dict], size: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    from sklearn.model_selection import train_test_split

    labels = _labels(records)
    try:
        return train_test_split(records, test_size=size, random_state=seed, stratify=labels)
    except ValueError:  # a held-out part smaller than the number of classes: split without stratifying
        return train_test_split(records, test_size=size, random_state=seed)


def subsample(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` of ``records`` (all of them when ``n`` is None or not smaller), drawn with ``seed``, stratified by
    ``label`` where every label has two or more rows and ``n`` is at least the number of labels."""
    if n is None or n >= len(records):
        return records
    return _split_off(records, n, seed)[1]


def _drop_keys(records: list[dict], keys: set[str]) -> tuple[list[dict], int]:
    kept = [r for r in records if prompt_key(r) not in keys]
    return kept, len(records) - len(kept)


def check_disjoint(splits: dict[str, list[dict]]) -> None:
    """Raise ``ValueError`` if any prompt appears in two splits."""
    names = list(splits)
    keys = {n: {prompt_key(r) for r in splits[n]} for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = keys[a] & keys[b]
            if shared:
                raise ValueError(f"split: {len(shared)} prompt(s) appear in both {a} and {b}, "
                                 f"e.g. {next(iter(shared))[:120]}")
