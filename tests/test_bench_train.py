"""``xmodal bench train``'s parts (issue 19): the per-process CPU table, the start-up split, the
local Ray's start options, the GPU option's refusal without CUDA; and, on Ray, that a local Ray
started with those options still restarts a lost Train worker and that the benchmark's table names
the Train worker and no preemption watcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from xmodal.bench.common import (
    CpuUse,
    ProcessCpuSampler,
    cpu_table,
    format_cpu_table,
    process_label,
)
from xmodal.bench.train import (
    GpuBusySampler,
    bench_train,
    checkpoint_times,
    format_start_up,
    format_train_figures,
    overhead_target,
    parse_gpu_utilisation,
    require_cuda,
    start_up_parts,
)
from xmodal.cli.main import main
from xmodal.engine.session import local_ray_options
from xmodal.errors import ConfigError


def test_processes_are_named_by_what_they_are_to_ray():
    assert process_label("python", ["ray::TrainController.run", "", ""]) == "ray::TrainController"
    assert process_label("python", ["ray::IDLE"]) == "ray::IDLE"
    task = "ray::MapBatches(_decode_batch)->MapBatches(_prepare_batch)"
    assert process_label("python", [task]) == task  # a task keeps its whole name
    assert process_label("raylet", ["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/s"]) == "raylet"
    assert process_label("python", ["/v/bin/python", "-u", "/v/ray/_private/log_monitor.py", "--session-dir=/s"]) == "log monitor"
    assert process_label("python", ["/v/bin/python", "/v/ray/dashboard/dashboard.py", "--host=127.0.0.1"]) == "dashboard head"
    assert process_label("python3", []) == "python3"


def test_cpu_use_between_two_times_counts_newborn_processes_from_zero():
    sampler = ProcessCpuSampler()
    a, b = (1, 100.0), (2, 200.0)
    sampler.labels.update({a: "raylet", b: "ray::IDLE"})
    sampler.samples = [(0.0, {a: 1.0}), (10.0, {a: 3.0, b: 2.0}), (20.0, {a: 6.0, b: 5.0}), (30.0, {a: 6.5})]
    use = sampler.use_between(5.0, 20.0)
    assert (use["raylet"].seconds, use["ray::IDLE"].seconds) == (5.0, 5.0)  # b was born in the window
    use = sampler.use_between(10.0, 30.0)
    assert (use["raylet"].seconds, use["ray::IDLE"].seconds) == (3.5, 3.0)  # b ended at its last sample
    assert sampler.use_between(21.0, 25.0) == {}


def test_the_sampler_sees_a_child_process_burn_cpu():
    sampler = ProcessCpuSampler(interval=0.1).start()
    begin = time.time()
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"], check=True)
    time.sleep(0.2)
    end = time.time()
    sampler.stop()
    child = {label: use for label, use in sampler.use_between(begin, end).items() if label != "driver (this process)"}
    assert sum(use.seconds for use in child.values()) >= 0.35, child
    assert sampler.use_between(end + 1.0, end + 2.0) == {}


def test_cpu_table_lists_the_busiest_first_as_shares_of_one_core():
    rows = cpu_table({"raylet": CpuUse(1.0, 1), "ray::RayTrainWorker": CpuUse(15.0, 1), "ray::IDLE": CpuUse(0.5, 3)}, 10.0, 2)
    assert [row["process"] for row in rows] == ["ray::RayTrainWorker", "raylet", "ray::IDLE"]
    assert rows[0]["cpu_percent"] == 150.0 and rows[0]["machine_percent"] == 75.0 and rows[2]["count"] == 3
    lines = format_cpu_table(rows, 10.0, "steady epochs")
    assert "steady epochs (10.0 s" in lines[0] and "ray::RayTrainWorker" in lines[2] and "150.0" in lines[2]


def test_start_up_is_split_at_each_stage():
    outcome = {"worker_start_time": 130.0, "setup_end_time": 133.0, "first_step_time": 135.5}
    parts = start_up_parts(100.0, 104.0, 110.0, outcome)
    assert parts == {"ray_start_s": 4.0, "planning_s": 6.0, "worker_group_start_s": 20.0, "setup_s": 3.0, "first_batch_s": 2.5, "total_s": 35.5}
    assert "35.5 s" in format_start_up(parts) and "worker group 20.0 s" in format_start_up(parts)
    assert start_up_parts(100.0, 100.0, 101.0, {})["worker_group_start_s"] is None  # a run that trained no step


def test_checkpoint_report_times_come_from_train_v2_folder_names():
    def kept(name: str, epoch: int):
        return SimpleNamespace(path=f"/runs/x/{name}"), {"epoch": epoch}

    result = SimpleNamespace(best_checkpoints=[kept("checkpoint_2026-12-03_22-24-01.500000", 1), kept("checkpoint_2026-12-03_22-24-11.750000", 2), kept("odd", 3)])
    times = checkpoint_times(result)
    assert sorted(times) == [1, 2] and times[2] - times[1] == pytest.approx(10.25)


def test_overhead_targets_of_issue_19():
    assert (overhead_target(2), overhead_target(4), overhead_target(16)) == (10.0, 5.0, 5.0)


def test_a_local_ray_without_dashboard_leaves_out_metrics_but_keeps_them_with_it():
    environment, system_config = local_ray_options(dashboard=False)
    assert environment == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
    assert system_config == {"idle_worker_killing_time_threshold_ms": 600_000}
    environment, system_config = local_ray_options(dashboard=True)  # sweeps and run.dashboard
    assert environment == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    assert system_config == {"idle_worker_killing_time_threshold_ms": 600_000}


def test_start_local_ray_passes_the_options_and_leaves_a_users_setting(monkeypatch):
    import ray

    from xmodal.engine import session

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.setattr(session, "_local_without_state_api", None)
    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")  # the user asked for Train's metrics
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    session.start_local_ray(3, dashboard=False)
    assert calls[0]["_system_config"] == {"idle_worker_killing_time_threshold_ms": 600_000} and calls[0]["include_dashboard"] is False
    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1" and os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert session._local_without_state_api == "127.0.0.1:6379"  # this Ray has no State API


def test_the_busiest_gpu_in_the_window_is_the_workers():
    assert parse_gpu_utilisation("0, 87\n1, 3\n0, 100\n[N/A]\n0, [N/A]\n") == [(0, 87.0), (1, 3.0), (0, 100.0)]
    sampler = GpuBusySampler.__new__(GpuBusySampler)  # no nvidia-smi needed to read samples
    sampler.samples = [(1.0, 0, 10.0), (1.0, 1, 90.0), (2.0, 0, 20.0), (2.0, 1, 70.0), (9.0, 0, 100.0)]
    assert sampler.busy_share(0.5, 2.5) == (1, pytest.approx(0.8))
    assert sampler.busy_share(3.0, 4.0) is None


def test_the_gpu_benchmark_is_refused_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU, wherever it runs
    with pytest.raises(ConfigError, match="no CUDA device"):
        require_cuda()
    with pytest.raises(ConfigError, match="no CUDA device"):
        bench_train(tiles=8, device="cuda")
    assert main(["bench", "train", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_device_and_threads_are_checked(capsys):
    with pytest.raises(ConfigError, match="expected one of"):
        bench_train(device="tpu")
    with pytest.raises(ConfigError, match="--threads 0: expected 1 or more"):
        bench_train(threads=0)
    with pytest.raises(ConfigError, match="an option of the CPU step"):
        bench_train(device="cuda", threads=4)
    assert main(["bench", "data", "--device", "cpu"]) == 2
    assert "--device is an option of bench train only" in capsys.readouterr().err
    assert main(["bench", "data", "--threads", "2"]) == 2
    assert "--threads is an option of bench train only" in capsys.readouterr().err


@pytest.mark.ray
def test_a_lean_local_ray_still_restarts_a_lost_train_worker(tmp_path: Path):
    """Fault tolerance survives the start options: Train's health check finds the dead worker and
    run.max_failures starts a new worker group, which finishes. No preemption watcher and no
    placement-group cleaner process is started for the run (the Ray has no dashboard)."""
    import ray
    import ray.train

    from xmodal.engine.runner import XmodalTrainer
    from xmodal.engine.session import connect

    marker = tmp_path / "died"

    def dies_once() -> int:  # defined here: pickled by value, the workers need not import this file
        if not marker.exists():
            marker.write_text("died once")
            # Lost mid-training, as a reclaimed node is: a death while the controller is still
            # starting the function is a controller error, which Train does not retry.
            time.sleep(3)
            os._exit(1)  # a lost process, not an exception
        return 7

    from ray._private.state import actors

    started = connect(None, 2, dashboard=False)  # or the test session's, started by connect too
    earlier = set(actors())  # the session's Ray may hold actors of earlier tests
    sampler = ProcessCpuSampler(interval=0.2).start()
    try:
        trainer = XmodalTrainer(
            dies_once,
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(name="lean", storage_path=str(tmp_path / "runs"), failure_config=ray.train.FailureConfig(max_failures=1)),
        )
        result = trainer.fit()
        # GCS's actor table: every actor this run created (a process sample can miss a short one).
        classes = [info["ActorClassName"] for actor, info in actors().items() if actor not in earlier]
    finally:
        sampler.stop()
        if started:
            ray.shutdown()
    assert marker.is_file() and result.return_value == 7
    assert classes.count("RayTrainWorker") >= 2, classes  # the lost worker and its replacement
    assert not {"PreemptionWatcher", "PlacementGroupCleaner"} & set(classes), classes
    seen = set(sampler.labels.values())
    assert not {"ray::PreemptionWatcher", "ray::PlacementGroupCleaner"} & seen, seen


def test_gpu_figures_print_the_busy_share_and_the_tables():
    """The summary `bench train --device cuda` prints, from figures as bench_train_gpu returns them."""
    rows = cpu_table({"ray::RayTrainWorker": CpuUse(9.0, 1)}, 10.0, 16)
    parts = start_up_parts(0.0, 3.0, 4.0, {"worker_start_time": 20.0, "setup_end_time": 22.0, "first_step_time": 25.0})
    figures = {
        "device": "cuda", "gpu": "NVIDIA H200", "model": "kd reconstruction", "batch_size": 8, "cores": 16, "ray_train_step_s": 0.05,
        "gpu_busy_share": 0.42, "data_wait_share": 0.5, "gpu_samples": 50, "cpu_window_s": 10.0, "cpu_per_process": rows,
        "start_up": parts, "start_up_cpu_per_process": rows,
    }
    text = format_train_figures(figures)
    assert "GPU busy           : 42 %" in text and "waiting for data 50 %" in text and "50.0 ms/step" in text
    assert "steady epochs (10.0 s" in text and "start-up (25.0 s" in text and "worker group 16.0 s" in text


def test_train_runs_go_without_the_placement_group_cleaner_only_where_it_cannot_work(tmp_path: Path, monkeypatch):
    """A local Ray started without the dashboard has no State API: the cleaner's detached actor would
    only fail a query each second. Any other Ray (a cluster, a sweep's Ray with its dashboard) keeps it."""
    import ray.train
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from xmodal.engine import session
    from xmodal.engine.runner import XmodalTrainer

    trainer = XmodalTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), run_config=ray.train.RunConfig(name="x", storage_path=str(tmp_path)))

    def cleaners() -> int:
        return sum(isinstance(callback, PlacementGroupCleanerCallback) for callback in trainer._create_default_callbacks())

    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.setattr(session, "_local_without_state_api", None)
    assert session.placement_group_cleaner_can_work() and cleaners() == 1
    monkeypatch.setattr(session, "_local_without_state_api", "127.0.0.1:6379")
    assert not session.placement_group_cleaner_can_work() and cleaners() == 0
    monkeypatch.setattr(session, "_local_without_state_api", "127.0.0.1:7000")  # that Ray went; another one runs now
    assert session.placement_group_cleaner_can_work() and cleaners() == 1
