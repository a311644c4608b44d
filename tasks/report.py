"""report: the run's ``metrics.json`` (the output contract) and a human-readable ``report.md``."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.files import write_json, write_text_atomic

QUALITY_KEYS = {"classification": ("accuracy", "macro_f1"), "generation": ("rouge_l", "exact_match")}


def build_metrics(config: dict, task: str, base: dict | None, finetuned: dict, train: dict, merge: dict,
                  onnx: dict | None, data: dict, stages: dict[str, float]) -> dict:
    """Assemble the ``metrics.json`` contract: base, finetuned, onnx, train, merge, data, stages, config."""
    return {
        "task": task,
        "base": base,
        "finetuned": finetuned,
        "onnx": onnx,
        "train": {k: train[k] for k in ("train_tokens", "tokens_per_second", "wall_seconds", "steps",
                                         "train_loss", "eval_loss", "bf16", "resumed_from")},
        "merge": {k: merge[k] for k in ("max_abs_logit_diff", "max_abs_weight_diff")},
        "data": data,
        "stage_seconds": stages,
        "config": config,
    }


def write_report(run_dir: str | Path, metrics: dict) -> dict:
    """Write ``<run_dir>/metrics.json`` and ``<run_dir>/report.md``; return their paths."""
    run_dir = Path(run_dir)
    write_json(run_dir / "metrics.json", metrics)
    write_text_atomic(run_dir / "report.md", render_markdown(metrics))
    return {"metrics": str(run_dir / "metrics.json"), "report": str(run_dir / "report.md")}


def update_latest(output_dir: str | Path, run_dir: str | Path) -> str:
    """Point ``<output_dir>/latest.json`` at ``run_dir`` (atomic replace); call only after every check passed.

    The file names the run folder and its ``merged/``, ``onnx/`` and ``metrics.json`` (absolute paths), so
    consumers always find the last good model, never a run that failed half-way.
    """
    run_dir = Path(run_dir).resolve()
    onnx = run_dir / "onnx"
    pointer = {"run_dir": str(run_dir), "merged": str(run_dir / "merged"),
               "onnx": str(onnx) if onnx.is_dir() else None, "metrics": str(run_dir / "metrics.json")}
    return str(write_json(Path(output_dir) / "latest.json", pointer))


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_table(metrics: dict) -> str:
    """Markdown table: base vs fine-tuned per metric, with the delta."""
    keys = (*QUALITY_KEYS[metrics["task"]], "eval_loss", "perplexity", "n_examples")
    base, tuned = metrics["base"] or {}, metrics["finetuned"]
    lines = ["| metric | base | fine-tuned | delta |", "|---|---|---|---|"]
    for k in keys:
        b, t = base.get(k), tuned.get(k)
        delta = t - b if isinstance(b, (int, float)) and isinstance(t, (int, float)) and k != "n_examples" else None
        lines.append(f"| {k} | {_fmt(b)} | {_fmt(t)} | {_fmt(delta)} |")
    return "\n".join(lines)


def render_markdown(metrics: dict) -> str:
    """The run report: quality table, training figures, merge/export checks, stage times, config."""
    cfg, train = metrics["config"], metrics["train"]
    onnx = metrics["onnx"]
    stages = "\n".join(f"| {name} | {sec:.1f} |" for name, sec in metrics["stage_seconds"].items())
    onnx_line = (f"- ONNX ({onnx['provider']}): greedy agreement with PyTorch {onnx['greedy_agreement']:.0%} "
                 f"on {onnx['n_prompts']} prompts" if onnx else "- ONNX export: disabled")
    return f"""# Fine-tuning report: {cfg['name']}

Base model: `{cfg['model']['name_or_path']}` · data: `{cfg['data']['path']}` · task: {metrics['task']}

## Quality on the test split
{metrics_table(metrics)}

## Training
- LoRA r={cfg['lora']['r']}, lora_alpha={cfg['lora']['lora_alpha']}, target_modules={cfg['lora']['target_modules']}
- {train['steps']} steps, {train['train_tokens']} tokens in {train['wall_seconds']:.0f} s \
({train['tokens_per_second']:.1f} tokens/s), bf16 autocast: {train['bf16']}
- final train loss {_fmt(train['train_loss'])}, validation loss {_fmt(train['eval_loss'])}

## Checks
- merge: max abs logit diff merged vs base+adapter {metrics['merge']['max_abs_logit_diff']:.3g}
{onnx_line}

## Wall time per stage (s)
| stage | seconds |
|---|---|
{stages}

## Data
```json
{json.dumps(metrics['data'], indent=2)}
```
"""
