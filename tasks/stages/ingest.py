"""ingest: read a local file/folder or a Hub dataset, normalise every record to chat messages, drop duplicates.

Normalised record (one JSON line): ``{"messages": [{"role": ..., "content": ...}, ...], "label": str | None}``.
The last message is always the assistant's answer (the completion); ``label`` is set for classification.
"""
from __future__ import annotations

import csv
import difflib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from configs.schema import DataConfig
from tasks.common.files import atomic_dir, write_json, write_jsonl

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
FORMAT_KEYS = {  # detection order matters: the first format whose columns are all present wins
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
}
ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """Bad input data; the message names the file, the 1-based row and the field."""


class SplitCounts(BaseModel):
    """Rows of one source split: read, dropped (empty answer, exact duplicate) and kept."""

    rows: int
    empty_answers_dropped: int
    duplicates_dropped: int
    kept: int


class IngestResult(BaseModel):
    """What ``ingest`` returns and writes as ``ingest.json``."""

    files: dict[str, str] = Field(description="split name -> normalised JSONL file")
    counts: dict[str, SplitCounts]
    format: str = Field(description="the detected record format (FORMAT_KEYS)")
    task: Literal["classification", "generation"]
    labels: list[str] = Field(description="sorted class labels; [] for generation")


def ingest(cfg: DataConfig, out_dir: str | Path) -> IngestResult:
    """Load ``cfg.path``, normalise it and write ``<out_dir>/<split>.jsonl`` for each split the source gives.

    Nothing is written unless every record of every split is valid; ``out_dir`` is published atomically.

    A folder's ``train``/``validation`` (or ``dev``)/``test`` files are read as given splits; a single file
    (or a folder with one data file) is written as ``train``. Exact duplicates within a split are dropped.

    Returns:
        ``IngestResult``.

    Raises:
        DataError: a missing path, an unreadable file, an unknown format or a bad record (file, row, field),
            a label given for the same text twice with different values, or a validation/test label that
            train does not have.
    """
    return publish(*read_records(cfg), out_dir)


def publish(splits: dict[str, SplitRecords], fmt: str, out_dir: str | Path) -> IngestResult:
    """Drop exact duplicates from ``read_records``' splits and write them to ``out_dir`` (atomically); returns
    ``ingest``'s result."""
    out_dir = Path(out_dir)
    kept_by_split, counts = {}, {}
    for name, s in splits.items():
        kept = dedupe([record for _, record in s.records])
        kept_by_split[name] = kept
        counts[name] = SplitCounts(rows=s.n_rows, empty_answers_dropped=len(s.empty_rows),
                                   duplicates_dropped=len(s.records) - len(kept), kept=len(kept))
        log.info("ingest %s: %d rows, %d duplicates dropped (%s)", name, s.n_rows, len(s.records) - len(kept),
                 s.origin)
    labels = sorted({r["label"] for kept in kept_by_split.values() for r in kept if r["label"] is not None})
    result = IngestResult(files={name: str(out_dir / f"{name}.jsonl") for name in kept_by_split}, counts=counts,
                          format=fmt, task="classification" if fmt == "classification" else "generation",
                          labels=labels)
    with atomic_dir(out_dir) as tmp:
        for name, kept in kept_by_split.items():
            write_jsonl(tmp / f"{name}.jsonl", kept)
        write_json(tmp / "ingest.json", result.model_dump(mode="json"))
    return result


@dataclass
class SplitRecords:
    """One source split, normalised: ``records`` are ``(1-based row in origin, record)`` in file order."""

    origin: str
    n_rows: int
    records: list[tuple[int, dict]]
    empty_rows: list[int]


def read_records(cfg: DataConfig) -> tuple[dict[str, SplitRecords], str]:
    """Read and normalise every split of ``cfg.path`` and check them together (see ``ingest``); writes nothing.

    Returns:
        ``({split: SplitRecords}, format)``.

    Raises:
        DataError: as ``ingest``.
    """
    splits, fmt = {}, None
    for name, (origin, rows) in _read_sources(cfg).items():
        fmt_here = cfg.format if cfg.format != "auto" else _detect_format(origin, rows.column_names)
        _check_columns(origin, fmt_here, rows.column_names)
        if fmt is not None and fmt_here != fmt:
            raise DataError(f"{origin}: format {fmt_here!r} differs from the other splits' format {fmt!r}")
        fmt = fmt_here
        empty = [i + 1 for i, r in enumerate(rows) if cfg.drop_empty_answers and _answer_is_empty(r, fmt)]
        if empty:
            log.warning("ingest %s: dropped %d rows with an empty answer (rows %s) (%s)", name, len(empty),
                        ", ".join(map(str, empty[:20])), origin)
        skip = set(empty)
        records = [(i, normalise(r, fmt, cfg, origin, i)) for i, r in enumerate(rows, 1) if i not in skip]
        if not records:
            raise DataError(f"{origin}: no records")
        splits[name] = SplitRecords(origin, len(rows), records, empty)
    if fmt == "classification":
        for s in splits.values():
            check_consistent_labels(s)
        check_label_coverage(splits)
    return splits, fmt


