"""The ``xmodal`` command.

Every user error (bad config, missing file, corrupt data) is printed as one line naming the
file, field or value and what was expected, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from xmodal.engine.console import LOG_FILE, VERBOSE_ENV
from xmodal.errors import XmodalError


def _key_values(items: list[str]) -> dict[str, Any]:
    from xmodal.engine.config import parse_overrides

    return parse_overrides(items)


# ----------------------------------------------------------------------------- data commands


def cmd_data_synth(args: argparse.Namespace) -> None:
    from xmodal.data.synth import synthesize

    world = _key_values(args.set)
    for key in ("seed", "regions", "scenes_per_region", "tile_size", "optical_bands"):
        value = getattr(args, key)
        if value is not None:
            world[key] = value
    split = {"val_fraction": args.val_fraction, "test_fraction": args.test_fraction, "test_regions": args.test_regions, "seed": args.split_seed}
    manifest = synthesize(args.out, world, split)
    counts = {s: len(manifest.split(s)) for s in ("train", "val", "test")}
    print(f"wrote {len(manifest)} scenes to {args.out}: {counts} (statistics in {args.out}/stats.json)")


def cmd_data_synth_scenes(args: argparse.Namespace) -> None:
    from xmodal.data.synth import synth_scenes

    print(synth_scenes(args.out, seed=args.seed, size=args.size, scenes=args.scenes, pixel_size=args.pixel_size).summary())


def cmd_data_stats(args: argparse.Namespace) -> None:
    from xmodal.data.manifest import Manifest
    from xmodal.data.prepared import write_stats

    manifest = Manifest.load(args.root)
    stats = write_stats(manifest, sar_db=not args.no_sar_db, max_tiles=args.max_tiles)
    print(f"statistics of {stats.tiles} training tiles written to {Path(args.root) / 'stats.json'}")
    for modality in ("sar", "optical"):
        for band in getattr(stats, modality):
            print(f"  {modality:8s} {band.name:8s} {band.unit:18s} mean {band.mean:10.4f}  std {band.std:9.4f}  valid {band.valid_fraction:.3f}")


def cmd_data_split(args: argparse.Namespace) -> None:
    from xmodal.data.manifest import Manifest
    from xmodal.data.splits import SplitSettings

    manifest = Manifest.load(args.root)
    split = SplitSettings(
        by=args.by, block_size=args.block_size, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        test_regions=args.test_regions, val_regions=args.val_regions, seed=args.seed,
    )
    records = split.apply(manifest.records)
    manifest.with_records(records).save(args.root)
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
    print(f"split {args.root} by {args.by}: {counts}; recompute statistics with `xmodal data stats {args.root}`")


def cmd_data_index(args: argparse.Namespace) -> None:
    from xmodal.data.prepared import write_stats
    from xmodal.data.readers import detect_reader, get_reader
    from xmodal.data.splits import check_no_leakage

    reader = get_reader(args.reader) if args.reader else detect_reader(args.root)
    result = reader.index(Path(args.root), **_key_values(args.option))
    check_no_leakage(result.manifest.records)
    result.manifest.save(args.out)
    for skipped in result.skipped:
        print(f"  skipped {skipped.item}: {skipped.reason}")
    counts = {s: len(result.manifest.split(s)) for s in ("train", "val", "test")}
    print(f"{reader.name}: {len(result.manifest)} pairs {counts}, {len(result.skipped)} skipped; manifest in {args.out}")
    if result.manifest.split("train") and not args.no_stats:
        write_stats(result.manifest)
        print(f"statistics written to {Path(args.out) / 'stats.json'}")


def cmd_data_pack(args: argparse.Namespace) -> None:
    from xmodal.data.manifest import Manifest
    from xmodal.data.store import pack

    packed = pack(Manifest.load(args.root), args.out, rows_per_file=args.rows_per_file)
    parts = sorted({r["sar_path"] for r in packed.records})
    print(f"packed {len(packed)} tiles into {len(parts)} Parquet part(s) under {args.out}")


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from xmodal.data.inspect import format_inspection, inspect_dataset

    report = inspect_dataset(args.path, max_tiles=args.max_tiles, reader_name=args.reader, **_key_values(args.option))
    print(json.dumps(report, indent=2, default=str) if args.json else format_inspection(report))


# ----------------------------------------------------------------------------- training


def cmd_run(args: argparse.Namespace) -> None:
    from xmodal.engine.config import load_config

    config = load_config(args.config, args.overrides)
    if args.plain:
        from xmodal.engine.plain import run_plain

        results = run_plain(config, only_phases=args.phase or None, device=args.device)
    else:
        from xmodal.engine.runner import run_experiment

        results = run_experiment(config, only_phases=args.phase or None)
    for result in results:  # each run printed its test metrics as it ended
        print(f"{result.name}: results {result.results_dir}\n  checkpoint: {result.checkpoint}")


def _print_zoo(files: list[Path]) -> None:
    """A zoo's tables on the console (its report files hold them, and the curves)."""
    zoo = next((Path(f) for f in files if Path(f).name == "zoo.md"), None)
    if zoo is not None:
        print("\n" + "\n".join(line for line in zoo.read_text().splitlines() if not line.startswith("![")).strip(), flush=True)


