"""Training speed and memory: a plain Hugging Face baseline against this project's train task, side by side.

    python benchmarks/train_throughput.py --config configs/banking77.yaml --set data.path=../shared/data/banking77 \
        [--model embedded | llama-3.2-1b | llama-3.1-8b | <folder>] [--steps 20] [--rounds 2] [--seq-len N] \
        [--set lora.method=qlora ...] [--arms baseline,trl-loss,trl-padding-free,ours] [--tokenizer FOLDER] [--tiny]
        [--json FILE]

Both arms train the same model on the same training rows (the config's ingest + split), with the same LoRA
settings, learning rate, schedule, batch size, seed, precision and number of steps, then compute the loss on the
same validation rows:

- **baseline**: ``transformers.Trainer`` + ``peft.get_peft_model``, examples padded to the longest in each batch
  (``DataCollatorForSeq2Seq``), no packing, completion-only labels, the model as ``from_pretrained`` loads it;
- **ours**: ``tasks.stages.train.train`` exactly as the flow calls it (padding-free batches, attention kernel, Liger,
  QLoRA... as the config resolves them; the LM head only at completion targets, ``tasks/common/loss.py``);
- **trl-loss** (optional): ``ours`` with TRL's own ``SFTTrainer.compute_loss`` instead of ``tasks/common/loss.py``: TRL
  >= 1.15's fused LM head, which scores only the labelled positions on CUDA/XPU (Triton) and every position, in
  chunks, elsewhere (the CPU);
- **trl-padding-free** (optional): ``ours`` with TRL's own padding-free collator instead of
  ``tasks/common/padding_free.py``: each batch flattened into one row (``padding_free=True``), the attention mask
  built from the position ids.

Each arm runs in a fresh process (peak memory is per process: RSS on CPU, ``torch.cuda.max_memory_allocated`` on a
GPU; the arms that train through ``tasks/common/loss.py`` also record their largest micro-batch and, on a GPU,
their peak from the first training step on, model loading excluded: ``watch_training``), arms alternate order
round by round (baseline first in even rounds). Tokens/s = non-pad tokens trained /
training wall time (model loading and the validation pass excluded). MFU (GPU only) = 6·N·tokens/s over the GPU's
dense bf16 peak (N = all parameters; the 6N FLOPs per token of Kaplan et al. 2020 / PaLM's MFU; peaks from NVIDIA's
H100/H200 datasheets: 989.4 TFLOPS dense bf16 for SXM parts, 756 for H100 PCIe). With a frozen base, LoRA does
no weight-gradient matmuls (~4N FLOPs per token, +2N with gradient checkpointing), so 6N overstates the work by up
to 1.5x: the table prints the 6N figure, as asked, and the 4N one.

``--model llama-3.2-1b`` / ``llama-3.1-8b`` build random-initialised models from those models' published configs
(speed and memory do not depend on the weight values; no hub), with the embedded SmolLM2 tokenizer (its ids are
all below Llama-3's vocabulary size), or the one in ``--tokenizer``; ``--tiny`` shrinks those configs to 2 layers
of width 64 (the CPU dry run of ``benchmarks/gpu_check.sh``; no CPU matmul peak is measured, no MFU printed).
``--seq-len N`` makes every example ~N tokens long
(each user turn is the config's training queries joined) for the sequence-length memory figures. ``--json FILE``
also writes every round and the summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from configs.schema import FinetuneConfig, load_config  # noqa: E402
from tasks.common.files import read_json, write_json  # noqa: E402
from tasks.stages.split import SplitResult  # noqa: E402

# Published architecture configs (config.json of meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B).
LLAMA_CONFIGS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
# --tiny: the same architectures at toy width (a CPU smoke test of the GPU benchmark, not a figure)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)
# dense bf16 tensor-core peaks, FLOP/s (NVIDIA H100 / H200 datasheets; first matching name wins)
GPU_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12}


def model_folder(name: str, cache: Path, tokenizer_dir: str | None = None, tiny: bool = False) -> str:
    """A loadable folder for ``--model``: the embedded SmolLM2 (converted once), a random-initialised Llama
    config (built once, bf16, with ``tokenizer_dir``'s tokenizer or the embedded SmolLM2's; ``tiny``: at toy
    width), or a folder given as is."""
    if name not in LLAMA_CONFIGS and name != "embedded":
        return name
    tokenizer_dir = tokenizer_dir or smollm2_folder(cache)
    if name == "embedded":
        return tokenizer_dir
    folder = cache / f"random-{name}{'-tiny' if tiny else ''}"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from tasks.common.files import atomic_dir

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = LlamaConfig(**{**LLAMA_CONFIGS[name], **(TINY if tiny else {})},
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        start = time.perf_counter()
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: the 8B config is 16 GB, not 32
        try:
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        del model
        print(f"built and saved {folder.name} in {time.perf_counter() - start:.0f} s", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this process stays alive while the arms run
    return str(folder)


def smollm2_folder(cache: Path) -> str:
    """The embedded SmolLM2-135M-Instruct converted to a folder under ``cache`` (once)."""
    from tasks.base_model import convert_gguf, embedded_gguf

    smollm2 = cache / "SmolLM2-135M-Instruct-benchmark"
    if not (smollm2 / "config.json").is_file():
        convert_gguf(embedded_gguf(), smollm2)
    return str(smollm2)


def prepare_data(cfg: FinetuneConfig, out: Path, seq_len: int | None) -> SplitResult:
    """The config's ingest + split into ``out``; with ``seq_len``, training/validation user turns are the
    training queries joined until each example is about ``seq_len`` tokens (same answers)."""
    from tasks.common.files import read_jsonl, write_jsonl
    from tasks.stages.ingest import ingest
    from tasks.stages.split import split

    splits = split(ingest(cfg.data, out / "ingested"), cfg.split, out / "data")
    if seq_len:
        queries = [r["messages"][-2]["content"] for r in read_jsonl(splits.files["train"])]
        words_per_example = int(seq_len * 0.7)  # ~1.4 tokens per English word with these tokenizers
        words = " ".join(queries).split()
        for name in ("train", "validation"):
            rows = read_jsonl(splits.files[name])
            for i, row in enumerate(rows):
                start = (i * 97) % max(len(words) - words_per_example, 1)
                row["messages"][-2]["content"] = " ".join(words[start:start + words_per_example])
            write_jsonl(splits.files[name], rows)
    return splits


def run_ours(cfg: FinetuneConfig, base: str, splits: SplitResult, out: Path) -> dict:
    from tasks.stages.train import train

    result = train(base, splits, cfg.model, cfg.lora, cfg.train, out / "adapter", out / "checkpoints")
    history = read_json(out / "adapter" / "train_log.json")
    eval_seconds = sum(h.get("eval_runtime", 0.0) for h in history)
    return {"tokens": result.train_tokens, "train_seconds": result.wall_seconds - eval_seconds,
            "eval_loss": result.eval_loss, "steps": result.steps,
            "settings": result.model_dump(include={"method", "attn_implementation", "padding_free",
                                                   "gradient_checkpointing", "liger_kernel", "bf16", "frozen_dtype"})}


def run_trl_loss(cfg: FinetuneConfig, base: str, splits: SplitResult, out: Path) -> dict:
    """``run_ours`` with TRL's plain ``SFTTrainer`` (its own compute_loss: the fused LM head)."""
    import tasks.stages.train
    from trl import SFTTrainer

    tasks.stages.train.sft_trainer_class = lambda: SFTTrainer
    return run_ours(cfg, base, splits, out)


