"""Sweeps: Ray Tune + Optuna over a method's knobs, each trial one Ray Train run or one phase chain.

``run_sweep`` is what ``xmodal sweep`` calls. Every trial is a Tune *function* trainable that
builds the trial's experiment config and runs it with :func:`~xmodal.engine.runner.run_single`
(``TuneReportCallback`` forwards each epoch's metrics to Tune, so Optuna and ASHA see them).
The trial's Train run is named ``trial-<trial id>`` under the sweep folder, so a retried or
resumed trial continues from its last Train checkpoint instead of starting over.

A chain trial (a config with ``phases``) runs every phase in order; only the last one reports to
Tune. Every earlier phase is named by a hash of its whole configuration and of its inputs
(``runs/shared/<phase>-<hash>``): trials that share it (a pretraining that only finetuning values
differ after) run it once. A lease lock held by a small Ray actor makes the others wait for it,
and a trial that died holding one lets the next trial take over (resuming the phase's checkpoint).

On a cluster, trial drivers ask for a resource only the head declares (:func:`driver_placement`),
so a reclaimed spot GPU node never takes one with it; ``max_concurrent_trials: auto`` follows the
cluster as nodes join and leave (:class:`ClusterSlots`). The Tuner names the sweep's metric and
mode, so its ``ResultGrid`` (``SweepResult.result_grid``) ranks trials as the sweep does. A trial
that runs out of CUDA memory fails alone, with that reason. ``sweep.rerun_best: {seeds: N}`` trains
the best configuration again with N new seeds after the search (mean +- std in the summary and
report); ``run.mlflow`` logs the sweep as an MLflow parent run with a child run per trial.

Sweep folder (``<sweep.storage>/<name>``)::

    sweep.json              the validated sweep (a resumed sweep must match it)
    optuna.db               the Optuna study (SQLite; optuna-dashboard opens it); on object storage a copy,
                            uploaded after every trial that ends (see study_storage_url)
    console.log             the sweep's console and Ray's output (on object storage: uploaded at the end)
    trial-<id>/             Tune's files per trial: params.json, progress.csv, result.json, TensorBoard
    runs/trial-<id>/        Ray Train checkpoints of that trial (of its last phase, for a chain)
    runs/shared/<phase>-<hash>/  checkpoints of a chain's earlier phases, shared by the trials that need them
    results/trial-<id>/     its run.json, TensorBoard and console log (on object storage too)
    rerun-best/             Tune's files of the sweep.rerun_best stage (its trials' runs are in runs/ and results/)
    rerun_best.json         that stage's runs and their mean +- std
    mlflow.db, mlartifacts/ run.mlflow: local (on object storage: in the results folder)
    report/                 written by ``xmodal report`` (tables, best config, figures)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.storages import RDBStorage
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Repeater
from ray.tune.search.basic_variant import BasicVariantGenerator

from xmodal.engine.config import ExperimentConfig
from xmodal.engine.console import CONSOLE, LOG_FILE
from xmodal.engine.session import connect, state_api_available
from xmodal.engine.storage import (
    cache_folder, check_reachable, delete_tree, download, filesystem, is_remote, join, portable_paths, read_text, upload, write_text,
)
from xmodal.engine.tracking import Tracker, result_files
from xmodal.errors import ConfigError, RunFailedError, XmodalError, cuda_out_of_memory, error_line, permanent_cause
from xmodal.tune.spec import (
    FINAL_KEY, GRID_POINT_KEY, RERUN_DIR, RERUN_FILE, RUN_FILE, SEED_KEY, SPEC_FILE, SweepSpec, final_config, load_sweep, phase_runs, study_url_to_connect,
    without_password,
)

SHARED_DIR = "shared"
LOCK_LEASE_SECONDS = 120.0

STUDY_FILE = "optuna.db"
# Where trial drivers run on a cluster: nodes declaring DRIVER_RESOURCE (the head, in cluster/), else
# the head itself (HEAD_RESOURCE, which Ray gives every head). A marker share, never the limit.
DRIVER_RESOURCE = "xmodal_driver"
HEAD_RESOURCE = "node:__internal_head__"
MARKER_SHARE = 0.001
# How often max_concurrent_trials: auto looks at the cluster again (nodes join and leave).
SLOTS_CHECK_SECONDS = 10.0


@dataclass
class SweepResult:
    """What a sweep produced.

    Attributes:
        name: Sweep name.
        sweep_dir: Its folder (or URI).
        metric: Metric that ranked the trials.
        mode: ``max`` or ``min``.
        best: Best finished trial: ``trial_id``, ``params`` (choice names), ``seed``,
            ``metrics`` (latest of each) and ``value`` (its final ``metric``).
        states: Trial count per state (``TERMINATED``, ``ERROR``, ``STOPPED`` early...).
        errors: Error line per errored trial id.
        wall_seconds: Wall time of this call.
        trials_per_hour: Trials that ended during this call, per hour of wall time.
        busy_share: Share of ``max_concurrent_trials`` x wall time that trials were running.
        max_concurrent_trials: Trial slots the sweep ran with.
        study_storage: Optuna storage URL, without its password (``None`` for grid sweeps or in-memory studies).
        trials: Every trial as :func:`~xmodal.report.sweeps.load_trials` reads it.
    """

    name: str
    sweep_dir: str
    metric: str
    mode: str
    best: dict[str, Any] | None
    states: dict[str, int]
    errors: dict[str, str]
    wall_seconds: float
    trials_per_hour: float
    busy_share: float
    max_concurrent_trials: int
    study_storage: str | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    rerun: dict[str, Any] | None = None
    result_grid: Any = None
    tracking: Tracker | None = None

    def log_report(self, files: list[str | Path]) -> None:
        """Attach the sweep's report (tables, best config, figures) to its MLflow parent run."""
        if self.tracking is not None:
            self.tracking.log_files(list(files), artifact_path="report")

    def summary(self) -> str:
        """Human-readable lines (printed at the end of ``xmodal sweep``)."""
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.states.items()))
        lines = [
            f"sweep {self.name}: {sum(self.states.values())} trials ({states}) in {self.wall_seconds:.0f} s",
            f"  {self.trials_per_hour:.1f} trials/hour; trial slots busy {100 * self.busy_share:.0f}% "
            f"of {self.max_concurrent_trials} x wall time",
        ]
        if self.best:
            value = self.best["value"]
            params = ", ".join(f"{k}={v}" for k, v in self.best["params"].items())
            seed = "" if self.best.get("seed") is None else f" seed={self.best['seed']}"
            lines.append(f"  best {self.metric} ({self.mode}) {value:.4f}: {params}{seed}  [trial {self.best['trial_id']}]")
        if self.rerun:
            lines.append(f"  {rerun_line(self.rerun)}")
        for trial_id, error in self.errors.items():
            lines.append(f"  trial {trial_id} failed: {error}")
        lines.append(f"  folder: {self.sweep_dir}")
        lines.append(f"  look at it: xmodal report {self.sweep_dir}   |   tensorboard --logdir {self.sweep_dir}")
        if self.study_storage:
            lines.append(f"  optuna-dashboard {self.study_storage}")
        if self.tracking is not None:
            lines.append(f"  MLflow: run {self.tracking.run_id} at {self.tracking.tracking_uri}")
        return "\n".join(lines)


