"""report: the run's ``metrics.json`` (the output contract) and a human-readable ``report.md``."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel

from tasks.stages.evaluate import EvalResult
from tasks.deploy.export import ExportResult
from tasks.common.files import atomic_dir, read_jsonl, write_json, write_text_atomic
from tasks.stages.ingest import SplitCounts
from tasks.stages.merge import MergeChecks
from tasks.common.metrics import LOSS_METRICS, QUALITY_METRICS, task_kind
from tasks.stages.train import TrainSummary

N_SAMPLES = 5  # test prompts shown base vs fine-tuned in report.md and the sample-generations artifact


def qlora_line(vs_4bit: dict | None) -> str:
    """The report's line on a QLoRA merge (merged float32 vs the adapter on the 4-bit base), or ""."""
    if not vs_4bit:
        return ""
    return (f"- qlora: merged float32 model vs adapter on the 4-bit base (as trained): same next token at "
            f"{vs_4bit['top1_agreement']:.1%} of {vs_4bit['positions']} answer positions, logit diff mean "
            f"{vs_4bit['mean_abs_logit_diff']:.3g} / max {vs_4bit['max_abs_logit_diff']:.3g}\n")


class DataSummary(BaseModel):
    """What the run trained and was tested on: rows per source split (ingest), examples per split, examples
    dropped because their prompt is in a later split, the number of labels (0 for generation) and the data's
    content fingerprint."""

    ingest: dict[str, SplitCounts]
    split: dict[str, int]
    leaked_dropped: dict[str, int]
    labels: int
    fingerprint: str


class RunMetrics(BaseModel):
    """``metrics.json``, the output contract of a run: the task kind scored, the base and fine-tuned evaluations
    on the test split, each export's checks, training figures, merge checks, the data, wall seconds and final
    state (``Completed`` / ``Cached``) per stage, and the whole config."""

    task: str
    base: EvalResult | None
    base_few_shot: EvalResult | None = None
    finetuned: EvalResult
    onnx: dict[str, ExportResult] | None
    train: TrainSummary
    merge: MergeChecks
    data: DataSummary
    stage_seconds: dict[str, float]
    stage_states: dict[str, str]
    config: dict


def write_report(run_dir: str | Path, metrics: dict, links: dict[str, str], loss_curve: str | None) -> dict:
    """Publish the run folder atomically: ``metrics.json``, ``report.md``, ``loss_curve.png`` (a copy of
    ``loss_curve``, the train stage's plot, when that file exists), ``samples.json`` (``sample_generations``),
    ``tensorboard/`` (``log_test_metrics``, with ``train.report_to: [tensorboard]``) and, for each ``links`` entry
    (e.g. ``"adapter"`` or ``"eval/base"``), a relative symlink to that stage's output folder.

    Stage outputs live once, content-addressed, under ``<output.dir>/stages``; run folders link to them.

    Returns:
        ``{"metrics", "report", "loss_curve", "samples"}`` paths (``loss_curve`` is None without a plot).
    """
    run_dir = Path(run_dir)
    samples = sample_generations(links.get("eval/base"), links["eval/finetuned"])
    with atomic_dir(run_dir) as tmp:
        for name, target in links.items():
            link = tmp / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(Path(target).resolve(), (run_dir / name).parent.resolve()))
        write_json(tmp / "metrics.json", metrics)
        has_curve = bool(loss_curve) and Path(loss_curve).is_file()
        if has_curve:
            shutil.copyfile(loss_curve, tmp / "loss_curve.png")
        write_json(tmp / "samples.json", samples)
        if "tensorboard" in metrics["config"]["train"].get("report_to", []):
            log_test_metrics(tmp / "tensorboard", metrics)
        write_text_atomic(tmp / "report.md", render_markdown(metrics, samples, has_curve=has_curve))
    return {"metrics": str(run_dir / "metrics.json"), "report": str(run_dir / "report.md"),
            "loss_curve": str(run_dir / "loss_curve.png") if has_curve else None,
            "samples": str(run_dir / "samples.json")}


