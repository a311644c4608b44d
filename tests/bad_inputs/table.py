"""Print docs/reliability.md's corpus table: every case run through ``python -m flows.finetune --dry-run``.

Usage (from the repository root): ``python -m tests.bad_inputs.table``. Builds the tiny test model in a temporary
folder, runs each case of ``cases.yaml`` from this folder with Hub access off, and prints one markdown row per
case: the input, the exit code and the error line (model paths shortened to ``<model>``).
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

from tests.bad_inputs import CASES, CORPUS, build_broken_models, case_argv
from tests.conftest import build_tiny_model


def main() -> None:
    from flows.finetune import main as cli

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny")
        broken = build_broken_models(model, root / "broken")
        os.chdir(CORPUS)
        print("| # | case | input | exit | error (one line) |\n|---|---|---|---|---|")
        for i, case in enumerate(CASES, 1):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli(case_argv(case, model, broken, root / "out") + ["--dry-run"])
            line = next((x for x in err.getvalue().splitlines() if x.startswith("error:")), "(none)")
            for path in (*broken.values(), model):
                line = line.replace(path, "<model>")
            print(f"| {i} | {case['id']} | {case['what']} | {code} | `{line.replace('|', '/')}` |")


if __name__ == "__main__":
    main()
