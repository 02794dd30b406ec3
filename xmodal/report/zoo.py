"""The pretext zoo's report (a sweep with ``sweep.report: zoo``): every arm under one protocol.

Written beside the generic sweep report (``SWEEP_DIR/report/``):

* ``zoo.md``: per downstream task, one table of arm x encoder (frozen / finetuned) against the
  labelled share, each cell the task's test metric as mean +- standard error over seeds (n); the
  best arm at every share (and whether its lead exceeds the spread); the compute each arm's
  pretraining used.
* ``zoo.csv``: the same cells, one row each, with every seed's value.
* ``zoo_label_efficiency.png``: per task, the test metric against the labelled share, one curve
  per arm (finetuned solid, frozen dashed), mean +- s.e. over seeds.

The test metric of a task is the test counterpart of the metric its downstream runs selected
checkpoints by (``run.json``'s ``metric``: ``val/iou`` for a binary layer such as buildings,
``val/miou`` for land cover). An arm's compute is the wall time of the runs its downstream phase
reads, followed back through their own inputs (kd: teacher + reconstruction; swd: EO stage +
transfer; an arm whose downstream reads nothing, such as random init, used none), per seed, with
the CPU and GPU hours those runs held (wall time x their workers' CPUs / GPUs).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmodal.engine.chain import upstream_phases
from xmodal.engine.config import phase_configs
from xmodal.engine.results import RUN_FILE
from xmodal.report.stats import mean_and_error
from xmodal.settings import get_dotted
from xmodal.tune.spec import SweepSpec, ZooKeys, final_config, split_phase_key, zoo_keys

NO_ENCODER_KEY = "-"


@dataclass
class PretrainingCost:
    """The compute of the runs one downstream trial read (one arm, one seed).

    Attributes:
        phases: The phases it read, directly or through their inputs, in chain order.
        runs: Their run names (``shared/<phase>-<hash>``).
        wall_seconds: Their summed wall time.
        cpu_hours, gpu_hours: Wall time x the CPUs / GPUs their workers held.
    """

    phases: list[str]
    runs: list[str]
    wall_seconds: float
    cpu_hours: float
    gpu_hours: float


def _run_summary(results_dir: Path) -> dict[str, Any]:
    """A run's ``run.json`` (empty when the run left none)."""
    path = results_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def pretraining_cost(spec: SweepSpec, trial: dict[str, Any]) -> PretrainingCost | None:
    """What the pretraining of one finished trial cost (``None`` without its run records)."""
    final = trial.get("final") or {}
    if not final.get("phase_runs") or not final.get("results_dir"):
        return None
    names = json.loads(final["phase_runs"])
    results_root = Path(final["results_dir"]).parent
    config = spec.build_trial(trial["params"], trial["seed"], "zoo")
    runs = phase_configs(config)
    cost = PretrainingCost(phases=[], runs=[], wall_seconds=0.0, cpu_hours=0.0, gpu_hours=0.0)
    for phase in upstream_phases(runs, config.phases[-1].name, read=True):
        name = names.get(phase)
        wall = _run_summary(results_root / name).get("wall_seconds") if name else None
        if not isinstance(wall, (int, float)):
            return None
        scaling = runs[phase].scaling
        cost.phases.append(phase)
        cost.runs.append(name)
        cost.wall_seconds += wall
        cost.cpu_hours += wall * scaling.num_workers * scaling.cpus_per_worker / 3600
        cost.gpu_hours += wall * scaling.num_workers * (1 if scaling.use_gpu else 0) / 3600
    return cost


def trial_test_metric(trial: dict[str, Any]) -> tuple[str, float] | None:
    """The test counterpart of the metric the trial's last run selected by, and its value."""
    final = trial.get("final") or {}
    selected = _run_summary(Path(final["results_dir"])).get("metric") if final.get("results_dir") else None
    name = str(selected).replace("val/", "test/", 1) if selected else next((m for m in ("test/iou", "test/miou") if m in final), None)
    value = final.get(name) if name else None
    if not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return name, float(value)


def _choice_name(spec: SweepSpec, trial: dict[str, Any], key: str) -> Any:
    """A trial's choice of ``key``, or, where the key is not swept for it (random init: no frozen
    variant), the name of the choice its configuration equals."""
    if key in trial["params"]:
        return trial["params"][key]
    value = get_dotted(final_config(spec.build_trial(trial["params"], trial["seed"], "zoo")).to_plain(), split_phase_key(key)[1])
    return next((name for name, choice in spec.parameter(key).choices.items() if choice == value), value)


