"""sweep: hyperparameter search trials (Optuna samples; each trial = train → merge → evaluate on validation).

The search itself is Optuna's (random, grid or TPE sampler, ask/tell); this module only turns a sampled
trial into a finetune config, tells Optuna its result and writes the results. The trials run the pipeline's
declared stages (``flows/sweep.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from configs.schema import FinetuneConfig, SearchDimension, SweepConfig, get_dotted
from tasks.evaluate import EvalResult
from tasks.files import atomic_dir, write_json, write_text_atomic
from tasks.metrics import LOSS_METRICS, greater_is_better, task_kind
from tasks.train import TrainSummary

if TYPE_CHECKING:
    import optuna


def objective(sweep: SweepConfig, task: str) -> tuple[str, str]:
    """``(validation metric, "maximize" | "minimize")``: ``sweep.metric``, or for auto the task kind's primary
    metric (``tasks.metrics``).

    Raises:
        ValueError: ``task`` is no task kind, or ``sweep.metric`` is not one ``task`` reports.
    """
    kind = task_kind(task)
    metric = kind.primary if sweep.metric == "auto" else sweep.metric
    if metric not in kind.metrics + LOSS_METRICS:
        raise ValueError(f"sweep.metric {metric!r} is not reported for {task} (it reports "
                         f"{', '.join(kind.metrics + LOSS_METRICS)})")
    return metric, "maximize" if greater_is_better(metric) else "minimize"


def make_study(sweep: SweepConfig, direction: str) -> optuna.Study:
    """An in-memory Optuna study with ``sweep.sampler`` seeded by ``sweep.seed`` (grid: over the choices)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.sampler == "grid":
        sampler = optuna.samplers.GridSampler({k: d.choice for k, d in sweep.space.items()}, seed=sweep.seed)
    elif sweep.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sweep.seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.create_study(direction=direction, sampler=sampler)


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


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None) -> None:
    """Report a trial's validation metric to Optuna, or that it failed (``value`` None)."""
    from optuna.trial import TrialState

    if value is None:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, value)


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


def result_row(name: str, params: dict, result: TrialResult | None, metric: str, error: str | None = None) -> dict:
    """One line of the results table: trial name, its parameters, the validation metric, eval loss, steps and
    train time (``None`` and the error for a failed trial)."""
    if result is None:
        return {"trial": name, **params, f"validation_{metric}": None, "validation_loss": None, "steps": None,
                "train_seconds": None, "error": error}
    return {"trial": name, **params, f"validation_{metric}": result.validation.metric(metric),
            "validation_loss": result.validation.eval_loss, "steps": result.train.steps,
            "train_seconds": round(result.train.wall_seconds, 1), "error": error}


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
