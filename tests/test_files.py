import pytest

from tasks.files import atomic_dir, read_jsonl, write_jsonl
from tasks.report import metrics_table


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
