"""MLflow tracking (``run.mlflow``): params, per-epoch metrics and result files of runs and sweeps.

``run.mlflow`` is ``local`` (an SQLite store ``mlflow.db`` and an ``mlartifacts/`` folder beside the
results: MLflow 3 refuses its old file store), a tracking server URL (``http://host:5000``) or any
tracking URI MLflow takes. A single run (``xmodal run``) is one MLflow run in the experiment named
after the config (a chain: one run per phase); a sweep is a parent run with one child run per trial
(:mod:`xmodal.tune.sweep`).

Everything goes through :class:`Tracker`, which holds only the tracking URI and a run id, so it
pickles into Ray's callbacks. Why not Ray's own integrations: ``setup_mlflow`` logs from inside each
trial, so every trial (on a spot GPU node) would need a route to the server, and a local SQLite
store would have as many writers as trials; ``MLflowLoggerCallback`` logs from the Tune driver, as
wanted, but logs Tune's raw config (grid points, repeat indices) as params and makes flat runs. A
sweep logs through its own Tune callback in the driver instead (one writer, swept values and seed
as params, nested runs); a single run through a Ray Train callback
(:class:`~xmodal.engine.tracking_train.EpochMetrics`), which runs in Train's controller on the
driver's node. This module imports neither Ray nor MLflow (configs validate ``run.mlflow`` here).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmodal.errors import ConfigError, error_line
from xmodal.settings import flatten_dotted

if TYPE_CHECKING:
    from xmodal.engine.config import ExperimentConfig
    from xmodal.engine.results import RunResult

LOCAL = "local"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Tags that find a run again when its run or sweep resumes (plain names: MLflow filters need no quoting).
RUN_KEY_TAG = "xmodal_key"
ERROR_TAG = "xmodal_error"
INSTALL_HINT = "pip install xmodal[mlflow]"
# MLflow's limits per log_batch call and per param value.
_BATCH_PARAMS, _BATCH_METRICS, _PARAM_CHARS = 100, 1000, 6000
# Result files of a run folder worth keeping beside its metrics (TensorBoard stays out: MLflow has the curves).
RESULT_SUFFIXES = (".json", ".png", ".md", ".csv", ".yaml", ".log")


def check_tracking_uri(value: str | None, where: str) -> None:
    """Refuse a ``run.mlflow`` value that is neither ``local`` nor a tracking URI.

    Raises:
        ConfigError: Naming ``where`` and the value.
    """
    if value is None or value == LOCAL or value == "databricks":
        return
    if not isinstance(value, str) or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):  # host:port alone is no URI
        raise ConfigError(
            f"{where}={value!r}; expected local, a tracking server URL (http://host:5000) or a tracking URI "
            "(sqlite:///path/mlflow.db, postgresql://...)"
        )


def require_mlflow(where: str = "run.mlflow") -> Any:
    """The ``mlflow`` module.

    Raises:
        ConfigError: MLflow is not installed (it is an optional extra).
    """
    try:
        import mlflow
    except ImportError as exc:
        raise ConfigError(f"{where} is set but MLflow is not installed; {INSTALL_HINT}") from exc
    return mlflow


def store_of(setting: str, folder: str | Path) -> tuple[str, str | None]:
    """Tracking URI and artifact location of a ``run.mlflow`` value (``local``: inside ``folder``)."""
    if setting != LOCAL:
        return setting, None
    if "://" in str(folder):
        raise ConfigError(
            f"run.mlflow=local keeps an SQLite store beside the results, and they are on object storage ({folder}); "
            "give run.mlflow a tracking server URL (http://host:5000) or a database URI"
        )
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / STORE_FILE}", (folder / ARTIFACTS_DIR).as_uri()


def flat_params(value: Any) -> dict[str, str]:
    """Nested settings as dotted keys -> text (MLflow params are strings)."""
    return {key: str(leaf)[:_PARAM_CHARS] for key, leaf in flatten_dotted(value).items()}


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a result row (bools and bookkeeping strings left out)."""
    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class Tracker:
    """One MLflow run, by tracking URI and run id (pickles into Ray callbacks; the client does not).

    Attributes:
        tracking_uri: Where the run lives.
        run_id: Its id.
        experiment_id: Its experiment's id.
    """

    def __init__(self, tracking_uri: str, run_id: str, experiment_id: str) -> None:
        self.tracking_uri, self.run_id, self.experiment_id = tracking_uri, run_id, experiment_id
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = require_mlflow().MlflowClient(self.tracking_uri)
        return self._client

    @classmethod
    def start(
        cls,
        setting: str,
        folder: str | Path,
        experiment: str,
        run_name: str,
        *,
        key: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> Tracker:
        """Open the run tagged ``key`` in ``experiment`` again (a resumed run or sweep), else a new one.

        Args:
            setting: ``run.mlflow``.
            folder: Where a ``local`` store lives.
            experiment: MLflow experiment name (made when missing).
            run_name: The run's name.
            key: What identifies this run across launches (run name, sweep folder).
            params: Logged once (nested mappings as dotted keys).
            tags: Extra tags.
        """
        mlflow = require_mlflow()
        uri, artifacts = store_of(setting, folder)
        client = mlflow.MlflowClient(uri)
        try:
            found = client.get_experiment_by_name(experiment)
        except mlflow.exceptions.MlflowException as exc:  # a server that does not answer, after MLflow's retries
            raise ConfigError(f"run.mlflow={setting!r}: the tracking store cannot be reached ({error_line(exc)[:300]})") from exc
        if found is None:
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
            except mlflow.exceptions.MlflowException:  # made meanwhile by another process
                experiment_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        return cls(uri, "", experiment_id)._open(client, run_name, key, params, tags, parent=None)

    def child(self, run_name: str, *, key: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> Tracker:
        """A nested run under this one (a sweep's trial), opened again when ``key`` exists."""
        return Tracker(self.tracking_uri, "", self.experiment_id)._open(self.client, run_name, key, params, tags, parent=self)

    def _open(
        self, client: Any, run_name: str, key: str, params: dict[str, Any] | None, tags: dict[str, str] | None, parent: Tracker | None,
    ) -> Tracker:
        scope = f" and tags.mlflow.parentRunId = '{parent.run_id}'" if parent else ""
        earlier = client.search_runs([self.experiment_id], filter_string=f"tags.{RUN_KEY_TAG} = '{key}'{scope}", max_results=1)
        self._client = client
        if earlier:
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return self
        all_tags = {RUN_KEY_TAG: key, **(tags or {})}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        self.run_id = client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        if params:
            self.log_params(params)
        return self

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat_params(params).items()]
        for start in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[start:start + _BATCH_PARAMS])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log the finite numbers of ``metrics`` at ``step`` (an epoch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step or 0)) for k, v in numeric_metrics(metrics).items()]
        for start in range(0, len(items), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[start:start + _BATCH_METRICS])

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One epoch's metrics at step = its ``epoch`` (the engine numbers epochs from 1)."""
        self.log_metrics(metrics, step=metrics.get("epoch"))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value)[:5000])

    def log_files(self, paths: list[str | Path], artifact_path: str | None = None) -> None:
        """Upload files and folders (a folder keeps its name under ``artifact_path``)."""
        for path in map(Path, paths):
            if path.is_dir():
                inner = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self.client.log_artifacts(self.run_id, str(path), inner)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Close the run: ``FINISHED``, ``FAILED`` (with its error line as a tag) or ``KILLED``."""
        if error:
            self.set_tags({ERROR_TAG: error})
        self.client.set_terminated(self.run_id, status=status)


def result_files(folder: str | Path) -> list[Path]:
    """A run's result files worth keeping in MLflow: run.json, panels, reports, its ``artifacts/``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in RESULT_SUFFIXES]
    return files + ([folder / "artifacts"] if (folder / "artifacts").is_dir() else [])


