"""What both benchmarks share: the generated world they read, the local Ray they start, epoch rates,
and the CPU each of that Ray's processes burns."""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from xmodal.data.pipeline import import_decoding
from xmodal.engine.session import connect

BENCH_WORLD = {"seed": 11, "regions": 4, "tile_size": 128}


def bench_data_root(data_root: str | None, tiles: int) -> str:
    """``data_root``, or a generated world of about ``tiles`` train tiles (made once, kept in the temp dir)."""
    if data_root:
        return data_root
    root = Path(tempfile.gettempdir()) / f"xmodal-bench-world-{tiles}"
    if not (root / "stats.json").is_file():
        from xmodal.data.synth import synthesize

        # Everything but a token val/test region goes to train so the train split has ~`tiles` tiles.
        per_region = max(4, int(np.ceil(tiles / 2)))
        synthesize(root, {**BENCH_WORLD, "scenes_per_region": per_region})
    return str(root)


def init_ray() -> bool:
    """Start a local Ray unless one is running; True when this call started it."""
    # The Train worker reserves one logical CPU; the data pipeline keeps every core's budget.
    return connect(None, (os.cpu_count() or 1) + 1, dashboard=False)


def epoch_rates(tiles: list[int], seconds: list[float]) -> dict[str, float]:
    rates = [t / s for t, s in zip(tiles, seconds)]
    steady = rates[1:] or rates
    return {"epoch1": rates[0], "steady": statistics.median(steady), "per_epoch": rates}


DRIVER = "driver (this process)"
IDLE = "ray::IDLE"
PASSING = {IDLE, f"ray::{import_decoding.__name__}"}  # names a worker shows before it is anything
ACTOR_METHOD = re.compile(r"^(ray::[A-Za-z_]\w*)\.\w+$")
# Ray's own scripts run as ``python .../<script>.py``: the script names the process.
RAY_SCRIPTS = {"monitor.py": "autoscaler monitor", "dashboard.py": "dashboard head", "log_monitor.py": "log monitor"}


def process_label(name: str, cmdline: list[str]) -> str:
    """What a process of a local Ray is, from its name and command line.

    Ray workers rename themselves ``ray::<actor or task>`` (``ray::IDLE`` while idle); its C++
    servers keep their binary's name (``raylet``, ``gcs_server``); its Python helpers are scripts.
    """
    first = cmdline[0] if cmdline else ""
    if first.startswith("ray::"):
        # An actor shows the method it runs (``ray::TrainController.run``): group by actor class.
        return ACTOR_METHOD.sub(r"\1", first.split()[0])
    for argument in cmdline[1:3]:
        script = os.path.basename(argument)
        if script in RAY_SCRIPTS:
            return RAY_SCRIPTS[script]
    return name or os.path.basename(first) or "?"


@dataclass
class CpuUse:
    """CPU seconds a group of processes used in a window, and how many processes the group had."""

    seconds: float = 0.0
    processes: int = 0


Sample = tuple[float, dict[tuple[int, float], float]]  # (wall time, CPU seconds per (pid, start time))


@dataclass
class ProcessCpuSampler:
    """Samples, in a background thread, the CPU time of this process and of every process it
    started (directly or not): a local Ray's servers, helpers and workers.

    The samples form a timeline, so any window inside it can be read afterwards
    (:meth:`use_between`), e.g. the epochs after the first one once their times are known.

    Args:
        interval: Seconds between samples.
        root: The process whose descendants are sampled (default: this one).
        forks: The label of a child running the root's own command line (a forked worker, such
            as a DataLoader's; Ray's processes run commands of their own).
    """

    interval: float = 0.5
    root: int = field(default_factory=os.getpid)
    forks: str | None = None
    samples: list[Sample] = field(default_factory=list, init=False)
    labels: dict[tuple[int, float], str] = field(default_factory=dict, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def sample(self) -> float | None:
        """Read every process's CPU time now (also called by the sampling thread).

        Returns:
            The sample's wall time (``time.time()``), or ``None`` when the root process is gone.
        """
        try:
            root = psutil.Process(self.root)
            processes = [root, *root.children(recursive=True)]
            root_command = root.cmdline()
        except psutil.NoSuchProcess:
            return None
        used: dict[tuple[int, float], float] = {}
        for process in processes:
            try:
                with process.oneshot():
                    key = (process.pid, process.create_time())
                    times = process.cpu_times()
                    used[key] = times.user + times.system
                    # A Ray worker renames itself once started, per task and per actor method
                    # (the Train worker shows "ray::execute" while it runs the training function):
                    # the first Ray name that says what it is sticks (not ray::IDLE, nor the
                    # warm-up task a decode worker runs first; a newborn worker is still "python").
                    current = self.labels.get(key)
                    if current is None or current in PASSING or not current.startswith("ray::"):
                        self.labels[key] = self._label(process, root_command)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        taken = time.time()
        self.samples.append((taken, used))
        return taken

    def _label(self, process: psutil.Process, root_command: list[str]) -> str:
        if process.pid == self.root:
            return DRIVER
        command = process.cmdline()
        if self.forks and command == root_command:
            return self.forks
        return process_label(process.name(), command)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> ProcessCpuSampler:
        """Take the first sample and keep sampling until :meth:`stop`."""
        self.sample()
        self._thread = threading.Thread(target=self._run, name="xmodal-cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, after one last sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def use_between(self, begin: float, end: float) -> dict[str, CpuUse]:
        """CPU use per process label between two wall times (``time.time()``).

        A process first seen after ``begin`` was born in the window and counts from zero; one
        gone before ``end`` counts to its last sample (it loses at most one interval).
        """
        before = [used for at, used in self.samples if at <= begin]
        inside = [used for at, used in self.samples if begin < at <= end]
        at_begin = before[-1] if before else {}
        last: dict[tuple[int, float], float] = {}
        for used in inside:
            last.update(used)
        totals: dict[str, CpuUse] = {}
        for key, seconds in last.items():
            entry = totals.setdefault(self.labels[key], CpuUse())
            entry.seconds += max(0.0, seconds - at_begin.get(key, 0.0))
            entry.processes += 1
        return totals


def cpu_table(use: dict[str, CpuUse], seconds: float, cores: int) -> list[dict[str, Any]]:
    """Rows of the per-process CPU table, busiest first.

    Args:
        use: CPU use per label (:meth:`ProcessCpuSampler.use_between`).
        seconds: The window's wall seconds.
        cores: The machine's cores (a share of the whole machine is also given).

    Returns:
        ``{"process", "count", "cpu_s", "cpu_percent", "machine_percent"}`` per label, where
        ``cpu_percent`` is of one core (100 = one core busy all the window).
    """
    rows = [
        {
            "process": label,
            "count": entry.processes,
            "cpu_s": round(entry.seconds, 3),
            "cpu_percent": round(100.0 * entry.seconds / seconds, 1),
            "machine_percent": round(100.0 * entry.seconds / (seconds * cores), 1),
        }
        for label, entry in use.items()
    ]
    return sorted(rows, key=lambda row: (-row["cpu_s"], row["process"]))


def format_cpu_table(rows: list[dict[str, Any]], seconds: float, window: str) -> list[str]:
    """The per-process CPU table as lines, headed by what ``window`` it covers."""
    lines = [f"  CPU per process, {window} ({seconds:.1f} s; 100 % = one core busy):", f"    {'process':40s} {'count':>5s} {'CPU s':>8s} {'CPU %':>7s}"]
    for row in rows:
        lines.append(f"    {row['process'][:40]:40s} {row['count']:5d} {row['cpu_s']:8.2f} {row['cpu_percent']:7.1f}")
    return lines