def zoo_cells(spec: SweepSpec, trials: list[dict[str, Any]], keys: ZooKeys) -> list[dict[str, Any]]:
    """Finished trials grouped by arm, encoder, task and share: mean +- s.e. of the test metric over seeds."""
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for trial in trials:
        measured = trial_test_metric(trial) if trial["state"] == "TERMINATED" else None
        if measured is None:
            continue
        params = trial["params"]
        encoder = _choice_name(spec, trial, keys.encoder) if keys.encoder else NO_ENCODER_KEY
        key = (params[keys.arm], encoder, params[keys.task], params[keys.share])
        cell = cells.setdefault(key, {"arm": key[0], "encoder": key[1], "task": key[2], "share": key[3], "metric": measured[0], "values": [], "seeds": []})
        cell["values"].append(measured[1])
        cell["seeds"].append(trial["seed"])
    for cell in cells.values():
        cell["mean"], cell["std"], cell["se"] = mean_and_error(cell["values"])
        cell["n"] = len(cell["values"])
    return list(cells.values())


def arm_costs(spec: SweepSpec, trials: list[dict[str, Any]], keys: ZooKeys) -> dict[str, dict[str, Any]]:
    """Per arm: the pretraining cost of each seed (runs shared by several trials counted once)."""
    per_arm: dict[str, dict[Any, PretrainingCost]] = {}
    for trial in trials:
        if trial["state"] != "TERMINATED":
            continue
        seeds = per_arm.setdefault(trial["params"][keys.arm], {})
        if trial["seed"] not in seeds:
            cost = pretraining_cost(spec, trial)
            if cost is not None:
                seeds[trial["seed"]] = cost
    out = {}
    for arm, seeds in per_arm.items():
        costs = list(seeds.values())
        if costs:
            out[arm] = {
                "seeds": len(costs),
                "wall_seconds": sum(c.wall_seconds for c in costs) / len(costs),
                "cpu_hours": sum(c.cpu_hours for c in costs) / len(costs),
                "gpu_hours": sum(c.gpu_hours for c in costs) / len(costs),
                "phases": costs[0].phases,
            }
    return out


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    return f"{cell['mean']:.3f} +- {cell['se']:.3f} ({cell['n']})" if cell["n"] > 1 else f"{cell['mean']:.3f} (1)"


def _share_text(share: Any) -> str:
    return f"{100 * share:g} %" if isinstance(share, (int, float)) else str(share)


