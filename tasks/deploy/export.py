"""export: ONNX for CPU/NPU inference, gated on parity with the merged PyTorch model before it is published — the
top layer of ``tasks/deploy``: it builds with ``builders/`` (the GenAI model builder, the int4 base), writes with
``formats/`` (the adapter file and its bake) and measures through ``runtime/`` (what serves the folder), none of
which imports this module.

Targets (``export.targets``):

| target | built with | precision | execution provider it runs on |
|---|---|---|---|
| ``genai-int4-adapter`` | int4 base (``builders/int4_base.py``), LoRA baked in | int4 + LoRA | GenAI CPU |
| ``onnx-fp32`` | ONNX Runtime GenAI model builder ``-p fp32 -e cpu`` (KV cache) | fp32 | ORT GenAI CPU |
| ``genai-int4`` | ONNX Runtime GenAI model builder ``-p int4 -e cpu`` (MatMulNBits) | int4 weights | ORT GenAI CPU |
| ``genai-fp16`` | model builder ``-p fp16 -e cuda`` | fp16 | ORT GenAI CUDA (needs onnxruntime-genai-cuda) |
| ``openvino-npu`` | optimum-intel, NNCF (``builders/openvino.py``) | first passing ``npu_weights`` | OV GenAI NPU |
| ``openvino-npu-adapter`` | the NPU base (``npu-base`` stage) + the PEFT adapter | ``npu_adapter_weights`` | same |
| ``qnn-npu`` | static QDQ ONNX + EPContext (``builders/qnn.py``) | first passing ``qnn_weights`` | QNN HTP (CPU here) |

The adapter target ships exactly what the pipeline measured when training ran on the int4 base's de-quantized
weights (``export.match_quantization``): the merged model the evaluation scored is that base plus the adapter.
Its folder is a whole GenAI model (the base with the adapter's weights as constants, ``export.adapter_weights``:
what the gate measures and what one model is served with) and also holds the adapter file alone, which
``tasks/deploy/runtime/predict.py`` serves beside other adapters on one shared base.
The other folders hold the tokenizer, its chat template and ``inference.json`` (the prompt format), so every
folder runs with ``tasks/deploy/runtime/predict.py`` alone. ``onnx-fp32`` was optimum's exporter until
optimum-onnx (whose newest release caps transformers below 4.58) was dropped for transformers 5; the model
builder's fp32 graph is the same decoder with a KV cache. NPUs: the model builder (0.18) offers no NPU execution
provider; ``openvino-npu`` is the NPU target: an OpenVINO IR served by ``tasks/deploy/runtime/openvino.py`` on
the NPU's static-shape pipeline (on the CPU where there is no NPU, as the gate runs it here), its prompt window fixed
at export (``export.npu_max_prompt_len``). ``qnn-npu`` is the Qualcomm NPU target: a static QDQ model that
``tasks/deploy/runtime/qnn.py`` serves with ONNX Runtime (the QNN HTP provider on a Snapdragon; the CPU provider
elsewhere, as the gate scores it) and its graph compiled for ``export.qnn_soc_model``; its gate also answers
``export.qnn_emulator_rows`` test rows on the QNN HTP emulator and compares them with the CPU provider's.

Before publishing, ``check_export`` measures the folder as its runtime loads it; the stage fails (and
publishes nothing) unless:

- **tokenizer round-trip**: every test prompt, rendered by the folder's chat template and encoded by the
  folder's tokenizer, gives the same token ids as the training tokenizer;
- **greedy agreement**: on the first ``n_check_prompts`` test prompts, at least ``min_greedy_agreement`` of the
  greedy continuations (``max_new_tokens`` tokens) equal PyTorch fp32's token for token;
- **quality**: the primary metric (accuracy, or ROUGE-L for generation) on the test split is at most
  ``max_quality_drop`` below the merged PyTorch model's on the same rows.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from configs.base import ConfigError
from configs.export import ExportConfig
from tasks.base_model import load_model, load_tokenizer
from tasks.common.chat import prompt_ids, tokenize_with_completion_mask
from tasks.common.files import atomic_dir, read_json, read_jsonl, write_json
from tasks.common.metrics import extract_answer, normalise_answer, score, task_kind
from tasks.deploy.builders import BuildError
from tasks.deploy.builders.genai import build_genai_folder, int4_options, quiet_loggers
from tasks.deploy.builders.openvino import DATA_AWARE, build_openvino_folder, write_npu_adapter
from tasks.deploy.formats.adapter import bake_adapter, convert_adapter
from tasks.deploy.runtime.openvino import NPU_INFO, NPUPredictor, is_openvino_export, npu_manifest
from tasks.deploy.runtime.predict import INFERENCE_FILE, Predictor, answer_in_processes
from tasks.deploy.runtime.qnn import QNNPredictor, is_qnn_export

log = logging.getLogger(__name__)


class ExportCheckError(RuntimeError):
    """The exported model failed the tokenizer, greedy-agreement or quality check."""


class ExportResult(BaseModel):
    """What ``export`` returns and writes as ``export.json`` (without ``path``): ``check_export``'s figures — the
    task's quality metrics and ``reference_<primary metric>`` as further fields — and what was built."""

    model_config = ConfigDict(extra="allow")

    tokenizer_mismatches: int
    greedy_agreement: float
    n_check_prompts: int
    same_answer: float  # fraction of test rows where the exported and the merged model's answers are equal
    n_examples: int
    eval_seconds: float
    target: str
    precision: str
    execution_provider: str
    size_mb: float  # MB of the folder
    export_seconds: float
    base: str | None = None  # genai-int4-adapter, openvino-npu-adapter: the base folder the adapter runs on
    ladder: list[dict] | None = None  # genai-ladder, openvino-npu: what each rung tried measured (rung, passed, ...)
    device: str | None = None  # openvino-npu, qnn-npu: where the gate ran the model
    emulator: dict | None = None  # qnn-npu: the QNN HTP emulator check (rows, agreement, device, seconds)
    path: str | None = None  # the published folder


