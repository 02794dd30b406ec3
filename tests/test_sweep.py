"""Sweeps: config validation, search spaces, chain sweeps, resumable searchers, local Ray set-up, reports.

None of these tests starts Ray. The full path (one command, a chain sweep with a per-phase key and
2 seeds sharing its pretraining, a Train worker killed and resumed from its checkpoint, the report)
runs as a job on a Ray head in tests/test_cluster.py, so nothing here touches the session's
``ray_local``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from xmodal.errors import ConfigError
from xmodal.report.sweeps import load_trials, render_sweep_report, seed_groups, utilisation
from xmodal.tune.spec import REPEAT_INDEX_KEY, SweepSpec, load_sweep
from xmodal.tune.sweep import _check_same_sweep, concurrent_trials, make_search, round_robin, run_sweep, sweep_dir, trial_resources

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "experiments" / "baselines" / "sar-buildings.yaml"
SWEEP_FILES = sorted({*REPO.glob("experiments/*/sweep*.yaml"), *REPO.glob("experiments/sweeps/*.yaml")})


def sweep_dict(**parameters) -> dict:
    """A sweep over the SAR baseline with the given parameters (default: the learning rate)."""
    return {
        "base": str(BASELINE),
        "name": "unit",
        "sweep": {"parameters": parameters or {"train.lr": {"type": "loguniform", "low": "1e-4", "high": 1e-2}}},
    }


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_sweep_configs_validate(path: Path):
    spec = load_sweep(path)
    assert spec.parameters and spec.metric.startswith("val/")
    assert spec.settings.storage.startswith("/"), "relative storage is resolved before trials change folder"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["sweep"]["parameters"].update({"train.lrr": [0.1, 0.2]}), r"sweep.parameters.train.lrr: is not a config key.*did you mean 'train.lr'"),
        (lambda d: d["sweep"]["parameters"].update({"trian.lr": [0.1]}), r"sweep.parameters.trian.lr: not a config key"),
        (lambda d: d["sweep"]["parameters"].update({"method_settings.dice": [1.0]}), r"method_settings.dice: is not a config key"),
        (lambda d: d["sweep"].update({"num_sample": 3}), r"unknown key 'sweep.num_sample'; did you mean 'sweep.num_samples'"),
        (lambda d: d.update({"sweeps": {}}), r"unknown section\(s\) \['sweeps'\]"),
        (lambda d: d["sweep"]["parameters"].update({"train.optimizer": ["adamw", "lion"]}), r"train.optimizer: value 'lion' is invalid"),
        (lambda d: d["sweep"]["parameters"].update({"train.epochs": {"type": "int", "low": 0, "high": 3}}), r"train.epochs: value 0 is invalid"),
        (lambda d: d["sweep"]["parameters"].update({"train.lr": {"type": "loguniform", "low": 0, "high": 1}}), r"train.lr: a loguniform range needs low > 0"),
        (lambda d: d["sweep"]["parameters"].update({"train.lr": {"type": "normal", "low": 0, "high": 1}}), r"train.lr.type='normal'"),
        (lambda d: d["sweep"]["parameters"].update({"model.decoder_channels": [[8, 8], [16, 8]]}), r"name such choices with a mapping"),
        (lambda d: d["sweep"]["parameters"].update({"train.momentum": {"type": "uniform", "low": 0.8, "high": 0.9, "when": {"train.optimizer": "sgd"}}}), r"must be a choice parameter declared before"),
        (lambda d: d["sweep"].update({"search": "grid"}), r"sweep.search=grid enumerates choices only; sweep.parameters \['train.lr'\]"),
        (lambda d: d["sweep"].update({"seeds": [0, 1], "scheduler": "asha"}), r"asha with several sweep.seeds"),
        (lambda d: d["sweep"].update({"seed_keys": ["train.sed"]}), r"sweep.seed_keys: 'train.sed' is not a config key"),
        (lambda d: d.update({"run": {"eval_every": 2}}), r"run.eval_every must be 1"),
        (lambda d: d["sweep"].pop("parameters"), r"sweep.parameters must map dotted config keys"),
    ],
)
def test_invalid_sweeps_are_refused_naming_the_key(mutate, message):
    raw = sweep_dict()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        load_sweep(raw)


def test_overrides_reach_experiment_and_sweep_sections():
    spec = load_sweep(sweep_dict(), ["train.epochs=3", "sweep.num_samples=5", "name=renamed", "sweep.storage=/tmp/x"])
    assert spec.experiment["train"]["epochs"] == 3 and spec.settings.num_samples == 5
    assert spec.name == "renamed" and sweep_dir(spec) == "/tmp/x/renamed"
    assert spec.max_epochs == 3


def test_conditional_parameter_exists_only_in_its_branch_and_every_draw_builds():
    import optuna

    spec = load_sweep(
        sweep_dict(
            **{
                "train.optimizer": ["adamw", "sgd"],
                "train.momentum": {"type": "uniform", "low": 0.8, "high": 0.99, "when": {"train.optimizer": "sgd"}},
                "model.decoder_channels": {"type": "choice", "values": {"narrow": [64, 32, 16, 16, 8], "wide": [256, 128, 64, 32, 16]}},
                "train.epochs": {"type": "int", "low": 2, "high": 6, "step": 2},
            }
        )
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    branches = set()
    for _ in range(24):
        trial = study.ask()
        spec.suggest(trial)
        params = dict(trial.params)
        assert ("train.momentum" in params) == (params["train.optimizer"] == "sgd"), params
        assert params["model.decoder_channels"] in ("narrow", "wide") and params["train.epochs"] in (2, 4, 6)
        config = spec.build_trial(params, None, "draw")
        assert config.model.decoder_channels == spec.parameter("model.decoder_channels").choices[params["model.decoder_channels"]]
        branches.add(params["train.optimizer"])
        study.tell(trial, 0.5)
    assert branches == {"adamw", "sgd"}
    assert spec.max_epochs == 6


def test_grid_with_seeds_enumerates_points_times_seeds():
    raw = sweep_dict(
        **{
            "data.labels.fraction": [0.25, 1.0],
            "method_settings.input": ["sar", "optical"],
            "method_settings.dice_weight": {"type": "choice", "values": [0.0, 1.0], "when": {"method_settings.input": "sar"}},
        }
    )
    raw["sweep"].update({"search": "grid", "seeds": [0, 1, 2], "seed_keys": ["train.seed", "data.labels.seed"]})
    spec = load_sweep(raw)
    points = spec.grid_points()
    # sar x 2 dice weights + optical (no dice weight), for each fraction.
    assert len(points) == 2 * 3
    assert all(("method_settings.dice_weight" in p) == (p["method_settings.input"] == "sar") for p in points)
    search, space, samples = make_search(spec, max_concurrent=2)
    assert search.max_concurrent == 2 and samples == 1  # Tune's grid generator, its limit from ClusterSlots
    assert space["seed"]["grid_search"] == [0, 1, 2]
    assert space["point"]["grid_search"] == round_robin(points, "data.labels.fraction") != points
    params, seed = spec.trial_params({"point": points[0], "seed": 2})
    config = spec.build_trial(params, seed, "t")
    assert config.train.seed == 2 and config.data.labels.seed == 2


def test_repeated_seeds_with_optuna_map_trial_index_to_seed():
    raw = sweep_dict()
    raw["sweep"].update({"seeds": [7, 8], "num_samples": 3})
    spec = load_sweep(raw)
    assert spec.trial_params({"train.lr": 0.01, REPEAT_INDEX_KEY: 1}) == ({"train.lr": 0.01}, 8)


def test_concurrency_from_resources():
    # This machine's tests: 4 logical CPUs, 1 Train worker + trial actor (2 CPUs) + 1 data CPU -> 1 slot.
    spec = load_sweep(sweep_dict(), ["scaling.num_workers=1", "scaling.data_cpus=1"])
    per_trial = trial_resources(spec.build_trial({}, None, "t"), trial_cpus=1)
    assert per_trial == {"CPU": 2.0}
    assert concurrent_trials({"CPU": 4.0}, per_trial, data_cpus=1) == 1
    assert concurrent_trials({"CPU": 16.0}, per_trial, data_cpus=1) == 5
    # GPU cluster: 8 GPUs, trials of 2 GPU workers -> GPUs decide.
    gpu = {"CPU": 2.0 * 4 + 1, "GPU": 2.0}
    assert concurrent_trials({"CPU": 64.0, "GPU": 8.0}, gpu, data_cpus=4) == 4
    assert concurrent_trials({"CPU": 64.0, "GPU": 0.0}, gpu, data_cpus=4) == 1  # autoscaler adds GPUs later


def test_resume_refuses_a_changed_sweep_and_a_new_sweep_refuses_an_existing_one(tmp_path: Path):
    spec = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}"])
    stored = json.loads(json.dumps(spec.to_plain()))
    changed = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}", "train.epochs=7"])
    with pytest.raises(ConfigError, match=r"started with another config \(experiment.\{train\} differ"):
        _check_same_sweep(stored, changed, "folder")
    _check_same_sweep(stored, spec, "folder")  # the same config resumes
    folder = Path(sweep_dir(spec))
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")  # what Tune leaves in an experiment folder
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        run_sweep(spec)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}", "name=other"]), resume=True)


def test_searcher_state_survives_a_restore(tmp_path: Path):
    """Seeds and live trials are remembered across Tuner.restore, so Optuna hears of every trial."""
    import optuna

    raw = sweep_dict()
    raw["sweep"].update({"seeds": [0, 1], "num_samples": 2, "storage": str(tmp_path)})
    spec = load_sweep(raw)
    Path(sweep_dir(spec)).mkdir(parents=True)
    searcher, _, samples = make_search(spec, max_concurrent=2)
    assert samples == 4
    first, second = searcher.suggest("t1"), searcher.suggest("t2")
    assert first["train.lr"] == second["train.lr"] and {first[REPEAT_INDEX_KEY], second[REPEAT_INDEX_KEY]} == {0, 1}
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))

    restored, _, _ = make_search(spec, max_concurrent=2)
    restored.restore(str(checkpoint))
    restored.on_trial_complete("t1", {"val/iou": 0.4, "training_iteration": 1})
    restored.on_trial_complete("t2", {"val/iou": 0.6, "training_iteration": 1})
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{sweep_dir(spec)}/optuna.db")
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(0.5)  # mean over seeds


# ----------------------------------------------------------------------------- report


def fabricate_sweep(folder: Path) -> SweepSpec:
    """A label-fraction x seeds sweep folder as Tune and ``run_sweep`` leave it (no Ray needed)."""
    raw = sweep_dict(**{"data.labels.fraction": [0.25, 1.0]})
    raw["sweep"].update({"search": "grid", "seeds": [0, 1], "storage": str(folder.parent), "max_concurrent_trials": 2})
    raw["name"] = folder.name
    spec = load_sweep(raw)
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(spec.to_plain()))
    (folder / "sweep_run.json").write_text(json.dumps({"max_concurrent_trials": 2, "sessions": []}))
    start = 1_000_000.0
    for i, (fraction, seed) in enumerate([(0.25, 0), (0.25, 1), (1.0, 0), (1.0, 1), (1.0, 2)]):
        trial_dir = folder / f"trial-t{i}"
        trial_dir.mkdir()
        (trial_dir / "params.json").write_text(json.dumps({"point": {"data.labels.fraction": fraction}, "seed": seed}))
        rows = []
        clock = start + 50 * (i // 2)  # two trials at a time, 50 s each (trial 4 alone)
        for epoch in (1, 2):
            clock += 20
            rows.append({"trial_id": f"t{i}", "epoch": epoch, "val/iou": 0.2 * fraction * epoch + 0.01 * seed, "train/loss": 1.0 / epoch, "timestamp": clock, "time_this_iter_s": 20.0})
        if i == 4:
            (trial_dir / "error.txt").write_text("Failure # 1 (occurred at ...)\nTraceback ...\nRuntimeError: worker died\n")
        else:
            clock += 10
            rows.append({"trial_id": f"t{i}", "epoch": 2, "val/iou": rows[-1]["val/iou"], "test/iou": 0.3 * fraction, "sweep/final": 1, "timestamp": clock, "time_this_iter_s": 10.0})
        (trial_dir / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return spec


def test_report_of_a_label_fraction_sweep(tmp_path: Path):
    folder = tmp_path / "fractions"
    fabricate_sweep(folder)
    trials = load_trials(folder)
    assert {t["state"] for t in trials} == {"TERMINATED", "ERROR"}
    assert next(t for t in trials if t["state"] == "ERROR")["error"] == "RuntimeError: worker died"
    usage = utilisation(trials, slots=2)
    # Busy: 4 trials x 50 s + 40 s (errored one) over 2 slots x 140 s of wall time.
    assert usage["wall_seconds"] == pytest.approx(140.0)
    assert usage["busy_share"] == pytest.approx(240.0 / 280.0)
    groups = {g["params"]["data.labels.fraction"]: g for g in seed_groups(trials, "val/iou")}
    # Seeds 0 and 1 at fraction 1.0: val/iou 0.40 and 0.41 -> mean 0.405, s.e. = std / sqrt(2) = 0.005.
    assert groups[1.0]["n"] == 2 and groups[1.0]["mean"] == pytest.approx(0.405)
    assert groups[1.0]["se"] == pytest.approx(0.005) and groups[1.0]["std"] == pytest.approx(0.005 * 2**0.5)
    assert groups[1.0]["test_mean"] == pytest.approx(0.3) and groups[0.25]["test_mean"] == pytest.approx(0.075)

    files = render_sweep_report(folder)
    names = {p.name for p in files}
    assert {"report.md", "trials.csv", "best.yaml", "learning_curves.png", "metric_vs_data.labels.fraction.png"} <= names
    assert all(p.stat().st_size > 0 for p in files)
    report = (folder / "report" / "report.md").read_text()
    assert "## Best configuration" in report and "busy 86%" in report
    assert "## Configurations over seeds (mean +- standard error, n seeds)" in report
    assert "| 1 | 2 | 0.4050 +- 0.0050 | 0.3000 +- 0.0000 |" in report
    assert "1 failed and 0 unfinished trial(s)" in report and "resume with `xmodal sweep CONFIG --resume`" in report
    rows = list(csv.DictReader((folder / "report" / "trials.csv").open()))
    assert len(rows) == 5 and {r["state"] for r in rows} == {"TERMINATED", "ERROR"}
    best = (folder / "report" / "best.yaml").read_text()
    assert "fraction: 1.0" in best and "seed: 1" in best


def test_a_resumed_trial_keeps_the_epochs_it_reported_before_the_interruption(tmp_path: Path):
    folder = tmp_path / "fractions"
    fabricate_sweep(folder)
    trial_dir = folder / "trial-t0"
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    # What `run_sweep(..., resume=True)` leaves: the old rows aside, Tune's fresh file with the rest.
    (trial_dir / "result-before-20260101-000000.json").write_text(json.dumps(rows[0]) + "\n")
    (trial_dir / "result.json").write_text("\n".join(json.dumps(r) for r in rows[1:]) + "\n")
    (trial,) = [t for t in load_trials(folder) if t["trial_id"] == "t0"]
    assert [r["epoch"] for r in trial["epochs"]] == [1, 2] and trial["final"] is not None


def test_report_of_a_remote_sweep_folder_copies_only_small_files(tmp_path: Path):
    folder = tmp_path / "bucket" / "fractions"
    fabricate_sweep(folder)
    (folder / "runs" / "trial-t0" / "checkpoint_0").mkdir(parents=True)
    (folder / "runs" / "trial-t0" / "checkpoint_0" / "state.pt").write_bytes(b"0" * 1000)
    uri = f"file://{folder}"  # any pyarrow filesystem: s3://, gs://, file://
    assert len(load_trials(uri)) == 5
    from xmodal.cli.main import main

    assert main(["report", uri, "--out", str(tmp_path / "out")]) == 0  # `xmodal report s3://...`
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "metric_vs_data.labels.fraction.png").is_file()
    assert not list((tmp_path / "out").rglob("state.pt")), "checkpoints stay remote"


def test_report_refuses_a_folder_without_trials(tmp_path: Path):
    with pytest.raises(ConfigError, match="no trials found"):
        render_sweep_report(tmp_path)
    with pytest.raises(ConfigError, match="no such sweep folder"):
        render_sweep_report(tmp_path / "missing")


# ----------------------------------------------------------------------------- a real sweep


def test_cli_reports_a_sweep_folder_and_names_bad_keys(tmp_path: Path, capsys):
    """`xmodal report SWEEP_DIR` and `xmodal sweep` with a bad key (exit status 2, key named)."""
    from xmodal.cli.main import main

    folder = tmp_path / "fractions"
    fabricate_sweep(folder)
    assert main(["report", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert "report.md" in capsys.readouterr().out and (tmp_path / "out" / "trials.csv").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {BASELINE}\nsweep:\n  parameters:\n    train.lrr: [0.1, 0.2]\n")
    assert main(["sweep", str(bad)]) == 2
    assert "sweep.parameters.train.lrr: is not a config key" in capsys.readouterr().err


def test_local_sweep_starts_ray_with_its_own_dashboard_on_loopback(monkeypatch):
    """The Ray `xmodal sweep` starts for itself: dashboard on 127.0.0.1 (ASHA-stopped trials need its
    State API to free their workers) and RAY_API_SERVER_ADDRESS pointing at it, because with several
    Rays on one machine Train's cleaner cannot pick one. (ray.init is recorded, not run: the real
    path runs in tests/test_cluster.py and in `xmodal sweep`.)"""
    import ray

    from xmodal.tune import sweep as sweep_module

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append((kwargs, os.environ.get("RAY_API_SERVER_ADDRESS"))))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unset")  # start_ray overwrites it; monkeypatch restores it
    spec = load_sweep(REPO / "experiments" / "sweeps" / "smoke.yaml")
    base = sweep_module.base_experiment(spec)
    assert sweep_module.start_ray(spec, base, trial_resources(base, 1.0)) is True
    ((kwargs, api),) = calls
    assert kwargs["include_dashboard"] is True and kwargs["dashboard_host"] == "127.0.0.1"
    assert api == f"http://127.0.0.1:{kwargs['dashboard_port']}", "set before ray.init, so Ray's processes inherit it"
    assert kwargs["num_cpus"] >= 3, "room for one trial: 1 Train worker + 1 trial actor + 1 data CPU"

    # Connected to a Ray without a dashboard (e.g. a test session's): ASHA is refused, FIFO is fine.
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(sweep_module, "state_api_available", lambda: False)
    with pytest.raises(ConfigError, match="asha needs the Ray dashboard"):
        sweep_module.start_ray(spec, base, {"CPU": 2.0})
    fifo = load_sweep(REPO / "experiments" / "sweeps" / "smoke.yaml", ["sweep.scheduler=fifo"])
    assert sweep_module.start_ray(fifo, base, {"CPU": 2.0}) is False


# ----------------------------------------------------------------------------- chain sweeps


def chain_sweep_dict(root: Path, storage: Path) -> dict:
    """pretrain (optical, seed pinned: shared by every trial) -> finetune (SAR, from the pretrained
    weights), sweeping the finetuning's learning rate, 2 seeds."""
    return {
        "name": "chain",
        "method": "supervised",
        "method_settings": {"input": "optical"},
        "data": {"root": str(root), "tile_size": 64, "batch_size": 4},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        "train": {"epochs": 1, "lr": 0.003},
        "run": {"panels": 0},
        "phases": [
            {"name": "pretrain", "overrides": {"train": {"seed": 0}}},
            {"name": "finetune", "inputs": {"start": "pretrain"}, "overrides": {"method_settings": {"input": "sar", "init": "start"}}},
        ],
        "sweep": {"search": "grid", "seeds": [0, 1], "scheduler": "fifo", "storage": str(storage),
                  "parameters": {"phases.finetune.train.lr": [0.002]}},
    }