def best_per_share(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and share: the best cell, the runner-up, and whether the lead exceeds both spreads."""
    out = []
    for task, share in sorted({(c["task"], c["share"]) for c in cells}, key=lambda ts: (str(ts[0]), float(ts[1]))):
        ranked = sorted((c for c in cells if c["task"] == task and c["share"] == share), key=lambda c: c["mean"], reverse=True)
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        clear = second is not None and best["n"] > 1 and second["n"] > 1 and best["mean"] - best["se"] > second["mean"] + second["se"]
        out.append({"task": task, "share": share, "best": best, "second": second, "clear": clear})
    return out


def _order(spec: SweepSpec, key: str, present: set[Any]) -> list[Any]:
    try:
        names = list(spec.parameter(key).choices)
    except KeyError:
        names = []
    return [n for n in names if n in present] + sorted((n for n in present if n not in names), key=str)


def render_zoo_report(spec: SweepSpec, trials: list[dict[str, Any]], out_dir: Path, plt: Any) -> list[Path]:
    """Write ``zoo.md``, ``zoo.csv`` and ``zoo_label_efficiency.png`` into ``out_dir``.

    Returns:
        The files written (none when no trial has finished yet).
    """
    keys = zoo_keys(spec)
    cells = zoo_cells(spec, trials, keys)
    if not cells:
        return []
    costs = arm_costs(spec, trials, keys)
    arms = _order(spec, keys.arm, {c["arm"] for c in cells})
    encoders = _order(spec, keys.encoder, {c["encoder"] for c in cells}) if keys.encoder else [NO_ENCODER_KEY]
    tasks = _order(spec, keys.task, {c["task"] for c in cells})
    shares = sorted({c["share"] for c in cells}, key=float)
    by_key = {(c["arm"], c["encoder"], c["task"], c["share"]): c for c in cells}

    csv_path = out_dir / "zoo.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arm", "encoder", "task", "share", "metric", "n", "mean", "se", "std", "seeds", "values"])
        for c in sorted(cells, key=lambda c: (arms.index(c["arm"]), str(c["encoder"]), str(c["task"]), float(c["share"]))):
            writer.writerow([c["arm"], c["encoder"], c["task"], c["share"], c["metric"], c["n"], f"{c['mean']:.4f}", f"{c['se']:.4f}",
                             f"{c['std']:.4f}", json.dumps(c["seeds"]), json.dumps([round(v, 4) for v in c["values"]])])

    seeds = sorted({s for c in cells for s in c["seeds"]}, key=str)
    lines = [f"# Pretext zoo `{spec.name}`", ""]
    lines.append(
        f"{len(arms)} arms x {len(tasks)} tasks x {len(shares)} label shares x {len(encoders)} encoder setting(s), "
        f"seeds {seeds}; {sum(c['n'] for c in cells)} finished downstream trials of "
        f"{sum(1 for t in trials if keys.arm in t['params'])}. Cells: the task's test metric, mean +- s.e. (n seeds)."
    )
    lines.append("")
    for task in tasks:
        metric = next(c["metric"] for c in cells if c["task"] == task)
        lines += [f"## {task} (`{metric}`)", "", "| arm | encoder | " + " | ".join(_share_text(s) for s in shares) + " |", "|---|---|" + "---|" * len(shares)]
        for arm in arms:
            for encoder in encoders:
                row = [by_key.get((arm, encoder, task, share)) for share in shares]
                if any(row):
                    lines.append(f"| {arm} | {_encoder_text(encoder)} | " + " | ".join(_cell_text(c) for c in row) + " |")
        lines.append("")
    # Arms whose downstream reads no pretraining (random init) are the floor every pretraining must beat.
    floors = [arm for arm in arms if arm in costs and not costs[arm]["phases"]]
    lines += ["## Best arm per task and label share", ""]
    for entry in best_per_share(cells):
        best, second = entry["best"], entry["second"]
        versus = f"; next {second['arm']} ({_encoder_text(second['encoder'])}) {_cell_text(second)}" if second else ""
        for floor in floors:
            cell = max((c for c in cells if (c["arm"], c["task"], c["share"]) == (floor, entry["task"], entry["share"])), key=lambda c: c["mean"], default=None)
            if cell is not None and cell is not best and cell is not second:
                versus += f"; no pretraining ({floor}) {_cell_text(cell)}"
        verdict = (" - lead beyond both s.e." if entry["clear"] else " - within the spread" if best["n"] > 1 else " - one seed: no spread to judge by")
        lines.append(f"- {entry['task']} @ {_share_text(entry['share'])}: **{best['arm']}** ({_encoder_text(best['encoder'])}) {_cell_text(best)}{versus}{verdict}")
    lines += ["", "## Pretraining compute (per seed)", "", "| arm | runs read | wall s | CPU-h | GPU-h |", "|---|---|---|---|---|"]
    for arm in arms:
        cost = costs.get(arm)
        if cost is None:
            lines.append(f"| {arm} | (no run records) | | | |")
        else:
            lines.append(f"| {arm} | {', '.join(cost['phases']) or 'none'} | {cost['wall_seconds']:.0f} | {cost['cpu_hours']:.3f} | {cost['gpu_hours']:.3f} |")
    figure = _label_efficiency(plt, cells, arms, encoders, tasks, out_dir)
    lines += ["", f"![label efficiency]({figure.name})", ""]
    md_path = out_dir / "zoo.md"
    md_path.write_text("\n".join(lines))
    return [md_path, csv_path, figure]


def _encoder_text(encoder: Any) -> str:
    return {NO_ENCODER_KEY: "-"}.get(encoder, str(encoder))


def _label_efficiency(plt: Any, cells: list[dict[str, Any]], arms: list[Any], encoders: list[Any], tasks: list[Any], out_dir: Path) -> Path:
    """Per task: test metric against the labelled share, an arm per colour, frozen dashed."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    styles = {encoder: ("-", "o") if index == 0 else ("--", "s") for index, encoder in enumerate(encoders)}
    for axis, task in zip(axes[0], tasks):
        for index, arm in enumerate(arms):
            for encoder in encoders:
                line = sorted((c for c in cells if c["task"] == task and c["arm"] == arm and c["encoder"] == encoder), key=lambda c: float(c["share"]))
                if not line:
                    continue
                style, marker = styles[encoder]
                label = arm if encoder == NO_ENCODER_KEY else f"{arm} ({encoder})"
                axis.errorbar([100 * float(c["share"]) for c in line], [c["mean"] for c in line], yerr=[c["se"] for c in line],
                              color=colours(index % 10), linestyle=style, marker=marker, capsize=3, label=label)
        axis.set_xscale("log")
        axis.set_xlabel("labelled training tiles (%)")
        axis.set_ylabel(next(c["metric"] for c in cells if c["task"] == task))
        axis.set_title(f"SAR {task}: label efficiency (mean +- s.e.)", fontsize=10)
        axis.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "zoo_label_efficiency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
