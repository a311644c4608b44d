"""predict: greedy generation with an exported ONNX Runtime GenAI folder, on its own — no torch, no transformers.

An exported folder (``tasks/export.py``, targets ``genai-*``) holds the ONNX model, ``genai_config.json`` (which
names the execution provider), the tokenizer with its chat template, and ``inference.json``: how the training
data turned an input text into chat messages (``system_prompt``, ``prompt_template``) and how many tokens an
answer takes (``max_new_tokens``). So ``Predictor(folder)("some text")`` builds the same prompt the model was
trained on. Only ``onnxruntime-genai`` and ``numpy`` are imported.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

INFERENCE_FILE = "inference.json"


def inference_settings(data_cfg, task: str, max_new_tokens: int) -> dict:
    """The ``inference.json`` of an export: how ``tasks/ingest.py`` made chat messages of an input text
    (``data.system_prompt``; ``data.prompt_template`` for classification), and the answer length in tokens."""
    return {"task": task, "system_prompt": data_cfg.system_prompt, "max_new_tokens": max_new_tokens,
            "prompt_template": data_cfg.prompt_template if task == "classification" else "{text}"}


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path if it is a GenAI export.

    Raises:
        FileNotFoundError: it lacks ``genai_config.json`` or ``inference.json``.
    """
    model_dir = Path(model_dir)
    for name in ("genai_config.json", INFERENCE_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir}: no {name}; expected a folder exported with a genai-* target "
                                    "(export.targets)")
    return model_dir


def runtime_config(model_dir: Path):
    """The folder's ``genai_config.json`` as an ``onnxruntime_genai.Config``, with the CPU thread pool sized to the
    CPUs this process may use unless the file sets ``intra_op_num_threads`` itself (faster than the runtime's
    own default on small machines: docs/benchmarks.md)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    declared = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    if "intra_op_num_threads" not in declared["model"]["decoder"].get("session_options", {}):
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return config


class Predictor:
    """An exported GenAI model, its tokenizer and its prompt format, loaded once.

    Args:
        model_dir: an exported ``genai-*`` folder (``genai_config.json`` + ``inference.json``).

    Raises:
        FileNotFoundError: ``model_dir`` lacks ``genai_config.json`` or ``inference.json`` (not a GenAI export).
    """

    def __init__(self, model_dir: str | Path):
        import onnxruntime_genai as og

        self.model_dir = check_model_dir(model_dir)
        self.settings = json.loads((self.model_dir / INFERENCE_FILE).read_text(encoding="utf-8"))
        self._og = og
        self.model = og.Model(runtime_config(self.model_dir))
        self.tokenizer = og.Tokenizer(self.model)

    def messages(self, text: str) -> list[dict]:
        """The chat messages the training data made of ``text``: optional system turn + templated user turn."""
        system = self.settings.get("system_prompt")
        user = {"role": "user", "content": self.settings.get("prompt_template", "{text}").format(text=text)}
        return ([{"role": "system", "content": system}] if system is not None else []) + [user]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered by the folder's chat template with the generation prompt, encoded
        by the folder's tokenizer (both as ONNX Runtime GenAI loads them)."""
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(text)]

    def generate_ids(self, prompt: list[int], max_new_tokens: int, min_new_tokens: int = 0,
                     on_token=None) -> list[int]:
        """Greedy-decode up to ``max_new_tokens`` after ``prompt`` (one sequence, KV cache in the runtime).

        Stops at the end-of-sequence token unless ``min_new_tokens`` are not reached yet (benchmarks use it to
        decode a fixed length). ``on_token()`` is called after each generated token (for timing).

        Returns:
            the new token ids, end-of-sequence token excluded.
        """
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens,
                                  min_length=len(prompt) + min_new_tokens)
        generator = og.Generator(self.model, params)
        generator.append_tokens([prompt])
        while not generator.is_done():
            generator.generate_next_token()
            if on_token:
                on_token()
        new = [int(i) for i in generator.get_sequence(0)[len(prompt):]]
        eos = set(int(i) for i in self.tokenizer.eos_token_ids)
        return new[:-1] if new and new[-1] in eos else new

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens, stripped."""
        return self.tokenizer.decode(ids).strip() if ids else ""

    def __call__(self, texts: str | list[str], max_new_tokens: int | None = None) -> str | list[str]:
        """Answer one input text (returns a str) or a list of them (returns a list, same order)."""
        single = isinstance(texts, str)
        max_new = max_new_tokens or self.settings["max_new_tokens"]
        answers = [self.decode(self.generate_ids(self.prompt_ids(self.messages(t)), max_new))
                   for t in ([texts] if single else texts)]
        return answers[0] if single else answers


class InputError(ValueError):
    """An input file of batch prediction is unreadable or a row lacks its text (names the file, row, field)."""


def read_inputs(path: str | Path) -> list[str]:
    """Input texts of a batch: ``.jsonl`` rows with a non-empty string field ``text``, or any other file as one
    input per non-empty line (UTF-8).

    Raises:
        InputError: missing file, undecodable bytes, bad JSON, or a row without a usable ``text`` field.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read inputs: {e}") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for rowno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: row {rowno}: not valid JSON ({e.msg})") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}: row {rowno}: field 'text': expected a non-empty string, got {text!r}"[:200])
        texts.append(text)
    return texts


def predict(model_dir: str | Path, texts: list[str], max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of the exported model in ``model_dir`` to ``texts`` (plain function; see ``Predictor``).

    Args:
        texts: raw inputs, formatted into chat messages as the training data was (``inference.json``).
        max_new_tokens: answer length limit in tokens; default the folder's (the evaluation's) setting.

    Returns:
        one answer per input text, special tokens removed, whitespace stripped.
    """
    return Predictor(model_dir)(list(texts), max_new_tokens)

