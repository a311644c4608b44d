"""The export gate's answering pass on one exported folder, three ways side by side, rounds alternating the order:

- ``one by one``: ``Predictor.answer`` per test row, one generator each, ONNX Runtime's threads on every CPU (the
  gate before 2026-12-07);
- ``shared prefix``: ``Predictor.answers`` in one process (the prompts' common prefix run once, the KV cache
  rewound to its end for each row);
- ``workers``: ``answer_in_processes``, one single-threaded worker process per CPU, each as ``shared prefix``
  (the gate now).

    python benchmarks/export_gate.py --folder outputs/<run>/onnx/genai-int4-adapter --test outputs/<run>/data/test.jsonl
        [--rows 600] [--rounds 2]

Prints rows/s per arm and round (worker start-up included), the median, and how many answers each arm gives that
``one by one`` does not (it must be 0); then the machine. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu  # noqa: E402
from tasks.common.files import read_jsonl  # noqa: E402
from tasks.deploy.runtime.predict import Predictor, answer_in_processes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="a genai-* export folder")
    parser.add_argument("--test", required=True, help="the run's test.jsonl (chat rows)")
    parser.add_argument("--rows", type=int, default=600, help="test rows per round (each round its own rows)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    predictor = Predictor(args.folder)
    max_new = predictor.settings["max_new_tokens"]
    rows = read_jsonl(args.test)
    arms = {"one by one": lambda prompts: [predictor.answer(p, max_new) for p in prompts],
            "shared prefix": lambda prompts: predictor.answers(prompts, max_new),
            "workers": lambda prompts: answer_in_processes(predictor, prompts, max_new, desc="workers")}
    speed, differ = {arm: [] for arm in arms}, dict.fromkeys(arms, 0)
    for r in range(args.rounds):
        chunk = rows[r * args.rows:(r + 1) * args.rows]
        prompts = [predictor.prompt_ids(row["messages"][:-1]) for row in chunk]
        answers = {}
        for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            start = time.perf_counter()
            answers[arm] = arms[arm](prompts)
            speed[arm].append(len(prompts) / (time.perf_counter() - start))
        for arm in arms:
            differ[arm] += sum(a != b for a, b in zip(answers[arm], answers["one by one"]))
    print(f"{args.folder}: {args.rounds} rounds of {args.rows} test rows")
    base = statistics.median(speed["one by one"])
    for arm in arms:
        median = statistics.median(speed[arm])
        print(f"{arm:14s} rows/s {' '.join(f'{s:6.1f}' for s in speed[arm])}   median {median:6.1f}   "
              f"x{median / base:.2f}   answers unlike one by one: {differ[arm]}")
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()
