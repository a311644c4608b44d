"""Training memory model: the peak memory of one training process, predicted from the config, checked against
measured peaks.

    python benchmarks/memory_model.py --model llama-3.1-8b --tokens 2048 --targets 8 --set lora.method=qlora \
        [--set train.frozen_dtype=bfloat16 ...]
    python benchmarks/memory_model.py --check docs/gpu-check/<run>/results.json [--out FILE.md]

Peak = frozen weights + trained state + activations and transients, in bytes:

- **frozen weights**, from the config: every base weight at ``train.frozen_dtype``'s size (bf16 2 B, float32 4 B);
  QLoRA: the decoder layers' linear weights nf4 (0.5 B per weight plus the block absmax: one byte per 64 weights
  with double quantization and one float32 per 256 of those, else one float32 per 64; Dettmers et al. 2023, QLoRA,
  section 3), the rest (embedding, norms, LM head) at ``frozen_dtype``;
- **trained state**, from the config: each trained parameter (LoRA's A and B: ``lora.r`` × (in + out) per adapted
  linear layer; every weight for method ``full``), its gradient, AdamW's two moments (Kingma & Ba 2015;
  ``torch.optim.AdamW`` keeps them in the parameter's dtype) and one temporary of its foreach update: 5 × 4 B in
  float32, 5 × 2 B for QLoRA, whose adapters TRL casts to bf16 (QLoRA paper, section 3);
- **activations and transients** (what autograd keeps for the backward, the logits at the completion targets,
  the backward's gradients, recomputation under gradient checkpointing, the optimizer's temporaries), *measured*
  on the CPU where nothing is known in closed form: ``step_peak`` runs real training steps of the architecture at
  its true width but one and two decoder layers deep, at two sequence lengths and two numbers of targets
  (``profile``: five runs, seconds to minutes on a CPU for an 8B architecture), and ``predict`` extrapolates:
  linear in tokens (SDPA's flash / memory-efficient kernels and the CPU's flash kernel keep no tokens × tokens
  matrix; the ``eager`` kernel does, and is not modelled), linear in targets (the LM head runs only at the
  completion targets, ``tasks/common/loss.py``), and each further layer adds what the second one did.

Measured peaks are counted by ``LiveBytes``: every tensor storage an operator creates, until it is freed — the
quantity ``torch.cuda.max_memory_allocated`` reports on a GPU, on any device. What the model leaves out: the CUDA
context and the caching allocator's fragmentation (``max_memory_allocated`` counts neither either), kernels that
keep different tensors on a GPU than on the CPU (Liger's; bitsandbytes' 4-bit matmul, whose layers are measured with
``frozen_dtype`` weights standing in: on CUDA, past 1,536 rows, bitsandbytes 0.50 dequantizes one weight at a time
to a transient bf16 copy, at most 0.11 GiB for Llama-3.1-8B's MLP), padded batches (the baseline arm of
``train_throughput.py``: full logits), and model loading: transformers' loader first allocates one block to warm
CUDA's caching allocator (``caching_allocator_warmup``; in 5.5 the size of the loaded weights, below the training
peak; in 4.x ¼ of the empty model's float32 bytes as float16, which alone set the process peak of the 2026-11-28 8B
QLoRA step, reproduced to the byte by ``docs/gpu-check/2026-11-28-h200/loading_warmup.py``).
tests/test_memory_model.py checks the prediction against full-depth measurements at toy widths on the CPU;
``--check`` against the training peaks the GPU check measured (``largest batch`` of each step's ours arm: its tokens
and targets).
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from configs.schema import load_config  # noqa: E402

GIB = 2**30
STATE_COPIES = 5  # parameter, gradient, AdamW's two moments, the foreach update's temporary: in the adapter's dtype


def adapter_bytes(method: str) -> int:
    """Bytes per trained value: float32, but TRL casts a 4-bit base's adapters to bf16 (QLoRA, section 3)."""
    return 2 if method == "qlora" else 4


