"""``xmodal report SWEEP_DIR``: what a sweep found, as files a user can open.

Reads only the sweep folder (Tune's per-trial ``params.json``/``result.json``/``error.txt``,
its experiment state and the sweep's ``sweep.json``), so it works on a finished, interrupted or
still-running sweep, offline, without Ray. Writes into ``SWEEP_DIR/report/``:

* ``trials.csv`` and ``report.md``: one row per trial (swept values, seed, state, metrics,
  epochs, time, error); the best configuration; mean +- standard error (and n) over seeds per
  configuration, for the ranking metric and its test counterpart.
* ``best.yaml``: the best trial's full experiment config (``xmodal run best.yaml`` reruns it).
* ``metric_vs_<key>.png``: for every swept parameter, the ranking metric and its test counterpart
  against it, one series per combination of the other parameters, mean +- s.e. over seeds with
  each trial's value behind.
* ``learning_curves.png``: the metric (and training loss) per epoch of every trial.
* ``artifact_<name>.png``: a histogram artifact the runs saved (e.g. matching errors), one curve per
  configuration, summed over its seeds.
* ``zoo.md``, ``zoo.csv``, ``zoo_label_efficiency.png``: with ``sweep.report: zoo``, the pretext
  zoo's report (:mod:`xmodal.report.zoo`).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xmodal.engine.storage import join, upload
from xmodal.errors import ConfigError
from xmodal.report.stats import mean_and_error
from xmodal.tune.spec import FINAL_KEY, RERUN_FILE, RUN_FILE, SPEC_FILE, SweepSpec, split_trial_config

REPORT_DIR = "report"
# Tune trial states shown as they are; trials with neither a final report nor an error were
# stopped early (ASHA) when the sweep finished, or are unfinished when it was interrupted.
DONE_STATES = ("TERMINATED", "STOPPED", "ERROR")


# ----------------------------------------------------------------------------- reading


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written while we read
    return rows


def _experiment_states(folder: Path) -> dict[str, str]:
    """Trial id -> Tune status, from the newest ``experiment_state-*.json``."""
    files = sorted(folder.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    statuses: dict[str, str] = {}
    for entry in state.get("trial_data", []):
        try:
            trial = json.loads(entry[0]) if isinstance(entry, (list, tuple)) else entry
            if isinstance(trial, str):
                trial = json.loads(trial)
            statuses[str(trial["trial_id"])] = str(trial["status"])
        except (KeyError, TypeError, json.JSONDecodeError):
            continue
    return statuses


def fetch_sweep_folder(uri: str, dest: str | Path) -> Path:
    """Copy what a report reads from a remote sweep folder (``s3://``, ``gs://``, ``file://``):
    ``sweep.json``, Tune's experiment state and each trial's params/results/errors; never the
    ``runs/`` checkpoints.

    Returns:
        The local copy.
    """
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri.rstrip("/"))
    dest = Path(dest)
    wanted = {"params.json", "result.json", "error.txt", SPEC_FILE, RUN_FILE}
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"{uri}: cannot list the sweep folder ({exc})") from exc
    for info in infos:
        relative = info.path[len(root):].lstrip("/")
        top = relative.split("/", 1)[0]
        name = relative.rsplit("/", 1)[-1]
        if info.type != pyarrow.fs.FileType.File or top in ("runs", "results", REPORT_DIR):
            continue
        if name in wanted or (name.startswith(("experiment_state-", "result-before-")) and name.endswith(".json")):
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as handle:
                target.write_bytes(handle.read())
    return dest


def load_spec(folder: str | Path) -> SweepSpec | None:
    """The sweep's validated spec, from ``sweep.json`` (``None`` if absent)."""
    path = Path(folder) / SPEC_FILE
    return SweepSpec.from_plain(json.loads(path.read_text())) if path.is_file() else None


def load_trials(folder: str | Path) -> list[dict[str, Any]]:
    """Every trial of a sweep folder.

    Returns:
        One dict per trial: ``trial_id``, ``params`` (swept values), ``seed``, ``state``,
        ``error``, ``epochs`` (per-epoch rows), ``final`` (last row: test metrics when the
        trial finished), ``metrics`` (the latest value of every metric), ``busy``
        (time intervals the trial ran), ``start``/``end``, ``failures``.
    """
    if "://" in str(folder):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="xmodal-sweep-") as scratch:
            return load_trials(fetch_sweep_folder(str(folder), scratch))
    folder = Path(folder)
    spec = load_spec(folder)
    keys = [p.key for p in spec.parameters] if spec else []
    seeds = spec.seeds if spec else [None]
    statuses = _experiment_states(folder)
    trials = []
    for params_file in sorted(folder.glob("*/params.json")):
        trial_dir = params_file.parent
        tune_config = json.loads(params_file.read_text())
        # result-before-*.json: what a trial reported before the sweep was interrupted and resumed.
        rows = []
        for part in sorted(trial_dir.glob("result-before-*.json")) + [trial_dir / "result.json"]:
            rows += [r for r in _read_rows(part) if r not in rows]
        trial_id = str(rows[0]["trial_id"]) if rows else trial_dir.name.removeprefix("trial-")
        params, seed = split_trial_config(tune_config, keys, seeds) if spec else (tune_config, None)
        epochs = [r for r in rows if not r.get(FINAL_KEY)]
        final = next((r for r in reversed(rows) if r.get(FINAL_KEY)), None)
        metrics: dict[str, Any] = {}
        for row in rows:
            metrics.update({k: v for k, v in row.items() if "/" in k and k != FINAL_KEY and isinstance(v, (int, float))})
        error_file = trial_dir / "error.txt"
        error_text = error_file.read_text().strip() if error_file.is_file() else ""
        failures = len(re.findall(r"^Failure # \d+", error_text, flags=re.M)) or (1 if error_text else 0)
        status = statuses.get(trial_id)
        if final is not None:
            state = "TERMINATED"
        elif status == "ERROR" or (error_text and status is None):
            state = "ERROR"
        elif status in ("RUNNING", "PENDING", "PAUSED"):
            state = status
        else:
            state = "STOPPED"  # ended without its final report: stopped early by ASHA
        busy = _busy_intervals(rows)
        trials.append(
            {
                "trial_id": trial_id,
                "dir": str(trial_dir),
                "params": params,
                "seed": seed,
                "state": state,
                "error": _last_error_line(error_text) if state == "ERROR" else None,
                "failures": failures,
                "epochs": epochs,
                "final": final,
                "metrics": metrics,
                "busy": busy,
                "start": min((s for s, _ in busy), default=None),
                "end": max((e for _, e in busy), default=None),
            }
        )
    return trials