def rerun_line(rerun: dict[str, Any]) -> str:
    """The rerun stage in one line: mean +- std over its seeds (and of the test counterpart)."""
    line = f"best configuration rerun with {rerun['n']} seed(s) {rerun['seeds']}: {rerun['metric']} "
    line += "n/a" if rerun["mean"] is None else f"{rerun['mean']:.4f} ± {rerun['std']:.4f}"
    if rerun.get("test_mean") is not None:
        line += f", {rerun['test_metric']} {rerun['test_mean']:.4f} ± {rerun['test_std']:.4f}"
    failed = [r["trial_id"] for r in rerun["runs"] if r["value"] is None]
    return line + (f" ({len(failed)} failed: {', '.join(failed)})" if failed else "")


# ----------------------------------------------------------------------------- paths and resources


def sweep_dir(spec: SweepSpec) -> str:
    """Folder (or URI) of a sweep: Tune's experiment folder."""
    return spec.settings.storage.rstrip("/") + "/" + spec.name


def study_storage_url(spec: SweepSpec) -> str | None:
    """Optuna RDB URL: the setting, else a SQLite file in the sweep folder, or for a sweep folder
    on object storage in its local copy (:func:`local_study_file`)."""
    if spec.settings.search == "grid":
        return None
    if spec.settings.study_storage:
        return spec.settings.study_storage
    folder = sweep_dir(spec)
    return f"sqlite:///{local_study_file(folder) if is_remote(folder) else Path(folder) / STUDY_FILE}"


def local_study_file(folder: str) -> Path:
    """The working copy of a sweep's SQLite study when the sweep folder is on object storage.

    SQLite needs a local file, so the study lives in this machine's cache: downloaded from the
    sweep folder when the sweep starts (a resume, possibly on a fresh machine), uploaded back
    after every trial that ends and at the end (:func:`upload_study`). One process, the sweep's
    driver, writes it (Optuna runs there), so a copy is never behind by more than the trials
    still running, which a resume runs again anyway. A SQLite file rather than Optuna's journal
    file: the same file a local sweep keeps, which optuna-dashboard opens.
    """
    return cache_folder(folder) / STUDY_FILE


# The cache folder names of the remote sweeps this process runs -> their study's local copy now:
# a restored searcher (Tune's pickles) names the copy of the machine that started the sweep.
_LOCAL_STUDIES: dict[str, Path] = {}


def _relocated_study_url(url: str) -> str:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if path.name == STUDY_FILE and path.parent.name in _LOCAL_STUDIES:
            return f"sqlite:///{_LOCAL_STUDIES[path.parent.name]}"
    return url


def fetch_study(folder: str) -> None:
    """Make the local copy of a remote sweep's study the bucket's (none there: a new study)."""
    local = local_study_file(folder)
    _LOCAL_STUDIES[local.parent.name] = local
    local.parent.mkdir(parents=True, exist_ok=True)
    local.unlink(missing_ok=True)
    download(join(folder, STUDY_FILE), local)


def upload_study(folder: str) -> None:
    """Upload a consistent snapshot of a remote sweep's local study (SQLite's backup API: never a
    file caught between two writes)."""
    import sqlite3

    local = local_study_file(folder)
    if not local.is_file():
        return
    snapshot = local.with_name(f"{STUDY_FILE}.upload")
    source, target = sqlite3.connect(local), sqlite3.connect(snapshot)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    upload(snapshot, join(folder, STUDY_FILE))
    snapshot.unlink(missing_ok=True)


def base_experiment(spec: SweepSpec) -> ExperimentConfig:
    """The experiment with every parameter at its first value (for sizing and data checks)."""
    params = {p.key: p.edges()[0] for p in spec.parameters if not p.when}
    return spec.build_trial(params, spec.seeds[0], "base")


def trial_resources(config: ExperimentConfig, trial_cpus: float, engine: str = "train") -> dict[str, float]:
    """Resources one trial holds: the largest of its (phase) runs' Train workers plus the Tune trial actor.

    Args:
        config: The trial's experiment.
        trial_cpus: CPUs of the trial actor (the driver of its Train runs).
        engine: ``plain``: the trial actor trains the runs itself (``sweep.engine``).
    """
    runs = phase_runs(config)
    if engine == "plain":  # the trial actor trains every run itself
        resources = {"CPU": max(trial_cpus, *(r.scaling.cpus_per_worker for r in runs))}
    else:
        resources = {"CPU": max(r.scaling.num_workers * r.scaling.cpus_per_worker for r in runs) + trial_cpus}
    gpus = max((r.scaling.num_workers * r.scaling.gpus_per_worker for r in runs if r.scaling.use_gpu), default=0)
    if gpus:
        resources["GPU"] = float(gpus)
    return resources


def driver_placement(cluster: dict[str, float]) -> dict[str, float]:
    """The custom resource that keeps a trial's driver actor off spot GPU workers: a trial that
    lost its driver restarts from its checkpoint, but one reclaimed GPU node would take every
    driver on it. ``xmodal_driver`` where the cluster declares it (cluster/ declares it on the
    head), else the head itself."""
    return {DRIVER_RESOURCE if cluster.get(DRIVER_RESOURCE) else HEAD_RESOURCE: MARKER_SHARE}


def trial_actor_resources(spec: SweepSpec, base: ExperimentConfig, per_trial: dict[str, float], cluster: dict[str, float]) -> dict[str, float]:
    """What Tune reserves for each trial's own actor (``tune.with_resources``).

    With Ray Train the actor only drives its runs: ``sweep.trial_cpus`` on the driver nodes
    (:func:`driver_placement`); the Train workers ask for their GPUs (fractions and GPU model
    included) themselves. With the plain engine the actor trains: it holds the trial's CPUs, its
    GPU share and the ``accelerator_type:<model>`` resource of the GPU model it needs.
    """
    if spec.settings.engine != "plain":
        return {"cpu": spec.settings.trial_cpus, **driver_placement(cluster)}
    actor = {"cpu": per_trial["CPU"], "gpu": per_trial.get("GPU", 0.0)}
    for run in phase_runs(base):
        if run.scaling.use_gpu and run.scaling.accelerator_type:
            actor[f"accelerator_type:{run.scaling.accelerator_type}"] = MARKER_SHARE
    return actor


def reserved_data_cpus(spec: SweepSpec, base: ExperimentConfig) -> float:
    """CPUs each trial leaves free for Ray Data: none with the plain engine, whose torch loaders
    decode inside the trial's own CPUs."""
    return 0.0 if spec.settings.engine == "plain" else base.scaling.data_cpus


