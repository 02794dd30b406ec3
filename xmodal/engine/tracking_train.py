"""The Ray Train side of MLflow tracking (apart from :mod:`xmodal.engine.tracking`, which stays free of Ray)."""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from xmodal.engine.tracking import Tracker


class EpochMetrics(UserCallback):
    """Ray Train callback: every epoch's report into the run's MLflow run, at step = epoch."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:  # rank 0's report
            self.tracker.log_epoch(metrics[0])


def epoch_callbacks(tracker: Tracker | None) -> list[UserCallback]:
    """The Train callbacks that log a run's epochs to ``tracker`` (none without tracking)."""
    return [] if tracker is None else [EpochMetrics(tracker)]
