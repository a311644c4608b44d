"""The ``openvino-npu`` (or ``qnn-npu``) export of a finished run, built and gated as the export stage does it: every
rung of ``export.npu_weights`` (``export.qnn_weights``) tried, each measured on the test rows through the NPU's
static pipeline (the QDQ model on ONNX Runtime's CPU provider) on the CPU where there is no NPU — not an NPU figure —
against the evaluated model; prints the ladder and the published form's figures (for ``qnn-npu`` also the QNN HTP
emulator's check).

    python benchmarks/npu_export.py --run outputs/<run> --out /tmp/npu [--set export.npu_weights=[int8]] ...
    python benchmarks/npu_export.py --run outputs/<run> --out /tmp/npu --adapter-form [--set ...]
    python benchmarks/npu_export.py --run outputs/<run> --out /tmp/qnn --target qnn-npu [--set ...]

``--run`` is a run folder of ``python -m flows.finetune`` (its ``merged/``, ``data/test.jsonl``,
``eval/finetuned/`` and an ``onnx/<target>/inference.json`` for the prompt format and label set). The export
settings are ``ExportConfig``'s defaults with ``--set export.<field>=<value>`` overrides. ``--adapter-form``
exports ``openvino-npu-adapter`` instead: the NPU base of the model the adapter was trained on (its
``adapter_config.json``'s ``base_model_name_or_path``) at ``export.npu_adapter_weights``, then the run's adapter on
it. Then
``benchmarks/onnx_decode.py --run outputs/<run> --npu <out>/openvino-npu`` times its decoding beside the run's
GenAI exports.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu  # noqa: E402
from configs.export import ExportConfig  # noqa: E402
from tasks.deploy.builders.openvino import export_npu_base  # noqa: E402
from tasks.deploy.export import export  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="where the export folder is written")
    p.add_argument("--target", choices=["openvino-npu", "qnn-npu"], default="openvino-npu")
    p.add_argument("--set", action="append", default=[], metavar="export.FIELD=VALUE")
    p.add_argument("--adapter-form", action="store_true", help="openvino-npu-adapter: the adapter on an NPU base")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # each rung as it is tried
    fields = {}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key.removeprefix("export.")] = yaml.safe_load(value)
    cfg = ExportConfig(**fields)
    inference = json.loads(next((args.run / "onnx").glob("*/inference.json")).read_text())
    start, form, target = time.perf_counter(), {}, args.target
    if args.adapter_form:
        adapter = (args.run / "adapter").resolve()
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        npu_base = export_npu_base(base, cfg.npu_adapter_weights, args.out / "npu-base")
        print(f"NPU base of {base}: {time.perf_counter() - start:.0f} s")
        form, target = {"adapter": str(adapter), "npu_base": npu_base}, "openvino-npu-adapter"
    result = export(target, str(args.run / "merged"), str(args.run / "data" / "test.jsonl"),
                    str(args.run / "eval" / "finetuned"), inference, cfg, args.out / target, **form)
    print(f"machine: {cpu()}; {time.perf_counter() - start:.0f} s in all")
    print("| rung | passed | accuracy | same answer | greedy agreement | size (MB) | build (s) | failures |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result.ladder or []:
        print(f"| {r['rung']} | {r['passed']} | {r.get('accuracy', '')} | {r.get('same_answer', '')} | "
              f"{r.get('greedy_agreement', '')} | {r.get('size_mb', '')} | {r.get('build_seconds', '')} | "
              f"{'; '.join(r['failures'])} |")
    print(result.model_dump_json(indent=2, exclude={"ladder"}))


if __name__ == "__main__":
    main()
