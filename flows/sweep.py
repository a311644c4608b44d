"""The hyperparameter sweep DAG: prepare base model → ingest → split → trials (mapped, in waves of
``max_parallel``; Optuna asks, each trial trains, merges and scores on validation, Optuna is told) → the best
trial and the baseline measured on the test split → results table, best config. Run it with
``python -m flows.sweep --config configs/sweeps/banking77.yaml [--set key=value ...]``.

Trials are Prefect tasks cached by content like the finetune stages (a re-run only runs new trials), run in
worker processes (Prefect's ProcessPoolTaskRunner: loading models is not thread-safe in transformers), at most
``max_parallel`` at once, and each holds a `gpu` concurrency slot where the worker sets one (flows/gpu.py), so
on a pool with N GPU slots at most N train at once.
"""
from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ProcessPoolTaskRunner

from configs.schema import FinetuneConfig, SweepConfig, load_sweep, trial_config
from flows import artifacts
from flows.caching import cached, run_stage, stage_dir
from flows.finetune import dry_run, main as finetune_main, prepare, run_dir_for
from flows.retries import with_retries
from flows.stages import EVALUATE, TRIAL
from tasks import base_model, sweep as trials


def run_wave(cfg: FinetuneConfig, base: str, base_key: str, split_dir: str, splits: dict, kind: str,
             configs: list[FinetuneConfig]) -> list[tuple[dict | None, str | None]]:
    """Run one wave of trials as mapped tasks (cached by content, retried on transient errors); return
    ``(result, None)`` or ``(None, error message)`` per trial, in order."""
    dirs = [stage_dir(c, TRIAL, base_key, split_dir, kind) for c in configs]
    mapped = with_retries(cached(TRIAL.task, cfg), cfg.retry).with_options(  # a missing trial folder: run again
        refresh_cache=not all(Path(d).exists() for d in dirs))
    futures = mapped.map(base, unmapped(splits), kind, configs, dirs, unmapped([artifacts.training_progress]))
    out = []
    for future in futures:
        future.wait()
        state = future.state
        if state.is_completed():
            out.append((future.result(), None))
        else:
            error = state.result(raise_on_failure=False)
            out.append((None, f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else state.name))
    return out


@flow(name="sweep", task_runner=ProcessPoolTaskRunner())
def sweep(spec: SweepConfig, baseline: FinetuneConfig) -> dict:
    """Search ``spec.space`` around ``baseline``; return ``{"best", "baseline", "trials", "paths", "run_dir"}``.

    The baseline (the config's own values) runs alongside the sampled trials; the best trial is picked on the
    validation split and then it and the baseline are evaluated on the test split.

    Raises:
        RuntimeError: every trial failed.
    """
    def run(stage, out_dir, *args, **options):
        return run_stage(baseline, stage, out_dir, *args, **options)[0]

    base_model.use_hub_token(baseline.model)  # before the trial processes start: they inherit HF_TOKEN
    base, base_key, data, _, split_dir, splits = prepare(baseline, run)
    kind = data["task"]
    metric, direction = trials.objective(spec, kind)

    def run_configs(configs: list[FinetuneConfig]) -> list[tuple[dict | None, str | None]]:
        return run_wave(baseline, base, base_key, split_dir, splits, kind, configs)

    rows, done = search(spec, baseline, metric, direction, run_configs)
    pick = max if direction == "maximize" else min
    best = pick(done.values(), key=lambda t: t["validation"])
    test_file = splits["files"]["test"]
    baseline_trial = done.get("baseline")
    measured = [best] + ([baseline_trial] if baseline_trial is not None and baseline_trial is not best else [])
    for entry in measured:
        trc = entry["cfg"].model.trust_remote_code
        eval_dir = stage_dir(entry["cfg"], EVALUATE, entry["merged"], split_dir, kind, trc)
        entry["test"] = run(EVALUATE, eval_dir, entry["merged"], test_file, kind, entry["cfg"].eval, eval_dir, trc,
                            label=f"evaluate-{entry['trial']}")
    run_dir = run_dir_for(baseline.model_copy(update={"name": f"{baseline.name}-sweep"}))
    text = summary(spec, metric, rows, measured)
    paths = trials.write_results(run_dir, rows, _public(best, metric), best["cfg"], text)
    create_table_artifact(rows, key="sweep-trials", description=f"validation {metric} per trial ({spec.sampler})")
    create_markdown_artifact(text, key="sweep-summary", description="best trial vs baseline")
    print(text + f"\nbest config: {paths['best_config']}")
    return {"best": _public(best, metric), "baseline": _public(baseline_trial, metric), "trials": rows,
            "paths": paths, "run_dir": str(run_dir)}


