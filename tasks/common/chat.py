"""The chat format as every stage sees it: prompt ids, prompt+answer ids with the answer's start (as TRL
tokenises for completion-only loss), TRL's prompt/completion rows, batched greedy generation and its default length.

Shared by validate, train, merge, evaluate and export, so that each tokenises (and decodes classification labels)
exactly as the others do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

GENERATION_MAX_NEW_TOKENS = 256


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` with the tokenizer's chat template applied (and the assistant turn's header when
    ``add_generation_prompt``).

    transformers 5's ``apply_chat_template`` returns a ``BatchEncoding`` (a dict of ``input_ids`` and
    ``attention_mask``) unless told ``return_dict=False``; taken as ids, its ``len()`` is 2.

    Raises:
        TypeError: the tokenizer returned something other than a flat list of ints.
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False)
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise TypeError(f"apply_chat_template returned {type(ids).__name__}, expected a list of token ids")
    return ids


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """Token ids of ``record``'s messages but the last, chat template applied, ending with the generation prompt
    (the assistant turn's header): what the model sees before it answers."""
    return chat_ids(tokenizer, record["messages"][:-1], add_generation_prompt=True)


def tokenize_with_completion_mask(tokenizer, records: list[dict]) -> list[tuple[list[int], int]]:
    """``(prompt+completion ids, prompt length)`` per record, built exactly as TRL does for training."""
    return [(chat_ids(tokenizer, r["messages"]), len(prompt_ids(tokenizer, r))) for r in records]


def to_prompt_completion(records: list[dict]) -> datasets.Dataset:
    """Conversational prompt/completion rows for TRL: ``prompt`` = every message but the last, ``completion`` =
    ``[last message]``. TRL then masks the prompt tokens out of the loss (completion-only loss)."""
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])


def batches(order: list[int], size: int):
    """``order`` in consecutive chunks of ``size`` (the last one shorter)."""
    for i in range(0, len(order), size):
        yield order[i:i + size]


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             desc: str = "generate") -> list[str]:
    """Greedy-decode each tokenised prompt (left-padded batches, longest first); returns the new text only,
    special tokens removed, in the input order."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for idx in tqdm(list(batches(order, batch_size)), desc=desc):
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding=True, return_tensors="pt",
                              padding_side="left").to(model.device)
        with torch.inference_mode():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch["input_ids"].shape[1]:]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


def generate_constrained(model, tokenizer, prompts: list[list[int]], tree, batch_size: int,
                         desc: str = "constrained answers") -> list[str]:
    """``constrained_decode`` over ``prompts`` in left-padded batches (longest first); the labels in input order.
    ``tree``: a ``tasks.common.labels.LabelTree``."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for idx in tqdm(list(batches(order, batch_size)), desc=desc):
        batch = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, padding=True, return_tensors="pt",
                              padding_side="left").to(model.device)
        for i, label in zip(idx, constrained_decode(model, batch["input_ids"], batch["attention_mask"], tree,
                                                    tokenizer.pad_token_id)):
            out[i] = label
    return out


def answer_ids(tokenizer, labels: list[str]) -> dict[str, list[int]]:
    """The token ids the model writes as each label's answer: the completion tokens of a one-turn chat with the
    label as the assistant turn (``tokenize_with_completion_mask``: what training taught), up to and including
    the end-of-sequence token when the template writes it (ChatML: the label's tokens, then ``<|im_end|>``;
    Qwen3's empty reasoning block comes first).

    Returns:
        ``{label: token ids}``, the input of ``tasks.common.labels.LabelTree.build``.
    """
    user = [{"role": "user", "content": "?"}]
    eos, out = tokenizer.eos_token_id, {}
    for label in labels:
        (ids, n), = tokenize_with_completion_mask(tokenizer, [{"messages": user + [{"role": "assistant",
                                                                                   "content": label}]}])
        completion = ids[n:]
        out[label] = completion[: completion.index(eos) + 1] if eos in completion else completion
    return out