@dataclass(frozen=True)
class Target:
    tool: str  # "genai" (the ONNX Runtime GenAI model builder), "ladder", "adapter" (tasks/deploy/formats/adapter.py)
    # or "openvino" (tasks/deploy/builders/openvino.py, a ladder of export.npu_weights)
    precision: str
    builder_ep: str | None  # the model builder's --execution_provider
    provider: str  # the onnxruntime execution provider the exported model runs on


# export.ladder's rungs, smallest first: the model builder's precision and int4 algorithm
RUNGS = {"int4": ("int4", {"algo_config": "default"}),  # RTN int4 everywhere
         "int4-int8-head": ("int4", {"algo_config": "k_quant_last"}),  # int8 LM head and embeddings
         "int4-mixed": ("int4", {"algo_config": "k_quant_mixed"}),  # int8 head + the most sensitive layers
         "fp32": ("fp32", {})}

TARGETS = {
    "genai-int4-adapter": Target("adapter", "int4", "cpu", "CPUExecutionProvider"),
    "genai-ladder": Target("ladder", "smallest passing", "cpu", "CPUExecutionProvider"),
    "onnx-fp32": Target("genai", "fp32", "cpu", "CPUExecutionProvider"),
    "genai-int4": Target("genai", "int4", "cpu", "CPUExecutionProvider"),
    "genai-fp16": Target("genai", "fp16", "cuda", "CUDAExecutionProvider"),
    "openvino-npu": Target("openvino", "smallest passing", None, "OpenVINO NPU"),
    "openvino-npu-adapter": Target("npu-adapter", "NPU base + LoRA", None, "OpenVINO NPU"),
    "qnn-npu": Target("qnn", "smallest passing", None, "QNNExecutionProvider (HTP)"),
}


