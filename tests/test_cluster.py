"""Cluster files and a real `ray job submit` of a sweep to a Ray head on 127.0.0.1.

The head runs in its own temp dir on free ports, with token auth on; every one of its processes
carries a marker in its environment, which is how the test finds the Train worker it kills and
how it stops the head afterwards, by pid (`ray stop` would stop every Ray on the machine). The pytest process never connects to it, so
the session's `ray_local` is undisturbed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from gloo import free_port

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY = str(Path(sys.executable).parent / "ray")
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
MUST_EXCLUDE = {".git/", ".venv/", "data/", "runs/"}


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.local.yaml"])
def test_runtime_envs_are_valid_and_keep_data_out_of_the_upload(name: str):
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((CLUSTER / name).read_text())
    RuntimeEnv(**raw)  # Ray's own validation of the fields
    assert MUST_EXCLUDE <= set(raw["excludes"]) and "*.pt" in raw["excludes"]
    assert all(isinstance(v, str) for v in raw["env_vars"].values())
    assert "working_dir" not in raw, "the working dir comes from `ray job submit --working-dir .`"


@pytest.mark.parametrize("name, provider", [("aws-gpu.yaml", "aws"), ("gcp-gpu.yaml", "gcp")])
def test_cluster_launcher_configs(name: str, provider: str):
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / name).read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 4, "CPU head holds the trial drivers"
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu_data = [n for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert cpu_data, "optional CPU-only data nodes"
    assert config["docker"]["image"].endswith(":2.60.0")
    assert "~/.ray/auth_token" in config["file_mounts"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--include-dashboard=true" in head_start
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))


def _containers(template: dict) -> list[dict]:
    return template["template"]["spec"]["containers"]


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob-sweep.yaml", "RayJob")])
def test_kuberay_manifests(name: str, kind: str):
    documents = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    (manifest,) = [d for d in documents if d["kind"] == kind]
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = manifest["spec"]["rayClusterSpec"] if kind == "RayJob" else manifest["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["include-dashboard"] == "true"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    (worker,) = _containers(gpu)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for container in _containers(head) + [c for g in groups.values() for c in _containers(g)]:
        assert container["image"].endswith("xmodal:2.60.0")
        assert any(m["mountPath"] == "/mnt/shared" for m in container["volumeMounts"]), "shared storage on every pod"
    if kind == "RayJob":
        from xmodal.tune.spec import load_sweep

        entry = manifest["spec"]["entrypoint"].split()
        assert entry[:4] == ["python", "-m", "xmodal.cli.main", "sweep"]
        spec_file, overrides = entry[4], entry[5:]
        assert spec_file.startswith("/home/ray/xmodal/"), "the image's WORKDIR (cluster/docker/Dockerfile)"
        sweep = load_sweep(REPO / spec_file.removeprefix("/home/ray/xmodal/"), [o for o in overrides if not o.startswith("data.")])
        assert sweep.experiment["scaling"]["use_gpu"] is True
        assert any(o.startswith("sweep.storage=/mnt/shared") for o in overrides) and sweep.parameters
        assert manifest["spec"]["shutdownAfterJobFinishes"] is True


def test_dockerfile_builds_on_the_ray_gpu_image():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(RAY_IMAGE)}$", text, flags=re.M)
    assert "pip install" in text and "-e ." in text and "ray[default,train,tune,data]==2.60.0" in text
    for folder in ("xmodal", "experiments", "cluster"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in text


def test_readme_walks_from_empty_cluster_to_report():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws-gpu.yaml", "RAY_AUTH_MODE=token", "ray job submit", "--runtime-env cluster/runtime_env.yaml",
                   "xmodal report", "tensorboard --logdir", "optuna-dashboard", "--resume", "kubectl apply -f cluster/kuberay/rayjob-sweep.yaml"):
        assert needle in text, needle


# ----------------------------------------------------------------------------- a real head


def marked_processes(marker: str) -> list[int]:
    """Pids of processes whose environment carries ``XMODAL_TEST_CLUSTER=<marker>``."""
    needle = f"XMODAL_TEST_CLUSTER={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_marked(marker: str, grace: float = 5.0) -> None:
    """Stop exactly the processes of this test's head: SIGTERM, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and marked_processes(marker):
            time.sleep(0.5)