def check_consistent_labels(split: SplitRecords) -> None:
    """Raise ``DataError`` when one text appears twice in a split with two different labels (naming both rows)."""
    first: dict[str, tuple[int, str]] = {}
    for rowno, record in split.records:
        row0, label0 = first.setdefault(prompt_key(record), (rowno, record["label"]))
        if label0 != record["label"]:
            raise DataError(f"{split.origin}: row {rowno}: field 'label': {record['label']!r} contradicts row "
                            f"{row0}, which gives the same text the label {label0!r}")


def check_label_coverage(splits: dict[str, SplitRecords]) -> None:
    """Raise ``DataError`` for the first validation/test row whose label the train split never has: the model
    cannot learn it, and its accuracy would be counted against a class it never saw."""
    train = {r["label"] for _, r in splits["train"].records}
    for name in ("validation", "test"):
        for rowno, record in splits[name].records if name in splits else []:
            if record["label"] not in train:
                raise DataError(f"{splits[name].origin}: row {rowno}: field 'label': {record['label']!r} is not a "
                                f"label of the train split ({splits['train'].origin})")


def _read_sources(cfg: DataConfig) -> dict[str, tuple[str, datasets.Dataset]]:
    """Map split name -> (origin for messages, rows) for a file, a folder or a Hub id."""
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return {"train": (str(path), _rename(read_table(path, cfg.column_names), cfg))}
    if path.is_dir():
        if path.suffix.lower() in READERS:
            raise DataError(f"data.path: {cfg.path} is a folder, not a {path.suffix} file")
        found = _split_files(path)
        return {split: (str(f), _rename(read_table(f, cfg.column_names), cfg)) for split, f in found.items()}
    if _looks_local(cfg.path):
        raise DataError(f"data.path: {cfg.path}: no such file or folder")
    return _read_hub(cfg)


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub id: starts with ., / or ~, or ends with a data file extension."""
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in READERS


def _split_files(folder: Path) -> dict[str, Path]:
    data_files = sorted(f for f in folder.iterdir()
                        if f.is_file() and f.suffix in READERS and not f.name.startswith("."))
    found = {}
    for split, names in SPLIT_NAMES.items():
        matches = [f for f in data_files if f.stem.lower() in names]
        if len(matches) > 1:
            raise DataError(f"{folder}: several {split} files: {', '.join(m.name for m in matches)}")
        if matches:
            found[split] = matches[0]
    if "train" not in found:
        if len(data_files) != 1:
            raise DataError(f"{folder}: expected a train.* file (or exactly one data file) with one of the "
                            f"extensions {', '.join(READERS)}; found {[f.name for f in data_files]}")
        found = {"train": data_files[0]}
    return found


def read_table(file: Path, column_names: list[str] | None = None) -> datasets.Dataset:
    """Read one jsonl/json/csv/tsv/parquet file through ``datasets`` (tsv: tab-separated, no quoting).

    Text files must be UTF-8 (a UTF-8 byte-order mark is accepted and dropped).

    Raises:
        DataError: unsupported extension, an empty file or one without data rows, a file that is not UTF-8
            (naming the line), or a parse error (naming the line for JSON lines).
    """
    import datasets

    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise DataError(f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(READERS)}")
    if file.stat().st_size == 0:
        raise DataError(f"{file}: empty file")
    if reader != "parquet":
        _check_utf8(file)
    kwargs: dict = {}
    if reader == "csv":
        kwargs["column_names"] = column_names
        if file.suffix.lower() == ".tsv":
            kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
    try:
        return datasets.load_dataset(reader, data_files=str(file), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors; find the bad line ourselves where we can
        if reader == "json":
            _raise_json_error(file)
        if "corresponds to no data" in str(e):
            raise DataError(f"{file}: no data rows (only a header or blank lines)") from None
        raise DataError(f"{file}: cannot read as {file.suffix}: {e.__cause__ or e}") from None


def _check_utf8(file: Path) -> None:
    """Raise ``DataError`` naming the first line that is not UTF-8 (or the UTF-16/32 byte-order mark)."""
    with open(file, "rb") as f:
        head = f.read(4)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{file}: line 1: the file is UTF-16 or UTF-32 (byte-order mark {head[:2].hex(' ')}); "
                            "save it as UTF-8")
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}: line {lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None


def _one_document(text: str) -> bool:
    """Whether a .json file's text is one JSON document (an array, or an object over several lines) rather than
    JSON lines saved as .json (``datasets`` reads both): it starts with ``[``, or its first line is not JSON."""
    first = text.lstrip().split("\n", 1)[0]
    if first.startswith("["):
        return True
    try:
        json.loads(first)
        return False
    except json.JSONDecodeError:
        return True


def _raise_json_error(file: Path) -> None:
    text = file.read_text(encoding="utf-8-sig")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as e:
        if file.suffix.lower() == ".json" and _one_document(text):
            raise DataError(f"{file}: line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}: row {lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{file}: row {lineno}: expected a JSON object, got {type(value).__name__}")
    if not text.strip():
        raise DataError(f"{file}: no data rows (only blank lines)")


def _read_hub(cfg: DataConfig) -> dict[str, tuple[str, datasets.Dataset]]:
    import datasets

    try:
        # the commit the flow resolved (tasks/stages/hub.py)
        dd = datasets.load_dataset(cfg.path, revision=cfg.revision)
    except Exception as e:
        raise DataError(f"data.path: cannot load Hub dataset {cfg.path!r} ({type(e).__name__}: {e}). Without "
                        f"Hub access, point data.path at a local file or folder, e.g. "
                        f"--set data.path=../shared/data/banking77") from None
    out = {}
    for name, rows in dd.items():
        split = next((s for s, names in SPLIT_NAMES.items() if name.lower() in names), None)
        if split is None:
            continue
        for col, feature in rows.features.items():  # ClassLabel ints -> label names
            if isinstance(feature, datasets.ClassLabel):
                rows = rows.cast_column(col, datasets.Value("string")).map(
                    lambda r, c=col, f=feature: {c: f.int2str(int(r[c]))})
        out[split] = (f"{cfg.path}[{name}]", _rename(rows, cfg))
    if "train" not in out:
        raise DataError(f"data.path: Hub dataset {cfg.path!r} has no train split (splits: {list(dd)})")
    return out


def _rename(rows: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    mapping = {src: dst for src, dst in cfg.columns.items() if src in rows.column_names}
    return rows.rename_columns(mapping) if mapping else rows


def _detect_format(origin: str, columns: Iterable[str]) -> str:
    columns = set(columns)
    for fmt, keys in FORMAT_KEYS.items():
        if set(keys) <= columns:
            return fmt
    hint = ""
    for keys in FORMAT_KEYS.values():  # a format with all but a misspelt key: name the key and the typo
        missing = [k for k in keys if k not in columns]
        close = difflib.get_close_matches(missing[0], sorted(columns), n=1, cutoff=0.6) if len(missing) == 1 else []
        if close and len(missing) < len(keys):
            hint = (f"row 1: field {missing[0]!r}: missing, but there is a column {close[0]!r} (rename it with "
                    f"data.columns: {{{close[0]}: {missing[0]}}}); ")
            break
    raise DataError(f"{origin}: {hint}cannot tell the record format from columns {sorted(columns)}; expected one "
                    "of " + "; ".join(f"{f}: {'+'.join(k)}" for f, k in FORMAT_KEYS.items())
                    + " (rename columns with data.columns, or set data.format)" + _delimiter_hint(columns))


def _check_columns(origin: str, fmt: str, columns: Iterable[str]) -> None:
    """Raise ``DataError`` naming the file's columns when a format set in ``data.format`` needs one it lacks."""
    columns = set(columns)
    missing = [k for k in FORMAT_KEYS[fmt] if k not in columns]
    if missing:
        raise DataError(f"{origin}: row 1: field {missing[0]!r}: missing; data.format {fmt} needs columns "
                        f"{'+'.join(FORMAT_KEYS[fmt])}, and the file has {sorted(columns)} (rename columns with "
                        "data.columns)" + _delimiter_hint(columns))


def _delimiter_hint(columns: Iterable[str]) -> str:
    """A hint for a delimited file read with the wrong delimiter: its one column name holds the separators."""
    columns = list(columns)
    seps = [sep for sep in (";", "|", "\t") if len(columns) == 1 and sep in columns[0]]
    if not seps:
        return ""
    return (f". The file has a single column whose name holds {seps[0]!r}: is it {seps[0]!r}-separated? .csv files "
            "are read comma-separated and .tsv files tab-separated: save it with commas (or tabs, as .tsv)")


def _answer_is_empty(row: dict, fmt: str) -> bool:
    """True when the row's answer (alpaca output, completion, label, or the last chat message) is missing or
    blank; other problems are left to ``normalise`` to report."""
    if fmt == "chat":
        messages = row.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        value = last.get("content") if isinstance(last, dict) else None
    else:
        value = row.get({"alpaca": "output", "prompt_completion": "completion", "classification": "label"}[fmt])
    return value is None or (isinstance(value, str) and not value.strip())


def _text(row: dict, field: str, origin: str, rowno: int, required: bool = True) -> str:
    value = row.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        got = "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(f"{origin}: row {rowno}: field {field!r}: expected a non-empty string, got {got}")
    return value


def normalise(row: dict, fmt: str, cfg: DataConfig, origin: str, rowno: int) -> dict:
    """Turn one raw record into ``{"messages": [...], "label": ...}`` (see module doc).

    Raises:
        DataError: a missing/empty/mistyped field, naming ``origin``, ``rowno`` (1-based) and the field.
    """
    label = None
    _check_row_format(row, fmt, origin, rowno)
    if fmt == "chat":
        messages = _chat_messages(row, origin, rowno)
    elif fmt == "alpaca":
        instruction = _text(row, "instruction", origin, rowno)
        extra = _text(row, "input", origin, rowno, required=False).strip()
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(row, "output", origin, rowno)}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(row, "prompt", origin, rowno)},
                    {"role": "assistant", "content": _text(row, "completion", origin, rowno)}]
    else:
        label = _label(row, cfg, origin, rowno)
        text = _text(row, "text", origin, rowno).strip()
        messages = [{"role": "user", "content": cfg.prompt_template.format(text=text)},
                    {"role": "assistant", "content": label}]
    if cfg.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return {"messages": messages, "label": label}


