"""``sweep.engine: plain``: a chain sweep whose runs train inside their Tune trials, no Train worker group.

Run as the CLI runs it, in its own process (it starts its own local Ray): two trials share one
pretraining phase, every epoch reaches Tune, and the report reads the trials back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from xmodal.errors import ConfigError
from xmodal.report.sweeps import load_trials
from xmodal.tune.spec import load_sweep
from xmodal.tune.sweep import concurrent_trials, reserved_data_cpus, trial_resources

CHAIN = {
    "name": "plain-chain",
    "method": "supervised",
    "method_settings": {"input": "optical"},
    "data": {"mask_layer": "buildings", "tile_size": 64, "batch_size": 4},
    "model": {"arch": "unet", "encoder": "resnet18", "decoder_channels": [16, 16, 16, 16, 16]},
    "train": {"epochs": 2, "optimizer": "adamw", "lr": 0.002},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
    "phases": [
        {"name": "pretrain", "overrides": {"train": {"epochs": 1}}},
        {"name": "finetune", "inputs": {"pretrained": "pretrain"},
         "overrides": {"method_settings": {"input": "sar", "init": "pretrained", "init_part": "encoder"}}},
    ],
    "sweep": {"search": "grid", "engine": "plain", "scheduler": "fifo", "max_concurrent_trials": 2, "local_cpus": 2,
              "parameters": {"phases.finetune.method_settings.freeze_encoder": {"type": "choice", "values": [True, False]}}},
}


def test_plain_engine_is_checked_and_sized_before_ray_starts(tmp_path: Path):
    spec = load_sweep(CHAIN, [f"data.root={tmp_path}", f"sweep.storage={tmp_path}"])
    per_trial = trial_resources(spec.build_trial({}, None, "t"), 1.0, "plain")
    assert per_trial == {"CPU": 1.0}  # no Train worker beside the actor
    # No Ray Data beside it either (torch loaders decode in the trial): 2 cores run 2 trials, not 1.
    base = spec.build_trial({}, None, "t")
    assert reserved_data_cpus(spec, base) == 0.0 and concurrent_trials({"CPU": 2.0}, per_trial, reserved_data_cpus(spec, base)) == 2
    with pytest.raises(ConfigError, match="sweep.engine=plain trains each run in one process.*num_workers=2"):
        load_sweep(CHAIN, [f"data.root={tmp_path}", f"sweep.storage={tmp_path}", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match="sweep.engine='ray'"):
        load_sweep(CHAIN, [f"data.root={tmp_path}", "sweep.engine=ray"])


@pytest.mark.ray
def test_a_plain_chain_sweep_shares_its_pretraining_and_reports_every_epoch(tiny_world: Path, tmp_path: Path):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**CHAIN, "data": {**CHAIN["data"], "root": str(tiny_world)}}))
    ray_tmp = tempfile.mkdtemp(prefix="xr-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "xmodal.cli.main", "sweep", str(config), f"sweep.storage={tmp_path / 'sweeps'}", "--no-report"],
            capture_output=True, text=True, env=env, timeout=600,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "sweeps" / "plain-chain"
    trials = load_trials(folder)
    assert len(trials) == 2 and {t["state"] for t in trials} == {"TERMINATED"}
    for trial in trials:
        assert len(trial["epochs"]) == 2  # both epochs reached Tune
        assert "test/iou" in trial["final"]
        phases = json.loads(trial["final"]["phase_runs"])
        assert phases["pretrain"].startswith("shared/pretrain-")
        summary = json.loads((Path(trial["final"]["results_dir"]) / "run.json").read_text())
        assert summary["engine"] == "plain" and summary["inputs"]["pretrained"]["run"] == phases["pretrain"]
    assert len({json.loads(t["final"]["phase_runs"])["pretrain"] for t in trials}) == 1
    assert len(list((folder / "runs" / "shared").glob("pretrain-*"))) == 1  # trained once, reused
    # The console: a line per ended trial, no Tune status table, no Ray internals; all of it in the sweep's log.
    status = [line for line in done.stdout.splitlines() if line.startswith("[sweep plain-chain] trial ")]
    assert len(status) == 2 and "2/2 ended (0 failed), 0 running; best val/" in status[-1], done.stdout
    assert "Trial status" not in done.stdout and "Configuration for experiment" not in done.stdout
    assert "Reporting training result" not in done.stdout + done.stderr
    assert "[sweep plain-chain] trial " in (folder / "console.log").read_text()
