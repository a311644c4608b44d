import json
from pathlib import Path
import math

import pytest

from configs.schema import EvalConfig
from tasks.stages.evaluate import evaluate
from tasks.common.files import read_jsonl
from tasks.common.metrics import classification_metrics, extract_answer, generation_metrics, normalise_answer


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
    assert "answer_found" not in m  # only with an answer pattern


GSM8K = EvalConfig.model_fields["answer_pattern"].description.split("gsm8k: '")[1].split("'")[0]


def test_bleu_is_sacrebleu_corpus_bleu():
    import sacrebleu

    preds, refs = ["the cat sat on the mat", "a dog barked"], ["the cat sat on a mat", "the dog barked loudly"]
    assert generation_metrics(preds, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert generation_metrics(refs, refs)["bleu"] == pytest.approx(100.0)


def test_answer_pattern_compares_the_final_number_only():
    refs = ["48/2 = <<48/2=24>>24 clips.\n#### 72", "So 1,000 - 1 = 999\n#### 999", "#### -3.5", "#### 10"]
    preds = ["Natalia sold 72 clips in all.\n#### 72.", "#### 998\nwait, #### 999", "#### $-3.5", "the answer is 10"]
    m = generation_metrics(preds, refs, GSM8K)
    assert m["exact_match"] == pytest.approx(3 / 4)  # the last has no '####' answer: never a match
    assert m["answer_found"] == pytest.approx(3 / 4)
    assert extract_answer("#### 1,234", GSM8K) == "1234" and extract_answer("no number", GSM8K) is None
    assert extract_answer("  Some  Text ", None) == "some text"
    assert extract_answer("answer: B", r"answer: ([A-D])") == "B" and extract_answer("xBx", "B") == "B"


def test_gsm8k_config_pattern_extracts_every_real_reference_answer(shared_data):
    from configs.schema import load_config

    pattern = load_config("configs/gsm8k.yaml").eval.answer_pattern
    assert pattern == GSM8K
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").open()]
    answers = [extract_answer(r["answer"], pattern) for r in rows]
    assert all(a is not None and float(a) == float(r["answer"].rsplit("####", 1)[1].replace(",", ""))
               for a, r in zip(answers, rows))


def test_evaluate_base_vs_tuned_on_tiny_model(tmp_path, tiny_trained):
    from tasks.stages.merge import merge
    from configs.schema import MergeConfig

    test_file = tiny_trained["splits"].files["test"]
    cfg = EvalConfig(batch_size=5, bf16=False)
    base = evaluate(tiny_trained["base"], test_file, "classification", cfg, tmp_path / "base")
    merged = merge(tiny_trained["base"], tiny_trained["trained"].adapter, test_file, MergeConfig(),
                   tmp_path / "merged")
    tuned = evaluate(merged.merged, test_file, "classification", cfg, tmp_path / "tuned")
    n = len(read_jsonl(test_file))
    for m in (base, tuned):
        assert m.n_examples == n
        assert m.perplexity == pytest.approx(math.exp(m.eval_loss))
        assert 0 <= m.accuracy <= 1 and 0 <= m.macro_f1 <= 1
    assert tuned.eval_loss < base.eval_loss
    # constrained answers (the default): every prediction is a label, even the untrained base model's; the free-
    # running answers decoded beside them show what the constraint changed
    assert base.constrained and tuned.constrained
    assert tuned.unconstrained_accuracy > base.unconstrained_accuracy
    assert base.off_label_share > tuned.off_label_share
    predictions = read_jsonl(tmp_path / "tuned" / "predictions.jsonl")
    assert len(predictions) == n and {"prompt", "reference", "prediction", "unconstrained"} <= set(predictions[0])
    assert {p["prediction"] for p in predictions} <= {"fruit", "tool", "colour"}
    free = [p["unconstrained"].strip().lower() for p in predictions]
    # greedy along the tree = free greedy wherever the free answer is a label (argmax among allowed tokens)
    assert all(p["prediction"] == a for a, p in zip(free, predictions) if a in {"fruit", "tool", "colour"})
    right = sum(a == p["reference"] for a, p in zip(free, predictions))
    assert tuned.unconstrained_accuracy == pytest.approx(right / n)
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text())["accuracy"] == tuned.accuracy


