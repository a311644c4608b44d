"""sweep: hyperparameter search trials (Optuna samples; each trial = train → merge → evaluate on validation).

The search itself is Optuna's (random, grid or TPE sampler, ask/tell); this module only turns a sampled
trial into a finetune config, tells Optuna its result and writes the results. The trials run the pipeline's
declared stages (``flows/sweep.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, Field

from configs.schema import FinetuneConfig, SearchDimension, SweepConfig, get_dotted
from tasks.stages.evaluate import EvalResult
from tasks.common.files import atomic_dir, verify_folder, write_json, write_text_atomic
from tasks.common.metrics import LOSS_METRICS, greater_is_better, task_kind
from tasks.stages.train import TrainSummary

if TYPE_CHECKING:
    import optuna


def objective(sweep: SweepConfig, task: str) -> tuple[str, str]:
    """``(validation metric, "maximize" | "minimize")``: ``sweep.metric``, or for auto the task kind's primary
    metric (``tasks.common.metrics``).

    Raises:
        ValueError: ``task`` is no task kind, or ``sweep.metric`` is not one ``task`` reports.
    """
    kind = task_kind(task)
    metric = kind.primary if sweep.metric == "auto" else sweep.metric
    if metric not in kind.metrics + LOSS_METRICS:
        raise ValueError(f"sweep.metric {metric!r} is not reported for {task} (it reports "
                         f"{', '.join(kind.metrics + LOSS_METRICS)})")
    return metric, "maximize" if greater_is_better(metric) else "minimize"


def make_study(sweep: SweepConfig, direction: str, storage: str | None = None,
               study_name: str | None = None) -> optuna.Study:
    """An Optuna study with ``sweep.sampler`` (grid: over the choices): in memory, or loaded from ``storage``
    (``study_storage``) by ``study_name`` and created there if absent.

    The sampler is seeded with ``sweep.seed`` plus the number of trials the study already holds, so a resumed
    sweep does not draw the samples of its first run again (a random sampler restarts its sequence).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, storage=study_storage(storage) if storage else None,
                                study_name=study_name, load_if_exists=True)
    seed = sweep.seed + len(study.trials)
    if sweep.sampler == "grid":
        study.sampler = optuna.samplers.GridSampler({k: d.choice for k, d in sweep.space.items()}, seed=seed)
    elif sweep.sampler == "tpe":
        study.sampler = optuna.samplers.TPESampler(seed=seed)
    else:
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    return study


def study_storage(location: str):
    """Optuna storage for ``location``: a database URL (``sqlite:///sweeps.db``, ``postgresql://...``: Optuna's
    ``RDBStorage``) or a file path, kept as an Optuna journal (``JournalFileBackend``, its lock a symlink: safe
    on NFS and other shared filesystems; the file's folder is created)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" in location:
        return location
    path = Path(location).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def n_trials(sweep: SweepConfig) -> int:
    """``sweep.n_trials``, capped at the grid's size for the grid sampler."""
    if sweep.sampler != "grid":
        return sweep.n_trials
    size = 1
    for dim in sweep.space.values():
        size *= len(dim.choice)
    return min(sweep.n_trials, size)


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Sample one value per dimension: log_uniform/uniform → ``suggest_float`` (``log=True`` for the former),
    integer → ``suggest_int``, choice → ``suggest_categorical``."""
    params = {}
    for key, dim in space.items():
        if dim.log_uniform:
            params[key] = trial.suggest_float(key, *dim.log_uniform, log=True)
        elif dim.uniform:
            params[key] = trial.suggest_float(key, *dim.uniform)
        elif dim.integer:
            params[key] = trial.suggest_int(key, *dim.integer)
        else:
            params[key] = trial.suggest_categorical(key, dim.choice)
    return params


def tell(study: optuna.Study, trial: optuna.Trial | int, value: float | None) -> None:
    """Report a trial's validation metric to Optuna, or that it failed (``value`` None)."""
    from optuna.trial import TrialState

    if value is None:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, value)