def concurrent_trials(cluster: dict[str, float], per_trial: dict[str, float], data_cpus: float) -> int:
    """How many trials fit at once, leaving ``data_cpus`` per trial free for Ray Data.

    The scarcest resource decides (GPUs on a GPU cluster); always at least 1, so a sweep on a
    cluster that is still scaling up waits for resources rather than refusing to start.

    Args:
        cluster: ``ray.cluster_resources()``.
        per_trial: :func:`trial_resources`.
        data_cpus: CPUs per trial kept unreserved for data loading.
    """
    fits = []
    cpus = per_trial.get("CPU", 0) + data_cpus
    if cpus > 0:
        fits.append(math.floor(cluster.get("CPU", 0) / cpus + 1e-9))
    if per_trial.get("GPU"):
        fits.append(math.floor(cluster.get("GPU", 0) / per_trial["GPU"] + 1e-9))
    return max(1, min(fits) if fits else 1)


class ClusterSlots:
    """Trial slots of a sweep: a fixed number, or (``max_concurrent_trials: auto``) what the cluster
    holds *now*, looked at again every :data:`SLOTS_CHECK_SECONDS` while the sweep runs.

    Counted once at the start, a sweep on an autoscaling cluster whose GPU nodes had not joined yet
    ran one trial at a time to the end. The count follows the cluster up (and down, as spot nodes
    go), with a console line on each change.
    """

    def __init__(self, name: str, per_trial: dict[str, float], data_cpus: float, fixed: int | None = None) -> None:
        self.name, self.per_trial, self.data_cpus, self.fixed = name, dict(per_trial), data_cpus, fixed
        self.value: int | None = None
        self.checked = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "value": None, "checked": 0.0}  # a restored sweep looks again

    def current(self) -> int:
        """Trials that may run at once now."""
        if self.fixed is not None:
            return self.fixed
        now = time.monotonic()
        if self.value is None or now - self.checked >= SLOTS_CHECK_SECONDS:
            import ray

            cluster = ray.cluster_resources()
            value = concurrent_trials(cluster, self.per_trial, self.data_cpus)
            if self.value is not None and value != self.value:
                CONSOLE.line(
                    f"[sweep {self.name}] {value} trial slot(s) now (were {self.value}): the cluster holds "
                    f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs"
                )
            self.value, self.checked = value, now
        return self.value


# ----------------------------------------------------------------------------- searchers


class _KeepsOwnState:
    """Mixin for Ray's searcher wrappers: save their own state with the inner searcher's.

    Ray's ``ConcurrencyLimiter`` and ``Repeater`` save only the searcher they wrap, so after
    ``Tuner.restore`` they forget which trials are live and which seeds belong together, and a
    resumed sweep never tells Optuna about the trials that were running when it stopped.
    """

    searcher: Any

    def save(self, checkpoint_path: str) -> None:
        inner = checkpoint_path + ".inner"
        self.searcher.save(inner)
        blob = {"own": self.get_state(), "inner": Path(inner).read_bytes() if os.path.exists(inner) else None}
        if os.path.exists(inner):
            os.remove(inner)
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(blob, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            blob = pickle.load(handle)
        self.set_state(blob["own"])
        if blob["inner"] is not None:
            with tempfile.NamedTemporaryFile(delete=False) as handle:
                handle.write(blob["inner"])
            try:
                self.searcher.restore(handle.name)
            finally:
                os.remove(handle.name)


class StatefulLimiter(_KeepsOwnState, ConcurrencyLimiter):
    """``ConcurrencyLimiter`` that remembers its live trials across ``Tuner.restore`` and takes its
    limit from :class:`ClusterSlots` each time Tune asks for a trial."""

    def __init__(self, searcher: Any, max_concurrent: int, slots: ClusterSlots | None = None) -> None:
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.slots = slots

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if getattr(self, "slots", None) is not None:
            self.max_concurrent = self.slots.current()
        return super().suggest(trial_id)


class ClusterSizedGrid(BasicVariantGenerator):
    """Tune's grid generator with its concurrency limit from :class:`ClusterSlots`, asked again for
    each trial (Tune's own ``max_concurrent_trials`` is fixed at the start)."""

    def __init__(self, slots: ClusterSlots) -> None:
        super().__init__(max_concurrent=slots.current())
        self.slots = slots

    def next_trial(self) -> Any:
        self.max_concurrent = self.slots.current()
        return super().next_trial()


class StatefulRepeater(_KeepsOwnState, Repeater):
    """``Repeater`` (one configuration x several seeds) that remembers its groups across ``Tuner.restore``."""


def round_robin(points: list[dict[str, Any]], key: str | None) -> list[dict[str, Any]]:
    """Grid points reordered to take turns between the values of ``key`` (the first parameter).

    Trials of one value usually share an early phase (an arm's pretraining); in turns, trials that
    start together train different shared phases instead of queueing for one. ``None`` (a
    seeds-only sweep) keeps the order.
    """
    if key is None:
        return list(points)
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(json.dumps(point.get(key), sort_keys=True, default=str), []).append(point)
    queues = list(groups.values())
    return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]


class StudyStorage(RDBStorage):
    """Optuna's RDB storage whose pickled state (Tune's ``tuner.pkl`` and searcher checkpoints)
    holds its URL without the password; unpickled, it connects with the password again
    (:func:`~xmodal.tune.spec.study_url_to_connect`: the one this process was given, else
    ``$XMODAL_STUDY_PASSWORD``)."""

    def __init__(self, url: str) -> None:
        super().__init__(study_url_to_connect(url))

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = without_password(state["url"])
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__({**state, "url": study_url_to_connect(_relocated_study_url(state["url"]))})


def make_search(spec: SweepSpec, max_concurrent: int | ClusterSlots) -> tuple[Any, dict[str, Any], int]:
    """Tune search algorithm, param_space and num_samples of a sweep.

    Args:
        max_concurrent: Trial slots, or the :class:`ClusterSlots` that count them as the cluster changes.
    """
    from ray import tune

    settings = spec.settings
    seeds = spec.seeds
    slots = max_concurrent if isinstance(max_concurrent, ClusterSlots) else ClusterSlots(spec.name, {}, 0.0, fixed=int(max_concurrent))
    if settings.search == "grid":
        space: dict[str, Any] = {GRID_POINT_KEY: tune.grid_search(round_robin(spec.grid_points(), spec.parameters[0].key if spec.parameters else None))}
        if len(seeds) > 1:
            space[SEED_KEY] = tune.grid_search(seeds)
        return ClusterSizedGrid(slots), space, 1

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (
        optuna.samplers.RandomSampler(seed=settings.sampler_seed)
        if settings.search == "random"
        else optuna.samplers.TPESampler(seed=settings.sampler_seed)
    )
    url = study_storage_url(spec)
    storage = StudyStorage(url) if url else None
    searcher: Any = OptunaSearch(spec.suggest, metric=spec.metric, mode=spec.mode, sampler=sampler, study_name=spec.name, storage=storage)
    if len(seeds) > 1:
        searcher = StatefulRepeater(searcher, repeat=len(seeds), set_index=True)
    return StatefulLimiter(searcher, max_concurrent=slots.current(), slots=slots), {}, settings.num_samples * len(seeds)


