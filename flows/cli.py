"""``finetune-flow``: one command for the pipeline's entry points (``[project.scripts]`` in pyproject.toml).

    finetune-flow run [--config FILE] [--set KEY=VALUE ...]   fine-tune, evaluate, merge, export (flows.finetune)
    finetune-flow validate ...                                check config, data and base model; write nothing
    finetune-flow print-config ...                            the resolved config as YAML
    finetune-flow sweep ...                                   hyperparameter sweep (flows.sweep)
    finetune-flow nightly ...                                 nightly retrain and promotion (flows.nightly)
    finetune-flow predict --model DIR TEXT ...                answer with an exported model (flows.predict)
    finetune-flow export-run RUN_DIR DEST                     a run folder with real files and model cards

``finetune-flow COMMAND --help`` lists that command's options (and, for run/validate/print-config/sweep/nightly,
every config field). ``python -m flows.finetune`` and the other modules keep working.
"""
from __future__ import annotations

import sys

COMMANDS = {
    "run": "fine-tune, evaluate, merge and export",
    "validate": "check the config, the data and the base model; train and write nothing",
    "print-config": "print the resolved config (every default and --set applied) as YAML",
    "sweep": "hyperparameter sweep over a search space (configs/sweeps/)",
    "nightly": "retrain when data or config changed; promote only a better model",
    "predict": "answer texts or a file with an exported ONNX model",
    "export-run": "copy a run folder with real files and Hugging Face model cards",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its module's ``main`` with the remaining arguments; exit status as that ``main``'s
    (0 success, 1 one-line error, 2 usage)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<13} {text}" for name, text in COMMANDS.items())
        print(f"usage: finetune-flow COMMAND [options]   (COMMAND --help for its options)\n\ncommands:\n{usage}",
              file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    prog = f"finetune-flow {command}"
    if command in ("run", "sweep", "nightly"):  # Prefect's temporary server starts while the flow imports
        from flows.api_server import begin

        begin()
    if command in ("run", "validate", "print-config"):
        from flows.finetune import main as finetune_main

        extra = {"validate": ["--dry-run"], "print-config": ["--print-config"]}.get(command, [])
        return finetune_main(rest + extra, prog=prog)
    if command == "sweep":
        from flows.sweep import main as sweep_main

        return sweep_main(rest, prog=prog)
    if command == "nightly":
        from flows.nightly import main as nightly_main

        return nightly_main(rest, prog=prog)
    if command == "predict":
        from flows.predict import main as predict_main

        return predict_main(rest, prog=prog)
    from tasks.stages.portable import main as export_main

    return export_main(rest, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
