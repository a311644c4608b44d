"""predict: greedy generation with an exported ONNX Runtime GenAI folder, on its own — no torch, no transformers.

An exported folder (``tasks/deploy/export.py``, targets ``genai-*``) holds the ONNX model, ``genai_config.json`` (which
names the execution provider), the tokenizer with its chat template, and ``inference.json``: how the training
data turned an input text into chat messages (``system_prompt``, ``prompt_template``) and how many tokens an
answer takes (``max_new_tokens``). So ``Predictor(folder)("some text")`` builds the same prompt the model was
trained on. An adapter export (``genai-int4-adapter``) is a whole model (its int4 base with the adapter baked in,
what the export gate measured) and also holds the adapter file alone, naming its int4 base; one ``Predictor``
serves any number of such adapters on one shared base, chosen per request (``adapter=``), each with its own
prompt format. Only ``onnxruntime``, ``onnxruntime-genai``, ``numpy`` and ``safetensors`` are imported.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tasks.common.labels import LabelTree, constrained_greedy
from tasks.common.metrics import strip_reasoning
from tasks.deploy.runtime.adapters import ADAPTER_INFO, AdapterError, base_identity, check_adapter, check_baked

INFERENCE_FILE = "inference.json"


def inference_settings(data_cfg, task: str, max_new_tokens: int, name: str | None = None,
                       labels: list[str] | None = None) -> dict:
    """The ``inference.json`` of an export: the run config's ``name`` (an adapter serves under it), how
    ``tasks/stages/ingest.py`` made chat messages of an input text (``data.system_prompt``; ``data.prompt_template``
    for classification), the answer length in tokens and, for answers constrained to a label set, its ``labels``
    (the export adds each one's answer token ids, ``label_token_ids``)."""
    return {"name": name, "task": task, "system_prompt": data_cfg.system_prompt, "max_new_tokens": max_new_tokens,
            "prompt_template": data_cfg.prompt_template if task == "classification" else "{text}"} | (
        {"labels": sorted(labels)} if labels else {})


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path if it is a GenAI export: a whole model, or an adapter export whose int4 base is
    where its ``adapter.json`` says.

    Raises:
        FileNotFoundError: it lacks ``genai_config.json`` or ``inference.json``, or its base is gone.
    """
    model_dir = Path(model_dir)
    folder = base_of(model_dir) if runs_on_base(model_dir) else model_dir
    for path in (folder / "genai_config.json", model_dir / INFERENCE_FILE):
        if not path.is_file():
            missing = path.name if path.parent == model_dir else f"{path} (its int4 base)"
            raise FileNotFoundError(f"{model_dir}: no {missing}; expected a folder exported with a genai-* target "
                                    "(export.targets)")
    return model_dir


def runs_on_base(folder: Path) -> bool:
    """Whether ``folder`` is an adapter export that holds no model of its own (exported before adapters were
    baked in), so that it runs on its int4 base."""
    return (folder / ADAPTER_INFO).is_file() and not (folder / "genai_config.json").is_file()


def base_of(adapter_export: str | Path) -> Path:
    """The int4 base folder an adapter export (``genai-int4-adapter``) runs on, from its ``adapter.json``."""
    return Path(json.loads((Path(adapter_export) / ADAPTER_INFO).read_text(encoding="utf-8"))["base"])


def adapter_name(adapter_export: str | Path) -> str:
    """The name an adapter export serves under: the run config's ``name`` (``inference.json``), else its folder's."""
    settings = json.loads((Path(adapter_export) / INFERENCE_FILE).read_text(encoding="utf-8"))
    return settings.get("name") or Path(adapter_export).name


def cpu_count() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def runtime_config(model_dir: Path, threads: int | None = None):
    """The folder's ``genai_config.json`` as an ``onnxruntime_genai.Config``, with the CPU thread pool sized to
    ``threads`` (default: the CPUs this process may use) unless the file sets ``intra_op_num_threads`` itself (faster
    than the runtime's own default on small machines: docs/benchmarks.md)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    declared = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    if "intra_op_num_threads" not in declared["model"]["decoder"].get("session_options", {}):
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads or cpu_count()}}}}))
    return config


