"""The LM head only at completion targets: the same loss and gradients as the model's own loss over all logits."""
import pytest
import torch

from tasks.base_model import load_model, load_tokenizer
from tasks.common.chat import tokenize_with_completion_mask
from tasks.common.files import read_jsonl
from tasks.common.loss import IGNORE_INDEX, completion_logits, cross_entropy, target_positions
from tasks.common.padding_free import PaddingFreeCollator


def test_target_positions_are_the_ones_before_each_target():
    labels = torch.tensor([[-100, -100, 7, 8, -100, 13], [-100, 10, 11, -100, -100, -100]])
    assert target_positions(labels).tolist() == [[False, True, True, False, True, False],
                                                 [True, True, False, False, False, False]]


@pytest.fixture(scope="module")
def lora_batch(tiny_trained):
    """The tiny model with a fresh LoRA adapter (float32) and a padding-free batch of 12 training examples."""
    import peft

    tok = load_tokenizer(tiny_trained["base"])
    rows = tokenize_with_completion_mask(tok, read_jsonl(tiny_trained["splits"].files["train"])[:12])
    examples = [{"input_ids": ids, "labels": [-100] * p + ids[p:]} for ids, p in rows]
    batch = PaddingFreeCollator(tok.pad_token_id, max_length=64)(examples)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(load_model(tiny_trained["base"], attn_implementation="sdpa"), lora)
    return model, batch


def _loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 57])
def test_same_loss_and_gradients_as_the_models_own_loss(lora_batch, num_items):
    model, batch = lora_batch
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    full = model(**inputs, labels=batch["labels"], **extra)  # transformers' ForCausalLMLoss over every position
    assert full.logits.shape[:2] == batch["input_ids"].shape
    expected, expected_grads = _loss_and_grads(model, full.loss)

    logits, targets, _ = completion_logits(model, inputs, batch["labels"])
    assert logits.shape == ((batch["labels"] != IGNORE_INDEX).sum(), model.config.vocab_size)  # targets only
    got, grads = _loss_and_grads(model, cross_entropy(logits, targets, extra.get("num_items_in_batch")))
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], rtol=1e-4, atol=1e-6), name


def test_the_hook_is_removed_afterwards(lora_batch):
    model, batch = lora_batch
    completion_logits(model, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]},
                      batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert logits.shape[:2] == batch["input_ids"].shape


def test_the_trainer_loss_equals_trls(tiny_trained, tmp_path):
    """The train task's trainer (head at targets only) and TRL's own compute_loss (all logits) on one batch."""
    from trl import SFTTrainer

    from tasks.stages.train import make_trainer, resolve_settings, sequence_lengths

    cfg = tiny_trained["cfg"]
    settings = resolve_settings(cfg.model, cfg.lora, cfg.train, 1)
    tok = load_tokenizer(tiny_trained["base"])
    tok.padding_side = "right"
    records, _ = sequence_lengths(tok, tiny_trained["splits"].files, cfg.train)
    trainer = make_trainer(load_model(tiny_trained["base"], attn_implementation="sdpa"), tok, records, cfg.lora,
                           cfg.train, settings, tmp_path, None)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    for p in trainer.model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # lora_B starts at zero: make the adapter matter
    ours = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(40))
    trls = SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs), num_items_in_batch=torch.tensor(40))
    assert torch.allclose(ours, trls, rtol=0, atol=1e-5)
    assert trainer._metrics["train"]["mean_token_accuracy"][0] == pytest.approx(
        trainer._metrics["train"]["mean_token_accuracy"][1])