def run_trl_padding_free(cfg: FinetuneConfig, base: str, splits: SplitResult, out: Path) -> dict:
    """``run_ours`` with TRL's padding-free collator (each batch one row; ``max_length=None`` as TRL 1.x requires
    without packing: the examples are already within ``train.max_seq_length``) instead of
    ``tasks.common.padding_free``."""
    import dataclasses

    import tasks.stages.train

    resolve, arguments = tasks.stages.train.resolve_settings, tasks.stages.train.training_arguments
    tasks.stages.train.resolve_settings = lambda *a: dataclasses.replace(resolve(*a), collator="trl")
    tasks.stages.train.training_arguments = lambda *a: dataclasses.replace(arguments(*a), padding_free=True,
                                                                           max_length=None)
    return run_ours(cfg, base, splits, out)


def run_baseline(cfg: FinetuneConfig, base: str, splits: SplitResult, out: Path) -> dict:
    """Plain transformers.Trainer + peft, padded batches: what a Hugging Face tutorial does."""
    import peft
    import torch
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                              set_seed)

    from tasks.base_model import load_tokenizer, quantization_config, use_bf16
    from tasks.common.chat import tokenize_with_completion_mask
    from tasks.common.files import read_jsonl
    from tasks.stages.train import fit_to_length, gradient_checkpointing, peft_config

    t, lora = cfg.train, cfg.lora
    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"

    def dataset(name: str) -> list[dict]:
        records, _ = fit_to_length(tokenizer, read_jsonl(splits.files[name]), t.max_seq_length, t.overlength)
        rows = [(ids[:t.max_seq_length], ([-100] * p + ids[p:])[:t.max_seq_length])  # as TRL truncates
                for ids, p in tokenize_with_completion_mask(tokenizer, records)]
        return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels in rows]

    train_rows, eval_rows = dataset("train"), dataset("validation")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = quantization_config(lora) if lora.method == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=quantization,
                                                 device_map={"": device})
    checkpointing = gradient_checkpointing(lora, t)
    if quantization is not None:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    set_seed(t.seed)
    model = peft.get_peft_model(model, peft_config(lora))
    if quantization is not None:  # as TRL's SFTTrainer does on a 4-bit base (QLoRA paper: bf16 adapters)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    args = TrainingArguments(output_dir=str(out / "baseline"), learning_rate=t.learning_rate, max_steps=t.max_steps,
                             per_device_train_batch_size=t.per_device_train_batch_size,
                             per_device_eval_batch_size=t.per_device_eval_batch_size,
                             gradient_accumulation_steps=t.gradient_accumulation_steps,
                             lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio,
                             weight_decay=t.weight_decay, bf16=use_bf16(t.bf16), use_cpu=device == "cpu",
                             save_strategy="no", eval_strategy="no", logging_steps=t.logging_steps, seed=t.seed,
                             data_seed=t.seed, include_num_input_tokens_seen="non_padding", report_to="none",
                             dataloader_num_workers=0, remove_unused_columns=False,
                             gradient_checkpointing=checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": int(trainer.state.num_input_tokens_seen), "train_seconds": seconds,
            "eval_loss": trainer.evaluate()["eval_loss"], "steps": trainer.state.global_step}


