"""Sample transforms shared by the Ray Data pipeline and the plain PyTorch loader.

Two stages, so that the expensive one can be cached:

1. :class:`Decoder` reads a manifest record through its reader and converts SAR units (cacheable:
   deterministic, done once per tile);
2. :class:`Preparer` crops or pads to the fixed tile size, applies photometric augmentation per
   modality (speckle-aware for SAR), normalises each band from ``stats.json``, replaces no-data by
   zero (never NaN into a model) and applies one geometric transform identically to every modality
   and label of the sample.

Geometric augmentation respects the radar's look direction by default: a flip across the range
axis or a 90-degree rotation would move the sensor to the other side (layover and shadow would
point the wrong way), so only flips along the flight (azimuth) direction are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.manifest import DatasetInfo
from xmodal.data.readers.base import LoadOptions, get_reader
from xmodal.data.sample import NO_LABEL
from xmodal.data.stats import DatasetStats, convert_sar
from xmodal.data.storage import is_remote
from xmodal.errors import ConfigError, DataError

GEOMETRIC_MODES = ("look_preserving", "d4", "none")
# Intensity units on which multiplicative re-speckling is physically meaningful (after conversion).
_SPECKLE_UNITS = ("dB",)

# Keys of a prepared sample (all numeric so they can become torch tensors).
IMAGE_KEYS = ("sar", "optical")
LABEL_KEYS = ("mask", "noisy_mask")
VALID_KEYS = ("sar_valid", "optical_valid")


@dataclass(frozen=True)
class AugmentSettings:
    """Augmentation settings (all off for evaluation).

    Attributes:
        geometric: ``look_preserving`` (flips along the flight direction only), ``d4`` (all flips
            and 90-degree rotations: only for data without a look direction, or when the model
            should learn both looks), or ``none``.
        photometric: Apply per-modality photometric jitter.
        sar_extra_looks: Re-speckle SAR intensity with Gamma noise of this many looks (larger =
            milder); 0 disables.
        sar_gain_db: Std of a per-sample calibration offset added to SAR dB bands.
        optical_gain: Half-width of the per-sample brightness factor (1 +- gain) and, halved, of
            per-band factors.
    """

    geometric: str = "look_preserving"
    photometric: bool = True
    sar_extra_looks: float = 16.0
    sar_gain_db: float = 0.5
    optical_gain: float = 0.1

    def __post_init__(self) -> None:
        if self.geometric not in GEOMETRIC_MODES:
            raise ConfigError(f"augment.geometric={self.geometric!r}; expected one of {GEOMETRIC_MODES}")
        if self.sar_extra_looks < 0:
            raise ConfigError(f"augment.sar_extra_looks={self.sar_extra_looks}; expected >= 0")


class Decoder:
    """Record -> dict of native-size arrays (SAR converted to the training unit).

    Args:
        info: Dataset description.
        data_root: Folder record paths are relative to.
        options: Which label layers to read.
        sar_db: Convert SAR intensity bands to dB.
        keep_optical_label: Give every sample an ``optical_label`` that the labelled subset never
            withholds (see :func:`withhold_labels`).
    """

    def __init__(
        self, info: DatasetInfo, data_root: str | Path, options: LoadOptions, sar_db: bool, keep_optical_label: bool = False
    ) -> None:
        self.info = info
        self.data_root = data_root if is_remote(data_root) else Path(data_root)  # a URI stays one (Path would fold its //)
        self.options = options
        self.sar_db = sar_db
        self.keep_optical_label = keep_optical_label
        self.reader = get_reader(info.reader)

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        sample = self.reader.load(record, self.info, self.data_root, self.options)
        sar = convert_sar(sample.sar, self.info.sar_bands, self.sar_db)
        finite_sar = np.isfinite(sar).all(axis=0)
        finite_opt = np.isfinite(sample.optical).all(axis=0)
        sar_valid = finite_sar if sample.sar_valid is None else finite_sar & sample.sar_valid
        opt_valid = finite_opt if sample.optical_valid is None else finite_opt & sample.optical_valid
        out = {
            "sar": sar,
            "optical": sample.optical,
            "sar_valid": sar_valid.astype(np.uint8),
            "optical_valid": opt_valid.astype(np.uint8),
            "label": np.int64(sample.label),
            "index": np.int64(record["index"]),
        }
        if sample.mask is not None:
            out["mask"] = sample.mask
        if sample.noisy_mask is not None:
            out["noisy_mask"] = sample.noisy_mask
        out = withhold_labels(out, bool(record.get("labelled", True)), self.info.ignore_index, self.keep_optical_label)
        if self.info.tile_size and sample.shape != (self.info.tile_size, self.info.tile_size):
            # Keep cached blocks fixed-shape: datasets with a nominal tile size pad/crop to it here.
            out = crop_or_pad(out, self.info.tile_size, None, self.info.ignore_index)
        return out


def withhold_labels(
    sample: dict[str, np.ndarray], labelled: bool, ignore_index: int, keep_optical_label: bool = False
) -> dict[str, np.ndarray]:
    """Set the ``labelled`` flag; outside a labelled subset, every label becomes unknown (masks all
    ``ignore_index``, the scene label :data:`~xmodal.data.sample.NO_LABEL`), so no loss can see it.

    ``keep_optical_label`` first copies the scene label to ``optical_label``, which is never
    withheld: for EO -> SAR transfer (paper 002) the labelled subset counts the SAR side's labels,
    while the optical side of every tile is labelled (labelled optical imagery is the plentiful kind).
    """
    out = dict(sample)
    out["labelled"] = np.uint8(labelled)
    if keep_optical_label:
        out["optical_label"] = np.int64(out["label"])
    if not labelled:
        for key in LABEL_KEYS:
            if key in out:
                out[key] = np.full_like(out[key], ignore_index)
        out["label"] = np.int64(NO_LABEL)
    return out


def crop_or_pad(
    sample: dict[str, np.ndarray], size: int, rng: np.random.Generator | None, ignore_index: int
) -> dict[str, np.ndarray]:
    """Cut a ``size`` x ``size`` window (random when ``rng`` is given, else centred); pad as no-data."""
    height, width = sample["sar"].shape[1:]
    out = dict(sample)
    if height < size or width < size:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        for key in IMAGE_KEYS:
            out[key] = np.pad(out[key], ((0, 0), *pads), constant_values=np.nan)
        for key in VALID_KEYS:
            out[key] = np.pad(out[key], pads, constant_values=0)
        for key in LABEL_KEYS:
            if key in out:
                out[key] = np.pad(out[key], pads, constant_values=ignore_index)
        height, width = out["sar"].shape[1:]
    if (height, width) == (size, size):
        return out
    if rng is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    for key in IMAGE_KEYS:
        out[key] = out[key][(slice(None), *window)]
    for key in VALID_KEYS + LABEL_KEYS:
        if key in out:
            out[key] = out[key][window]
    return out


class Preparer:
    """Decoded sample -> fixed-shape, normalised, augmented arrays ready for a model.

    Args:
        info: Dataset description (look direction, SAR units, ignore value).
        stats: Per-band statistics from ``stats.json``.
        tile_size: Output height and width.
        augment: Augmentation settings, or ``None`` for evaluation (centre crop, no jitter).
        clip_sigma: Clip normalised values to +- this many standard deviations (heavy SAR tails).
    """

    def __init__(
        self,
        info: DatasetInfo,
        stats: DatasetStats,
        tile_size: int,
        augment: AugmentSettings | None,
        clip_sigma: float = 6.0,
    ) -> None:
        if len(stats.sar) != len(info.sar_bands) or len(stats.optical) != len(info.optical_bands):
            raise DataError("stats.json band counts differ from dataset.json; recompute with `xmodal data stats`")
        self.info = info
        self.tile_size = tile_size
        self.augment = augment
        self.clip_sigma = clip_sigma
        self.sar_mean, self.sar_std = stats.mean_std("sar")
        self.opt_mean, self.opt_std = stats.mean_std("optical")
        units = [b.unit for b in stats.sar]
        self.speckle_bands = np.array([u in _SPECKLE_UNITS for u in units])
        self.db_bands = self.speckle_bands.copy()

    def __call__(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        train = self.augment is not None
        out = crop_or_pad(sample, self.tile_size, rng if train else None, self.info.ignore_index)
        sar = out["sar"].astype(np.float32, copy=True)
        optical = out["optical"].astype(np.float32, copy=True)
        if train and self.augment.photometric:
            sar, optical = self._photometric(sar, optical, rng)
        sar_valid = out["sar_valid"].astype(bool) & np.isfinite(sar).all(axis=0)
        opt_valid = out["optical_valid"].astype(bool) & np.isfinite(optical).all(axis=0)
        sar = self._normalise(sar, self.sar_mean, self.sar_std, sar_valid)
        optical = self._normalise(optical, self.opt_mean, self.opt_std, opt_valid)
        out.update(sar=sar, optical=optical, sar_valid=sar_valid.astype(np.uint8), optical_valid=opt_valid.astype(np.uint8))
        if train and self.augment.geometric != "none":
            out = self._geometric(out, rng)
        # ascontiguousarray would turn 0-d scalars (label, index) into shape (1,): keep them 0-d.
        return {k: np.ascontiguousarray(v) if np.ndim(v) else v for k, v in out.items()}

    def views(self, sample: dict[str, np.ndarray], rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
        """``count`` independently augmented views of one decoded sample.

        One view is exactly :meth:`__call__`. With ``count > 1`` every per-pixel field gets a
        leading view axis (``sar``: V x C x H x W, ``mask``: V x H x W); each view draws its own crop
        and geometric transform (shared by the modalities and labels of that view) and its own
        photometric jitter per modality. Scalars (``label``, ``index``, ``labelled``) stay as they are.
        """
        if count == 1:
            return self(sample, rng)
        drawn = [self(sample, rng) for _ in range(count)]
        return {key: np.stack([view[key] for view in drawn]) if np.ndim(drawn[0][key]) else drawn[0][key] for key in drawn[0]}

    def _normalise(self, image: np.ndarray, mean: np.ndarray, std: np.ndarray, valid: np.ndarray) -> np.ndarray:
        image = (image - mean[:, None, None]) / std[:, None, None]
        np.clip(image, -self.clip_sigma, self.clip_sigma, out=image)
        image[:, ~valid] = 0.0  # no-data becomes the band mean; labels there are ignored by methods
        return image

    def _photometric(
        self, sar: np.ndarray, optical: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        settings = self.augment
        if settings.sar_extra_looks > 0 and self.speckle_bands.any():
            # Extra multiplicative speckle with unit mean in linear power, applied in dB.
            looks = settings.sar_extra_looks
            gamma = rng.gamma(shape=looks, scale=1.0 / looks, size=(int(self.speckle_bands.sum()), *sar.shape[1:]))
            sar[self.speckle_bands] += (10.0 * np.log10(np.maximum(gamma, 1e-6))).astype(np.float32)
        if settings.sar_gain_db > 0 and self.db_bands.any():
            sar[self.db_bands] += np.float32(rng.normal(0.0, settings.sar_gain_db))
        if settings.optical_gain > 0:
            brightness = 1.0 + rng.uniform(-settings.optical_gain, settings.optical_gain)
            per_band = 1.0 + rng.uniform(-settings.optical_gain / 2, settings.optical_gain / 2, size=optical.shape[0])
            optical *= (brightness * per_band).astype(np.float32)[:, None, None]
        return sar, optical

    def _geometric(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        mode = self.augment.geometric
        look = self.info.sar_look
        if mode == "look_preserving" and look is not None:
            # Flip along the flight direction only: rows for east/west looks, columns for north/south.
            axis = 0 if look in ("east", "west") else 1
            flips, rotations = ([axis] if rng.random() < 0.5 else []), 0
        else:
            flips = [a for a in (0, 1) if rng.random() < 0.5]
            rotations = int(rng.integers(0, 4))
        out = {}
        for key, value in sample.items():
            if value.ndim < 2:
                out[key] = value
                continue
            offset = value.ndim - 2  # image arrays carry a leading channel axis
            for axis in flips:
                value = np.flip(value, axis=axis + offset)
            if rotations:
                value = np.rot90(value, k=rotations, axes=(offset, offset + 1))
            out[key] = value
        return out


def stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-sample dicts (same keys, same shapes) into a batch dict."""
    if not samples:
        return {}
    keys = samples[0].keys()
    for sample in samples[1:]:
        if sample.keys() != keys:
            raise DataError(f"samples in one batch carry different fields: {sorted(keys)} vs {sorted(sample.keys())}")
    return {key: np.stack([s[key] for s in samples]) for key in keys}


def unstack(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`stack`."""
    size = len(next(iter(batch.values())))
    return [{key: value[i] for key, value in batch.items()} for i in range(size)]