def cmd_sweep(args: argparse.Namespace) -> None:
    from xmodal.report.sweeps import render_sweep_report
    from xmodal.tune.sweep import run_sweep

    result = run_sweep(args.config, args.overrides, resume=args.resume)
    print(result.summary(), flush=True)
    if not args.no_report:
        files = render_sweep_report(result.sweep_dir)
        print(f"  report: {Path(files[0]).parent}", flush=True)
        result.log_report(files)  # run.mlflow: the report and figures on the sweep's MLflow run
        _print_zoo(files)
    if not result.states or set(result.states) == {"ERROR"}:
        raise XmodalError(f"sweep {result.name}: no trial finished; see the errors above and {result.sweep_dir}")


# The zoo's sweeps ship in the repository beside the package (editable installs, cluster working dirs).
ZOO_DIR = Path(__file__).resolve().parents[2] / "experiments" / "zoo"


def cmd_zoo(args: argparse.Namespace) -> None:
    """The pretext zoo: ``experiments/zoo/sweep[-quick].yaml`` swept, then its report."""
    config = Path(args.config) if args.config else ZOO_DIR / ("sweep-quick.yaml" if args.quick else "sweep.yaml")
    if not config.is_file():
        raise XmodalError(f"{config}: the zoo's sweep file is not there (an install without the repository's experiments/); give --config PATH")
    args.config = str(config)
    cmd_sweep(args)


def is_sweep_folder(path: Path) -> bool:
    """A Tune experiment folder written by ``xmodal sweep`` (rather than a folder of runs)."""
    from xmodal.tune.spec import SPEC_FILE

    return (path / SPEC_FILE).is_file() or (path / "tuner.pkl").is_file()


def cmd_report(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if not path.exists() and "://" not in args.path:
        raise XmodalError(f"{path}: not found; give a run folder (run.storage[/name]) or a sweep folder")
    if "://" in args.path or is_sweep_folder(path):
        from xmodal.report.sweeps import render_sweep_report

        files = render_sweep_report(args.path, args.out)
        for written in files:
            print(written)
        _print_zoo(files)
        return
    from xmodal.report.runs import render_run_report

    render_run_report(path, args.out)


def cmd_demo(args: argparse.Namespace) -> None:
    from xmodal.cli.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)


def cmd_predict(args: argparse.Namespace) -> None:
    from xmodal.predict import PredictSettings, predict

    predict(PredictSettings(
        source=args.source, scenes=args.scenes, out=args.out, export=args.export, window=args.window, overlap=args.overlap,
        probabilities=args.probabilities, labels=args.labels or [], label_field=args.label_field,
        bands=args.bands.split(",") if args.bands else None, unit=args.unit, device=args.device, workers=args.workers,
        batch_size=args.batch_size, plain=args.plain,
    ))


