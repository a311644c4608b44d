"""The bad-input corpus (``cases.yaml``): how to run a case, shared by ``tests/test_bad_inputs.py`` and
``python -m tests.bad_inputs.table`` (the table in docs/reliability.md)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

CORPUS = Path(__file__).resolve().parent
CASES: list[dict] = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
BROKEN_MODELS = ("truncated", "pickle-only", "no-config", "wrong-size")


def build_broken_models(model_dir: str, root: Path) -> dict[str, str]:
    """Copies of the tiny model at ``model_dir`` under ``root``, each broken one way (``BROKEN_MODELS``)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for name in BROKEN_MODELS:
        folder = root / name
        shutil.copytree(model_dir, folder)
        weights = folder / "model.safetensors"
        if name == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif name == "pickle-only":
            torch.save(load_file(weights), folder / "pytorch_model.bin")
            weights.unlink()
        elif name == "no-config":
            (folder / "config.json").unlink()
        else:  # config.json edited after the weights were saved
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] + 32}))
        out[name] = str(folder)
    return out


def case_argv(case: dict, model_dir: str, broken: dict[str, str], output_dir: Path) -> list[str]:
    """The CLI arguments of ``case`` (run from ``CORPUS``): its config, the model, ``output.dir``, its ``--set``s."""
    model = broken[case["model"]] if "model" in case else model_dir
    argv = ["--config", case.get("config", "base.yaml"), "--set", f"model.name_or_path={model}",
            "--set", f"output.dir={output_dir}"]
    for item in case.get("set", []):
        argv += ["--set", item]
    return argv


def seed_output_dir(output_dir: Path) -> None:
    """An ``output.dir`` as a previous good run left it: a run folder and ``latest.json`` pointing at it."""
    run = output_dir / "previous-run"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"finetuned": {"accuracy": 0.9}}))
    (output_dir / "latest.json").write_text(json.dumps({"run_dir": str(run), "merged": str(run / "merged")}))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time (ns): what a failed run must not change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}
