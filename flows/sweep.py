"""The hyperparameter sweep DAG: prepare base model → ingest → split → trials (in waves of ``max_parallel``;
Optuna asks, each trial trains, merges and scores on validation, Optuna is told) → the best trial and the
baseline measured on the test split → results table, best config. Run it with
``python -m flows.sweep --config configs/sweeps/banking77.yaml [--set key=value ...]``.

Each trial runs the declared train → merge → evaluate (on validation) stages, each cached by content exactly as
in the finetune flow (the baseline trial shares its stages with a finetune run of the same config). By default a
trial is a Prefect task run in a worker process of this flow run (Prefect's ProcessPoolTaskRunner: loading
models is not thread-safe in transformers); with ``trial_deployment`` it is a flow run of its own
(``sweep_trial``) that any worker of the deployment's pool, on any host, takes. Either way each GPU stage holds
the `gpu` concurrency slot of the worker that runs it (flows/gpu.py).

The Optuna study lives in ``storage`` (default an Optuna journal in ``<output.dir>/sweeps/``) under a name
derived from the sweep and its trials' stage keys (``study_name``), so running an interrupted sweep again
resumes it: finished trials are read back, not run again (``tasks.stages.sweep.restore``).
"""
from __future__ import annotations

if __name__ == "__main__":  # a command-line run: Prefect's temporary server starts while the rest imports
    from flows.api_server import begin

    begin()

import socket
import sys
import time
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner
from prefect.utilities.hashing import hash_objects

from configs.schema import FinetuneConfig, SweepConfig, load_sweep, sweep_baseline, trial_config
from flows.caching import ROOT, StageRun, run_stage, stage_key
from flows.finetune import dry_run, evaluate_on, main as finetune_main, prepare, run_dir_for, train_and_merge
from flows.stages import EVALUATE, MERGE, TRAIN
from tasks import base_model
from tasks.stages import hub, sweep as trials
from tasks.common.files import write_json
from tasks.stages.sweep import TrialResult
from tasks.stages.train import TrainSummary


def run_trial(cfg: FinetuneConfig, name: str, base: str, base_key: str, split: StageRun, kind: str) -> TrialResult:
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
    return TrialResult(validation=scored.result, merged=merged.dir, ran_on=f"{socket.gethostname()}:{ROOT}",
                       train=TrainSummary(**adapter.result.model_dump(exclude={"adapter"})))


@task(name="trial", cache_policy=NO_CACHE)  # its stages are cached
def trial(cfg: FinetuneConfig, name: str, base: str, base_key: str, split: StageRun, kind: str) -> TrialResult:
    """``run_trial`` as a task of the sweep's flow run (``sweep.trial_deployment`` unset)."""
    return run_trial(cfg, name, base, base_key, split, kind)


@flow(name="sweep-trial")
def sweep_trial(cfg: FinetuneConfig, name: str, result_file: str) -> TrialResult:
    """One trial as a flow run of its own, on whichever worker of the pool takes it (``sweep.trial_deployment``):
    the shared stages (prepare, validate, ingest, split: cached by content, so computed once in the shared
    ``output.dir``), then ``run_trial``. Its result is written to ``result_file`` (JSON, atomically) for the
    sweep to read.

    Raises:
        whatever the stages raise (the flow run fails and the sweep records the trial as failed).
    """
    base_model.use_hub_token(cfg.model)
    cfg = hub.resolve_revisions(cfg)  # a full sha already (the sweep resolved it): unchanged
    base, base_key, _, data, split, _ = prepare(cfg, lambda stage, *args, **options: run_stage(cfg, stage, *args,
                                                                                              **options))
    result = run_trial(cfg, name, base, base_key, split, data.result.task)
    write_json(result_file, result.model_dump(mode="json"))
    return result


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


