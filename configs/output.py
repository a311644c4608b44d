"""``output``: where runs are written and published (flows/finetune.py, tasks/stages/hub.py)."""
from __future__ import annotations

from pydantic import Field, field_validator

from configs.base import HUB_REPO_ID, Section


class HubPushConfig(Section):
    """Where ``output.push_to_hub`` uploads a published run (``tasks/stages/hub.py``)."""

    repo_id: str = Field(description="Hub model repo, <user or org>/<name>; created if missing.")
    private: bool = Field(True, description="Create the repo private (an existing repo keeps its visibility).")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not HUB_REPO_ID.fullmatch(value) or ".." in value or "--" in value:
            raise ValueError("not a Hub repo id (<user or org>/<name>: letters, digits, '-', '_', '.')")
        return value


class OutputConfig(Section):
    dir: str = "outputs"
    run_name: str | None = Field(None, description="Folder name of this run; None = <name>-<UTC timestamp>-<4 hex>.")
    result_storage: str | None = Field(None, description="Prefect result/cache store: a folder, or "
                                                         "block:<type>/<name> for a saved storage block; "
                                                         "None = <output.dir>/.prefect-results.")
    push_to_hub: HubPushConfig | None = Field(
        None, description="Upload the published run's merged model (repo root) and adapter (adapter/), with their "
        "model cards, to this Hub model repo after the run has passed every gate and published latest.json "
        "(the nightly retrain: only a promoted model); None = no upload. Token: HF_TOKEN or "
        "model.hf_token_secret.")
