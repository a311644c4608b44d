import json
from pathlib import Path

import pandas as pd
import pytest

from configs.schema import DataConfig
from tasks.common.files import read_jsonl
from tasks.stages.ingest import DataError, ingest
from tests.conftest import write_jsonl


def _ingest(tmp_path: Path, path, **kw) -> tuple[dict, dict[str, list[dict]]]:
    result = ingest(DataConfig(path=str(path), **kw), tmp_path / "out")
    return result, {k: read_jsonl(v) for k, v in result.files.items()}


def test_alpaca_json_with_and_without_input(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"},
                             {"instruction": "Say hi", "input": "", "output": "hi"}]))
    result, splits = _ingest(tmp_path, f)
    assert result.format == "alpaca" and result.task == "generation"
    assert splits["train"][0]["messages"] == [{"role": "user", "content": "Add\n\n2 and 3"},
                                              {"role": "assistant", "content": "5"}]
    assert splits["train"][1]["messages"][0]["content"] == "Say hi"


def test_chat_jsonl_keeps_roles_and_adds_system_prompt(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Hello"}]}])
    _, splits = _ingest(tmp_path, f, system_prompt="Be brief.")
    assert [m["role"] for m in splits["train"][0]["messages"]] == ["system", "user", "assistant"]
    assert splits["train"][0]["label"] is None


def test_prompt_completion_parquet(tmp_path):
    f = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["2+2=", "3+3="], "completion": ["4", "6"]}).to_parquet(f)
    result, splits = _ingest(tmp_path, f)
    assert result.format == "prompt_completion"
    assert splits["train"][1]["messages"][-1] == {"role": "assistant", "content": "6"}


def test_classification_csv_with_column_mapping_and_duplicates(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,category\nlost my card,lost_card\nlost my card,lost_card\nwhere is it,card_arrival\n")
    result, splits = _ingest(tmp_path, f, columns={"category": "label"}, prompt_template="Query: {text}")
    assert result.counts["train"].model_dump() == {"rows": 3, "empty_answers_dropped": 0, "duplicates_dropped": 1,
                                         "kept": 2}
    assert result.labels == ["card_arrival", "lost_card"]
    assert splits["train"][0]["messages"][0] == {"role": "user", "content": "Query: lost my card"}
    assert splits["train"][0]["label"] == "lost_card"


def test_empty_answers_fail_by_default_and_are_dropped_and_counted_when_configured(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "x"}, {"instruction": "b", "input": "", "output": " "},
            {"instruction": "c", "input": "", "output": "z"}]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"a\.json: row 2: field 'output': expected a non-empty string"):
        _ingest(tmp_path, f)
    result, splits = _ingest(tmp_path, f, drop_empty_answers=True)
    assert result.counts["train"].model_dump() == {"rows": 3, "empty_answers_dropped": 1, "duplicates_dropped": 0,
                                                   "kept": 2}
    assert [r["messages"][0]["content"] for r in splits["train"]] == ["a", "c"]


def test_headerless_tsv_with_label_names(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('0\t"quoted" verse,\t1\n1\tsad verse\t-1\n')
    _, splits = _ingest(tmp_path, f, column_names=["id", "text", "label"],
                        label_names={"-1": "negative", "1": "positive"})
    assert [r["label"] for r in splits["train"]] == ["positive", "negative"]
    assert splits["train"][0]["messages"][0]["content"] == '"quoted" verse,'


def test_folder_splits_are_read_as_given(tmp_path, classification_dir):
    result, splits = _ingest(tmp_path, classification_dir)
    assert set(splits) == {"train", "test"}
    assert result.counts["test"].kept == len(splits["test"])


@pytest.mark.parametrize("rows, message", [
    ([{"text": "ok", "label": "a"}, {"text": "", "label": "b"}], r"x.jsonl: row 2: field 'text': expected a non-empty"),
    ([{"text": "ok", "label": ["a"]}], r"row 1: field 'label': expected a string or integer label, got list"),
    ([{"text": 5, "label": "a"}], r"row 1: field 'text': expected a non-empty string, got int 5"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"row 1: field 'messages': the last message must be"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], r"row 1: field 'messages\[0\].role'"),
    ([{"instruction": "do", "output": None}], r"row 1: field 'output': expected a non-empty string, got missing"),
])
def test_bad_records_name_file_row_and_field(tmp_path, rows, message):
    f = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match=message):
        _ingest(tmp_path, f)


def test_malformed_json_line_is_located(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: not valid JSON"):
        _ingest(tmp_path, f)


def test_unknown_columns_empty_file_missing_path_and_bad_extension(tmp_path):
    f = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError,
                       match=r"u.jsonl: cannot tell the record format from columns \['answer', 'question'\]"):
        _ingest(tmp_path, f)
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="e.csv: empty file"):
        _ingest(tmp_path, tmp_path / "e.csv")
    with pytest.raises(DataError, match="data.path: ./nope.csv: no such file or folder"):
        _ingest(tmp_path, "./nope.csv")
    (tmp_path / "f.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        _ingest(tmp_path, tmp_path / "f.txt")


def test_a_set_format_with_missing_columns_names_the_files_columns_and_suspects_the_delimiter(tmp_path):
    f = tmp_path / "tabs.csv"
    f.write_text("text\tlabel\nI want the saw\ttool\nI want the plum\tfruit\n")
    with pytest.raises(DataError, match=r"tabs.csv: row 1: field 'text': missing; data.format classification needs "
                                        r"columns text\+label, and the file has \['text\\tlabel'\].*is it "
                                        r"'\\t'-separated\?"):
        _ingest(tmp_path, f, format="classification")
    g = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "label": "a"}])  # one column too few: no delimiter hint
    with pytest.raises(DataError, match=r"q.jsonl: row 1: field 'text': missing; .* the file has \['label', "
                                        r"'question'\] \(rename columns with data.columns\)$"):
        _ingest(tmp_path, g, format="classification")


def test_unreachable_hub_id_says_how_to_use_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load Hub dataset 'no-such-org/no-such-set'.*--set data.path="):
        _ingest(tmp_path, "no-such-org/no-such-set")


def test_unknown_raw_label_is_reported(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("text,label\nhello,7\n")
    with pytest.raises(DataError, match=r"l.csv: row 1: field 'label': value '7' is not in data.label_names"):
        _ingest(tmp_path, f, label_names={"0": "neg"})


def test_banking77_local_folder(tmp_path, shared_data):
    result, splits = _ingest(tmp_path, shared_data / "banking77", columns={"category": "label"})
    assert result.counts["train"].rows == 10003 and result.counts["test"].rows == 3080
    assert len(result.labels) == 77
    assert sum(c.duplicates_dropped for c in result.counts.values()) > 0


def test_poem_sentiment_local_folder(tmp_path, shared_data):
    result, splits = _ingest(tmp_path, shared_data / "poem_sentiment", column_names=["id", "text", "label"],
                             label_names={"-1": "negative", "0": "no_impact", "1": "positive", "2": "mixed"})
    assert set(splits) == {"train", "validation", "test"}
    assert set(result.labels) <= {"negative", "no_impact", "positive", "mixed"}
    assert result.counts["test"].rows == 104
