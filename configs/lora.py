"""``lora``: the fine-tuning method and its adapter (tasks/stages/train.py)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from configs.base import Section


class LoraConfig(Section):
    method: Literal["lora", "qlora", "dora", "full"] = Field(
        "lora", description="lora: LoRA on the float32 base (Hu et al. 2021); qlora: LoRA on a 4-bit "
        "bitsandbytes base (Dettmers et al. 2023, settings below; the merge reloads the base in float32); dora: "
        "weight-decomposed LoRA (Liu et al. 2024, peft use_dora); full: full fine-tuning, every weight trained "
        "(no adapter: r, lora_alpha, lora_dropout and target_modules are unused; the merge stage copies the "
        "trained model and checks the copy; learning rates ~1e-5–1e-4 rather than LoRA's ~1e-4–2e-3).")
    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: 4-bit data type (QLoRA paper: nf4).")
    bnb_4bit_use_double_quant: bool = Field(True, description="qlora: quantize the quantization constants too "
                                                              "(double quantization, ~0.4 bit/parameter saved).")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="qlora: dtype the 4-bit weights are de-quantized to for each matmul.")