def parameter_count(folder: str) -> int:
    """Parameters in a model folder's safetensors files (read from the headers)."""
    from safetensors import safe_open

    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def arm(args) -> None:
    """Run one arm in this process and print its figures as one ``RESULT {json}`` line."""
    import torch

    # no checkpoint inside the timed window (the baseline saves none) and one process: a like-for-like pair
    cfg = load_config(args.config, args.set + [f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}",
                                               f"train.save_steps={2 * args.steps}", "train.num_processes=1"])
    splits = SplitResult.model_validate(read_json(Path(args.work) / "splits.json"))
    run = {"baseline": run_baseline, "trl-loss": run_trl_loss, "trl-padding-free": run_trl_padding_free,
           "ours": run_ours}[args.arm]
    shapes, loading_peak = watch_training()
    result = run(cfg, args.base, splits, Path(args.work) / f"{args.arm}-{args.round}")
    if shapes:  # the arms that train through tasks/common/loss.py (benchmarks/memory_model.py --check reads them)
        result["max_batch_tokens"] = max(t for t, _ in shapes)
        result["max_batch_targets"] = max(k for _, k in shapes)
    result["tokens_per_second"] = result["tokens"] / result["train_seconds"]
    result["machine"] = machine()  # the libraries are imported here already (the parent process need not)
    if torch.cuda.is_available():
        if loading_peak:  # the peak since the first training step, and the process's (model loading included)
            result["training_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_memory_gib"] = max([torch.cuda.max_memory_allocated(), *loading_peak]) / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    else:
        import resource

        result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("RESULT " + json.dumps(result), flush=True)


