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
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from gloo import free_ports

from xmodal.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY = str(Path(sys.executable).parent / "ray")
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
# Top-level folders of a working copy that hold data and results, never code.
OUTPUT_FOLDERS = ("data", "runs", "results", "demo-out", "out", "checkpoints")


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.local.yaml"])
def test_runtime_envs_are_valid_and_keep_data_out_of_the_upload(name: str):
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load((CLUSTER / name).read_text())
    RuntimeEnv(**raw)  # Ray's own validation of the fields
    assert {f"/{folder}" for folder in OUTPUT_FOLDERS} <= set(raw["excludes"]) and "*.pt" in raw["excludes"]
    assert all(isinstance(v, str) for v in raw["env_vars"].values())
    assert "working_dir" not in raw, "the working dir comes from `ray job submit --working-dir .`"


def ray_working_dir_package(working_dir: Path, runtime_env: dict, scratch: Path, include_gitignore: bool = True) -> set[str]:
    """The files `ray job submit --working-dir <working_dir> --runtime-env <runtime_env>` uploads, packed by
    Ray's own code on the client's path (dashboard_sdk: upload_working_dir_if_needed -> create_package),
    with Ray's default excludes, the runtime env's excludes and, unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1
    (include_gitignore=False), the .gitignore."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    packages: list[Path] = []

    def upload(path: str, excludes: list[str], is_file: bool = False) -> None:
        packages.append(scratch / f"package-{include_gitignore}-{len(packages)}.zip")
        create_package(path, packages[-1], include_gitignore=include_gitignore, include_parent_dir=False, excludes=excludes)

    upload_working_dir_if_needed({**runtime_env, "working_dir": str(working_dir)}, include_gitignore=include_gitignore, upload_fn=upload)
    (package,) = packages
    with zipfile.ZipFile(package) as zipped:
        return set(zipped.namelist())


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.local.yaml"])
def test_the_uploaded_working_dir_holds_all_the_code_and_no_data(name: str, tmp_path: Path):
    """Gitignore patterns match at any depth: `data/` once dropped xmodal/data/ from the upload, and
    the job then ran the image's stale copy (or failed to import it on a stock image).

    The working dir is this repository (every top-level entry linked in, .git and .venv included)
    with output folders of a real working copy planted next to it."""
    working_dir = tmp_path / "checkout"
    working_dir.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in OUTPUT_FOLDERS:
            (working_dir / entry.name).symlink_to(entry)
    for folder in OUTPUT_FOLDERS:  # files no extension pattern catches: only the folder's own pattern can
        (working_dir / folder / "readers").mkdir(parents=True)
        (working_dir / folder / "readers" / "__init__.py").write_text("")
        (working_dir / folder / "params.json").write_text("{}")
    listed = subprocess.run(["git", "ls-files", "-z", "--", "xmodal", "experiments"], cwd=REPO, capture_output=True, check=True).stdout
    tracked = {f for f in listed.decode().split("\0") if f and (REPO / f).is_file()}  # a file deleted in this checkout is not uploaded
    readers = {f for f in tracked if f.startswith("xmodal/data/readers/") and f.endswith(".py")}
    runtime_env = yaml.safe_load((CLUSTER / name).read_text())
    # The .gitignore also keeps /data/ and /runs/ out; the runtime env must do it alone as well.
    for include_gitignore in (True, False):
        names = ray_working_dir_package(working_dir, runtime_env, tmp_path, include_gitignore)
        assert "xmodal/data/__init__.py" in names and readers and readers <= names
        assert not tracked - names, f"tracked code left out of the upload: {sorted(tracked - names)[:10]}"
        for folder in (".git", ".venv") + OUTPUT_FOLDERS:
            assert not [n for n in names if n.startswith(f"{folder}/")], f"{folder}/ uploaded (include_gitignore={include_gitignore})"


@pytest.mark.parametrize("name, provider", [("aws-gpu.yaml", "aws"), ("gcp-gpu.yaml", "gcp")])
def test_cluster_launcher_configs(name: str, provider: str):
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    # What `ray up` does with the file before it touches the cloud: defaults merged, then checked
    # against ray/autoscaler/ray-schema.json, where an unknown key fails.
    validate_config(prepare_config(config))
    with pytest.raises(ValidationError, match="registry_login"):
        validate_config(prepare_config({**config, "docker": {**config["docker"], "registry_login": "x"}}))
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
    # Docker on each host logs in to the image's private registry before `ray up` pulls it.
    registry = config["docker"]["image"].split("/")[0]
    login = [c for c in config["initialization_commands"] if registry in c]
    assert login and ("docker login" in login[0] if provider == "aws" else "gcloud auth configure-docker" in login[0]), config["initialization_commands"]
    # The head launches and removes workers itself: it runs under its own role, the workers under theirs.
    if provider == "aws":
        profiles = {n: t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for n, t in types.items()}
    else:
        profiles = {n: t["node_config"]["serviceAccounts"][0]["email"].split("@")[0] for n, t in types.items()}
    head_role = profiles.pop(config["head_node_type"])
    assert head_role == "xmodal-ray-head" and set(profiles.values()) == {"xmodal-ray-worker"}
    text = (CLUSTER / name).read_text()
    rights = ("ec2:RunInstances", "iam:PassRole", "ecr:GetAuthorizationToken", "s3:PutObject") if provider == "aws" else (
        "roles/compute.instanceAdmin.v1", "roles/iam.serviceAccountUser", "roles/artifactregistry.reader", "roles/storage.objectAdmin")
    for right in rights:
        assert right in text and right in (CLUSTER / "README.md").read_text(), right


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
    # The images' `ray` user (uid 1000, group `users` = 100) must be able to write the shared volume.
    for group in [head, *groups.values()]:
        pod = group["template"]["spec"]
        if any(v.get("persistentVolumeClaim") for v in pod["volumes"]):
            assert pod.get("securityContext", {}).get("fsGroup") == 100, group.get("groupName", "head")


def _k8s_quantity(quantity: str) -> int:
    """resource.Quantity.Value() of Kubernetes' apimachinery: the amount, rounded up to an integer."""
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "m": Fraction(1, 1000)}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    amount = Fraction(number) * suffixes.get(unit, 1)
    return -(-amount.numerator // amount.denominator)


def kuberay_container_command(group: dict, node_type: str, autoscaling: bool, head_service: str) -> str:
    """The `bash -c` line the KubeRay operator (v1.7.0; v1.5.1 differs only in a literal `ulimit -n 65536`)
    runs in a group's Ray container, built as in ray-operator/controllers/ray/common/pod.go:
    setMissingRayStartParams (address, dashboard-host, metrics-export-port, block,
    dashboard-agent-listen-port), DefaultHeadPodTemplate (no-monitor with the in-tree autoscaler),
    generateRayStartCommand + addWellKnownAcceleratorResources (num-cpus, memory, num-gpus from the
    container's resources), convertParamMap (sorted ` --key=value `, values pasted unquoted; "true" ->
    ` --key `, "false" dropped, except for the listed boolean options) and BuildPod
    (`ulimit -n ...; ray start ...`)."""
    params = dict(group.get("rayStartParams") or {})
    if node_type == "head":
        params.setdefault("dashboard-host", "0.0.0.0")
        if autoscaling:
            params["no-monitor"] = "true"
    else:
        params.setdefault("address", f"{head_service}:6379")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    resources = group["template"]["spec"]["containers"][0].get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "num-cpus" not in params and (limits.get("cpu") or requests.get("cpu")):
        params["num-cpus"] = str(_k8s_quantity(limits.get("cpu") or requests["cpu"]))
    if "memory" not in params and limits.get("memory"):
        params["memory"] = str(_k8s_quantity(limits["memory"]))
    for key in sorted(limits):
        if "num-gpus" not in params and key.endswith("gpu") and _k8s_quantity(str(limits[key])):
            params["num-gpus"] = str(_k8s_quantity(str(limits[key])))
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard", "include-log-monitor"):
            flags += f" --{key} " if value.lower() == "true" else ""
        else:
            flags += f" --{key}={value} "
    start = f"ray start --head {flags}" if node_type == "head" else f"ray start {flags}"
    return f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"


# Stands in for `ray` on the container's PATH: Ray's own click parser reads the arguments as
# `ray start` would (its --system-config option type is json.loads), and nothing starts.
RAY_STUB = """#!{python}
import json, sys
import click
from ray.scripts.scripts import start

assert sys.argv[1] == "start", sys.argv
try:
    params = start.make_context("start", sys.argv[2:]).params
except click.ClickException as exc:
    sys.exit(f"ray start refused {{sys.argv[2:]}}: {{exc.format_message()}}")
with open({out!r}, "w") as f:
    json.dump({{"argv": sys.argv[2:], "system_config": params["system_config"], "head": params["head"],
               "block": params["block"], "address": params["address"], "num_cpus": params["num_cpus"], "num_gpus": params["num_gpus"]}}, f)
"""


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob-sweep.yaml", "RayJob")])
def test_kuberay_ray_start_commands_parse_under_bash(name: str, kind: str, tmp_path: Path):
    """The operator puts rayStartParams into a bash command line unquoted: a bare JSON value lost its
    double quotes there and the head crash-looped on `--system-config`."""
    (manifest,) = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d and d["kind"] == kind]
    spec = manifest["spec"]["rayClusterSpec"] if kind == "RayJob" else manifest["spec"]
    groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec["workerGroupSpecs"]]
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "RAY_START_ULIMIT_OPEN_FILES": str(os.sysconf("SC_OPEN_MAX"))}
    for i, (node_type, group) in enumerate(groups):
        out = tmp_path / f"start-{i}.json"
        stub = tmp_path / "bin" / "ray"
        stub.write_text(RAY_STUB.format(python=sys.executable, out=str(out)))
        stub.chmod(0o755)
        command = kuberay_container_command(group, node_type, spec.get("enableInTreeAutoscaling", False), "xmodal-head-svc.default.svc.cluster.local")
        # utils.GetContainerCommand: the container's command is ["/bin/bash", "-c", "--"], args [the line].
        ran = subprocess.run(["/bin/bash", "-c", "--", command], env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0 and out.exists(), f"{node_type} {group.get('groupName', '')}: {command}\n{ran.stderr[-2000:]}"
        parsed = json.loads(out.read_text())
        assert parsed["block"] and parsed["head"] == (node_type == "head")
        if node_type == "head":
            assert parsed["system_config"] == {"idle_worker_killing_time_threshold_ms": 600000}
            assert parsed["num_cpus"] == int(group["rayStartParams"]["num-cpus"])
        else:
            assert parsed["address"] == "xmodal-head-svc.default.svc.cluster.local:6379"
        gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        assert parsed["num_gpus"] == (int(gpus) if gpus else None)


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


CLOUD_ACCOUNT = "# [cloud account]"
# What a cluster walk-through command starts with -> the test that runs it (here, on 127.0.0.1).
TESTED_COMMANDS = {
    "xmodal data synth": "tests/test_cli.py::test_data_commands",
    "xmodal data pack": "tests/test_object_storage.py::test_a_packed_store_on_the_bucket_gives_the_same_tiles",
    "ray job submit": "tests/test_cluster.py::test_a_chain_sweep_as_a_ray_job_survives_a_killed_train_worker_and_shares_its_pretraining",
    "ray job logs": "tests/test_cluster.py::test_a_chain_sweep_as_a_ray_job_survives_a_killed_train_worker_and_shares_its_pretraining",
    "xmodal report": "tests/test_sweep.py::test_report_of_a_remote_sweep_folder_copies_only_small_files",
}


def walkthrough_commands() -> list[str]:
    """The shell commands of cluster/README.md's walk-throughs (section 4), continuation lines joined."""
    section = (CLUSTER / "README.md").read_text().split("\n## 4.", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_cluster_readme_command_is_tested_or_needs_a_cloud_account():
    """Each walk-through command either ends in `# [cloud account]` or is run by a named test,
    whose source holds the command's words (so renaming either side breaks this)."""
    commands = walkthrough_commands()
    assert sum(CLOUD_ACCOUNT in c for c in commands) >= 10 and any(c.startswith("ray up cluster/gcp-gpu.yaml") for c in commands)
    for command in commands:
        if CLOUD_ACCOUNT in command or command.startswith("export "):
            continue
        head = next((h for h in TESTED_COMMANDS if command.startswith(h)), None)
        assert head is not None, f"cluster/README.md: {command!r} is neither run by a test nor marked {CLOUD_ACCOUNT!r}"
        path, name = TESTED_COMMANDS[head].split("::")
        source = (REPO / path).read_text()
        body = source.split(f"def {name}(", 1)
        assert len(body) == 2, f"{TESTED_COMMANDS[head]} does not exist"
        words = head.split()[1:]  # the program is the CLI's main(), `ray` or a Python -m
        assert all(f'"{word}"' in body[1].split("\ndef ", 1)[0] for word in words), (head, name)


# ----------------------------------------------------------------------------- a job's working dir


def _job_dir(root: Path, upload_hash: str) -> Path:
    """Where Ray unpacks a `--working-dir` upload on a node (a new folder whenever the code changes)."""
    return root / "session_2026-12-03_10-00-00_1" / "runtime_resources" / "working_dir_files" / f"_ray_pkg_{upload_hash}"


def test_a_sweep_resubmitted_after_a_code_change_resumes(tmp_path: Path):
    """Relative paths resolve under the job's _ray_pkg_<hash> folder; the hash changes with the code,
    and `--resume` must still find the sweep the same one (while a real change is still refused)."""
    from test_sweep import sweep_dict

    from xmodal.tune.spec import load_sweep
    from xmodal.tune.sweep import _check_same_sweep

    storage = [f"sweep.storage={tmp_path / 'sweeps'}", "data.root=data/world"]
    first = load_sweep(sweep_dict(), storage, cwd=_job_dir(tmp_path, "0a1b2c3d"))
    assert "_ray_pkg_0a1b2c3d/data/world" in first.experiment["data"]["root"]
    stored = json.loads(json.dumps(first.to_plain()))
    _check_same_sweep(stored, load_sweep(sweep_dict(), storage, cwd=_job_dir(tmp_path, "ffee9988")), "folder")
    with pytest.raises(ConfigError, match=r"started with another config \(experiment.\{train\} differ"):
        _check_same_sweep(stored, load_sweep(sweep_dict(), storage + ["train.epochs=7"], cwd=_job_dir(tmp_path, "ffee9988")), "folder")
    with pytest.raises(ConfigError, match=r"started with another config \(experiment.\{data\} differ"):
        _check_same_sweep(stored, load_sweep(sweep_dict(), storage[:1] + ["data.root=data/other"], cwd=_job_dir(tmp_path, "ffee9988")), "folder")


def test_a_run_resubmitted_after_a_code_change_resumes_its_checkpoints(tmp_path: Path):
    from xmodal.engine.config import build_config, check_same_run, fingerprint, read_yaml

    raw = read_yaml(REPO / "experiments" / "baselines" / "sar-buildings.yaml")
    configs = []
    for upload_hash in ("0a1b2c3d", "ffee9988"):
        raw["data"]["root"] = str(_job_dir(tmp_path, upload_hash) / "data" / "world")
        configs.append(build_config(raw))
    check_same_run(fingerprint(configs[0]), configs[1], "folder")
    raw["data"]["root"] = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="already exists in folder with other settings .data.root: "):
        check_same_run(fingerprint(configs[0]), build_config(raw), "folder")


def test_outputs_inside_a_jobs_working_dir_are_refused_by_name(tmp_path: Path):
    """Without sweep.storage a submitted job would write into its working dir, which Ray deletes."""
    from test_sweep import sweep_dict

    from xmodal.engine.config import build_config, read_yaml
    from xmodal.engine.runner import run_single
    from xmodal.tune.spec import load_sweep

    job = _job_dir(tmp_path, "0a1b2c3d")
    with pytest.raises(ConfigError, match=r"sweep.storage='.*_ray_pkg_0a1b2c3d/runs/sweeps' lies inside this Ray job's working dir"):
        load_sweep(sweep_dict(), cwd=job)
    load_sweep(sweep_dict(), [f"sweep.storage={tmp_path / 'sweeps'}"], cwd=job)  # an absolute folder elsewhere is fine
    raw = read_yaml(REPO / "experiments" / "baselines" / "sar-buildings.yaml")
    raw["run"] = {"storage": str(job / "runs")}
    with pytest.raises(ConfigError, match=r"run.storage='.*_ray_pkg_0a1b2c3d/runs' lies inside"):
        run_single(build_config(raw))


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


@pytest.fixture(scope="session")
def python_without_xmodal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with every dependency of xmodal but not xmodal itself, as on a stock Ray image.

    A venv whose only site entry is this environment's site-packages folder, added as a plain path:
    the .pth files in that folder (the editable install's import hook among them) are not run.
    """
    import site

    venv = tmp_path_factory.mktemp("no-install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True)
    Path(own.stdout.strip(), "dependencies.pth").write_text(site.getsitepackages()[0] + "\n")
    probe = subprocess.run([str(python), "-c", "import ray, torch, rasterio, optuna; import xmodal"], cwd=venv, capture_output=True, text=True)
    assert "No module named 'xmodal'" in probe.stderr, probe.stderr[-2000:]
    return python


def ray_command(python: Path) -> list[str]:
    """The `ray` CLI run by ``python``."""
    return [str(python), "-m", "ray.scripts.scripts"]


@pytest.fixture
def ray_head(python_without_xmodal: Path) -> Iterator[dict]:
    """A Ray head on 127.0.0.1 (dashboard on, token auth, 4 logical CPUs: one trial slot), stopped whatever happens.

    It runs a Python in which xmodal is not installed, with that Python first on the PATH: a job's
    driver, its Train workers and its Ray Data tasks can only run the uploaded working dir's code.
    """
    marker = secrets.token_hex(8)
    temp_dir = tempfile.mkdtemp(prefix="xrh", dir="/tmp")  # short: Unix socket paths are limited
    ports = free_ports(("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port"))
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        # Train's placement-group cleaner must find *this* head's State API among the machine's Rays.
        RAY_API_SERVER_ADDRESS=dashboard,
        XMODAL_TEST_CLUSTER=marker,
        PYTHONUNBUFFERED="1",
        PATH=f"{python_without_xmodal.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    command = [*ray_command(python_without_xmodal), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               '--system-config={"idle_worker_killing_time_threshold_ms":600000}'] + [f"--{k}={v}" for k, v in ports.items()]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": dashboard, "env": env, "marker": marker, "temp_dir": temp_dir, "ray": ray_command(python_without_xmodal)}
    finally:
        stop_marked(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(head: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*head["ray"], *args, "--address", head["address"]], env=head["env"], cwd=REPO, capture_output=True, text=True, timeout=timeout)


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
    python -m xmodal.cli.main sweep` (= `xmodal sweep`), from and to a Python in which xmodal is not
    installed (so the uploaded working dir is the code that runs), to a token-auth head: a two-phase chain
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
        [*ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--submission-id", submission, "--no-wait",
         "--working-dir", ".", "--runtime-env", "cluster/runtime_env.local.yaml", "--entrypoint-num-cpus", "0", "--",
         "python", "-m", "xmodal.cli.main", "sweep", str(config)],
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
