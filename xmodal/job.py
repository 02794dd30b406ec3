"""Entry point for ``ray job submit``: ``python -m xmodal.job sweep|report ...``.

The same commands as ``xmodal sweep`` / ``xmodal report``, runnable from a job's uploaded
working directory without the ``xmodal`` console script being installed on the cluster::

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m xmodal.job sweep experiments/baselines/sweep-lr.yaml sweep.storage=s3://bucket/sweeps
"""

from __future__ import annotations

import argparse
import sys

from xmodal.errors import XmodalError


def build_parser() -> argparse.ArgumentParser:
    from xmodal.engine.sweep_cli import add_report_arguments, add_sweep_arguments, cmd_report, cmd_sweep

    parser = argparse.ArgumentParser(prog="python -m xmodal.job", description="xmodal sweeps as Ray jobs")
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="run or resume a sweep (Ray Tune + Optuna)")
    add_sweep_arguments(sweep)
    sweep.set_defaults(func=cmd_sweep)
    report = commands.add_parser("report", help="tables and figures of a sweep folder")
    add_report_arguments(report)
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except XmodalError as exc:
        print(f"xmodal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xmodal: interrupted; relaunch with --resume to continue the sweep", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
