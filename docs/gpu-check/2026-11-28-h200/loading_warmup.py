"""What set the 8B QLoRA step's 13.98 GiB peak in this GPU check: transformers 4.57's loader, not training.

Before it reads any weight, ``from_pretrained(..., device_map=...)`` allocates one block on the GPU to warm CUDA's
caching allocator (``transformers.modeling_utils.caching_allocator_warmup``); ``torch.cuda.max_memory_allocated``
counts it. This script runs that function of transformers 4.57.6 itself on the Llama-3.1-8B structure, built as the
step's ``from_pretrained`` built it (``dtype=torch.float32``, bitsandbytes nf4 with double quantization and bf16
compute, ``device_map={"": "cuda:0"}``), with the GPU calls answered for an idle H200 and the allocation recorded
instead of made (no GPU needed). Run on a CPU machine, with transformers 4.57.6 beside this project's environment:

    pip install --target /tmp/tf457 --no-deps transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
    PYTHONPATH=/tmp/tf457 .venv/bin/python docs/gpu-check/2026-11-28-h200/loading_warmup.py

Prints (2026-12-07): ``transformers 4.57.6: warm-up allocation 15,009,849,344 B = 13.979 GiB`` — the step's
measured peak (13.98 GiB). 4.57 counts every parameter of the empty model at float32 (the 4-bit layers too, not yet
quantized) but the LM head (``_tied_weights_keys``, skipped even when untied), divides by its quantizer's factor 4
and allocates that many float16 values: 7,504,924,672 × 4 B / 4 × 2 B. transformers 5.5 counts the loaded size (4-bit
weights at 0.5 B; 5.5.4 read), below the training peak.
"""
import sys
from pathlib import Path

import torch
import transformers
import transformers.modeling_utils as mu
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from transformers.quantizers import AutoHfQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from benchmarks.train_throughput import LLAMA_CONFIGS  # noqa: E402  (the configs the step built its model from)

if transformers.__version__ != "4.57.6":
    raise SystemExit(f"needs transformers 4.57.6, the GPU check's (found {transformers.__version__}): see above")

config = LlamaConfig(**LLAMA_CONFIGS["llama-3.1-8b"])
quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16), pre_quantized=False)
torch.set_default_dtype(torch.float32)  # from_pretrained(dtype=torch.float32), as tasks/base_model.py loaded it then
with mu.ContextManagers(LlamaForCausalLM.get_init_context(True, False)):  # meta tensors, as from_pretrained
    model = LlamaForCausalLM(config)
model.tie_weights()
device_map = {"": "cuda:0"}
quantizer.preprocess_model(model=model, device_map=device_map, keep_in_fp32_modules=model._keep_in_fp32_modules,
                           config=config)
expanded = mu.expand_device_map(device_map, list(model.state_dict()))

asked, real_empty = [], torch.empty


def recorded_empty(*size, dtype=None, device=None, **kwargs):
    """``torch.empty`` that records a CUDA allocation's bytes instead of making it."""
    if device is not None and torch.device(device).type == "cuda":
        asked.append(int(size[0]) * torch.tensor([], dtype=dtype).element_size())
        return None
    return real_empty(*size, dtype=dtype, device=device, **kwargs)


torch.empty = recorded_empty
torch.cuda.mem_get_info = lambda index=0: (140 * 2**30, 140 * 2**30)  # an idle 140-GiB H200: no cap reached
torch.cuda.memory_reserved = torch.cuda.memory_allocated = lambda index=0: 0  # a fresh process (each arm's)
torch.cuda.current_device = lambda: 0
try:
    mu.caching_allocator_warmup(model, expanded, quantizer)
finally:
    torch.empty = real_empty
print(f"transformers {transformers.__version__}: warm-up allocation {asked[0]:,} B = {asked[0] / 2**30:.3f} GiB")
