"""Padding-free batches for PyTorch SDPA / eager attention.

A padded batch of short examples spends much of its compute on pad tokens (banking77: ~40 % of a random batch of
32). Here a batch's examples are laid end to end in rows of at most ``max_length`` tokens (first-fit decreasing)
with position ids that restart at every example and no attention mask. transformers (>= 4.53,
``masking_utils.find_packed_sequence_indices``) reads the restarts as sequence boundaries and builds a
block-diagonal causal mask, so no example attends to another and the loss equals the padded batch's.

TRL's own padding-free collator flattens the whole batch into one row: right for flash-attention's varlen kernel
(the train task uses it there), but with SDPA the mask then spans the whole batch (attention cost grows with the
square of batch × length). Rows of ``max_length`` keep each row's attention within ``max_length`` tokens.
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
    """Collate TRL-tokenized examples (``input_ids``, optional ``completion_mask``: 1 on completion tokens) into
    ``{"input_ids", "position_ids", "labels"}``, each int64 of shape (rows, width), width = the fullest row's
    length (<= ``max_length`` unless one example is longer). Labels are the input ids on completion tokens
    (every token without a completion mask) and -100 elsewhere and on each example's first token; row tails are
    ``pad_token_id`` with label -100 and positions 0, 1, ... of their own (a separate sequence that no example
    attends to)."""

    pad_token_id: int
    max_length: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = first_fit_rows([len(e["input_ids"]) for e in examples], self.max_length)
        width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids = torch.as_tensor(examples[i]["input_ids"], dtype=torch.long)
                end = start + len(ids)
                input_ids[r, start:end] = ids
                mask = examples[i].get("completion_mask")
                labels[r, start:end] = ids if mask is None else torch.where(torch.as_tensor(mask, dtype=torch.bool),
                                                                           ids, -100)
                labels[r, start] = -100  # nothing precedes an example's first token: never a target (as in TRL)
                position_ids[r, start:end] = torch.arange(len(ids))
                start = end
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