def watch_training() -> tuple[list[tuple[int, int]], list[int]]:
    """Watch the training micro-batches that go through ``tasks.common.loss.completion_logits`` with gradients on:
    their ``(tokens, targets)`` (tokens: ``input_ids``' elements, pads included; targets: completion target tokens)
    are appended to the first list as training runs; on a GPU, at the first one, the CUDA peak so far (model
    loading) goes into the second list and the peak counter is reset, so that ``max_memory_allocated`` is then the
    training's own peak."""
    import torch

    import tasks.common.loss

    shapes, loading_peak, plain = [], [], tasks.common.loss.completion_logits

    def watching(model, inputs, labels, unwrapped=None):
        if torch.is_grad_enabled():
            if not shapes and torch.cuda.is_available():
                loading_peak.append(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            shapes.append((inputs["input_ids"].numel(), int((labels != tasks.common.loss.IGNORE_INDEX).sum())))
        return plain(model, inputs, labels, unwrapped)

    tasks.common.loss.completion_logits = watching
    return shapes, loading_peak


def mfu(tokens_per_second: float, parameters: int, gpu: str | None, cpu_peak: float | None = None) -> str:
    """``6·N·tokens/s / peak`` (and the 4N LoRA figure) as percentages over the GPU's dense bf16 peak, or on a CPU
    over ``cpu_peak`` (``cpu_matmul_peak``, measured on this machine); "n/a" without a peak."""
    peak = next((v for k, v in GPU_BF16_PEAK.items() if gpu and k in gpu), None) or cpu_peak
    if not peak:
        return "n/a"
    flops = parameters * tokens_per_second / peak
    return f"{600 * flops:.1f} % (4N: {400 * flops:.1f} %)"


def cpu_matmul_peak(bf16: bool, size: int = 2048, seconds: float = 3.0) -> float:
    """The CPU's achieved matmul rate in FLOP/s: square ``size``×``size`` products (``2·size³`` FLOPs each) in
    bf16 (where the CPU has AVX512-BF16/AMX and training runs under bf16 autocast) or fp32, with all of the
    process's threads, best of the repetitions within ``seconds``: the limit training's FLOP/s is set against."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def machine() -> str:
    import peft
    import torch
    import transformers
    import trl

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu()
    return (f"{where}; {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "banking77.yaml"))
    parser.add_argument("--set", action="append", default=[], help="config override, as in flows.finetune")
    parser.add_argument("--model", default="embedded", help="embedded | llama-3.2-1b | llama-3.1-8b | a folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--cache", default="~/.cache/finetune-flow/models")
    parser.add_argument("--arms", default="baseline,ours",
                        help="comma-separated: baseline, trl-loss, trl-padding-free, ours")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random Llama configs (default: SmolLM2's)")
    parser.add_argument("--tiny", action="store_true", help="toy-width Llama configs (CPU dry run)")
    parser.add_argument("--json", help="also write the rounds and the summary to this JSON file")
    parser.add_argument("--arm", choices=["baseline", "trl-loss", "trl-padding-free", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # training only: the config's export targets do not apply (genai-int4-adapter would refuse lora.method=qlora)
    args.set = ["export.enabled=false", *args.set]
    if args.arm:
        return arm(args)

    cfg = load_config(args.config, args.set)
    base = model_folder(args.model, Path(args.cache).expanduser(), args.tokenizer, args.tiny)
    arms = args.arms.split(",")
    results = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as work:
        splits = prepare_data(cfg, Path(work), args.seq_len)
        write_json(Path(work) / "splits.json", splits.model_dump(mode="json"))
        for r in range(args.rounds):
            for name in (arms if r % 2 == 0 else arms[::-1]):
                command = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                           "--arm", name, "--round", str(r), "--work", work, "--base", base]
                command += [item for s in args.set for item in ("--set", s)]
                env = {"CUDA_VISIBLE_DEVICES": "0", **os.environ}  # one GPU each (no DataParallel)
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if done.returncode or line is None:
                    sys.exit(f"{name} (round {r}) failed:\n{done.stderr[-4000:]}")
                results[name].append(json.loads(line[len("RESULT "):]))
                got = results[name][-1]
                print(f"round {r} {name:8s} {got['tokens_per_second']:8.1f} tokens/s  {got['tokens']} tokens in "
                      f"{got['train_seconds']:.1f} s  eval loss {got['eval_loss']:.4f}  peak "
                      f"{got['peak_memory_gib']:.2f} GiB", flush=True)
    summary = report(args, cfg, base, results)
    if args.json:
        write_json(Path(args.json), {"model": args.model, "steps": args.steps, "rounds": args.rounds,
                                     "overrides": args.set, "machine": next(iter(results.values()))[0]["machine"],
                                     "rounds_results": results,
                                     "summary": summary})


def report(args, cfg: FinetuneConfig, base: str, results: dict) -> dict:
    """Print the table (median tokens/s, max peak memory, median eval loss, MFU per arm) and return it as
    ``{"parameters", "arms": {arm: {...}}, "speed_ratio", "eval_loss_difference_pct"}`` (the last two only
    with both arms; ``speed_ratio_vs_trl_loss`` / ``speed_ratio_vs_trl_padding_free`` with those arms too)."""
    n = parameter_count(base)
    gpu = next(iter(results.values()))[0].get("gpu")
    cpu_peak = None
    where = next(iter(results.values()))[0]["machine"]
    if gpu is None and not args.tiny:  # measured here, after the arms, with the machine as idle as it was for them
        from tasks.base_model import use_bf16

        bf16 = use_bf16(cfg.train.bf16)
        cpu_peak = cpu_matmul_peak(bf16)
        print(f"CPU matmul peak ({'bf16' if bf16 else 'fp32'}, 2048x2048, all threads): {cpu_peak / 1e9:.1f} GFLOP/s; "
              "MFU below = training FLOP/s (6N and 4N per token) over it")
    print(f"\nmodel {args.model} ({n / 1e6:.1f} M parameters), method {cfg.lora.method}, {args.steps} steps x "
          f"batch {cfg.train.per_device_train_batch_size}, {args.rounds} rounds; {where}")
    if "ours" in results:
        print(f"ours: {json.dumps(results['ours'][0].get('settings'))}")
    print("| arm | tokens/s (median) | peak memory GiB (max) | eval loss | MFU |\n|---|---|---|---|---|")
    summary = {"parameters": n, "arms": {}}
    for name, runs in results.items():
        speed = statistics.median(r["tokens_per_second"] for r in runs)
        row = {"tokens_per_second": speed, "peak_memory_gib": max(r["peak_memory_gib"] for r in runs),
               "eval_loss": statistics.median(r["eval_loss"] for r in runs), "mfu": mfu(speed, n, gpu, cpu_peak)}
        for key in ("max_batch_tokens", "max_batch_targets", "training_peak_gib"):
            if key in runs[0]:
                row[key] = max(r[key] for r in runs)
        summary["arms"][name] = row
        print(f"| {name} | {speed:.1f} | {row['peak_memory_gib']:.2f} | {row['eval_loss']:.4f} | {row['mfu']} |")
    if {"ours", "baseline"} <= results.keys():
        ours, baseline = summary["arms"]["ours"], summary["arms"]["baseline"]
        summary["speed_ratio"] = ours["tokens_per_second"] / baseline["tokens_per_second"]
        summary["eval_loss_difference_pct"] = 100 * (ours["eval_loss"] - baseline["eval_loss"]) / baseline["eval_loss"]
        print(f"\nspeed ratio ours / baseline: {summary['speed_ratio']:.2f}x; eval loss difference "
              f"{summary['eval_loss_difference_pct']:+.2f} %; tokens trained per arm: "
              f"{sorted({r['tokens'] for runs in results.values() for r in runs})}")
    for other in ("trl-loss", "trl-padding-free"):
        if {"ours", other} <= results.keys():
            ratio = summary["arms"]["ours"]["tokens_per_second"] / summary["arms"][other]["tokens_per_second"]
            summary[f"speed_ratio_vs_{other.replace('-', '_')}"] = ratio
            print(f"speed ratio ours / {other}: {ratio:.2f}x")
    return summary


if __name__ == "__main__":
    main()