def record(study: optuna.Study, trial: optuna.Trial | None, entry: dict) -> None:
    """Keep a finished trial's ``entry`` (JSON: ``trial``, ``params``, ``validation`` value or None, ``cfg``,
    ``merged`` folder or None, ``row``) in the study, then tell Optuna its value; ``trial`` None is the
    baseline, kept as a study attribute (it is not one of Optuna's samples)."""
    if trial is None:
        study.set_user_attr("baseline", entry)
        return
    trial.set_user_attr("sweep", entry)
    tell(study, trial, entry["validation"])


def restore(study: optuna.Study) -> tuple[list[dict], list[dict]]:
    """What a resumed sweep keeps and what it runs again.

    Returns:
        ``(entries, again)``: the ``record``ed entries of finished trials in run order (the baseline first), and
        the params of trials to run again: those a killed sweep left running (told failed now, so Optuna does
        not wait for them) and finished ones whose merged model is gone or fails its manifest. A trial killed
        between ``record``'s two writes (its entry kept, Optuna not yet told) is finished: told its value now.
    """
    from optuna.trial import TrialState

    entries = [study.user_attrs["baseline"]] if "baseline" in study.user_attrs else []
    again = []
    for trial in study.trials:
        entry = trial.user_attrs.get("sweep")
        if trial.state in (TrialState.RUNNING, TrialState.WAITING):
            if entry is None:
                study.tell(trial.number, state=TrialState.FAIL)
                again.append(trial.params)
                continue
            tell(study, trial.number, entry["validation"])
        if entry is not None:
            entries.append(entry)
    kept = [e for e in entries if e["merged"] is None or not verify_folder(e["merged"])]
    covered = [e["params"] for e in kept]  # a lost model trained again since is not lost any more
    again += [e["params"] for e in entries if e not in kept and e["trial"] != "baseline" and e["params"] not in covered]
    return kept, again


def baseline_params(baseline: FinetuneConfig, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The baseline config's own values of the searched keys."""
    tree = baseline.model_dump(mode="json")
    return {key: get_dotted(tree, key) for key in space}


class TrialResult(BaseModel):
    """One trial's outcome: its evaluation on the validation split, its merged model's folder and its training
    figures."""

    validation: EvalResult
    merged: str
    train: TrainSummary
    ran_on: str = Field("", description="host:checkout of the process that ran it (a trial flow run's worker).")


def result_row(name: str, params: dict, result: TrialResult | None, metric: str, error: str | None = None) -> dict:
    """One line of the results table: trial name, its parameters, the validation metric, eval loss, steps,
    train time and where it ran (``None`` and the error for a failed trial)."""
    if result is None:
        return {"trial": name, **params, f"validation_{metric}": None, "validation_loss": None, "steps": None,
                "train_seconds": None, "error": error, "ran_on": None}
    return {"trial": name, **params, f"validation_{metric}": result.validation.metric(metric),
            "validation_loss": result.validation.eval_loss, "steps": result.train.steps,
            "train_seconds": round(result.train.wall_seconds, 1), "error": error, "ran_on": result.ran_on}


def write_results(out_dir: str | Path, rows: list[dict], best: dict, best_cfg: FinetuneConfig,
                  summary: str) -> dict:
    """Publish ``trials.json`` (the rows), ``best.yaml`` (the best trial's whole finetune config, runnable
    with ``python -m flows.finetune --config``), ``best.json`` and ``summary.md`` in ``out_dir``, atomically.

    Returns:
        ``{"trials", "best_config", "summary"}`` paths.
    """
    out_dir = Path(out_dir)
    header = "".join(f"# {line}\n" for line in
                     [f"Best trial of the sweep in {out_dir} ({best['trial']}):"]
                     + [f"  {k}: {v}" for k, v in best["params"].items()])
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "trials.json", rows)
        write_json(tmp / "best.json", best)
        write_text_atomic(tmp / "best.yaml", header + yaml.safe_dump(best_cfg.model_dump(mode="json"),
                                                                    sort_keys=False))
        write_text_atomic(tmp / "summary.md", summary)
    return {"trials": str(out_dir / "trials.json"), "best_config": str(out_dir / "best.yaml"),
            "summary": str(out_dir / "summary.md")}
