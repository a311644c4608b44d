"""Atomic output helpers: write to a temporary sibling, then rename into place only when complete; folder
manifests (size and sha256 of every file) to tell an intact published folder from a truncated or corrupted one."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = ".manifest.json"
# this host's name as it appears in temporary folder names (no path separators or odd characters)
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
_TEMPORARY_KINDS = ("tmp", "old")


def is_dead_local_process(host: str, pid: int, since: float) -> bool:
    """True when ``pid`` on ``host`` is known to be gone: ``host`` is this machine and no process with that pid
    exists, it is a zombie, or the one that has it started after ``since`` (seconds since the epoch, e.g. the
    mtime of something the owner wrote; a later process only reuses the pid). False for other hosts (their
    processes cannot be seen from here) and for live processes, including other users' (access denied)."""
    import psutil

    if host not in (HOST, socket.gethostname()):
        return False
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE or process.create_time() > since + 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _temporary_owner(final: Path, sibling: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of a temporary sibling ``.<final name>.{tmp,old}-<host>-<pid>-<8 hex>`` of ``final``, or
    None when ``sibling`` is not one (older temporary names carried no owner: never touched)."""
    for kind in _TEMPORARY_KINDS:
        prefix = f".{final.name}.{kind}-"
        if sibling.name.startswith(prefix):
            parts = sibling.name[len(prefix):].rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit() and re.fullmatch(r"[0-9a-f]{8}", parts[2]):
                return parts[0], int(parts[1])
    return None


def remove_stale_temporaries(final: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``final`` (see :func:`atomic_dir`) left by dead processes on this host,
    e.g. a stage killed with SIGKILL while writing. Those of live processes (a concurrent writer) and of other
    hosts are left alone.

    Returns:
        The folders removed.
    """
    final = Path(final)
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except FileNotFoundError:
        return removed
    for sibling in siblings:
        owner = _temporary_owner(final, sibling)
        if owner is None:
            continue
        try:
            since = sibling.lstat().st_mtime
        except FileNotFoundError:  # another process removed it meanwhile
            continue
        if is_dead_local_process(*owner, since):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def changed_file(folder: str | Path, recorded: dict[str, str | None], manifest: str) -> str | None:
    """None when every file of ``recorded`` (``{name: SHA-256}``, in ``folder``) has that SHA-256, else one line
    naming the first that is missing, unreadable or changed (``manifest``: the file that records the digests)."""
    for name, digest in recorded.items():
        path = Path(folder) / name
        try:
            actual = file_sha256(path)
        except OSError as e:
            return f"{path}: unreadable ({e.strerror})"
        if actual != digest:
            return f"{path}: corrupted (SHA-256 {actual[:12]}…, {manifest} records {str(digest)[:12]}…)"
    return None


def _walk(folder: Path) -> Iterator[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of every file and symlink under ``folder`` (symlinks are not followed), the
    manifest excluded, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        for name in files + [d for d in dirs if (root_path / d).is_symlink()]:
            path = root_path / name
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                found.append((rel, path))
    return iter(sorted(found))


def write_manifest(folder: str | Path) -> Path:
    """Write ``<folder>/.manifest.json``: ``{"files": {relative path: {"size": bytes, "sha256": hex}}}`` for every
    file, ``{"link": target}`` for every symlink (not followed). Written atomically; hashing costs about 1 s per
    GB (sha256). Returns the manifest's path."""
    folder = Path(folder)
    files = {}
    for rel, path in _walk(folder):
        if path.is_symlink():
            files[rel] = {"link": os.readlink(path)}
        else:
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return write_json(folder / MANIFEST, {"files": files})


def read_manifest(folder: str | Path) -> dict | None:
    """The ``files`` entry of ``folder``'s manifest (see :func:`write_manifest`), or None when it has none.

    Raises:
        ValueError: the manifest exists but is not a readable manifest.
    """
    path = Path(folder) / MANIFEST
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path}: not a manifest")
    return manifest["files"]


def verify_folder(path: str | Path) -> str | None:
    """Check a published folder against its manifest: None when it is intact, else a one-line reason naming the
    folder or file (missing folder, unreadable manifest, missing file, changed symlink, wrong size, sha256
    mismatch). Sizes are checked before any file is hashed. A folder without a manifest (published before
    manifests existed) counts as intact; files that are not in the manifest are ignored. Cost: reading and
    hashing every listed file, about 1 s per GB on a CPU with SHA extensions when the files are in the page
    cache."""
    folder = Path(path)
    if not folder.is_dir():
        return f"{folder} does not exist"
    try:
        files = read_manifest(folder)
    except ValueError as e:
        return str(e)
    if files is None:
        return None
    for rel, entry in files.items():
        file = folder / rel
        if "link" in entry:
            if not file.is_symlink() or os.readlink(file) != entry["link"]:
                return f"{file}: symlink missing or changed (manifest: -> {entry['link']})"
            continue
        try:
            size = file.stat().st_size
        except OSError:
            return f"{file}: missing"
        if size != entry.get("size"):
            return f"{file}: {size} bytes, the manifest says {entry.get('size')} (truncated or rewritten)"
    for rel, entry in files.items():
        if "link" not in entry and file_sha256(folder / rel) != entry.get("sha256"):
            return f"{folder / rel}: sha256 differs from the manifest (corrupted)"
    return None


def unshare_hard_links(folder: str | Path) -> list[Path]:
    """Give each file under ``folder`` that has other hard links (``st_nlink`` > 1) an inode of its own: checked
    against the manifest of the published folder that holds it (``folder`` or its nearest parent with one), copied
    beside itself and renamed over itself; the other paths keep the old inode and its bytes.

    Why: onnx refuses external data with several hard links ("a potential hardlink attack"), so a shared store
    that another folder links into (a run copied by ``export-run`` before it made real copies) would fail every
    later stage that loads it. Checking the bytes against the store's own manifest first keeps that protection:
    what is read is the content the store published, whatever else links to it.

    Returns:
        the files given their own inode (a warning names each).

    Raises:
        ValueError: a linked file has no manifest entry or other bytes than it records (never read): one line
            naming the file, its link count and the way out (delete the folder; the stage rebuilds it).
    """
    folder = Path(folder)
    root = next((p for p in (folder, *folder.parents) if (p / MANIFEST).is_file()), None)
    linked = [path for _, path in _walk(folder) if not path.is_symlink() and path.stat().st_nlink > 1]
    files = read_manifest(root) if root and linked else {}
    unshared = []
    for path in linked:
        entry, others = files.get(path.relative_to(root).as_posix(), {}) if root else {}, path.stat().st_nlink - 1
        if entry.get("sha256") != file_sha256(path):
            raise ValueError(f"{path}: has {others + 1} hard links and is not the content its folder "
                             f"published (no manifest entry, or another sha256): not read; delete {root or folder} "
                             "and run again (the stage that made it rebuilds it)")
        copy = path.parent / f".{path.name}.unshare-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copy2(path, copy)
            os.replace(copy, path)
        finally:
            copy.unlink(missing_ok=True)
        log.warning("%s shared its inode with %d other path(s) (hard links, e.g. a run copied by an older "
                    "export-run): given its own copy, so that onnx loads it", path, others)
        unshared.append(path)
    return unshared


def content_digest(folder: str | Path) -> str | None:
    """The published content of ``folder``: the sha256 of its manifest's entries (see :func:`write_manifest`), or
    None when it has no readable manifest (content unknown). Reads no file but the manifest."""
    try:
        files = read_manifest(folder)
    except ValueError:
        return None
    return None if files is None else hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; when the body returns, write its manifest
    (:func:`write_manifest`) and rename it into place (replacing an existing ``final``); on error remove it.

    Readers never see a half-written ``final``: it is either the old complete folder or the new complete one,
    and :func:`verify_folder` tells whether it is still intact later. The temporary folder is
    ``.<name>.tmp-<host>-<pid>-<8 hex>``; temporary folders of ``final`` left by dead processes on this host
    (a killed stage) are removed first, never those of a live writer.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    owner = f"{HOST}-{os.getpid()}"
    tmp = final.parent / f".{final.name}.tmp-{owner}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{owner}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(path: str | Path):
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file written by :func:`write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
