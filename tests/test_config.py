"""Configs are validated before anything starts, with errors naming the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmodal.engine.config import build_config, fingerprint, load_config, parse_overrides, phase_config
from xmodal.errors import ConfigError

MINIMAL = {"name": "t", "method": "supervised"}


def test_defaults_and_method_settings():
    config = build_config({**MINIMAL, "method_settings": {"input": "optical"}})
    assert config.method_settings.input == "optical"
    assert config.data.mask_layer == "buildings" and config.train.epochs >= 1


@pytest.mark.parametrize(
    "raw, message",
    [
        ({**MINIMAL, "data": {"batch_sise": 4}}, "unknown key 'data.batch_sise'; did you mean 'data.batch_size'"),
        ({**MINIMAL, "train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten'"),
        ({**MINIMAL, "train": {"lr": True}}, "train.lr: expected a number"),
        ({**MINIMAL, "method_settings": {"input": "lidar"}}, "method_settings.input='lidar'"),
        ({**MINIMAL, "method_settings": {"inptu": "sar"}}, "did you mean 'method_settings.input'"),
        ({**MINIMAL, "method": "nope"}, "unknown method 'nope'"),
        ({"method": "supervised"}, "missing required key 'name'"),
        ({**MINIMAL, "modle": {}}, "unknown section"),
        ({**MINIMAL, "data": {"augment": {"geometric": "spin"}}}, "augment.geometric='spin'"),
        ({**MINIMAL, "train": {"optimizer": "lion"}}, "train.optimizer='lion'"),
        ({**MINIMAL, "phases": [{"name": "a", "overrides": {"train": {"epochs": 0}}}]}, "phase 'a'"),
    ],
)
def test_invalid_configs_are_named(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(raw, "x.yaml")


def test_files_extends_and_overrides(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("method: supervised\ntrain:\n  epochs: 7\n  lr: 0.01\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\ntrain:\n  epochs: 3\n")
    config = load_config(tmp_path / "child.yaml", ["train.lr=0.5", "model.decoder_channels=[8,8,8,8,8]"])
    assert (config.train.epochs, config.train.lr, config.model.decoder_channels) == (3, 0.5, [8, 8, 8, 8, 8])
    with pytest.raises(ConfigError, match="nothere.yaml: config file not found"):
        load_config(tmp_path / "nothere.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.epochs"])


def test_phases_inherit_and_rename():
    config = build_config(
        {
            **MINIMAL,
            "train": {"epochs": 5},
            "phases": [
                {"name": "teacher", "overrides": {"method_settings": {"input": "optical"}}},
                {"name": "student", "overrides": {"train": {"epochs": 2}}, "inputs": {"init": "teacher"}},
            ],
        }
    )
    teacher = phase_config(config, config.phases[0])
    student = phase_config(config, config.phases[1])
    assert teacher.name == "t/teacher" and teacher.method_settings.input == "optical" and teacher.train.epochs == 5
    assert student.train.epochs == 2 and student.method_settings.input == "sar"


def test_fingerprint_ignores_epochs_but_not_the_model():
    a = build_config({**MINIMAL, "train": {"epochs": 2}})
    b = build_config({**MINIMAL, "train": {"epochs": 9}, "scaling": {"num_workers": 2}})
    c = build_config({**MINIMAL, "model": {"arch": "fpn"}})
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_every_shipped_experiment_config_builds():
    """Stale keys in a shipped config (a renamed setting) fail here, not on a user's cluster."""
    repo = Path(__file__).resolve().parents[1]
    configs = [p for p in sorted((repo / "experiments").rglob("*.yaml")) if "sweep" not in p.stem and "sweeps" not in p.parts and p.stem != "base"]
    assert len(configs) > 10
    for path in configs:
        config = load_config(path)
        assert config.name and (config.phases or config.method)


def test_a_global_batch_is_split_over_the_workers_and_must_divide():
    from xmodal.data.prepared import DataSettings

    glob = DataSettings(batch_size=32, batch_scope="global")
    assert [glob.worker_batch_size(n) for n in (1, 2, 4)] == [32, 16, 8]
    assert glob.describe_batch(2) == "batch 32 (global: 16 per worker x 2)"
    per_worker = DataSettings(batch_size=8)
    assert [per_worker.worker_batch_size(n) for n in (1, 4)] == [8, 8] and per_worker.describe_batch(4) == "batch 8 per worker"
    config = build_config({"name": "x", "method": "supervised", "data": {"batch_size": 32, "batch_scope": "global"}, "scaling": {"num_workers": 4}})
    assert config.data.worker_batch_size(config.scaling.num_workers) == 8
    with pytest.raises(ConfigError, match="data.batch_size=32 with data.batch_scope=global does not divide over 3 workers"):
        build_config({"name": "x", "method": "supervised", "data": {"batch_size": 32, "batch_scope": "global"}, "scaling": {"num_workers": 3}})
    with pytest.raises(ConfigError, match="batch_scope='run'"):
        build_config({"name": "x", "method": "supervised", "data": {"batch_scope": "run"}})
