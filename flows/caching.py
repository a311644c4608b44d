"""Caching by content, not by run: one Prefect cache policy (``StageCache``) and content-addressed stage folders.

Every stage publishes into ``<output.dir>/stages/<stage>/<key>``. The key (``stage_key``) is derived from the
stage's declaration (``flows/stages.py``): its name, the config sections it reads (the data's content, never its
path), the published content (manifest) of its upstream folders and any other inputs the flow names, the source of
**every first-party module in the import closure of its function** (``code_fingerprint``: editing a helper the
stage imports, directly or not, changes the key; editing an unrelated module does not) and the versions of the
libraries that shape its result (``library_versions``). A Merkle chain: changing a file, a setting, a stage's
code, a library or an upstream stage's output changes the key of that stage and of everything downstream, and
nothing else — a rebuilt upstream folder with new bytes gives new downstream folders, never a rewrite of the
ones earlier runs link to.

Prefect does the caching itself with ``StageCache``, whose key is that folder key, with results persisted in the
result store so a later run, or another worker sharing the store, finds them. A cache hit whose folder has been
deleted, or no longer matches its manifest (``tasks.common.files.verify_folder``), is run again (``run_stage``).

Concurrent runs (two terminals, several workers sharing ``output.dir``): the cache records are SERIALIZABLE
transactions locked per cache key (``ProcessLockManager``: kernel file locks beside the result store), so a
second run of the same stage waits for the first and then reuses its result (state ``Cached``) instead of
computing it again. The kernel drops a lock when its process dies, so a killed run never blocks the next.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from filelock import FileLock, Timeout
from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.exceptions import MissingContextError
from prefect.locking.protocol import LockManager
from prefect.utilities.hashing import hash_objects

from configs.schema import FinetuneConfig
from flows.retries import with_retries
from tasks.common.files import content_digest, verify_folder

if TYPE_CHECKING:
    from flows.stages import Stage

KEY_LENGTH = 16
ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("configs", "flows", "tasks")
# config fields that say where things are, not what they are: never part of a key
NOT_CONTENT = {"data": {"path"}, "model": {"cache_dir", "hf_token_secret"}}


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


def module_file(module: str) -> Path | None:
    """The source file of a first-party module (``tasks.stages.train`` → ``tasks/stages/train.py``, a package → its
    ``__init__.py``), or None for anything else."""
    if module.split(".")[0] not in FIRST_PARTY:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=256)
def _imports_in(source: bytes) -> frozenset[str]:
    """Module names ``source`` imports anywhere (top level, inside functions, under TYPE_CHECKING): for
    ``from a.b import c`` both ``a.b`` and ``a.b.c`` (``c`` may be a submodule). Cached by content: a flow run
    keys ~10 stages whose closures share most files, and an edited file is parsed again."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def import_closure(module: str) -> list[Path]:
    """The source files of ``module`` and of every first-party module it imports, directly or through others,
    with their packages' ``__init__.py``; sorted. Read from the sources (``ast``), so lazy imports inside
    functions count too."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the module and its parent packages
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_imports_in(path.read_bytes()))
    return sorted(seen)


def code_fingerprint(fn) -> str:
    """sha256 (16 hex) of the relative path and bytes of every file in the import closure of ``fn``'s module
    (``inspect.unwrap``: wrappers such as the gpu slot do not count)."""
    digest = hashlib.sha256()
    for path in import_closure(inspect.unwrap(fn).__module__):
        digest.update(f"{path.relative_to(ROOT)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:KEY_LENGTH]


def library_versions(names) -> dict[str, str | None]:
    """``{distribution: installed version or None}`` for ``names``."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def config_section(cfg: FinetuneConfig, name: str) -> dict:
    """One config section as JSON, without the fields that only say where things are (``NOT_CONTENT``)."""
    return getattr(cfg, name).model_dump(mode="json", exclude=NOT_CONTENT.get(name))


def stage_key(stage: Stage, cfg: FinetuneConfig | None, *parts) -> str:
    """Key of one stage's output: its name, code (``code_fingerprint``), library versions, the config sections
    its declaration names (read from ``cfg``) and ``parts`` (upstream keys or folders, other inputs). A part that
    is a published folder counts by its content (``tasks.common.files.content_digest``, from its manifest), not by its
    path; pydantic models are hashed through their JSON form.

    Raises:
        ValueError: a part cannot be hashed.
    """
    def plain(part):
        if hasattr(part, "model_dump"):
            return part.model_dump(mode="json")
        digest = content_digest(part) if isinstance(part, str) and Path(part).is_dir() else None
        return ("folder", digest) if digest else part  # a published folder counts by content, not by its path

    sections = [config_section(cfg, name) for name in stage.sections] if cfg is not None else []
    return hash_objects(stage.name, code_fingerprint(stage.fn), library_versions(stage.libraries), sections,
                        *map(plain, parts), raise_on_failure=True)[:KEY_LENGTH]


