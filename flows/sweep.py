"""The hyperparameter sweep DAG: prepare base model → ingest → split → trials (mapped, in waves of
``max_parallel``; Optuna asks, each trial trains, merges and scores on validation, Optuna is told) → the best
trial and the baseline measured on the test split → results table, best config. Run it with
``python -m flows.sweep --config configs/sweeps/banking77.yaml [--set key=value ...]``.

Each trial is a Prefect task that runs the declared train → merge → evaluate (on validation) stages, each cached
by content exactly as in the finetune flow (a re-run only runs new trials; the baseline trial shares its stages
with a finetune run of the same config). Trials run in worker processes (Prefect's ProcessPoolTaskRunner: loading
models is not thread-safe in transformers), at most ``max_parallel`` at once; each stage holds a `gpu`
concurrency slot where the worker sets one (flows/gpu.py), so on a pool with N GPU slots at most N train at once.
"""
from __future__ import annotations

import sys

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner

from configs.schema import FinetuneConfig, SweepConfig, load_sweep, trial_config
from flows.caching import StageRun, run_stage
from flows.finetune import dry_run, evaluate_on, main as finetune_main, prepare, run_dir_for, train_and_merge
from tasks import base_model, sweep as trials
from tasks.sweep import TrialResult
from tasks.train import TrainSummary


@task(name="trial", cache_policy=NO_CACHE)  # its stages are cached
def trial(cfg: FinetuneConfig, name: str, base: str, base_key: str, split: StageRun, kind: str) -> TrialResult:
    """One trial: the declared train → merge → evaluate stages on ``cfg``, keyed as in the finetune flow, the
    evaluation on the validation split (the test split stays untouched for the final comparison). Stage task
    runs are named ``<stage>-<name>`` (``train-trial-3``).

    Raises:
        whatever the stages raise once their retries are spent (e.g. ``MergeCheckError``: a trial learned nothing).
    """
    def run(stage, *args, label: str | None = None, **options) -> StageRun:  # every task run named by the trial
        return run_stage(cfg, stage, *args, label=f"{stage.name}-{name}", **options)

    adapter, merged = train_and_merge(run, cfg, base, base_key, split)
    scored = evaluate_on(run, cfg, merged.dir, merged.dir, split.dir, "validation", kind)
    return TrialResult(validation=scored.result, merged=merged.dir,
                       train=TrainSummary(**adapter.result.model_dump(exclude={"adapter"})))


def run_wave(base: str, base_key: str, split: StageRun, kind: str, named: list[tuple[str, FinetuneConfig]]
             ) -> list[tuple[TrialResult | None, str | None]]:
    """Run one wave of ``(name, config)`` trials as mapped ``trial`` tasks; return ``(result, None)`` or
    ``(None, error message)`` per trial, in order."""
    futures = trial.map([c for _, c in named], [n for n, _ in named], unmapped(base), unmapped(base_key),
                        unmapped(split), unmapped(kind))
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
    def run(stage, *args, **options) -> StageRun:
        return run_stage(baseline, stage, *args, **options)

    base_model.use_hub_token(baseline.model)  # before the trial processes start: they inherit HF_TOKEN
    base, base_key, _, data, split, _ = prepare(baseline, run)
    kind = data.result.task
    metric, direction = trials.objective(spec, kind)

    def run_configs(named: list[tuple[str, FinetuneConfig]]) -> list[tuple[TrialResult | None, str | None]]:
        return run_wave(base, base_key, split, kind, named)

    rows, done = search(spec, baseline, metric, direction, run_configs)
    pick = max if direction == "maximize" else min
    best = pick(done.values(), key=lambda t: t["validation"])
    baseline_trial = done.get("baseline")
    measured = [best] + ([baseline_trial] if baseline_trial is not None and baseline_trial is not best else [])
    for entry in measured:  # keyed as the finetune flow's evaluation of the same merged model
        entry["test"] = evaluate_on(run, entry["cfg"], entry["merged"], entry["merged"], split.dir, "test", kind,
                                    label=f"evaluate-{entry['trial']}").result.model_dump(mode="json")
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
    ``run_configs([(name, config)])`` runs one wave and returns ``(TrialResult, None)`` or ``(None, error)`` per
    trial.

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
        named = [(name, trial_config(baseline, params, f"sweep {name}")) for name, params, _ in wave]
        for (name, params, asked_trial), (_, cfg), (result, error) in zip(wave, named, run_configs(named)):
            value = result.validation.metric(metric) if result else None
            if asked_trial is not None:
                trials.tell(study, asked_trial, value)
            rows.append(trials.result_row(name, params, result, metric, error))
            if result:
                done[name] = {"trial": name, "params": params, "validation": value, "cfg": cfg,
                              "merged": result.merged}
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
