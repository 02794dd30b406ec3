"""What users of Ray Tune sweeps expect (issue 15): trial placement, trial slots that follow the
cluster, GPU fractions and models, a CUDA out-of-memory trial failing alone, a usable ResultGrid,
MLflow parent / child runs, the dashboard's URL and a rerun of the best configuration over seeds.

Everything but the last test runs without Ray (resources are checked as built for Tune and Ray
Train). The last one runs a real sweep in its own process against an MLflow server on 127.0.0.1
and reads the sweep back through MLflow's REST API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from xmodal.engine.session import free_port
from xmodal.errors import ConfigError, RunFailedError
from xmodal.tune import sweep as sweep_module
from xmodal.tune.spec import load_sweep
from xmodal.tune.sweep import (
    DRIVER_RESOURCE, HEAD_RESOURCE, ClusterSizedGrid, ClusterSlots, StatefulLimiter, concurrent_trials, make_scheduler, make_search,
    rerun_seeds, sweep_dir, trial_actor_resources, trial_resources,
)

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "experiments" / "baselines" / "sar-buildings.yaml"
CLUSTER = REPO / "cluster"


def sweep_dict(**sweep) -> dict:
    return {"base": str(BASELINE), "name": "features", "sweep": {"parameters": {"train.lr": [0.001, 0.01, 0.1]}, **sweep}}


# ----------------------------------------------------------------------------- trial slots


def test_auto_trial_slots_follow_gpu_nodes_that_join_after_the_start(tmp_path: Path, monkeypatch):
    """max_concurrent_trials: auto was counted once at the start: on a cluster whose GPU nodes were
    still booting it was 1, for the whole sweep. Now the searcher asks the cluster again."""
    import ray

    cluster = {"CPU": 8.0}  # the head only: GPU workers not registered yet
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    monkeypatch.setattr(sweep_module, "SLOTS_CHECK_SECONDS", 0.0)
    per_trial = {"CPU": 2.0, "GPU": 1.0}
    slots = ClusterSlots("features", per_trial, data_cpus=1.0)
    assert slots.current() == 1

    spec = load_sweep(sweep_dict(search="random", num_samples=4), [f"sweep.storage={tmp_path}"])
    Path(sweep_dir(spec)).mkdir(parents=True)
    limiter, _, _ = make_search(spec, slots)
    assert isinstance(limiter, StatefulLimiter)
    assert limiter.suggest("t1") is not None and limiter.suggest("t2") is None  # one slot
    cluster.update({"CPU": 40.0, "GPU": 4.0})  # four GPU nodes joined
    assert [limiter.suggest(f"t{i}") is not None for i in (2, 3, 4, 5)] == [True, True, True, False]
    assert limiter.max_concurrent == 4

    grid_spec = load_sweep(sweep_dict(search="grid"), [f"sweep.storage={tmp_path}"])
    cluster.update({"CPU": 8.0, "GPU": 0.0})
    grid, space, _ = make_search(grid_spec, ClusterSlots("features", per_trial, 1.0))
    assert isinstance(grid, ClusterSizedGrid) and grid.max_concurrent == 1 and space["point"]["grid_search"]
    cluster.update({"CPU": 24.0, "GPU": 2.0})
    grid.next_trial()
    assert grid.max_concurrent == 2
    # A fixed number stays fixed; a restored sweep looks at the cluster again.
    fixed, _, _ = make_search(grid_spec, 3)
    fixed.next_trial()
    assert fixed.max_concurrent == 3
    restored = __import__("pickle").loads(__import__("pickle").dumps(slots))
    assert restored.value is None and restored.current() == 2


# ----------------------------------------------------------------------------- placement and GPUs


def test_trial_drivers_never_land_on_gpu_workers(tmp_path: Path):
    """A trial's driver actor asked for 1 CPU anywhere, so it could land on a spot GPU node and die
    with it; it now asks for a head-only resource."""
    spec = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}"])
    base = sweep_module.base_experiment(spec)
    per_trial = trial_resources(base, 1.0)
    declared = {"CPU": 72.0, "GPU": 8.0, DRIVER_RESOURCE: 1.0}
    assert trial_actor_resources(spec, base, per_trial, declared) == {"cpu": 1.0, DRIVER_RESOURCE: 0.001}
    assert trial_actor_resources(spec, base, per_trial, {"CPU": 72.0, "GPU": 8.0}) == {"cpu": 1.0, HEAD_RESOURCE: 0.001}


def test_the_cluster_files_declare_the_driver_resource_on_the_head_only(tmp_path: Path):
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        config = yaml.safe_load((CLUSTER / name).read_text())
        types = config["available_node_types"]
        holders = [n for n, t in types.items() if t["resources"].get(DRIVER_RESOURCE)]
        assert holders == [config["head_node_type"]], name
    # KubeRay pastes rayStartParams into `bash -c` unquoted: the value must reach `ray start` as JSON.
    stub = tmp_path / "ray"
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys\nfrom ray.scripts.scripts import start\n"
        "print(json.dumps(start.make_context('start', sys.argv[2:]).params['resources']))\n"
    )
    stub.chmod(0o755)
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob-sweep.yaml", "RayJob")):
        (manifest,) = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d and d["kind"] == kind]
        spec = manifest["spec"]["rayClusterSpec"] if kind == "RayJob" else manifest["spec"]
        assert all(DRIVER_RESOURCE not in json.dumps(g.get("rayStartParams") or {}) for g in spec["workerGroupSpecs"])
        value = spec["headGroupSpec"]["rayStartParams"]["resources"]
        ran = subprocess.run(["/bin/bash", "-c", "--", f"{stub} start --head --resources={value} "], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr[-1500:]
        assert json.loads(json.loads(ran.stdout)) == {DRIVER_RESOURCE: 1}, name


def test_gpu_fractions_and_models_reach_tune_and_ray_train(tmp_path: Path):
    from ray.train.v2._internal.execution.worker_group import worker_group  # noqa: F401 - Train V2 loaded as in a run

    from xmodal.engine import runner

    gpu = ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5", "scaling.accelerator_type=H100", "scaling.num_workers=2", "data.batch_size=8"]
    spec = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}", *gpu])
    base = sweep_module.base_experiment(spec)
    per_trial = trial_resources(base, 1.0)
    assert per_trial == {"CPU": 3.0, "GPU": 1.0}  # 2 workers x 0.5 GPU
    assert concurrent_trials({"CPU": 64.0, "GPU": 4.0}, per_trial, data_cpus=1) == 4
    # Ray Train's workers ask for their share of a GPU of that model.
    plan = SimpleNamespace(spec=None, results_dir=str(tmp_path / "results"), datasets=())
    scaling = runner.make_trainer(base, plan, None, datasets={}).scaling_config
    assert scaling.resources_per_worker == {"CPU": 1.0, "GPU": 0.5} and scaling.accelerator_type == "H100"
    assert scaling._resources_per_worker_not_none["accelerator_type:H100"] == pytest.approx(0.001)
    # The plain engine's trial actor trains itself: it holds the GPU share and the model's resource.
    plain = load_sweep(sweep_dict(engine="plain"), [f"sweep.storage={tmp_path}", *gpu[:3], "scaling.num_workers=1"])
    plain_base = sweep_module.base_experiment(plain)
    actor = trial_actor_resources(plain, plain_base, trial_resources(plain_base, 1.0, "plain"), {"CPU": 8.0})
    assert actor == {"cpu": 1.0, "gpu": 0.5, "accelerator_type:H100": 0.001}
    for bad, message in (
        ("scaling.gpus_per_worker=1.5", r"scaling.gpus_per_worker=1.5; expected a fraction in \(0, 1\] or a whole number"),
        ("scaling.gpus_per_worker=0", r"scaling.gpus_per_worker=0.0; expected"),
        ("scaling.use_gpu=false", r"scaling.accelerator_type='H100'.*with scaling.use_gpu: true"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}", *gpu, bad])


# ----------------------------------------------------------------------------- ResultGrid, OOM, rerun


def test_asha_accepts_the_tuners_metric_and_mode():
    """The Tuner names metric and mode (so ResultGrid.get_best_result() ranks as the sweep does);
    Tune refuses a scheduler built with its own metric unless it takes the Tuner's."""
    spec = load_sweep(sweep_dict(scheduler="asha"), ["train.epochs=4"])
    scheduler = make_scheduler(spec)
    assert scheduler.set_search_properties(spec.metric, spec.mode) is True
    assert scheduler.set_search_properties("val/loss", "min") is False