def log_test_metrics(folder: str | Path, metrics: dict) -> None:
    """TensorBoard scalars of the test evaluations in ``folder``: ``test/<side>/<metric>`` for each side of
    ``metrics.json`` (``base``, ``base_few_shot``, ``finetuned``) and each quality and loss metric it has, at step
    ``metrics["train"]["steps"]`` (beside the training curves, which the trainer logs into
    ``adapter/tensorboard``). Written with TensorBoard's own event writer (``EventFileWriter``), which imports
    neither torch nor TensorFlow: a report whose stages all come from the cache loads no torch."""
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    step = metrics["train"].get("steps") or 0
    writer = EventFileWriter(str(folder))
    try:
        for side in ("base", "base_few_shot", "finetuned"):
            for name, value in (metrics.get(side) or {}).items():
                if name in QUALITY_METRICS + LOSS_METRICS and isinstance(value, (int, float)):
                    value = Summary.Value(tag=f"test/{side}/{name}", simple_value=float(value))
                    writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))
    finally:
        writer.close()


def sample_generations(base_eval: str | None, tuned_eval: str, n: int = N_SAMPLES) -> list[dict]:
    """The first ``n`` test rows side by side: ``[{"prompt": last user message, "reference", "base" (None
    without a base evaluation), "fine-tuned"}]``, read from the evaluations' ``predictions.jsonl``; with a base
    evaluation (a sample of the test rows) the first ``n`` rows it answered, matched by the row's own user message
    (the base model's prompt may name the label set before it, ``eval.label_list``)."""
    tuned = read_jsonl(Path(tuned_eval) / "predictions.jsonl")
    base = {}
    if base_eval:
        base = {r["prompt"][-1]["content"]: r["prediction"] for r in read_jsonl(Path(base_eval) / "predictions.jsonl")}
        tuned = [t for t in tuned if t["prompt"][-1]["content"] in base]
    return [{"prompt": t["prompt"][-1]["content"], "reference": t["reference"],
             "base": base.get(t["prompt"][-1]["content"]), "fine-tuned": t["prediction"]} for t in tuned[:n]]


def samples_markdown(samples: list[dict]) -> str:
    """``sample_generations`` as markdown: one block per prompt with the reference, base and fine-tuned answers."""
    def quote(text: str | None) -> str:
        if text is None:
            return "(no base evaluation)"
        return "\n".join(f"> {line}" for line in text.splitlines() or [""])

    return "\n\n".join(f"**Prompt {i}.** {s['prompt']}\n\n- reference:\n\n{quote(s['reference'])}\n\n"
                        f"- base:\n\n{quote(s['base'])}\n\n- fine-tuned:\n\n{quote(s['fine-tuned'])}"
                        for i, s in enumerate(samples, 1))


def update_latest(output_dir: str | Path, run_dir: str | Path, source: dict | None = None) -> str:
    """Point ``<output_dir>/latest.json`` at ``run_dir`` (atomic replace); call only after every check passed.

    The file names the run folder and its ``merged/``, ``onnx/`` (one folder per export target) and
    ``metrics.json`` (absolute paths), so consumers always find the last good model, never a run that failed
    half-way, and ``source`` (the data and config fingerprints the model was trained from; the nightly
    retrain compares them).
    """
    run_dir = Path(run_dir).resolve()
    onnx = run_dir / "onnx"
    pointer = {"run_dir": str(run_dir), "merged": str(run_dir / "merged"),
               "onnx": str(onnx) if onnx.is_dir() else None, "metrics": str(run_dir / "metrics.json"),
               "source": source}
    return str(write_json(Path(output_dir) / "latest.json", pointer))


def at_revision(section: dict, name: str) -> str:
    """``section[name]`` in backticks, with `` at commit `<sha>` `` when the section has a ``revision`` (a Hub
    model or dataset pinned by ``tasks.stages.hub.resolve_revisions``)."""
    revision = section.get("revision")
    return f"`{section[name]}`" + (f" at commit `{revision}`" if revision else "")


