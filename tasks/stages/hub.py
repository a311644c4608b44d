"""The Hugging Face Hub: pin a Hub base model or dataset to a commit, and push a published run (issue 21).

**Revisions.** A Hub id names a moving target: a model or dataset re-pushed under the same id would otherwise reuse
the stages cached for its old files. ``resolve_revisions`` turns ``model.revision`` / ``data.revision`` (a
branch, tag or commit sha; None = ``main``) into the full commit sha, once per run, in the config the flow hands
to its stages — so the sha is in the ``model``/``data`` config sections that the stage keys hash, in the base
model's and the data's content keys (``flows.finetune.base_model_source``, ``data_fingerprint``), in
``metrics.json`` and in the model cards. Every stage then reads that commit: the base model from its snapshot
folder (``model_snapshot``, ``huggingface_hub.snapshot_download`` at the sha), the dataset through
``datasets.load_dataset(..., revision=sha)``.

Offline (``HF_HUB_OFFLINE=1``, or the Hub does not answer): a revision that is already a full 40-hex sha is used
as it is; a branch or tag resolves to the sha the local Hugging Face cache recorded for it when it was last
downloaded (``huggingface_hub.scan_cache_dir``: the cache's ``refs/<branch>``), with a warning; with no cached
snapshot the run stops before any stage with a ``ConfigError`` naming the field, the id and the revision.
Local folders and the embedded model are keyed by content already: a ``revision`` for them is refused.

**Push.** ``push_run`` uploads a published run folder (``output.push_to_hub``): the portable copy
(``tasks.stages.portable.export_run``: real files, model cards) of ``merged/`` at the repo's root and ``adapter/`` under
``adapter/``, in one commit, to a repo it creates private by default. The token is huggingface_hub's own
(``HF_TOKEN``, put there from ``model.hf_token_secret`` by ``tasks.base_model.use_hub_token``); it is never
passed around, logged or written.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from pydantic import BaseModel

from configs.schema import EMBEDDED_MODEL, ConfigError, FinetuneConfig, HubPushConfig, ModelConfig

log = logging.getLogger(__name__)

FULL_SHA = re.compile(r"[0-9a-f]{40}")
# Hub files a base model's snapshot never needs: pickles (refused anyway), GGUF/ONNX/TF/Flax/... copies
MODEL_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack",
                "*.ot", "*.tflite", "*.mlmodel", "onnx/*", "openvino/*", "coreml/*", "runs/*"]


def is_local(path: str) -> bool:
    """True for anything that is a local path rather than a Hub id: it exists, or starts with ``.``, ``/``
    or ``~`` (as ``tasks.stages.validate.check_base_model`` and ``tasks.stages.ingest`` tell them apart)."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~"))


def is_hub_model(name_or_path: str) -> bool:
    """True when ``model.name_or_path`` is a Hub model id (not the embedded model, not a local folder)."""
    return name_or_path != EMBEDDED_MODEL and not is_local(name_or_path)


def is_hub_dataset(path: str) -> bool:
    """True when ``data.path`` is a Hub dataset id (not a local file or folder, no data file extension that
    ``tasks.stages.ingest`` reads)."""
    from tasks.stages.ingest import READERS

    return not is_local(path) and Path(path).suffix.lower() not in READERS


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it, at call time (the library reads it once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES",
                                                                                             "TRUE"}


