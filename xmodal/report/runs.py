"""Run-directory reports: every ``run.json`` under a folder, laid out as its methods' paper tables.

``xmodal report RUN_DIR`` calls :func:`render_run_report`. The report knows no method's table: a
method declares its tables on its class (``Method.paper_tables``) and the report finds them through
the method registry, by the ``method`` names recorded in the runs' ``run.json``:

* each table is a dict holding the layout and the paper's numbers::

      {
          "key": "kd-table2",                      # identifies the table (one table per key)
          "title": "...",
          "metric": "test/iou",                    # key in a run's "metrics"
          "scale": 100.0,                          # ours x scale = the paper's unit (IoU in %)
          "rows": [{"key": "sar", "label": "SAR", "match": {...}}, ...],
          "columns": [{"key": "unet-vgg19", "label": "UNet VGG19", "match": {...}}, ...],
          "paper": {row_key: {column_key: number or None}},
          "paper_mean_column": True,               # optional: a last column with the paper's row
                                                   # mean, a reference for models it did not run
          "notes": ["..."],
      }

* where each run goes: the classmethod ``report_cell(table, run, runs) -> (row_key, column_key) | None``
  of the method class that owns the table; when it returns ``None``, the ``match`` rules of rows and
  columns decide (``{dotted key in the run: value, list of values, or glob pattern}``; the key ``phase``
  is the last part of the run name). A run may land in a row or column the paper does not have
  (another encoder, a label fraction): it is appended, with no paper number.

Several runs in one cell (seeds, relaunches under another name) are averaged: the cell shows the
mean +- standard error and n. Runs no table claims are listed below the tables, each with the
metrics its method names (``metric``, ``report_metrics`` in ``run.json``), and the artifacts runs
saved are linked.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from xmodal.engine.plain import LAST_DIR
from xmodal.engine.results import FAILED_FILE, RESUME_HINT, SNAPSHOT_FILE, read_snapshot
from xmodal.engine.training import METRICS_FILE
from xmodal.errors import ConfigError
from xmodal.report.stats import mean_and_error
from xmodal.settings import get_dotted

SUMMARY_FILE = "run.json"
LEGACY_SUMMARY_FILE = "metrics.json"
REPORT_MARKDOWN = "report.md"
REPORT_CSV = "report.csv"
PAPER_MEAN = "paper-mean"
CSV_FIELDS = ("table", "row", "row_label", "column", "column_label", "ours", "paper", "delta", "n_runs", "runs")

Classifier = Callable[[dict[str, Any], list[dict[str, Any]]], "tuple[str, str] | None"]


@dataclass
class ReportFiles:
    """What :func:`render_run_report` wrote.

    Attributes:
        markdown: Path of ``report.md``.
        csv: Path of ``report.csv`` (one line per table cell, then one per unclaimed run).
        text: The Markdown text (what is printed).
        runs: Number of runs found.
    """

    markdown: Path
    csv: Path
    text: str
    runs: int


@dataclass
class TableCell:
    """One cell: our runs (averaged) beside the paper's number."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    ours: float | None = None
    error: float = 0.0
    paper: float | None = None
    paper_detail: str = ""  # e.g. "5 of 7" for a paper mean over fewer models than the table has


@dataclass
class FilledTable:
    """A method's paper table with our runs placed in it."""

    spec: dict[str, Any]
    rows: list[dict[str, Any]]
    columns: list[dict[str, Any]]
    cells: dict[tuple[str, str], TableCell]
    notes: list[str] = field(default_factory=list)  # about the runs placed (the spec's notes are about the paper)


# ---------------------------------------------------------------------------------------------- runs


