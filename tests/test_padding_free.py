"""Padding-free batches: examples laid end to end, positions restarting, no attention across examples."""
import pytest
import torch

from tasks.base_model import load_model, load_tokenizer
from tasks.common.chat import tokenize_with_completion_mask
from tasks.common.files import read_jsonl
from tasks.common.padding_free import PaddingFreeCollator, first_fit_rows
from tasks.stages.train import train


def test_first_fit_rows_fill_rows_up_to_the_limit():
    lengths = [50, 70, 30, 60, 10, 200]
    rows = first_fit_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(6))  # every example exactly once
    assert rows[0] == [5]  # longer than the limit: a row of its own
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows[1:])
    assert len(rows) == 3  # 200 | 70+50 | 60+30+10: first-fit decreasing


def test_the_collator_restarts_positions_and_masks_prompts_and_tails():
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
                {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
                {"input_ids": [12, 13], "labels": [12, 13]}]
    batch = PaddingFreeCollator(pad_token_id=0, max_length=6)(examples)
    assert batch.keys() == {"input_ids", "position_ids", "labels"}  # no attention_mask: positions mark examples
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 12, 13], [9, 10, 11, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # prompt tokens, each example's first token and the tail padding are never targets
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 13], [-100, 10, 11, -100, -100, -100]]
    one = PaddingFreeCollator(pad_token_id=0, max_length=None)(examples)  # flash attention: the batch in one row
    assert one["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert one["labels"].tolist() == [[-100, -100, 7, 8, -100, 10, 11, -100, 13]]


@pytest.fixture(scope="module")
def tiny_rows(tiny_trained):
    tok = load_tokenizer(tiny_trained["base"])
    rows = tokenize_with_completion_mask(tok, read_jsonl(tiny_trained["splits"].files["train"])[:12])
    examples = [{"input_ids": ids, "labels": [-100] * p + ids[p:]} for ids, p in rows]
    return tok, load_model(tiny_trained["base"], attn_implementation="sdpa"), examples


def test_no_example_attends_to_another(tiny_rows):
    tok, model, examples = tiny_rows
    batch = PaddingFreeCollator(tok.pad_token_id, max_length=128)(examples)
    assert batch["input_ids"].shape[0] < len(examples)  # several examples share a row
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, positions in zip(range(len(logits)), batch["position_ids"]):
            starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
            for start, end in zip(starts, starts[1:]):
                ids = batch["input_ids"][row, start:end]
                if ids[0] == tok.pad_token_id:
                    continue  # the row's padding tail
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                assert torch.allclose(logits[row, start:end], alone, atol=1e-4)


def test_the_loss_equals_the_padded_batch_loss(tiny_rows):
    tok, model, examples = tiny_rows
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), tok.pad_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), 1
        labels[i, :n] = torch.tensor(e["labels"])
    free = PaddingFreeCollator(tok.pad_token_id, max_length=128)(examples)
    with torch.no_grad():
        padded_loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        free_loss = model(**free, use_cache=False).loss
    assert (free["labels"] != -100).sum() == (labels != -100).sum()  # the same targets
    assert free_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)


def test_training_padding_free_matches_padded_training(tiny_trained, tmp_path):
    cfg = tiny_trained["cfg"]
    results = {}
    for padding_free in (True, False):
        settings = cfg.train.model_copy(update={"padding_free": padding_free, "group_by_length": False,
                                                "num_train_epochs": 1})
        results[padding_free] = train(tiny_trained["base"], tiny_trained["splits"], cfg.model, cfg.lora, settings,
                                      tmp_path / f"{padding_free}" / "adapter", tmp_path / f"{padding_free}" / "ck")
    free, padded = results[True], results[False]
    assert free.padding_free and not padded.padding_free
    assert free.train_tokens == padded.train_tokens  # the same non-pad tokens trained
    assert free.steps == padded.steps
    assert free.eval_loss == pytest.approx(padded.eval_loss, rel=1e-4)
    assert free.train_loss == pytest.approx(padded.train_loss, rel=1e-4)