@pytest.fixture
def ray_head() -> Iterator[dict]:
    """A Ray head on 127.0.0.1 (dashboard on, token auth, 4 logical CPUs: one trial slot), stopped whatever happens."""
    marker = secrets.token_hex(8)
    temp_dir = tempfile.mkdtemp(prefix="xrh", dir="/tmp")  # short: Unix socket paths are limited
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                                             "node-manager-port", "object-manager-port")}
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        # Train's placement-group cleaner must find *this* head's State API among the machine's Rays.
        RAY_API_SERVER_ADDRESS=dashboard,
        XMODAL_TEST_CLUSTER=marker,
        PYTHONUNBUFFERED="1",
    )
    command = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               '--system-config={"idle_worker_killing_time_threshold_ms":600000}'] + [f"--{k}={v}" for k, v in ports.items()]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": dashboard, "env": env, "marker": marker, "temp_dir": temp_dir}
    finally:
        stop_marked(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(head: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args, "--address", head["address"]], env=head["env"], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job_status(head: dict, submission: str, token: bool = True) -> str:
    """PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED, from the job REST API (cheaper than a CLI per poll)."""
    headers = {"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"} if token else {}
    request = urllib.request.Request(f"{head['address']}/api/jobs/{submission}", headers=headers)
    try:
        # No proxy: the head is on 127.0.0.1.
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
            return str(json.loads(response.read())["status"])
    except (OSError, KeyError, ValueError) as exc:
        return f"unknown ({exc})"


def train_workers(marker: str) -> list[int]:
    """Ray Train worker processes of this test's head."""
    workers = []
    for pid in marked_processes(marker):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                workers.append(pid)
        except OSError:
            continue
    return workers


@pytest.mark.ray
def test_a_chain_sweep_as_a_ray_job_survives_a_killed_train_worker_and_shares_its_pretraining(ray_head: dict, tiny_world: Path, tmp_path: Path):
    """One command, `ray job submit --working-dir . --runtime-env cluster/runtime_env.local.yaml --
    python -m xmodal.cli.main sweep` (= `xmodal sweep`), to a token-auth head: a two-phase chain
    sweep (pretrain -> finetune from it) with a per-phase swept key and 2 seeds. The first Train
    worker is killed (SIGKILL) once a checkpoint is registered: its run resumes from it. Then: both
    trials finish, the pretraining they share ran once, each finetuning records it as its input and
    reports the checkpoint it tested, and the report shows mean +- s.e. over the seeds.

    One trial slot keeps the test within this 2-core machine's budget (a Train run costs about
    30 s here, mostly start-up); `cluster/local_smoke.sh` runs the two-knob smoke sweep."""
    from test_sweep import chain_sweep_dict

    raw = chain_sweep_dict(tiny_world, tmp_path)
    raw["train"]["epochs"] = 2  # a checkpoint after epoch 1 leaves an epoch to resume
    raw["sweep"].update(max_concurrent_trials=1, local_cpus=None)
    config = tmp_path / "chain.yaml"
    config.write_text(yaml.safe_dump(raw))
    submission = f"xmodal-test-{secrets.token_hex(4)}"
    assert job_status(ray_head, submission, token=False).startswith("unknown (HTTP Error 401"), "the head must refuse requests without the token"
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["address"], "--submission-id", submission, "--no-wait",
         "--working-dir", ".", "--runtime-env", "cluster/runtime_env.local.yaml", "--entrypoint-num-cpus", "0", "--",
         sys.executable, "-m", "xmodal.cli.main", "sweep", str(config)],
        env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    folder = tmp_path / "chain"
    killed: list[int] = []
    deadline = time.time() + 600
    status = job_status(ray_head, submission)
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        # Train writes its snapshot once a reported checkpoint is registered: kill the worker then.
        if not killed and list(folder.glob("runs/**/checkpoint_manager_snapshot.json")):
            killed = train_workers(ray_head["marker"])
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        status = job_status(ray_head, submission)
    logs = ray_cli(ray_head, "job", "logs", submission).stdout
    assert status == "SUCCEEDED", status + logs[-4000:]
    assert killed, "no Train worker was running after the first checkpoint"
    assert "sweep chain: 2 trials (2 terminated)" in logs and "1 at a time" in logs and "trials/hour" in logs and "busy" in logs
    assert "2/2 ended (0 failed)" in logs  # the sweep's console: a line per ended trial
    # The runs' own lines are in the sweep's log file, not on its console.
    console = (folder / "console.log").read_text()
    assert re.search(r"\[shared/pretrain-\w+\] resumed from epoch 1 checkpoint", console), console[-4000:]
    assert "reuses shared/pretrain-" in console and "reuses shared/pretrain-" not in logs

    from xmodal.report.sweeps import load_trials, render_sweep_report

    trials = load_trials(folder)
    assert {t["state"] for t in trials} == {"TERMINATED"} and {t["seed"] for t in trials} == {0, 1}
    shared = {json.loads(t["final"]["phase_runs"])["pretrain"] for t in trials}
    assert len(shared) == 1 and len(list((folder / "results" / "shared").glob("pretrain-*/run.json"))) == 1, "the shared pretraining ran once"
    for trial in trials:
        assert trial["final"]["epoch"] == 2 and "test/iou" in trial["final"] and set(trial["params"]) == {"phases.finetune.train.lr"}
        summary = json.loads((Path(trial["final"]["results_dir"]) / "run.json").read_text())
        assert summary["inputs"]["start"]["run"] in shared and summary["checkpoint"] == trial["final"]["checkpoint_path"]
        assert summary["train"]["lr"] == 0.002 and summary["train"]["seed"] == trial["seed"]
        assert list((folder / "runs").glob(f"trial-{trial['trial_id']}/checkpoint_*/state.pt")), "Train checkpoints inside the sweep folder"
    assert list(folder.glob("trial-*/events.out.tfevents.*"))
    report = (folder / "report" / "report.md").read_text()  # the sweep renders its report at the end
    assert "| 0.002 | 2 |" in report and " +- " in report
    names = {p.name for p in render_sweep_report(folder)}  # `xmodal report` on the finished folder
    assert {"report.md", "trials.csv", "best.yaml", "learning_curves.png", "metric_vs_phases.finetune.train.lr.png"} <= names