class FinishingASHA(ASHAScheduler):
    """ASHA (``time_attr="epoch"``) that never stops a trial at or past its own last epoch.

    Rungs sit at ``grace_period * reduction_factor ** k`` epochs, and one can fall on a trial's last
    epoch (the 4th of 4 with grace 1, factor 2): stopping it there saves no training but loses its
    test metrics, which its final report (``sweep/final``) brings after that epoch. Every epoch's
    result names the trial's last epoch (``epochs``; ``max_t``, the sweep's largest, when absent).
    """

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Accept the Tuner's metric and mode when they are this scheduler's own (the Tuner names
        them too, so its ``ResultGrid`` ranks trials)."""
        if (metric, mode) == (self._metric, self._mode):
            return True
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        last = result.get("epochs", self._max_t)
        if result.get(FINAL_KEY) or result.get(self._time_attr, 0) >= last:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_scheduler(spec: SweepSpec) -> Any:
    """The Tune scheduler of a sweep: FIFO, or ASHA stopping trials on ``spec.metric`` per epoch."""
    from ray.tune.schedulers import FIFOScheduler

    if spec.settings.scheduler != "asha":
        return FIFOScheduler()
    # time_attr=epoch (1-based, as the engine reports it) survives resumes.
    return FinishingASHA(
        time_attr="epoch", metric=spec.metric, mode=spec.mode, max_t=spec.max_epochs,
        grace_period=spec.settings.asha.grace_period, reduction_factor=spec.settings.asha.reduction_factor,
    )


def trial_failure_config(spec: SweepSpec) -> Any:
    """Tune's failure config: how often a trial is run again after its process died.

    A trial whose Train run failed is not run again (:func:`sweep_trial`): Ray Train already
    retried its lost workers ``run.max_failures`` times, so the two budgets do not multiply.
    """
    from ray import tune

    return tune.FailureConfig(max_failures=spec.settings.max_failures)


# ----------------------------------------------------------------------------- the trial


@dataclass
class TrialPlan:
    """What every trial needs from the driver (pickled into Ray's object store once)."""

    spec: SweepSpec
    sweep_dir: str
    results_root: str


def trial_name(trial: Any) -> str:
    """Tune trial (and folder) name: ``trial-<trial id>``."""
    return f"trial-{trial.trial_id}"


def trial_config(plan: TrialPlan, tune_config: dict[str, Any], trial_id: str) -> ExperimentConfig:
    """The experiment one trial runs: sampled values and seed, storage inside the sweep folder."""
    from xmodal.engine.config import build_config

    spec = plan.spec
    params, seed = spec.trial_params(tune_config)
    raw = spec.experiment_raw(params, seed, f"trial-{trial_id}")
    raw.setdefault("run", {})
    raw["run"]["storage"] = plan.sweep_dir.rstrip("/") + "/runs"
    raw["run"]["mlflow"] = None  # the sweep's driver logs every trial as a child run (SweepTracking)
    raw["run"]["results"] = plan.results_root
    return build_config(raw, f"{spec.source} trial {trial_id}")


def shared_phase_name(config: ExperimentConfig, inputs: dict[str, Any]) -> str:
    """``shared/<phase>-<hash>``: a phase run named by its whole configuration and its inputs, so
    every trial that would train the same phase on the same inputs finds the same run."""
    plain = config.to_plain()
    plain.pop("name")
    plain.pop("run")
    plain["inputs"] = {k: getattr(v, "location", v) for k, v in sorted(inputs.items())}
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{SHARED_DIR}/{config.name.rsplit('/', 1)[-1]}-{digest}"


def lock_actor_name(sweep_name: str) -> str:
    return f"xmodal-phase-locks-{sweep_name}"


class PhaseLocks:
    """Lease locks by key (a Ray actor per sweep): one trial trains a shared phase, others wait.

    A lease expires unless renewed, so a trial that died holding one (killed worker, lost node)
    does not block the others: the next trial takes the phase over and resumes its checkpoint.
    """

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str, lease_seconds: float) -> bool:
        now = time.time()
        current = self.leases.get(key)
        if current is None or current[1] < now or current[0] == holder:
            self.leases[key] = (holder, now + lease_seconds)
            return True
        return False

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, (None,))[0] == holder:
            del self.leases[key]


class _Lease:
    """Holds a :class:`PhaseLocks` lease while a block runs, renewing it from a thread."""

    def __init__(self, locks: Any, key: str, holder: str, lease_seconds: float = LOCK_LEASE_SECONDS) -> None:
        self.locks, self.key, self.holder, self.lease = locks, key, holder, lease_seconds
        self.stop = threading.Event()

    def __enter__(self) -> "_Lease":
        import ray

        waited = False
        while not ray.get(self.locks.acquire.remote(self.key, self.holder, self.lease)):
            if not waited:
                print(f"[sweep] {self.holder} waits for {self.key}, which another trial is training", flush=True)
                waited = True
            time.sleep(2.0)
        self.thread = threading.Thread(target=self._renew, daemon=True)
        self.thread.start()
        return self

    def _renew(self) -> None:
        while not self.stop.wait(self.lease / 4):
            self.locks.acquire.remote(self.key, self.holder, self.lease)

    def __exit__(self, *exc: Any) -> None:
        import ray

        self.stop.set()
        ray.get(self.locks.release.remote(self.key, self.holder))


PERMANENT_FAILURES_DIR = "failed-permanently"


def permanent_failure_marker(folder: str, trial_id: str) -> str:
    """Where the error of a trial Tune must not rerun is kept (a permanent error, or a Train run
    that spent its retries), so Tune's retries of it end at once (a resume clears them)."""
    return f"{folder.rstrip('/')}/{PERMANENT_FAILURES_DIR}/trial-{trial_id}.txt"