def _last_error_line(text: str) -> str:
    """The last error of a trial's ``error.txt``; xmodal's own errors without their class path."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Failure #")]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b", line) or "Error:" in line:
            return re.sub(r"^xmodal\.[\w.]*Error: ", "", line)[:300]
    return lines[-1][:300] if lines else "failed"


def _busy_intervals(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """When a trial was running: each report covers the time since the previous one."""
    spans = []
    for row in rows:
        end = row.get("timestamp")
        length = row.get("time_this_iter_s")
        if isinstance(end, (int, float)) and isinstance(length, (int, float)):
            spans.append((float(end) - float(length), float(end)))
    return _union(spans)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# ----------------------------------------------------------------------------- figures of merit


def utilisation(trials: list[dict[str, Any]], slots: int, window: tuple[float, float] | None = None) -> dict[str, float]:
    """Throughput of a sweep over a time window.

    Args:
        trials: :func:`load_trials`.
        slots: ``max_concurrent_trials``.
        window: (start, end) Unix times; default: first trial start to last trial end.

    Returns:
        ``wall_seconds``, ``trials_ended`` (in the window), ``trials_per_hour``,
        ``busy_seconds`` (sum of trial running time in the window) and ``busy_share``
        (busy_seconds / (slots x wall_seconds)).
    """
    if window is None:
        starts = [t["start"] for t in trials if t["start"] is not None]
        ends = [t["end"] for t in trials if t["end"] is not None]
        if not starts:
            return {"wall_seconds": 0.0, "trials_ended": 0, "trials_per_hour": 0.0, "busy_seconds": 0.0, "busy_share": 0.0}
        window = (min(starts), max(ends))
    begin, finish = window
    wall = max(finish - begin, 1e-9)
    busy = sum(max(0.0, min(e, finish) - max(s, begin)) for t in trials for s, e in t["busy"])
    ended = sum(1 for t in trials if t["state"] in DONE_STATES and t["end"] is not None and begin <= t["end"] <= finish + 1)
    return {
        "wall_seconds": wall,
        "trials_ended": ended,
        "trials_per_hour": ended * 3600.0 / wall,
        "busy_seconds": busy,
        "busy_share": min(1.0, busy / (max(slots, 1) * wall)),
    }


def final_value(trial: dict[str, Any], metric: str) -> float | None:
    """The metric a trial ended with (what Optuna was told)."""
    for row in ([trial["final"]] if trial["final"] else []) + list(reversed(trial["epochs"])):
        value = row.get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            return float(value)
    return None


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The finished trial with the best final metric."""
    scored = [(final_value(t, metric), t) for t in trials if t["state"] == "TERMINATED"]
    scored = [(v, t) for v, t in scored if v is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda vt: vt[0])[1]


