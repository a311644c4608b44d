"""Padding-free batches for PyTorch SDPA / eager attention.

A padded batch of short examples spends much of its compute on pad tokens (banking77: ~40 % of a random batch of
32). Here a batch's examples are laid end to end in rows of at most ``max_length`` tokens (first-fit decreasing)
with position ids that restart at every example and no attention mask. transformers (>= 4.53,
``masking_utils.find_packed_sequence_indices``) reads the restarts as sequence boundaries and builds a
block-diagonal causal mask, so no example attends to another and the loss equals the padded batch's.

With flash attention the whole batch goes in one row (``max_length=None``): transformers reads packed sequences
from the position ids only in a batch of one row (``modeling_flash_attention_utils._is_packed_sequence``) and runs
the varlen kernel. With SDPA a row's mask spans the row (attention cost grows with the square of its length), so
rows of ``max_length`` keep each row's attention within ``max_length`` tokens; TRL's own padding-free collator
puts the whole batch in one row and, since TRL 1.x, refuses a ``max_length`` without packing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def first_fit_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows whose lengths sum to at most ``max_length`` (first-fit
    decreasing; an example longer than ``max_length`` gets a row of its own)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([i])
            room.append(max_length - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    return rows


@dataclass
class PaddingFreeCollator:
    """Collate TRL-prepared examples (``input_ids`` and ``labels``: TRL >= 1.0 builds ``labels`` from the completion
    mask during dataset preparation, -100 on prompt tokens, and drops ``completion_mask``) into
    ``{"input_ids", "position_ids", "labels"}``, each int64 of shape (rows, width), width = the fullest row's
    length (<= ``max_length`` unless one example is longer; ``max_length`` None: one row holding every example).
    Labels are the example's own, and -100 on each example's first token; row tails are ``pad_token_id`` with
    label -100 and positions 0, 1, ... of their own (a separate sequence that no example attends to).

    Raises:
        KeyError: an example without ``labels`` (its loss mask would be lost: every prompt token would be trained
            on); names the example.
    """

    pad_token_id: int
    max_length: int | None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = ([list(range(len(examples)))] if self.max_length is None
                else first_fit_rows([len(e["input_ids"]) for e in examples], self.max_length))
        width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                if "labels" not in examples[i]:
                    raise KeyError(f"padding-free collator: example {i} of the batch has no 'labels' (fields: "
                                   f"{sorted(examples[i])}); expected TRL's prepared rows with -100 on prompt tokens")
                ids = torch.as_tensor(examples[i]["input_ids"], dtype=torch.long)
                end = start + len(ids)
                input_ids[r, start:end] = ids
                labels[r, start:end] = torch.as_tensor(examples[i]["labels"], dtype=torch.long)
                labels[r, start] = -100  # nothing precedes an example's first token: never a target (as in TRL)
                position_ids[r, start:end] = torch.arange(len(ids))
                start = end
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