def sweep_trial(tune_config: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable: one Ray Train run (or a phase chain), epochs forwarded to Tune.

    After training, one last report carries the test metrics (``sweep/final`` = 1) and the
    checkpoint that was tested. A trial that failed with an error that would come back (bad
    config or data, a non-finite loss), or whose Train run failed after Ray Train's own retries
    (``run.max_failures``), is not run again by Tune's retries: they re-raise it. Tune reruns
    (``sweep.max_failures``) only a trial whose process or Train controller died.
    """
    import ray
    from ray import tune

    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = tune.get_context().get_trial_id()
    marker = permanent_failure_marker(plan.sweep_dir, trial_id)
    earlier = read_text(marker)
    if earlier:  # Tune retries every failed trial; this one would fail the same way again
        raise RunFailedError(earlier, permanent=True)
    try:
        _sweep_trial(tune_config, plan, trial_id)
    except Exception as exc:
        oom = cuda_out_of_memory(exc)
        if oom is not None:  # the same configuration on the same GPU share would run out again
            line = out_of_memory_line(oom, trial_id)
            write_text(marker, line)
            raise RunFailedError(line, permanent=True) from exc
        if isinstance(exc, XmodalError) and (permanent_cause(exc) is not None or _train_gave_up(exc)):
            write_text(marker, error_line(exc))
        raise


def out_of_memory_line(oom: BaseException, trial_id: str) -> str:
    """What a trial that ran out of GPU memory records: the sweep goes on without it."""
    first = next((line.strip() for line in str(oom).splitlines() if line.strip()), "")
    return (
        f"CUDA out of memory in trial {trial_id} ({first[:200] or 'torch.OutOfMemoryError'}): this configuration does not fit "
        "its GPU share, so it is not run again and the sweep goes on (lower data.batch_size or the model's size, or "
        "raise scaling.gpus_per_worker)"
    )


def _train_gave_up(exc: BaseException) -> bool:
    """Whether Ray Train's failure policy ended the run (its ``TrainingFailedError`` is the cause):
    the lost workers were retried there, ``run.max_failures`` times, and a Tune rerun would
    multiply that budget."""
    import ray.train

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ray.train.TrainingFailedError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _sweep_trial(tune_config: dict[str, Any], plan: TrialPlan, trial_id: str) -> None:
    """The body of :func:`sweep_trial`: the trial's run or chain, and its final report."""
    import ray
    import torch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from xmodal.engine.chain import run_chain, upstream_phases
    from xmodal.engine.config import phase_configs
    from xmodal.engine.results import read_run_result
    from xmodal.engine.runner import run_single

    config = trial_config(plan, tune_config, trial_id)
    last_phase = config.phases[-1].name if config.phases else None
    phase_names: dict[str, str] = {}

    def train(run: ExperimentConfig, inputs: dict[str, Any], followed: bool):
        if plan.spec.settings.engine == "plain":
            from xmodal.engine.plain import run_plain_single

            torch.set_num_threads(run.scaling.torch_threads or max(1, int(run.scaling.cpus_per_worker)))
            device = "cuda" if run.scaling.use_gpu else "cpu"
            return run_plain_single(run, inputs, device=device, report=tune.report if followed else None)
        return run_single(run, inputs, callbacks=[TuneReportCallback()] if followed else None)

    def run_one(run: ExperimentConfig, inputs: dict[str, Any]):
        phase = run.name.rsplit("/", 1)[-1]
        if last_phase is None or phase == last_phase:
            run.name = f"trial-{trial_id}"  # the run Tune follows: resumes with the trial
            phase_names[phase] = run.name
            return train(run, inputs, followed=True)
        run.name = shared_phase_name(run, inputs)
        phase_names[phase] = run.name
        with _Lease(ray.get_actor(lock_actor_name(plan.spec.name)), run.name, f"trial-{trial_id}"):
            done = read_run_result(run)
            if done is not None:
                print(f"[sweep] trial-{trial_id} reuses {run.name} ({phase})", flush=True)
                return done
            return train(run, inputs, followed=False)

    # Phases the last one does not take inputs from (an arm that drops a pretraining) are not run.
    runs = phase_configs(config)
    needed = upstream_phases(runs, last_phase) + [last_phase] if last_phase else None
    result = run_chain(config, run_one, only_phases=needed if needed and len(needed) < len(runs) else None)[-1]
    final: dict[str, Any] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    final.update({"epoch": final_config(config).train.epochs, FINAL_KEY: 1, "results_dir": result.results_dir})
    final["tested_epoch"] = result.summary.get("tested_epoch")
    if result.checkpoint:
        final["checkpoint_path"] = result.checkpoint
    if phase_names:
        final["phase_runs"] = json.dumps(phase_names)
    tune.report(final)


class SweepProgress(Callback):
    """One console line per trial that ends: trials ended and failed, running, the best so far and
    the trial slots' busy share (Tune's own status table goes to the sweep's log file)."""

    def __init__(self, name: str, folder: str, metric: str, mode: str, slots: int, total: int | None) -> None:
        self.name, self.folder, self.metric, self.mode, self.slots, self.total = name, folder, metric, mode, slots, total
        self.started = time.time()
        self.begun: dict[str, float] = {}
        self.busy = 0.0
        self.done = self.failed = 0
        self.best: tuple[float, str] | None = None

    def status(self, trial_id: str, result: dict[str, Any] | None, error: str | None = None) -> str:
        """Record an ended trial; returns its console line."""
        now = time.time()
        self.busy += now - self.begun.pop(trial_id, now)
        value = (result or {}).get(self.metric)
        if error is not None:
            self.failed += 1
            outcome = f"failed: {error}"
        else:
            self.done += 1
            outcome = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else "ended without a final metric"
            if isinstance(value, (int, float)) and (self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])):
                self.best = (float(value), trial_id)
        running = len(self.begun)
        busy = self.busy + sum(now - begun for begun in self.begun.values())
        share = busy / max(self.slots * (now - self.started), 1e-9)
        of = f"/{self.total}" if self.total else ""
        best = f"; best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else ""
        return (
            f"[sweep {self.name}] trial {trial_id} {outcome} | {self.done + self.failed}{of} ended "
            f"({self.failed} failed), {running} running{best}; slots busy {100 * min(share, 1.0):.0f}%"
        )

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.begun.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        CONSOLE.line(self.status(trial.trial_id, trial.last_result))
        self._keep_study()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = read_text(permanent_failure_marker(self.folder, trial.trial_id)) or "see its error.txt"
        CONSOLE.line(self.status(trial.trial_id, trial.last_result, error=error.strip()))
        self._keep_study()

    def _keep_study(self) -> None:
        """A sweep on object storage: the study's local copy goes up once Optuna has the trial's result."""
        if is_remote(self.folder):
            upload_study(self.folder)


