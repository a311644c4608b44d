"""Caching by content, not by run: content-addressed stage folders plus Prefect's own cache.

Every stage publishes into ``<output.dir>/stages/<stage>/<key>``. The key hashes the stage's source file,
the config it reads and the keys of its inputs (upstream stage folders, or the content fingerprint of the
dataset and base model): a Merkle chain, so changing a file, a setting or a stage's code changes the key of
that stage and of everything downstream, and nothing else. Prefect does the caching itself: each task is
cached on its inputs (which include that folder) and its source, with results persisted in the result store
so a later run, or another worker sharing the store, finds them. A cache hit whose folder has been deleted, or
no longer matches its manifest (``tasks.files.verify_folder``), is run again (``flows.finetune.run_stage``)
instead of handing out a path that no longer exists or holds broken weights. A task's cache key also covers the
published content (manifest) of the upstream folders and files it reads, so a stage rebuilt with different
bytes re-runs what was computed from the old ones.

Concurrent runs (two terminals, two workers on one host): the cache records are SERIALIZABLE transactions
locked per cache key by a file lock beside the result store, so a second run of the same stage waits for the
first and then reuses its result (state ``Cached``) instead of computing it again. A lock left by a process
that died (SIGKILL, power loss) on this host is taken over; locks are per host (see ``lock_dir``).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic_core
from filelock import FileLock
from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.utilities.hashing import hash_objects

from configs.schema import FinetuneConfig
from tasks.files import content_digest, is_dead_local_process

KEY_LENGTH = 16
logger = logging.getLogger(__name__)


@dataclass
class UpstreamContent(CachePolicy):
    """Cache-key component: the published content of the folders and files a task reads, as their manifests
    record it (``tasks.files.content_digest``), found among its inputs (strings and paths, also inside dicts,
    lists and tuples; the task's own output folders in ``exclude`` are not inputs). None — no component, the
    key of the other policies unchanged — when no input has a manifest (Hub ids, folders published before
    manifests existed)."""

    exclude: tuple[str, ...] = ("out_dir", "checkpoint_dir", "callback_factories")

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        digests: dict[str, str] = {}

        def collect(value) -> None:
            if isinstance(value, dict):
                for item in value.values():
                    collect(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    collect(item)
            elif isinstance(value, (str, Path)) and str(value) and "\n" not in str(value):
                try:
                    if Path(value).exists() and (digest := content_digest(value)):
                        digests[str(value)] = digest
                except (OSError, ValueError):  # not a path (too long, NUL bytes)
                    pass

        for name, value in (inputs or {}).items():
            if name not in self.exclude:
                collect(value)
        return hash_objects(sorted(digests.items()), raise_on_failure=True) if digests else None


# progress-reporting callbacks do not change results, and are not hashable
CACHE_POLICY = INPUTS - "callback_factories" + TASK_SOURCE + UpstreamContent()


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


class StaleAwareLockManager(FileSystemLockManager):
    """Prefect's ``FileSystemLockManager`` (one ``<key>.lock`` file per locked cache key, holding
    ``{"holder", "expiration"}``), except that a lock whose holder is a dead process on this host is free: its
    file is removed. Prefect's own manager never expires a lock taken without ``hold_timeout``, so a run killed
    while holding one would block every later run of that stage forever.

    A transaction's holder is a random UUID, which does not say which process holds the lock, so this manager
    stores it as ``<host>:<pid>:<holder>`` (the process that takes, checks and releases a transaction's lock is
    the one running it) and reads the owner back from there (``tasks.files.is_dead_local_process``; the lock
    file's mtime tells a reused pid). A lock file that cannot be read yet (Prefect creates it, then writes it)
    counts as held, unless it has stayed unreadable for ``UNREADABLE_GRACE_SECONDS`` (its writer died in
    between). Removals are serialised by a ``filelock`` guard in the lock folder, so that a lock taken again
    meanwhile is never removed."""

    UNREADABLE_GRACE_SECONDS = 60.0

    @staticmethod
    def _owned(holder: str) -> str:
        """``holder`` prefixed with this process's ``<host>:<pid>:`` (once)."""
        prefix = f"{socket.gethostname()}:{os.getpid()}:"
        return holder if holder.startswith(prefix) else prefix + holder

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        return super().acquire_lock(key, self._owned(holder), acquire_timeout, hold_timeout)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await super().aacquire_lock(key, self._owned(holder), acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        return super().release_lock(key, self._owned(holder))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return super().is_lock_holder(key, self._owned(holder))

    def _get_lock_info(self, key: str, use_cache: bool = True):
        try:
            info = super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:  # empty or half-written lock file
            info = {"holder": None, "expiration": None, "path": self._lock_path_for_key(key)}
        if info is not None and self._is_stale(info["path"], info["holder"]) and self._remove_if_stale(key):
            return None
        return info

    def _is_stale(self, path: Path, holder: str | None) -> bool:
        """Whether the lock file at ``path`` (``holder``: its holder string, None if unreadable) is a dead
        process's, or a lock file unreadable for longer than ``UNREADABLE_GRACE_SECONDS``."""
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return True
        if holder is None:
            return time.time() - mtime > self.UNREADABLE_GRACE_SECONDS
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        return pid.isdigit() and is_dead_local_process(host, int(pid), mtime)

    def _remove_if_stale(self, key: str) -> bool:
        """Under the guard, read ``key``'s lock file again and remove it if it is stale; True if the lock is free
        now."""
        path = self._lock_path_for_key(key)
        with FileLock(self.lock_files_directory / ".stale-locks.guard"):
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                self._locks.pop(key, None)
                return True
            try:
                holder = pydantic_core.from_json(raw)["holder"]
            except (ValueError, KeyError, TypeError):
                holder = None
            if not self._is_stale(path, holder if isinstance(holder, str) else None):
                return False
            logger.warning("cache lock %s: its holder %s is gone; taking the lock over", path, holder)
            path.unlink(missing_ok=True)
            self._locks.pop(key, None)
            return True


def lock_dir(cfg: FinetuneConfig) -> Path:
    """Folder of the cache-key lock files: ``<result store>/locks`` for a local result store; for a storage
    block (``block:...``), ``<output.dir>/.prefect-locks`` on this host, so locks then only keep the runs of
    one host apart (two hosts may compute the same stage at the same time; the last result written wins)."""
    setting = cfg.output.result_storage
    if setting and setting.startswith("block:"):
        return Path(cfg.output.dir).expanduser().resolve() / ".prefect-locks"
    return result_storage(cfg) / "locks"


def cached(task: Task, cfg: FinetuneConfig) -> Task:
    """``task`` cached by content (``CACHE_POLICY``), results persisted in ``result_storage(cfg)``, each cache
    key a SERIALIZABLE transaction locked in ``lock_dir(cfg)`` (a concurrent identical run waits, then reuses
    the result).

    Whether a cache hit's folder is still there and intact is checked after the task returns
    (``flows.finetune.run_stage``), not before: a run that waited for another's lock must find the folder that
    run published."""
    policy = CACHE_POLICY.configure(isolation_level="SERIALIZABLE",
                                    lock_manager=StaleAwareLockManager(lock_dir(cfg)))
    return task.with_options(cache_policy=policy, persist_result=True, result_storage=result_storage(cfg))
