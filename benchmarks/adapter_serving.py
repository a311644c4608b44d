"""The deployed adapter form against the merged int4 export and PyTorch: decode speed, time to first token,
accuracy, memory of one base + N adapters vs N baked exports, and how close each engine gets to the
memory-bandwidth limit.

    python benchmarks/adapter_serving.py --run outputs/<banking77 run> [--also outputs/<poem_sentiment run>]
        [--prompts 8] [--new-tokens 64] [--rounds 3] [--accuracy-rows 300] [--level1]

``--run`` is a run folder exported with ``genai-int4-adapter`` (``merged/``, ``onnx/genai-int4-adapter``,
``eval/finetuned``, ``data/test.jsonl``). The script builds, in a temporary folder, the merged model's
``genai-int4`` export with the run's int4 settings and the run's adapter baked into its int4 base both ways
(``tasks.deploy.formats.adapter.bake_adapter``: folded, the export default, and fp32). Arms, alternating round
by round like ``benchmarks/onnx_decode.py``:

- PyTorch fp32: the merged model as the pipeline loads it;
- merged int4: ``genai-int4`` of the merged model;
- baked, folded / fp32: the int4 base with the adapter's weights as graph constants (``export.adapter_weights``);
- int4 base + ``.onnx_adapter``: the shared base with the adapter file, as several adapters are served;
- with ``--level1``: that last form with the base's MatMulNBits at ``accuracy_level`` 1 (fp32 activations;
  ONNX Runtime issue 29849 reports that int8 activations flip near-tie tokens), ~15x slower on CPU.

Accuracy: the first ``--accuracy-rows`` test rows through each int4 + adapter arm, against the pipeline's
evaluation of the merged model (``eval/finetuned/predictions.jsonl``), with the seconds it took. Memory: the
resident set (``VmRSS``) of a fresh process that loads one base and the adapters of ``--run`` and ``--also``,
against one that loads that many baked (folded) exports. The bandwidth limit: this machine's memory bandwidth
(numpy copy of 512 MB, read + write bytes) divided by the weight bytes each engine reads per decoded token (its
weight files). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from benchmarks.onnx_decode import genai_engine, hf_engine  # noqa: E402
from tasks.common.chat import prompt_ids  # noqa: E402
from tasks.common.files import read_jsonl  # noqa: E402
from tasks.common.metrics import normalise_answer  # noqa: E402
from tasks.deploy.runtime.predict import Predictor  # noqa: E402

MEMORY_PROBE = """
import json, sys
from tasks.deploy.runtime.predict import Predictor, adapter_name, base_of
kind, folders = sys.argv[1], sys.argv[2:]
shared = Predictor(base_of(folders[0]), adapters={adapter_name(f): f for f in folders}) if kind == "adapters" else None
loaded = [shared] if shared else [Predictor(f) for f in folders]
for p in loaded:  # a token per model and adapter, so that every session and adapter has run
    for name in p.adapters or [None]:
        p.generate_ids(p.prompt_ids([{"role": "user", "content": "hi"}]), 1, adapter=name)
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
print(json.dumps({"rss_mb": rss / 1024}))
"""


def with_accuracy_level(base: Path, out: Path, level: int) -> Path:
    """A copy of the int4 base ``base`` whose MatMulNBits nodes use ``accuracy_level`` ``level``."""
    import onnx

    shutil.copytree(base, out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = level
    onnx.save(model, str(out / "model.onnx"))
    return out


def memory_bandwidth() -> float:
    """Bytes per second moved by a numpy copy of 512 MB (read + write), best of 5."""
    import numpy as np

    src = np.ones(512 * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def weight_bytes(folder: Path) -> int:
    """Bytes of the weights ``folder``'s model reads: its ``.data``/``.safetensors`` files (and its adapter file
    where the folder holds no model of its own)."""
    kinds = (".data", ".safetensors") if (folder / "model.onnx").is_file() or not (folder / "adapter.json").is_file() \
        else (".onnx_adapter",)
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in kinds)


def accuracy(predictor: Predictor, records: list[dict], reference: list[str]) -> tuple[float, float, float]:
    """(accuracy, same answer as the merged model's evaluation, seconds) over ``records``."""
    start = time.perf_counter()
    max_new = predictor.settings["max_new_tokens"]  # the evaluation's answer length, as the export gate uses
    answers = [predictor.decode(predictor.generate_ids(predictor.prompt_ids(r["messages"][:-1]), max_new))
               for r in records]
    seconds = time.perf_counter() - start
    truth = [r["messages"][-1]["content"] for r in records]
    acc = sum(normalise_answer(a) == normalise_answer(t) for a, t in zip(answers, truth)) / len(records)
    same = sum(normalise_answer(a) == normalise_answer(b) for a, b in zip(answers, reference)) / len(records)
    return acc, same, seconds


def rss(kind: str, folders: list[str]) -> float:
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, *folders], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_mb"]