def seed_groups(trials: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Finished trials grouped by configuration: mean, std, standard error and count over seeds,
    of ``metric`` and (``test_*``) of its test counterpart."""
    groups: dict[str, dict[str, Any]] = {}
    test_metric = metric.replace("val/", "test/", 1)
    for trial in trials:
        value = final_value(trial, metric)
        if trial["state"] != "TERMINATED" or value is None:
            continue
        key = json.dumps(trial["params"], sort_keys=True, default=str)
        group = groups.setdefault(key, {"params": trial["params"], "values": [], "seeds": [], "tests": []})
        group["values"].append(value)
        group["seeds"].append(trial["seed"])
        test = (trial["final"] or {}).get(test_metric)
        if isinstance(test, (int, float)) and test_metric != metric:
            group["tests"].append(float(test))
    out = []
    for group in groups.values():
        mean, std, se = mean_and_error(group["values"])
        entry = {**group, "mean": mean, "std": std, "se": se, "n": len(group["values"])}
        if group["tests"]:
            entry["test_mean"], entry["test_std"], entry["test_se"] = mean_and_error(group["tests"])
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- writing


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _table(trials: list[dict[str, Any]], keys: list[str], metric: str) -> tuple[list[str], list[list[Any]]]:
    metric_names = sorted({k for t in trials for k in t["metrics"] if k.startswith(("val/", "test/"))})
    if metric in metric_names:
        metric_names.remove(metric)
    header = ["trial_id", "state", *keys, "seed", metric, *metric_names, "epochs", "seconds", "failures", "error"]
    rows = []
    for t in trials:
        seconds = sum(e - s for s, e in t["busy"])
        rows.append(
            [
                t["trial_id"], t["state"], *[t["params"].get(k) for k in keys], t["seed"], final_value(t, metric),
                *[(t["final"] or {}).get(m, t["metrics"].get(m)) for m in metric_names],
                len(t["epochs"]), round(seconds, 1), t["failures"], t["error"] or "",
            ]
        )
    return header, rows


def _is_log(spec: SweepSpec | None, key: str, values: list[float]) -> bool:
    """Log x axis: log-scaled parameters, and positive values spanning more than a decade."""
    if spec is not None:
        try:
            param = spec.parameter(key)
            if param.type == "loguniform" or (param.type == "int" and param.log):
                return True
        except KeyError:
            pass
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > 10


def render_sweep_report(sweep_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the report of a sweep folder.

    Args:
        sweep_dir: A sweep folder, local or remote (``s3://``, ``gs://``: its small files are
            copied to ``OUT/sweep`` first, checkpoints are not, and the report is uploaded to
            its ``report/`` too).
        out: Output folder (default: ``SWEEP_DIR/report``; for a remote sweep ``sweep-reports/<name>``).

    Returns:
        The files written (``report.md`` first).

    Raises:
        ConfigError: The folder is not a sweep folder or holds no trials yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "://" in str(sweep_dir):
        # A cloud sweep: report from a local copy of its small files (checkpoints stay remote).
        name = str(sweep_dir).rstrip("/").rsplit("/", 1)[-1]
        out = Path(out) if out else Path("sweep-reports") / name
        folder = fetch_sweep_folder(str(sweep_dir), out / "sweep")
        files = render_sweep_report(folder, out)
        for path in files:  # the sweep folder keeps its report, as a local one does (a job's working dir is temporary)
            upload(path, join(str(sweep_dir), REPORT_DIR, Path(path).relative_to(out).as_posix()))
        return files
    folder = Path(sweep_dir)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such sweep folder")
    spec = load_spec(folder)
    trials = load_trials(folder)
    if not trials:
        raise ConfigError(f"{folder}: no trials found (expected trial folders with params.json, as written by xmodal sweep)")
    metric = spec.metric if spec else "val/iou"
    mode = spec.mode if spec else "max"
    keys = [p.key for p in spec.parameters] if spec else sorted({k for t in trials for k in t["params"]})
    out_dir = Path(out) if out else folder / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    header, rows = _table(trials, keys, metric)
    csv_path = out_dir / "trials.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[_fmt(v) for v in row] for row in rows])

    best = best_trial(trials, metric, mode)
    slots, sessions = _sessions(folder, spec)
    usage = session_utilisation(trials, slots, sessions)
    figures = _figures(plt, trials, spec, keys, metric, out_dir)
    zoo_files: list[Path] = []
    if spec is not None and spec.settings.report == "zoo":
        from xmodal.report.zoo import render_zoo_report

        zoo_files = render_zoo_report(spec, trials, out_dir, plt)

    best_yaml = None
    if best is not None and spec is not None:
        raw = spec.experiment_raw(best["params"], best["seed"], f"{spec.name}-best")
        best_yaml = out_dir / "best.yaml"
        best_yaml.write_text(f"# Best trial {best['trial_id']} of sweep {spec.name} ({metric} {final_value(best, metric):.4f})\n" + yaml.safe_dump(raw, sort_keys=False))

    lines = [f"# Sweep `{spec.name if spec else folder.name}`", ""]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    lines.append(f"{len(trials)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + f". Ranked by `{metric}` ({mode}).")
    lines.append(
        f"Wall time {usage['wall_seconds']:.0f} s, {usage['trials_per_hour']:.1f} trials/hour, "
        f"trial slots busy {100 * usage['busy_share']:.0f}% (of {slots} slot(s) x wall time)."
    )
    failed = counts.get("ERROR", 0)
    unfinished = sum(counts.get(state, 0) for state in ("RUNNING", "PENDING", "PAUSED"))
    if failed or unfinished:
        lines.append(
            f"{failed} failed and {unfinished} unfinished trial(s) (errors in the Trials table; an error that would come back "
            "is not retried): once fixed, resume with `xmodal sweep CONFIG --resume`, with the config, overrides and name "
            "the sweep started with; finished trials are kept, the others resume from their last checkpoint."
        )
    lines.append("")
    if zoo_files:
        lines += [f"The pretext zoo's table, label-efficiency curves and compute: [`{zoo_files[0].name}`]({zoo_files[0].name}).", ""]
    if best is not None:
        lines += ["## Best configuration", ""]
        lines.append(f"Trial `{best['trial_id']}`: **{metric} = {final_value(best, metric):.4f}**" + ("" if best["seed"] is None else f" (seed {best['seed']})"))
        lines.append("")
        for key in keys:
            if key in best["params"]:
                value = best["params"][key]
                resolved = spec.parameter(key).value(value) if spec else value
                shown = f"`{value}` = `{json.dumps(resolved)}`" if resolved != value else f"`{_fmt(value)}`"
                lines.append(f"- `{key}`: {shown}")
        tests = {k: v for k, v in (best["final"] or {}).items() if k.startswith("test/") and isinstance(v, (int, float))}
        if tests:
            lines.append("- test: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(tests.items())))
        if best_yaml is not None:
            lines.append(f"\nFull config: [`best.yaml`](best.yaml) (rerun with `xmodal run {best_yaml}`).")
        lines.append("")
    if (folder / RERUN_FILE).is_file():  # sweep.rerun_best: the best configuration again, over new seeds
        rerun = json.loads((folder / RERUN_FILE).read_text())
        lines += ["## Best configuration rerun over seeds", "", f"Seeds {rerun['seeds']} ({rerun['n']} finished):"]
        for name, mean, std in ((rerun["metric"], rerun["mean"], rerun["std"]), (rerun["test_metric"], rerun.get("test_mean"), rerun.get("test_std"))):
            if mean is not None:
                lines.append(f"- {name}: **{mean:.4f} ± {std:.4f}** (mean ± std)")
        lines.append("")
    groups = seed_groups(trials, metric)
    if any(g["n"] > 1 for g in groups):
        test_metric = metric.replace("val/", "test/", 1)
        has_test = any("test_mean" in g for g in groups)
        extra = f" {test_metric} mean +- s.e. |" if has_test else ""
        lines += [
            "## Configurations over seeds (mean +- standard error, n seeds)", "",
            f"| {' | '.join(keys)} | n | {metric} mean +- s.e. |{extra}", "|" + "---|" * (len(keys) + 2 + has_test),
        ]
        for g in sorted(groups, key=lambda g: g["mean"], reverse=mode == "max"):
            test = f" {g['test_mean']:.4f} +- {g['test_se']:.4f} |" if "test_mean" in g else (" |" if has_test else "")
            lines.append(f"| {' | '.join(_fmt(g['params'].get(k)) for k in keys)} | {g['n']} | {g['mean']:.4f} +- {g['se']:.4f} |{test}")
        lines.append("")
    # The Markdown table keeps the ranking metric and its test counterpart; trials.csv has every metric.
    test_metric = metric.replace("val/", "test/")
    shown = [i for i, name in enumerate(header) if not name.startswith(("val/", "test/")) or name in (metric, test_metric)]
    lines += ["## Trials", "", "| " + " | ".join(header[i] for i in shown) + " |", "|" + "---|" * len(shown)]
    for row in sorted(rows, key=lambda r: (r[header.index(metric)] is None, -(r[header.index(metric)] or 0) if mode == "max" else (r[header.index(metric)] or 0))):
        lines.append("| " + " | ".join(_fmt(row[i]).replace("|", "/") for i in shown) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    lines += [
        "",
        "## Look further",
        "",
        f"- TensorBoard (Tune's per-trial curves and each run's own logs): `tensorboard --logdir {folder}`",
    ]
    study = folder / "optuna.db"
    if study.is_file():
        lines.append(f"- Optuna dashboard: `optuna-dashboard sqlite:///{study}` (pip install optuna-dashboard)")
    lines.append(f"- Per-trial run.json, test panels and artifacts: `{folder / 'results'}/trial-<id>/`")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    files += [md_path, csv_path] + ([best_yaml] if best_yaml else []) + figures + zoo_files
    return files


def _sessions(folder: Path, spec: SweepSpec | None) -> tuple[int, list[tuple[float, float]]]:
    """Trial slots and (start, end) of each finished launch of the sweep (``sweep_run.json``)."""
    slots = spec.settings.max_concurrent_trials if spec and isinstance(spec.settings.max_concurrent_trials, int) else 1
    path = folder / RUN_FILE
    if not path.is_file():
        return slots, []
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return slots, []
    sessions = [(float(x["started"]), float(x["ended"])) for x in record.get("sessions", []) if x.get("ended")]
    return int(record.get("max_concurrent_trials", slots)), sessions


def session_utilisation(trials: list[dict[str, Any]], slots: int, sessions: list[tuple[float, float]]) -> dict[str, float]:
    """:func:`utilisation` summed over the launches of a sweep (an interrupted and resumed sweep
    does not count the time nothing ran); over first start to last end without launch records."""
    if not sessions:
        return utilisation(trials, slots)
    parts = [utilisation(trials, slots, window) for window in sessions]
    wall = sum(p["wall_seconds"] for p in parts)
    busy = sum(p["busy_seconds"] for p in parts)
    ended = sum(p["trials_ended"] for p in parts)
    return {
        "wall_seconds": wall,
        "trials_ended": ended,
        "trials_per_hour": ended * 3600.0 / max(wall, 1e-9),
        "busy_seconds": busy,
        "busy_share": min(1.0, busy / (max(slots, 1) * max(wall, 1e-9))),
    }


def _x_positions(spec: SweepSpec | None, key: str, values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numeric x of swept values: the values themselves, or the index of a named choice."""
    if spec is not None:
        try:
            param = spec.parameter(key)
        except KeyError:
            param = None
        if param is not None and param.type == "choice":
            resolved = [param.value(v) for v in values]
            if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in resolved):
                return [float(r) for r in resolved], None
            names = [str(n) for n in param.choices]
            return [float(names.index(str(v))) if str(v) in names else 0.0 for v in values], names
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    names = sorted({str(v) for v in values})
    return [float(names.index(str(v))) for v in values], names