def cached_revision(repo_id: str, revision: str, repo_type: str = "model") -> str | None:
    """The commit sha the local Hugging Face cache (``HF_HUB_CACHE``) records for ``revision`` (a branch or tag)
    of ``repo_id`` — the one last downloaded — if that snapshot folder is there; else None."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return None
    for repo in cache.repos:
        if repo.repo_id == repo_id and repo.repo_type == repo_type and revision in repo.refs:
            found = repo.refs[revision]
            return found.commit_hash if Path(found.snapshot_path).is_dir() else None
    return None


def resolve_revision(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The full commit sha of ``revision`` (branch, tag or sha; None = ``main``) of the Hub ``repo_id``
    (``repo_type`` ``"model"`` or ``"dataset"``): asked of the Hub (``HfApi().model_info`` / ``dataset_info``),
    or, when the Hub is unreachable or ``HF_HUB_OFFLINE`` is set, ``revision`` itself if it is a full sha, else
    the sha the local cache recorded for it (``cached_revision``; a warning says so).

    Raises:
        ConfigError: naming ``model.name_or_path``/``model.revision`` (``data.path``/``data.revision``) and the
            value: the repo does not exist or the token has no access, the revision does not exist, or the Hub
            is unreachable and nothing resolves offline.
    """
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    section, kind = ("model", "model") if repo_type == "model" else ("data", "dataset")
    id_field, rev_field = ("model.name_or_path" if section == "model" else "data.path"), f"{section}.revision"
    wanted = revision or "main"
    where = f"Hub {kind} {repo_id!r} at {rev_field} {wanted!r}"
    reason = "HF_HUB_OFFLINE is set"
    if not hub_offline():
        api = HfApi()
        try:
            info = (api.model_info if repo_type == "model" else api.dataset_info)(repo_id, revision=revision)
            if not info.sha:
                raise ConfigError(f"{rev_field}: the Hub gave no commit sha for {where}")
            return info.sha
        except RevisionNotFoundError:
            raise ConfigError(f"{rev_field}: {wanted!r} is not a branch, tag or commit of Hub {kind} "
                              f"{repo_id!r}") from None
        except GatedRepoError:
            raise ConfigError(f"{id_field}: Hub {kind} {repo_id!r} is gated: accept its terms on the Hub and set "
                              "HF_TOKEN (or model.hf_token_secret) to a token of that account") from None
        except RepositoryNotFoundError:
            raise ConfigError(f"{id_field}: no Hub {kind} {repo_id!r} (or it is private and HF_TOKEN/"
                              "model.hf_token_secret gives no access to it)") from None
        except HfHubHTTPError as e:  # the Hub answered with an error of its own (5xx, 429...): treat as unreachable
            status = getattr(e.response, "status_code", None)
            if status is not None and status < 500 and status != 429:
                raise ConfigError(f"{id_field}: the Hub refused {where}: HTTP {status}") from None
            reason = f"HTTP {status}"
        except (OSError, ValueError, httpx.TransportError) as e:  # huggingface_hub >= 1 talks httpx: its
            reason = type(e).__name__  # connection errors and timeouts are not OSErrors
    if revision and FULL_SHA.fullmatch(revision):
        log.warning("%s: the Hub is unreachable (%s); using the pinned commit %s", id_field, reason, revision)
        return revision
    sha = cached_revision(repo_id, wanted, repo_type)
    if sha is None:
        hint = (" Without Hub access, point data.path at a local file or folder, e.g. "
                "--set data.path=../shared/data/banking77" if section == "data" else
                f" Pin {rev_field} to a full 40-hex commit sha whose files are cached, or point {id_field} at a "
                "local folder.")
        raise ConfigError(f"{id_field}: cannot load {where}: the Hub is unreachable ({reason}) and the local Hugging "
                          f"Face cache ({constants.HF_HUB_CACHE}) has no snapshot of it, so its commit is unknown."
                          + hint)
    log.warning("%s: the Hub is unreachable (%s); using the locally cached snapshot %s of %s", id_field, reason,
                sha, where)
    return sha


