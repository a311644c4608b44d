"""Completion-only loss with the LM head run only where the loss needs it.

With completion-only loss on short answers (a banking77 label is ~5 tokens after a ~30-token prompt) most of a
causal LM's head — hidden size × vocabulary (576 × 49,152 for SmolLM2-135M) per position, forward and backward,
plus a float32 softmax over the vocabulary — is spent on positions whose label is ignored. Here the head sees only
the positions that predict a completion token: a forward pre-hook on the model's output embeddings
(``get_output_embeddings()``, the ``lm_head``) gathers those hidden states before the head runs, so anything the
model does after its head (Gemma's logit soft-capping, a logit scale) still applies. The loss is the same
cross-entropy as transformers' ``ForCausalLMLoss`` (float32 logits, ignore index -100, mean over target tokens,
or sum / ``num_items_in_batch`` under gradient accumulation).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

IGNORE_INDEX = -100


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits predict a completion token.

    Args:
        labels: int64 (batch, length); ``IGNORE_INDEX`` where no loss is taken (prompt, padding, row starts).

    Returns:
        bool (batch, length): True at position ``t`` when ``labels[:, t + 1]`` is a target (never at the last).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


@contextmanager
def head_only_at(model, keep: torch.Tensor):
    """Within the block, ``model``'s LM head sees only the hidden states at ``keep``: the model returns logits of
    shape (1, keep.sum(), vocabulary), rows in row-major order of ``keep`` (batch, then position).

    Args:
        model: a transformers causal LM, or a peft model around one (DDP: pass the unwrapped module).
        keep: bool (batch, length), as ``target_positions`` returns.
    """
    head = model.get_output_embeddings()

    def gather(module, args):
        return (args[0][keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def completion_logits(model, inputs: dict, labels: torch.Tensor, unwrapped=None) -> tuple:
    """Forward ``inputs`` (without labels) with the head only at the completion targets' positions.

    Args:
        model: the module to call (possibly DDP-wrapped); ``unwrapped`` the model inside it (default ``model``).
        inputs: the model's keyword inputs (``input_ids``, ``attention_mask`` / ``position_ids``, ...).
        labels: int64 (batch, length), ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``(logits, targets, outputs)``: logits (N, vocabulary) in the model's output dtype, targets int64 (N,)
        where N is the number of target tokens, and the model's output.
    """
    keep = target_positions(labels)
    with head_only_at(unwrapped if unwrapped is not None else model, keep):
        outputs = model(**inputs)
    return outputs.logits[0], labels[:, 1:][keep[:, :-1]], outputs


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss on gathered positions: float32 cross-entropy, mean over ``targets``, or
    its sum divided by ``num_items_in_batch`` (gradient accumulation: the targets of the whole optimizer step).

    Args:
        logits: (N, vocabulary), any float dtype; targets: int64 (N,).
    """
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    total = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)
