"""MLflow tracking of single runs (``run.mlflow``), without Ray: params, per-epoch metrics, files, failures.

The sweep side (a parent run, one child run per trial, read back from an MLflow server through its
REST API) runs in tests/test_sweep_features.py.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

from xmodal.engine.config import load_config
from xmodal.engine.results import RunResult, results_dir
from xmodal.engine.tracking import ERROR_TAG, STORE_FILE, Tracker, local_root, require_mlflow, track_run
from xmodal.errors import ConfigError, TrainingError

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "experiments" / "baselines" / "sar-buildings.yaml"


def tracked_config(tmp_path: Path, *extra: str):
    return load_config(BASELINE, [f"run.storage={tmp_path / 'runs'}", "run.mlflow=local", "name=tracked", "train.epochs=2", *extra])


@pytest.mark.parametrize("value", ["mlruns", "local-ish", "localhost:5000"])
def test_run_mlflow_must_be_local_or_a_tracking_uri(tmp_path: Path, value: str):
    with pytest.raises(ConfigError, match=rf"run.mlflow='{value}'; expected local, a tracking server URL"):
        load_config(BASELINE, [f"run.mlflow={value}"])
    assert load_config(BASELINE, ["run.mlflow=http://127.0.0.1:5000"]).run.mlflow == "http://127.0.0.1:5000"


def test_a_config_asking_for_mlflow_without_it_names_the_extra(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an install without the extra has
    with pytest.raises(ConfigError, match=r"run.mlflow is set but MLflow is not installed; pip install xmodal\[mlflow\]"):
        require_mlflow()
    config = tracked_config(tmp_path)
    with pytest.raises(ConfigError, match=r"pip install xmodal\[mlflow\]"):
        track_run(config, lambda tracker: pytest.fail("the run must not start"))


def test_a_run_logs_its_config_every_epoch_and_its_files_and_a_relaunch_continues_it(tmp_path: Path):
    from mlflow import MlflowClient

    config = tracked_config(tmp_path)
    folder = results_dir(config)
    seen_callbacks = []

    def fit(tracker):
        """Stands in for Ray Train: the epoch callback travels pickled to Train's controller."""
        from xmodal.engine.tracking_train import epoch_callbacks

        (callback,) = [pickle.loads(pickle.dumps(c)) for c in epoch_callbacks(tracker)]
        seen_callbacks.append(callback)
        for epoch, iou in ((1, 0.25), (2, 0.5)):
            callback.after_report(None, [{"epoch": epoch, "val/iou": iou, "train/loss": 1.0 / epoch, "results_dir": str(folder), "flag": True}], None)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text('{"name": "tracked"}')
        (folder / "panels_test.png").write_bytes(b"\x89PNG")
        (folder / "tensorboard").mkdir()
        return RunResult("tracked", {"val/iou": 0.5, "test/iou": 0.45}, None, str(folder))

    result = track_run(config, fit)
    assert result.metrics["test/iou"] == 0.45
    store = local_root(config) / STORE_FILE
    assert store.is_file() and store.parent == (tmp_path / "runs").resolve(), "the local store lives beside the run folders"
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["train.lr"] == str(config.train.lr) and run.data.params["method"] == "supervised"
    assert run.data.params["scaling.num_workers"] == "1"
    history = client.get_metric_history(run.info.run_id, "val/iou")
    assert [(m.step, m.value) for m in history if m.step in (1, 2)] == [(1, 0.25), (2, 0.5)]
    assert run.data.metrics["test/iou"] == 0.45 and "flag" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "panels_test.png"} <= artifacts and "tensorboard" not in artifacts

    # Relaunched (a resumed run of the same name): the same MLflow run goes on.
    again = track_run(config, lambda tracker: RunResult("tracked", {"test/iou": 0.6}, None, str(folder)))
    assert again.metrics == {"test/iou": 0.6}
    (run_again,) = client.search_runs([run.info.experiment_id])
    assert run_again.info.run_id == run.info.run_id and run_again.data.metrics["test/iou"] == 0.6

    # A run that fails ends FAILED with its error line (same store: one results folder for all runs).
    broken = tracked_config(tmp_path, "name=broken")

    def fail(tracker):
        raise TrainingError("non-finite loss at step 3 (lr 10.0)")

    with pytest.raises(TrainingError):
        track_run(broken, fail)
    (failed,) = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert failed.info.status == "FAILED" and failed.data.tags[ERROR_TAG] == "non-finite loss at step 3 (lr 10.0)"


def test_no_tracking_without_the_setting(tmp_path: Path):
    config = load_config(BASELINE, [f"run.storage={tmp_path}"])
    assert config.run.mlflow is None
    assert track_run(config, lambda tracker: tracker) is None
    assert not list(tmp_path.rglob(STORE_FILE))


def test_a_tracker_pickles_without_its_client(tmp_path: Path):
    parent = Tracker.start("local", tmp_path, "exp", "sweep", key="sweep:x")
    child = parent.child("trial-1", key="trial-1", params={"train.lr": 0.01, "seed": 3})
    restored = pickle.loads(pickle.dumps(child))
    assert restored._client is None and restored.run_id == child.run_id
    restored.log_metrics({"val/iou": 0.4, "nan": float("nan")}, step=1)
    run = restored.client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.params == {"train.lr": "0.01", "seed": "3"}
    assert run.data.metrics == {"val/iou": 0.4}
    # The same key under the same parent: the same child (a resumed trial).
    assert parent.child("trial-1", key="trial-1").run_id == child.run_id


def test_a_local_store_beside_results_on_object_storage_is_refused():
    with pytest.raises(ConfigError, match=r"run.mlflow=local keeps an SQLite store beside the results, and they are on object storage \(s3://b/x\)"):
        Tracker.start("local", "s3://b/x", "sweep", "sweep", key="sweep:s3://b/x")


def test_a_plain_engine_run_logs_every_epoch(tiny_world: Path, tmp_path: Path):
    """`xmodal run --plain` (no Ray): the run's epochs reach MLflow through the engine's report hook."""
    from mlflow import MlflowClient

    from xmodal.engine.plain import run_plain

    config = load_config(BASELINE, [
        f"data.root={tiny_world}", "data.tile_size=64", "data.batch_size=4", "train.epochs=2", "name=plain-tracked", "run.panels=0",
        f"run.storage={tmp_path / 'runs'}", "run.mlflow=local", "model.encoder_depth=3", "model.decoder_channels=[16, 8, 8]",
        "scaling.torch_threads=1",
    ])
    (result,) = run_plain(config, log=lambda line: None)
    client = MlflowClient(f"sqlite:///{local_root(config) / STORE_FILE}")
    (run,) = client.search_runs([client.get_experiment_by_name("plain-tracked").experiment_id])
    assert run.info.status == "FINISHED"
    metric = next(k for k in run.data.metrics if k.startswith("val/"))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)) == [1, 2]
    assert run.data.metrics[metric.replace("val/", "test/", 1)] == pytest.approx(result.metrics[metric.replace("val/", "test/", 1)])
    assert "run.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_tracking_server_that_does_not_answer_is_named(monkeypatch):
    from xmodal.engine.session import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow retries for minutes by default
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=rf"run.mlflow='{url}': the tracking store cannot be reached \(.*Connection refused"):
        Tracker.start(url, "unused", "sweep", "sweep", key="sweep:x")
