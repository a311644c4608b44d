import json
import math

import pytest

from configs.schema import EvalConfig
from tasks.evaluate import classification_metrics, evaluate, generation_metrics, normalise_answer
from tasks.files import read_jsonl


def test_normalise_answer_ignores_case_whitespace_and_later_lines():
    assert normalise_answer("  Card_Arrival \n because ...") == "card_arrival"
    assert normalise_answer("lost   or stolen") == "lost or stolen"
    assert normalise_answer("   ") == ""


def test_classification_metrics_match_hand_computed_values():
    refs = ["a", "a", "b", "c"]
    preds = ["A ", "b", "b", "nonsense"]
    m = classification_metrics(preds, refs)
    assert m["accuracy"] == pytest.approx(0.5)
    # per-class F1 over the reference labels: a: P=1 R=.5 -> 2/3; b: P=.5 R=1 -> 2/3; c: 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_generation_metrics():
    m = generation_metrics(["the cat sat", "Hello  world"], ["the cat sat down", "hello world"])
    assert m["exact_match"] == pytest.approx(0.5)
    # ROUGE-L F1: 3-token LCS of 3 and 4 tokens -> 2*1*0.75/1.75; second is a perfect match
    assert m["rouge_l"] == pytest.approx((2 * 0.75 / 1.75 + 1.0) / 2)


def test_evaluate_base_vs_tuned_on_tiny_model(tmp_path, tiny_trained):
    from tasks.merge import merge
    from configs.schema import MergeConfig

    test_file = tiny_trained["splits"]["files"]["test"]
    cfg = EvalConfig(batch_size=5, bf16=False)
    base = evaluate(tiny_trained["base"], test_file, "classification", cfg, tmp_path / "base")
    merged = merge(tiny_trained["base"], tiny_trained["trained"]["adapter"], test_file, MergeConfig(),
                   tmp_path / "merged")
    tuned = evaluate(merged["merged"], test_file, "classification", cfg, tmp_path / "tuned")
    n = len(read_jsonl(test_file))
    for m in (base, tuned):
        assert m["n_examples"] == n
        assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert tuned["eval_loss"] < base["eval_loss"]
    assert tuned["accuracy"] > base["accuracy"]
    predictions = read_jsonl(tmp_path / "tuned" / "predictions.jsonl")
    assert len(predictions) == n and {"prompt", "reference", "prediction"} <= set(predictions[0])
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text())["accuracy"] == tuned["accuracy"]


def test_generation_task_reports_rouge_and_exact_match(tmp_path, tiny_trained):
    cfg = EvalConfig(task="generation", batch_size=4, max_new_tokens=4, bf16=False)
    m = evaluate(tiny_trained["base"], tiny_trained["splits"]["files"]["test"], "classification", cfg, tmp_path)
    assert {"rouge_l", "exact_match", "eval_loss", "perplexity"} <= set(m)
    assert m["max_new_tokens"] == 4