def resolve_revisions(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with ``model.revision`` and ``data.revision`` set to the full commit sha (``resolve_revision``) when
    ``model.name_or_path`` / ``data.path`` is a Hub id; unchanged otherwise. Idempotent (a full sha resolves to
    itself). Call it once at the start of a flow, after ``tasks.base_model.use_hub_token``: the stage keys, the
    content keys and ``metrics.json`` then carry the sha.

    Raises:
        ConfigError: a ``revision`` is set for a local folder or file or the embedded model (they are keyed by
            content), or as ``resolve_revision``.
    """
    update = {}
    model, data = cfg.model, cfg.data
    if is_hub_model(model.name_or_path):
        update["model"] = model.model_copy(update={"revision": resolve_revision(model.name_or_path, model.revision)})
    elif model.revision is not None:
        raise ConfigError(f"model.revision: {model.revision!r} is set, but model.name_or_path "
                          f"{model.name_or_path!r} is not a Hub id (a local folder or the embedded model is keyed "
                          "by its content): unset model.revision")
    if is_hub_dataset(data.path):
        update["data"] = data.model_copy(update={"revision": resolve_revision(data.path, data.revision, "dataset")})
    elif data.revision is not None:
        raise ConfigError(f"data.revision: {data.revision!r} is set, but data.path {data.path!r} is not a Hub "
                          "dataset id (local data is keyed by its content): unset data.revision")
    return cfg.model_copy(update=update) if update else cfg


def model_snapshot(cfg: ModelConfig) -> str:
    """The local folder of the Hub model ``cfg.name_or_path`` at commit ``cfg.revision`` (resolved first when it is
    not a full sha yet): ``huggingface_hub.snapshot_download`` into the Hugging Face cache (only what is missing;
    without the ``MODEL_IGNORE`` files: pickles, GGUF, ONNX...), or the cached snapshot when the Hub is
    unreachable. Every stage loads the base model from this folder, so all of them read the same commit.

    Raises:
        ConfigError: naming ``model.name_or_path``: that commit is neither downloadable nor cached, or as
            ``resolve_revision``.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    sha = cfg.revision if cfg.revision and FULL_SHA.fullmatch(cfg.revision) else resolve_revision(
        cfg.name_or_path, cfg.revision)
    try:
        return snapshot_download(cfg.name_or_path, revision=sha, ignore_patterns=MODEL_IGNORE,
                                 local_files_only=hub_offline())
    except LocalEntryNotFoundError:
        raise ConfigError(f"model.name_or_path: Hub model {cfg.name_or_path!r} at commit {sha}: the Hub is "
                          "unreachable and that snapshot is not in the local Hugging Face cache") from None


class HubPushResult(BaseModel):
    """What ``push_run`` uploaded: the repo, its visibility as asked, the commit and the files' repo paths."""

    repo_id: str
    private: bool
    url: str
    commit: str | None
    files: list[str]


def require_push_token(push: HubPushConfig | None) -> None:
    """Check, before any stage runs, that ``output.push_to_hub`` (when set) will find a Hub token
    (``huggingface_hub.get_token``: ``HF_TOKEN``, which ``model.hf_token_secret`` fills). The token is not read
    out or logged.

    Raises:
        ConfigError: naming ``output.push_to_hub`` and the repo: no token.
    """
    if push is None:
        return
    from huggingface_hub import get_token

    if not get_token():
        raise ConfigError(f"output.push_to_hub: pushing to {push.repo_id!r} needs a Hub token with write access: "
                          "set HF_TOKEN or model.hf_token_secret")


def push_operations(folder: Path) -> list:
    """``CommitOperationAdd``s for a portable run folder (``tasks.stages.portable.export_run``): ``merged/*`` at the
    repo's root (``from_pretrained(repo_id)`` loads it), ``adapter/*`` under ``adapter/``; hidden files (manifests)
    left out.

    Raises:
        FileNotFoundError: ``folder`` has no ``merged/`` model.
    """
    from huggingface_hub import CommitOperationAdd

    if not (folder / "merged").is_dir():
        raise FileNotFoundError(f"{folder}: no merged/ model to push")
    ops = []
    for sub, prefix in (("merged", ""), ("adapter", "adapter/")):
        root = folder / sub
        for f in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
            rel = f.relative_to(root).as_posix()
            if not any(part.startswith(".") for part in Path(rel).parts):
                ops.append(CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(f)))
    return ops


def push_run(run_dir: str, push: HubPushConfig) -> HubPushResult:
    """Upload the published run folder ``run_dir`` to the Hub model repo ``push.repo_id``: create the repo if
    missing (``HfApi.create_repo``, ``private=push.private``; an existing repo keeps its visibility), then one
    commit (``HfApi.create_commit``: both folders or nothing) of its portable copy's merged model at the root and
    adapter under ``adapter/``, each with its ``README.md`` model card. The copy is made in a temporary folder
    beside ``run_dir`` (a real copy: ``tasks.stages.portable``) and removed afterwards.

    The token is the one huggingface_hub finds (``HF_TOKEN``); it is neither an argument nor logged. The flow
    calls this only for a run that passed every gate and was published (``latest.json``).

    Returns:
        the repo, visibility asked, commit url/oid and the uploaded paths in the repo.

    Raises:
        ConfigError: naming ``output.push_to_hub``: there is no Hub token, or the Hub refused with a 4xx
            status (e.g. the token may not write to that namespace; permanent, never retried).
        tasks.stages.portable.ExportRunError: ``run_dir`` is not an intact run folder.
        huggingface_hub.errors.HfHubHTTPError: the Hub failed with a 5xx status (transient: retried).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from tasks.stages.portable import export_run

    require_push_token(push)
    run_dir = Path(run_dir)
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix=".push-", dir=run_dir.parent) as tmp:
        folder = export_run(run_dir, Path(tmp) / run_dir.name)
        ops = push_operations(folder)
        try:
            repo = api.create_repo(push.repo_id, private=push.private, repo_type="model", exist_ok=True)
            commit = api.create_commit(push.repo_id, operations=ops, repo_type="model",
                                       commit_message=f"finetune-flow: run {run_dir.name}",
                                       commit_description="Merged model (root) and LoRA adapter (adapter/) of a "
                                                          "run that passed its merge and export gates.")
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            if status is None or status >= 500 or status == 429:
                raise
            raise ConfigError(f"output.push_to_hub: the Hub refused the push to {push.repo_id!r}: HTTP {status} "
                              f"({str(e).splitlines()[0]})") from None
    files = [op.path_in_repo for op in ops]
    log.info("pushed %d files of %s to %s (%s) at commit %s", len(files), run_dir.name, repo,
             "private" if push.private else "public", commit.oid)
    return HubPushResult(repo_id=push.repo_id, private=push.private, url=str(repo), commit=commit.oid, files=files)