class SweepTracking(Callback):
    """MLflow child runs of a sweep's trials, logged from the Tune driver under the sweep's parent
    run (:mod:`xmodal.engine.tracking` says why from the driver): the swept values and seed as
    params, every epoch's metrics at step = epoch, the test metrics after training, the trial's
    result files, and a failed trial ``FAILED`` with its error line."""

    def __init__(self, spec: SweepSpec, folder: str, parent: Tracker, stage: str = "search") -> None:
        self.spec, self.folder, self.parent, self.stage = spec, folder, parent, stage
        self.children: dict[str, Tracker] = {}

    def child(self, trial: Any) -> Tracker:
        """The trial's MLflow run (opened again after a resume: keyed by trial id)."""
        if trial.trial_id not in self.children:
            params, seed = self.spec.trial_params(trial.config)
            self.children[trial.trial_id] = self.parent.child(
                f"trial-{trial.trial_id}", key=f"trial-{trial.trial_id}", params={**params, "seed": seed},
                tags={"xmodal_stage": self.stage, "xmodal_trial": trial.trial_id},
            )
        return self.children[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.child(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        final = bool(result.get(FINAL_KEY))
        # The final row repeats the tested epoch's validation metrics: only its test metrics are new.
        metrics = {k: v for k, v in result.items() if "/" in k and k != FINAL_KEY and (not final or k.startswith("test/"))}
        self.child(trial).log_metrics(metrics, step=result.get("epoch"))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        child = self.child(trial)
        folder = (trial.last_result or {}).get("results_dir")
        if isinstance(folder, str) and not is_remote(folder):
            child.log_files(result_files(folder))
        child.end("FINISHED" if (trial.last_result or {}).get(FINAL_KEY) else "KILLED")  # KILLED: stopped early (ASHA)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = read_text(permanent_failure_marker(self.folder, trial.trial_id)) or "see the trial's error.txt"
        self.child(trial).end("FAILED", error.strip())


def open_sweep_tracking(spec: SweepSpec, base: ExperimentConfig, folder: str, results_root: str) -> Tracker | None:
    """The sweep's MLflow parent run (``run.mlflow`` of its experiment; ``None`` when unset), opened
    again when the sweep resumes. A ``local`` store lives in the sweep folder (or, on object
    storage, in the local results folder)."""
    if base.run.mlflow is None:
        return None
    settings = {k: v for k, v in spec.to_plain()["settings"].items() if k != "study_storage"}
    parameters = {p.key: p.type if p.type != "choice" else list(p.choices) for p in spec.parameters}
    return Tracker.start(
        base.run.mlflow, results_root if is_remote(folder) else folder, spec.name, spec.name, key=f"sweep:{folder}",
        params={"sweep": settings, "parameters": parameters, "metric": spec.metric, "mode": spec.mode},
        tags={"xmodal_stage": "sweep", "xmodal_folder": folder},
    )


def dashboard_line(name: str, joined: bool) -> str:
    """The Ray dashboard's URL, for the sweep's first lines. On a cluster it is the address the head
    registered (reachable inside the cluster's network): from a laptop, ``ray dashboard
    <cluster yaml>`` or a ``kubectl port-forward`` of the head's port 8265 brings it to localhost."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 - an older or client-mode Ray: say nothing wrong
        url = ""
    if not url:
        return f"[sweep {name}] Ray dashboard: not running in the Ray this sweep uses"
    url = url if "://" in url else f"http://{url}"
    if not joined:
        return f"[sweep {name}] Ray dashboard: {url}"
    return (
        f"[sweep {name}] Ray dashboard: {url} (the head's address in the cluster; from your machine: "
        "ray dashboard <cluster yaml>, or kubectl port-forward to the head's port 8265)"
    )


def rerun_seeds(spec: SweepSpec, base: ExperimentConfig) -> list[int]:
    """Seeds of the rerun stage: the ones after the largest seed the search used."""
    used = [seed for seed in spec.seeds if seed is not None] or [final_config(base).train.seed]
    return list(range(max(used) + 1, max(used) + 1 + spec.settings.rerun_best.seeds))


def rerun_best(spec: SweepSpec, plan: TrialPlan, trainable: Any, best: dict[str, Any], slots: int, callbacks: list[Any]) -> dict[str, Any]:
    """The stage after the search: the best configuration trained again with
    ``sweep.rerun_best.seeds`` new seeds, as a Tune experiment of its own (``<sweep>/rerun-best``,
    resumed with the sweep); its mean +- std goes to ``rerun_best.json``, the summary and the report.
    """
    from ray import tune

    folder = f"{plan.sweep_dir.rstrip('/')}/{RERUN_DIR}"
    seeds = rerun_seeds(spec, base_experiment(spec))
    shown = ", ".join(f"{k}={v}" for k, v in best["params"].items()) or "the base settings"
    CONSOLE.line(f"[sweep {spec.name}] rerunning the best configuration ({shown}) with seeds {seeds}")
    if tune.Tuner.can_restore(folder):
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={GRID_POINT_KEY: dict(best["params"]), SEED_KEY: tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, max_concurrent_trials=slots, trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=RERUN_DIR, storage_path=plan.sweep_dir, failure_config=trial_failure_config(spec), verbose=0, callbacks=callbacks,
            ),
        )
    tuner.fit()
    record = summarise_rerun(spec, folder, best)
    write_text(f"{plan.sweep_dir.rstrip('/')}/{RERUN_FILE}", json.dumps(record, indent=2))
    CONSOLE.line(f"[sweep {spec.name}] {rerun_line(record)}")
    return record


def summarise_rerun(spec: SweepSpec, folder: str, best: dict[str, Any]) -> dict[str, Any]:
    """Mean +- std of the rerun stage's trials, of the ranking metric and its test counterpart."""
    from xmodal.report.stats import mean_and_error
    from xmodal.report.sweeps import final_value, load_trials

    test_metric = spec.metric.replace("val/", "test/", 1)
    runs = []
    for trial in sorted(load_trials(folder), key=lambda t: t["params"].get(SEED_KEY, 0)):
        value = final_value(trial, spec.metric) if trial["state"] == "TERMINATED" else None
        test = (trial["final"] or {}).get(test_metric) if value is not None else None
        runs.append({"trial_id": trial["trial_id"], "seed": trial["params"].get(SEED_KEY), "state": trial["state"], "value": value, "test": test})
    values = [r["value"] for r in runs if r["value"] is not None]
    tests = [float(r["test"]) for r in runs if isinstance(r["test"], (int, float))]
    mean, std, _ = mean_and_error(values) if values else (None, None, None)
    test_mean, test_std, _ = mean_and_error(tests) if tests and test_metric != spec.metric else (None, None, None)
    return {
        "params": best["params"], "searched": {"trial_id": best["trial_id"], "value": best["value"]},
        "metric": spec.metric, "mode": spec.mode, "seeds": [r["seed"] for r in runs], "runs": runs, "n": len(values),
        "mean": mean, "std": std, "test_metric": test_metric, "test_mean": test_mean, "test_std": test_std,
    }


# ----------------------------------------------------------------------------- Ray


def start_ray(spec: SweepSpec, base: ExperimentConfig, per_trial: dict[str, float]) -> bool:
    """Connect to the configured cluster, or start a local Ray (with its dashboard).

    The dashboard is what frees the workers of a trial ASHA stops (Train V2's placement-group
    cleaner uses the State API), so ASHA is refused on an already-connected Ray without it.

    Returns:
        Whether this call started (and so must shut down) Ray.
    """
    import ray

    if ray.is_initialized():
        if spec.settings.scheduler == "asha" and not state_api_available():
            raise ConfigError(
                "sweep.scheduler=asha needs the Ray dashboard (State API) to free the workers of stopped trials; "
                "the Ray this process is connected to runs without it (start it with include_dashboard=True, "
                "or use scheduler: fifo)"
            )
        return False
    needed = per_trial["CPU"] + reserved_data_cpus(spec, base)
    return connect(base.run.address, spec.settings.local_cpus or int(max(os.cpu_count() or 1, math.ceil(needed))), dashboard=True)


# ----------------------------------------------------------------------------- the sweep


def _check_same_sweep(stored: dict[str, Any], spec: SweepSpec, folder: str) -> None:
    from xmodal.settings import to_dict
    from xmodal.tune.spec import SweepSettings

    # Settings added since the sweep started (e.g. rerun_best) take their defaults: a resume after an upgrade.
    stored = {**stored, "settings": {**to_dict(SweepSettings()), **(stored.get("settings") or {})}}
    # Paths compare relative to a Ray job's working dir: a resubmission after a code change unpacks
    # the same job under another _ray_pkg_<hash> folder.
    stored, current = portable_paths(stored), portable_paths(json.loads(json.dumps(spec.to_plain())))
    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if changed:
        detail = []
        for key in changed:
            if isinstance(stored.get(key), dict) and isinstance(current.get(key), dict):
                inner = sorted(k for k in set(stored[key]) | set(current[key]) if stored[key].get(k) != current[key].get(k))
                detail.append(f"{key}.{{{', '.join(inner)}}}")
            else:
                detail.append(key)
        raise ConfigError(
            f"sweep {spec.name!r} in {folder} was started with another config ({'; '.join(detail)} differ); "
            "resume it with the same config and overrides, or give this one another name (name=...)"
        )


def check_data_plans(spec: SweepSpec, limit: int = 16) -> None:
    """Plan the run (data, method checks, steps per epoch) of each distinct data setting.

    Raises:
        ConfigError: A configuration's data cannot be trained on, naming the swept values.
    """
    from xmodal.engine.runner import plan_run
    from xmodal.tune.spec import validation_points

    seen: set[str] = set()
    for params, seed in validation_points(spec):
        for config in phase_runs(spec.build_trial(params, seed, "check")):
            key = json.dumps([config.to_plain()["data"], config.method, to_plain_settings(config), config.scaling.num_workers], sort_keys=True, default=str)
            if key in seen or len(seen) >= limit:
                continue
            seen.add(key)
            try:
                plan_run(config)
            except XmodalError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
                raise ConfigError(f"{spec.source}: trials with {shown or 'the base settings'} cannot run ({config.name}): {exc}") from exc


def to_plain_settings(config: ExperimentConfig) -> Any:
    from xmodal.settings import to_dict

    return to_dict(config.method_settings)


def run_sweep(source: str | Path | dict[str, Any] | SweepSpec, overrides: list[str] | None = None, resume: bool = False) -> SweepResult:
    """Run (or resume) a sweep to the end.

    Args:
        source: Sweep YAML file, its contents, or a loaded :class:`SweepSpec`.
        overrides: ``key=value`` items (``train.epochs=2``, ``sweep.num_samples=4``, ``name=x``).
        resume: Continue the interrupted sweep of this name: finished trials are kept, unfinished
            and errored ones resume from their last Train checkpoint.

    Raises:
        ConfigError: Invalid sweep; a sweep of that name exists and ``resume`` is false; nothing
            to resume; or ``resume`` with a config other than the one the sweep started with.
    """
    from ray import tune

    from xmodal.engine.setup import ensure_data

    spec = source if isinstance(source, SweepSpec) else load_sweep(source, overrides)
    folder = sweep_dir(spec)
    settings = spec.settings
    base = base_experiment(spec)
    per_trial = trial_resources(base, settings.trial_cpus, settings.engine)
    check_reachable(folder, "sweep.storage")
    exists = tune.Tuner.can_restore(folder)
    if exists and not resume:
        raise ConfigError(
            f"sweep {spec.name!r} already exists in {folder}; add --resume to continue it, "
            "or give this one another name (name=...)"
        )
    if resume:
        stored = read_text(folder.rstrip("/") + "/" + SPEC_FILE)
        if not exists or stored is None:
            raise ConfigError(f"nothing to resume: no sweep {spec.name!r} in {folder}")
        _check_same_sweep(json.loads(stored), spec, folder)

    # Generate/index the data once here rather than in every concurrent trial, and refuse data
    # settings some trials could not train on (e.g. a label fraction below one batch).
    ensure_data(base)
    check_data_plans(spec)

    results_root = settings.results or join(folder, "results")
    if is_remote(folder):
        fetch_study(folder)  # before Tune restores its searcher, which reads the study
    plan = TrialPlan(spec=spec, sweep_dir=folder, results_root=results_root)
    saved_api_address = os.environ.get("RAY_API_SERVER_ADDRESS")
    started_ray = start_ray(spec, base, per_trial)
    started = time.time()
    CONSOLE.show_runs = False
    CONSOLE.log_to((cache_folder(folder) if is_remote(folder) else Path(folder)) / LOG_FILE)
    # Tune's newer console output prints its header and status tables at any verbosity; the
    # classic reporter is silent at verbose=0 (SweepProgress prints a line per ended trial).
    saved_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        import ray

        slots = settings.max_concurrent_trials
        if resume:  # a restored sweep keeps the concurrency it started with
            slots = json.loads(read_text(folder.rstrip("/") + "/" + RUN_FILE) or "{}").get("max_concurrent_trials", slots)
        CONSOLE.line(dashboard_line(spec.name, joined=not started_ray or bool(base.run.address or os.environ.get("RAY_ADDRESS"))))
        cluster_slots = ClusterSlots(spec.name, per_trial, reserved_data_cpus(spec, base), fixed=None if slots == "auto" else int(slots))
        slots = cluster_slots.current()
        actor = trial_actor_resources(spec, base, per_trial, ray.cluster_resources())
        trainable = tune.with_resources(tune.with_parameters(sweep_trial, plan=plan), actor)
        tracking = open_sweep_tracking(spec, base, folder, results_root)
        tracked = [SweepTracking(spec, folder, tracking)] if tracking else []
        if resume:
            keep_trial_results(folder)
            delete_tree(f"{folder.rstrip('/')}/{PERMANENT_FAILURES_DIR}")  # the user may have fixed their cause
            tuner = tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False)
            CONSOLE.line(f"[sweep {spec.name}] resuming from {folder}")
        else:
            write_text(folder.rstrip("/") + "/" + SPEC_FILE, json.dumps(spec.to_plain(), indent=2))
            search_alg, param_space, num_samples = make_search(spec, cluster_slots)
            grid = [len(v["grid_search"]) for v in param_space.values() if isinstance(v, dict) and "grid_search" in v]
            total = num_samples * math.prod(grid)
            progress = SweepProgress(spec.name, folder, spec.metric, spec.mode, int(slots), total)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    search_alg=search_alg,
                    scheduler=make_scheduler(spec),
                    num_samples=num_samples,
                    max_concurrent_trials=None,  # the search algorithm counts slots as the cluster changes (ClusterSlots)
                    metric=spec.metric,  # also the ResultGrid's: get_best_result() ranks as the sweep does
                    mode=spec.mode,
                    trial_name_creator=trial_name,
                    trial_dirname_creator=trial_name,
                ),
                run_config=tune.RunConfig(
                    name=spec.name,
                    storage_path=settings.storage,
                    failure_config=trial_failure_config(spec),
                    verbose=0,  # SweepProgress prints a line per ended trial
                    callbacks=[progress, *tracked],
                ),
            )
            CONSOLE.line(
                f"[sweep {spec.name}] {settings.search} search, {total} trial(s) of "
                f"{', '.join(f'{k}={v:g}' for k, v in per_trial.items())} each, {slots} at a time; folder {folder}; "
                f"each trial's runs log to {LOG_FILE} in its results folder"
            )
        _record_session(folder, int(slots), started, None, resume)
        # Trials of a chain sweep coordinate their shared phases through this actor (no CPU held).
        locks = ray.remote(num_cpus=0)(PhaseLocks).options(name=lock_actor_name(spec.name), get_if_exists=True).remote()
        result_grid = tuner.fit()
        rerun = run_rerun_stage(spec, plan, trainable, int(slots), tracking) if settings.rerun_best.seeds else None
        del locks
    finally:
        ended = time.time()
        CONSOLE.show_runs = True
        CONSOLE.log_to(None)
        if is_remote(folder):  # what a local sweep folder holds, on object storage too
            upload_study(folder)
            upload(cache_folder(folder) / LOG_FILE, join(folder, LOG_FILE))
        _restore_env("RAY_AIR_NEW_OUTPUT", saved_output)
        if started_ray:
            import ray

            ray.shutdown()
            _restore_env("RAY_API_SERVER_ADDRESS", saved_api_address)
    _record_session(folder, int(slots), started, ended, resume)
    result = summarise_sweep(spec, folder, started, ended, int(slots))
    result.result_grid, result.rerun, result.tracking = result_grid, rerun, tracking
    if tracking is not None:
        finish_sweep_tracking(tracking, result)
    return result


