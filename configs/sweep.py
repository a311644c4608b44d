"""A hyperparameter sweep's own file (configs/sweeps/, flows/sweep.py): its search space and sampler."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from configs.base import Section
from tasks.common.metrics import ALL_METRICS

# choices read from the metric registry (tasks/common/metrics.py)
SweepMetric = Literal[("auto", *ALL_METRICS)]


class SearchDimension(Section):
    """One hyperparameter's range; exactly one field is set (Optuna's suggest_float with log=True, suggest_float,
    suggest_int, suggest_categorical)."""

    log_uniform: tuple[float, float] | None = Field(None, description="[low, high], sampled log-uniformly.")
    uniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, description="[low, high], inclusive.")
    choice: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDimension":
        kinds = [k for k in ("log_uniform", "uniform", "integer", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"set exactly one of log_uniform, uniform, integer, choice (got {kinds or 'none'})")
        if kinds[0] != "choice":
            low, high = getattr(self, kinds[0])
            if not low < high or (kinds[0] == "log_uniform" and low <= 0):
                raise ValueError(f"{kinds[0]}: expected [low, high] with low < high (and low > 0 for log_uniform)")
        return self


class SweepConfig(Section):
    """A hyperparameter search over a finetune config (flows/sweep.py): trials are train → merge → evaluate on
    the validation split; the best is chosen there and then measured on the test split with the baseline."""

    config: str = Field(description="The finetune YAML every trial starts from (relative to the current folder).")
    finetune: dict[str, Any] = Field(default_factory=dict, description="Config values for every trial and the "
                                     "baseline, on top of `config` (e.g. a smaller train budget).")
    space: dict[str, SearchDimension] = Field(min_length=1, description="Dotted finetune-config key -> range, "
                                              "e.g. train.learning_rate: {log_uniform: [1.0e-4, 3.0e-3]}.")
    sampler: Literal["random", "grid", "tpe"] = Field("random", description="Optuna RandomSampler, GridSampler "
                                                      "(choice dimensions only) or TPESampler.")
    n_trials: int = Field(4, gt=0, description="Sampled trials (grid: at most the grid's size); the baseline "
                                               "(the config's own values) runs in addition.")
    seed: int = 0
    metric: SweepMetric = \
        Field("auto", description="Validation metric to optimise; auto = accuracy (classification) or rouge_l.")
    max_parallel: int = Field(1, gt=0, description="Trials run at once (mapped Prefect tasks, or flow runs of "
                                                   "trial_deployment); each trial's GPU stages hold a `gpu` "
                                                   "concurrency slot where the worker sets one.")
    storage: str | None = Field(None, description="Optuna storage the study lives in, so an interrupted sweep "
                                "resumes where it stopped: a database URL (sqlite:///sweeps.db, postgresql://...) "
                                "or a journal file path; None = <output.dir>/sweeps/optuna.journal.")
    trial_deployment: str | None = Field(None, description="Run each trial as a flow run of this deployment "
                                         "(e.g. sweep-trial/trial, deployments/prefect.yaml) on its work pool, so "
                                         "idle workers on any host take them (output.dir must be storage every "
                                         "worker shares); None = trials as tasks in this flow run's processes.")

    @model_validator(mode="after")
    def _grid_needs_choices(self) -> "SweepConfig":
        if self.sampler == "grid" and any(d.choice is None for d in self.space.values()):
            raise ValueError("sampler grid needs a choice list for every space dimension")
        shared = [key for key in self.space if key.split(".", 1)[0] not in ("lora", "train")]
        if shared:
            raise ValueError(f"space {shared}: trials share the baseline's data, split and base model; only lora.* "
                             "and train.* keys vary per trial (set split.* etc. in finetune:)")
        return self