def model_card(run_dir: Path, metrics: dict) -> str:
    """Markdown model card: base model, data and its hash, quality, how to load the merged and ONNX models."""
    cfg, data = metrics["config"], metrics["data"]
    genai = next((target for target in metrics["onnx"] or {} if target.startswith("genai")), "genai-int4")
    kind = "full fine-tune" if cfg["lora"].get("method") == "full" else "LoRA fine-tune"
    return f"""# {cfg['name']}: {kind} of `{cfg['model']['name_or_path']}`

- **Base model**: {at_revision(cfg['model'], 'name_or_path')}
- **Data**: {at_revision(cfg['data'], 'path')} (content sha256 `{data.get('fingerprint')}`), splits {data['split']}
- **Method**: {method_line(cfg['lora'])}; lr {cfg['train']['learning_rate']}, \
{cfg['train']['num_train_epochs']} epoch(s), batch {cfg['train']['per_device_train_batch_size']}

{metrics_table(metrics)}

## Load the merged model (PyTorch)
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{run_dir / 'merged'}")
tokenizer = AutoTokenizer.from_pretrained("{run_dir / 'merged'}")
```

## Run the exported model (ONNX Runtime GenAI, CPU; no torch needed)
{chr(10).join(f"- {line}" for line in export_lines(metrics)) or "ONNX export disabled."}

```bash
python -m flows.predict --model {run_dir / 'onnx' / genai} "your text"
```

## Config
```json
{json.dumps(cfg, indent=2)}
```
"""


def export_lines(metrics: dict) -> list[str]:
    """One line per export target: its quality next to the merged model's, and its parity checks."""
    lines = []
    primary = task_kind(metrics["task"]).primary
    for target, r in (metrics["onnx"] or {}).items():
        form = f"{r['size_mb']:.1f} MB on the int4 base {r['base']}" if r.get("base") else f"{r['size_mb']:.0f} MB"
        if r.get("ladder"):
            form += f", ladder rung {r['precision']} of " + ", ".join(
                f"{t['rung']} {t[primary]:.4f}{'' if t['passed'] else ' (failed)'}" for t in r["ladder"])
        lines.append(f"{target} ({r['execution_provider']}, {form}): {primary} {r[primary]:.4f} vs "
                     f"merged {r['reference_' + primary]:.4f} on {r['n_examples']} test rows, same answer "
                     f"{r['same_answer']:.1%}, greedy agreement {r['greedy_agreement']:.0%} on "
                     f"{r['n_check_prompts']} prompts, tokenizer mismatches {r['tokenizer_mismatches']}")
    return lines


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_rows(metrics: dict) -> list[dict]:
    """One row per quality metric, the free-running answers' accuracy and share of answers that are no label (with
    constrained answers), eval loss and perplexity: base (zero-shot), base k-shot (with a few-shot evaluation),
    fine-tuned and the delta fine-tuned − zero-shot base (4 decimals)."""
    base, shots, tuned = metrics["base"] or {}, metrics.get("base_few_shot"), metrics["finetuned"]
    rows = []
    unconstrained = tuple(k for k in ("unconstrained_accuracy", "off_label_share") if tuned.get(k) is not None)
    for key in (*task_kind(metrics["task"]).metrics, *unconstrained, *LOSS_METRICS):
        b, t = base.get(key), tuned[key]
        row = {"metric": key, "base": None if b is None else round(b, 4)}
        if shots:
            row[f"base {shots['few_shot']}-shot"] = None if shots.get(key) is None else round(shots[key], 4)
        rows.append(row | {"fine-tuned": round(t, 4), "delta": None if b is None else round(t - b, 4)})
    return rows


