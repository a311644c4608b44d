"""export: ONNX for CPU/NPU inference, gated on parity with the merged PyTorch model before it is published.

Targets (``export.targets``):

| target | built with | precision | execution provider it runs on |
|---|---|---|---|
| ``genai-int4-adapter`` | int4 base (tasks/int4_base.py), LoRA baked in; ``.onnx_adapter`` | int4 + LoRA | GenAI CPU |
| ``onnx-fp32`` | ONNX Runtime GenAI model builder ``-p fp32 -e cpu`` (KV cache) | fp32 | ORT GenAI CPU |
| ``genai-int4`` | ONNX Runtime GenAI model builder ``-p int4 -e cpu`` (MatMulNBits) | int4 weights | ORT GenAI CPU |
| ``genai-fp16`` | model builder ``-p fp16 -e cuda`` | fp16 | ORT GenAI CUDA (needs onnxruntime-genai-cuda) |

The adapter target ships exactly what the pipeline measured when training ran on the int4 base's de-quantized
weights (``export.match_quantization``): the merged model the evaluation scored is that base plus the adapter.
Its folder is a whole GenAI model (the base with the adapter's weights as constants, ``export.adapter_weights``:
what the gate measures and what one model is served with) and also holds the adapter file alone, which
``tasks/predict.py`` serves beside other adapters on one shared base.
The other folders hold the tokenizer, its chat template and ``inference.json`` (the prompt format), so every
folder runs with ``tasks/predict.py`` alone. ``onnx-fp32`` was optimum's exporter until optimum-onnx (whose newest
release caps transformers below 4.58) was dropped for transformers 5; the model builder's fp32 graph is the same
decoder with a KV cache. NPUs: the model builder (0.18) offers no NPU execution
provider, so there is no NPU target here.

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

import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from configs.schema import ConfigError, ExportConfig
from tasks.base_model import load_model, load_tokenizer
from tasks.chat import prompt_ids
from tasks.files import atomic_dir, read_json, read_jsonl, write_json
from tasks.metrics import extract_answer, normalise_answer, score, task_kind
from tasks.onnx_adapter import bake_adapter, convert_adapter
from tasks.predict import INFERENCE_FILE, Predictor

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
    base: str | None = None  # genai-int4-adapter: the int4 base folder the adapter runs on
    ladder: list[dict] | None = None  # genai-ladder: what each rung tried measured (rung, size_mb, passed, ...)
    path: str | None = None  # the published folder


@dataclass(frozen=True)
class Target:
    tool: str  # "genai" (the ONNX Runtime GenAI model builder), "ladder" or "adapter" (tasks/onnx_adapter.py)
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
}


def export(target: str, merged_model: str, test_file: str, reference_eval: str, inference: dict,
           cfg: ExportConfig, out_dir: str | Path, trust_remote_code: bool = False, adapter: str | None = None,
           int4_base: str | None = None) -> ExportResult:
    """Export ``merged_model`` as ``target`` (see the module table) into ``out_dir``, check it, then publish.

    Args:
        reference_eval: the merged model's evaluation folder (``metrics.json`` + ``predictions.jsonl`` on
            ``test_file``), the baseline of the quality check.
        inference: ``{"name", "task", "system_prompt", "prompt_template", "max_new_tokens"}``, written to the
            folder's ``inference.json`` (the prompt format ``tasks/predict.py`` rebuilds).
        adapter, int4_base: ``genai-int4-adapter`` only: the PEFT adapter folder that was merged, and the int4
            base's GenAI folder (``tasks.int4_base.export_base``'s ``onnx``) it is converted for.

    Returns:
        ``ExportResult``.

    Raises:
        ExportCheckError: a check failed; nothing is written to ``out_dir``.
        ConfigError: the target needs a runtime this machine lacks (``genai-fp16`` without CUDA).
        UnsupportedArchitectureError: a ``genai-*`` target for an architecture the model builder has no builder
            for (a ValueError; README.md, Model families).
        ValueError: ``genai-int4-adapter`` without ``adapter`` and ``int4_base``.
        tasks.onnx_adapter.AdapterError: the adapter does not fit the int4 base.
    """
    spec = TARGETS[target]
    if spec.tool == "adapter" and not (adapter and int4_base):
        raise ValueError("export genai-int4-adapter needs the adapter folder and the int4 base folder")
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        if spec.tool == "ladder":
            result, ladder = climb_ladder(merged_model, tmp, inference, test_file, reference_eval, cfg,
                                          trust_remote_code)
            built, precision = sum(r["build_seconds"] for r in ladder), ladder[-1]["rung"]
        else:
            if spec.tool == "adapter":
                convert_adapter(adapter, int4_base, tmp)
                with _quiet_loggers("onnxruntime"):  # its quantizer logs every node
                    bake_adapter(tmp, int4_base, cfg.adapter_weights)
            else:
                build_genai(merged_model, tmp, spec, cfg, trust_remote_code)
            write_json(tmp / INFERENCE_FILE, inference)
            built, precision, ladder = time.perf_counter() - start, spec.precision, None
            if spec.tool == "adapter":
                precision = f"int4 + {cfg.adapter_weights} LoRA"
            result = check_export(target, tmp, merged_model, test_file, reference_eval, cfg, trust_remote_code)
        result = ExportResult(**result, target=target, precision=precision, execution_provider=spec.provider,
                              size_mb=folder_mb(tmp), export_seconds=round(built, 1), base=int4_base, ladder=ladder)
        write_json(tmp / "export.json", result.model_dump(mode="json", exclude={"path"}))
    log.info("export %s: %s", target, result.model_dump_json(exclude={"path"}))
    return result.model_copy(update={"path": str(out_dir)})


def folder_mb(folder: Path) -> float:
    """MB of the files directly in ``folder``."""
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6, 1)


def climb_ladder(merged_model: str, out: Path, inference: dict, test_file: str, reference_eval: str,
                 cfg: ExportConfig, trust_remote_code: bool = False) -> tuple[dict, list[dict]]:
    """Build and measure the rungs of ``export.ladder`` (``RUNGS``) in order, each in a folder of its own under
    ``out``, until one passes the gate; move that one's files into ``out``.

    Returns:
        ``(the passing rung's measure_export figures, [{"rung", "size_mb", "build_seconds", "passed",
        <primary metric>, "same_answer", "greedy_agreement", "failures"} per rung tried; the last one passed])``.

    Raises:
        ExportCheckError: no rung passed; names each rung's failed checks.
    """
    primary, tried = task_kind(read_json(Path(reference_eval) / "metrics.json")["task"]).primary, []
    for rung in cfg.ladder:
        folder, (precision, options) = out / f".rung-{rung}", RUNGS[rung]
        start = time.perf_counter()
        options = {**int4_options(cfg), **options} if precision == "int4" else {}
        build_genai_folder(merged_model, folder, precision, "cpu", trust_remote_code, options)
        write_json(folder / INFERENCE_FILE, inference)
        built = round(time.perf_counter() - start, 1)
        figures, failures = measure_export("genai-ladder", folder, merged_model, test_file, reference_eval, cfg,
                                           trust_remote_code)
        tried.append({"rung": rung, "size_mb": folder_mb(folder), "build_seconds": built, "passed": not failures,
                      primary: figures[primary], "same_answer": figures["same_answer"],
                      "greedy_agreement": figures["greedy_agreement"], "failures": failures})
        log.info("export genai-ladder: %s", tried[-1])
        if not failures:
            for path in folder.iterdir():
                path.rename(out / path.name)
            folder.rmdir()
            return figures, tried
        shutil.rmtree(folder)
    raise ExportCheckError("export genai-ladder: no rung passed the gate: " +
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


def int4_options(cfg: ExportConfig) -> dict:
    """The model builder's int4 ``extra_options`` from ``cfg`` (onnxruntime-genai >= 0.18 names; it ignores the
    old ``int4_*`` names without a word, so ``check_quantization`` reads the result back from the graph)."""
    return {"algo_config": cfg.int4_algo_config, "block_size": cfg.int4_block_size,
            "accuracy_level": cfg.int4_accuracy_level, "is_symmetric": cfg.int4_is_symmetric}


def build_genai_folder(model: str, out: Path, precision: str, execution_provider: str, trust_remote_code: bool,
                       options: dict) -> None:
    """The ONNX Runtime GenAI model builder (``parse_extra_options``, then ``create_model``, of
    ``onnxruntime_genai.models.builder``) on ``model``, offline (no Hub token; remote code only if configured),
    with ``options`` as its ``extra_options`` (a list value is joined with commas), then ``check_quantization``
    and ``portable_tokenizer``.

    Raises:
        UnsupportedArchitectureError: the builder has no builder for the model's architecture.
        BuilderOptionsError: the built graph's precisions are not what ``options`` asked for.
    """
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    options = {"hf_token": "false", "hf_remote": trust_remote_code, **options}
    pairs = [f"{key}={','.join(value) if isinstance(value, list) else value}" for key, value in options.items()]
    noise = io.StringIO()  # the builder's per-tensor bar and warnings: kept out of the run's output
    with tempfile.TemporaryDirectory() as cache, BuilderProgress(model, precision) as progress, \
            contextlib.redirect_stdout(progress), contextlib.redirect_stderr(noise), \
            _quiet_loggers("onnx_ir", "onnxruntime", "neural_compressor"):
        try:
            parsed = parse_extra_options(None, model, str(out), precision, execution_provider, cache, pairs)
            flat_rope_for_gemma3(parsed["hf_details"]["hf_config"])
            create_model(None, model, str(out), precision, execution_provider, cache, **parsed)
        except NotImplementedError as e:  # "The <folder> model is not currently supported."
            raise UnsupportedArchitectureError(
                f"export: the ONNX Runtime GenAI model builder ({_genai_version()}) has no builder for "
                f"{', '.join(_architectures(model))} ({e}); genai-* targets cannot export this model (README.md, "
                "Model families)") from e
    check_quantization(out / "model.onnx", precision, options)
    portable_tokenizer(out / "tokenizer.json")


def flat_rope_for_gemma3(config) -> None:
    """Give onnxruntime-genai 0.18's Gemma 3 builder the RoPE fields it reads, in place: transformers 5 keeps Gemma
    3's RoPE parameters per layer type (``rope_parameters = {"full_attention": {...}, "sliding_attention":
    {...}}``), the builder reads transformers 4's flat ``rope_parameters``, ``rope_theta`` and
    ``rope_local_base_freq`` (``builders/gemma.py: Gemma3Model``; a ``KeyError: 'rope_type'`` otherwise). The flat
    form is the full-attention layers' parameters, the sliding layers' theta as ``rope_local_base_freq``. Other
    architectures, and a Gemma 3 config already flat, are left alone; the export gate checks the built model."""
    params = getattr(config, "rope_parameters", None)
    if (config.architectures or [None])[0] != "Gemma3ForCausalLM" or not isinstance(params, dict) \
            or "full_attention" not in params:
        return
    config.rope_local_base_freq = params["sliding_attention"]["rope_theta"]
    config.rope_theta = params["full_attention"]["rope_theta"]
    config.rope_parameters = dict(params["full_attention"])


class BuilderOptionsError(RuntimeError):
    """The model builder built another graph than its options asked for (an option it does not know is ignored
    without a word: onnxruntime-genai 0.18 dropped the ``int4_*`` names)."""


# algo_config values that keep the LM head (the last MatMul) in int8 (the builder's legacy compound names)
INT8_HEAD_ALGOS = ("k_quant_last", "k_quant_mixed", "rtn_last", "k_quant_linear")


def quantized_matmuls(model_onnx: str | Path) -> dict[str, dict]:
    """The weight-only quantized MatMuls of a built graph (read without its external data): ``{node name:
    {"bits", "block_size", "accuracy_level"}}`` for every ``MatMulNBits`` node; float MatMuls are absent."""
    import onnx

    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    return {node.name: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                        if a.name in ("bits", "block_size", "accuracy_level")}
            for node in graph.node if node.op_type == "MatMulNBits"}


def check_quantization(model_onnx: Path, precision: str, options: dict) -> None:
    """Check the built graph against the options that shape it: at fp32/fp16 no MatMulNBits; at int4 every 4-bit
    MatMul has ``block_size`` and ``accuracy_level``, every node of ``nodes_to_exclude`` stayed a float MatMul, and
    an ``algo_config`` that keeps the LM head in int8 did so.

    Raises:
        BuilderOptionsError: naming the first options the graph does not follow.
    """
    nodes, problems = quantized_matmuls(model_onnx), []
    if precision != "int4":
        problems += [f"{len(nodes)} MatMulNBits nodes in an {precision} model"] if nodes else []
    else:
        for key in ("block_size", "accuracy_level"):
            off = sorted(n for n, a in nodes.items() if key in options and a.get("bits") == 4
                         and a.get(key) != int(options[key]))
            problems += [f"{key}={options[key]} but {off[0]} has {nodes[off[0]].get(key)}"] if off else []
        excluded = options.get("nodes_to_exclude") or []
        quantized = [name for name in excluded if any(n.startswith(f"{name}_Q") or n == name for n in nodes)]
        problems += [f"nodes_to_exclude lists {quantized[0]}, which was quantized"] if quantized else []
        head = next((a for n, a in nodes.items() if n.startswith("/lm_head/MatMul")), None)
        if options.get("algo_config") in INT8_HEAD_ALGOS and (head or {}).get("bits") != 8:
            problems.append(f"algo_config={options['algo_config']} but the LM head is "
                            f"{'float' if head is None else str(head.get('bits')) + '-bit'}")
    if problems:
        raise BuilderOptionsError(f"export: the model builder ({_genai_version()}) ignored its options: "
                                  f"{'; '.join(problems)} ({model_onnx})")


class UnsupportedArchitectureError(ValueError):
    """The ONNX Runtime GenAI model builder has no builder for the model's architecture (``config.json``'s
    ``architectures``): a ``genai-*`` target can never export it. A ValueError: permanent, never retried."""


def _architectures(model: str | Path) -> list[str]:
    """``architectures`` of ``model``'s ``config.json`` (["unknown architecture"] without one)."""
    return model_config(model).get("architectures") or ["unknown architecture"]