def baked(adapter: Path, out: Path, weights: str) -> Path:
    """A copy of the adapter export ``adapter`` with its adapter baked into its int4 base (``weights`` LoRA)."""
    from tasks.deploy.formats.adapter import bake_adapter

    shutil.copytree(adapter, out, ignore=shutil.ignore_patterns("model.onnx*", "genai_config.json"))
    bake_adapter(out, json.loads((adapter / "adapter.json").read_text())["base"], weights)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--also", type=Path, action="append", default=[], help="more runs whose adapters share the base")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--accuracy-rows", type=int, default=300,
                   help="test rows per int4 + adapter arm (the export gate measures the published form on all); "
                        "0 = no accuracy table")
    p.add_argument("--level1", action="store_true", help="add the accuracy_level 1 arm (~15x slower decode)")
    args = p.parse_args()
    from configs.schema import ExportConfig
    from tasks.base_model import load_model, load_tokenizer
    from tasks.deploy.export import TARGETS, build_genai
    from tasks.deploy.runtime.predict import adapter_name

    run = args.run.resolve()
    merged, adapter = run / "merged", run / "onnx" / "genai-int4-adapter"
    base = Path(json.loads((adapter / "adapter.json").read_text())["base"])
    settings = json.loads((run / "metrics.json").read_text())["config"]["export"]
    tmp = Path(tempfile.mkdtemp(prefix="adapter-serving-"))
    try:
        start = time.perf_counter()
        build_genai(str(merged), tmp / "merged-int4", TARGETS["genai-int4"], ExportConfig(**settings), False)
        shutil.copy(adapter / "inference.json", tmp / "merged-int4")
        merged_int4_seconds = time.perf_counter() - start
        name = adapter_name(adapter)
        predictors = {"int4 + adapter baked, folded (export default)":
                      Predictor(baked(adapter, tmp / "folded", "folded")),
                      "int4 + adapter baked, fp32 LoRA": Predictor(baked(adapter, tmp / "fp32", "fp32")),
                      "int4 base + .onnx_adapter (shared base)": Predictor(base, adapters={name: adapter})}
        sizes = {"int4 + adapter baked, folded (export default)": weight_bytes(tmp / "folded"),
                 "int4 + adapter baked, fp32 LoRA": weight_bytes(tmp / "fp32"),
                 "int4 base + .onnx_adapter (shared base)": weight_bytes(base) + weight_bytes(adapter)}
        if args.level1:
            level1 = with_accuracy_level(base, tmp / "base-level1", 1)
            predictors["int4 base + .onnx_adapter, accuracy_level 1"] = Predictor(level1, adapters={name: adapter})
            sizes["int4 base + .onnx_adapter, accuracy_level 1"] = sizes["int4 base + .onnx_adapter (shared base)"]

        tokenizer = load_tokenizer(str(merged))
        records = read_jsonl(run / "data" / "test.jsonl")
        prompts = [prompt_ids(tokenizer, r) for r in records[: args.prompts]]
        engines = {"PyTorch fp32 (merged)": (hf_engine(load_model(str(merged)), tokenizer.eos_token_id),
                                             weight_bytes(merged)),
                   "merged int4 (genai-int4)": (genai_engine(Predictor(tmp / "merged-int4")),
                                                weight_bytes(tmp / "merged-int4"))}
        engines |= {arm: (genai_engine(pr), sizes[arm]) for arm, pr in predictors.items()}
        for engine, _ in engines.values():
            engine(prompts[0], 4)
        ttft = {arm: [] for arm in engines}
        rate = {arm: [] for arm in engines}
        names = list(engines)
        for r in range(args.rounds):
            for arm in names[r % len(names):] + names[: r % len(names)]:
                for prompt in prompts:
                    start = time.perf_counter()
                    stamps = engines[arm][0](prompt, args.new_tokens)
                    ttft[arm].append(stamps[0] - start)
                    rate[arm].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        bandwidth = memory_bandwidth()
        print(f"machine: {cpu()}; memory bandwidth (numpy copy) {bandwidth / 1e9:.1f} GB/s; "
              f"{args.prompts} test prompts x {args.rounds} rounds, {args.new_tokens} new tokens; merged int4 "
              f"export built in {merged_int4_seconds:.0f} s")
        print("| engine | weights (MB) | decode tokens/s | × merged int4 | bandwidth limit (tokens/s) | "
              "% of limit | TTFT (ms) |")
        print("|---|---|---|---|---|---|---|")
        ref = statistics.median(rate["merged int4 (genai-int4)"])
        for arm in names:
            tok_s, size = statistics.median(rate[arm]), engines[arm][1]
            limit = bandwidth / size
            print(f"| {arm} | {size / 1e6:.0f} | {tok_s:.1f} | {tok_s / ref:.2f} | {limit:.0f} | "
                  f"{100 * tok_s / limit:.0f} % | {statistics.median(ttft[arm]) * 1000:.0f} |")

        rows = records[: args.accuracy_rows]
        reference = [r["prediction"] for r in read_jsonl(run / "eval" / "finetuned" / "predictions.jsonl")]
        if rows:  # --accuracy-rows 0: speed and memory only
            print(f"\n| deployed form ({len(rows)} test rows) | accuracy | same answer as the evaluated model | "
                  "seconds |")
            print("|---|---|---|---|")
            for arm, predictor in predictors.items():
                acc, same, seconds = accuracy(predictor, rows, reference)
                print(f"| {arm} | {100 * acc:.2f} % | {100 * same:.1f} % | {seconds:.0f} |")

        exports = [adapter, *(r.resolve() / "onnx" / "genai-int4-adapter" for r in args.also)]
        alone = [str(baked(e, tmp / f"alone-{i}", "folded")) for i, e in enumerate(exports)]
        n = len(exports)
        print(f"\n| {n} adapters in one process | resident memory (MB) |\n|---|---|")
        print(f"| one int4 base + {n} .onnx_adapter files | {rss('adapters', [str(e) for e in exports]):.0f} |")
        print(f"| {n} baked exports (folded), one session each | {rss('whole', alone):.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
