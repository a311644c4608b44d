"""The building blocks of every config section: the error type and the base model that forbids unknown keys."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict


EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
CONFIG_DIR = Path(__file__).resolve().parent
# A Hub repo id: namespace/name (huggingface_hub.utils.validate_repo_id's characters).
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# A Hugging Face user access token ("hf_" + 34 letters/digits today): refused anywhere in a config.
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field's dotted path."""


class Section(BaseModel):
    """A config section: unknown keys are errors (a misspelt key fails with its dotted path), assignments are
    validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
