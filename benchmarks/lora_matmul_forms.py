"""Where the int4 adapter form's decode time goes (issue 18): the LoRA MatMuls of one decoded token of
SmolLM2-135M with an all-linear r=16 adapter (30 layers × 7 modules = 210 pairs ``x @ A`` [576, 16],
``(x A) @ B`` [16, 576] at batch 1, one new token), in ONNX Runtime (CPU provider) in the forms the adapter could
take, side by side in one process, rounds alternating:

- ``fp32 initializer``: A and B constants in the graph (what a merged-per-adapter session would hold; MLAS
  pre-packs them once);
- ``fp32 input``: A and B as graph inputs (what an ``.onnx_adapter`` feeds: ONNX Runtime GenAI's adapters are
  inputs, so MLAS packs B on every call);
- ``int8 / int4 MatMulNBits input``: the LoRA weights quantized and fed as MatMulNBits inputs (``accuracy_level``
  4 and 0), the route left open by the last measurement; ``initializer`` rows for comparison.

    python benchmarks/lora_matmul_forms.py [--threads 2] [--runs 50] [--rounds 3]

Prints ms per token's 420 LoRA MatMuls for each form. Compare with the merged int4 export's whole decode step
(``benchmarks/adapter_serving.py``). The weights are random (only time is measured). Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu  # noqa: E402

HIDDEN, RANK, PAIRS = 576, 16, 210


def session(nodes, inputs, inits, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, HIDDEN])
    graph = helper.make_graph(nodes, "lora", inputs, [out], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def build(form: str, threads: int, rng):
    """``(session, feeds)`` for ``form``: "fp32 initializer|input" or "int<bits> L<level> initializer|input"."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = rng.standard_normal((1, 1, HIDDEN), dtype=np.float32)
    nodes, inits, feeds = [], [], {"x": x}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, HIDDEN])]
    as_input = form.endswith("input")

    def weight(name, array, dtype):
        if as_input:
            inputs.append(helper.make_tensor_value_info(name, dtype, list(array.shape)))
            feeds[name] = array
        else:
            inits.append(numpy_helper.from_array(array, name))

    for i in range(PAIRS):
        for side, k, n, block, source in (("a", HIDDEN, RANK, 32, "x"), ("b", RANK, HIDDEN, 16, f"t{i}")):
            target = f"t{i}" if side == "a" else f"y{i}"
            if form.startswith("fp32"):
                weight(f"{side}{i}", rng.standard_normal((k, n), dtype=np.float32) * 0.02, TensorProto.FLOAT)
                nodes.append(helper.make_node("MatMul", [source, f"{side}{i}"], [target]))
                continue
            bits, level = int(form[3]), int(form.split()[1][1:])
            blocks = (k + block - 1) // block
            weight(f"{side}{i}w", rng.integers(0, 255, (n, blocks, block * bits // 8), dtype=np.uint8),
                   TensorProto.UINT8)
            weight(f"{side}{i}s", rng.random(n * blocks, dtype=np.float32) * 0.01, TensorProto.FLOAT)
            nodes.append(helper.make_node("MatMulNBits", [source, f"{side}{i}w", f"{side}{i}s"], [target],
                                          domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                          accuracy_level=level))
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(PAIRS)], ["y"]))
    return session(nodes, inputs, inits, threads), {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}


FORMS = ["fp32 initializer", "fp32 input", "int8 L4 initializer", "int8 L4 input", "int8 L0 input",
         "int4 L4 initializer", "int4 L4 input"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (ONNX Runtime's default: cores)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sessions = {form: build(form, args.threads, rng) for form in FORMS}
    times = {form: [] for form in FORMS}
    for round_ in range(args.rounds):
        for form in FORMS if round_ % 2 == 0 else FORMS[::-1]:
            run, feeds = sessions[form]
            for _ in range(5):
                run.run(None, feeds)
            start = time.perf_counter()
            for _ in range(args.runs):
                run.run(None, feeds)
            times[form].append((time.perf_counter() - start) / args.runs * 1e3)
    print(f"CPU: {cpu()}; intra-op threads: {args.threads}")
    print(f"| form of the {2 * PAIRS} LoRA MatMuls of one token | ms per token (median of {args.rounds} rounds) |")
    print("|---|---|")
    for form in FORMS:
        print(f"| {form} | {statistics.median(times[form]):.2f} |")


if __name__ == "__main__":
    main()