@dataclass
class Prediction:
    """Predicted peak memory of a training process, by part, in bytes (``total`` their sum): the frozen weights and
    the trained state from the config; the rest (activations kept for the backward, logits, the backward's and the
    optimizer's temporaries) from the measured profile."""

    frozen_weights: int
    trained_state: int
    activations_and_transient: int

    @property
    def total(self) -> int:
        return self.frozen_weights + self.trained_state + self.activations_and_transient

    def gib(self) -> dict:
        """Each part and the total in GiB, rounded to 0.001."""
        return {**{k: round(v / GIB, 3) for k, v in asdict(self).items()}, "total": round(self.total / GIB, 3)}


@dataclass
class Profile:
    """Measured peaks (bytes, ``LiveBytes``) of training steps of the architecture at its true width, one and two
    decoder layers deep: ``peaks[(layers, tokens, targets)]``."""

    peaks: dict
    tokens: tuple[int, int]
    targets: tuple[int, int]


def linear_shapes(config) -> list[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of one Llama-family decoder layer's linear layers (the names peft's
    ``all-linear`` targets)."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


def targeted(name: str, target_modules) -> bool:
    """Whether peft's ``target_modules`` (``"all-linear"`` or a list of names) adapts the linear layer ``name``."""
    return target_modules == "all-linear" or name in target_modules


def weight_counts(config) -> tuple[int, int]:
    """``(linear, other)``: the decoder layers' linear weights and every other weight (embedding, norms, an untied
    LM head), counted from the config."""
    h, layers = config.hidden_size, config.num_hidden_layers
    linear = layers * sum(a * b for _, a, b in linear_shapes(config))
    embed = config.vocab_size * h
    other = embed * (1 if config.tie_word_embeddings else 2) + layers * 2 * h + h
    return linear, other


def nf4_bytes(weights: int, double_quant: bool) -> float:
    """Bytes of ``weights`` stored as bitsandbytes nf4 with block size 64 (QLoRA, Dettmers et al. 2023)."""
    absmax = weights / 64 * (1 + 4 / 256) if double_quant else weights / 64 * 4
    return weights / 2 + absmax


def frozen_weight_bytes(config, method: str, frozen: str, double_quant: bool = True) -> int:
    """The frozen base weights' bytes (``frozen``: "bfloat16" or "float32"; method full: none are frozen)."""
    linear, other = weight_counts(config)
    size = 2 if frozen == "bfloat16" else 4
    if method == "full":
        return 0
    if method == "qlora":
        return int(nf4_bytes(linear, double_quant) + other * size)
    return (linear + other) * size


def trained_parameters(config, method: str, r: int, target_modules) -> int:
    """Parameters trained: LoRA's ``r`` × (in + out) per adapted linear layer, or every weight (method full)."""
    if method == "full":
        return sum(weight_counts(config))
    per_layer = sum(r * (a + b) for name, a, b in linear_shapes(config) if targeted(name, target_modules))
    return config.num_hidden_layers * per_layer