def test_generation_task_reports_rouge_and_exact_match(tmp_path, tiny_trained):
    cfg = EvalConfig(task="generation", batch_size=4, max_new_tokens=4, bf16=False)
    m = evaluate(tiny_trained["base"], tiny_trained["splits"].files["test"], "classification", cfg, tmp_path)
    assert {"rouge_l", "exact_match", "eval_loss", "perplexity"} <= set(m.model_dump())
    assert m.max_new_tokens == 4


def test_an_evaluation_result_carries_its_kinds_metrics_and_round_trips_through_json():
    from tasks.stages.evaluate import EvalResult

    common = {"eval_loss": 1.0, "perplexity": math.e, "n_examples": 4, "bf16": False, "max_new_tokens": 8,
              "wall_seconds": 1.5}
    result = EvalResult(task="classification", accuracy=0.5, macro_f1=0.25, **common)
    assert result.metric("accuracy") == 0.5 and result.metric("perplexity") == math.e
    assert EvalResult.model_validate(json.loads(result.model_dump_json())) == result
    with pytest.raises(KeyError, match="rouge_l"):
        result.metric("rouge_l")
    with pytest.raises(ValueError, match="macro_f1"):
        EvalResult(task="classification", accuracy=0.5, **common)
    with pytest.raises(ValueError, match="unknown task"):
        EvalResult(task="ranking", **common)


def test_the_eval_loss_equals_the_loss_over_all_logits(tiny_trained):
    """The head only at completion targets (tasks/common/loss.py) gives the eval loss of full logits (float32)."""
    import torch

    from tasks.base_model import load_model, load_tokenizer
    from tasks.common.chat import tokenize_with_completion_mask
    from tasks.stages.evaluate import completion_loss

    records = read_jsonl(tiny_trained["splits"].files["test"])
    tok, model = load_tokenizer(tiny_trained["base"]), load_model(tiny_trained["base"])
    total, count = 0.0, 0
    for ids, prompt in tokenize_with_completion_mask(tok, records):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(ids[1:])
        targets[: prompt - 1] = -100
        total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    assert completion_loss(model, tok, records, batch_size=4) == pytest.approx(total / count, rel=0, abs=1e-5)


@pytest.mark.parametrize("max_new_tokens", [6, 1])
def test_one_shared_prefill_gives_the_answers_and_loss_of_the_two_separate_passes(tiny_merged, max_new_tokens):
    """generate_with_loss (one prefill per prompt, its KV cache cropped and reused for decoding) returns exactly
    generate's greedy answers and completion_loss's loss (float32), rows ending at different steps included."""
    from tasks.base_model import load_model, load_tokenizer
    from tasks.common.chat import answer_ids, generate, generate_constrained, prompt_ids
    from tasks.common.labels import LabelTree
    from tasks.stages.evaluate import completion_loss, generate_with_loss

    records = read_jsonl(tiny_merged["test"])
    tok, model = load_tokenizer(tiny_merged["merged"]), load_model(tiny_merged["merged"])
    prompts = [prompt_ids(tok, r) for r in records]
    assert len({len(p) for p in prompts}) > 1  # batches with left padding
    answers, loss, free = generate_with_loss(model, tok, records, prompts, max_new_tokens, batch_size=4)
    assert free is None and answers == generate(model, tok, prompts, max_new_tokens, batch_size=4)
    assert loss == pytest.approx(completion_loss(model, tok, records, batch_size=4), rel=0, abs=1e-5)
    # constrained, with the free-running answers beside them: the shared prefill's labels are those of the
    # separate constrained pass, its free answers generate's, its loss the same
    tree = LabelTree.build(answer_ids(tok, sorted({r["label"] for r in records})))
    labels, loss2, free = generate_with_loss(model, tok, records, prompts, max_new_tokens, 4, tree, compare=True)
    assert labels == generate_constrained(model, tok, prompts, tree, batch_size=4)
    assert free == answers and loss2 == pytest.approx(loss, rel=0, abs=1e-6)
    if max_new_tokens > 1:  # the trained model ends its short labels early: rows stop at different steps
        assert any(a and len(tok(a, add_special_tokens=False).input_ids) < max_new_tokens - 1 for a in answers)