def search(spec: SweepConfig, baseline: FinetuneConfig, metric: str, direction: str, run_configs) -> tuple[list, dict]:
    """The baseline plus Optuna's trials, asked and told in waves of ``spec.max_parallel``;
    ``run_configs(configs)`` runs one wave and returns ``(result, error)`` per config.

    Returns:
        ``(table rows in run order, {trial name: {"trial", "params", "validation", "cfg", "merged"}} of the
        trials that completed)``.

    Raises:
        RuntimeError: every trial failed.
    """
    study = trials.make_study(spec, direction)
    queue = [("baseline", trials.baseline_params(baseline, spec.space), None)]
    rows, done, asked = [], {}, 0
    while queue or asked < trials.n_trials(spec):
        while len(queue) < spec.max_parallel and asked < trials.n_trials(spec):
            trial = study.ask()
            queue.append((f"trial-{trial.number}", trials.suggest(trial, spec.space), trial))
            asked += 1
        wave, queue = queue, []
        configs = [trial_config(baseline, params, f"sweep {name}") for name, params, _ in wave]
        for (name, params, trial), cfg, (result, error) in zip(wave, configs, run_configs(configs)):
            value = result["validation"][metric] if result else None
            if trial is not None:
                trials.tell(study, trial, value)
            rows.append(trials.result_row(name, params, result, metric, error))
            if result:
                done[name] = {"trial": name, "params": params, "validation": value, "cfg": cfg,
                              "merged": result["merged"]}
    if not done:
        raise RuntimeError(f"sweep: all {len(rows)} trials failed; first error: {rows[0]['error']}")
    return rows, done


def _public(entry: dict | None, metric: str) -> dict | None:
    """A trial's JSON-able summary: name, params, validation metric and its test metrics (if measured)."""
    if entry is None:
        return None
    return {"trial": entry["trial"], "params": entry["params"], f"validation_{metric}": entry["validation"],
            "test": entry.get("test")}


def summary(spec: SweepConfig, metric: str, rows: list[dict], measured: list[dict]) -> str:
    """Markdown: the trials table (validation metric), then the ``measured`` trials (the best first, then the
    baseline unless it is the best) on validation and test."""
    best = measured[0]
    keys = list(spec.space)
    lines = [f"# Sweep: {len(rows)} trials ({spec.sampler} sampler, seed {spec.seed}), validation {metric}", "",
             "| trial | " + " | ".join(keys) + f" | validation {metric} | validation loss | steps | train s |",
             "|---" * (len(keys) + 5) + "|"]
    for r in rows:
        cells = [_cell(r[k]) for k in keys] + [_cell(r[f"validation_{metric}"]), _cell(r["validation_loss"]),
                                              _cell(r["steps"]), _cell(r["train_seconds"])]
        lines.append(f"| {r['trial']} | " + " | ".join(cells) + (f" ({r['error']})" if r["error"] else "") + " |")
    lines += ["", f"**Best: {best['trial']}** ({', '.join(f'{k}={_cell(v)}' for k, v in best['params'].items())})"]
    for entry in measured:
        test = entry.get("test") or {}
        tested = f", test {metric} {test[metric]:.4f} on {test['n_examples']} rows" if metric in test else ""
        lines.append(f"- {entry['trial']}: validation {metric} {entry['validation']:.4f}{tested}")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(loaded: tuple[SweepConfig, FinetuneConfig]) -> dict:
    """Run the sweep flow on ``load_sweep``'s result."""
    return sweep(*loaded)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--config`` names the sweep YAML (default ``configs/sweeps/banking77.yaml``); ``--set`` overrides
    its keys (``n_trials=8``, ``finetune.data.path=...``). Exit 0 on success, 1 with a one-line reason."""
    return finetune_main(argv, run_sweep, prog="python -m flows.sweep", description=__doc__.split("\n\n")[0],
                         load=load_sweep, check=lambda loaded: dry_run(loaded[1]))


if __name__ == "__main__":
    sys.exit(main())