def step_peak(config, method: str, r: int, lora_alpha: float, lora_dropout: float, target_modules, frozen: str,
              checkpointing: bool, layers: int, tokens: int, targets: int, steps: int = 2) -> int:
    """Peak live tensor bytes (``LiveBytes``) of ``steps`` training steps of a ``layers``-layer model of ``config``'s
    architecture at its true width, on the CPU, built inside the count: ``frozen`` weights (qlora: they stand in
    for the nf4 linear weights; ``predict`` swaps the bytes), the adapters (float32) with their dropout, bf16
    autocast, gradient checkpointing as ``checkpointing`` (non-reentrant, as training runs it; QLoRA's input
    gradients on, as peft's ``prepare_model_for_kbit_training`` turns them on), one row of
    ``tokens`` tokens whose last ``targets`` are completion targets, the loss of ``tasks/common/loss.py``, torch's
    AdamW. The peak is that of the training steps, with everything built before them still live (model loading's
    own peak is not modelled)."""
    import copy

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.common.loss import completion_logits, cross_entropy

    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    if getattr(small, "layer_types", None):
        small.layer_types = small.layer_types[:layers]
    dtype = torch.bfloat16 if frozen == "bfloat16" else torch.float32
    with LiveBytes() as live:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small, dtype=dtype, attn_implementation="sdpa")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if checkpointing or method == "qlora":
            model.enable_input_require_grads()
        if method != "full":
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                use_dora=method == "dora", task_type="CAUSAL_LM"))
            for p in model.parameters():  # as peft and TRL leave them (``adapter_bytes``)
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16 if method == "qlora" else torch.float32)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (1, tokens))
        labels = torch.full((1, tokens), -100)
        labels[0, -targets:] = ids[0, -targets:]
        live.peak = live.live  # training's peak from here: building the model can peak higher (its initialisation)
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, target_ids, _ = completion_logits(
                    model, {"input_ids": ids, "position_ids": torch.arange(tokens)[None]}, labels)
                loss = cross_entropy(logits, target_ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return live.peak


def profile(config, method: str, r: int, lora_alpha: float, lora_dropout: float, target_modules, frozen: str,
            checkpointing: bool, tokens: tuple[int, int] = (256, 512), targets: tuple[int, int] = (8, 64)) -> Profile:
    """``step_peak`` one and two layers deep at two sequence lengths, and one layer deep at a second number of
    targets: the five measurements ``predict`` extrapolates from (seconds on a CPU for an 8B architecture)."""
    runs = [(layers, t, targets[0]) for layers in (1, 2) for t in tokens] + [(1, tokens[0], targets[1])]
    return Profile(peaks={run: step_peak(config, method, r, lora_alpha, lora_dropout, target_modules, frozen,
                                         checkpointing, *run) for run in runs},
                   tokens=tokens, targets=targets)


def predict(config, *, method: str, r: int, lora_alpha: float, lora_dropout: float, target_modules, frozen: str,
            tokens: int, targets: int, checkpointing: bool, double_quant: bool = True,
            measured: Profile | None = None) -> Prediction:
    """Predicted peak of a training step over a micro-batch of ``tokens`` tokens (every row's, pads included) of
    which ``targets`` are completion targets, for the transformers ``config`` (see the module docstring). The
    total is the measured profile extrapolated, with the frozen weights' bytes swapped for nf4 under QLoRA; its
    split into parts takes the weights and the trained state from the config and leaves the rest to activations.

    Args:
        method: "lora", "dora", "qlora" or "full"; ``frozen``: "bfloat16" or "float32" (``train.frozen_dtype``).
        measured: a ``profile`` of this configuration to reuse (it does not depend on ``tokens`` or ``targets``).
    """
    measured = measured or profile(config, method, r, lora_alpha, lora_dropout, target_modules, frozen,
                                   checkpointing)
    (t0, t1), (k0, k1), peak = measured.tokens, measured.targets, measured.peaks

    def depth(layers):  # the peak at ``tokens``, straight through the two sequence lengths
        at = {t: peak[(layers, t, k0)] for t in (t0, t1)}
        return at[t0] + (at[t1] - at[t0]) * (tokens - t0) / (t1 - t0)

    per_layer = depth(2) - depth(1)
    per_target = (peak[(1, t0, k1)] - peak[(1, t0, k0)]) / (k1 - k0)
    whole = depth(1) + (config.num_hidden_layers - 1) * per_layer + (targets - k0) * per_target
    weights = frozen_weight_bytes(config, method, frozen, double_quant)
    state = trained_parameters(config, method, r, target_modules) * STATE_COPIES * adapter_bytes(method)
    as_measured = frozen_weight_bytes(config, "lora" if method == "qlora" else method, frozen)
    return Prediction(frozen_weights=weights, trained_state=state,
                      activations_and_transient=int(whole - as_measured - state))


class LiveBytes:
    """Peak live tensor bytes in this process while the context is open: a ``TorchDispatchMode`` that counts every
    storage an operator creates until it is freed (what ``torch.cuda.max_memory_allocated`` counts on a GPU,
    for any device). Storages created before the context are not counted."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        counter = self
        counter.live = counter.peak = 0
        seen = WeakIdKeyDictionary()

        def free(n):
            counter.live -= n

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        storage = t.untyped_storage()
                        if storage not in seen:
                            seen[storage] = n = storage.nbytes()
                            counter.live += n
                            counter.peak = max(counter.peak, counter.live)
                            weakref.finalize(storage, free, n)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def architecture(name: str):
    """The transformers config of ``train_throughput.py``'s ``--model``: a published Llama config, or a model
    folder's."""
    from transformers import AutoConfig, LlamaConfig

    from benchmarks.train_throughput import LLAMA_CONFIGS

    if name in LLAMA_CONFIGS:
        return LlamaConfig(**LLAMA_CONFIGS[name])
    return AutoConfig.from_pretrained(name)


def training_shape(cfg, settings: dict | None = None) -> dict:
    """The memory-relevant settings of a training run: ``cfg``'s LoRA fields, and frozen dtype and gradient
    checkpointing as the run resolved them (``settings``, a ``train.json``-like record) or as they resolve on a GPU.
    A record without ``frozen_dtype`` predates it: the base was float32 then."""
    from tasks.stages.train import frozen_dtype, gradient_checkpointing

    settings = settings or {}
    ckpt = settings.get("gradient_checkpointing", gradient_checkpointing(cfg.lora, cfg.train))
    frozen = settings.get("frozen_dtype") or ("float32" if settings else
                                              frozen_dtype(cfg.train.frozen_dtype, cfg.lora.method, True, "cuda"))
    return {"method": settings.get("method", cfg.lora.method), "r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha,
            "lora_dropout": cfg.lora.lora_dropout, "target_modules": cfg.lora.target_modules, "frozen": frozen,
            "checkpointing": bool(ckpt)}


def step_case(step: dict) -> dict | str:
    """What ``--check`` needs from one GPU-check step record: the measured peak of its ours arm, the model, the
    training shape and the largest micro-batch; or why the step cannot be checked."""
    import re
    import shlex

    figures = step.get("figures", {})
    ours = figures.get("ours")
    if not ours or step.get("status") != "ok":
        return "no ours arm measured"
    words = shlex.split(step["command"])
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    model = words[words.index("--model") + 1]
    batch = figures.get("largest batch (ours)")
    if batch:
        tokens, targets = (int(n) for n in re.findall(r"\d+", batch)[:2])
        assumed = ""
    elif "--seq-len" in words and "train.per_device_train_batch_size=1" in sets:
        tokens, targets = int(words[words.index("--seq-len") + 1]), ASSUMED_TARGETS
        assumed = f"batch 1 of --seq-len tokens; {ASSUMED_TARGETS} targets assumed (not recorded)"
    else:
        return "its largest batch was not recorded (GPU checks before 2026-12-07)"
    cfg = load_config(ROOT / "configs" / "banking77.yaml", ["export.enabled=false", *sets])
    settings = json.loads(figures.get("settings (ours)") or "null")
    training_peak = figures.get("training peak (ours)")  # GPU checks from 2026-12-07: model loading excluded
    measured = training_peak or re.search(r"peak ([\d.]+ GiB)", ours).group(1)
    return {"model": model, "tokens": tokens, "targets": targets, "assumed": assumed,
            "measured_gib": float(measured.split()[0]), "measured": "training" if training_peak else "process",
            "shape": training_shape(cfg, settings)}


ASSUMED_TARGETS = 8  # a banking77 label's tokens and end of turn, where a step did not record its targets


def check(results: Path) -> list[dict]:
    """Predict the peak of every measured ours arm in a GPU check's ``results.json``; one row per step with the
    measured and predicted GiB and the error (%) against the training peak, or, where only the process's peak was
    recorded (GPU checks before 2026-12-07), whether the prediction stays within that upper bound
    (``within_bound``: an error would measure model loading, not the model); or the reason a step is not checked
    (a CPU dry run's peaks are the process's RSS, not tensor bytes: not comparable)."""
    data = json.loads(results.read_text())
    if data["mode"] != "GPU":
        raise SystemExit(f"{results}: a {data['mode']}: its peaks are RSS, not tensor bytes; nothing to check")
    rows, profiles = [], {}
    for step in data["steps"]:
        if "command" not in step or step["step"] == "cuda-oom-retry":
            continue
        case = step_case(step)
        if isinstance(case, str):
            rows.append({"step": step["step"], "not checked": case})
            continue
        key = (case["model"], json.dumps(case["shape"], sort_keys=True))
        config = architecture(case["model"])
        if key not in profiles:
            profiles[key] = profile(config, **case["shape"])
        got = predict(config, **case["shape"], tokens=case["tokens"], targets=case["targets"], measured=profiles[key])
        row = {"step": step["step"], "shape": case["shape"], "tokens": case["tokens"], "targets": case["targets"],
               "assumed": case["assumed"], "measured_gib": case["measured_gib"], "measured": case["measured"],
               "predicted": got.gib()}
        if case["measured"] == "training":
            row["error_pct"] = round(100 * (got.total / GIB / case["measured_gib"] - 1), 1)
        else:  # the process's peak bounds the training's from above; model loading can set it alone (module doc)
            row["within_bound"] = got.total / GIB <= case["measured_gib"]
        rows.append(row)
    return rows


def check_table(rows: list[dict], results: Path) -> str:
    """``check``'s rows as a Markdown table."""
    lines = [f"# Memory model against {results}", "", "Predicted by `benchmarks/memory_model.py --check` on "
             f"{cpu()}; measured: `torch.cuda.max_memory_allocated` of each step's ours arm, from its first "
             "training step (GPU checks before 2026-12-07: of the whole process, model loading included).", "",
             "| step | settings | largest batch | measured GiB | predicted GiB (weights + trained state + "
             "activations and transients) | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "not checked" in r:
            lines.append(f"| {r['step']} | | | | not checked: {r['not checked']} | |")
            continue
        s, p = r["shape"], r["predicted"]
        settings = (f"{s['method']} r{s['r']}, frozen {s['frozen']}, gradient checkpointing "
                    f"{'on' if s['checkpointing'] else 'off'}")
        batch = f"{r['tokens']} tokens, {r['targets']} targets" + (f" ({r['assumed']})" if r["assumed"] else "")
        measured = f"{r['measured_gib']:.2f}" + (" (model loading included)" if r["measured"] == "process" else "")
        verdict = (f"{r['error_pct']:+.1f} %" if "error_pct" in r else
                   "within the bound (the process's peak; not an error)" if r["within_bound"] else
                   "above the process's peak: a miss")
        lines.append(f"| {r['step']} | {settings} | {batch} | {measured} | {p['total']:.2f} = "
                     f"{p['frozen_weights']:.2f} + {p['trained_state']:.2f} + {p['activations_and_transient']:.2f} "
                     f"| {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "banking77.yaml"))
    parser.add_argument("--set", action="append", default=[], help="config override, as in flows.finetune")
    parser.add_argument("--model", help="llama-3.2-1b | llama-3.1-8b | a model folder")
    parser.add_argument("--tokens", type=int, help="tokens in the largest micro-batch")
    parser.add_argument("--targets", type=int, help="completion target tokens in it")
    parser.add_argument("--check", help="a GPU check's results.json: predict each measured peak")
    parser.add_argument("--out", help="with --check: also write the table to this Markdown file")
    args = parser.parse_args()
    if args.check:
        table = check_table(check(Path(args.check)), Path(args.check))
        print(table)
        if args.out:
            Path(args.out).write_text(table)
        return
    if not (args.model and args.tokens and args.targets):
        parser.error("--model, --tokens and --targets (or --check)")
    cfg = load_config(args.config, ["export.enabled=false", *args.set])
    shape = training_shape(cfg)
    got = predict(architecture(args.model), **shape, tokens=args.tokens, targets=args.targets)
    print(json.dumps({"model": args.model, **shape, "tokens": args.tokens, "targets": args.targets,
                      "predicted_gib": got.gib(), "machine": cpu()}, indent=1))


if __name__ == "__main__":
    main()