def local_root(config: ExperimentConfig) -> Path:
    """The results folder all runs of ``config`` share (a ``local`` store lives there)."""
    from xmodal.engine.results import results_dir

    folder = results_dir(config)
    for _ in config.name.split("/"):
        folder = folder.parent
    return folder


def track_run(config: ExperimentConfig, fit: Callable[[Tracker | None], RunResult]) -> RunResult:
    """Run ``fit`` inside an MLflow run when ``run.mlflow`` is set.

    ``fit`` gets the run's :class:`Tracker` (``None`` without ``run.mlflow``) for its epochs: Ray
    Train runs through :func:`~xmodal.engine.tracking_train.epoch_callbacks`, the plain engine
    through ``report=tracker.log_epoch``.

    The run (named and keyed by the run's name, so a resumed run continues it) gets the config as
    params, each epoch's metrics, the test metrics (at step = the last epoch) and the run's result
    files; a failed run ends ``FAILED`` with its error line.
    """
    if config.run.mlflow is None:
        return fit(None)
    plain = config.to_plain()
    plain.pop("phases", None)
    tracker = Tracker.start(
        config.run.mlflow, local_root(config), config.name.split("/")[0], config.name, key=config.name,
        params=plain, tags={"xmodal_method": config.method},
    )
    try:
        result = fit(tracker)
    except BaseException as exc:
        tracker.end("FAILED", error_line(exc))
        raise
    # The tested weights' validation metrics are an epoch's already: only the test metrics are new.
    tracker.log_metrics({k: v for k, v in result.metrics.items() if k.startswith("test/")}, step=config.train.epochs)
    tracker.log_files(result_files(result.results_dir))
    tracker.end("FINISHED")
    return result
