"""Inference with an exported model on CPU, without torch: one text, or a batch-prediction flow over a file.

    python -m flows.predict --model outputs/<run>/onnx/genai-int4 "I lost my card"
    python -m flows.predict --model outputs/<run>/onnx/genai-int4 --input inputs.jsonl [--output answers.jsonl]
    python -m flows.predict --model outputs/<run1>/onnx/genai-int4-adapter \
        --model outputs/<run2>/onnx/genai-int4-adapter --adapter banking77 "I lost my card"

The folder is a ``genai-*``, ``openvino-npu`` or ``qnn-npu`` export (``tasks/deploy/export.py``; an
``openvino-npu`` one runs on the NPU's static pipeline, on the CPU where there is no NPU, a ``qnn-npu`` one on the
Qualcomm NPU's QNN HTP backend, on ONNX Runtime's CPU provider where there is none; both say which on stderr);
answers are greedy, with the prompt format of the training data (``inference.json``). Several
``genai-int4-adapter`` exports of one base model are served by one process on one int4 base: each under its run's
config name (or ``--model NAME=DIR``), chosen with ``--adapter`` or, in a batch, per row (field ``adapter``).
Input files: ``.jsonl`` with a ``text`` field per row, or plain text with one input per line. The batch flow writes
``{"text", "prediction"}`` lines atomically (default ``<input>.predictions.jsonl``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow, task

from tasks.common.files import write_jsonl
from tasks.deploy.runtime import openvino, predict, qnn


def answer(model: str | list[str], texts: list[str], max_new_tokens: int | None = None,
           adapter: str | list[str | None] | None = None) -> list[str]:
    """``tasks.deploy.runtime.predict.predict``, or for ``openvino-npu`` exports ``NPUPredictor`` (``load_npu``),
    for a ``qnn-npu`` export ``QNNPredictor`` (the device either runs on is printed to stderr)."""
    models = model if isinstance(model, list) else [model]
    folders = [predict.split_model_arg(m)[1] for m in models]
    if len(models) == 1 and qnn.is_qnn_export(folders[0]):
        predictor = qnn.QNNPredictor(folders[0])
    elif all(map(openvino.is_openvino_export, folders)):
        predictor = openvino.load_npu(models)
    else:
        return predict.predict(model, texts, max_new_tokens, adapter)
    print(f"{', '.join(models)}: {predictor.device}", file=sys.stderr)
    return predictor(list(texts), max_new_tokens, adapter)


predict_task = task(answer, name="predict")


@flow(name="batch-predict")
def batch_predict(model: str | list[str], input_file: str, output_file: str | None = None,
                  max_new_tokens: int | None = None, adapter: str | None = None) -> dict:
    """Answer every input of ``input_file`` with the exported model in ``model`` (or the adapter exports listed:
    ``tasks.deploy.runtime.predict.load``), each row with its ``adapter`` field or else ``adapter``; write
    ``output_file``.

    Returns:
        ``{"output": path, "n": inputs answered, "seconds": wall time of the predict task}``.
    """
    requests = predict.read_requests(input_file)
    texts = [text for text, _ in requests]
    start = time.perf_counter()
    answers = predict_task(model, texts, max_new_tokens, [name or adapter for _, name in requests])
    output = Path(output_file or Path(input_file).with_suffix(".predictions.jsonl"))
    write_jsonl(output, [{"text": t, "prediction": a} for t, a in zip(texts, answers)])
    return {"output": str(output), "n": len(texts), "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None, prog: str = "python -m flows.predict") -> int:
    """CLI: print one answer per text, or run ``batch_predict`` on ``--input``; exit 1 with one line on error."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, action="append", metavar="[NAME=]DIR",
                   help="an exported genai-*, openvino-npu or qnn-npu folder (outputs/<run>/onnx/genai-int4); "
                        "repeat it for several genai-int4-adapter exports of one base model, served by one process")
    p.add_argument("--adapter", help="the adapter to answer with (its run's config name, or NAME of --model)")
    p.add_argument("texts", nargs="*", help="input texts, answered one per line")
    p.add_argument("--input", help="a .jsonl (field 'text') or text file (one input per line): batch flow")
    p.add_argument("--output", help="where the batch flow writes its .jsonl (default <input>.predictions.jsonl)")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the export's)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    args = p.parse_args(argv)
    if bool(args.texts) == bool(args.input):
        p.error("give either texts or --input FILE")
    try:
        for spec in args.model:  # a wrong folder fails here, in one line, before any flow starts
            folder = predict.split_model_arg(spec)[1]
            if openvino.is_openvino_export(folder):
                openvino.npu_info(folder)  # its files are hashed when it is loaded, as check_model_dir's are
            elif qnn.is_qnn_export(folder):
                qnn.check_qnn_folder(folder)
            else:
                predict.check_model_dir(folder)
        models = args.model if len(args.model) > 1 else args.model[0]
        if args.input:
            predict.read_inputs(args.input)  # bad input fails here, in one line, before any flow starts
            print(batch_predict(models, args.input, args.output, args.max_new_tokens, args.adapter)["output"])
        else:
            for text in answer(models, args.texts, args.max_new_tokens, args.adapter):
                print(text)
    except Exception as e:  # noqa: BLE001 - one line per failure unless --debug
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