def _check_row_format(row: dict, fmt: str, origin: str, rowno: int) -> None:
    """Raise ``DataError`` for a row that lacks ``fmt``'s fields but has another format's: a file mixing
    formats (its columns are the union of both, so the file's format was detected from other rows)."""
    missing = [k for k in FORMAT_KEYS[fmt] if row.get(k) is None]
    other = next((f for f, keys in FORMAT_KEYS.items() if f != fmt and all(row.get(k) is not None for k in keys)),
                 None)
    if missing and other:
        raise DataError(f"{origin}: row {rowno}: field {missing[0]!r}: missing; this row has the {other} fields "
                        f"({', '.join(FORMAT_KEYS[other])}) but the file is {fmt}: one record format per file")


def _label(row: dict, cfg: DataConfig, origin: str, rowno: int) -> str:
    raw = row.get("label")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or (isinstance(raw, str) and not raw.strip()):
        got = "missing" if raw is None else f"{type(raw).__name__} {raw!r}"[:80]
        raise DataError(f"{origin}: row {rowno}: field 'label': expected a string or integer label, got {got}")
    raw = str(raw).strip()
    if cfg.label_names:
        if raw not in cfg.label_names:
            raise DataError(f"{origin}: row {rowno}: field 'label': value {raw!r} is not in data.label_names "
                            f"{sorted(cfg.label_names)}")
        return cfg.label_names[raw]
    return raw


def _chat_messages(row: dict, origin: str, rowno: int) -> list[dict]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{origin}: row {rowno}: field 'messages': expected a non-empty list of messages")
    out = []
    for j, m in enumerate(messages):
        where = f"{origin}: row {rowno}: field 'messages[{j}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}.role': expected one of {sorted(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise DataError(f"{where}.content': expected a non-empty string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{origin}: row {rowno}: field 'messages': the last message must be the assistant's")
    return out


def record_key(record: dict) -> str:
    """Canonical JSON of a record, for exact-duplicate detection."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def prompt_key(record: dict) -> str:
    """Canonical JSON of a record's prompt (every message but the answer), for cross-split leakage checks."""
    return json.dumps(record["messages"][:-1], sort_keys=True, ensure_ascii=False)


def dedupe(records: list[dict]) -> list[dict]:
    """Drop exact duplicates, keeping the first occurrence and the order."""
    seen, kept = set(), []
    for r in records:
        k = record_key(r)
        if k not in seen:
            seen.add(k)
            kept.append(r)
    return kept
