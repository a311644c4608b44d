"""The machine a benchmark ran on, printed beside its figures: CPU speed here depends on the model and on a few
flags (AVX512-BF16 machines autocast to bf16, AVX2-only ones stay in fp32), so every figure names them."""
from __future__ import annotations

import os
import platform
import subprocess

SPEED_FLAGS = ("avx2", "avx512_bf16", "amx_bf16")


def cpu() -> str:
    """``lscpu``'s model name, CPU count and which of ``SPEED_FLAGS`` it lists, e.g.
    ``"Intel(R) Xeon(R) Processor, 2 CPUs; flags: avx2, avx512_bf16, amx_bf16"``; ``platform.processor()`` as
    the model name where ``lscpu`` is missing."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        info = ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    model = fields.get("Model name", platform.processor() or platform.machine()).strip()
    flags = fields.get("Flags", "").split()
    return f"{model}, {os.cpu_count()} CPUs; flags: {', '.join(f for f in SPEED_FLAGS if f in flags) or 'none'}"