def model_config(model: str | Path) -> dict:
    """``model``'s ``config.json`` as a dict; {} when ``model`` is not a folder with one (e.g. a Hub id)."""
    config = Path(model) / "config.json"
    return read_json(config) if config.is_file() else {}


def _genai_version() -> str:
    from importlib.metadata import version

    return f"onnxruntime-genai {version('onnxruntime-genai')}"


class BuilderProgress(io.TextIOBase):
    """A progress bar (tqdm, on the process's stderr) for the ONNX Runtime GenAI model builder, driven by the
    lines it prints to stdout: one step per ``BUILDER_STEPS`` line ("Reading decoder layer 3", "Saving ONNX
    model in ...": int4 quantization runs after that one). The total is the model's ``num_hidden_layers`` plus
    the other steps; other lines are dropped. Use as the target of ``contextlib.redirect_stdout``."""

    def __init__(self, model: str | Path, precision: str):
        self.model, self.precision, self.pending = model, precision, ""

    def __enter__(self) -> BuilderProgress:
        from tqdm.auto import tqdm

        layers = model_config(self.model).get("num_hidden_layers")
        self.bar = tqdm(total=layers + len(BUILDER_STEPS) - 1 if isinstance(layers, int) else None,
                        desc=f"{self.precision} builder", unit="step", file=sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            step = next((step for prefix, step in BUILDER_STEPS.items() if line.startswith(prefix)), None)
            if step:
                self.bar.set_description(f"{self.precision} builder: {step}")
                self.bar.update()
        return len(text)


# the builder's stdout lines that mark a step (onnxruntime_genai/models/builders/base.py), and what the bar shows
BUILDER_STEPS = {"Reading embedding layer": "embedding", "Reading decoder layer": "decoder layers",
                 "Reading final norm": "final norm", "Reading LM head": "LM head",
                 "Saving ONNX model": "quantizing and saving the model", "Saving GenAI config": "genai_config.json",
                 "Saving processing files": "tokenizer files"}


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Only errors from these loggers while the builder runs: the quantizer logs every layer, and onnx_ir warns
    "the model is invalid" about the shared int8 embedding mid-build (the finished model loads; the gate runs it)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def portable_tokenizer(path: Path) -> None:
    """Rewrite a byte-level BPE ``tokenizer.json`` that carries a SentencePiece-style decoder into the plain
    byte-level form, in place.

    transformers' GGUF conversion (the embedded SmolLM2) emits a byte-level BPE with ``byte_fallback`` and a
    ``ByteFallback, Fuse, Replace("▁", " "), ByteLevel`` decoder chain; ONNX Runtime Extensions (GenAI's
    tokenizer) then takes it for a SentencePiece BPE and encodes every space and newline as id -1. With a
    ByteLevel pre-tokenizer every byte is already a vocabulary symbol, so neither byte fallback nor the
    ``▁`` replacement ever applies and the plain form encodes identically (``check_export`` verifies the ids
    on every test prompt).
    """
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre, decoder = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if decoder.get("type") != "Sequence" or not any(s.get("type") == "ByteLevel" for s in steps):
        return
    spec["model"]["byte_fallback"] = False
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


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
    task = reference["task"]  # the kind the reference evaluation scored (tasks.evaluate.evaluate)
    primary = task_kind(task).primary
    tokenizer = load_tokenizer(merged_model, trust_remote_code)
    expected = [prompt_ids(tokenizer, r) for r in records]
    runner = GenAIRunner(folder)

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
              "eval_seconds": round(seconds, 1)}

    failures = []
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


class GenAIRunner:
    """A ``genai-*`` folder through ``tasks.predict.Predictor``: its own chat template and tokenizer."""

    def __init__(self, folder: str | Path):
        self.predictor = Predictor(folder)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.predictor.prompt_ids(messages)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        return self.predictor.generate_ids(prompt, max_new_tokens)

    def answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        from tqdm.auto import tqdm

        # one sequence at a time: onnxruntime-genai 0.11 takes no left padding, and right-padded batches were
        # slower on the CPU provider (docs/benchmarks.md)
        return [self.predictor.decode(self.greedy(p, max_new_tokens))
                for p in tqdm(prompts, desc="export gate: test rows", unit="row", file=sys.stderr)]