def run_remote_wave(deployment: str, folder: Path, named: list[tuple[str, FinetuneConfig]], poll_seconds: float = 2,
                    attempts: int = 2) -> list[tuple[TrialResult | None, str | None]]:
    """Run one wave as flow runs of ``deployment`` (``sweep_trial``; subflows of this sweep in the UI), all
    submitted at once so that idle workers of its pool on any host take them; wait until each is final and read
    its result from ``folder/<name>.json``. A run that ends ``Crashed`` (its worker or host died; a worker stopped
    with SIGTERM reschedules its runs itself, see deployments/worker.sh) is submitted again, up to ``attempts``
    runs in all. Returns ``(result, None)`` or ``(None, "<state>: <message>")`` per trial, in order."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    def submit(name: str, cfg: FinetuneConfig):
        result_file = folder / f"{name}.json"
        result_file.unlink(missing_ok=True)
        return run_deployment(deployment, parameters={"cfg": cfg.model_dump(mode="json"), "name": name,
                                                      "result_file": str(result_file)}, flow_run_name=name,
                              timeout=0).id

    runs = {name: submit(name, cfg) for name, cfg in named}
    out = []
    with get_client(sync_client=True) as client:
        for name, cfg in named:
            for attempt in range(1, attempts + 1):
                while not (run := client.read_flow_run(runs[name])).state.is_final():
                    time.sleep(poll_seconds)
                if not run.state.is_crashed() or attempt == attempts:
                    break
                runs[name] = submit(name, cfg)
            if run.state.is_completed():
                out.append((TrialResult.model_validate_json((folder / f"{name}.json").read_text(encoding="utf-8")),
                            None))
            else:
                out.append((None, f"{run.state.name}: {run.state.message}"))
    return out


def study_name(spec: SweepConfig, baseline: FinetuneConfig, data_key: str, base_key: str) -> str:
    """``<name>-sweep-<16 hex>``: the searched space, sampler, seed and metric, and the keys of the stages every
    trial runs (train, merge, evaluate: the data's and base model's content, every config section they read,
    their code and library versions). The same sweep of the same data and code resumes its study; anything that
    would change a trial's result starts a new one (``n_trials`` and ``max_parallel`` do not: a finished sweep
    can be extended)."""
    what = spec.model_dump(mode="json", include={"space", "sampler", "seed", "metric"})
    keys = [stage_key(stage, baseline, data_key, base_key) for stage in (TRAIN, MERGE, EVALUATE)]
    return f"{baseline.name}-sweep-{hash_objects(what, keys, raise_on_failure=True)[:16]}"


@flow(name="sweep", task_runner=ProcessPoolTaskRunner())
def sweep(spec: SweepConfig, baseline: FinetuneConfig | None = None) -> dict:
    """Search ``spec.space`` around ``baseline`` (default: ``spec.config`` with ``spec.finetune`` on top, read in
    the flow run's folder: the sweep deployment's run form takes the sweep config alone); return ``{"best",
    "baseline", "trials", "paths", "run_dir"}``.

    The baseline (the config's own values) runs alongside the sampled trials; the best trial is picked on the
    validation split and then it and the baseline are evaluated on the test split.

    Raises:
        ConfigError: ``spec``'s finetune config is missing or invalid (``configs.schema.sweep_baseline``).
        RuntimeError: every trial failed.
    """
    baseline = baseline or sweep_baseline(spec, "sweep")
    def run(stage, *args, **options) -> StageRun:
        return run_stage(baseline, stage, *args, **options)

    base_model.use_hub_token(baseline.model)  # before the trial processes start: they inherit HF_TOKEN
    baseline = hub.resolve_revisions(baseline)  # Hub ids pinned to a commit: every trial reads the same one
    base, base_key, data_key, data, split, _ = prepare(baseline, run)
    kind = data.result.task
    metric, direction = trials.objective(spec, kind)
    name = study_name(spec, baseline, data_key, base_key)
    sweeps = Path(baseline.output.dir).expanduser().resolve() / "sweeps"  # shared by every worker
    storage = spec.storage or str(sweeps / "optuna.journal")
    study = trials.make_study(spec, direction, storage, name)

    def run_configs(named: list[tuple[str, FinetuneConfig]]) -> list[tuple[TrialResult | None, str | None]]:
        if spec.trial_deployment:
            return run_remote_wave(spec.trial_deployment, sweeps / name, named)
        return run_wave(base, base_key, split, kind, named)

    rows, done = search(spec, baseline, metric, direction, run_configs, study)
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


def search(spec: SweepConfig, baseline: FinetuneConfig, metric: str, direction: str, run_configs,
           study=None) -> tuple[list, dict]:
    """The baseline plus Optuna's trials, asked and told in waves of ``spec.max_parallel``;
    ``run_configs([(name, config)])`` runs one wave and returns ``(TrialResult, None)`` or ``(None, error)`` per
    trial. ``study`` (default: a new in-memory one) may hold the trials of an interrupted run of the same sweep
    (``tasks.stages.sweep.restore``): those are kept, not run again, and count towards ``n_trials``.

    Returns:
        ``(table rows in run order, {trial name: {"trial", "params", "validation", "cfg", "merged"}} of the
        trials that completed)``.

    Raises:
        RuntimeError: every trial failed.
    """
    study = study or trials.make_study(spec, direction)
    entries, again = trials.restore(study)
    for params in again:
        study.enqueue_trial(params)
    queue = [] if any(e["trial"] == "baseline" for e in entries) else \
        [("baseline", trials.baseline_params(baseline, spec.space), None)]
    asked = sum(e["trial"] != "baseline" for e in entries)
    while queue or asked < trials.n_trials(spec):
        while len(queue) < spec.max_parallel and asked < trials.n_trials(spec):
            trial = study.ask()
            queue.append((f"trial-{trial.number}", trials.suggest(trial, spec.space), trial))
            asked += 1
        wave, queue = queue, []
        named = [(name, trial_config(baseline, params, f"sweep {name}")) for name, params, _ in wave]
        for (name, params, asked_trial), (_, cfg), (result, error) in zip(wave, named, run_configs(named)):
            value = result.validation.metric(metric) if result else None
            entry = {"trial": name, "params": params, "validation": value, "cfg": cfg.model_dump(mode="json"),
                     "merged": result.merged if result else None,
                     "row": trials.result_row(name, params, result, metric, error)}
            trials.record(study, asked_trial, entry)
            entries.append(entry)
    rows = [e["row"] for e in entries]
    done = {e["trial"]: {**e, "cfg": FinetuneConfig.model_validate(e["cfg"])} for e in entries if e["merged"]}
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


def main(argv: list[str] | None = None, prog: str = "python -m flows.sweep") -> int:
    """CLI: ``--config`` names the sweep YAML (default ``configs/sweeps/banking77.yaml``); ``--set`` overrides
    its keys (``n_trials=8``, ``finetune.data.path=...``). Exit 0 on success, 1 with a one-line reason."""
    return finetune_main(argv, run_sweep, prog=prog, description=__doc__.split("\n\n")[0],
                         load=load_sweep, check=lambda loaded: dry_run(loaded[1]))


if __name__ == "__main__":
    sys.exit(main())