def stage_dir(cfg: FinetuneConfig, stage: Stage, *parts) -> str:
    """The content-addressed folder ``<output.dir>/stages/<stage>/<stage_key>`` of one stage's output."""
    return str(Path(cfg.output.dir) / "stages" / stage.name / stage_key(stage, cfg, *parts))


@dataclass
class StageCache(CachePolicy):
    """The one cache policy of every stage: the Prefect cache key is the stage's content key — the name of its
    ``out_dir`` argument (``stage_dir``) — or ``key`` for a stage that publishes no folder (validate). So the
    cache hit and the folder can never disagree, and inputs that only say where things are (paths, progress
    callbacks) do not count. Configure it with ``isolation_level`` and a ``lock_manager`` (``cached``)."""

    key: str | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        if self.key:
            return self.key
        return hash_objects(task_ctx.task.name, Path(inputs["out_dir"]).name, raise_on_failure=True)


# the config sections a trained model (and its test split) is a function of; eval/merge/export only measure it
MODEL_SECTIONS = ("data", "split", "model", "lora", "train")


def source_fingerprint(cfg: FinetuneConfig, data: str, base_model: str) -> dict:
    """What a trained model is made from: ``{"data", "base_model", "config"}`` — the data's and the base
    model's content keys and the hash of the config sections in ``MODEL_SECTIONS``. Recorded in
    ``latest.json``; the nightly retrain skips when it is unchanged."""
    sections = [config_section(cfg, name) for name in MODEL_SECTIONS]
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


def cached(task, cfg: FinetuneConfig, store: Path | None = None, key: str | None = None):
    """``task`` cached by ``StageCache`` (``key``: see there), results persisted in ``store`` (default
    ``result_storage(cfg)``), each cache key a SERIALIZABLE transaction locked by ``ProcessLockManager`` in
    ``<store>/locks`` (default ``lock_dir(cfg)``): a concurrent identical run waits, then reuses the result.

    Whether a cache hit's folder is still there and intact is checked after the task returns (``run_stage``),
    not before: a run that waited for another's lock must find the folder that run published."""
    locks = ProcessLockManager(store / "locks" if store else lock_dir(cfg))
    policy = StageCache(key=key).configure(isolation_level="SERIALIZABLE", lock_manager=locks)
    return task.with_options(cache_policy=policy, persist_result=True, result_storage=store or result_storage(cfg))


@dataclass(frozen=True)
class StageRun:
    """One stage run by a flow: its result, its output folder (None for a stage that publishes none), its wall
    time in seconds and its final state (``Completed`` or ``Cached``)."""

    result: Any
    dir: str | None
    seconds: float
    state: str


def run_stage(cfg: FinetuneConfig, stage: Stage, *args, after: tuple | None = None, out_dir: str | Path | None = None,
              label: str | None = None, store: Path | None = None, key: str | None = None, **kwargs) -> StageRun:
    """Run ``stage.fn(*args, out_dir=<its folder>, **kwargs)`` cached by content (``cached``) and retried on
    transient failures (``cfg.retry``), as a task run named ``label`` (default: the stage name), e.g.
    ``evaluate-base``.

    The folder is ``stage_dir(cfg, stage, *after)``: ``after`` holds what the output is a function of beyond the
    declaration (upstream folders, content keys, other inputs); ``out_dir`` names another place instead (the
    converted base model lives in ``model.cache_dir``); with ``key`` and neither, the stage publishes no folder
    and ``key`` is its cache key (validate).

    A cache hit is checked after the task returns (a run that waited for a concurrent one's lock finds the
    folder it published): if the folder is missing or fails ``tasks.common.files.verify_folder`` (truncated or
    corrupted files), a warning names the reason and the task runs again with ``refresh_cache``.

    Raises:
        whatever the stage raises once its retries are spent.
    """
    start = time.perf_counter()
    if out_dir is None and after is not None:
        out_dir = stage_dir(cfg, stage, *after)
    if out_dir is not None:
        kwargs["out_dir"] = out_dir = str(out_dir)
    stage_task = with_retries(cached(stage.task, cfg, store, key), cfg.retry)
    stage_task = stage_task.with_options(task_run_name=label or stage.name)
    state = stage_task(*args, return_state=True, **kwargs)
    if state.name == "Cached" and out_dir is not None and (problem := verify_folder(out_dir)):
        try:
            logger = get_run_logger()
        except MissingContextError:
            logger = logging.getLogger(__name__)
        logger.warning("%s: the cached output is unusable (%s); running the stage again", stage.name, problem)
        state = stage_task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
    return StageRun(state.result(), out_dir, time.perf_counter() - start, state.name)
