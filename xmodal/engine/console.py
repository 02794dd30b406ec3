"""What a Ray run prints: xmodal's own lines on the console, everything in the run's log file.

Ray forwards every line its workers and actors print (Train's controller, Ray Data's executor, the
raylet) to the driver's console, each run's epoch lines twice among them. Here the driver takes
that stream over: the lines xmodal's workers mark (:data:`LINE_MARK`: headers, one line per epoch;
:data:`PROGRESS_MARK`: the state of the epoch, drawn as a bar on a terminal) reach the console,
and every line goes to the log file of the run or sweep in progress (``console.log`` in its
results folder). Ray's own driver-side log records go only to that file too. ``--verbose`` on the
command line (or ``XMODAL_VERBOSE=1``) keeps Ray's console output as it is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from xmodal.progress import EpochBar, bars_enabled

LINE_MARK = "xmodal| "  # a worker line meant for the console
PROGRESS_MARK = "xmodal|progress "  # followed by the JSON of an epoch's progress
LOG_FILE = "console.log"
VERBOSE_ENV = "XMODAL_VERBOSE"
# Without a terminal no bar is drawn; a line this often still shows a long epoch is moving.
PLAIN_PROGRESS_SECONDS = 60.0
# Raylet messages that say nothing a user can act on (Ray starts more workers than CPUs on 2 cores).
BENIGN_RAYLET = ("PYTHON worker processes have been started",)
# Driver-side loggers whose records go to the log file only (when not verbose).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def verbose() -> bool:
    """Whether Ray's console output is kept (``XMODAL_VERBOSE=1``, set by ``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


def worker_line(text: str) -> None:
    """Print a line for the console from inside a Ray worker (rank 0 of a run)."""
    print(LINE_MARK + text, flush=True)


def worker_progress(run: str, epoch: int, epochs: int, step: int, steps: int, tiles_per_s: float) -> None:
    """Print an epoch's progress for the driver's bar from inside a Ray worker."""
    payload = {"run": run, "epoch": epoch, "epochs": epochs, "step": step, "steps": steps, "tiles_per_s": round(tiles_per_s, 2)}
    print(PROGRESS_MARK + json.dumps(payload), flush=True)


def throttled(every_seconds: float, emit: Callable[..., None]) -> Callable[..., None]:
    """``emit``, at most once per ``every_seconds`` (and always for an epoch's last step)."""
    last = [0.0]

    def call(run: str, epoch: int, epochs: int, step: int, steps: int, tiles_per_s: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every_seconds or step >= steps:
            last[0] = now
            emit(run, epoch, epochs, step, steps, tiles_per_s)

    return call


class _ToLogFile(logging.Filter):
    """Sends a Ray logger's records to the console's log file; lets them reach the terminal only when verbose."""

    def __init__(self, console: "Console") -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        self.console.to_file(f"{record.levelname} {record.name}: {record.getMessage()}")
        return verbose()


class Console:
    """The driver's console while Ray runs (one per process; see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        self._pending: list[str] = []
        self._bar = EpochBar()
        self._plain_shown: dict[str, float] = {}
        self._installed = False
        self.show_runs = True  # a sweep's driver shows its own lines only (runs' lines go to the log file)

    # -- the log file ----------------------------------------------------------------------------
    def log_to(self, path: str | Path | None) -> None:
        """Append every line from now on to ``path``, after the driver's lines since the last
        file closed (a run's header comes before its folder is known to be writable); ``None``: stop."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", buffering=1)
                self._file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
                self._file.writelines(line + "\n" for line in self._pending)
            self._pending = []

    def to_file(self, line: str, *, keep: bool = False) -> None:
        """Write ``line`` to the log file; ``keep``: hold it for the next file when none is open."""
        with self._lock:
            if self._file is not None:
                self._file.write(line.rstrip("\n") + "\n")
            elif keep and len(self._pending) < 1000:
                self._pending.append(line.rstrip("\n"))

    # -- the stream of Ray's workers --------------------------------------------------------------
    def install(self) -> None:
        """Take over Ray's forwarding of worker output (after ``ray.init``) and Ray's driver loggers."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        # Every ray.init adds Ray's printer again (the dispatcher outlives ray.shutdown): remove it each time.
        if not verbose():  # verbose: Ray prints as it does, the log file still gets every line
            import ray._private.worker as ray_worker

            global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
            # The raylet's messages (an OOM kill, a start-up warning) reach the driver by another path.
            ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: self.handle(data)
        if self._installed:
            return
        global_worker_stdstream_dispatcher.add_handler("xmodal_console", self.handle)
        for name in RAY_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if not any(isinstance(f, _ToLogFile) for f in handler.filters):
                    handler.addFilter(_ToLogFile(self))
        self._installed = True

    def handle(self, data: dict[str, Any]) -> None:
        """One batch of lines from a Ray process: xmodal's to the console, all to the log file."""
        source = data.get("actor_name") or data.get("task_name") or data.get("pid") or "ray"
        if data.get("pid") == "autoscaler" and not verbose():
            # Its events only (e.g. a request no node can satisfy: the user must know), as Ray shows them.
            from ray._private.worker import filter_autoscaler_events

            for event in filter_autoscaler_events(data.get("lines", [])):
                self._bar.write(f"(autoscaler) {event}")
        for line in data.get("lines", []):
            self.to_file(f"({source}) {line}")
            if data.get("pid") == "raylet" and not verbose() and not any(benign in line for benign in BENIGN_RAYLET):
                self._bar.write(f"(raylet) {line}")  # e.g. a worker killed for lack of memory
            if verbose() or not self.show_runs:
                continue
            if line.startswith(PROGRESS_MARK):
                self._progress(line[len(PROGRESS_MARK):])
            elif line.startswith(LINE_MARK) and not data.get("is_err"):
                self._bar.write(line[len(LINE_MARK):])

    def _progress(self, text: str) -> None:
        try:
            state = json.loads(text)
        except ValueError:
            return
        if bars_enabled():
            self._bar.update(state["run"], state["epoch"], state["epochs"], state["step"], state["steps"], state["tiles_per_s"])
            return
        now = time.monotonic()
        run = state["run"]
        if now - self._plain_shown.setdefault(run, now) >= PLAIN_PROGRESS_SECONDS and state["step"] < state["steps"]:
            self._plain_shown[run] = now
            print(
                f"[{run}] epoch {state['epoch']}/{state['epochs']}: {state['step']}/{state['steps']} batches, "
                f"{state['tiles_per_s']:.1f} tiles/s", flush=True,
            )

    def line(self, text: str) -> None:
        """A line of the driver's own for the console (and the log file)."""
        self.to_file(text, keep=True)
        self._bar.write(text)


CONSOLE = Console()
