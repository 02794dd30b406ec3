"""Which network predicts, and how training fed it: the checkpoint, its segmenter export, its inference record.

``xmodal predict`` takes a run's results folder (``run.json`` names the tested checkpoint) or a
checkpoint folder (``exports/<name>.pt``). The checkpoint's ``inference.json``
(:func:`~xmodal.engine.results.inference_record`, written by both engines) says how the training
data was prepared: bands and units, statistics, ``sar_db``, ``clip_sigma``, tile size, classes. A
checkpoint from before that record existed falls back to the ``stats.json`` of its run's
``data.root``, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from xmodal.data.bands import BandSet
from xmodal.data.manifest import DatasetInfo, read_json
from xmodal.data.prepared import DataSettings, resolve_manifest
from xmodal.data.stats import DatasetStats, load_stats
from xmodal.engine.results import INFERENCE_FILE, RUN_FILE
from xmodal.errors import DataError
from xmodal.methods.exports import EXPORTS_DIR, read_export, rebuild_export

SEGMENTER_BUILDER = "segmenter"
# Among several segmenter exports, the one a single-network method exports.
PREFERRED_EXPORT = "model"
SCENE_MODALITIES = ("sar", "optical")


@dataclass(frozen=True)
class InferenceRecord:
    """How the training data of a checkpoint was prepared (see :func:`~xmodal.engine.results.inference_record`).

    Attributes:
        info: The training dataset's description (bands and units of both modalities, layers,
            ignore value, look direction).
        stats: Per-band statistics of its training split.
        sar_db: SAR intensity bands were converted to dB before normalising.
        clip_sigma: Normalised values were clipped to +- this many standard deviations.
        tile_size: The tiles the model was trained on (the default prediction window).
        mask_layer: The label layer the model predicts.
        class_names: Its classes, in class-index order.
        ignore_index: The label value meaning "unknown".
        source: Where the record came from (a file, or the fallback's ``stats.json``).
    """

    info: DatasetInfo
    stats: DatasetStats
    sar_db: bool
    clip_sigma: float
    tile_size: int
    mask_layer: str | None
    class_names: tuple[str, ...]
    ignore_index: int
    source: str

    def bands(self, modality: str) -> BandSet:
        """The training data's bands (names and stored units) of ``modality``."""
        return self.info.sar_bands if modality == "sar" else self.info.optical_bands

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> InferenceRecord:
        """Parse an ``inference.json``.

        Raises:
            DataError: Naming ``source`` and the missing or malformed field.
        """
        try:
            return cls(
                info=DatasetInfo.from_dict(data["dataset"], source=source),
                stats=DatasetStats.from_dict(data["stats"], source=source),
                sar_db=bool(data["sar_db"]),
                clip_sigma=float(data["clip_sigma"]),
                tile_size=int(data["tile_size"]),
                mask_layer=data.get("mask_layer"),
                class_names=tuple(str(name) for name in data["class_names"]),
                ignore_index=int(data["ignore_index"]),
                source=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: malformed inference record (field {exc}); retrain, or remove it to fall back to the run's data") from None


@dataclass(frozen=True)
class ModelSource:
    """The checkpoint a prediction uses, and the run it came from (when known)."""

    checkpoint: Path
    run_dir: Path | None
    summary: dict[str, Any] | None


def resolve_source(path: str | Path) -> ModelSource:
    """A run's results folder (its ``run.json`` names the tested checkpoint) or a checkpoint folder.

    Raises:
        DataError: Naming the folder, when it is missing, is neither, or the run has no
            checkpoint (not finished, or its checkpoint is not on this machine).
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"{path}: not found; give a run's results folder (with {RUN_FILE}) or a checkpoint folder (with {EXPORTS_DIR}/)")
    if (folder / EXPORTS_DIR).is_dir():
        summary_path = folder.parent / RUN_FILE
        return ModelSource(folder, folder.parent if summary_path.is_file() else None, read_json(summary_path) if summary_path.is_file() else None)
    if (folder / RUN_FILE).is_file():
        summary = read_json(folder / RUN_FILE)
        checkpoint = summary.get("checkpoint")
        if not checkpoint:
            raise DataError(f"{folder / RUN_FILE}: the run has no checkpoint ('checkpoint': {checkpoint!r}); give one of its checkpoint folders")
        if "://" in str(checkpoint):
            raise DataError(f"{folder / RUN_FILE}: its checkpoint {checkpoint} is in remote storage; copy that folder here and give it")
        if not (Path(checkpoint) / EXPORTS_DIR).is_dir():
            raise DataError(f"{folder / RUN_FILE}: its checkpoint {checkpoint} has no {EXPORTS_DIR}/ (moved or deleted?); give a checkpoint folder")
        return ModelSource(Path(checkpoint), folder, summary)
    checkpoints = sorted(p.name for p in folder.glob("checkpoint_*") if (p / EXPORTS_DIR).is_dir())
    hint = f"; its checkpoint folders: {checkpoints}" if checkpoints else ""
    raise DataError(
        f"{folder}: a folder without a checkpoint: no {RUN_FILE} (the run has not finished) and no {EXPORTS_DIR}/; "
        f"give a finished run's results folder or a checkpoint folder{hint}"
    )


def load_record(source: ModelSource, log: Callable[[str], None] = print) -> InferenceRecord:
    """The checkpoint's ``inference.json``, else (older runs) the ``stats.json`` of its run's data.

    Raises:
        DataError: Neither is there (naming where it looked).
    """
    path = source.checkpoint / INFERENCE_FILE
    if path.is_file():
        return InferenceRecord.from_dict(read_json(path), str(path))
    if source.summary is None:
        raise DataError(
            f"{path}: not found (a checkpoint from before runs recorded it), and no {RUN_FILE} beside the checkpoint "
            "names its data; give the run's results folder"
        )
    data_section = source.summary.get("data") or {}
    recorded = ((source.summary.get("fingerprint") or {}).get("data")) or {}
    root = data_section.get("root") or recorded.get("root")
    if not root:
        raise DataError(f"{path}: not found, and the run's {RUN_FILE} names no data.root to read statistics from")
    defaults = DataSettings()
    settings = DataSettings(
        root=str(root),
        prepared_dir=recorded.get("prepared_dir"),
        mask_layer=data_section.get("mask_layer", recorded.get("mask_layer", defaults.mask_layer)),
        tile_size=int(recorded.get("tile_size", defaults.tile_size)),
        sar_db=bool(recorded.get("sar_db", defaults.sar_db)),
        clip_sigma=float(recorded.get("clip_sigma", defaults.clip_sigma)),
        reader_options=dict(recorded.get("reader_options") or {}),
    )
    manifest = resolve_manifest(settings)
    assert manifest.folder is not None
    stats = load_stats(manifest.folder)
    info = manifest.info
    layer = settings.mask_layer
    classes = list(info.layers[layer].classes) if layer in info.layers else list(info.scene_classes)
    log(f"{source.checkpoint}: no {INFERENCE_FILE} (a run from before it was recorded); normalising with {manifest.folder / 'stats.json'} of data.root {root}")
    return InferenceRecord(
        info=info, stats=stats, sar_db=settings.sar_db, clip_sigma=settings.clip_sigma, tile_size=settings.tile_size,
        mask_layer=layer, class_names=tuple(classes), ignore_index=info.ignore_index, source=str(manifest.folder / "stats.json"),
    )


def _exports_of(checkpoint: Path) -> list[str]:
    return sorted(p.stem for p in (checkpoint / EXPORTS_DIR).glob("*.pt"))


def _builder(saved: dict[str, Any]) -> str:
    return str((saved.get("recipe") or {}).get("builder"))


def choose_export(checkpoint: Path, name: str | None = None) -> str:
    """The segmenter export to predict with: ``name``, else the checkpoint's only segmenter (or ``model``).

    Raises:
        DataError: ``name`` is not a segmenter, or the checkpoint has none, or several without
            ``model`` among them (naming them, to choose with ``--export``).
    """
    if name is not None:
        saved = read_export(checkpoint, name)
        if _builder(saved) != SEGMENTER_BUILDER:
            found = [n for n in _exports_of(checkpoint) if _builder(read_export(checkpoint, n)) == SEGMENTER_BUILDER]
            raise DataError(
                f"{checkpoint / EXPORTS_DIR / (name + '.pt')}: export {name!r} is a {_builder(saved)!r} network "
                f"({saved.get('description') or 'no description'}), not a segmenter; segmenter exports here: {found or 'none'}"
            )
        return name
    exports = _exports_of(checkpoint)
    segmenters = [n for n in exports if _builder(read_export(checkpoint, n)) == SEGMENTER_BUILDER]
    if not segmenters:
        raise DataError(f"{checkpoint}: exports {exports or 'nothing'}, none a segmenter (builder {SEGMENTER_BUILDER!r}); predict needs a per-pixel model")
    if len(segmenters) == 1:
        return segmenters[0]
    if PREFERRED_EXPORT in segmenters:
        return PREFERRED_EXPORT
    raise DataError(f"{checkpoint}: several segmenter exports {segmenters}; choose one with --export NAME")


@dataclass(frozen=True)
class SegmenterInfo:
    """What a segmenter export reads and gives: its modality, input channels and classes."""

    name: str
    modality: str
    in_channels: int
    head_channels: int
    description: str

    @property
    def num_classes(self) -> int:
        """Classes of its class map (a one-channel sigmoid head is binary: 2)."""
        return 2 if self.head_channels == 1 else self.head_channels


def describe_segmenter(checkpoint: Path, name: str, record: InferenceRecord) -> SegmenterInfo:
    """Check that export ``name`` reads one modality of the training data and predicts its classes.

    Raises:
        DataError: It reads both modalities (a scene is one raster), or its channels or classes
            differ from the record's.
    """
    saved = read_export(checkpoint, name)
    kwargs = (saved.get("recipe") or {}).get("kwargs") or {}
    where = checkpoint / EXPORTS_DIR / f"{name}.pt"
    modality = str(saved.get("modality"))
    if modality not in SCENE_MODALITIES:
        raise DataError(f"{where}: export {name!r} reads {modality!r}; a scene prediction feeds one modality ({' or '.join(SCENE_MODALITIES)})")
    info = SegmenterInfo(name, modality, int(kwargs.get("in_channels", 0)), int(kwargs.get("classes", 0)), str(saved.get("description") or ""))
    bands = record.bands(modality)
    if info.in_channels != len(bands):
        raise DataError(f"{where}: reads {info.in_channels} channel(s), the training data's {modality} has {len(bands)} bands {bands.names} ({record.source})")
    if info.num_classes != len(record.class_names):
        raise DataError(
            f"{where}: predicts {info.num_classes} classes, the training data's mask layer {record.mask_layer!r} has "
            f"{len(record.class_names)} {list(record.class_names)} ({record.source})"
        )
    return info


def load_segmenter(checkpoint: str | Path, name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The export rebuilt from its recipe with its weights, in eval mode on ``device``."""
    network, _ = rebuild_export(checkpoint, name)
    return network.to(device).eval()


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """B x K x H x W class probabilities from a segmenter's logits.

    A one-channel head is binary with a sigmoid (``[1 - p, p]``), as
    :func:`~xmodal.losses.predict_classes` reads it (``logit > 0``); more channels take a softmax,
    whose argmax is ``predict_classes``' argmax over the logits. So the argmax of these
    probabilities is the class map training scored.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        foreground = torch.sigmoid(logits[:, 0])
        return torch.stack([1.0 - foreground, foreground], dim=1)
    return logits.softmax(dim=1)