class Predictor:
    """An exported GenAI model with its tokenizer and prompt format, loaded once: a whole model (``genai-int4``, or
    a ``genai-int4-adapter`` export with its adapter baked in, served under the adapter's name), or one int4 base
    with any number of adapters (``genai-int4-adapter`` exports), chosen per request.

    Args:
        model_dir: a ``genai-*`` export (an adapter export made before adapters were baked in: its base is loaded
            and the adapter with it).
        adapters: ``{name: adapter export folder}`` to load as well, all for the same int4 base; ``model_dir``
            may then be that base's folder itself.
        threads: ONNX Runtime's intra-op threads (default: the CPUs this process may use; ``answer_in_processes``
            runs one per worker process).

    Raises:
        FileNotFoundError: ``model_dir`` is not a GenAI export.
        tasks.deploy.runtime.adapters.AdapterError: an adapter (or a baked model's file) is corrupted, made for another
            base, or its rank/targets do not fit the base (one line naming the file).
    """

    genai = True  # served by ONNX Runtime GenAI (a KV cache to rewind; a worker process rebuilds it from ``source``)

    def __init__(self, model_dir: str | Path, adapters: dict[str, str | Path] | None = None,
                 threads: int | None = None):
        import onnxruntime_genai as og

        self.source = {"model_dir": str(model_dir), "adapters": {k: str(v) for k, v in (adapters or {}).items()}}
        folder, adapters = Path(model_dir), dict(adapters or {})
        baked = None
        if (folder / ADAPTER_INFO).is_file() and not adapters and not runs_on_base(folder):
            baked = adapter_name(check_baked(check_model_dir(folder)))
        elif (folder / ADAPTER_INFO).is_file():
            check_model_dir(folder)
            adapters = {adapter_name(folder): folder, **adapters}
            folder = base_of(folder)
        elif not adapters:
            check_model_dir(folder)
        elif not (folder / "genai_config.json").is_file():
            raise FileNotFoundError(f"{folder}: no genai_config.json; expected an int4 base folder")
        self.model_dir, self._og = folder, og
        own = folder / INFERENCE_FILE
        self.prompt_formats = {baked: json.loads(own.read_text(encoding="utf-8"))} if own.is_file() else {}
        self.model = og.Model(runtime_config(folder, threads))
        self.tokenizer = og.Tokenizer(self.model)
        self._adapters = og.Adapters(self.model) if adapters else None
        identity = base_identity(folder) if adapters else None  # hashed once, not per adapter
        for name, path in adapters.items():
            file = check_adapter(path, folder, identity)
            try:
                self._adapters.load(str(file), name)
            except Exception as e:  # noqa: BLE001 - the runtime's own error types; one line naming the file
                raise AdapterError(f"{file}: ONNX Runtime GenAI cannot load it ({str(e).splitlines()[0]})") from None
            self.prompt_formats[name] = json.loads((Path(path) / INFERENCE_FILE).read_text(encoding="utf-8"))
        self.default = baked or (None if None in self.prompt_formats or len(adapters) != 1 else next(iter(adapters)))
        self._trees: dict[str | None, LabelTree | None] = {}

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return [name for name in self.prompt_formats if name is not None]

    @property
    def settings(self) -> dict:
        """The default prompt format (``inference.json``): the model's own, or its only adapter's."""
        return self.prompt_formats[self._choose(None)]

    def _choose(self, adapter: str | None) -> str | None:
        adapter = adapter or self.default
        if adapter not in self.prompt_formats:
            wanted = "no adapter was chosen" if adapter is None else f"no adapter named {adapter!r}"
            raise InputError(f"{self.model_dir}: {wanted}; loaded adapters: {', '.join(self.adapters)}")
        return adapter

    def messages(self, text: str, adapter: str | None = None) -> list[dict]:
        """The chat messages the training data (of ``adapter``) made of ``text``: optional system turn +
        templated user turn."""
        settings = self.prompt_formats[self._choose(adapter)]
        system = settings.get("system_prompt")
        user = {"role": "user", "content": settings.get("prompt_template", "{text}").format(text=text)}
        return ([{"role": "system", "content": system}] if system is not None else []) + [user]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered by the folder's chat template with the generation prompt, encoded
        by the folder's tokenizer (both as ONNX Runtime GenAI loads them)."""
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(text)]

    def generate_ids(self, prompt: list[int], max_new_tokens: int, min_new_tokens: int = 0,
                     on_token=None, adapter: str | None = None) -> list[int]:
        """Greedy-decode up to ``max_new_tokens`` after ``prompt`` (one sequence, KV cache in the runtime), with
        ``adapter`` active (default: the only one loaded).

        Stops at the end-of-sequence token unless ``min_new_tokens`` are not reached yet (benchmarks use it to
        decode a fixed length). ``on_token()`` is called after each generated token (for timing).

        Returns:
            the new token ids, end-of-sequence token excluded.
        """
        generator = self._generator(prompt, adapter, max_length=len(prompt) + max_new_tokens,
                                    min_length=len(prompt) + min_new_tokens)
        while not generator.is_done():
            generator.generate_next_token()
            if on_token:
                on_token()
        new = [int(i) for i in generator.get_sequence(0)[len(prompt):]]
        eos = set(int(i) for i in self.tokenizer.eos_token_ids)
        return new[:-1] if new and new[-1] in eos else new

    def _generator(self, prompt: list[int], adapter: str | None, **search):
        """A greedy ONNX Runtime GenAI generator with ``adapter`` active (default: the only one loaded) that has
        read ``prompt``; ``search``: its length options (``max_length``, ``min_length``)."""
        og, name = self._og, self._choose(adapter)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, **search)
        generator = og.Generator(self.model, params)
        if self._adapters is not None and name is not None:
            generator.set_active_adapter(self._adapters, name)
        if prompt:
            generator.append_tokens([prompt])
        return generator

    def label_tree(self, adapter: str | None = None) -> LabelTree | None:
        """The label tree of the prompt format of ``adapter`` (``inference.json``'s ``label_token_ids``: the token
        ids of each label's answer, as the export wrote them with the training tokenizer), or None: free text."""
        name = self._choose(adapter)
        if name not in self._trees:
            ids = self.prompt_formats[name].get("label_token_ids")
            self._trees[name] = LabelTree.build(ids) if ids else None
        return self._trees[name]

    def answer(self, prompt: list[int], max_new_tokens: int, adapter: str | None = None) -> str:
        """The answer to ``prompt`` (token ids): a label of ``label_tree`` (decoded along it: only its branch points
        call the model, ``tasks.common.labels.constrained_greedy``), or free greedy text (``generate_ids`` then
        ``decode``) when the folder has no label set."""
        tree = self.label_tree(adapter)
        if tree is None:
            return self.decode(self.generate_ids(prompt, max_new_tokens, adapter=adapter))
        generator = self._generator(prompt, adapter, max_length=len(prompt) + self._longest(tree) + 1)
        return _along_tree(generator, tree)

    def answers(self, prompts: list[list[int]], max_new_tokens: int, adapter: str | None = None,
                on_answer=None) -> list[str]:
        """``answer`` to each of ``prompts``, in order (``on_answer(answer)`` is called with each as it is made).

        Answers along a label tree share one generator: the prompts' common prefix (the chat template's opening
        turns: 8 tokens of a banking77 prompt) is run once and the KV cache is rewound to its end before each
        prompt's own tokens (``Generator.rewind_to``); the answers are ``answer``'s (tested). Free text, a model
        whose state cannot be rewound and the NPU predictors (``genai`` False) answer one ``answer`` at a time."""
        tree, answers = self.label_tree(adapter) if self.genai else None, []
        head = min(len(os.path.commonprefix(prompts)), min(map(len, prompts), default=1) - 1)
        generator = None
        if tree is not None and head >= 1:
            generator = self._generator(prompts[0][:head], adapter,
                                        max_length=max(map(len, prompts)) + self._longest(tree) + 1)
            try:
                generator.rewind_to(head)  # a no-op here; raises where the state cannot be rewound (LFM2 in 0.18)
            except RuntimeError:
                generator = None
        for prompt in prompts:
            if generator is None:
                answers.append(self.answer(prompt, max_new_tokens, adapter))
            else:
                generator.rewind_to(head)
                generator.append_tokens([prompt[head:]])
                answers.append(_along_tree(generator, tree))
            if on_answer is not None:
                on_answer(answers[-1])
        return answers

    @staticmethod
    def _longest(tree: LabelTree) -> int:
        return max(map(len, tree.sequences.values()))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens and without a leading reasoning block
        (``tasks.common.metrics.strip_reasoning``: Qwen3 writes ``<think>...</think>`` before every answer),
        stripped."""
        return strip_reasoning(self.tokenizer.decode(ids)) if ids else ""

    def __call__(self, texts: str | list[str], max_new_tokens: int | None = None,
                 adapter: str | list[str | None] | None = None) -> str | list[str]:
        """Answer one input text (returns a str) or a list of them (returns a list, same order), with ``adapter``
        (one name for all, or one per text; None = the default). A list shows a progress bar on stderr: rows done,
        rows/s and the time left."""
        from tqdm.auto import tqdm

        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        chosen = adapter if isinstance(adapter, list) else [adapter] * len(texts)
        if not single and len({self._choose(name) for name in chosen}) == 1:  # one prompt format: the batch path
            name = chosen[0]
            max_new = max_new_tokens or self.prompt_formats[self._choose(name)]["max_new_tokens"]
            return answer_in_processes(self, [self.prompt_ids(self.messages(t, name)) for t in texts], max_new,
                                       name, desc="predict")
        answers = []
        rows = tqdm(zip(texts, chosen), total=len(texts), desc="predict", unit="row", file=sys.stderr,
                    disable=single)
        for text, name in rows:
            max_new = max_new_tokens or self.prompt_formats[self._choose(name)]["max_new_tokens"]
            answers.append(self.answer(self.prompt_ids(self.messages(text, name)), max_new, adapter=name))
        return answers[0] if single else answers


def _along_tree(generator, tree: LabelTree) -> str:
    """The label ``generator`` (which has read the prompt) answers along ``tree``."""
    def next_logits(tokens: list[int]):
        generator.append_tokens([tokens])
        return generator.get_logits()[0, -1]

    return constrained_greedy(tree, generator.get_logits()[0, -1], next_logits)[0]


ROWS_PER_PROCESS = 100  # fewer rows than this per worker: answered in this process (a worker starts in ~1 s)


def answer_in_processes(predictor: Predictor, prompts: list[list[int]], max_new_tokens: int,
                        adapter: str | None = None, processes: int | None = None, desc: str = "answers") -> list[str]:
    """``predictor.answers(prompts, ...)``, split over ``processes`` worker processes (default: the CPUs this
    process may use, at most one per ``ROWS_PER_PROCESS`` prompts; an NPU predictor answers in this process) that
    each load the same folder with one ONNX Runtime thread: on a 2-core CPU two single-threaded sessions answer
    ~1.5x the rows per second of one two-threaded session, whose small per-token matrix products leave its threads
    waiting on each other (docs/benchmarks.md). Worker i answers prompts i, i + processes, ... (an even mix of
    lengths) and writes one JSON line per answer; a progress bar on stderr counts them. The answers are the same as
    in one process (tested).

    Args:
        prompts: token ids of each prompt (``Predictor.prompt_ids``).

    Returns:
        one answer per prompt, in order.

    Raises:
        RuntimeError: a worker failed (its last line of stderr, and its exit code).
    """
    import subprocess
    import tempfile
    import time

    from tqdm.auto import tqdm

    processes = min(processes or cpu_count(), len(prompts) // ROWS_PER_PROCESS) if predictor.genai else 1
    bar = tqdm(total=len(prompts), desc=desc, unit="row", file=sys.stderr, disable=len(prompts) < 2)
    if processes <= 1:
        with bar:
            return predictor.answers(prompts, max_new_tokens, adapter, on_answer=lambda _: bar.update())
    root = str(Path(__file__).resolve().parents[3])  # the folder that holds the tasks package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="answers-") as tmp, bar:
        workers = []
        for i in range(processes):
            job = Path(tmp) / f"{i}.json"
            job.write_text(json.dumps({**predictor.source, "adapter": adapter, "max_new_tokens": max_new_tokens,
                                       "prompts": prompts[i::processes]}), encoding="utf-8")
            with open(Path(tmp) / f"{i}.err", "wb") as err:
                workers.append(subprocess.Popen([sys.executable, "-m", __name__, str(job), str(Path(tmp) / f"{i}.out")],
                                                env=env, stdout=subprocess.DEVNULL, stderr=err))
        try:
            while any(w.poll() is None for w in workers):
                time.sleep(0.2)
                bar.update(sum(_lines(Path(tmp) / f"{i}.out") for i in range(processes)) - bar.n)
        finally:  # interrupted (or cancelled): no worker outlives the call
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        for i, worker in enumerate(workers):
            if worker.returncode:
                last = (Path(tmp) / f"{i}.err").read_text(encoding="utf-8", errors="replace").strip().splitlines()
                raise RuntimeError(f"{predictor.model_dir}: answering worker {i + 1}/{processes} exited with "
                                   f"{worker.returncode}: {last[-1] if last else 'no message'}")
        answers = [None] * len(prompts)
        for i in range(processes):  # worker i answered prompts i, i + processes, ...
            answers[i::processes] = map(json.loads, (Path(tmp) / f"{i}.out").read_text(encoding="utf-8").splitlines())
        bar.update(len(prompts) - bar.n)
    return answers


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _answer_worker(job: str, out: str) -> None:
    """One worker of ``answer_in_processes``: answer the job file's prompts with one thread, one JSON line each."""
    spec = json.loads(Path(job).read_text(encoding="utf-8"))
    predictor = Predictor(spec["model_dir"], spec["adapters"], threads=1)
    with open(out, "w", encoding="utf-8") as f:
        def write(answer: str) -> None:
            f.write(json.dumps(answer) + "\n")
            f.flush()

        predictor.answers(spec["prompts"], spec["max_new_tokens"], spec["adapter"], on_answer=write)


