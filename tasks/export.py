"""export: ONNX with KV cache through optimum, for onnxruntime's CPU execution provider, checked against PyTorch."""
from __future__ import annotations

import logging
from pathlib import Path

from configs.schema import ExportConfig
from tasks.base_model import load_model, load_tokenizer
from tasks.files import atomic_dir, read_jsonl

log = logging.getLogger(__name__)
PROVIDER = "CPUExecutionProvider"


class ExportCheckError(RuntimeError):
    """The exported model's greedy outputs disagree with PyTorch's on too many check prompts."""


def export_onnx(merged_model: str, check_file: str, cfg: ExportConfig, out_dir: str | Path) -> dict:
    """Export ``merged_model`` to ONNX (``text-generation-with-past``: decoder with KV cache) in ``out_dir``.

    Before publishing, greedy-decodes the first ``cfg.n_check_prompts`` prompts of ``check_file`` for
    ``cfg.max_new_tokens`` tokens with onnxruntime (CPU execution provider) and with PyTorch; the fraction
    of prompts with identical token ids is ``greedy_agreement``.

    Returns:
        ``{"onnx": path, "greedy_agreement": float in [0, 1], "n_prompts": int, "provider": str}``.

    Raises:
        ExportCheckError: agreement below ``cfg.min_greedy_agreement``; nothing is written to ``out_dir``.
    """
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM

    tokenizer = load_tokenizer(merged_model)
    records = read_jsonl(check_file)[: cfg.n_check_prompts]
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True) for r in records]
    with atomic_dir(out_dir) as tmp:
        main_export(merged_model, output=tmp, task="text-generation-with-past", device="cpu")
        tokenizer.save_pretrained(tmp)
        onnx_model = ORTModelForCausalLM.from_pretrained(tmp, provider=PROVIDER)
        torch_model = load_model(merged_model)
        same = [_greedy(onnx_model, tokenizer, p, cfg.max_new_tokens) ==
                _greedy(torch_model, tokenizer, p, cfg.max_new_tokens) for p in prompts]
        agreement = sum(same) / len(same)
        log.info("export: greedy agreement ONNX vs PyTorch %d/%d", sum(same), len(same))
        if agreement < cfg.min_greedy_agreement:
            raise ExportCheckError(f"export: ONNX and PyTorch greedy outputs agree on {sum(same)}/{len(same)} "
                                   f"prompts, below export.min_greedy_agreement={cfg.min_greedy_agreement:g}")
    return {"onnx": str(out_dir), "greedy_agreement": agreement, "n_prompts": len(same), "provider": PROVIDER}


def _greedy(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()
