"""Caching by content, not by run: content-addressed stage folders plus Prefect's own cache.

Every stage publishes into ``<output.dir>/stages/<stage>/<key>``. The key hashes the stage's source file,
the config it reads and its inputs: the content fingerprint of the dataset and base model, and the published
content (manifest) of the upstream stage folders (``flows.finetune.stage_dir``): a Merkle chain, so changing a
file, a setting, a stage's code or an upstream stage's output changes the key of that stage and of everything
downstream, and nothing else — a rebuilt upstream folder with new bytes gives new downstream folders, never a
rewrite of the ones earlier runs link to. Prefect does the caching itself: each task is cached on its inputs
(which include that folder) and its source, with results persisted in the result store so a later run, or
another worker sharing the store, finds them. A cache hit whose folder has been deleted, or no longer matches
its manifest (``tasks.files.verify_folder``), is run again (``flows.finetune.run_stage``) instead of handing
out a path that no longer exists or holds broken weights.

Concurrent runs (two terminals, several workers sharing ``output.dir``): the cache records are SERIALIZABLE
transactions locked per cache key (``ProcessLockManager``: kernel file locks beside the result store), so a
second run of the same stage waits for the first and then reuses its result (state ``Cached``) instead of
computing it again. The kernel drops a lock when its process dies, so a killed run never blocks the next.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import anyio
from filelock import FileLock, Timeout
from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.locking.protocol import LockManager
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


class ProcessLockManager(LockManager):
    """Prefect ``LockManager`` on kernel file locks (``filelock``: ``fcntl``/``flock``), one ``<key>.lock`` file per
    cache key. The kernel releases a lock when the process holding it exits or is killed (SIGKILL, OOM kill), so
    a dead run never blocks the next one — unlike Prefect's ``FileSystemLockManager``, whose lock files without
    ``hold_timeout`` outlive their process and make every later run wait forever. ``hold_timeout`` is therefore
    not needed and ignored. Locks held by this process are remembered per key with their holder (Prefect's
    transaction id)."""

    def __init__(self, lock_files_directory: Path) -> None:
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()
        self._held: dict[str, tuple[str, FileLock]] = {}

    def _file_lock(self, key: str) -> FileLock:
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.lock_files_directory / f"{key}.lock", thread_local=False, is_singleton=False)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        if self.is_lock_holder(key, holder):
            return True
        lock = self._file_lock(key)
        try:
            lock.acquire(timeout=-1 if acquire_timeout is None else acquire_timeout)
        except Timeout:
            return False
        self._held[key] = (holder, lock)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        self._held.pop(key)[1].release()

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        return not self.wait_for_lock(key, timeout=0)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return key in self._held and self._held[key][0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        lock = self._file_lock(key)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            return False
        lock.release()
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


def lock_dir(cfg: FinetuneConfig) -> Path:
    """Folder of the cache-key lock files: ``<result store>/locks`` for a local result store, or
    ``<output.dir>/.prefect-locks`` with a storage block (``block:...``). Kernel file locks keep apart the runs
    of every host that shares this folder on a filesystem with working locks (local disks, NFSv4); otherwise only
    those of one host (then two hosts may compute the same stage at once; the last complete result wins)."""
    setting = cfg.output.result_storage
    if setting and setting.startswith("block:"):
        return Path(cfg.output.dir).expanduser().resolve() / ".prefect-locks"
    return result_storage(cfg) / "locks"


def cached(task: Task, cfg: FinetuneConfig, store: Path | None = None) -> Task:
    """``task`` cached by content (``CACHE_POLICY``), results persisted in ``store`` (default
    ``result_storage(cfg)``), each cache key a SERIALIZABLE transaction locked by ``ProcessLockManager`` in
    ``<store>/locks`` (default ``lock_dir(cfg)``): a concurrent identical run waits, then reuses the result.

    Whether a cache hit's folder is still there and intact is checked after the task returns
    (``flows.finetune.run_stage``), not before: a run that waited for another's lock must find the folder that
    run published."""
    locks = ProcessLockManager(store / "locks" if store else lock_dir(cfg))
    policy = CACHE_POLICY.configure(isolation_level="SERIALIZABLE", lock_manager=locks)
    return task.with_options(cache_policy=policy, persist_result=True, result_storage=store or result_storage(cfg))