def load(models: list[str]) -> Predictor:
    """One ``Predictor`` for ``models``: one export folder, or adapter exports on one int4 base, each given as
    ``DIR`` (served under ``adapter_name(DIR)``) or ``NAME=DIR``.

    Raises:
        InputError: two adapters with one name, or several folders that are not adapter exports of one base.
    """
    if len(models) == 1 and not split_model_arg(models[0])[0]:
        return Predictor(models[0])
    named = {}
    for name, folder in map(split_model_arg, models):
        if not (Path(folder) / ADAPTER_INFO).is_file():
            raise InputError(f"{folder}: only adapter exports (genai-int4-adapter) can be served together")
        check_model_dir(folder)
        name = name or adapter_name(folder)
        if name in named:
            raise InputError(f"two adapters named {name!r} ({named[name]}, {folder}); name them: --model NAME=DIR")
        named[name] = folder
    bases = {json.loads((Path(f) / ADAPTER_INFO).read_text(encoding="utf-8"))["base_sha256"] for f in named.values()}
    if len(bases) > 1:
        raise InputError(f"the adapters run on {len(bases)} different int4 bases; one process serves one base")
    return Predictor(base_of(next(iter(named.values()))), adapters=named)


def split_model_arg(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` -> ``(NAME, DIR)``; ``DIR`` (also one that contains ``=``) -> ``("", DIR)``."""
    name, sep, folder = spec.partition("=")
    return (name, folder) if sep and not Path(spec).exists() else ("", spec)


class InputError(ValueError):
    """An input file of batch prediction is unreadable or a row lacks its text (names the file, row, field)."""


def read_inputs(path: str | Path) -> list[str]:
    """Input texts of a batch (``read_requests`` without the adapter names)."""
    return [text for text, _ in read_requests(path)]


def read_requests(path: str | Path) -> list[tuple[str, str | None]]:
    """``(text, adapter name or None)`` per input of a batch: ``.jsonl`` rows with a non-empty string field
    ``text`` and an optional string field ``adapter``, or any other file as one input per non-empty line
    (UTF-8).

    Raises:
        InputError: missing file, undecodable bytes, bad JSON, or a row without a usable ``text`` field or with
            a non-string ``adapter``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read inputs: {e}") from None
    if path.suffix != ".jsonl":
        return [(line, None) for line in lines if line.strip()]
    requests = []
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
        adapter = row.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise InputError(f"{path}: row {rowno}: field 'adapter': expected an adapter name, got {adapter!r}"[:200])
        requests.append((text, adapter))
    return requests


def predict(model_dir: str | Path | list[str], texts: list[str], max_new_tokens: int | None = None,
            adapter: str | list[str | None] | None = None) -> list[str]:
    """Greedy answers of the exported model in ``model_dir`` (or the adapter exports listed, see ``load``) to
    ``texts`` (plain function; see ``Predictor``).

    Args:
        texts: raw inputs, formatted into chat messages as the training data was (``inference.json``).
        max_new_tokens: answer length limit in tokens; default the folder's (the evaluation's) setting.
        adapter: the adapter to answer with, one for all texts or one per text (None: the default).

    Returns:
        one answer per input text, special tokens removed, whitespace stripped.
    """
    models = model_dir if isinstance(model_dir, list) else [str(model_dir)]
    return load(models)(list(texts), max_new_tokens, adapter)


if __name__ == "__main__":  # a worker of answer_in_processes
    _answer_worker(*sys.argv[1:3])
