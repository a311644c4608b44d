"""Decode speed of one fine-tuned model as PyTorch fp32 and as each of its exports (ONNX Runtime GenAI folders, the
OpenVINO NPU form), on the same prompts, alternating engines round by round.

    python benchmarks/onnx_decode.py --run outputs/<run> [--npu DIR] [--prompts 8] [--new-tokens 64] [--rounds 3]

``--run`` is a run folder of ``python -m flows.finetune`` (its ``merged/``, ``onnx/<target>/`` and
``data/test.jsonl``); every export folder under ``onnx/`` is an engine (the int4 base alone is not), and ``--npu``
adds an ``openvino-npu`` folder made elsewhere (``benchmarks/npu_export.py``). Each prompt decodes exactly
``--new-tokens`` greedy tokens (end-of-sequence ignored), one sequence at a time with a KV cache; PyTorch runs as the
pipeline loads it (``tasks.base_model.load_model``: fp32, SDPA attention), GenAI through
``tasks.deploy.runtime.predict.Predictor`` and the NPU form through ``tasks.deploy.runtime.openvino.NPUPredictor``
(as ``flows.predict`` does: on a machine without an NPU, the NPU's static pipeline on the CPU, which is not an NPU
figure). Time to first token (TTFT) =
prompt processing + first token; decode rate = tokens after the first / time after the first. Prints medians over all
prompts and rounds, ratios to PyTorch fp32, and the machine. Run it on an otherwise idle machine: a concurrent
job skews the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu  # noqa: E402
from tasks.base_model import load_model, load_tokenizer  # noqa: E402
from tasks.common.chat import prompt_ids  # noqa: E402
from tasks.common.files import read_jsonl  # noqa: E402
from tasks.deploy.runtime.openvino import NPUPredictor, is_openvino_export  # noqa: E402
from tasks.deploy.runtime.predict import Predictor  # noqa: E402


class _Stamps:
    """A transformers streamer that records the time of every generated token (its first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


def hf_engine(model, eos: int):
    import torch

    def run(prompt: list[int], new_tokens: int) -> list[float]:
        stamps = _Stamps()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=eos, streamer=stamps)
        return stamps.times
    return run


def genai_engine(predictor: Predictor):  # also an NPUPredictor: the same generate_ids
    def run(prompt: list[int], new_tokens: int) -> list[float]:
        stamps: list[float] = []
        predictor.generate_ids(prompt, new_tokens, min_new_tokens=new_tokens,
                               on_token=lambda: stamps.append(time.perf_counter()))
        return stamps
    return run


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--npu", type=Path, help="an openvino-npu export folder to add")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    merged = args.run / "merged"
    tokenizer = load_tokenizer(str(merged))
    records = read_jsonl(args.run / "data" / "test.jsonl")[: args.prompts]
    prompts = [prompt_ids(tokenizer, r) for r in records]
    eos = tokenizer.eos_token_id
    engines = {"PyTorch fp32 (SDPA, KV cache)": (hf_engine(load_model(str(merged)), eos), size_mb(merged))}
    folders = sorted(f for f in (args.run / "onnx").iterdir() if f.name != "int4-base") + [args.npu] * bool(args.npu)
    for folder in folders:
        if is_openvino_export(folder):
            predictor = NPUPredictor(folder)
            name = f"{folder.name} (OpenVINO GenAI, {predictor.device})"
        else:
            predictor, name = Predictor(folder), f"{folder.name} (ONNX Runtime GenAI, CPU)"
        engines[name] = (genai_engine(predictor), size_mb(folder))
    for run, _ in engines.values():  # warm-up: first-call allocations and kernel selection
        run(prompts[0], 4)
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    rate: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every round
            for prompt in prompts:
                start = time.perf_counter()
                stamps = engines[name][0](prompt, args.new_tokens)
                ttft[name].append(stamps[0] - start)
                rate[name].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    base = names[0]
    print(f"machine: {cpu()}; "
          f"{args.prompts} banking77 test prompts x {args.rounds} rounds, {args.new_tokens} new tokens each")
    print("| engine | size (MB) | decode tokens/s | × PyTorch fp32 | TTFT (ms) | TTFT speed-up |")
    print("|---|---|---|---|---|---|")
    for name in names:
        tok_s, first = statistics.median(rate[name]), statistics.median(ttft[name])
        print(f"| {name} | {engines[name][1]:.0f} | {tok_s:.1f} | {tok_s / statistics.median(rate[base]):.2f} | "
              f"{first * 1000:.0f} | {statistics.median(ttft[base]) / first:.2f} |")


if __name__ == "__main__":
    main()
