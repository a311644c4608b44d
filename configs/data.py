"""``data``: where the examples come from and how they become chat messages (tasks/stages/ingest.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from configs.base import Section


class DataConfig(Section):
    path: str = Field(description="A data file, a folder with train/test (and optional validation/dev) files, "
                                  "or a Hugging Face Hub dataset id.")
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "classification"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="Rename map {source column: canonical column}, applied to the "
                                                "columns a source has, e.g. {category: label}.")
    column_names: list[str] | None = Field(None, description="Column names for header-less csv/tsv files.")
    label_names: dict[str, str] = Field(default_factory=dict,
                                        description="Map from raw label values to label text, e.g. {'-1': negative}.")
    system_prompt: str | None = Field(None, description="System message prepended to every example; None keeps "
                                                        "the chat template's default.")
    prompt_template: str = Field("{text}", description="User turn of a classification example; {text} is the input.")
    drop_empty_answers: bool = Field(False, description="Drop (and count) rows whose answer field (output, "
                                                        "completion, label, last message) is empty, instead of "
                                                        "failing on the first one.")
    revision: str | None = Field(
        None, min_length=1, description="A Hub dataset's branch, tag or commit sha (None = main). The flow resolves "
        "it to the commit sha once per run (offline: the locally cached snapshot's sha of that branch or tag) and "
        "reads the dataset at that commit; the sha is part of the data's cache key, so a re-pushed dataset re-runs "
        "from ingest. Only for a Hub id: a local file or folder is keyed by its content.")