def constrained_decode(model, input_ids, attention_mask, tree, pad_token_id: int, cache=None,
                       first_logits=None) -> list[str]:
    """Greedy answers of a batch of prompts along the label tree ``tree`` (``tasks.common.labels``): every answer
    is a label.

    A row follows the tree without the model while its node has one child; where it has several, the model's
    logits at that position choose among them. Each model call feeds every row that must choose the tokens it
    took since its last call, as one right-padded chunk on top of the KV cache (padding masked out, positions
    counted over real tokens only), so a batch needs as many calls as its deepest chain of choices, not as many
    as its longest answer has tokens.

    Args:
        input_ids, attention_mask: int64 (batch, width): the left-padded prompts.
        cache, first_logits: the model's KV cache after the prompts and float (batch, vocabulary) logits for
            each row's first answer token (the evaluation's one prefill); None: the prompts are run here first.

    Returns:
        the label each row answered, in row order.
    """
    import torch

    from tasks.common.labels import choose, forced

    mask = attention_mask
    with torch.inference_mode():
        if cache is None:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            outputs = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
            cache, first_logits = outputs.past_key_values, outputs.logits[:, -1]
        rows = input_ids.shape[0]
        nodes, pending, labels = [tree.root] * rows, [[] for _ in range(rows)], [None] * rows
        logits = [first_logits[i].float() for i in range(rows)]

        def advance(i: int) -> None:  # take forced and chosen tokens until the row needs the model or ends
            while True:
                tokens, nodes[i] = forced(nodes[i])
                pending[i] += tokens
                if nodes[i].label is not None:
                    labels[i] = nodes[i].label
                    return
                if pending[i]:
                    return
                token = choose(nodes[i], logits[i])
                nodes[i] = nodes[i].children[token]
                pending[i].append(token)

        for i in range(rows):
            advance(i)
        while feed := [i for i in range(rows) if labels[i] is None]:
            width = max(len(pending[i]) for i in feed)
            chunk = torch.full((rows, width), pad_token_id, dtype=torch.long, device=mask.device)
            chunk_mask = torch.zeros_like(chunk)
            for i in feed:
                chunk[i, : len(pending[i])] = torch.tensor(pending[i])
                chunk_mask[i, : len(pending[i])] = 1
            mask = torch.cat([mask, chunk_mask], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
            outputs = model(input_ids=chunk, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True)
            cache = outputs.past_key_values
            for i in feed:
                logits[i], pending[i] = outputs.logits[i, len(pending[i]) - 1].float(), []
                advance(i)
    return labels


def default_max_new_tokens(tokenizer, references: list[str], task: str) -> int:
    """``eval.max_new_tokens``'s default: for classification the longest reference label's tokens + 2 (the
    end-of-turn token and a margin) + the tokens the chat template writes before every answer
    (``answer_prefix_tokens``: Qwen3's empty reasoning block), ``GENERATION_MAX_NEW_TOKENS`` for generation."""
    if task != "classification":
        return GENERATION_MAX_NEW_TOKENS
    longest = max(len(tokenizer(label, add_special_tokens=False).input_ids) for label in set(references))
    return longest + 2 + answer_prefix_tokens(tokenizer)


def answer_prefix_tokens(tokenizer) -> int:
    """How many tokens the chat template writes at the start of an assistant turn, after the generation prompt
    and before the answer's text: the model learns to generate them before every answer.

    0 for ChatML, Llama-3, Gemma, Phi-3 and Mistral templates; Qwen3's template opens the final assistant turn
    with an empty reasoning block, ``<think>\n\n</think>\n\n`` (4 tokens of Qwen3's tokenizer), which its
    generation prompt (unless ``enable_thinking=False``) leaves out. Measured by rendering a one-turn chat with
    a marker answer; 0 when the rendered prompt is not a prefix of the rendered chat (no fixed text to count).
    """
    marker = "ANSWER-MARKER"
    user = [{"role": "user", "content": "question"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    chat = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": marker}], tokenize=False)
    if not chat.startswith(prompt) or marker not in chat[len(prompt):]:
        return 0
    before = chat[len(prompt):chat.index(marker, len(prompt))]
    return len(tokenizer(before, add_special_tokens=False).input_ids) if before else 0
