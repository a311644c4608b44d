import json
import os
import subprocess
import sys

import pytest

from tasks.common.files import atomic_dir, read_jsonl, write_jsonl
from tasks.stages.report import metrics_table


def test_atomic_dir_publishes_only_complete_folders(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
        assert not final.exists()
    assert (final / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half-written")
            raise RuntimeError("crash")
    assert (final / "weights").read_text() == "v1"  # the last good folder stays
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_jsonl_round_trip_keeps_unicode(tmp_path):
    rows = [{"a": "naïve ✓"}, {"b": [1, 2]}]
    assert read_jsonl(write_jsonl(tmp_path / "x.jsonl", rows)) == rows


def test_metrics_table_shows_base_tuned_and_delta():
    table = metrics_table({"task": "classification",
                           "base": {"accuracy": 0.1, "macro_f1": 0.05, "eval_loss": 3.0, "perplexity": 20.0,
                                    "n_examples": 10},
                           "finetuned": {"accuracy": 0.7, "macro_f1": 0.6, "eval_loss": 1.0, "perplexity": 2.7,
                                         "n_examples": 10}})
    assert "| accuracy | 0.1000 | 0.7000 | 0.6000 |" in table
    assert "| eval_loss | 3.0000 | 1.0000 | -2.0000 |" in table
    assert "| n_examples | 10 | 10 | — |" in table


def test_metrics_table_shows_the_few_shot_baseline_its_sample_and_intervals():
    sampled = {"n_examples": 500, "population": 3079}
    table = metrics_table({"task": "classification",
                           "base": {"accuracy": 0.0, "macro_f1": 0.0, "eval_loss": 4.6, "perplexity": 100.0,
                                    **sampled, "interval95": {"accuracy": [0.0, 0.0076]}},
                           "base_few_shot": {"accuracy": 0.12, "macro_f1": 0.08, "eval_loss": 3.1, "perplexity": 22.2,
                                             **sampled, "few_shot": 5, "interval95": {"accuracy": [0.094, 0.152]}},
                           "finetuned": {"accuracy": 0.75, "macro_f1": 0.74, "eval_loss": 0.1, "perplexity": 1.1,
                                         "n_examples": 3079, "population": 3079,
                                         "interval95": {"accuracy": [0.735, 0.765]}}})
    assert table.splitlines()[0] == "| metric | base | base 5-shot | fine-tuned | delta |"
    assert "| accuracy | 0.0000 | 0.1200 | 0.7500 | 0.7500 |" in table
    assert "| n_examples | 500 of 3079 (stratified) | 500 of 3079 (stratified) | 3079 | — |" in table
    assert ("| 95 % interval | accuracy [0.000, 0.008] | accuracy [0.094, 0.152] | accuracy [0.735, 0.765] | — |"
            in table)


def test_published_folders_carry_a_manifest_that_catches_truncation_and_corruption(tmp_path):
    from tasks.common.files import MANIFEST, verify_folder

    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
        (tmp / "sub" / "config.json").write_text("{}")
        (tmp / "link").symlink_to("weights.bin")
    manifest = json.loads((final / MANIFEST).read_text())["files"]
    assert set(manifest) == {"weights.bin", "sub/config.json", "link"} and manifest["link"] == {"link": "weights.bin"}
    assert manifest["weights.bin"]["size"] == 1000
    assert verify_folder(final) is None
    (final / "extra.txt").write_text("not in the manifest: ignored")
    assert verify_folder(final) is None

    (final / "weights.bin").write_bytes(b"w" * 999)
    assert "weights.bin: 999 bytes, the manifest says 1000" in verify_folder(final)
    (final / "weights.bin").write_bytes(b"w" * 500 + b"x" + b"w" * 499)
    assert "weights.bin: sha256 differs" in verify_folder(final)
    (final / "weights.bin").write_bytes(b"w" * 1000)
    (final / "sub" / "config.json").unlink()
    assert "config.json: missing" in verify_folder(final)
    (final / MANIFEST).write_text("{")
    assert "unreadable manifest" in verify_folder(final)
    (final / MANIFEST).unlink()
    assert verify_folder(final) is None  # published before manifests existed: trusted
    assert "does not exist" in verify_folder(tmp_path / "missing")


def test_atomic_dir_removes_only_temporary_folders_of_dead_processes(tmp_path):
    from tasks.common.files import HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "model"
    names = {
        "dead": f".model.tmp-{HOST}-{dead.pid}-0123abcd",  # a writer killed mid-write
        "dead-replace": f".model.old-{HOST}-{dead.pid}-0123abcd",  # killed while replacing the old folder
        "live": f".model.tmp-{HOST}-{os.getpid()}-0123abcd",  # a concurrent writer, alive
        "other-host": f".model.tmp-elsewhere-{dead.pid}-0123abcd",  # its processes cannot be seen from here
        "other-folder": f".model2.tmp-{HOST}-{dead.pid}-0123abcd",
        "old-style": ".model.tmp-0123abcd",  # owner unknown
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_text("half")
    with atomic_dir(final) as tmp:
        assert tmp.name.startswith(f".model.tmp-{HOST}-{os.getpid()}-")
        (tmp / "weights").write_text("v1")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"model"} | {names[k] for k in ("live", "other-host", "other-folder", "old-style")}


def test_a_hard_linked_store_file_gets_its_own_inode_when_it_is_the_published_content(tmp_path, caplog):
    """A run copied by an older export-run hard-linked the int4 base's ONNX files, and onnx then refused them for
    every later job ("multiple hard links, indicating a potential hardlink attack"). A store file that other paths
    link to is given its own inode when its bytes are the ones its manifest records, and refused otherwise."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tasks.common.files import unshare_hard_links

    store = tmp_path / "int4-base"
    with atomic_dir(store) as tmp:
        (tmp / "onnx").mkdir()
        weight = numpy_helper.from_array(__import__("numpy").ones((4, 4), "float32"), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
        onnx.save(helper.make_model(graph), tmp / "onnx" / "model.onnx", save_as_external_data=True,
                  location="model.onnx.data", size_threshold=0)
    data = store / "onnx" / "model.onnx.data"
    (tmp_path / "copy").mkdir()
    os.link(data, tmp_path / "copy" / "model.onnx.data")  # what the old export-run did
    with pytest.raises(Exception, match="multiple hard links"):
        onnx.load(str(store / "onnx" / "model.onnx"))
    assert unshare_hard_links(store / "onnx") == [data]
    assert "shared its inode with 1 other path" in caplog.text
    assert data.stat().st_nlink == 1 and (tmp_path / "copy" / "model.onnx.data").read_bytes() == data.read_bytes()
    assert onnx.load(str(store / "onnx" / "model.onnx")).graph.initializer[0].name == "w"
    assert unshare_hard_links(store / "onnx") == []  # nothing linked: nothing to do

    os.link(data, tmp_path / "copy" / "again")
    data.write_bytes(b"not what was published")  # changed through the other link
    with pytest.raises(ValueError, match=r"model.onnx.data: has 2 hard links and is not the content its folder "
                                         r"published .* not read; delete .*int4-base and run again"):
        unshare_hard_links(store / "onnx")
