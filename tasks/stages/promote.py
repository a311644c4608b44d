"""promote: the quality gate that decides whether a newly trained model replaces the promoted one.

The promoted model is the one ``<output.dir>/latest.json`` names (written by ``tasks.stages.report.update_latest``).
"""
from __future__ import annotations

from pathlib import Path

from tasks.common.files import read_json
from tasks.common.metrics import task_kind


def read_promoted(output_dir: str | Path) -> dict | None:
    """The ``latest.json`` pointer of ``output_dir`` (run folder, merged/, onnx/, metrics, source), or None
    when no model has been promoted yet."""
    pointer = Path(output_dir) / "latest.json"
    return read_json(pointer) if pointer.is_file() else None


def quality_gate(task: str, candidate: dict, base: dict | None, incumbent: dict | None, margin: float) -> dict:
    """Decide whether ``candidate`` may be promoted, on the task's primary metric (accuracy for
    classification, ROUGE-L for generation; fractions in [0, 1]).

    Passes only if the candidate is strictly better than the base model, and, when a model is already
    promoted, not worse than it by more than ``margin`` (all measured on the same test split).

    Args:
        task: ``"classification"`` or ``"generation"``.
        candidate, base, incumbent: metrics dicts as ``tasks.stages.evaluate.evaluate`` returns them; ``base`` None
            when the base model was not evaluated (fails the gate), ``incumbent`` None when nothing is promoted.
        margin: the largest allowed drop below the incumbent, in metric units (0.01 = 1 point).

    Returns:
        ``{"promote", "metric", "candidate", "base", "incumbent", "margin", "reasons"}``; ``reasons`` lists
        each failed condition (empty when promoted).

    Raises:
        ValueError: ``task`` is unknown.
    """
    key = task_kind(task).primary
    new = candidate[key]
    old = incumbent[key] if incumbent else None
    floor = base[key] if base else None
    reasons = []
    if floor is None:
        reasons.append("the base model was not evaluated (eval.evaluate_base is false)")
    elif new <= floor:
        reasons.append(f"{key} {new:.4f} is not above the base model's {floor:.4f}")
    if old is not None and new < old - margin:
        reasons.append(f"{key} {new:.4f} is more than {margin:g} below the promoted model's {old:.4f}")
    return {"promote": not reasons, "metric": key, "candidate": new, "base": floor, "incumbent": old,
            "margin": margin, "reasons": reasons}


def decision_markdown(decision: dict) -> str:
    """The gate's decision as markdown: outcome, reasons and a table of the numbers (for the UI artifact)."""
    if decision.get("skipped"):
        return f"## No-op: nothing to retrain\n\n{decision['skipped']}\n"
    if decision.get("failed"):
        return f"## Not promoted: the retrain failed\n\n`{decision['failed']}`\n"
    outcome = "Promoted" if decision["promote"] else "Not promoted"
    reasons = "".join(f"- {r}\n" for r in decision["reasons"]) or "- passed every check\n"
    rows = "".join(f"| {name} | {'—' if value is None else f'{value:.4f}'} |\n"
                   for name, value in (("candidate", decision["candidate"]), ("base model", decision["base"]),
                                       ("promoted model", decision["incumbent"])))
    return (f"## {outcome}: `{decision.get('run_dir', '')}`\n\n{reasons}\n"
            f"| model | {decision['metric']} (test split) |\n|---|---|\n{rows}\n"
            f"Allowed drop below the promoted model: {decision['margin']:g}\n")


def decision_summary(decision: dict) -> str:
    """The decision in one line (for the run log)."""
    if decision.get("skipped") or decision.get("failed"):
        return decision.get("skipped") or f"not promoted, the retrain failed: {decision['failed']}"
    return (("promoted " if decision["promote"] else "not promoted ") + decision["run_dir"]
            + "".join(f"; {r}" for r in decision["reasons"]))
