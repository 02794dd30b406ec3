"""Every CLI command end to end (in-process through ``main``, and the console script once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from specs import small_segmentation_run

from xmodal.cli.main import build_parser, main


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "xmodal.cli.main", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout and "bench" in done.stdout


def test_data_commands(tmp_path: Path, capsys):
    world = tmp_path / "world"
    code, out, _ = run(["data", "synth", str(world), "--regions", "3", "--scenes-per-region", "3", "--tile-size", "32", "--seed", "5"], capsys)
    assert code == 0 and "wrote 9 scenes" in out and (world / "stats.json").is_file()
    code, out, _ = run(["data", "inspect", str(world)], capsys)
    assert code == 0 and "xmodal" in out
    code, out, _ = run(["data", "split", str(world), "--by", "blocks", "--block-size", "100000", "--test-fraction", "0.3"], capsys)
    assert code == 0 and "split" in out
    code, out, _ = run(["data", "stats", str(world)], capsys)
    assert code == 0 and "VV" in out and "B08" in out
    code, out, _ = run(["data", "pack", str(world), "--out", str(tmp_path / "packed")], capsys)
    assert code == 0 and "packed 9 tiles" in out
    code, out, _ = run(["data", "inspect", str(tmp_path / "packed"), "--json"], capsys)
    assert code == 0 and json.loads(out)["reader"] == "packed"


def test_index_a_real_layout(tmp_path: Path, capsys):
    from fixtures.sen12ms import make_sen12ms

    root = make_sen12ms(tmp_path / "sen12ms")
    code, out, _ = run(["data", "index", str(root), "--out", str(tmp_path / "prepared")], capsys)
    assert code == 0 and "sen12ms:" in out and (tmp_path / "prepared" / "manifest.parquet").is_file()


def test_inspect_takes_the_reader_options_of_index(tmp_path: Path, capsys):
    from fixtures.spacenet6 import make_spacenet6

    root = str(make_spacenet6(tmp_path / "sn6"))
    code, out, err = run(["data", "inspect", root, "--reader", "spacenet6", "--option", "optical_product=PS-RGB", "--max-tiles", "2", "--json"], capsys)
    report = json.loads(out) if code == 0 else {}
    assert code == 0 and report["extra"]["optical_product"] == "PS-RGB" and len(report["modalities"]["optical"]["bands"]) == 3, err
    code, _, err = run(["data", "inspect", root, "--option", "optical=PS-RGB"], capsys)
    assert code == 2 and "unknown index option(s) ['optical']" in err
    code, _, err = run(["data", "inspect", root, "--reader", "nope"], capsys)
    assert code == 2 and "reader 'nope' is not a known reader" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("name: x\nmethod: supervised\ntrain:\n  epohcs: 3\n", "unknown key 'train.epohcs'; did you mean 'train.epochs'"),
        ("name: x\nmethod: supervised\ndata:\n  batch_size: big\n", "data.batch_size: expected an integer"),
        ("name: x\nmethod: teleport\n", "unknown method 'teleport'"),
        ("name: x\nmethod: supervised\ndata:\n  root: /nowhere/at/all\n", "data.root /nowhere/at/all: not found"),
    ],
)
def test_bad_configs_fail_cleanly(tmp_path: Path, capsys, content: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, _, err = run(["run", str(path)], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_one_command_trains_and_the_old_name_says_which(tmp_path: Path, capsys):
    code, _, err = run(["train", str(tmp_path / "x.yaml")], capsys)
    assert code == 2 and "`xmodal train` is now `xmodal run`" in err
    assert "train" not in build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_missing_config_and_corrupt_data(tmp_path: Path, capsys):
    code, _, err = run(["run", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "none.yaml: config file not found" in err
    code, _, err = run(["data", "stats", str(tmp_path)], capsys)
    assert code == 2 and "dataset.json" in err


@pytest.mark.ray
def test_demo_quick(tmp_path: Path, capfd, monkeypatch):
    monkeypatch.setenv("XMODAL_PROGRESS", "1")  # as on a terminal: epoch bars (on stderr)
    code, out, err = run(["demo", "--out", str(tmp_path / "demo"), "--quick"], capfd)
    assert code == 0
    # The console holds, per run, its header, pre-flight, one line per epoch and its result; no Ray internals.
    for name in ("optical-buildings", "sar-buildings"):
        mine = [line for line in out.splitlines() if line.startswith(f"[{name}]")]
        assert [line.split()[1] for line in mine[-6:]] == ["supervised", "data", "1", "pre-flight:", "epoch", "done"], out
        assert sum("epoch 1/1" in line for line in out.splitlines()) == 2
        log = (tmp_path / "demo" / "runs" / name / "console.log").read_text()
        assert "Reporting training result" in log and "epoch 1/1" in log  # Ray's chatter is kept, in the run's log file
    for chatter in ("Reporting training result", "Checkpoint successfully created", "execution finished", "Traceback", "WARNING"):
        assert chatter not in out + err, chatter
    assert "[optical-buildings] epoch 1/1" in err  # the bar's description
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [r["input"] for r in summary["runs"]] == ["optical", "sar"]
    assert all("test/iou" in r["metrics"] for r in summary["runs"])
    assert "optical - SAR test IoU" in out and "sar-buildings" in out
    assert (tmp_path / "demo" / "runs" / "sar-buildings" / "panels_test.png").is_file()


@pytest.mark.ray
def test_bench_commands_print_their_ratios(tmp_path: Path, capsys):
    code, out, _ = run(["bench", "data", "--tiles", "16", "--epochs", "2", "--json"], capsys)
    figures = json.loads(out)
    assert code == 0 and figures["ray_data_cached"]["ratio_vs_dataloader"] > 0 and figures["raw_decode_tiles_per_s"] > 0
    # The DataLoader is measured like the Ray paths: its workers' CPU and the peak memory.
    loader = figures["dataloader"]
    workers = [row for row in loader["cpu_per_process"] if row["process"] == "DataLoader worker"]
    assert workers and workers[0]["count"] == figures["cores"] and workers[0]["cpu_s"] > 0
    assert loader["cpu_ms_per_tile"] > 0 and loader["peak_memory_mib"] > 0
    code, out, _ = run(["bench", "train", "--tiles", "16", "--epochs", "2", "--json"], capsys)
    figures = json.loads(out)  # the runs' epoch lines went to stderr: stdout is the JSON alone
    assert code == 0 and figures["plain_step_s"] > 0 and figures["ray_train_step_s"] > 0
    from xmodal.bench import format_figures

    text = format_figures(figures)
    assert "ratio" in text and "ms/step" in text


def test_train_plain_runs_a_chain_without_ray(tiny_world: Path, tmp_path: Path, capsys):
    """`xmodal run CONFIG --plain`: a two-phase chain in this process; `--phase` reruns one phase
    from the other's finished run."""
    import yaml

    config = tmp_path / "chain.yaml"
    config.write_text(yaml.safe_dump({
        **small_segmentation_run("cli-chain", str(tiny_world), str(tmp_path / "runs")),
        "phases": [{"name": "optical"}, {"name": "sar", "inputs": {"start": "optical"}, "overrides": {"method_settings": {"input": "sar", "init": "start"}}}],
    }))
    code, out, err = run(["run", str(config), "--plain"], capsys)
    assert code == 0, err
    assert "[cli-chain/optical] done in" in out and "[cli-chain/sar] done in" in out and "test iou" in out
    code, out, err = run(["run", str(config), "run.panels=1", "--plain", "--phase", "sar"], capsys)
    assert code == 0 and "cli-chain/optical" not in out and "[cli-chain/sar] done in" in out, err
    code, _, err = run(["run", str(config), "--plain", "--phase", "nope"], capsys)
    assert code == 2 and "--phase ['nope']: not phases" in err