def test_cuda_out_of_memory_fails_its_trial_once_with_a_clear_reason(tmp_path: Path, monkeypatch):
    """An OOM is the configuration's (its batch on its GPU share): the trial fails with a line that
    says so, and Tune's retries of it end at once instead of running out of memory again."""
    import ray.train
    import ray.tune
    import torch
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    spec = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}"])
    plan = sweep_module.TrialPlan(spec=spec, sweep_dir=sweep_dir(spec), results_root=str(tmp_path / "results"))
    attempts = []

    def trial_body(tune_config, plan, trial_id):  # a Train worker ran out of memory, as run_single raises it
        attempts.append(trial_id)
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 22 GiB total)")
        raise RunFailedError("run 'trial-t1' failed") from ray.train.WorkerGroupError("failed", {0: UserExceptionWithTraceback(oom, "tb")})

    monkeypatch.setattr(sweep_module, "_sweep_trial", trial_body)
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    for _ in range(1 + spec.settings.max_failures):  # Tune's first run and its retries
        with pytest.raises(RunFailedError, match=r"CUDA out of memory in trial t1 \(CUDA out of memory. Tried to allocate 2.00 GiB") as caught:
            sweep_module.sweep_trial({}, plan)
        assert caught.value.permanent and "lower data.batch_size" in str(caught.value)
    assert attempts == ["t1"], "retries of an out-of-memory trial end before training"
    # The plain engine raises it in the trial itself.
    monkeypatch.setattr(sweep_module, "_sweep_trial", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory.")))
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t2"))
    with pytest.raises(RunFailedError, match="CUDA out of memory in trial t2"):
        sweep_module.sweep_trial({}, plan)


def test_the_rerun_stage_takes_seeds_after_the_searchs(tmp_path: Path):
    spec = load_sweep(sweep_dict(rerun_best={"seeds": 3}), [f"sweep.storage={tmp_path}", "train.seed=7"])
    assert rerun_seeds(spec, sweep_module.base_experiment(spec)) == [8, 9, 10]
    seeded = load_sweep(sweep_dict(rerun_best={"seeds": 2}, seeds=[0, 1, 2]), [f"sweep.storage={tmp_path}"])
    assert rerun_seeds(seeded, sweep_module.base_experiment(seeded)) == [3, 4]
    with pytest.raises(ConfigError, match=r"sweep.rerun_best.seeds=-1; expected a number of runs"):
        load_sweep(sweep_dict(rerun_best={"seeds": -1}))


# ----------------------------------------------------------------------------- end to end

# Runs in a process of its own: a Ray whose every worker runs `install` (a method step that runs out
# of CUDA memory for one swept value), the sweep through `xmodal sweep`'s own code, the result as JSON.
DRIVER = '''
import json, sys
import ray, torch

def install():
    from xmodal.methods.supervised.method import Supervised
    step = Supervised.train_step

    def train_step(self, batch, index):
        if self.settings.dice_weight == 0.5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return step(self, batch, index)

    Supervised.train_step = train_step

ray.init(num_cpus=3, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env={"worker_process_setup_hook": install})
import xmodal.tune.sweep as sweeps
from xmodal.cli.main import main

ran = []
run_sweep = sweeps.run_sweep
sweeps.run_sweep = lambda *a, **k: ran.append(run_sweep(*a, **k)) or ran[-1]
code = main(["sweep", sys.argv[1]])
result = ran[0]
best = result.result_grid.get_best_result()
print("RESULT " + json.dumps({
    "code": code, "states": result.states, "errors": result.errors, "best": result.best, "rerun": result.rerun,
    "grid_best": {"metric": best.metrics[result.metric], "config": best.config}, "grid_errors": len(result.result_grid.errors),
    "dashboard": ray._private.worker.get_dashboard_url(), "run_id": result.tracking.run_id,
}, default=str))
'''


def _mlflow_server(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", (tmp_path / "artifacts").as_uri()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its workers go with it (_stop)
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job-runner processes beside it
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    _stop(server)
    pytest.fail("the MLflow server did not answer on 127.0.0.1 within 120 s")


def _stop(server: subprocess.Popen) -> None:
    """End the MLflow server and the workers it started (its own process group)."""
    import signal

    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}", data=None if body is None else json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.ray
def test_a_sweep_on_an_mlflow_server_with_an_oom_trial_and_a_rerun_of_the_best(tiny_world: Path, tmp_path: Path):
    server, url = _mlflow_server(tmp_path)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tracked-sweep", "method": "supervised", "method_settings": {"input": "sar"},
        "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 4},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        "train": {"epochs": 2, "lr": 0.003}, "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
        "run": {"panels": 2, "mlflow": url},
        "sweep": {"search": "grid", "engine": "plain", "scheduler": "fifo", "max_concurrent_trials": 2, "storage": str(tmp_path / "sweeps"),
                  "rerun_best": {"seeds": 2}, "parameters": {"method_settings.dice_weight": [0.0, 0.5]}},
    }))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    ray_tmp = tempfile.mkdtemp(prefix="xr-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(config)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        lines = done.stdout.splitlines()

        # The dashboard's URL comes first.
        assert lines[0].startswith("[sweep tracked-sweep] Ray dashboard: http://") and out["dashboard"] in lines[0], lines[:3]
        # The OOM trial failed with its reason; the other finished; the sweep went on and said so.
        assert out["code"] == 0 and out["states"] == {"TERMINATED": 1, "ERROR": 1}, out
        ((oom_trial, error),) = out["errors"].items()
        assert error.startswith(f"CUDA out of memory in trial {oom_trial} (CUDA out of memory. Tried to allocate 20.00 GiB"), error
        assert f"trial {oom_trial} failed: CUDA out of memory" in done.stdout
        # The ResultGrid ranks as the sweep does (metric and mode on the Tuner).
        assert out["grid_best"]["metric"] == pytest.approx(out["best"]["value"]) and out["grid_errors"] == 1
        assert out["grid_best"]["config"]["point"] == out["best"]["params"]
        # The best configuration ran again with 2 new seeds: mean +- std in the result and the summary.
        rerun = out["rerun"]
        assert rerun["params"] == out["best"]["params"] and rerun["seeds"] == [1, 2] and rerun["n"] == 2
        values = [r["value"] for r in rerun["runs"]]
        assert rerun["mean"] == pytest.approx(sum(values) / 2) and rerun["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert f"best configuration rerun with 2 seed(s) [1, 2]: val/iou {rerun['mean']:.4f} ± {rerun['std']:.4f}" in done.stdout

        # MLflow, through the server's REST API: the sweep a parent run, a child run per trial.
        experiment = _rest(url, "experiments/get-by-name?experiment_name=tracked-sweep")["experiment"]
        runs = _rest(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs}
        parent = by_id[out["run_id"]]
        tags = lambda run: {t["key"]: t["value"] for t in run["data"].get("tags", [])}  # noqa: E731
        children = [r for r in runs if tags(r).get("mlflow.parentRunId") == out["run_id"]]
        assert len(runs) == 1 + 2 + 2 and len(children) == 4
        assert parent["info"]["status"] == "FINISHED"
        parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        assert parent_metrics["best/val/iou"] == pytest.approx(out["best"]["value"])
        assert parent_metrics["rerun/val/iou/mean"] == pytest.approx(rerun["mean"])
        search = [r for r in children if tags(r)["xmodal_stage"] == "search"]
        statuses = sorted(r["info"]["status"] for r in search)
        assert statuses == ["FAILED", "FINISHED"]
        failed = next(r for r in search if r["info"]["status"] == "FAILED")
        assert tags(failed)["xmodal_error"].startswith("CUDA out of memory") and tags(failed)["xmodal_trial"] == oom_trial
        finished = next(r for r in search if r["info"]["status"] == "FINISHED")
        params = {p["key"]: p["value"] for p in finished["data"]["params"]}
        assert set(params) == {"method_settings.dice_weight", "seed"}
        history = _rest(url, f"metrics/get-history?run_id={finished['info']['run_id']}&metric_key=val/iou")["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]  # one point per epoch
        assert "test/iou" in {m["key"] for m in finished["data"]["metrics"]}
        files = {f["path"] for f in _rest(url, f"artifacts/list?run_id={finished['info']['run_id']}").get("files", [])}
        assert "run.json" in files
        report = {f["path"] for f in _rest(url, f"artifacts/list?run_id={out['run_id']}&path=report").get("files", [])}
        assert "report/report.md" in report and any(p.endswith(".png") for p in report)
        assert sorted(tags(r)["xmodal_stage"] for r in children).count("rerun_best") == 2
    finally:
        _stop(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_sweep_started_before_a_setting_existed_still_resumes(tmp_path: Path):
    """sweep.json of a sweep started before sweep.rerun_best existed lacks it: a resume must not call
    that a changed config."""
    spec = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}"])
    stored = json.loads(json.dumps(spec.to_plain()))
    del stored["settings"]["rerun_best"]
    sweep_module._check_same_sweep(stored, spec, "folder")
    stored["settings"]["num_samples"] = 99
    with pytest.raises(ConfigError, match=r"settings.\{num_samples\} differ"):
        sweep_module._check_same_sweep(stored, spec, "folder")