def metrics_table(metrics: dict) -> str:
    """Markdown table of ``metrics_rows``, the number of test rows each evaluation saw, and the 95 % intervals."""
    rows = metrics_rows(metrics)
    columns = list(rows[0])[1:]
    runs = {"base": metrics["base"], "fine-tuned": metrics["finetuned"]}
    if metrics.get("base_few_shot"):
        runs[columns[1]] = metrics["base_few_shot"]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([r["metric"]] + [_fmt(r[c]) for c in columns]) + " |" for r in rows]
    lines.append("| n_examples | " + " | ".join(_rows_seen(runs.get(c)) for c in columns) + " |")
    lines.append("| 95 % interval | " + " | ".join(_interval(runs.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _rows_seen(result: dict | None) -> str:
    if not result:
        return "—"
    population = result.get("population")
    if population and population > result["n_examples"]:
        return f"{result['n_examples']} of {population} (stratified)"
    return str(result["n_examples"])


def _interval(result: dict | None) -> str:
    """``metric [low, high]`` (Wilson) of an evaluation's per-row proportion metric, or "—"."""
    if not result or not result.get("interval95"):
        return "—"
    return ", ".join(f"{name} [{low:.3f}, {high:.3f}]" for name, (low, high) in result["interval95"].items())


def method_line(lora: dict) -> str:
    """The training method in one phrase: ``lora: r=16, lora_alpha=32, target_modules=all-linear`` (qlora and
    dora alike) or ``full fine-tuning (every weight trained)``."""
    method = lora.get("method", "lora")
    if method == "full":
        return "full fine-tuning (every weight trained)"
    return f"{method}: r={lora['r']}, lora_alpha={lora['lora_alpha']}, target_modules={lora['target_modules']}"


def length_lines(train: dict) -> list[str]:
    """What happened to over-long examples and whether training stopped early / published its best checkpoint."""
    lengths, lines = train.get("sequence_lengths") or {}, []
    for split in ("train", "validation"):
        c = lengths.get(split)
        if c:
            lines.append(f"{split}: {c['over_max_seq_length']} of {c['examples']} examples longer than "
                         f"max_seq_length={lengths['max_seq_length']} (longest {c['longest']} tokens): "
                         f"{c['dropped']} dropped, {c['truncated']} truncated")
    metric = train.get("metric_for_best_model") or "eval_loss"
    if train.get("stopped_early"):
        lines.append(f"stopped early after {train['steps']} steps ({metric} stopped improving)")
    if train.get("best_checkpoint"):
        lines.append(f"published the best checkpoint by {metric}: {train['best_checkpoint']}")
    return lines


def render_markdown(metrics: dict, samples: list[dict] | None = None, has_curve: bool = False) -> str:
    """The run report: quality table, sample generations, training figures, merge/export checks, stage times."""
    cfg, train = metrics["config"], metrics["train"]
    stages = "\n".join(f"| {name} | {sec:.1f} |" for name, sec in metrics["stage_seconds"].items())
    onnx_lines = "\n".join(f"- ONNX {line}" for line in export_lines(metrics)) or "- ONNX export: disabled"
    return f"""# Fine-tuning report: {cfg['name']}

Base model: {at_revision(cfg['model'], 'name_or_path')} · data: {at_revision(cfg['data'], 'path')} · task: \
{metrics['task']}

## Quality on the test split
{metrics_table(metrics)}

## Sample generations (first {len(samples or [])} test prompts)
{samples_markdown(samples or [])}

## Training
- {method_line(cfg['lora'])}
- {train['steps']} steps, {train['train_tokens']} tokens in {train['wall_seconds']:.0f} s \
({train['tokens_per_second']:.1f} tokens/s), bf16 autocast: {train['bf16']}, padding-free: \
{train.get('padding_free')}, attention: {train.get('attn_implementation')}
- final train loss {_fmt(train['train_loss'])}, validation loss {_fmt(train['eval_loss'])}\
{"".join(f", validation {k} {v:.4f} (answered)" for k, v in (train.get('validation') or {}).items())}
{"".join(f"- {line}{chr(10)}" for line in length_lines(train))}{"![loss curve](loss_curve.png)" if has_curve else ""}

## Checks
- merge: max abs logit diff merged vs base+adapter {metrics['merge']['max_abs_logit_diff']:.3g}
{qlora_line(metrics['merge'].get('qlora_vs_4bit'))}{onnx_lines}

## Wall time per stage (s)
| stage | seconds |
|---|---|
{stages}

## Data
```json
{json.dumps(metrics['data'], indent=2)}
```
"""
