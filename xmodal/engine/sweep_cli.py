"""Command-line glue of ``xmodal sweep`` and ``xmodal report`` (light: heavy imports happen in the commands).

Wire into ``xmodal/cli/main.py``::

    from xmodal.engine import sweep_cli
    sweep = commands.add_parser("sweep", help="Ray Tune + Optuna sweep of a config (resumable)")
    sweep_cli.add_sweep_arguments(sweep)
    sweep.set_defaults(func=sweep_cli.cmd_sweep)
    report = commands.add_parser("report", help="tables and figures of a sweep folder")
    sweep_cli.add_report_arguments(report)
    report.set_defaults(func=sweep_cli.cmd_report)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xmodal.errors import XmodalError


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xmodal sweep``."""
    parser.add_argument("config", help="sweep YAML (an experiment plus a sweep: section)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3 sweep.num_samples=4 name=my-sweep")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    parser.add_argument("--no-report", action="store_true", help="do not render the report at the end")


def cmd_sweep(args: argparse.Namespace) -> None:
    """``xmodal sweep``: run the sweep, print its summary, render its report."""
    from xmodal.engine.sweep import run_sweep

    result = run_sweep(args.config, args.overrides, resume=args.resume)
    print(result.summary(), flush=True)
    if not args.no_report:
        from xmodal.engine.sweep_report import render_sweep_report

        files = render_sweep_report(result.sweep_dir)
        print(f"  report: {Path(files[0]).parent}", flush=True)
    if not result.states or set(result.states) == {"ERROR"}:
        raise XmodalError(f"sweep {result.name}: no trial finished; see the errors above and {result.sweep_dir}")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``xmodal report``."""
    parser.add_argument("sweep_dir", help="a sweep folder (<sweep.storage>/<name>)")
    parser.add_argument("--out", help="where to write the report (default: SWEEP_DIR/report)")


def cmd_report(args: argparse.Namespace) -> None:
    """``xmodal report``: tables, best configuration and figures of a sweep."""
    from xmodal.engine.sweep_report import render_sweep_report

    files = render_sweep_report(args.sweep_dir, args.out)
    for path in files:
        print(path)