def export(target: str, merged_model: str, test_file: str, reference_eval: str, inference: dict,
           cfg: ExportConfig, out_dir: str | Path, trust_remote_code: bool = False, adapter: str | None = None,
           int4_base: str | None = None, npu_base: str | None = None) -> ExportResult:
    """Export ``merged_model`` as ``target`` (see the module table) into ``out_dir``, check it, then publish.

    Args:
        reference_eval: the merged model's evaluation folder (``metrics.json`` + ``predictions.jsonl`` on
            ``test_file``), the baseline of the quality check.
        inference: ``{"name", "task", "system_prompt", "prompt_template", "max_new_tokens"}``, written to the
            folder's ``inference.json`` (the prompt format ``tasks/deploy/runtime/predict.py`` rebuilds).
        adapter, int4_base: ``genai-int4-adapter`` only: the PEFT adapter folder that was merged, and the int4
            base's GenAI folder (``tasks.deploy.builders.int4_base.export_base``'s ``onnx``) it is converted for.
        npu_base: ``openvino-npu-adapter`` only (with ``adapter``): the NPU base folder
            (``tasks.deploy.builders.openvino.export_npu_base``) the adapter runs on.

    Returns:
        ``ExportResult``.

    Raises:
        ExportCheckError: a check failed; nothing is written to ``out_dir``.
        ConfigError: the target needs a runtime this machine lacks (``genai-fp16`` without CUDA).
        UnsupportedArchitectureError: a ``genai-*`` target for an architecture the model builder has no builder
            for (a ValueError; README.md, Model families).
        ValueError: ``genai-int4-adapter`` without ``adapter`` and ``int4_base``, or ``openvino-npu-adapter``
            without ``adapter`` and ``npu_base``.
        tasks.deploy.runtime.adapters.AdapterError: the adapter does not fit the int4 base.
    """
    spec = TARGETS[target]
    inference = with_label_token_ids(inference, merged_model, trust_remote_code)
    if spec.tool == "adapter" and not (adapter and int4_base):
        raise ValueError("export genai-int4-adapter needs the adapter folder and the int4 base folder")
    if spec.tool == "npu-adapter" and not (adapter and npu_base):
        raise ValueError("export openvino-npu-adapter needs the adapter folder and the NPU base folder")
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        if spec.tool in ("ladder", "openvino", "qnn"):
            rungs, build = rung_builder(target, merged_model, test_file, cfg, trust_remote_code,
                                        inference["max_new_tokens"])
            result, ladder = climb_ladder(target, rungs, build, merged_model, tmp, inference, test_file,
                                          reference_eval, cfg, trust_remote_code)
            built, precision = sum(r.get("build_seconds", 0) for r in ladder), ladder[-1]["rung"]
        else:
            precision = build_target(target, merged_model, test_file, cfg, tmp, trust_remote_code, adapter,
                                     int4_base, npu_base)
            write_json(tmp / INFERENCE_FILE, inference)
            built, ladder = time.perf_counter() - start, None
            result = check_export(target, tmp, merged_model, test_file, reference_eval, cfg, trust_remote_code)
        result = ExportResult(**result, target=target, precision=precision, execution_provider=spec.provider,
                              size_mb=folder_mb(tmp), export_seconds=round(built, 1), base=int4_base or npu_base,
                              ladder=ladder)
        write_json(tmp / "export.json", result.model_dump(mode="json", exclude={"path"}))
    log.info("export %s: %s", target, result.model_dump_json(exclude={"path"}))
    return result.model_copy(update={"path": str(out_dir)})


def build_target(target: str, merged_model: str, test_file: str, cfg: ExportConfig, out: Path,
                 trust_remote_code: bool = False, adapter: str | None = None, int4_base: str | None = None,
                 npu_base: str | None = None) -> str:
    """Build a target that is not a ladder into ``out`` (see ``export`` for the arguments); return the precision
    ``export.json`` names."""
    spec = TARGETS[target]
    if spec.tool == "adapter":
        convert_adapter(adapter, int4_base, out)
        with quiet_loggers("onnxruntime"):  # its quantizer logs every node
            bake_adapter(out, int4_base, cfg.adapter_weights)
        return f"int4 + {cfg.adapter_weights} LoRA"
    if spec.tool == "npu-adapter":
        write_npu_adapter(adapter, npu_base, out, npu_window(cfg, merged_model, test_file, trust_remote_code))
        return f"{cfg.npu_adapter_weights} + LoRA"
    build_genai(merged_model, out, spec, cfg, trust_remote_code)
    return spec.precision


