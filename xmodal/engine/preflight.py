"""Checks a run passes in the driver before Ray starts (no Ray here).

A Ray run that is refused inside a worker costs a worker-group start (tens of seconds) and, with
the real message buried in a Ray traceback, tells the user little. :func:`preflight` finds in a
second or two what would fail there, each as one error naming the key, file or value:

* the storage and results folders can be written (a path under a plain file, no permission);
* the method sets up: its networks build from ``model:`` (architecture, encoder, depth,
  channels) and its input checkpoints load, on the CPU;
* a sample of the data decodes with the pipeline's own decoder (every tile of a small dataset,
  ``data.check_tiles`` evenly spread tiles of a large one), and its tiles are at least
  ``data.tile_size``.

Statistics are checked when they are read (:meth:`~xmodal.data.stats.DatasetStats.check_values`),
and the config's own values when it is parsed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from xmodal.data.manifest import spread
from xmodal.data.prepared import PreparedData, padding_share
from xmodal.engine.config import ExperimentConfig
from xmodal.engine.results import results_dir
from xmodal.engine.setup import build_method
from xmodal.engine.storage import check_reachable, is_remote
from xmodal.errors import ConfigError, XmodalError
from xmodal.methods.base import DataSpec, MethodContext


def check_writable(location: str | Path, key: str) -> None:
    """Create the local folder ``location`` and check it takes a file (a URI: its bucket exists and can be listed).

    Raises:
        ConfigError: Naming ``key`` and the path that is in the way, or the missing permission.
    """
    if is_remote(location):
        check_reachable(str(location), key)
        return
    folder = Path(location).expanduser().resolve()
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}={str(location)!r}: {parent} is a file, not a folder; expected a folder xmodal can write")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".xmodal-write-check-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}={str(location)!r}: cannot write in {folder} ({exc.strerror or exc}); expected a folder xmodal can write") from None


def sample_records(prepared: PreparedData, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The records the pre-flight decodes (each split's, evenly spread) and how many there are in all."""
    records = [record for split in ("train", "val", "test") for record in prepared.records(split)]
    unique = list({record["index"]: record for record in records}.values())
    return spread(unique, limit), len(unique)


def check_decodes(prepared: PreparedData) -> tuple[int, int]:
    """Decode ``data.check_tiles`` tiles as the pipeline does; check their size against ``data.tile_size``.

    Returns:
        Tiles decoded, tiles in the run's splits.

    Raises:
        DataError: A tile does not decode (the reader names its file and what is wrong).
        ConfigError: ``data.tile_size`` is larger than every sampled tile, without ``data.allow_padding``.
    """
    records, total = sample_records(prepared, prepared.settings.check_tiles)
    decoder = prepared.decoder()
    largest = 0
    for record in records:
        sample = decoder(record)
        largest = max(largest, min(sample["sar"].shape[-2:]))
    wanted = prepared.settings.tile_size
    if records and largest < wanted and not prepared.settings.allow_padding:
        raise ConfigError(
            f"data.tile_size={wanted} is larger than every decoded tile of {prepared.info.name!r} (at most {largest} px); "
            f"expected <= {largest}, or data.allow_padding: true to pad them with no-data ({padding_share(largest, wanted):.0%} of each tile)"
        )
    return len(records), total


def check_method_sets_up(config: ExperimentConfig, spec: DataSpec, inputs: dict[str, Path], steps_per_epoch: int) -> None:
    """Set the method up on the CPU as a worker would: networks built, inputs read, optimisers made.

    Raises:
        ConfigError: The method cannot set up with these settings, naming the ``model:`` settings
            when the error is not one of xmodal's own (which name their key already).
    """
    method = build_method(config, spec)
    context = MethodContext(device=torch.device("cpu"), steps_per_epoch=steps_per_epoch, epochs=config.train.epochs, inputs=inputs, log=lambda line: None)
    try:
        method.setup(context)
    except XmodalError:
        raise
    except Exception as exc:  # a library's error: say which settings it came from
        model = config.model
        raise ConfigError(
            f"method {config.method!r} cannot set up with model.arch={model.arch!r}, model.encoder={model.encoder!r}, "
            f"model.encoder_depth={model.encoder_depth!r}, model.decoder_channels={model.decoder_channels!r} on "
            f"{spec.sar_channels} SAR / {spec.optical_channels} optical channels: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from exc


def preflight(
    config: ExperimentConfig,
    prepared: PreparedData,
    spec: DataSpec,
    *,
    inputs: dict[str, str] | None = None,
    steps_per_epoch: int = 1,
    set_up: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Every check of this module, before any worker starts (see the module docstring).

    Args:
        inputs: The run's input checkpoints by name; set-up reads the local ones (with a remote
            one, set-up is left to the workers).
        steps_per_epoch: Optimiser steps per epoch (schedules are built at set-up).
        set_up: Set the method up (the plain engine, which sets it up next anyway, skips it).
        log: Where the one-line summary goes.
    """
    check_writable(config.run.storage, "run.storage")
    check_writable(results_dir(config), "run.results" if config.run.results else "run.storage")
    started = time.perf_counter()
    decoded, total = check_decodes(prepared)
    done = ["every tile decoded" if decoded == total else f"{decoded} of {total} tiles decoded (evenly spread, data.check_tiles)"]
    local = {name: Path(location) for name, location in (inputs or {}).items() if not is_remote(location)}
    if set_up and len(local) == len(inputs or {}):
        check_method_sets_up(config, spec, local, steps_per_epoch)
        done.append("method set up on the CPU")
    log(f"[{config.name}] pre-flight: {', '.join(done)} ({time.perf_counter() - started:.1f} s)")

