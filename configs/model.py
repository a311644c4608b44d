"""``model``: the base model, its cache and how it may be loaded (tasks/base_model.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from configs.base import EMBEDDED_MODEL, Section


class ModelConfig(Section):
    name_or_path: str = Field(EMBEDDED_MODEL, description="Hub id, local folder, or the embedded SmolLM2 model.")
    trust_remote_code: bool = Field(False, description="Run Python code that a model folder or Hub repo ships "
                                                       "(auto_map in its config); off, such a model is refused.")
    cache_dir: str = Field("~/.cache/finetune-flow/models",
                           description="Where converted base models (e.g. the embedded GGUF) are kept.")
    hf_token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding a Hugging Face Hub token (gated or private models "
        "and datasets); the flow puts its value in HF_TOKEN for the libraries at the start of a run. None = the "
        "HF_TOKEN environment variable, if set. The token itself never goes in a config.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel for training: auto = flash_attention_2 on a GPU where the flash-attn "
        "package is installed, else PyTorch SDPA; on a CPU eager for rows of train.max_seq_length <= 512 tokens "
        "(faster than SDPA's CPU kernel under the padding-free rows' mask), else SDPA.")
    revision: str | None = Field(
        None, min_length=1, description="A Hub model's branch, tag or commit sha (None = main). The flow resolves it "
        "to the commit sha once per run (offline: the locally cached snapshot's sha of that branch or tag), "
        "downloads that snapshot and loads every stage from it; the sha is part of the base model's cache key and "
        "recorded in metrics.json and the model cards. Only for a Hub id: local folders and the embedded model "
        "are keyed by content.")
