"""Classification answers constrained to the label set: the prefix tree, the decoding along it (only its branch
points call the model), and the same answer from the PyTorch evaluation, the ONNX runtime and ``flows.predict``."""
import json
from pathlib import Path

import pytest

from tasks.common.labels import LabelTree, LabelTreeError, constrained_greedy, forced
from tests.conftest import predict_cli



def test_the_tree_forces_single_continuations_and_ends_at_the_labels():
    tree = LabelTree.build({"card_arrival": [5, 6, 7, 2], "card_linking": [5, 6, 8, 2], "cash": [9, 2]})
    assert set(tree.root.children) == {5, 9}
    tokens, node = forced(tree.root.children[5])  # "card" then "_": no choice until arrival/linking
    assert tokens == [6] and set(node.children) == {7, 8}
    tokens, node = forced(node.children[8])
    assert tokens == [2] and node.label == "card_linking"


def test_labels_that_cannot_be_told_apart_are_refused_by_name():
    with pytest.raises(LabelTreeError, match="'tool'.*prefix of 'tools'"):
        LabelTree.build({"tool": [4, 5], "tools": [4, 5, 6]})  # a template that ends no answer with eos
    with pytest.raises(LabelTreeError, match="at least one label"):
        LabelTree.build({})


def test_only_branch_points_call_the_model_and_the_choice_is_the_best_allowed_token():
    tree = LabelTree.build({"card_arrival": [5, 6, 7, 2], "card_linking": [5, 6, 8, 2], "cash": [9, 2]})
    vocabulary = 12
    first = [0.0] * vocabulary
    first[5], first[9], first[11] = 1.0, 0.5, 9.0  # 11 is no label's token: never chosen
    fed = []

    def next_logits(tokens):
        fed.append(list(tokens))
        row = [0.0] * vocabulary
        row[8] = 1.0  # linking over arrival
        return row

    label, ids, calls = constrained_greedy(tree, first, next_logits)
    assert (label, ids) == ("card_linking", [5, 6, 8, 2])
    assert calls == 1 and fed == [[5, 6]]  # one call, at the arrival/linking branch; "_" and eos were forced


def test_answer_token_ids_are_the_trained_completion_up_to_the_end_of_turn(tiny_model_dir):
    """Labels that share a prefix or tokenise differently alone and after the assistant header: the tree holds
    exactly the ids training used (``tokenize_with_completion_mask``) up to ``<|im_end|>``, and decodes back."""
    from tasks.base_model import load_tokenizer
    from tasks.common.chat import answer_ids, tokenize_with_completion_mask

    tok = load_tokenizer(tiny_model_dir)
    labels = ["fruit", "fruits", "fruit_basket", " tool", "colour"]
    ids = answer_ids(tok, labels)
    for label in labels:
        record = {"messages": [{"role": "user", "content": "I want the apple"}, {"role": "assistant",
                                                                             "content": label}]}
        (full, n), = tokenize_with_completion_mask(tok, [record])
        assert full[n:][: len(ids[label])] == ids[label] and ids[label][-1] == tok.eos_token_id
        assert tok.decode(ids[label][:-1]) == label
    tree = LabelTree.build(ids)
    assert len(tree.sequences) == len(labels)


@pytest.fixture(scope="module")
def fp32_export(tiny_merged, tmp_path_factory):
    """The tiny merged model exported at fp32 (onnx-fp32) with its label set: PyTorch and ONNX Runtime GenAI
    compute the same logits up to float rounding, so their constrained answers must be equal."""
    from configs.schema import ExportConfig
    from tasks.deploy.export import export

    inference = tiny_merged["inference"]
    labels = inference["labels"]  # the train split's, as the flow writes them
    result = export("onnx-fp32", tiny_merged["merged"], tiny_merged["test"], tiny_merged["eval"], inference,
                    ExportConfig(n_check_prompts=3, max_new_tokens=6, min_greedy_agreement=0.6, max_quality_drop=1.0),
                    tmp_path_factory.mktemp("labels") / "onnx-fp32")
    return result, labels


def test_pytorch_the_onnx_runtime_and_flows_predict_give_the_same_labels(tiny_merged, fp32_export, tmp_path):
    from configs.schema import EvalConfig
    from tasks.common.files import read_jsonl
    from tasks.deploy.runtime.predict import Predictor
    from tasks.stages.evaluate import evaluate

    result, labels = fp32_export
    test, train = tiny_merged["test"], str(Path(tiny_merged["test"]).with_name("train.jsonl"))
    metrics = evaluate(tiny_merged["merged"], test, "classification", EvalConfig(batch_size=5), tmp_path / "eval",
                       train_file=train)
    rows = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    torch_answers = [r["prediction"] for r in rows]
    assert metrics.constrained and set(torch_answers) <= set(labels)
    assert metrics.off_label_share is not None and 0 <= metrics.unconstrained_accuracy <= 1
    assert all("unconstrained" in r for r in rows)

    settings = json.loads((Path(result.path) / "inference.json").read_text())
    assert sorted(settings["label_token_ids"]) == labels and result.same_answer == 1.0
    texts = [r["prompt"][-1]["content"] for r in rows]
    assert Predictor(result.path)(texts) == torch_answers
    done = predict_cli("--model", result.path, *texts)
    assert done.returncode == 0 and done.stdout.split() == torch_answers, done.stderr[-2000:]


