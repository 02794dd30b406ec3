"""The README's worked example of a new method passes the contract test, and its chain config builds."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from xmodal.engine.config import build_config
from xmodal.methods.registry import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"


def example_blocks() -> tuple[str, str]:
    section = README.read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    config = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert python and config, "the README's 'Adding a method' section lost its example"
    return python[0], config[0]


@pytest.fixture
def readme_method():
    code, _ = example_blocks()
    name = "xmodal.methods.sar_simclr.method"  # as if it lived in its own package
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(code, str(README), "exec"), module.__dict__)
        yield METHODS["sar_simclr"]
    finally:
        METHODS.pop("sar_simclr", None)
        del sys.modules[name]


def test_the_worked_example_passes_the_method_contract(readme_method, tmp_path: Path):
    from methods import test_contract as contract

    contract.test_declarations_are_consistent("sar_simclr")
    contract.test_step_evaluate_state_and_exports("sar_simclr", tmp_path)
    _, config = example_blocks()
    built = build_config(yaml.safe_load(config))
    assert [p.name for p in built.phases] == ["pretrain", "finetune"]