def test_a_model_whose_cache_cannot_be_cropped_takes_the_two_passes(tiny_merged, monkeypatch):
    from tasks.stages import evaluate as module
    from tasks.base_model import load_model, load_tokenizer
    from tasks.common.chat import prompt_ids

    records = read_jsonl(tiny_merged["test"])[:4]
    tok, model = load_tokenizer(tiny_merged["merged"]), load_model(tiny_merged["merged"])
    model.config.sliding_window = 8  # a sliding-window cache keeps no cut-able prefix
    passes = []
    monkeypatch.setattr(module, "completion_loss", lambda *a: passes.append("loss") or 1.0)
    answers, loss, free = module.generate_with_loss(model, tok, records, [prompt_ids(tok, r) for r in records], 3, 4)
    assert passes == ["loss"] and loss == 1.0 and len(answers) == 4 and free is None


def test_few_shot_examples_take_one_per_label_first():
    from tasks.stages.evaluate import few_shot_examples

    rows = [{"label": label, "i": i} for i in range(4) for label in "abc"] + [{"label": "d", "i": 0}]
    shots = few_shot_examples(rows, 5, seed=3)
    assert sorted(r["label"] for r in shots[:4]) == ["a", "b", "c", "d"]  # every label before any repeats
    assert shots[4]["label"] != "d"  # d has one row only
    assert few_shot_examples(rows, 5, seed=3) == shots  # seeded
    with pytest.raises(ValueError, match="eval.few_shot=20 needs 20 training examples; the train split has 13"):
        few_shot_examples(rows, 20, seed=0)


def test_a_sampled_few_shot_evaluation_reports_its_sample_shots_and_interval(tmp_path, tiny_trained):
    from collections import Counter

    files = tiny_trained["splits"].files
    test = read_jsonl(files["test"])
    cfg = EvalConfig(batch_size=4, bf16=False)
    m = evaluate(tiny_trained["base"], files["test"], "classification", cfg, tmp_path / "k", max_examples=6,
                 few_shot=3, train_file=files["train"], seed=0, label_list=True)
    assert (m.n_examples, m.population, m.few_shot) == (6, len(test), 3)
    low, high = m.interval95["accuracy"]
    assert 0 <= low <= m.accuracy <= high <= 1 and high - low > 0.2  # 6 rows: a wide interval
    rows = read_jsonl(tmp_path / "k" / "predictions.jsonl")
    assert Counter(r["reference"] for r in rows) == {"fruit": 2, "tool": 2, "colour": 2}  # stratified
    train_turns = {json.dumps(m) for r in read_jsonl(files["train"]) for m in r["messages"]}
    for r in rows:
        turns = [t for t in r["prompt"] if t["role"] != "system"]
        assert len(turns) == 2 * 3 + 1 and all(json.dumps(t) in train_turns for t in turns[:-1])
        assert [t["role"] for t in turns] == ["user", "assistant"] * 3 + ["user"]
        assert {t["content"] for t in turns[1:-1:2]} == {"fruit", "tool", "colour"}  # one shot per label
        assert "Answer with exactly one of these labels: colour, fruit, tool." in r["prompt"][0]["content"]
        assert r["prediction"] in {"fruit", "tool", "colour"}  # constrained: a label, even from the base model
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "test.jsonl").write_text((Path(files["test"])).read_text())  # no train.jsonl beside it
    with pytest.raises(ValueError, match="few_shot, constrained answers and label_list need train_file"):
        evaluate(tiny_trained["base"], str(alone / "test.jsonl"), "classification", cfg, tmp_path / "x", few_shot=2)


