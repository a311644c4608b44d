"""Hub revisions and output.push_to_hub (issue 21), against a local stand-in for the Hub, never the network.

``FakeHub`` is a tiny HTTP server implementing just the endpoints huggingface_hub calls here: model/dataset info
at a revision (``HfApi.model_info``/``dataset_info``, ``snapshot_download``'s listing), ``create_repo`` and
``create_commit``'s preupload and commit. ``huggingface_hub.constants.ENDPOINT`` points at it; a fake Hugging Face
cache (``HF_HUB_CACHE``) holds the tiny model as the snapshot of a commit.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from configs.schema import ConfigError, FinetuneConfig, HubPushConfig
from tasks.stages import hub

SHA_1, SHA_2 = "1" * 40, "2" * 40
TOKEN = "hf_" + "T0kenForTheStandInHub" * 2  # what HF_TOKEN holds in these tests: never in logs or files


class FakeHub(ThreadingHTTPServer):
    """The stand-in Hub: ``repos[(type, id)] = {"refs": {revision: sha}, "files": [...]}``; records every request
    (method, path, Authorization header), every created repo (the JSON body) and every commit (its files)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: dict | list, error_code: str | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        self.server.requests.append((self.command, urlparse(self.path).path, self.headers.get("Authorization")))

    def do_GET(self):  # noqa: N802 - http.server's name
        self._record()
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?",
                         urlparse(self.path).path)
        if not m:
            return self._reply(404, {"error": "no such endpoint"})
        kind, repo_id, revision = m.group(1)[:-1], m.group(2), unquote(m.group(4) or "main")
        repo = self.server.repos.get((kind, repo_id))
        if repo is None:
            return self._reply(404, {"error": "Repository not found"}, "RepoNotFound")
        sha = revision if revision in repo["refs"].values() else repo["refs"].get(revision)
        if sha is None:
            return self._reply(404, {"error": "Invalid rev id"}, "RevisionNotFound")
        if m.group(3) == "tree":  # huggingface_hub >= 1.2x lists a snapshot's files so (list_repo_tree)
            return self._reply(200, [{"type": "file", "path": f, "size": 0, "oid": "0" * 40} for f in repo["files"]])
        return self._reply(200, {"id": repo_id, "sha": sha, "private": False,
                                 "siblings": [{"rfilename": f} for f in repo["files"]]})

    def do_POST(self):  # noqa: N802
        self._record()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlparse(self.path).path
        if path == "/api/validate-yaml":  # create_commit checks a README.md's metadata first
            return self._reply(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            request = json.loads(body)
            if "visibility" in request:  # huggingface_hub >= 1.x sends visibility, 0.x sent private
                request["private"] = request["visibility"] == "private"
            self.server.created.append(request)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            return self._reply(200, {"url": f"{self.server.url}/{repo_id}"})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/main", path):
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/main", path):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
            self.server.commits.append({"repo_id": m.group(1), "files": files})
            return self._reply(200, {"commitUrl": f"{self.server.url}/{m.group(1)}/commit/{SHA_2}",
                                     "commitOid": SHA_2})
        return self._reply(404, {"error": "no such endpoint"})


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """The stand-in Hub on a free local port, with an empty Hugging Face cache in ``tmp_path/hf-cache``."""
    from huggingface_hub import constants

    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.shutdown()
    server.server_close()


def cache_model(model_dir: str, repo_id: str, sha: str, ref: str | None = "main") -> Path:
    """Put ``model_dir``'s files in the (fake) Hugging Face cache as the snapshot of commit ``sha`` of the Hub
    model ``repo_id``, with ``refs/<ref>`` naming it as the cache does after a download; the snapshot folder."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(model_dir, snapshot)
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return snapshot


def hub_config(tmp_path, **sections) -> FinetuneConfig:
    tree = {"data": {"path": "org/data"}, "model": {"name_or_path": "org/tiny"}, "output": {"dir": str(tmp_path)}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return FinetuneConfig.model_validate(tree)


def test_hub_ids_resolve_to_commit_shas_that_key_the_stages(fake_hub, tmp_path, classification_dir):
    from flows.caching import stage_key
    from flows.finetune import base_model_source, data_fingerprint
    from flows.stages import INGEST, TRAIN, VALIDATE

    fake_hub.repos[("model", "org/tiny")] = {"refs": {"main": SHA_1, "v1": SHA_1}, "files": []}
    fake_hub.repos[("dataset", "org/data")] = {"refs": {"main": SHA_1, "v2": SHA_2}, "files": []}
    cfg = hub.resolve_revisions(hub_config(tmp_path, data={"revision": "v2"}))
    assert (cfg.model.revision, cfg.data.revision) == (SHA_1, SHA_2)  # main; the tag v2
    assert hub.resolve_revisions(cfg) == cfg  # idempotent: a full sha resolves to itself
    assert ("GET", "/api/datasets/org/data/revision/v2", f"Bearer {TOKEN}") in fake_hub.requests

    def keys(c):
        base_key, data_key = base_model_source(c)[1], data_fingerprint(c)
        return [base_key, data_key] + [stage_key(s, c, data_key, base_key) for s in (VALIDATE, INGEST, TRAIN)]

    before = keys(cfg)
    fake_hub.repos[("model", "org/tiny")]["refs"]["main"] = SHA_2  # the model is re-pushed
    fake_hub.repos[("dataset", "org/data")]["refs"]["v2"] = SHA_1  # the tag moved
    after = keys(hub.resolve_revisions(hub_config(tmp_path, data={"revision": "v2"})))
    assert all(a != b for a, b in zip(before, after)), (before, after)  # every key that reads them changes

    local = hub_config(tmp_path, data={"path": str(classification_dir)})
    local = local.model_copy(update={"model": local.model.model_copy(update={"name_or_path": str(tmp_path)})})
    assert hub.resolve_revisions(local) is local  # local data and folders: keyed by content, untouched


def test_bad_revisions_and_ids_are_named_with_their_value(fake_hub, tmp_path, classification_dir):
    fake_hub.repos[("model", "org/tiny")] = {"refs": {"main": SHA_1}, "files": []}
    fake_hub.repos[("dataset", "org/data")] = {"refs": {"main": SHA_1}, "files": []}
    with pytest.raises(ConfigError, match=r"^model.revision: 'nope' is not a branch, tag or commit of Hub model "
                                          r"'org/tiny'$"):
        hub.resolve_revisions(hub_config(tmp_path, model={"revision": "nope"}))
    with pytest.raises(ConfigError, match=r"^model.name_or_path: no Hub model 'org/gone'"):
        hub.resolve_revisions(hub_config(tmp_path, model={"name_or_path": "org/gone"}))
    with pytest.raises(ConfigError, match=r"^data.path: no Hub dataset 'org/nodata'"):
        hub.resolve_revisions(hub_config(tmp_path, data={"path": "org/nodata"}))
    with pytest.raises(ConfigError, match=r"^model.revision: 'v1' is set, but model.name_or_path 'embedded:"):
        hub.resolve_revisions(hub_config(tmp_path, model={"name_or_path": "embedded:SmolLM2-135M-Instruct",
                                                          "revision": "v1"}))
    with pytest.raises(ConfigError, match=r"^data.revision: 'v1' is set, but data.path '.*' is not a Hub dataset"):
        hub.resolve_revisions(hub_config(tmp_path, data={"path": str(classification_dir), "revision": "v1"}))


def test_offline_a_branch_resolves_to_the_cached_snapshot_and_loads_from_it(fake_hub, tmp_path, monkeypatch,
                                                                             tiny_model_dir, caplog):
    from tasks.base_model import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_model(tiny_model_dir, "org/tiny", SHA_1)
    with caplog.at_level(logging.WARNING, logger="tasks.stages.hub"):
        cfg = hub.resolve_revisions(hub_config(tmp_path, data={"path": str(tmp_path)}))
    assert cfg.model.revision == SHA_1 and "using the locally cached snapshot " + SHA_1 in caplog.text
    assert Path(hub.model_snapshot(cfg.model)) == snapshot
    assert load_tokenizer(hub.model_snapshot(cfg.model)).chat_template
    assert fake_hub.requests == []  # offline: nothing asked of the Hub
    pinned = hub_config(tmp_path, data={"path": str(tmp_path)}, model={"name_or_path": "org/other",
                                                                       "revision": SHA_2})
    assert hub.resolve_revisions(pinned).model.revision == SHA_2  # a full sha needs no Hub
    with pytest.raises(ConfigError, match=r"^model.name_or_path: Hub model 'org/other' at commit 2{40}: the Hub is "
                                          r"unreachable and that snapshot is not in the local Hugging Face cache"):
        hub.model_snapshot(pinned.model)
    with pytest.raises(ConfigError, match=r"^model.name_or_path: cannot load Hub model 'org/tiny' at model.revision "
                                          r"'v9': the Hub is unreachable \(HF_HUB_OFFLINE is set\) and the local "
                                          r"Hugging Face cache .* has no snapshot of it.*Pin model.revision"):
        hub.resolve_revisions(hub_config(tmp_path, data={"path": str(tmp_path)}, model={"revision": "v9"}))
    with pytest.raises(ConfigError, match=r"^data.path: cannot load Hub dataset 'org/data' at data.revision 'main'"
                                          r".*--set data.path="):
        hub.resolve_revisions(hub_config(tmp_path))


def test_an_unreachable_hub_counts_as_offline(fake_hub, tmp_path, monkeypatch, tiny_model_dir):
    from huggingface_hub import constants

    cache_model(tiny_model_dir, "org/tiny", SHA_1)
    fake_hub.shutdown()
    fake_hub.server_close()  # nothing answers on that port any more
    cfg = hub.resolve_revisions(hub_config(tmp_path, data={"path": str(tmp_path)}))
    assert cfg.model.revision == SHA_1 and constants.ENDPOINT == fake_hub.url


def test_online_the_snapshot_of_the_resolved_commit_is_what_stages_load(fake_hub, tmp_path, tiny_model_dir):
    snapshot = cache_model(tiny_model_dir, "org/tiny", SHA_1, ref=None)  # downloaded before, under another ref
    files = sorted(p.name for p in snapshot.iterdir())
    fake_hub.repos[("model", "org/tiny")] = {"refs": {"main": SHA_1}, "files": files + ["pytorch_model.bin"]}
    cfg = hub.resolve_revisions(hub_config(tmp_path, data={"path": str(tmp_path)}))
    assert Path(hub.model_snapshot(cfg.model)) == snapshot  # the cached files of that commit: nothing downloaded
    assert not (snapshot / "pytorch_model.bin").exists()  # pickles are never fetched
    asked = {("GET", f"/api/models/org/tiny/{endpoint}/{SHA_1}", f"Bearer {TOKEN}")
             for endpoint in ("revision", "tree")}
    assert asked & set(fake_hub.requests)  # that commit, with the token (huggingface_hub >= 1.2x lists its tree)


def test_push_run_uploads_merged_and_adapter_in_one_private_commit(fake_hub, tmp_path, monkeypatch, caplog):
    import tasks.stages.portable

    run = tmp_path / "out" / "run-1"
    for sub, names in (("merged", ["model.safetensors", "config.json", "README.md"]),
                       ("adapter", ["adapter_model.safetensors", "adapter_config.json", "README.md"])):
        (run / sub).mkdir(parents=True)
        for name in names:
            (run / sub / name).write_text(f"{sub}/{name}")
    (run / "merged" / ".manifest.json").write_text("{}")

    def fake_export(run_dir, dest):  # export_run itself is covered by test_flow and the flow test below
        shutil.copytree(run_dir, dest)
        return Path(dest)

    monkeypatch.setattr(tasks.stages.portable, "export_run", fake_export)
    with caplog.at_level(logging.DEBUG):
        result = hub.push_run(str(run), HubPushConfig(repo_id="org/tuned"))
    assert [(c["organization"], c["name"], c["private"]) for c in fake_hub.created] == [("org", "tuned", True)]
    [commit] = fake_hub.commits
    assert sorted(commit["files"]) == ["README.md", "adapter/README.md", "adapter/adapter_config.json",
                                       "adapter/adapter_model.safetensors", "config.json", "model.safetensors"]
    assert commit["files"]["adapter/README.md"] == b"adapter/README.md"
    assert result.private and result.commit == SHA_2 and set(result.files) == set(commit["files"])
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests)
    assert TOKEN not in caplog.text and "pushed 6 files of run-1" in caplog.text
    assert not list((tmp_path / "out").glob(".push-*"))  # the temporary portable copy is gone

    hub.push_run(str(run), HubPushConfig(repo_id="org/public", private=False))
    assert fake_hub.created[-1]["private"] is False
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ConfigError, match=r"^output.push_to_hub: pushing to 'org/tuned' needs a Hub token"):
        hub.push_run(str(run), HubPushConfig(repo_id="org/tuned"))


def test_push_to_hub_config_reads_well_and_names_a_bad_repo_id():
    from configs.schema import load_config

    cfg = load_config(None, ["output.push_to_hub.repo_id=org/tuned"])
    assert cfg.output.push_to_hub == HubPushConfig(repo_id="org/tuned", private=True)
    assert load_config(None, []).output.push_to_hub is None
    with pytest.raises(ConfigError, match=r"output.push_to_hub.repo_id: .*not a Hub repo id.*\(got 'org/a b'\)"):
        load_config(None, ["output.push_to_hub.repo_id=org/a b"])


@pytest.mark.slow
def test_flow_on_a_hub_model_pins_its_commit_and_pushes_only_a_run_that_passed_its_gates(
        fake_hub, prefect_server, tmp_path, tiny_model_dir, capsys, caplog):
    """The whole flow (export off) with a Hub base model served from the cache at a commit and push_to_hub set:
    the sha is in metrics.json and the pushed model cards, the push is private with merged + adapter, the token
    is nowhere; a run whose merge gate fails pushes nothing and leaves latest.json alone."""
    from flows.finetune import finetune
    from tests.conftest import tiny_config, write_classification_dir

    snapshot = cache_model(tiny_model_dir, "org/tiny-base", SHA_1)
    fake_hub.repos[("model", "org/tiny-base")] = {"refs": {"main": SHA_1},
                                                  "files": sorted(p.name for p in snapshot.iterdir())}
    out = tmp_path / "out"
    cfg = tiny_config(write_classification_dir(tmp_path / "cls"), out, "org/tiny-base",
                      eval={"evaluate_base": False}, export={"enabled": False},
                      output={"push_to_hub": {"repo_id": "org/tuned"}})
    with caplog.at_level(logging.INFO):
        result = finetune(cfg)
        assert result["config"]["model"]["revision"] == SHA_1
        assert result["hub"]["repo_id"] == "org/tuned" and result["hub"]["private"] is True
        [commit] = fake_hub.commits
        files = commit["files"]
        assert {"model.safetensors", "config.json", "README.md", "adapter/adapter_model.safetensors",
                "adapter/adapter_config.json", "adapter/README.md"} <= set(files)
        assert SHA_1 in files["README.md"].decode() and SHA_1 in files["adapter/README.md"].decode()
        adapter_config = json.loads(files["adapter/adapter_config.json"])
        assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == ("org/tiny-base", SHA_1)
        assert fake_hub.created[0]["private"] is True
        latest = (out / "latest.json").read_bytes()

        bad = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"logit_atol": 1e-12}),
                                     "output": cfg.output.model_copy(update={"run_name": "failed"})})
        state = finetune(bad, return_state=True)
        assert state.is_failed() and "merge: merged logits differ" in str(state.message)
        assert len(fake_hub.commits) == 1 and (out / "latest.json").read_bytes() == latest  # nothing pushed

    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err + caplog.text
    for f in out.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert TOKEN.encode() not in f.read_bytes(), f