def test_chain_sweep_keys_address_a_phase_after_its_own_overrides(tmp_path: Path):
    raw = chain_sweep_dict(tmp_path / "world", tmp_path)
    raw["sweep"]["parameters"] = {"phases.finetune.train.lr": [0.001, 0.01], "phases.finetune.method_settings.input": ["sar", "both"]}
    spec = load_sweep(raw)
    assert spec.metric == "val/iou" and len(spec.grid_points()) == 4
    from xmodal.engine.config import phase_config

    config = spec.build_trial({"phases.finetune.train.lr": 0.01, "phases.finetune.method_settings.input": "both"}, 1, "t")
    pretrain, finetune = (phase_config(config, p) for p in config.phases)
    assert (finetune.train.lr, finetune.method_settings.input, finetune.method_settings.init) == (0.01, "both", "start")
    assert (pretrain.train.lr, pretrain.method_settings.input, pretrain.train.seed, finetune.train.seed) == (0.003, "optical", 0, 1)
    for key, message in (("phases.finetuning.train.lr", "has no phase 'finetuning'"), ("phases.finetune.inputs.start", "not a config key")):
        raw["sweep"]["parameters"] = {key: [0.1]}
        with pytest.raises(ConfigError, match=message):
            load_sweep(raw)


def test_a_whole_phase_swept_as_named_variants_replaces_its_inputs_and_overrides(tmp_path: Path):
    from xmodal.engine.config import phase_config

    raw = chain_sweep_dict(tmp_path / "world", tmp_path)
    raw["sweep"]["parameters"] = {"phases.finetune": {"type": "choice", "values": {
        "pretrained": {"inputs": {"start": "pretrain"}, "overrides": {"method_settings": {"input": "sar", "init": "start"}, "train": {"lr": 0.02}}},
        "scratch": {"inputs": {}, "overrides": {"method_settings": {"input": "sar"}}},
    }}}
    spec = load_sweep(raw)
    assert [point["phases.finetune"] for point in spec.grid_points()] == ["pretrained", "scratch"]
    pretrained = phase_config(*(lambda c: (c, c.phases[1]))(spec.build_trial({"phases.finetune": "pretrained"}, 0, "t")))
    scratch = phase_config(*(lambda c: (c, c.phases[1]))(spec.build_trial({"phases.finetune": "scratch"}, 0, "t")))
    assert (pretrained.method_settings.init, dict(pretrained.inputs), pretrained.train.lr) == ("start", {"start": "pretrain"}, 0.02)
    assert (scratch.method_settings.init, dict(scratch.inputs), scratch.train.lr) == (None, {}, 0.003)
    raw["sweep"]["parameters"] = {"phases.finetune": {"type": "choice", "values": {"bad": {"method": "kd"}}}}
    with pytest.raises(ConfigError, match="whole-phase value is a mapping of"):
        load_sweep(raw)