def run_rerun_stage(spec: SweepSpec, plan: TrialPlan, trainable: Any, slots: int, tracking: Tracker | None) -> dict[str, Any] | None:
    """:func:`rerun_best` on the search's best finished trial (``None`` when no trial finished)."""
    from xmodal.report.sweeps import best_trial, final_value, load_trials

    best = best_trial(load_trials(plan.sweep_dir), spec.metric, spec.mode)
    if best is None:
        CONSOLE.line(f"[sweep {spec.name}] no trial finished: nothing to rerun")
        return None
    callbacks: list[Any] = [SweepProgress(spec.name, f"{plan.sweep_dir.rstrip('/')}/{RERUN_DIR}", spec.metric, spec.mode, slots, spec.settings.rerun_best.seeds)]
    if tracking is not None:
        callbacks.append(SweepTracking(spec, f"{plan.sweep_dir.rstrip('/')}/{RERUN_DIR}", tracking, stage="rerun_best"))
    chosen = {"trial_id": best["trial_id"], "params": best["params"], "value": final_value(best, spec.metric)}
    return rerun_best(spec, plan, trainable, chosen, slots, callbacks)


def finish_sweep_tracking(tracking: Tracker, result: SweepResult) -> None:
    """The sweep's outcome on its MLflow parent run: the best value and trial, the rerun's spread."""
    metrics: dict[str, Any] = {"trials_per_hour": result.trials_per_hour, "busy_share": result.busy_share}
    if result.best:
        metrics[f"best/{result.metric}"] = result.best["value"]
        tracking.set_tags({"xmodal_best_trial": result.best["trial_id"], "xmodal_best_params": json.dumps(result.best["params"], default=str)})
    if result.rerun and result.rerun["mean"] is not None:
        metrics.update({f"rerun/{result.metric}/mean": result.rerun["mean"], f"rerun/{result.metric}/std": result.rerun["std"]})
        if result.rerun.get("test_mean") is not None:
            test = result.rerun["test_metric"]
            metrics.update({f"rerun/{test}/mean": result.rerun["test_mean"], f"rerun/{test}/std": result.rerun["test_std"]})
    tracking.log_metrics(metrics)
    tracking.end("FINISHED" if result.best else "FAILED", None if result.best else "no trial finished")


