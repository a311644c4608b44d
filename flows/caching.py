"""Caching by content, not by run: content-addressed stage folders plus Prefect's own cache.

Every stage publishes into ``<output.dir>/stages/<stage>/<key>``. The key hashes the stage's source file,
the config it reads and the keys of its inputs (upstream stage folders, or the content fingerprint of the
dataset and base model): a Merkle chain, so changing a file, a setting or a stage's code changes the key of
that stage and of everything downstream, and nothing else. Prefect does the caching itself: each task is
cached on its inputs (which include that folder) and its source, with results persisted in the result store
so a later run, or another worker sharing the store, finds them. A cache hit whose folder has been deleted is
refreshed (the task runs again) instead of handing out a path that no longer exists.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.utilities.hashing import hash_objects

from configs.schema import FinetuneConfig

KEY_LENGTH = 16
# progress-reporting callbacks do not change results, and are not hashable
CACHE_POLICY = INPUTS - "callback_factories" + TASK_SOURCE


def fingerprint(path_or_id: str) -> str:
    """Content hash (sha256, 16 hex) of a file, or of a folder's files (relative path + bytes); for anything
    that is not a local path (a Hub id), the hash of the id string itself."""
    path = Path(path_or_id).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(f for f in path.rglob("*") if f.is_file()), path
    else:
        digest.update(f"id:{path_or_id}".encode())
        return digest.hexdigest()[:KEY_LENGTH]
    for f in files:
        digest.update(f"{f.relative_to(root)}\0".encode())
        with open(f, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:KEY_LENGTH]


def stage_key(task: Task, *parts) -> str:
    """Key of one stage's output: its name, its module's source and ``parts`` (config sections, upstream
    keys). Pydantic models are hashed through their JSON form."""
    source = hashlib.sha256(Path(inspect.getsourcefile(inspect.unwrap(task.fn))).read_bytes()).hexdigest()
    plain = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
    return hash_objects(task.name, source, *plain, raise_on_failure=True)[:KEY_LENGTH]


# the config sections a trained model (and its test split) is a function of; eval/merge/export only measure it
MODEL_SECTIONS = ("data", "split", "model", "lora", "train")


def source_fingerprint(cfg: FinetuneConfig, data: str, base_model: str) -> dict:
    """What a trained model is made from: ``{"data", "base_model", "config"}`` — the data's and the base
    model's content keys and the hash of the config sections in ``MODEL_SECTIONS``. Recorded in
    ``latest.json``; the nightly retrain skips when it is unchanged."""
    sections = [getattr(cfg, name).model_dump(mode="json") for name in MODEL_SECTIONS]
    return {"data": data, "base_model": base_model,
            "config": hash_objects(*sections, raise_on_failure=True)[:KEY_LENGTH]}


def result_storage(cfg: FinetuneConfig):
    """Where Prefect persists task results and cache records: ``output.result_storage`` as a local folder,
    ``block:<type>/<name>`` for a saved Prefect storage block (e.g. shared by several workers), or by
    default ``<output.dir>/.prefect-results``."""
    setting = cfg.output.result_storage
    if setting and setting.startswith("block:"):
        from prefect.filesystems import WritableFileSystem

        return WritableFileSystem.load(setting.removeprefix("block:"))
    return Path(setting or Path(cfg.output.dir) / ".prefect-results").expanduser().resolve()


def cached(task: Task, cfg: FinetuneConfig, out_dir: str | Path) -> Task:
    """``task`` cached by content, results persisted; refreshed when ``out_dir`` does not exist."""
    return task.with_options(cache_policy=CACHE_POLICY, persist_result=True, result_storage=result_storage(cfg),
                             refresh_cache=not Path(out_dir).exists())
