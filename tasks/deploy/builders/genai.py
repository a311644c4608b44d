"""The ONNX Runtime GenAI model builder, run offline on a transformers folder and checked: its options as 0.18 names
them (``int4_options``), its progress as a bar, its output read back from the graph (``check_quantization``: 0.18
ignores unknown option names without a word), and the refusal of an architecture it has no builder for.

Every graph is built with the builder's ``prune_lm_head``: the LM head runs on the last position only, so a prefill
of S prompt tokens computes one row of logits instead of S (the runtime reads only the last; ~13 % of a 26-token
banking77 prefill on SmolLM2-135M, docs/benchmarks.md). The logits output is ``[batch, 1, vocab]``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
from pathlib import Path

from configs.export import ExportConfig
from tasks.common.files import read_json
from tasks.deploy.formats.tokenizer import portable_tokenizer

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

    options = {"hf_token": "false", "hf_remote": trust_remote_code, "prune_lm_head": "true", **options}
    pairs = [f"{key}={','.join(value) if isinstance(value, list) else value}" for key, value in options.items()]
    noise = io.StringIO()  # the builder's per-tensor bar and warnings: kept out of the run's output
    with tempfile.TemporaryDirectory() as cache, BuilderProgress(model, precision) as progress, \
            contextlib.redirect_stdout(progress), contextlib.redirect_stderr(noise), \
            quiet_loggers("onnx_ir", "onnxruntime", "neural_compressor"):
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


def logits_positions(model_onnx: str | Path) -> int | str:
    """Dimension 1 of a built graph's ``logits`` output (read without its external data): 1 when the LM head is
    pruned to the last position, else the symbolic sequence length (a str)."""
    import onnx

    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    dim = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[1]
    return dim.dim_value if dim.HasField("dim_value") else dim.dim_param


def check_quantization(model_onnx: Path, precision: str, options: dict) -> None:
    """Check the built graph against the options that shape it: with ``prune_lm_head`` logits of one position; at
    fp32/fp16 no MatMulNBits; at int4 every 4-bit MatMul has ``block_size`` and ``accuracy_level``, every node of
    ``nodes_to_exclude`` stayed a float MatMul, and an ``algo_config`` that keeps the LM head in int8 did so.

    Raises:
        BuilderOptionsError: naming the first options the graph does not follow.
    """
    nodes, problems = quantized_matmuls(model_onnx), []
    if str(options.get("prune_lm_head")).lower() == "true" and (positions := logits_positions(model_onnx)) != 1:
        problems.append(f"prune_lm_head={options['prune_lm_head']} but the logits are [batch, {positions}, vocab]")
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
def quiet_loggers(*names: str):
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
