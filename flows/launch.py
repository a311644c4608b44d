"""The installed ``finetune-flow`` command's entry point (``[project.scripts]`` in pyproject.toml).

In a clone, the pipeline's modules are the top-level packages ``configs``, ``flows`` and ``tasks``: that is how
``python -m flows.finetune``, Prefect's entrypoints (``flows/finetune.py:finetune``) and the tests import them.
Those names are too common for a shared ``sys.path``, so the wheel installs the three folders as
``finetune_flow/configs``, ``finetune_flow/flows`` and ``finetune_flow/tasks`` (a namespace folder): nothing
named ``configs``/``flows``/``tasks`` becomes importable for other programs. This module, imported as
``finetune_flow.flows.launch``, puts that folder first on its own process's ``sys.path`` and runs
``flows.cli``, so the command imports the modules under their usual names (the names Prefect's result records
and the stage cache keys use), whether from a wheel, an editable install or a clone.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    """Run ``flows.cli.main`` with the folder holding ``configs/``, ``flows/`` and ``tasks/`` first on
    ``sys.path``; its exit status (0 success, 1 one-line error, 2 usage)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from flows.cli import main as cli_main

    return cli_main()