def with_label_token_ids(inference: dict, merged_model: str, trust_remote_code: bool = False) -> dict:
    """``inference`` with ``label_token_ids`` (``{label: answer token ids}``, ``tasks.common.chat.answer_ids`` with
    the training tokenizer) when it names ``labels``: the folder then answers along their tree, as the evaluation
    did (the gate checks that the folder's tokenizer encodes as the training one)."""
    if not inference.get("labels"):
        return inference
    from tasks.common.chat import answer_ids

    return inference | {"label_token_ids": answer_ids(load_tokenizer(merged_model, trust_remote_code),
                                                      inference["labels"])}


def folder_mb(folder: Path) -> float:
    """MB of the files directly in ``folder``."""
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6, 1)


def rung_builder(target: str, merged_model: str, test_file: str, cfg: ExportConfig, trust_remote_code: bool = False,
                 answer_tokens: int = 0) -> tuple[list[str], Callable[[str, Path], None]]:
    """The rungs a laddered target tries, in order, and what builds one rung into a folder: ``export.ladder``'s
    model-builder precisions (``RUNGS``) for ``genai-ladder``; ``export.npu_weights`` (``NPU_WEIGHTS``) for
    ``openvino-npu``, each with ``npu.json`` (its prompt window, ``npu_window``, and the files' SHA-256);
    ``export.qnn_weights`` (``QNN_WEIGHTS``) for ``qnn-npu`` (``qnn_rung_builder``; ``answer_tokens``: the
    prompt format's answer length, which its window must hold)."""
    if target == "qnn-npu":
        return list(cfg.qnn_weights), qnn_rung_builder(merged_model, test_file, cfg, answer_tokens,
                                                       trust_remote_code)
    if target == "genai-ladder":
        def build(rung: str, folder: Path) -> None:
            precision, options = RUNGS[rung]
            options = {**int4_options(cfg), **options} if precision == "int4" else {}
            build_genai_folder(merged_model, folder, precision, "cpu", trust_remote_code, options)

        return list(cfg.ladder), build
    window = npu_window(cfg, merged_model, test_file, trust_remote_code)
    texts = None
    if any(rung in DATA_AWARE for rung in cfg.npu_weights):  # chat-formatted train rows, prompt and answer
        tokenizer = load_tokenizer(merged_model, trust_remote_code)
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in calibration_rows(cfg, test_file)]

    def build_npu(rung: str, folder: Path) -> None:
        build_openvino_folder(merged_model, folder, rung, trust_remote_code, texts)
        write_json(folder / NPU_INFO, npu_manifest(folder, window))

    return list(cfg.npu_weights), build_npu