def test_grid_trials_take_turns_between_the_first_parameters_values():
    points = [{"arm": a, "share": s} for a in ("kd", "cmc", "random") for s in (0.01, 1.0)] + [{"arm": "kd", "share": 0.5}]
    ordered = round_robin(points, "arm")
    assert [p["arm"] for p in ordered] == ["kd", "cmc", "random", "kd", "cmc", "random", "kd"]
    assert sorted(map(str, ordered)) == sorted(map(str, points))  # the same points, reordered


def test_a_trials_xmodal_error_is_reported_without_its_class_path():
    from xmodal.report.sweeps import _last_error_line

    text = "Failure # 1\nTraceback (most recent call last):\n  File x\nxmodal.errors.RunFailedError: /d/sar.tif: cannot be read as a GeoTIFF\n"
    assert _last_error_line(text) == "/d/sar.tif: cannot be read as a GeoTIFF"
    assert _last_error_line("Traceback\nRuntimeError: worker died") == "RuntimeError: worker died"


def test_the_sweep_console_line_counts_trials_and_keeps_the_best(monkeypatch):
    import xmodal.tune.sweep as sweep

    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(sweep.time, "time", lambda: next(clock))
    progress = sweep.SweepProgress("s", "/tmp/none", "val/loss", "min", slots=2, total=3)  # starts at 100
    progress.begun = {"a": 100.0, "b": 100.0}
    assert progress.status("a", {"val/loss": 0.5}) == (  # at 110: a ran 10 s, b 10 s so far, of 2 x 10 s
        "[sweep s] trial a val/loss 0.5000 | 1/3 ended (0 failed), 1 running; best val/loss 0.5000 (trial a); slots busy 100%"
    )
    line = progress.status("b", None, error="/d/sar.tif: cannot be read")  # at 130: 10 + 30 s of 2 x 30 s
    assert line == "[sweep s] trial b failed: /d/sar.tif: cannot be read | 2/3 ended (1 failed), 0 running; best val/loss 0.5000 (trial a); slots busy 67%"


