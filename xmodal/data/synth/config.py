"""Configuration of the synthetic paired SAR/optical world.

Geometry conventions (used by every module of :mod:`xmodal.data.synth`):
    * Images are north-up: column ``x`` grows towards the east, row ``y`` grows towards the south.
    * ``sar_look`` is the horizontal direction the radar beam points to, in image coordinates.
      ``"east"`` means the beam travels towards +x, so the sensor sits west of the scene (near range
      on the west side, far range on the east side).
    * Layover moves a scatterer at height ``h`` towards the sensor (against ``sar_look``) by
      ``h / tan(incidence) / pixel_size`` pixels; radar shadow falls away from the sensor (along
      ``sar_look``) behind an object, ``h * tan(incidence) / pixel_size`` pixels long.
    * ``sun_azimuth_deg`` is measured clockwise from north (180 = sun in the south, so optical
      shadows fall towards the north).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from rasterio.crs import CRS
from rasterio.errors import CRSError

from xmodal.data.bands import SAR_POLARISATIONS
from xmodal.errors import ConfigError

OPTICAL_BAND_SETS = ("rgbn", "s2")
LOOK_DIRECTIONS = ("east", "west", "north", "south")


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a synthetic world; equal configs give identical worlds.

    Attributes:
        seed: Master seed; region styles and every scene derive from it.
        regions: Number of regions (each with its own urban/natural style).
        scenes_per_region: Tiles generated per region.
        tile_size: Tile height and width in pixels.
        pixel_size: Ground sampling distance in metres (both modalities).
        optical_bands: ``"rgbn"`` (B02, B03, B04, B08) or ``"s2"`` (13 Sentinel-2 bands B01..B12
            with B8A), as surface reflectance.
        sar_polarisations: SAR channels in file order, any of HH, HV, VH, VV.
        incidence_deg: Radar incidence angle from vertical.
        looks: Number of independent looks averaged into each intensity pixel.
        sar_look: Direction the radar beam points to (see the module docstring).
        sar_resolution_m: Effective SAR resolution (full width at half maximum of the intensity
            response); sets the blur of the signal and the correlation length of the speckle.
        correlated_speckle: Form speckle by filtering a complex field through the impulse response
            (speckle correlated over a resolution cell); otherwise white Gamma speckle times a
            blurred signal.
        noise_floor_db: Thermal noise equivalent sigma0 (NESZ) added before speckle.
        optical_resolution_m: Effective optical resolution (FWHM of the blur); 0 disables it.
        sun_azimuth_deg: Sun azimuth, degrees clockwise from north.
        sun_elevation_deg: Sun elevation above the horizon, degrees.
        label_confusion_rate: Share of pixels of ``landcover_noisy`` relabelled, in smooth patches,
            to a plausible confusable class (grass<->crops, trees<->shrub, water<->flooded ...).
        label_boundary_shift_px: Typical displacement (pixels) of class boundaries in the noisy
            layer, from a smooth random warp.
        label_blob_count: Mean number of blob errors (patches of a wrong class) per tile.
        label_blob_radius_px: Mean blob radius in pixels.
        edge_nodata_prob: Share of tiles with a no-data band along one edge (NaN images, 255 labels).
        crs: Projected CRS of the tiles (metres).
        origin: (easting, northing) of the top-left corner of region 0.
        region_spacing_m: Northing offset between consecutive regions (regions lie far apart).
        region_grid_columns: Tiles per row of a region's grid (tile ``i`` sits at column
            ``i % columns``, row ``i // columns``, whatever the number of scenes).
    """

    seed: int = 0
    regions: int = 6
    scenes_per_region: int = 40
    tile_size: int = 128
    pixel_size: float = 2.0
    optical_bands: str = "rgbn"
    sar_polarisations: tuple[str, ...] = ("VV", "VH")
    incidence_deg: float = 35.0
    looks: int = 4
    sar_look: str = "east"
    sar_resolution_m: float = 3.0
    correlated_speckle: bool = True
    noise_floor_db: float = -23.0
    optical_resolution_m: float = 2.5
    sun_azimuth_deg: float = 160.0
    sun_elevation_deg: float = 45.0
    label_confusion_rate: float = 0.08
    label_boundary_shift_px: float = 1.0
    label_blob_count: float = 1.0
    label_blob_radius_px: float = 8.0
    edge_nodata_prob: float = 0.05
    crs: str = "EPSG:32631"
    origin: tuple[float, float] = (500000.0, 5500000.0)
    region_spacing_m: float = 50000.0
    region_grid_columns: int = 8

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> WorldConfig:
        """Build a validated config from a plain mapping (YAML/JSON); unknown keys are refused.

        Raises:
            ConfigError: A key is unknown or a value has the wrong type or range.
        """
        data = dict(data or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"world config: unknown key(s) {unknown}; known keys: {known}")
        for key in ("sar_polarisations", "origin"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping that :meth:`from_dict` accepts back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sar_polarisations"] = list(self.sar_polarisations)
        out["origin"] = list(self.origin)
        return out

    # ------------------------------------------------------------------ derived values
    @property
    def tile_extent_m(self) -> float:
        """Width (= height) of one tile on the ground."""
        return self.tile_size * self.pixel_size

    @property
    def scene_margin_px(self) -> int:
        """Extra pixels simulated around each tile so layover and shadows cross tile edges.

        Fixed by the tile size only, so the scene content does not change with the SAR geometry.
        """
        return max(16, self.tile_size // 4)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the field, the value and the rule."""
        _int(self, "seed", minimum=0)
        _int(self, "regions", minimum=1)
        _int(self, "scenes_per_region", minimum=1)
        _int(self, "tile_size", minimum=32)
        if self.tile_size % 16:
            raise ConfigError(f"world config: tile_size={self.tile_size} must be a multiple of 16")
        _number(self, "pixel_size", low=0.1, high=100.0)
        if self.optical_bands not in OPTICAL_BAND_SETS:
            raise ConfigError(
                f"world config: optical_bands={self.optical_bands!r}; expected one of {OPTICAL_BAND_SETS}"
            )
        pols = self.sar_polarisations
        pols_ok = isinstance(pols, tuple) and bool(pols) and all(p in SAR_POLARISATIONS for p in pols)
        if not pols_ok or len(set(pols)) != len(pols):
            raise ConfigError(
                f"world config: sar_polarisations={pols!r}; "
                f"expected a non-empty list of distinct values from {SAR_POLARISATIONS}"
            )
        _number(self, "incidence_deg", low=10.0, high=70.0)
        _int(self, "looks", minimum=1)
        if self.sar_look not in LOOK_DIRECTIONS:
            raise ConfigError(f"world config: sar_look={self.sar_look!r}; expected one of {LOOK_DIRECTIONS}")
        _number(self, "sar_resolution_m", low=0.0, high=50.0)
        _bool(self, "correlated_speckle")
        _number(self, "noise_floor_db", low=-50.0, high=-5.0)
        _number(self, "optical_resolution_m", low=0.0, high=50.0)
        _number(self, "sun_azimuth_deg", low=0.0, high=360.0)
        _number(self, "sun_elevation_deg", low=5.0, high=90.0)
        _number(self, "label_confusion_rate", low=0.0, high=0.5)
        _number(self, "label_boundary_shift_px", low=0.0, high=float(self.tile_size) / 4)
        _number(self, "label_blob_count", low=0.0, high=100.0)
        _number(self, "label_blob_radius_px", low=0.5, high=float(self.tile_size))
        _number(self, "edge_nodata_prob", low=0.0, high=1.0)
        self._validate_crs()
        if (
            not isinstance(self.origin, tuple)
            or len(self.origin) != 2
            or not all(_is_number(v) and math.isfinite(v) for v in self.origin)
        ):
            raise ConfigError(f"world config: origin={self.origin!r}; expected two finite numbers (easting, northing)")
        _int(self, "region_grid_columns", minimum=1)
        _number(self, "region_spacing_m", low=0.0, high=1e7)
        rows = math.ceil(self.scenes_per_region / self.region_grid_columns)
        region_extent = max(rows, min(self.scenes_per_region, self.region_grid_columns)) * self.tile_extent_m
        if self.regions > 1 and self.region_spacing_m < 2 * region_extent:
            raise ConfigError(
                f"world config: region_spacing_m={self.region_spacing_m} is below twice a region's extent "
                f"({region_extent:.0f} m); regions must lie far apart"
            )

    def _validate_crs(self) -> None:
        if not isinstance(self.crs, str):
            raise ConfigError(f"world config: crs={self.crs!r}; expected a CRS string such as 'EPSG:32631'")
        try:
            crs = CRS.from_user_input(self.crs)
        except CRSError as exc:
            raise ConfigError(f"world config: crs={self.crs!r} is not a known CRS ({exc})") from exc
        if not crs.is_projected:
            raise ConfigError(
                f"world config: crs={self.crs!r} is geographic; expected a projected CRS in metres (e.g. UTM)"
            )


def _int(config: WorldConfig, name: str, *, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"world config: {name}={value!r}; expected an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"world config: {name}={value}; expected an integer >= {minimum}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(config: WorldConfig, name: str, *, low: float, high: float) -> None:
    value = getattr(config, name)
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"world config: {name}={value!r}; expected a number in [{low}, {high}]")
    if not low <= value <= high:
        raise ConfigError(f"world config: {name}={value}; expected a number in [{low}, {high}]")


def _bool(config: WorldConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise ConfigError(f"world config: {name}={value!r}; expected true or false")