def npu_window(cfg: ExportConfig, merged_model: str, test_file: str, trust_remote_code: bool = False) -> int:
    """The NPU export's static prompt window in tokens: ``export.npu_max_prompt_len``, or when that is None the
    longest test prompt (chat template applied), doubled for longer inputs in use and rounded up to a multiple of
    64."""
    if cfg.npu_max_prompt_len:
        return cfg.npu_max_prompt_len
    tokenizer = load_tokenizer(merged_model, trust_remote_code)
    longest = max(len(prompt_ids(tokenizer, r)) for r in read_jsonl(test_file))
    return -(-2 * longest // 64) * 64


def qnn_rung_builder(merged_model: str, test_file: str, cfg: ExportConfig, answer_tokens: int,
                     trust_remote_code: bool = False) -> Callable[[str, Path], None]:
    """What builds one ``qnn-npu`` rung into a folder (``tasks.deploy.builders.qnn.build_qnn_folder``): the static
    fp32 graph is exported once, on the first call, at ``qnn_window``; calibration on ``calibration_rows``, prompt
    and answer token ids, cut to the window."""
    import tempfile

    from tasks.deploy.builders.qnn import build_qnn_folder, export_static

    tokenizer = load_tokenizer(merged_model, trust_remote_code)
    window = qnn_window(cfg, tokenizer, test_file, answer_tokens)
    rows = calibration_rows(cfg, test_file)
    calibration = [ids[:window] for ids, _ in tokenize_with_completion_mask(tokenizer, rows)]
    graph = tempfile.TemporaryDirectory(prefix="qnn-fp32-")  # removed with the closure

    def build(rung: str, folder: Path) -> None:
        fp32 = Path(graph.name) / "model.onnx"
        if not fp32.is_file():
            export_static(merged_model, fp32, window, trust_remote_code)
        build_qnn_folder(merged_model, fp32, folder, rung, calibration, window, cfg.qnn_soc_model,
                         cfg.qnn_htp_arch, trust_remote_code)

    return build


def calibration_rows(cfg: ExportConfig, test_file: str) -> list[dict]:
    """``export.calibration_rows`` records spread evenly over the train split beside ``test_file`` (``train.jsonl``,
    as ``tasks.stages.split`` writes the splits): what calibrates a data-aware quantization."""
    train = read_jsonl(Path(test_file).with_name("train.jsonl"))
    return train[:: max(1, len(train) // cfg.calibration_rows)][: cfg.calibration_rows]


def qnn_window(cfg: ExportConfig, tokenizer, test_file: str, answer_tokens: int) -> int:
    """The ``qnn-npu`` static window in tokens: ``export.qnn_context_len``, or when that is None the longest test
    prompt (chat template applied by ``tokenizer``, the training one) plus the longest answer it must hold
    (``answer_tokens``, the prompt format's ``max_new_tokens``, or the greedy check's ``export.max_new_tokens``),
    rounded up to a multiple of 64."""
    if cfg.qnn_context_len:
        return cfg.qnn_context_len
    longest_prompt = max(len(prompt_ids(tokenizer, r)) for r in read_jsonl(test_file))
    return -(-(longest_prompt + max(answer_tokens, cfg.max_new_tokens)) // 64) * 64


def climb_ladder(target: str, rungs: list[str], build: Callable[[str, Path], None], merged_model: str, out: Path,
                 inference: dict, test_file: str, reference_eval: str, cfg: ExportConfig,
                 trust_remote_code: bool = False) -> tuple[dict, list[dict]]:
    """Build (``build(rung, folder)``) and measure the ``rungs`` in order, each in a folder of its own under
    ``out``, until one passes the gate; move that one's files into ``out``. A rung that cannot be built
    (``BuildError``: e.g. a hidden size the group size does not divide) is recorded as failed.

    Returns:
        ``(the passing rung's measure_export figures, [{"rung", "size_mb", "build_seconds", "passed",
        <primary metric>, "same_answer", "greedy_agreement", "failures"} per rung tried (only "rung", "passed"
        and "failures" for one that could not be built); the last one passed])``.

    Raises:
        ExportCheckError: no rung passed; names each rung's failed checks.
    """
    primary, tried = task_kind(read_json(Path(reference_eval) / "metrics.json")["task"]).primary, []
    for rung in rungs:
        folder = out / f".rung-{rung}"
        start = time.perf_counter()
        try:
            build(rung, folder)
        except BuildError as e:
            tried.append({"rung": rung, "passed": False, "failures": [str(e)]})
            log.info("export %s: %s", target, tried[-1])
            shutil.rmtree(folder, ignore_errors=True)
            continue
        write_json(folder / INFERENCE_FILE, inference)
        built = round(time.perf_counter() - start, 1)
        figures, failures = measure_export(target, folder, merged_model, test_file, reference_eval, cfg,
                                           trust_remote_code)
        tried.append({"rung": rung, "size_mb": folder_mb(folder), "build_seconds": built, "passed": not failures,
                      primary: figures[primary], "same_answer": figures["same_answer"],
                      "greedy_agreement": figures["greedy_agreement"], "failures": failures}
                     | ({"emulator_agreement": figures["emulator"]["agreement"]} if "emulator" in figures else {}))
        log.info("export %s: %s", target, tried[-1])
        if not failures:
            for path in folder.iterdir():
                path.rename(out / path.name)
            folder.rmdir()
            return figures, tried
        shutil.rmtree(folder)
    raise ExportCheckError(f"export {target}: no rung passed the gate: " +
                           " | ".join(f"{t['rung']}: {'; '.join(t['failures'])}" for t in tried))


def build_genai(merged_model: str, out: Path, spec: Target, cfg: ExportConfig, trust_remote_code: bool) -> None:
    """The ONNX Runtime GenAI model builder on the merged folder (``build_genai_folder``) with ``cfg``'s int4
    options for an int4 target."""
    import onnxruntime_genai as og

    if spec.builder_ep == "cuda" and not og.is_cuda_available():
        raise ConfigError(f"export.targets: {spec.precision} for CUDA needs onnxruntime-genai-cuda and a GPU; "
                           "this machine has neither (use genai-int4 for CPU)")
    options = int4_options(cfg) if spec.precision == "int4" else {}
    build_genai_folder(merged_model, out, spec.precision, spec.builder_ep, trust_remote_code, options)


def check_export(target: str, folder: str | Path, merged_model: str, test_file: str, reference_eval: str,
                 cfg: ExportConfig, trust_remote_code: bool = False) -> dict:
    """``measure_export``'s figures if the gate passes.

    Raises:
        ExportCheckError: naming every failed check with its figures.
    """
    result, failures = measure_export(target, folder, merged_model, test_file, reference_eval, cfg,
                                      trust_remote_code)
    if failures:
        raise ExportCheckError(f"export {target}: " + "; ".join(failures))
    return result


def measure_export(target: str, folder: str | Path, merged_model: str, test_file: str, reference_eval: str,
                   cfg: ExportConfig, trust_remote_code: bool = False) -> tuple[dict, list[str]]:
    """Measure the exported ``folder`` against the merged PyTorch model (see the module doc for the gate).

    Returns:
        ``({"tokenizer_mismatches": int, "greedy_agreement": float, "n_check_prompts": int, <primary metric>:
        float, "reference_<primary metric>": float, "same_answer": fraction of test rows where the exported
        and the merged model's normalised answers are equal, "n_examples": int, "eval_seconds": float}`` plus
        the task's other quality metric, ``[one line per failed check, with its figures]``).
    """
    records = read_jsonl(test_file)
    reference = read_json(Path(reference_eval) / "metrics.json")
    ref_predictions = [r["prediction"] for r in read_jsonl(Path(reference_eval) / "predictions.jsonl")]
    task = reference["task"]  # the kind the reference evaluation scored (tasks.stages.evaluate.evaluate)
    primary = task_kind(task).primary
    tokenizer = load_tokenizer(merged_model, trust_remote_code)
    expected = [prompt_ids(tokenizer, r) for r in records]
    runner = ExportRunner(folder)

    mismatched = [i for i, r in enumerate(records) if runner.prompt_ids(r["messages"][:-1]) != expected[i]]
    agreement = greedy_agreement(runner, merged_model, expected[: cfg.n_check_prompts], cfg.max_new_tokens,
                                 tokenizer.eos_token_id, trust_remote_code)
    n = min(len(records), cfg.max_eval_examples or len(records))
    start = time.perf_counter()
    answers = runner.answers(expected[:n], reference["max_new_tokens"])
    seconds = time.perf_counter() - start
    references = [r["messages"][-1]["content"] for r in records[:n]]
    scores, ref_scores = score(task, answers, references), score(task, ref_predictions[:n], references)
    norm = normalise_answer if task == "classification" else (lambda text: extract_answer(text, None))
    same = sum(norm(a) == norm(b) for a, b in zip(answers, ref_predictions)) / n
    result = {"tokenizer_mismatches": len(mismatched), "greedy_agreement": agreement,
              "n_check_prompts": min(cfg.n_check_prompts, len(records)), **scores,
              f"reference_{primary}": ref_scores[primary], "same_answer": same, "n_examples": n,
              "eval_seconds": round(seconds, 1)} | ({"device": runner.device} if runner.device else {})

    failures = []
    if isinstance(runner.predictor, QNNPredictor):
        result["emulator"] = emulator = emulator_check(folder, expected[: cfg.qnn_emulator_rows],
                                                       answers[: cfg.qnn_emulator_rows], reference["max_new_tokens"])
        if emulator["agreement"] < cfg.min_greedy_agreement:
            failures.append(f"the QNN HTP emulator answered {emulator['agreement']:.2f} of {emulator['rows']} test "
                            f"rows as the CPU provider did (rows {emulator['differ']} differ), below "
                            f"export.min_greedy_agreement={cfg.min_greedy_agreement:g}")
    if mismatched:
        failures.append(f"tokenizer: {len(mismatched)}/{len(records)} test prompts encode to other token ids "
                        f"than the training tokenizer's (first: test row {mismatched[0] + 1})")
    if agreement < cfg.min_greedy_agreement:
        failures.append(f"greedy agreement with PyTorch {agreement:.2f} on {result['n_check_prompts']} prompts is "
                        f"below export.min_greedy_agreement={cfg.min_greedy_agreement:g}")
    drop = ref_scores[primary] - scores[primary]
    if drop > cfg.max_quality_drop:
        failures.append(f"{primary} {scores[primary]:.4f} on {n} test rows is {drop:.4f} below the merged "
                        f"model's {ref_scores[primary]:.4f} (export.max_quality_drop={cfg.max_quality_drop:g})")
    return result, failures


def emulator_check(folder: str | Path, prompts: list[list[int]], cpu_answers: list[str],
                   max_new_tokens: int) -> dict:
    """Answer ``prompts`` with the ``qnn-npu`` folder's EPContext model on the QNN HTP backend (its emulator here:
    ``QNNPredictor(backend="htp")``, CPU fallback disabled, so every node runs on QNN) and compare with
    ``cpu_answers`` (the CPU provider's, same prompts).

    Returns:
        ``{"rows", "agreement": fraction of equal answers, "differ": [1-based rows that differ], "device",
        "seconds"}``.

    Raises:
        tasks.deploy.runtime.qnn.QNNExportError: the HTP backend cannot load the EPContext model.
    """
    start = time.perf_counter()
    htp = QNNPredictor(folder, backend="htp")
    answers = [htp.answer(p, max_new_tokens) for p in prompts]
    differ = [i + 1 for i, (a, b) in enumerate(zip(answers, cpu_answers)) if a != b]
    result = {"rows": len(prompts), "agreement": 1 - len(differ) / max(len(prompts), 1), "differ": differ,
              "device": htp.device, "seconds": round(time.perf_counter() - start, 1)}
    log.info("export qnn-npu: emulator %s", result)
    return result


def greedy_agreement(runner, merged_model: str, prompts: list[list[int]], max_new_tokens: int, eos: int,
                     trust_remote_code: bool = False) -> float:
    """Fraction of ``prompts`` whose greedy continuations (up to ``max_new_tokens``, end-of-sequence token
    excluded) from ``runner`` and from the merged PyTorch model in fp32 are the same token ids."""
    model = load_model(merged_model, trust_remote_code)
    same = [runner.greedy(p, max_new_tokens) == _until_eos(torch_greedy(model, p, max_new_tokens, eos), eos)
            for p in prompts]
    log.info("export: greedy agreement with PyTorch %d/%d", sum(same), len(same))
    return sum(same) / max(len(same), 1)


def torch_greedy(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy continuation of one prompt by a transformers model: new ids only."""
    import torch

    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


class ExportRunner:
    """An exported folder as its runtime serves it, with its own chat template and tokenizer: a ``genai-*`` folder
    through ``tasks.deploy.runtime.predict.Predictor``, an ``openvino-npu`` one through
    ``tasks.deploy.runtime.openvino.NPUPredictor``, a ``qnn-npu`` one through
    ``tasks.deploy.runtime.qnn.QNNPredictor`` on the CPU provider; ``device`` says where the last two run (None
    for the first)."""

    def __init__(self, folder: str | Path):
        self.predictor = (NPUPredictor(folder) if is_openvino_export(folder) else
                          QNNPredictor(folder, backend="cpu") if is_qnn_export(folder) else Predictor(folder))
        self.device = getattr(self.predictor, "device", None)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.predictor.prompt_ids(messages)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        return self.predictor.generate_ids(prompt, max_new_tokens)

    def answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """The folder's answers as it serves them (``Predictor.answer``: constrained to its labels when its
        ``inference.json`` has them), in order: a GenAI folder's over the CPUs' single-threaded worker processes,
        each sharing the prompts' common prefix (``tasks.deploy.runtime.predict.answer_in_processes``; right-padded
        batches were slower on the CPU provider, docs/benchmarks.md), an NPU folder's one at a time."""
        return answer_in_processes(self.predictor, prompts, max_new_tokens, desc="export gate: test rows")