def _restore_env(name: str, saved: str | None) -> None:
    """Put an environment variable back as it was before the sweep (unset if it was)."""
    if saved is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = saved


def keep_trial_results(folder: str) -> None:
    """Copy each trial's ``result.json`` aside before a resume.

    Tune restarts an interrupted function trial with a fresh ``result.json`` (the Train run resumes
    from its checkpoint, but the epochs reported before the interruption would vanish from Tune's
    files); the report reads the copies too.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if is_remote(folder):
        import pyarrow.fs

        fs, root = filesystem(folder)
        trials = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)) if i.base_name.startswith("trial-")]
        for result in fs.get_file_info([f"{trial}/result.json" for trial in trials]):
            if result.type == pyarrow.fs.FileType.File and result.size:
                fs.copy_file(result.path, result.path.rsplit("/", 1)[0] + f"/result-before-{stamp}.json")
        return
    for result in Path(folder).glob("trial-*/result.json"):
        if result.stat().st_size:
            (result.parent / f"result-before-{stamp}.json").write_bytes(result.read_bytes())


def _record_session(folder: str, slots: int, started: float, ended: float | None, resume: bool) -> None:
    """Keep each launch of the sweep (slots, start, end) in ``sweep_run.json`` for the report."""
    location = folder.rstrip("/") + "/" + RUN_FILE
    record = json.loads(read_text(location) or "{}")
    sessions = [s for s in record.get("sessions", []) if s.get("started") != started]
    sessions.append({"started": started, "ended": ended, "resume": resume})
    write_text(location, json.dumps({"max_concurrent_trials": slots, "sessions": sessions}, indent=2))


def summarise_sweep(spec: SweepSpec, folder: str, started: float, ended: float, slots: int) -> SweepResult:
    """Read the sweep folder back into a :class:`SweepResult` (figures for the time window)."""
    from xmodal.report.sweeps import best_trial, final_value, load_trials, utilisation

    trials = load_trials(folder)
    usage = utilisation(trials, slots, window=(started, ended))
    best = best_trial(trials, spec.metric, spec.mode)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    return SweepResult(
        name=spec.name,
        sweep_dir=folder,
        metric=spec.metric,
        mode=spec.mode,
        best=None if best is None else {**{k: best[k] for k in ("trial_id", "params", "seed", "metrics")}, "value": final_value(best, spec.metric)},
        states=states,
        errors={t["trial_id"]: t["error"] for t in trials if t.get("error")},
        wall_seconds=ended - started,
        trials_per_hour=usage["trials_per_hour"],
        busy_share=usage["busy_share"],
        max_concurrent_trials=slots,
        study_storage=study_storage_url(spec),
        trials=trials,
    )
