"""Inference with an exported folder on its own: the plain function, the CLI and the batch flow, from a fresh
interpreter in which torch and transformers cannot be imported."""
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common.files import read_jsonl
from tasks.deploy.runtime.predict import (ROWS_PER_PROCESS, InputError, Predictor, answer_in_processes, predict,
                                          read_inputs)

ROOT = Path(__file__).resolve().parents[1]
# run a module as `python -m` would, with torch and transformers made unimportable
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "sys.argv = ['flows.predict', *sys.argv[1:]]; runpy.run_module('flows.predict', run_name='__main__')")


@pytest.fixture(scope="module")
def exported(tiny_merged, tiny_int4) -> dict:
    """The tiny genai-int4 export and the merged model's inputs and answers on the test split."""
    rows = read_jsonl(Path(tiny_merged["eval"]) / "predictions.jsonl")
    return {"folder": tiny_int4.path, "texts": [r["prompt"][-1]["content"] for r in rows],
            "merged_answers": [r["prediction"] for r in rows], "same_answer": tiny_int4.same_answer}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_predict_function_answers_like_the_merged_model(exported):
    assert exported["same_answer"] == 1.0  # the export's gate measured it on every test row
    assert predict(exported["folder"], exported["texts"]) == exported["merged_answers"]


def test_predictor_rebuilds_the_training_prompt(exported):
    predictor = Predictor(exported["folder"])
    assert predictor.messages("hello") == [{"role": "user", "content": "hello"}]  # tiny config: no system turn
    assert predictor(exported["texts"][0]) == exported["merged_answers"][0]


def test_answers_share_the_prompt_prefix_and_workers_answer_alike(exported, monkeypatch):
    """``answers`` (one generator: the prompts' common prefix run once, the KV cache rewound to its end for each
    prompt) and ``answer_in_processes`` (two single-threaded worker processes) give ``answer``'s labels, in order."""
    predictor = Predictor(exported["folder"])
    prompts = [predictor.prompt_ids(predictor.messages(t)) for t in exported["texts"]]
    assert predictor.label_tree() is not None and len(os.path.commonprefix(prompts)) >= 2
    one_by_one = [predictor.answer(p, 8) for p in prompts]
    assert one_by_one == exported["merged_answers"] and predictor.answers(prompts, 8) == one_by_one

    started = []
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or popen(*a, **k))
    repeat = 2 * ROWS_PER_PROCESS // len(prompts) + 1  # enough rows for two workers, in another order
    assert answer_in_processes(predictor, (prompts * repeat)[::-1], 8, processes=2) == (one_by_one * repeat)[::-1]
    assert len(started) == 2


def test_a_failed_worker_is_an_error_naming_it(exported, tmp_path):
    folder = Path(shutil.copytree(exported["folder"], tmp_path / "copy"))
    predictor = Predictor(folder)
    (folder / "model.onnx").unlink()  # the workers load the folder after this
    prompt = predictor.prompt_ids(predictor.messages(exported["texts"][0]))
    with pytest.raises(RuntimeError, match=r"answering worker 1/2 exited with 1: .*model\.onnx"):
        answer_in_processes(predictor, [prompt] * 2 * ROWS_PER_PROCESS, 8, processes=2)


def test_cli_answers_texts_without_torch(exported, tmp_path):
    done = _run(["--model", exported["folder"], *exported["texts"][:3]], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == exported["merged_answers"][:3]


def test_batch_flow_over_a_file_without_torch(exported, tmp_path):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in exported["texts"]))
    done = _run(["--model", exported["folder"], "--input", str(inputs)], tmp_path)
    assert done.returncode == 0, done.stderr
    output = Path(done.stdout.strip().splitlines()[-1])
    assert output == tmp_path / "inputs.predictions.jsonl"
    assert [r["prediction"] for r in read_jsonl(output)] == exported["merged_answers"]
    assert [r["text"] for r in read_jsonl(output)] == exported["texts"]
    n = len(exported["texts"])  # progress on stderr: rows done of all, rows/s, time left
    assert re.search(rf"predict: 100%.*\b{n}/{n} \[\d\d:\d\d<00:00, +[\d.]+row/s\]", done.stderr), done.stderr[-500:]


def test_cli_errors_are_one_line(exported, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    done = _run(["--model", exported["folder"], "--input", str(bad)], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"error: {bad}: row 2: field 'text': expected a non-empty " \
                                                   "string, got None"
    done = _run(["--model", str(tmp_path), "some text"], tmp_path)
    assert done.returncode == 1 and "no genai_config.json" in done.stderr
    assert not (tmp_path / "bad.predictions.jsonl").exists()


def test_read_inputs_formats_and_errors(tmp_path):
    (tmp_path / "lines.txt").write_text("first input\n\nsecond input\n")
    assert read_inputs(tmp_path / "lines.txt") == ["first input", "second input"]
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(InputError, match=r"broken\.jsonl: row 2: not valid JSON"):
        read_inputs(tmp_path / "broken.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt: cannot read inputs"):
        read_inputs(tmp_path / "latin1.txt")
