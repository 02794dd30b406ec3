"""The pretext zoo: its sweeps, what each arm's downstream reads, and its report.

The sweeps are checked as they ship (every arm builds, pretrainings are shared by seed); the report
on a fabricated sweep folder whose numbers are known; the CLI end to end on a cut-down zoo that keeps
the real arm definitions of experiments/zoo (kd: teacher -> reconstruction, and random init).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from xmodal.engine.chain import upstream_phases
from xmodal.engine.config import phase_configs, read_yaml
from xmodal.errors import ConfigError
from xmodal.report.sweeps import load_trials, render_sweep_report
from xmodal.tune.spec import load_sweep, validation_points, zoo_keys
from xmodal.tune.sweep import shared_phase_name

ZOO = Path(__file__).resolve().parents[1] / "experiments" / "zoo"
ARMS = ["kd", "cmc", "swd", "cromss", "matching", "supervised", "random"]


def _phase_runs(spec, params, seed):
    return phase_configs(spec.build_trial(params, seed, "t"))


def test_the_zoo_sweeps_cover_every_arm_and_share_each_pretraining_per_seed(tmp_path: Path):
    full = load_sweep(ZOO / "sweep.yaml", [f"sweep.storage={tmp_path}"])
    quick = load_sweep(ZOO / "sweep-quick.yaml", [f"sweep.storage={tmp_path}"])
    assert list(full.parameter("phases.pretrain").choices) == ARMS
    keys = zoo_keys(full)
    assert (keys.arm, keys.task, keys.share, keys.encoder) == (
        "phases.pretrain", "phases.downstream.data.mask_layer", "phases.downstream.data.labels.fraction",
        "phases.downstream.method_settings.freeze_encoder",
    )
    # 6 pretrained arms x 2 tasks x 4 shares x frozen/finetuned + random (finetuned only) x 8, x 3 seeds.
    assert len(validation_points(full)) == (6 * 2 * 4 * 2 + 2 * 4) * 3
    assert len(validation_points(quick)) == 6 * 2 * 2 * 2 + 2 * 2
    for spec, seeds in ((quick, 1), (full, 3)):
        shared = set()
        for params, seed in validation_points(spec):
            runs = _phase_runs(spec, params, seed)
            downstream = runs.pop("downstream")
            assert downstream.model == runs["pretrain"].model  # one encoder architecture
            assert downstream.method_settings.input == "sar" and downstream.data.labels.epoch == "full"
            shared |= {shared_phase_name(run, {}) for run in runs.values()}
        # teacher, eo and six pretrainings (random reuses supervised's) once per seed.
        assert len(shared) == 8 * seeds


def test_each_arm_reads_its_own_pretraining_and_random_reads_none(tmp_path: Path):
    spec = load_sweep(ZOO / "sweep-quick.yaml", [f"sweep.storage={tmp_path}"])
    expected = {"kd": ["teacher", "pretrain"], "swd": ["eo", "pretrain"], "random": []}
    exports = {"kd": "model", "cmc": "sar_encoder", "swd": "sar_encoder", "cromss": "sar_encoder",
               "matching": "sar_autoencoder", "supervised": "model"}
    for arm in ARMS:
        params = {"phases.pretrain": arm, "phases.downstream.data.mask_layer": "landcover", "phases.downstream.data.labels.fraction": 0.01}
        params = next(p for p, _ in validation_points(spec) if all(p.get(k) == v for k, v in params.items()))
        runs = _phase_runs(spec, params, 0)
        assert upstream_phases(runs, "downstream", read=True) == expected.get(arm, ["pretrain"]), arm
        # What a trial runs: the phases the downstream declares inputs from (random: its shared pretrain).
        assert upstream_phases(runs, "downstream") == (["pretrain"] if arm == "random" else expected.get(arm, ["pretrain"])), arm
        settings = runs["downstream"].method_settings
        if arm == "random":
            assert settings.init is None and not settings.freeze_encoder
        else:
            assert (settings.init, settings.init_export, settings.init_part) == ("pretrained", exports[arm], "encoder"), arm
    assert runs["pretrain"].method == "supervised" and runs["pretrain"].method_settings.use_noisy_labels


def test_a_zoo_report_needs_the_arms_task_and_share_swept(tmp_path: Path):
    raw = read_yaml(ZOO / "sweep-quick.yaml")
    raw["base"] = str(ZOO / raw["base"])
    raw["sweep"]["parameters"].pop("phases.downstream.data.labels.fraction")
    with pytest.raises(ConfigError, match=r"sweep.report=zoo needs .*missing: \['phases.downstream.data.labels.fraction'\]"):
        load_sweep(raw, [f"sweep.storage={tmp_path}"])


# ----------------------------------------------------------------------------- the report


def fabricate_zoo(folder: Path) -> None:
    """A 2-seed zoo folder of three arms, as Tune and the trials leave it, with known numbers."""
    spec = load_sweep(ZOO / "sweep-quick.yaml", [f"sweep.storage={folder.parent}", "sweep.seeds=[0, 1]", f"name={folder.name}"])
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(spec.to_plain()))
    (folder / "sweep_run.json").write_text(json.dumps({"max_concurrent_trials": 2, "sessions": []}))
    results = folder / "results"
    walls = {"teacher": 30.0, "eo": 20.0, "pretrain-kd": 40.0, "pretrain-cmc": 100.0, "pretrain-supervised": 25.0}
    for name, wall in walls.items():
        for seed in (0, 1):
            run = results / "shared" / f"{name}-s{seed}"
            run.mkdir(parents=True)
            (run / "run.json").write_text(json.dumps({"wall_seconds": wall + seed, "metric": "val/loss"}))
    index = 0
    for params, seed in validation_points(spec):
        arm = params["phases.pretrain"]
        if arm not in ("kd", "cmc", "random"):
            continue
        task, share = params["phases.downstream.data.mask_layer"], params["phases.downstream.data.labels.fraction"]
        frozen = params.get("phases.downstream.method_settings.freeze_encoder") == "frozen"
        # kd best at 1 %, cmc best at 100 %; frozen 0.05 lower; seeds 0.02 apart.
        base = {"kd": 0.40, "cmc": 0.30, "random": 0.20}[arm] if share == 0.01 else {"kd": 0.50, "cmc": 0.70, "random": 0.68}[arm]
        value = base - 0.05 * frozen + 0.02 * seed + (0.1 if task == "landcover" else 0.0)
        metric = "val/iou" if task == "buildings" else "val/miou"
        trial_id = f"t{index:03d}"
        index += 1
        trial_dir = folder / f"trial-{trial_id}"
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text(json.dumps({"point": params, "seed": seed}))
        pretrain = {"kd": "pretrain-kd", "cmc": "pretrain-cmc", "random": "pretrain-supervised"}[arm]
        phase_runs = {"teacher": f"shared/teacher-s{seed}", "eo": f"shared/eo-s{seed}", "pretrain": f"shared/{pretrain}-s{seed}", "downstream": f"trial-{trial_id}"}
        run_dir = results / f"trial-{trial_id}"
        run_dir.mkdir()
        (run_dir / "run.json").write_text(json.dumps({"wall_seconds": 10.0, "metric": metric}))
        rows = [
            {"trial_id": trial_id, "epoch": 1, "val/loss": 0.5, "timestamp": 1000.0 + index, "time_this_iter_s": 1.0},
            {"trial_id": trial_id, "epoch": 6, "val/loss": 0.4, metric.replace("val/", "test/"): value, "test/miou": value - 0.3 if task == "buildings" else value,
             "sweep/final": 1, "results_dir": str(run_dir), "phase_runs": json.dumps(phase_runs), "timestamp": 1001.0 + index, "time_this_iter_s": 1.0},
        ]
        (trial_dir / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_the_zoo_report_tables_the_arms_with_their_spread_curve_and_compute(tmp_path: Path):
    folder = tmp_path / "sweeps" / "zoo-fake"
    fabricate_zoo(folder)
    assert len(load_trials(folder)) == (2 * 2 * 2 * 2 + 2 * 2) * 2
    files = {p.name: p for p in render_sweep_report(folder)}
    assert {"zoo.md", "zoo.csv", "zoo_label_efficiency.png", "report.md"} <= set(files)
    assert files["zoo_label_efficiency.png"].stat().st_size > 10_000
    assert "[`zoo.md`](zoo.md)" in files["report.md"].read_text()
    zoo = files["zoo.md"].read_text()
    # Buildings read test/iou and land cover test/miou (each task's selection metric); seeds 0.02 apart:
    # mean +0.01, s.e. = 0.01.
    assert "## buildings (`test/iou`)" in zoo and "## landcover (`test/miou`)" in zoo
    assert "| kd | finetuned | 0.410 +- 0.010 (2) | 0.510 +- 0.010 (2) |" in zoo
    assert "| kd | frozen | 0.360 +- 0.010 (2) | 0.460 +- 0.010 (2) |" in zoo
    assert "| random | finetuned | 0.210 +- 0.010 (2) | 0.690 +- 0.010 (2) |" in zoo
    assert "| random | frozen |" not in zoo
    assert ("- buildings @ 1 %: **kd** (finetuned) 0.410 +- 0.010 (2); next kd (frozen) 0.360 +- 0.010 (2); "
            "no pretraining (random) 0.210 +- 0.010 (2) - lead beyond both s.e.") in zoo
    # The floor is named once, as the runner-up here; leads within one s.e. of each side are not claimed.
    assert "- landcover @ 100 %: **cmc** (finetuned) 0.810 +- 0.010 (2); next random (finetuned) 0.790 +- 0.010 (2) - within the spread" in zoo
    # Compute per seed: kd read teacher + reconstruction (30.5 + 40.5 s), cmc its pretraining, random none.
    assert "| kd | teacher, pretrain | 71 | 0.020 | 0.000 |" in zoo
    assert "| cmc | pretrain | 100 | 0.028 | 0.000 |" in zoo
    assert "| random | none | 0 | 0.000 | 0.000 |" in zoo
    rows = list(csv.DictReader(files["zoo.csv"].open()))
    assert len(rows) == (2 * 2 * 2 * 2 + 2 * 2)
    kd = next(r for r in rows if (r["arm"], r["encoder"], r["task"], r["share"]) == ("kd", "frozen", "landcover", "0.01"))
    assert kd["metric"] == "test/miou" and json.loads(kd["values"]) == [0.45, 0.47] and kd["n"] == "2"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.ray
def test_xmodal_zoo_runs_the_real_arms_and_writes_the_zoo_report(tiny_world: Path, tmp_path: Path):
    """kd (teacher -> Int reconstruction -> downstream) and random init, the shipped arm definitions."""
    raw = read_yaml(ZOO / "sweep-quick.yaml")
    raw["base"] = str(ZOO / raw["base"])
    parameters = raw["sweep"]["parameters"]
    parameters["phases.pretrain"]["values"] = {k: v for k, v in parameters["phases.pretrain"]["values"].items() if k in ("kd", "random")}
    parameters["phases.downstream.data.mask_layer"]["values"] = {"buildings": "buildings"}
    parameters["phases.downstream.data.labels.fraction"] = [1.0]
    for key in ("phases.downstream.method_settings", "phases.downstream.method_settings.init_export"):
        parameters.pop(key)
    parameters["phases.downstream.method_settings.freeze_encoder"]["when"] = {"phases.pretrain": ["kd"]}
    config = tmp_path / "zoo.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="xr-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xmodal.cli.main", "zoo", "--config", str(config), f"data.root={tiny_world}", "world=null",
             "train.epochs=1", "data.batch_size=4", f"sweep.storage={tmp_path / 'sweeps'}"],
            capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    zoo = (tmp_path / "sweeps" / "zoo-quick" / "report" / "zoo.md").read_text()
    assert "## buildings (`test/iou`)" in done.stdout and "## Pretraining compute (per seed)" in done.stdout  # printed too
    assert "| kd | frozen |" in zoo and "| kd | finetuned |" in zoo and "| random | finetuned |" in zoo
    assert "| kd | teacher, pretrain |" in zoo and "| random | none | 0 |" in zoo
