"""Band names and physical units that travel with every array.

A SAR band carries its polarisation (HH, HV, VH, VV) and its unit (linear power, dB, amplitude,
or a complex/covariance component); an optical band carries its name (B02, ...) and unit
(reflectance, or digital numbers scaled by 1e4). Conversions between SAR units are explicit
functions: xmodal never guesses a unit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from xmodal.errors import DataError

Modality = Literal["sar", "optical"]

SAR_UNITS = ("linear", "dB", "amplitude", "complex_real", "complex_imag", "log_intensity")
OPTICAL_UNITS = ("reflectance", "reflectance_x1e4", "dn")
SAR_POLARISATIONS = ("HH", "HV", "VH", "VV")

# Sentinel-2 band names in their product order (L1C has all 13; L2A drops B10).
SENTINEL2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")

# Floor used when converting linear power to dB so that exact zeros do not become -inf.
DB_FLOOR_LINEAR = 1e-10

# Sentinel-2 L1C / L2A as distributed (uint16 reflectance x 1e4) write 0 in every band of a pixel
# that holds no data (outside the swath, GEE-masked): the product's NODATA value.
S2_NODATA_VALUE = 0


@dataclass(frozen=True)
class Band:
    """One band of one modality.

    Attributes:
        name: Polarisation for SAR (``"VV"``) or band name for optical (``"B04"``); free text for
            derived channels (``"VH_lee"``, ``"C12_real"``).
        unit: One of :data:`SAR_UNITS` or :data:`OPTICAL_UNITS`.
    """

    name: str
    unit: str


@dataclass(frozen=True)
class BandSet:
    """The ordered bands of one modality, with a check that the units fit the modality."""

    modality: Modality
    bands: tuple[Band, ...]

    def __post_init__(self) -> None:
        allowed = SAR_UNITS if self.modality == "sar" else OPTICAL_UNITS
        for band in self.bands:
            if band.unit not in allowed:
                raise DataError(
                    f"{self.modality} band {band.name!r} has unit {band.unit!r}; expected one of {allowed}"
                )
        names = [band.name for band in self.bands]
        if len(set(names)) != len(names):
            raise DataError(f"{self.modality} band names repeat: {names}")

    @classmethod
    def of(cls, modality: Modality, names: list[str] | tuple[str, ...], unit: str | list[str]) -> BandSet:
        """Build a band set from names and one unit (or one unit per band)."""
        units = [unit] * len(names) if isinstance(unit, str) else list(unit)
        if len(units) != len(names):
            raise DataError(f"{modality}: {len(names)} band names but {len(units)} units")
        return cls(modality, tuple(Band(n, u) for n, u in zip(names, units)))

    @property
    def names(self) -> list[str]:
        return [band.name for band in self.bands]

    @property
    def units(self) -> list[str]:
        return [band.unit for band in self.bands]

    def __len__(self) -> int:
        return len(self.bands)

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "bands": [asdict(b) for b in self.bands]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BandSet:
        try:
            return cls(data["modality"], tuple(Band(b["name"], b["unit"]) for b in data["bands"]))
        except (KeyError, TypeError) as exc:
            raise DataError(f"band set description {data!r} lacks field {exc}") from exc


def linear_to_db(power: np.ndarray) -> np.ndarray:
    """Linear backscatter power (sigma0) to decibels, floored at :data:`DB_FLOOR_LINEAR`."""
    return (10.0 * np.log10(np.maximum(power, DB_FLOOR_LINEAR))).astype(np.float32)


def db_to_linear(db: np.ndarray) -> np.ndarray:
    """Decibels to linear backscatter power."""
    return np.power(10.0, np.asarray(db, dtype=np.float64) / 10.0).astype(np.float32)


def amplitude_to_linear(amplitude: np.ndarray) -> np.ndarray:
    """Amplitude (|s|) to linear power (|s|^2)."""
    return np.square(amplitude, dtype=np.float32)


def sar_to_db(values: np.ndarray, unit: str) -> np.ndarray:
    """Convert one SAR band from ``unit`` to dB, refusing units that are not intensities."""
    if unit == "dB":
        return values.astype(np.float32, copy=False)
    if unit == "linear":
        return linear_to_db(values)
    if unit == "amplitude":
        return linear_to_db(amplitude_to_linear(values))
    raise DataError(f"cannot convert SAR unit {unit!r} to dB: only linear, amplitude and dB are intensities")


# ------------------------------------------------------------------------------------------------
# No-data rules of the Sentinel products, shared by every reader of them
# ------------------------------------------------------------------------------------------------


def s2_fill(data: np.ndarray) -> np.ndarray:
    """H x W mask of Sentinel-2 fill pixels: :data:`S2_NODATA_VALUE` in every band of ``data`` (C x H x W).

    A zero in some bands only is a measurement (B10 cirrus over clear sky, water in NIR), not fill.
    """
    if data.ndim != 3:
        raise DataError(f"Sentinel-2 array has shape {data.shape}; expected bands x height x width")
    return (data == S2_NODATA_VALUE).all(axis=0)


def mask_s2(data: np.ndarray) -> np.ndarray:
    """Apply the Sentinel-2 no-data rule to ``data`` (C x H x W, float) in place; return the H x W validity.

    A pixel is no-data when every band is 0 (the product's whole-pixel fill; all its bands become
    NaN) or when a band is not finite: NaN where the file declares a nodata value and that band
    equals it (:func:`~xmodal.data.geotiff.read_raster` turns declared nodata into NaN), or where
    no source pixel maps after resampling. A single band at 0 stays 0 and the pixel stays valid.
    """
    data[:, s2_fill(data)] = np.nan
    return np.isfinite(data).all(axis=0)


def mask_s1(data: np.ndarray) -> np.ndarray:
    """Apply the Sentinel-1 GRD (dB) no-data rule to ``data`` (C x H x W, float) in place; return the H x W validity.

    No-data is a non-finite value (NaN, the file's declared nodata turned into NaN by
    :func:`~xmodal.data.geotiff.read_raster`, +-inf) in any band; those values become NaN. An exact
    0 dB (sigma0 = 1) is a valid backscatter value and is kept.
    """
    finite = np.isfinite(data)
    data[~finite] = np.nan
    return finite.all(axis=0)