def collect_runs(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every run summary (``run.json`` written at the end of a run) under ``run_dir``, sorted by name.

    Only files with the run-summary keys (``name``, ``method``, ``metrics``) count; summaries written
    before runs named them ``run.json`` (``metrics.json`` beside a run's panels) are read too, which
    leaves out the per-checkpoint ``metrics.json`` files. Each summary gets ``results_dir`` (its
    folder) and ``phase`` (the last part of its name).

    Raises:
        ConfigError: ``run_dir`` is not a folder.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"report: run folder {str(root)!r} does not exist")
    runs = []
    found = {p.parent: p for p in root.rglob(LEGACY_SUMMARY_FILE)} | {p.parent: p for p in root.rglob(SUMMARY_FILE)}
    for path in sorted(found.values()):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file being written, or not ours
        if not isinstance(summary, dict) or not {"name", "method", "metrics"} <= set(summary):
            continue
        summary["results_dir"] = str(path.parent)
        summary["phase"] = str(summary["name"]).rpartition("/")[2]
        runs.append(summary)
    return sorted(runs, key=lambda run: str(run["name"]))


def _checkpoint_epoch(folder: Path) -> int | None:
    """The epoch of a run folder's latest checkpoint: Ray's record of it, or the plain loop's ``checkpoint_last``."""
    _, latest = read_snapshot(folder)
    if latest is not None:
        return latest
    try:
        epoch = json.loads((folder / LAST_DIR / METRICS_FILE).read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def collect_unfinished(run_dir: str | Path) -> list[dict[str, Any]]:
    """Runs under ``run_dir`` without a summary: ``failed`` ones (``failed.json``: the error) and
    ``unfinished`` ones (checkpoints but no ``run.json``: stopped or still running), each with the
    epoch of its latest checkpoint, sorted by name."""
    root = Path(run_dir)
    found: dict[Path, dict[str, Any]] = {}
    for path in root.rglob(FAILED_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[path.parent] = {"name": str(record.get("name")), "state": "failed", "error": record.get("error")}
    for path in [*root.rglob(SNAPSHOT_FILE), *root.rglob(LAST_DIR)]:
        folder = path.parent
        if (folder / SUMMARY_FILE).is_file() and folder not in found:
            continue
        name = str(folder.relative_to(root)) if folder != root else root.name
        found.setdefault(folder, {"name": name, "state": "unfinished", "error": None})
    for folder, entry in found.items():
        entry["epoch"] = _checkpoint_epoch(folder)
    return sorted(found.values(), key=lambda entry: entry["name"])


def unfinished_markdown(entries: list[dict[str, Any]]) -> str:
    """The failed and unfinished runs, and how to resume them."""
    lines = [[e["name"], e["state"], "none" if e["epoch"] is None else f"epoch {e['epoch']}", (e["error"] or "").replace("|", "/")] for e in entries]
    return (
        "## Failed and unfinished runs\n\n" + _markdown_table(["run", "state", "last checkpoint", "error"], lines)
        + f"\n\nTo resume one, {RESUME_HINT}; fix the error first where there is one."
    )


def metric_value(run: dict[str, Any], metric: str) -> float | None:
    """A run's metric (``"test/iou"``), or None when it is missing or not a finite number."""
    value = (run.get("metrics") or {}).get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# ---------------------------------------------------------------------------------------------- tables


def method_tables() -> Callable[[str], list[tuple[dict[str, Any], Classifier | None]]]:
    """A lookup: method name -> [(table spec, classifier)] for each table the method declares."""
    from xmodal.methods.registry import get_method

    cache: dict[str, list[tuple[dict[str, Any], Classifier | None]]] = {}

    def lookup(name: str) -> list[tuple[dict[str, Any], Classifier | None]]:
        if name not in cache:
            try:
                cls = get_method(name)
            except ConfigError:
                cache[name] = []  # a method this installation does not have: list its runs only
                return cache[name]
            cache[name] = [(table, _classifier(cls, table)) for table in cls.paper_tables]
        return cache[name]

    return lookup


class _MethodClassifier:
    """Places runs in one of a method's tables (``Method.report_cell``, else the table's ``match``
    rules) and gives the notes the placed runs call for (``Method.report_notes``)."""

    def __init__(self, cls: Any, table: dict[str, Any]) -> None:
        self.cls, self.table = cls, table

    def __call__(self, run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
        return self.cls.report_cell(self.table, run, runs) or match_cell(self.table, run)

    def notes(self, placed: list[dict[str, Any]]) -> list[str]:
        return list(self.cls.report_notes(self.table, placed))


def _classifier(cls: Any, table: dict[str, Any]) -> Classifier:
    return _MethodClassifier(cls, table)


def _matches(run: dict[str, Any], rules: dict[str, Any] | None) -> bool:
    if not rules:
        return False
    for key, wanted in rules.items():
        value = get_dotted(run, key)
        options = wanted if isinstance(wanted, list) else [wanted]
        if not any(
            (isinstance(option, str) and isinstance(value, str) and fnmatch.fnmatchcase(value, option)) or value == option
            for option in options
        ):
            return False
    return True


def match_cell(spec: dict[str, Any], run: dict[str, Any]) -> tuple[str, str] | None:
    """(row, column) from the ``match`` rules of a table spec, or None."""
    row = next((r["key"] for r in spec.get("rows", []) if _matches(run, r.get("match"))), None)
    column = next((c["key"] for c in spec.get("columns", []) if _matches(run, c.get("match"))), None)
    return (row, column) if row is not None and column is not None else None


def fill_table(spec: dict[str, Any], classifier: Classifier | None, runs: list[dict[str, Any]]) -> tuple[FilledTable, set[int]]:
    """Place runs in a table; returns the table and the indices of the runs it claimed."""
    rows = [dict(r) for r in spec.get("rows", [])]
    columns = [dict(c) for c in spec.get("columns", [])]
    paper = spec.get("paper", {})
    cells: dict[tuple[str, str], TableCell] = {}
    claimed: set[int] = set()
    for index, run in enumerate(runs):
        place = classifier(run, runs) if classifier is not None else match_cell(spec, run)
        if place is None:
            continue
        row, column = place
        if row not in {r["key"] for r in rows}:
            rows.append({"key": row, "label": _extra_label(row, rows)})
        if column not in {c["key"] for c in columns}:
            columns.append({"key": column, "label": column})
        cells.setdefault((row, column), TableCell()).runs.append(run)
        claimed.add(index)
    metric, scale = spec.get("metric", "test/iou"), float(spec.get("scale", 1.0))
    if spec.get("paper_mean_column"):
        paper_columns = [c["key"] for c in spec.get("columns", [])]
        columns.append({"key": PAPER_MEAN, "label": "Paper mean"})
        paper = {row: dict(values) for row, values in paper.items()}
        counts = {}
        for row, values in paper.items():
            numbers = [values[c] for c in paper_columns if isinstance(values.get(c), (int, float))]
            values[PAPER_MEAN] = sum(numbers) / len(numbers) if numbers else None
            counts[row] = len(numbers)
    for row in rows:
        for column in columns:
            cell = cells.setdefault((row["key"], column["key"]), TableCell())
            values = [v * scale for v in (metric_value(run, metric) for run in cell.runs) if v is not None]
            if values:
                cell.ours, _, cell.error = mean_and_error(values)
            cell.paper = (paper.get(row["key"]) or {}).get(column["key"])
            if column["key"] == PAPER_MEAN and cell.paper is not None and counts[row["key"]] < len(paper_columns):
                cell.paper_detail = f"{counts[row['key']]} of {len(paper_columns)}"
    notes_of = getattr(classifier, "notes", None)
    notes = notes_of([runs[index] for index in sorted(claimed)]) if notes_of is not None and claimed else []
    return FilledTable(spec, rows, columns, cells, notes), claimed


def _extra_label(row: str, rows: list[dict[str, Any]]) -> str:
    """Label of a row the paper does not have, e.g. ``int/ft_a@0.05`` -> ``Int+Ft-A (5 % labels)``,
    ``sar@n32`` -> ``SAR (32 labelled tiles)``."""
    base, _, share = row.partition("@")
    label = next((r["label"] for r in rows if r["key"] == base), base)
    if share.startswith("n") and share[1:].isdigit():
        label += f" ({share[1:]} labelled tiles)"
    elif share:
        try:
            label += f" ({float(share) * 100:g} % labels)"
        except ValueError:
            label += f" ({share})"
    return label


# ---------------------------------------------------------------------------------------------- rendering


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _cell_text(cell: TableCell) -> str:
    ours = _number(cell.ours) or ("n/a" if cell.runs else "-")
    spread = f" +- {cell.error:.2f} (n={len(cell.runs)})" if len(cell.runs) > 1 and cell.ours is not None else ""
    paper = (_number(cell.paper) + (f" ({cell.paper_detail})" if cell.paper_detail else "")) if cell.paper is not None else "-"
    return f"{ours}{spread} / {paper}"


def _markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines]
    return "\n".join(out)


def table_markdown(table: FilledTable) -> str:
    """One table as Markdown: rows x columns, each cell ``ours / paper``."""
    spec = table.spec
    used_rows = [r for r in table.rows if any(table.cells[(r["key"], c["key"])].runs for c in table.columns) or r["key"] in spec.get("paper", {})]
    header = [""] + [c["label"] for c in table.columns]
    lines = [[r["label"]] + [_cell_text(table.cells[(r["key"], c["key"])]) for c in table.columns] for r in used_rows]
    parts = [f"## {spec.get('title', spec.get('key', 'table'))}", "", f"Each cell: ours / paper ({spec.get('metric', 'test/iou')} x {spec.get('scale', 1.0):g}; '-' = none).", ""]
    parts.append(_markdown_table(header, lines))
    notes = [*(spec.get("notes") or []), *table.notes]
    if notes:
        parts += [""] + [f"- {note}" for note in notes]
    return "\n".join(parts)


def _labels_text(run: dict[str, Any]) -> str:
    data = run.get("data") or {}
    labels = data.get("labels") or {}
    # "of N": the run also trained on N - labelled tiles whose labels it did not see.
    of = f" of {data['train_tiles']}" if (data.get("train_tiles") or 0) > (data.get("labelled_tiles") or 0) else ""
    if labels.get("count") is not None:
        return f"{labels['count']}{of} tiles"
    fraction = labels.get("fraction", data.get("label_fraction"))
    if fraction is None:
        return ""
    if fraction >= 1:
        return "all"
    return f"{fraction:g} ({data['labelled_tiles']}{of} tiles)" if data.get("labelled_tiles") else f"{fraction:g}"


def runs_markdown(runs: list[dict[str, Any]], title: str = "All runs") -> str:
    """Every run with the metrics its method names: the selection metric on validation (and
    whether it used labels), the report metrics on test, the tested epoch, wall time, artifacts."""
    header = ["run", "method", "model", "labels", "selected by (val)", "test metrics", "tested epoch", "wall s"]
    lines = []
    for run in runs:
        model = run.get("model") or {}
        selected = str(run.get("metric") or "")
        value = metric_value(run, selected) if selected else None
        free = " (label-free)" if run.get("metric_labelled") is False else ""
        names = run.get("report_metrics") or sorted(k for k in (run.get("metrics") or {}) if k.startswith("test/"))[:3]
        tests = ", ".join(f"{name.split('/', 1)[1]} {metric_value(run, name):.3f}" for name in names if metric_value(run, name) is not None)
        lines.append(
            [
                str(run.get("name")),
                str(run.get("method")),
                f"{model.get('arch')} {model.get('encoder')}",
                _labels_text(run),
                f"{selected.split('/', 1)[-1]} {value:.3f}{free}" if value is not None else selected,
                tests,
                str(run.get("tested_epoch", "")),
                str(run.get("wall_seconds", "")),
            ]
        )
    out = f"## {title}\n\n" + _markdown_table(header, lines)
    figures = [(run, name) for run in runs for name in run.get("artifacts") or []]
    if figures:
        out += "\n\nArtifacts:\n\n" + "\n".join(
            f"- `{run['name']}` {name}: {Path(run['results_dir']) / 'artifacts' / (name + '.png')}" for run, name in figures
        )
    return out


def _csv_lines(tables: list[FilledTable], others: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = []
    for table in tables:
        for row in table.rows:
            for column in table.columns:
                cell = table.cells[(row["key"], column["key"])]
                if not cell.runs and cell.paper is None:
                    continue
                lines.append(
                    {
                        "table": table.spec.get("key", table.spec.get("title", "")),
                        "row": row["key"],
                        "row_label": row["label"],
                        "column": column["key"],
                        "column_label": column["label"],
                        "ours": _number(cell.ours),
                        "paper": _number(cell.paper),
                        "delta": _number(cell.ours - cell.paper) if cell.ours is not None and cell.paper is not None else "",
                        "n_runs": len(cell.runs),
                        "runs": ";".join(str(run.get("name")) for run in cell.runs),
                    }
                )
    for run in others:
        model = run.get("model") or {}
        headline = (run.get("report_metrics") or ["test/iou"])[0]
        value = metric_value(run, headline)
        lines.append(
            {
                "table": "other",
                "row": run.get("name"),
                "row_label": run.get("method"),
                "column": f"{model.get('arch')}:{model.get('encoder')}",
                "column_label": f"{headline} (unscaled)",
                "ours": "" if value is None else f"{value:.4f}",
                "paper": "",
                "delta": "",
                "n_runs": 1,
                "runs": run.get("name"),
            }
        )
    return lines


def build_report(runs: list[dict[str, Any]], lookup: Callable[[str], list[tuple[dict[str, Any], Classifier | None]]] | None = None) -> tuple[list[FilledTable], list[dict[str, Any]]]:
    """The tables the runs' methods declare that at least one run lands in, filled, and the runs no
    table claimed."""
    lookup = lookup or method_tables()
    declared: dict[str, tuple[dict[str, Any], Classifier | None]] = {}
    for run in runs:
        for spec, classifier in lookup(str(run.get("method"))):
            declared.setdefault(str(spec.get("key", spec.get("title"))), (spec, classifier))
    tables, claimed = [], set()
    for spec, classifier in declared.values():
        table, taken = fill_table(spec, classifier, runs)
        if taken:  # a table no run lands in would only repeat the paper
            tables.append(table)
        claimed |= taken
    return tables, [run for index, run in enumerate(runs) if index not in claimed]


def render_run_report(run_dir: str | Path, out_dir: str | Path | None = None, *, echo: bool = True) -> ReportFiles:
    """Write ``report.md`` and ``report.csv`` for every run under ``run_dir`` (and print the Markdown).

    Args:
        run_dir: A run storage folder (e.g. ``runs/kd`` or ``runs/kd/kd-demo``); searched recursively.
        out_dir: Where to write the two files (default: ``run_dir``).
        echo: Print the Markdown to stdout.

    Raises:
        ConfigError: ``run_dir`` does not exist or holds no run summary.
    """
    runs = collect_runs(run_dir)
    unfinished = collect_unfinished(run_dir)
    if not runs and not unfinished:
        raise ConfigError(f"report: no run summaries ({SUMMARY_FILE} written at the end of a run) under {run_dir}")
    tables, others = build_report(runs)
    counted = f"{len(runs)} finished run(s)" + (f", {len(unfinished)} failed or unfinished" if unfinished else "")
    sections = [f"# Report of {run_dir}", "", f"{counted}."]
    if unfinished:
        sections += ["", unfinished_markdown(unfinished) + "\n"]
    sections += ["", *[table_markdown(table) + "\n" for table in tables]]
    if others and tables:
        sections += ["", runs_markdown(others, "Runs outside the paper tables")]
    if runs:
        sections += ["", runs_markdown(runs)]
    text = "\n".join(sections).rstrip() + "\n"
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown_path, csv_path = out / REPORT_MARKDOWN, out / REPORT_CSV
    markdown_path.write_text(text)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(_csv_lines(tables, others))
    csv_path.write_text(buffer.getvalue())
    if echo:
        print(text, end="")
    return ReportFiles(markdown=markdown_path, csv=csv_path, text=text, runs=len(runs))
