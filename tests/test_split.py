from collections import Counter

import pytest

from configs.schema import SplitConfig
from tasks.common.files import read_jsonl, write_jsonl
from tasks.stages.ingest import IngestResult
from tasks.stages.split import check_disjoint, split


def _rec(text: str, label: str | None = "a") -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label or "x"}],
            "label": label}


def _ingested(tmp_path, train, test=None, validation=None) -> IngestResult:
    files = {"train": str(write_jsonl(tmp_path / "in_train.jsonl", train))}
    if test is not None:
        files["test"] = str(write_jsonl(tmp_path / "in_test.jsonl", test))
    if validation is not None:
        files["validation"] = str(write_jsonl(tmp_path / "in_val.jsonl", validation))
    return IngestResult(files=files, counts={}, format="classification", task="classification", labels=[])


def _read(result) -> dict[str, list[dict]]:
    return {k: read_jsonl(v) for k, v in result.files.items()}


def test_split_is_seeded_deterministic_and_stratified(tmp_path):
    train = [_rec(f"t{i}", label) for label, n in (("a", 60), ("b", 30), ("c", 10)) for i in range(n)]
    cfg = SplitConfig(seed=3, test_size=0.2, validation_size=0.1)
    first = _read(split(_ingested(tmp_path, train), cfg, tmp_path / "s1"))
    second = _read(split(_ingested(tmp_path, train), cfg, tmp_path / "s2"))
    assert first == second
    assert Counter(r["label"] for r in first["test"]) == {"a": 12, "b": 6, "c": 2}
    other = _read(split(_ingested(tmp_path, train), SplitConfig(seed=4, test_size=0.2), tmp_path / "s3"))
    assert other["test"] != first["test"]


def test_given_test_file_is_used_and_leaked_prompts_are_dropped_from_train(tmp_path):
    train = [_rec(f"t{i}", "ab"[i % 2]) for i in range(40)] + [_rec("shared", "a")]
    test = [_rec("shared", "b"), _rec("only test", "a")]
    result = split(_ingested(tmp_path, train, test), SplitConfig(validation_size=0.25), tmp_path / "s")
    splits = _read(result)
    assert splits["test"] == test
    assert result.leaked_dropped["train"] == 1
    assert all(r["messages"][0]["content"] != "shared" for r in splits["train"] + splits["validation"])
    counts = result.counts
    assert counts["test"] == 2 and counts["train"] + counts["validation"] == 40


def test_max_examples_subsample_keeps_label_balance(tmp_path):
    train = [_rec(f"t{i}", "ab"[i % 2]) for i in range(200)]
    result = split(_ingested(tmp_path, train, [_rec("x")]),
                   SplitConfig(max_train_examples=40, max_validation_examples=4), tmp_path / "s")
    splits = _read(result)
    assert Counter(r["label"] for r in splits["train"]) == {"a": 20, "b": 20}
    assert len(splits["validation"]) == 4


def test_generation_data_splits_without_labels(tmp_path):
    train = [_rec(f"q{i}", None) for i in range(50)]
    result = split(_ingested(tmp_path, train), SplitConfig(test_size=0.2, validation_size=0.1), tmp_path / "s")
    assert result.counts == {"train": 36, "validation": 4, "test": 10}


def test_check_disjoint_raises_on_a_shared_prompt():
    with pytest.raises(ValueError, match="appear in both train and test"):
        check_disjoint({"train": [_rec("x", "a")], "test": [_rec("x", "b")]})


@pytest.mark.parametrize(("n", "given", "needed"), [(2, {}, 3), (1, {"test": [_rec("t")]}, 2)])
def test_too_few_rows_to_split_off_says_how_many_there_are_and_are_needed(tmp_path, n, given, needed):
    train = [_rec(f"row {i}") for i in range(n)]
    with pytest.raises(ValueError, match=rf"the train file has {n} row\(s\); splitting off .* needs at least "
                                         rf"{needed} \(one or more rows in every split\)"):
        split(_ingested(tmp_path, train, **given), SplitConfig(test_size=0.1, validation_size=0.2), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    ok = [_rec(f"row {i}") for i in range(needed)]  # exactly enough: every split gets a row
    counts = split(_ingested(tmp_path, ok, **given), SplitConfig(test_size=0.1, validation_size=0.2),
                   tmp_path / "o").counts
    assert min(counts.values()) >= 1 and sum(counts.values()) == needed + len(given.get("test", []))
