"""Reading run summaries (``run.json``) to place runs in a method's paper tables.

Shared by the methods' ``report_cell`` functions: which run an input checkpoint came from, and
the labelled share a run trained on.
"""

from __future__ import annotations

from typing import Any


def recorded_input(run: dict[str, Any], name: str | None) -> tuple[str | None, str | None]:
    """(run name, checkpoint) a summary records for input ``name`` (summaries from before runs
    recorded their sources hold the checkpoint path alone)."""
    recorded = (run.get("inputs") or {}).get(name) if name else None
    if isinstance(recorded, dict):
        return recorded.get("run"), recorded.get("checkpoint")
    return None, recorded if isinstance(recorded, str) else None


def source_run(run: dict[str, Any], name: str | None, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The summary of the run that produced input ``name`` of ``run``, when it is among ``runs``:
    by the run name recorded (an earlier phase), else by the checkpoint folder (an input given as
    a path to another run's checkpoint)."""
    source, checkpoint = recorded_input(run, name)
    named = next((r for r in runs if source and r.get("name") == source), None)
    if named is not None or not checkpoint:
        return named
    return next((r for r in runs if checkpoint in (r.get("checkpoint"), r.get("last_checkpoint"))), None)


def label_share(run: dict[str, Any]) -> str | None:
    """Row suffix of a run trained on a labelled subset: ``0.05`` (a share), ``n32`` (a count);
    ``None`` with every label."""
    data = run.get("data") or {}
    labels = data.get("labels") or {}
    if labels.get("count") is not None:
        return f"n{labels['count']}"
    fraction = labels.get("fraction", data.get("label_fraction", 1.0))
    return f"{fraction:g}" if fraction is not None and fraction < 1.0 else None