def test_a_prefix_every_prompt_shares_is_run_once_with_the_same_answers_and_loss(tiny_trained, monkeypatch):
    """The prompting baselines' prompts share the system turn and the k examples: generate_with_loss runs that
    prefix once and repeats its KV cache (prefix caching); answers, free-running answers and loss are those of
    running every prompt whole."""
    from tasks.base_model import load_model, load_tokenizer
    from tasks.common.chat import answer_ids, prompt_ids
    from tasks.common.labels import LabelTree
    from tasks.stages import evaluate as module

    files = tiny_trained["splits"].files
    train, labels = read_jsonl(files["train"]), ["colour", "fruit", "tool"]
    shots = module.few_shot_examples(train, 3, seed=0)
    tok, model = load_tokenizer(tiny_trained["base"]), load_model(tiny_trained["base"])
    records = [module.with_label_list(module.with_shots(r, shots), labels, tok) for r in read_jsonl(files["test"])]
    prompts = [prompt_ids(tok, r) for r in records]
    tree = LabelTree.build(answer_ids(tok, labels))
    shared = module.shared_prefix(prompts)
    assert len(shared) > 20 and all(p[: len(shared)] == shared and len(p) > len(shared) for p in prompts)

    def run(minimum):
        monkeypatch.setattr(module, "SHARED_PREFIX_MIN", minimum)
        return module.generate_with_loss(model, tok, records, prompts, 4, 5, tree, compare=True)

    calls = []
    prefix_cache = module._prefix_cache
    monkeypatch.setattr(module, "_prefix_cache", lambda m, p: calls.append(len(p)) or prefix_cache(m, p))
    whole = run(10**9)
    assert calls == []
    cached = run(1)
    assert calls == [len(shared)]
    assert cached[0] == whole[0] and cached[2] == whole[2]
    assert cached[1] == pytest.approx(whole[1], rel=0, abs=1e-5)
    assert module.shared_prefix([[1, 2, 3], [1, 2]]) == [1] and module.shared_prefix([[1, 2]]) == []


def test_grouped_query_attention_without_copied_heads_gives_the_same_answers_and_loss(tiny_merged, monkeypatch):
    """On a CPU the evaluation's model shares grouped-query key/value heads in PyTorch's kernel
    (tasks.base_model.SDPA_GQA) instead of transformers' repeat_kv copies under a padding mask: the padded,
    KV-cached batches of generate_with_loss give the same labels, free-running answers and loss as transformers'
    own SDPA, and the copies are never made."""
    import transformers.integrations.sdpa_attention as sdpa

    from tasks.base_model import SDPA_GQA, inference_attention, load_model, load_tokenizer
    from tasks.common.chat import answer_ids, prompt_ids
    from tasks.common.labels import LabelTree
    from tasks.stages.evaluate import generate_with_loss

    records = read_jsonl(tiny_merged["test"])
    tok = load_tokenizer(tiny_merged["merged"])
    prompts = [prompt_ids(tok, r) for r in records]
    tree = LabelTree.build(answer_ids(tok, sorted({r["label"] for r in records})))
    copies = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: copies.append(n) or repeat_kv(x, n))

    def run(attention):
        model = load_model(tiny_merged["merged"], attn_implementation=attention)
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny model has GQA
        return generate_with_loss(model, tok, records, prompts, 6, 4, tree, compare=True)

    assert inference_attention(tiny_merged["merged"]) == SDPA_GQA  # no GPU here
    ours = run(SDPA_GQA)
    assert copies == []
    default = run("sdpa")
    assert copies  # transformers' own SDPA copies the heads under the padding mask
    assert ours[0] == default[0] and ours[2] == default[2]
    assert ours[1] == pytest.approx(default[1], rel=0, abs=1e-6)
