"""Classification answers constrained to the label set: a prefix tree over the token ids of each label's answer,
and greedy decoding that may only follow it (``eval.constrain: labels``).

A label's answer is what training taught the model to write after the prompt: the completion tokens of the chat
template with the label as the assistant turn (``tasks.common.chat.tokenize_with_completion_mask``), up to and
including the end-of-sequence token (SmolLM2: ``card_arrival`` + ``<|im_end|>``; Qwen3's empty reasoning block
first). Decoding starts at the tree's root; at a node with one child that token is taken without asking the
model; at a node with several, the model's logits at that position choose among the children only (argmax over
the allowed ids). A leaf ends the answer, so every answer is a label by construction. The same tree and the same
rule run in the PyTorch evaluation (batched, ``tasks.stages.evaluate``), the export gate and the runtime that
serves every exported folder (``tasks.deploy.runtime.predict``): what is measured is what is shipped.

Torch-free (the runtime imports it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def label_set(rows: Sequence[dict]) -> list[str]:
    """The sorted distinct ``label`` fields of ``rows`` (a split's records, as ``tasks.stages.split`` writes them):
    what constrained answers may be, taken from the train split."""
    return sorted({r["label"] for r in rows if r.get("label") is not None})


class LabelTreeError(ValueError):
    """The labels cannot be told apart token by token (one label's answer is a prefix of another's, which happens
    only when the chat template ends no answer with the end-of-sequence token)."""


@dataclass
class Node:
    """A node of the label tree: ``children`` by token id; ``label`` at a leaf (the answer is complete)."""

    children: dict[int, Node] = field(default_factory=dict)
    label: str | None = None


@dataclass
class LabelTree:
    """The prefix tree over each label's answer token ids.

    Attributes:
        root: the node before the first answer token.
        sequences: ``{label: token ids}`` it was built from (each ends with the end-of-sequence token when the
            chat template writes one).
    """

    root: Node
    sequences: dict[str, list[int]]

    @classmethod
    def build(cls, sequences: dict[str, Sequence[int]]) -> LabelTree:
        """The tree of ``sequences`` (``{label: answer token ids}``).

        Raises:
            LabelTreeError: no label, an empty sequence, or one label's sequence is a prefix of another's (named).
        """
        if not sequences:
            raise LabelTreeError("constrained answers need at least one label")
        root = Node()
        for label, ids in sorted(sequences.items(), key=lambda item: len(item[1])):
            if not ids:
                raise LabelTreeError(f"label {label!r} has no answer tokens")
            node = root
            for token in ids:
                if node.label is not None:
                    raise LabelTreeError(f"label {node.label!r}'s answer tokens are a prefix of {label!r}'s: the "
                                         "chat template ends no answer with the end-of-sequence token; set "
                                         "eval.constrain: none")
                node = node.children.setdefault(int(token), Node())
            if node.children or node.label is not None:
                raise LabelTreeError(f"label {label!r}'s answer tokens are a prefix of another label's (or equal "
                                     "to one): set eval.constrain: none")
            node.label = label
        return cls(root, {label: [int(t) for t in ids] for label, ids in sequences.items()})


def forced(node: Node) -> tuple[list[int], Node]:
    """From ``node``, the tokens that need no choice (while there is exactly one child and no leaf yet) and the
    node they lead to (a leaf, or a node with several children)."""
    tokens = []
    while node.label is None and len(node.children) == 1:
        token, node = next(iter(node.children.items()))
        tokens.append(token)
    return tokens, node


def choose(node: Node, logits: Sequence[float]) -> int:
    """The child of ``node`` with the highest logit (``logits``: one row over the vocabulary; ties: the lowest id)."""
    return max(sorted(node.children), key=lambda token: logits[token])


def constrained_greedy(tree: LabelTree, first_logits: Sequence[float],
                       next_logits: Callable[[list[int]], Sequence[float]]) -> tuple[str, list[int], int]:
    """Greedy decoding of one answer along ``tree``.

    Args:
        first_logits: the model's logits for the first answer token (after the prompt), one row over the vocabulary.
        next_logits: given the tokens chosen since the last call (fed to the model as one chunk), the logits for
            the token after them.

    Returns:
        ``(label, the answer's token ids, model calls made after the prompt)``.
    """
    node, out, pending, calls = tree.root, [], [], 0
    logits = first_logits
    while True:
        tokens, node = forced(node)
        out += tokens
        pending += tokens
        if node.label is not None:
            return node.label, out, calls
        if pending:
            logits, pending = next_logits(pending), []
            calls += 1
        token = choose(node, logits)
        node = node.children[token]
        out.append(token)
        pending.append(token)
