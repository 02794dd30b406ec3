"""``xmodal demo``: a synthetic world, the optical and SAR building baselines, and their gap.

Everything runs on a local Ray (Ray Data streams the tiles into Ray Train workers) and fits in
under 10 minutes on 2 CPU cores. The output folder holds the world, each run's checkpoints,
run.json and evaluation panel, and ``summary.json`` with the table printed at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from xmodal.engine.config import build_config
from xmodal.engine.runner import run_experiment

# Sized for 2 CPU cores: ~150 training scenes of 128 px and a slim U-Net decoder (about 35 %
# cheaper per batch than smp's default on CPU, measured in shared/notes/synthetic-world.md).
# Held-out ground blocks (2 x 2 tiles) in every region, as SpaceNet 6 holds out parts of one city:
# with whole regions held out, each of the few test regions has a style no training region has,
# and the test score measures that region's shift more than the modality.
DEMO_SPLIT = {"by": "blocks", "block_size": 512.0, "val_fraction": 0.15, "test_fraction": 0.2}
DEMO_WORLD = {"seed": 7, "regions": 6, "scenes_per_region": 36, "tile_size": 128, "split": DEMO_SPLIT}
QUICK_WORLD = {"seed": 7, "regions": 3, "scenes_per_region": 8, "tile_size": 64}
DEMO_TRAIN = {"epochs": 10, "lr": 0.002, "optimizer": "adamw", "schedule": "onecycle"}
QUICK_TRAIN = {"epochs": 1, "lr": 0.002, "optimizer": "adamw", "schedule": "onecycle"}
DEMO_MODEL = {"arch": "unet", "encoder": "resnet18", "decoder_channels": [128, 64, 32, 16, 16]}
BASELINES = (("optical-buildings", "optical"), ("sar-buildings", "sar"))


def demo_config(out: Path, name: str, modality: str, quick: bool) -> dict[str, Any]:
    """The plain config of one demo baseline."""
    return {
        "name": name,
        "method": "supervised",
        "method_settings": {"input": modality, "task": "segmentation"},
        "data": {"root": str(out / "data"), "mask_layer": "buildings", "tile_size": QUICK_WORLD["tile_size"] if quick else 128, "batch_size": 4 if quick else 8},
        "world": QUICK_WORLD if quick else DEMO_WORLD,
        "model": DEMO_MODEL,
        "train": QUICK_TRAIN if quick else DEMO_TRAIN,
        "scaling": {"num_workers": 1},
        "run": {"storage": str(out / "runs"), "panels": 4},
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's result table (``epoch``: the best-on-validation epoch, whose weights were tested)."""
    header = f"{'run':20s} {'input':8s} {'test IoU':>9s} {'test F1':>8s} {'val IoU':>8s} {'epoch':>6s} {'wall s':>7s}"
    lines = [header, "-" * len(header)]
    for row in rows:
        metrics = row["metrics"]
        lines.append(
            f"{row['name']:20s} {row['input']:8s} {metrics.get('test/iou', float('nan')):9.3f} "
            f"{metrics.get('test/f1', float('nan')):8.3f} {metrics.get('val/iou', float('nan')):8.3f} {row['tested_epoch']:>6} {row['wall_seconds']:7.0f}"
        )
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False) -> dict[str, Any]:
    """Train both baselines, print the table and write ``out/summary.json``."""
    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, modality in BASELINES:
        config = build_config(demo_config(out, name, modality, quick), source=f"demo:{name}")
        (result,) = run_experiment(config)
        rows.append(
            {
                "name": name,
                "input": modality,
                "metrics": result.metrics,
                "checkpoint": result.checkpoint,
                "results_dir": result.results_dir,
                "tested_epoch": result.summary.get("tested_epoch"),
                "wall_seconds": result.summary.get("wall_seconds"),
            }
        )
    iou = {row["input"]: row["metrics"].get("test/iou") for row in rows}
    summary = {
        "runs": rows,
        "optical_minus_sar_iou": (iou["optical"] - iou["sar"]) if None not in iou.values() else None,
        "world": QUICK_WORLD if quick else DEMO_WORLD,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(format_table(rows))
    print(f"\noptical - SAR test IoU: {summary['optical_minus_sar_iou']:+.3f}   total {summary['wall_seconds']:.0f} s")
    print(f"summary: {out / 'summary.json'}   panels: {out / 'runs'}/<run>/panels_test.png")
    return summary
