"""The evaluation's decoding arms: seconds per 1,000 test rows of ``tasks.stages.evaluate``'s greedy answers +
teacher-forced loss, done as two passes (``generate`` then ``completion_loss``: issue 19's before), as one shared
prefill decoding free-running (``generate_with_loss``: the prefill gives the loss and the first token, its KV cache
decodes the rest), and as one shared prefill decoding along the label tree (``eval.constrain: labels``: only the
tree's branch points call the model), for each model given (classification test rows; the labels are those of the
``train.jsonl`` beside ``--test``). The arms alternate round by round in this one process; their accuracy, answers
and losses are compared with the first arm's.

    python benchmarks/eval_throughput.py --test outputs/<run>/data/test.jsonl \\
        --model base=<base model folder> --model tuned=outputs/<run>/merged [--rows 1000] [--rounds 2] [--bf16 auto]

Run it on an otherwise idle machine; it prints the CPU (``lscpu``'s model name and bf16 support) with the figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from tasks.base_model import autocast, load_model, load_tokenizer, use_bf16  # noqa: E402
from tasks.common.chat import answer_ids, default_max_new_tokens, generate, prompt_ids  # noqa: E402
from tasks.common.labels import LabelTree  # noqa: E402
from tasks.stages.evaluate import completion_loss, generate_with_loss  # noqa: E402
from tasks.common.files import read_jsonl  # noqa: E402
from tasks.common.metrics import score  # noqa: E402


def two_passes(model, tok, records, prompts, max_new, batch_size, labels):
    return generate(model, tok, prompts, max_new, batch_size), completion_loss(model, tok, records, batch_size)


def shared_prefill(model, tok, records, prompts, max_new, batch_size, labels):
    return generate_with_loss(model, tok, records, prompts, max_new, batch_size)[:2]


def constrained(model, tok, records, prompts, max_new, batch_size, labels):
    tree = LabelTree.build(answer_ids(tok, labels))
    return generate_with_loss(model, tok, records, prompts, max_new, batch_size, tree)[:2]


ARMS = {"two passes": two_passes, "shared prefill": shared_prefill, "shared prefill, constrained": constrained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", required=True, help="a test split (JSONL of chat records)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="eval.batch_size")
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"])
    args = parser.parse_args()
    records = read_jsonl(args.test)[: args.rows]
    labels = sorted({r["label"] for r in read_jsonl(Path(args.test).with_name("train.jsonl"))})
    bf16 = use_bf16({"auto": "auto", "true": True, "false": False}[args.bf16])
    print(f"CPU: {cpu()}; bf16 autocast: {bf16}; {len(records)} rows, batch {args.batch_size}")
    print("| model | arm | s per 1,000 rows (median of rounds) | accuracy | eval loss | × two passes |")
    print("|---|---|---|---|---|---|")
    for name, folder in (spec.split("=", 1) for spec in args.model):
        tok, model = load_tokenizer(folder), load_model(folder)
        prompts = [prompt_ids(tok, r) for r in records]
        max_new = default_max_new_tokens(tok, [r["messages"][-1]["content"] for r in records], "classification")
        seconds, results = {arm: [] for arm in ARMS}, {}
        for round_ in range(args.rounds):
            for arm in (list(ARMS) if round_ % 2 == 0 else list(ARMS)[::-1]):
                start = time.perf_counter()
                with autocast(bf16):
                    results[arm] = ARMS[arm](model, tok, records, prompts, max_new, args.batch_size, labels)
                seconds[arm].append(time.perf_counter() - start)
        per_k = {arm: statistics.median(s) * 1000 / len(records) for arm, s in seconds.items()}
        references = [r["messages"][-1]["content"] for r in records]
        for arm in ARMS:
            accuracy = score("classification", results[arm][0], references)["accuracy"]
            print(f"| {name} | {arm} | {per_k[arm]:.1f} | {accuracy:.2%} | {results[arm][1]:.5f} | "
                  f"{per_k['two passes'] / per_k[arm]:.2f} |")
        (a, loss_a), *others = results.values()
        for arm, (b, loss_b) in zip(list(ARMS)[1:], others):
            same = sum(x == y for x, y in zip(a, b)) / len(records)
            print(f"{name}: {arm} gives the two passes' answer on {same:.2%} of rows; loss difference "
                  f"{abs(loss_a - loss_b):.2e}; max_new_tokens {max_new}")


if __name__ == "__main__":
    main()