def test_a_seeds_only_grid_sweep_repeats_the_config_per_seed():
    raw = sweep_dict()
    raw["sweep"].pop("parameters", None)
    raw["sweep"].update({"search": "grid", "seeds": [0, 1, 2]})
    spec = load_sweep(raw)
    assert spec.parameters == [] and spec.grid_points() == [{}]
    _, space, samples = make_search(spec, max_concurrent=1)
    assert space["point"]["grid_search"] == [{}] and space["seed"]["grid_search"] == [0, 1, 2] and samples == 1
    assert [spec.build_trial({}, seed, f"t{seed}").train.seed for seed in (0, 1, 2)] == [0, 1, 2]
    for search, seeds in (("grid", [0]), ("optuna", [0, 1])):  # one seed, or a search with nothing to search
        raw["sweep"].update({"search": search, "seeds": seeds})
        with pytest.raises(ConfigError, match="sweep.parameters must map"):
            load_sweep(raw)


# ----------------------------------------------------------------------------- early stopping, study storage, retries


class _Trial:
    """What a Tune scheduler reads of a trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _drive_asha(scheduler, metric: str, trials: list[tuple[int, list[float]]], report_epochs: bool) -> list[int | None]:
    """Run trials one after another through a scheduler as Tune does: a result per epoch (as the
    engine reports it), then the trial's final report with its test metrics.

    Args:
        trials: (epochs, metric value at each epoch) per trial.
        report_epochs: Results carry ``epochs`` (the trial's own last epoch), as the engine's do.

    Returns:
        The epoch each trial was stopped at, ``None`` for a trial that ran to its final report.
    """
    from ray.tune.schedulers import TrialScheduler

    from xmodal.tune.spec import FINAL_KEY

    stopped: list[int | None] = []
    for index, (epochs, values) in enumerate(trials):
        trial = _Trial(f"t{index}")
        scheduler.on_trial_add(None, trial)
        at = None
        for epoch, value in enumerate(values, start=1):
            result = {"epoch": epoch, metric: value, **({"epochs": epochs} if report_epochs else {})}
            if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                at = epoch
                break
        if at is None:
            final = {"epoch": epochs, metric: values[-1], FINAL_KEY: 1, "test/iou": 0.3}
            assert scheduler.on_trial_result(None, trial, final) == TrialScheduler.CONTINUE
            scheduler.on_trial_complete(None, trial, final)
        stopped.append(at)
    return stopped


@pytest.mark.parametrize("epochs, grace, factor", [(4, 1, 2), (2, 1, 2), (8, 2, 2), (9, 1, 3), (12, 3, 2)])
def test_asha_never_stops_a_trial_at_its_last_epoch_but_still_stops_weak_trials_earlier(epochs, grace, factor):
    """A rung at grace * factor**k can fall on the last epoch (4 with grace 1, factor 2): a trial stopped
    there never reports its test metrics, although stopping it saved no training."""
    import random

    from xmodal.tune.sweep import make_scheduler

    spec = load_sweep(sweep_dict(), [f"train.epochs={epochs}", "sweep.scheduler=asha", f"sweep.asha.grace_period={grace}", f"sweep.asha.reduction_factor={factor}"])
    rng = random.Random(epochs)
    first = [0.5] * epochs
    worse_only_at_the_end = [0.9] * (epochs - 1) + [0.1]  # passes every earlier rung, worst at the last epoch
    worse_throughout = [0.1] * epochs
    noisy = [[rng.random() for _ in range(epochs)] for _ in range(30)]
    for report_epochs in (True, False):
        trials = [(epochs, values) for values in [first, worse_only_at_the_end, worse_throughout, *noisy]]
        stopped = _drive_asha(make_scheduler(spec), spec.metric, trials, report_epochs)
        assert stopped[:2] == [None, None], "the trial worse only at its last epoch finishes and reports its test"
        assert stopped[2] == grace, "a trial worse at every epoch is still stopped at the first rung"
        assert all(at is None or at < epochs for at in stopped), stopped
        assert sum(at is not None for at in stopped) >= 10, "ASHA still stops the weaker noisy trials"


def test_asha_never_stops_a_trial_at_its_own_last_epoch_when_epochs_are_swept():
    from xmodal.tune.sweep import make_scheduler

    spec = load_sweep(sweep_dict(**{"train.epochs": [2, 4]}), ["sweep.scheduler=asha", "sweep.search=random"])
    assert spec.max_epochs == 4
    # A 4-epoch trial first; then a 2-epoch one worse only at its epoch 2, the rung at grace * 2 = 2.
    stopped = _drive_asha(make_scheduler(spec), spec.metric, [(4, [0.5] * 4), (2, [0.9, 0.1]), (2, [0.1, 0.1])], report_epochs=True)
    assert stopped == [None, None, 1]


def test_every_epoch_the_engine_reports_names_the_runs_last_epoch():
    """ASHA reads ``epochs`` beside ``epoch`` in each epoch's report to let a trial's last epoch finish."""
    from test_platform import Scripted, drive

    outcome = drive(Scripted([0.5, 0.4, 0.3], [0.1, 0.2, 0.3]))
    assert [(row["epoch"], row["epochs"]) for row in outcome["history"]] == [(1, 3), (2, 3), (3, 3)]


def test_asha_refuses_a_grace_period_that_reaches_the_last_epoch():
    with pytest.raises(ConfigError, match=r"sweep.asha.grace_period=3.*train.epochs.*3"):
        load_sweep(sweep_dict(), ["train.epochs=3", "sweep.scheduler=asha", "sweep.asha.grace_period=3"])


SECRET = "S3cret-pw_42"


def test_a_study_urls_password_is_never_written_printed_or_pickled(tmp_path: Path, monkeypatch):
    """The password of sweep.study_storage (in the URL, or from $XMODAL_STUDY_PASSWORD) reaches the
    database connection only: not sweep.json, the summary, the trials' plan or Tune's pickles."""
    import pickle

    import optuna
    import ray.cloudpickle
    import sqlalchemy

    from xmodal.tune import sweep as sweep_module

    connected: list[str] = []
    real_create_engine = sqlalchemy.engine.create_engine
    database = f"sqlite:///{tmp_path / 'study.db'}"  # stands in for the Postgres server

    def create_engine(url, **kwargs):
        connected.append(url.render_as_string(hide_password=False) if hasattr(url, "render_as_string") else str(url))
        return real_create_engine(database)

    monkeypatch.setattr(sqlalchemy.engine, "create_engine", create_engine)
    monkeypatch.delenv("XMODAL_STUDY_PASSWORD", raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"postgresql://xmodal:{SECRET}@db.example:5432/optuna"
    spec = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}", f"sweep.study_storage={url}"])

    def assert_nowhere(blob: bytes | str, where: str) -> None:
        text = blob if isinstance(blob, str) else blob.decode("latin-1")
        assert SECRET not in text, f"the password is in {where}"

    assert_nowhere(json.dumps(spec.to_plain(), indent=2), "sweep.json")  # what run_sweep writes
    plan = sweep_module.TrialPlan(spec=spec, sweep_dir=sweep_dir(spec), results_root=str(tmp_path / "results"))
    assert_nowhere(ray.cloudpickle.dumps(plan), "the plan every trial receives")
    searcher, _, _ = make_search(spec, max_concurrent=2)
    assert connected and all(SECRET in seen for seen in connected), "the driver connects with the password"
    assert_nowhere(ray.cloudpickle.dumps(searcher), "the searcher (tuner.pkl)")
    assert_nowhere(ray.cloudpickle.dumps(sweep_module.make_scheduler(spec)), "the scheduler (tuner.pkl)")
    searcher.save(str(tmp_path / "searcher-state.pkl"))
    assert_nowhere((tmp_path / "searcher-state.pkl").read_bytes(), "Tune's searcher checkpoint")
    # A restored sweep connects again with the password this process was given.
    connected.clear()
    pickle.loads(ray.cloudpickle.dumps(searcher))
    assert connected and all(SECRET in seen for seen in connected)
    result = sweep_module.SweepResult(
        name=spec.name, sweep_dir=sweep_dir(spec), metric=spec.metric, mode=spec.mode, best=None, states={}, errors={},
        wall_seconds=1.0, trials_per_hour=0.0, busy_share=0.0, max_concurrent_trials=1, study_storage=sweep_module.study_storage_url(spec),
    )
    assert_nowhere(result.summary(), "the printed summary")
    assert "optuna-dashboard postgresql://xmodal@db.example:5432/optuna" in result.summary()

    # The password from the environment: the config holds a URL without one.
    connected.clear()
    monkeypatch.setenv("XMODAL_STUDY_PASSWORD", "from-the-env")
    bare = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}", "name=bare", "sweep.study_storage=postgresql://xmodal@db.example/optuna"])
    searcher, _, _ = make_search(bare, max_concurrent=2)
    assert connected and all("xmodal:from-the-env@db.example" in seen for seen in connected)
    assert "from-the-env" not in ray.cloudpickle.dumps(searcher).decode("latin-1")


def test_a_run_whose_train_retries_are_spent_is_not_rerun_by_tune(tmp_path: Path, monkeypatch):
    """Retries do not multiply: a lost Train worker is retried inside its run up to run.max_failures
    (Ray Train's policy, as the trainer is built), and Tune reruns a trial (sweep.max_failures) only
    when the trial's own process or Train controller died. Attempts are counted without Ray."""
    from types import SimpleNamespace

    import ray.exceptions
    import ray.train
    import ray.tune
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api import data_parallel_trainer

    from xmodal.engine import runner
    from xmodal.tune import sweep as sweep_module

    spec = load_sweep(sweep_dict(), [f"sweep.storage={tmp_path}"])
    plan = sweep_module.TrialPlan(spec=spec, sweep_dir=sweep_dir(spec), results_root=str(tmp_path / "results"))
    config = sweep_module.trial_config(plan, {"train.lr": 0.001}, "t1")
    assert (config.run.max_failures, spec.settings.max_failures) == (1, 2)  # the defaults
    worker_plan = SimpleNamespace(spec=None, results_dir=str(tmp_path / "results" / "trial-t1"), datasets=())
    starts: list[str] = []

    def controller(self, failure_policy, **kwargs):  # Train's controller: restart the worker group until its policy raises
        while True:
            starts.append("worker group")
            if controller_dies:
                raise ray.exceptions.RayActorError()  # what ray.get of a dead controller raises
            lost = ray.train.WorkerGroupError("failed", {0: UserExceptionWithTraceback(ConnectionResetError("node lost"), "tb")})
            if failure_policy.make_decision(lost) == FailureDecision.RAISE:
                return SimpleNamespace(error=lost)

    monkeypatch.setattr(data_parallel_trainer, "ObjectRefWrapper", lambda train_fn: train_fn)  # no object store
    monkeypatch.setattr(data_parallel_trainer.DataParallelTrainer, "_initialize_and_run_controller", controller)
    monkeypatch.setattr(runner, "ensure_ray", lambda config: None)
    monkeypatch.setattr(runner, "LOG_DRAIN_SECONDS", 0.0)
    real_make_trainer = runner.make_trainer
    monkeypatch.setattr(runner, "make_trainer", lambda config, plan, prepared, callbacks: real_make_trainer(config, plan, prepared, callbacks, datasets={}))
    monkeypatch.setattr(sweep_module, "_sweep_trial", lambda tune_config, plan, trial_id: runner._fit(config, worker_plan, None, {}, None, None, 0.0))

    def tune_runs_the_trial(trial_id: str) -> None:
        """Tune: the trial, then as many reruns as its failure config allows while it keeps failing."""
        monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: trial_id))
        for _ in range(1 + sweep_module.trial_failure_config(spec).max_failures):
            try:
                sweep_module.sweep_trial({}, plan)
                return
            except Exception:
                continue

    controller_dies = False
    tune_runs_the_trial("t1")
    assert len(starts) == config.run.max_failures + 1, f"{len(starts)} worker-group starts for one lost-worker failure"
    starts.clear()
    controller_dies = True  # the trial's own process (and its Train controller) lost: Tune reruns it
    tune_runs_the_trial("t2")
    assert len(starts) == spec.settings.max_failures + 1
