"""The exported folder's ``tokenizer.json``, in the form ONNX Runtime Extensions (GenAI's tokenizer) reads as
transformers does."""
from __future__ import annotations

import json
from pathlib import Path


def portable_tokenizer(path: Path) -> None:
    """Rewrite a byte-level BPE ``tokenizer.json`` that carries a SentencePiece-style decoder into the plain
    byte-level form, in place.

    transformers' GGUF conversion (the embedded SmolLM2) emits a byte-level BPE with ``byte_fallback`` and a
    ``ByteFallback, Fuse, Replace("▁", " "), ByteLevel`` decoder chain; ONNX Runtime Extensions (GenAI's
    tokenizer) then takes it for a SentencePiece BPE and encodes every space and newline as id -1. With a
    ByteLevel pre-tokenizer every byte is already a vocabulary symbol, so neither byte fallback nor the
    ``▁`` replacement ever applies and the plain form encodes identically (``check_export`` verifies the ids
    on every test prompt).
    """
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre, decoder = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if decoder.get("type") != "Sequence" or not any(s.get("type") == "ByteLevel" for s in steps):
        return
    spec["model"]["byte_fallback"] = False
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