def test_unconstrained_evaluation_is_still_there(tiny_merged, tmp_path):
    from configs.schema import EvalConfig
    from tasks.stages.evaluate import evaluate

    metrics = evaluate(tiny_merged["merged"], tiny_merged["test"], "classification",
                       EvalConfig(batch_size=5, constrain="none"), tmp_path / "eval",
                       train_file=str(Path(tiny_merged["test"]).with_name("train.jsonl")))
    assert not metrics.constrained and metrics.off_label_share is None


def test_the_batched_decoder_answers_as_one_row_at_a_time(tiny_merged):
    """``constrained_decode`` over a left-padded batch (chunks right-padded across rows) equals
    ``constrained_greedy`` with one row and one model call per branch point."""
    import torch

    from tasks.base_model import load_model, load_tokenizer
    from tasks.common.chat import answer_ids, constrained_decode, prompt_ids
    from tasks.common.files import read_jsonl

    tok, model = load_tokenizer(tiny_merged["merged"]), load_model(tiny_merged["merged"])
    labels = ["fruit", "fruit_salad", "tool", "tools", "colour", "colourful"]  # shared prefixes: several calls
    tree = LabelTree.build(answer_ids(tok, labels))
    records = read_jsonl(tiny_merged["test"])[:6]
    prompts = [prompt_ids(tok, r) for r in records]
    batch = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt", padding_side="left")
    batched = constrained_decode(model, batch["input_ids"], batch["attention_mask"], tree, tok.pad_token_id)

    def alone(prompt):
        ids = list(prompt)

        def logits_after(tokens):
            ids.extend(tokens)
            with torch.no_grad():
                return model(input_ids=torch.tensor([ids])).logits[0, -1]

        with torch.no_grad():
            first = model(input_ids=torch.tensor([ids])).logits[0, -1]
        return constrained_greedy(tree, first, logits_after)[0]

    assert batched == [alone(p) for p in prompts] and set(batched) <= set(labels)


def test_a_free_answer_is_decided_once_its_first_line_is_complete_or_no_label_starts_with_it():
    from tasks.common.metrics import answer_decided

    labels = ["card arrival", "card_linking", "cash"]  # normalised
    assert not any(answer_decided(t, labels) for t in ("", "  ", "Card", "card ar", "CARD_link", "cash", "cash  ",
                                                        "<think>\nhmm", "<think></think>\nca"))
    assert all(answer_decided(t, labels) for t in ("cat", "card_arrival", "cash flow", "cashier", "cash\nmore",
                                                   "<think></think>\nnope"))
    # the rule never stops an answer that could still end as a label: every label, read token by token
    assert not any(answer_decided(label[:n], labels) for label in labels for n in range(len(label) + 1))


def test_free_running_rows_stop_once_decided_and_score_as_the_whole_answers(tiny_trained, tmp_path, monkeypatch):
    """The free-running comparison stops a row once more tokens cannot change whether it is a label or which
    (``LabelsDecided`` on the decoded tokens after the prompt), and the evaluation's unconstrained accuracy and
    off-label share are those of rows run to their end."""
    import torch

    from configs.schema import EvalConfig
    from tasks.base_model import load_tokenizer
    from tasks.common.files import read_jsonl
    from tasks.stages import evaluate as stage

    tok = load_tokenizer(tiny_trained["base"])
    prompt = [tok.eos_token_id] * 3
    rows = [prompt + tok.encode(text, add_special_tokens=False) for text in ("fru", "fruit", "zz top", "tool\nx")]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tok.eos_token_id] * (width - len(row)) for row in rows])  # special: not decoded
    decided = stage.LabelsDecided(tok, ["Fruit", "tool"], start=len(prompt))(ids, None)
    assert decided.tolist() == [False, False, True, True]

    calls = []

    def run(name):
        metrics = stage.evaluate(tiny_trained["base"], tiny_trained["splits"].files["test"], "classification",
                                 EvalConfig(batch_size=5, bf16=False, max_new_tokens=12), tmp_path / name)
        return metrics, [p["unconstrained"] for p in read_jsonl(tmp_path / name / "predictions.jsonl")]

    real = stage.LabelsDecided.__call__
    monkeypatch.setattr(stage.LabelsDecided, "__call__", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    stopped, stopped_answers = run("stopped")
    assert calls  # the comparison consulted the rule
    monkeypatch.setattr(stage.LabelsDecided, "__call__",
                        lambda self, input_ids, scores, **kw: input_ids.new_zeros(input_ids.shape[0], dtype=bool))
    whole, whole_answers = run("whole")
    assert (stopped.unconstrained_accuracy, stopped.off_label_share, stopped.accuracy) == (
        whole.unconstrained_accuracy, whole.off_label_share, whole.accuracy)
    assert all(w.startswith(s) for s, w in zip(stopped_answers, whole_answers))