def cmd_bench(args: argparse.Namespace) -> None:
    from xmodal import bench

    runner: Callable[..., dict[str, Any]] = {"data": bench.bench_data, "train": bench.bench_train}[args.what]
    from xmodal.bench.data import parse_tile_sizes

    tiles = None if args.tiles is None else parse_tile_sizes(args.tiles)
    if tiles is not None and args.what == "train":
        if len(tiles) > 1:
            raise XmodalError(f"bench train --tiles {args.tiles}: give one size (several sizes are an option of bench data)")
        tiles = tiles[0]
    sizes = {k: v for k, v in (("tiles", tiles), ("epochs", args.epochs), ("device", args.device), ("threads", args.threads)) if v is not None}
    for option in ("device", "threads"):
        if getattr(args, option) is not None and args.what != "train":
            raise XmodalError(f"bench {args.what}: --{option} is an option of bench train only")
    if args.json:
        # Stdout holds the JSON alone (for jq and scripts): the runs' progress lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            figures = runner(data_root=args.data, **sizes)
        print(json.dumps(figures, indent=2))
    else:
        print(bench.format_figures(runner(data_root=args.data, **sizes)))


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmodal", description="Cross-modal optical -> SAR training on Ray")
    parser.add_argument(
        "--verbose", action="store_true",
        help=f"show Ray's own console output too (or set {VERBOSE_ENV}=1); it is always kept in each run's {LOG_FILE}",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make, split, index, pack and inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    synth = data_commands.add_parser("synth", help="generate the synthetic paired SAR/optical world")
    synth.add_argument("out", help="folder to write")
    synth.add_argument("--seed", type=int)
    synth.add_argument("--regions", type=int)
    synth.add_argument("--scenes-per-region", type=int)
    synth.add_argument("--tile-size", type=int)
    synth.add_argument("--optical-bands", choices=["rgbn", "s2"])
    synth.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any other world setting")
    synth.add_argument("--val-fraction", type=float, default=0.15)
    synth.add_argument("--test-fraction", type=float, default=0.2)
    synth.add_argument("--test-regions", nargs="*")
    synth.add_argument("--split-seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    synth_scenes = data_commands.add_parser("synth-scenes", help="whole SAR/optical scenes, GeoJSON labels and scenes.yaml from the synthetic world")
    synth_scenes.add_argument("out", help="folder to write")
    synth_scenes.add_argument("--seed", type=int, help="world seed (default 0)")
    synth_scenes.add_argument("--size", type=int, help="SAR scene side in pixels (default 1024)")
    synth_scenes.add_argument("--scenes", type=int, help="SAR/optical training pairs (default 1)")
    synth_scenes.add_argument("--pixel-size", type=float, help="SAR pixel in metres (default 2, the world's scale; optical twice that)")
    synth_scenes.set_defaults(func=cmd_data_synth_scenes)

    stats = data_commands.add_parser("stats", help="compute per-band statistics of the training split")
    stats.add_argument("root")
    stats.add_argument("--no-sar-db", action="store_true", help="normalise SAR in its stored unit")
    stats.add_argument("--max-tiles", type=int, default=2000)
    stats.set_defaults(func=cmd_data_stats)

    split = data_commands.add_parser("split", help="assign geographic splits (refuses overlapping train/test)")
    split.add_argument("root")
    split.add_argument("--by", choices=["region", "blocks"], default="region")
    split.add_argument("--block-size", type=float)
    split.add_argument("--val-fraction", type=float, default=0.15)
    split.add_argument("--test-fraction", type=float, default=0.2)
    split.add_argument("--test-regions", nargs="*")
    split.add_argument("--val-regions", nargs="*")
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(func=cmd_data_split)

    index = data_commands.add_parser("index", help="index a dataset in its own layout into a manifest")
    index.add_argument("root")
    index.add_argument("--out", required=True)
    index.add_argument("--reader", help="reader name (default: detect)")
    index.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE", help="reader options")
    index.add_argument("--no-stats", action="store_true")
    index.set_defaults(func=cmd_data_index)

    pack_cmd = data_commands.add_parser("pack", help="pack decoded tiles into Parquet parts")
    pack_cmd.add_argument("root")
    pack_cmd.add_argument("--out", required=True)
    pack_cmd.add_argument("--rows-per-file", type=int, default=256)
    pack_cmd.set_defaults(func=cmd_data_pack)

    inspect = data_commands.add_parser("inspect", help="recognise a dataset layout and summarise it")
    inspect.add_argument("path")
    inspect.add_argument("--max-tiles", type=int, default=50)
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--reader", help="reader name (default: detect)")
    inspect.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE", help="reader options, as for data index")
    inspect.set_defaults(func=cmd_data_inspect)

    run = commands.add_parser(
        "run", help="train a config: one run, or its phases in order (on Ray Train; --plain: in this process)",
        description="Train a config on Ray Train (Ray Data streams the tiles), or with --plain in this process. "
        "A config with phases runs them in order; relaunching resumes every run from its last checkpoint.",
    )
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    run.add_argument("--phase", action="append", help="run only this phase (repeatable); the phases it reads must have finished")
    run.add_argument("--plain", action="store_true", help="train in this process without Ray (same methods, chains and results)")
    run.add_argument("--device", default="cpu", help="with --plain: the torch device (cpu, cuda, cuda:1)")
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser("demo", help="synthetic world + optical and SAR baselines on local Ray")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--quick", action="store_true", help="a much smaller world and fewer epochs (smoke test)")
    demo.set_defaults(func=cmd_demo)

    predict = commands.add_parser(
        "predict", help="predict whole scenes with a run's segmenter: georeferenced class maps, previews, scores",
        description="Run a trained segmenter over whole scenes in overlapping, blended windows (Ray Data batch inference), "
        "normalised as its training data was; write <scene>.tif (classes, 255 no-data) in the scene's CRS and transform, "
        "a preview PNG and predict.json.",
    )
    predict.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run's results folder (with run.json) or a checkpoint folder")
    predict.add_argument("scenes", nargs="+", metavar="SCENE", help="raster scenes with the training data's bands and units")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--export", help="segmenter export of the checkpoint (default: its only one, or 'model')")
    predict.add_argument("--window", type=int, help="window size in px (default: the run's tile size)")
    predict.add_argument("--overlap", type=int, help="overlap of neighbouring windows in px (default: a quarter of the window)")
    predict.add_argument("--probabilities", action="store_true", help="also write <scene>_probabilities.tif (float32 per class)")
    predict.add_argument("--labels", nargs="+", metavar="FILE", help="label raster or vector file(s) to score against: one per scene, or one for all")
    predict.add_argument("--label-field", help="attribute of a vector label file holding the class (default: burn 1)")
    predict.add_argument("--bands", help="the scenes' band names when their files do not say, e.g. VV,VH")
    predict.add_argument("--unit", help="the scenes' unit when their files do not say (e.g. dB, linear)")
    predict.add_argument("--device", default="cpu", help="cpu or cuda (each Ray Data actor takes one GPU)")
    predict.add_argument("--workers", type=int, help="predictor actors (default: one per CPU, or per GPU with --device cuda)")
    predict.add_argument("--batch-size", type=int, default=8, help="windows per model call")
    predict.add_argument("--plain", action="store_true", help="predict in this process without Ray")
    predict.set_defaults(func=cmd_predict)

    bench = commands.add_parser("bench", help="print throughput figures")
    bench.add_argument("what", choices=["data", "train"])
    bench.add_argument("--data", help="prepared dataset folder (default: a generated world)")
    bench.add_argument("--tiles", help="tiles per epoch (default: data 256, train 128); data takes a comma list (256,2048,16384) for a scale table")
    bench.add_argument("--epochs", type=int, help="epochs; the first is reported apart (default: data 3, train 5)")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="train only: cuda times a kd reconstruction step fed by Ray Data and reports the GPU's busy share (default: cpu)")
    bench.add_argument("--threads", type=int, help="train only, cpu: intra-op threads of both loops (default: the machine's cores)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    sweep = commands.add_parser("sweep", help="Ray Tune + Optuna sweep of a config's knobs")
    sweep.add_argument("config", help="sweep YAML (an experiment plus a sweep: section)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3 sweep.num_samples=4 name=my-sweep")
    sweep.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    sweep.add_argument("--no-report", action="store_true", help="do not render the report at the end")
    sweep.set_defaults(func=cmd_sweep)

    zoo = commands.add_parser("zoo", help="the pretext zoo: every method's SAR encoder under one downstream protocol")
    zoo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.root=/data/mine world=null sweep.seeds=[0]")
    zoo.add_argument("--quick", action="store_true", help="the demo-size zoo (experiments/zoo/sweep-quick.yaml; < 30 min on 2 CPU cores)")
    zoo.add_argument("--config", help="another zoo sweep file (default: experiments/zoo/sweep.yaml of this repository)")
    zoo.add_argument("--resume", action="store_true", help="continue the interrupted zoo of this name")
    zoo.add_argument("--no-report", action="store_true", help="do not render the report at the end")
    zoo.set_defaults(func=cmd_zoo)

    report = commands.add_parser("report", help="tables and figures of a run folder or a sweep folder")
    report.add_argument("path", help="run folder (e.g. runs/kd-demo) or sweep folder (<sweep.storage>/<name>)")
    report.add_argument("--out", help="where to write the report (default: inside PATH)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        print("xmodal: error: `xmodal train` is now `xmodal run` (the same arguments; one command trains a run or a phase chain)", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    try:
        args.func(args)
    except XmodalError as exc:
        print(f"xmodal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xmodal: interrupted; finished checkpoints are kept, relaunch the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