def _series_label(params: dict[str, Any], others: list[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(params.get(k))}" for k in others if k in params)


def _metric_vs_key(plt: Any, trials: list[dict[str, Any]], spec: SweepSpec | None, keys: list[str], key: str, metric: str, out_dir: Path) -> Path | None:
    """The metric (and its test counterpart) against one swept key: a series per combination of
    the other keys, mean +- s.e. over seeds, each trial's value as a dot."""
    done = [t for t in trials if key in t["params"] and t["state"] == "TERMINATED" and final_value(t, metric) is not None]
    others_stopped = [t for t in trials if key in t["params"] and t["state"] != "TERMINATED" and final_value(t, metric) is not None]
    if not done and not others_stopped:
        return None
    test_metric = metric.replace("val/", "test/", 1)
    others = [k for k in keys if k != key]
    xs, names = _x_positions(spec, key, [t["params"][key] for t in done + others_stopped])
    x_of = {id(t): x for t, x in zip(done + others_stopped, xs)}
    panels = [(metric, lambda t: final_value(t, metric))]
    if test_metric != metric and any(isinstance((t["final"] or {}).get(test_metric), (int, float)) for t in done):
        panels.append((test_metric, lambda t: (t["final"] or {}).get(test_metric)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for axis, (name, read) in zip(axes[0], panels):
        series: dict[str, dict[float, list[float]]] = {}
        for t in done:
            value = read(t)
            if isinstance(value, (int, float)):
                series.setdefault(_series_label(t["params"], others), {}).setdefault(x_of[id(t)], []).append(float(value))
        for label, by_x in sorted(series.items()):
            points = sorted(by_x)
            stats = [mean_and_error(by_x[x]) for x in points]
            counts = [len(by_x[x]) for x in points]
            shown = f"{label} " if label else ""
            axis.errorbar(points, [m for m, _, _ in stats], yerr=[e for _, _, e in stats], marker="o", capsize=3,
                          label=f"{shown}(n={min(counts)}{'' if min(counts) == max(counts) else f'-{max(counts)}'})")
            for x in points:
                axis.scatter([x] * len(by_x[x]), by_x[x], s=9, alpha=0.35, c="grey", zorder=0)
        stopped = [(x_of[id(t)], read(t)) for t in others_stopped if isinstance(read(t), (int, float))]
        if stopped:
            axis.scatter(*zip(*stopped), marker="x", c="tab:orange", label="stopped early / failed", alpha=0.8)
        if names is not None:
            axis.set_xticks(range(len(names)), names)
        elif _is_log(spec, key, [x for x in xs]):
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(name)
        axis.set_title(f"{name} against {key.rsplit('.', 1)[-1]} (mean +- s.e.)", fontsize=9)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"metric_vs_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _artifact_figures(plt: Any, trials: list[dict[str, Any]], keys: list[str], out_dir: Path) -> list[Path]:
    """Histogram artifacts of finished trials, one curve per configuration (summed over seeds)."""
    from xmodal.figures import ARTIFACTS_DIR, load_artifacts

    by_name: dict[str, dict[str, list[Any]]] = {}
    for trial in trials:
        folder = (trial["final"] or {}).get("results_dir")
        if trial["state"] != "TERMINATED" or not folder or not (Path(folder) / ARTIFACTS_DIR).is_dir():
            continue
        for name, artifact in load_artifacts(Path(folder) / ARTIFACTS_DIR).items():
            if artifact.kind == "histogram":
                label = _series_label(trial["params"], keys) or trial["trial_id"]
                by_name.setdefault(name, {}).setdefault(label, []).append(artifact)
    files = []
    for name, groups in sorted(by_name.items()):
        fig, axis = plt.subplots(figsize=(6, 3.8))
        for label, artifacts in sorted(groups.items()):
            edges = np.asarray(artifacts[0].data["edges"], dtype=float)
            counts = sum(np.asarray(a.data["counts"], dtype=float) for a in artifacts if len(a.data["counts"]) == len(edges) - 1)
            total = counts.sum()
            axis.stairs(counts / total if total else counts, edges, label=f"{label} (n={len(artifacts)})")
        first = next(iter(groups.values()))[0]
        axis.set_title(first.title or name, fontsize=10)
        axis.set_xlabel(first.xlabel)
        axis.set_ylabel("share")
        axis.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"artifact_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def _figures(plt: Any, trials: list[dict[str, Any]], spec: SweepSpec | None, keys: list[str], metric: str, out_dir: Path) -> list[Path]:
    files = [path for key in keys if (path := _metric_vs_key(plt, trials, spec, keys, key, metric, out_dir)) is not None]
    curves = [t for t in trials if any(metric in r for r in t["epochs"])]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for t in curves:
            rows = [r for r in t["epochs"] if "epoch" in r]
            label = f"{t['trial_id']} " + " ".join(f"{_fmt(v)}" for v in t["params"].values())
            style = "-" if t["state"] == "TERMINATED" else "--"
            xs = [r["epoch"] for r in rows if metric in r]
            axes[0].plot(xs, [r[metric] for r in rows if metric in r], style, marker="o", ms=3, label=label[:40])
            losses = [(r["epoch"], r["train/loss"]) for r in rows if "train/loss" in r]
            if losses:
                axes[1].plot(*zip(*losses), style, marker="o", ms=3)
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel(metric)
        axes[0].set_title("validation metric per epoch (dashed: stopped/failed)")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("train/loss")
        axes[1].set_title("training loss per epoch")
        if len(curves) <= 12:
            axes[0].legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / "learning_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files + _artifact_figures(plt, trials, keys, out_dir)


def find_sweeps(root: str | Path) -> list[Path]:
    """Sweep folders under ``root`` (those holding a ``sweep.json``)."""
    return sorted(Path(p).parent for p in glob.glob(str(Path(root) / "**" / SPEC_FILE), recursive=True))
