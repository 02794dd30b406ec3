"""Transforms: pairs stay aligned, the look direction is respected, no NaN reaches a model."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.data.stats import BandStats, DatasetStats
from xmodal.data.transforms import AugmentSettings, Preparer, crop_or_pad
from xmodal.errors import ConfigError

from conftest import native_info


def stats(sar_bands: int = 2, optical_bands: int = 4, mean: float = 0.0, std: float = 1.0) -> DatasetStats:
    band = lambda name, unit: BandStats(name, unit, mean, std, -3, 3, 1.0)  # noqa: E731
    return DatasetStats(
        sar=[band(n, "dB") for n in ["VV", "VH"][:sar_bands]],
        optical=[band(n, "reflectance") for n in ["B02", "B03", "B04", "B08"][:optical_bands]],
        sar_db=True,
        tiles=1,
    )


def coordinate_sample(size: int = 16) -> dict[str, np.ndarray]:
    """Every modality and label encodes the pixel's (row, column), so alignment is checkable."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    code = (rows * size + cols).astype(np.float32)
    return {
        "sar": np.stack([code, -code]),
        "optical": np.stack([code, code, code, code]),
        "mask": code.astype(np.int64),
        "noisy_mask": code.astype(np.int64),
        "sar_valid": np.ones((size, size), np.uint8),
        "optical_valid": np.ones((size, size), np.uint8),
        "label": np.int64(3),
        "index": np.int64(0),
    }


@pytest.mark.parametrize("mode", ["look_preserving", "d4"])
def test_geometric_augmentation_keeps_every_modality_aligned(mode: str):
    size = 16
    augment = AugmentSettings(geometric=mode, photometric=False)
    preparer = Preparer(native_info(size=size), stats(), size, augment, clip_sigma=1e9)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        out = preparer(coordinate_sample(size), rng)
        code = out["mask"]
        np.testing.assert_array_equal(out["sar"][0], code)
        np.testing.assert_array_equal(out["sar"][1], -code)
        np.testing.assert_array_equal(out["optical"][2], code)
        np.testing.assert_array_equal(out["noisy_mask"], code)
        seen.add(tuple(code[0, :2]))
        assert np.ndim(out["label"]) == 0 and np.ndim(out["index"]) == 0  # scalars stay scalars
    assert len(seen) > 1  # it did transform


def test_look_preserving_flips_only_along_the_flight_direction():
    size = 8
    preparer = Preparer(native_info(size=size), stats(), size, AugmentSettings(photometric=False), clip_sigma=1e9)
    rng = np.random.default_rng(1)
    original = coordinate_sample(size)["mask"]
    for _ in range(30):
        out = preparer(coordinate_sample(size), rng)["mask"]
        # sar_look "east": range runs along columns, so each row must keep its column order.
        assert np.array_equal(out, original) or np.array_equal(out, original[::-1])


def test_nodata_becomes_zero_and_invalid():
    size = 8
    sample = coordinate_sample(size)
    sample["sar"][:, :2] = np.nan
    sample["optical_valid"][5:] = 0
    out = Preparer(native_info(size=size), stats(mean=1.0, std=2.0), size, None, clip_sigma=1e9)(sample, np.random.default_rng(0))
    assert np.isfinite(out["sar"]).all() and np.isfinite(out["optical"]).all()
    assert (out["sar_valid"][:2] == 0).all() and (out["sar_valid"][2:] == 1).all()
    assert (out["sar"][:, :2] == 0).all()
    assert (out["optical_valid"][5:] == 0).all() and (out["optical"][:, 5:] == 0).all()
    assert out["sar"][0, 3, 0] == pytest.approx((3 * size - 1.0) / 2.0)  # (x - mean) / std
    clipped = Preparer(native_info(size=size), stats(mean=1.0, std=2.0), size, None, clip_sigma=6.0)(coordinate_sample(size), np.random.default_rng(0))
    assert clipped["sar"].max() == 6.0 and clipped["sar"].min() == -6.0


def test_speckle_augmentation_keeps_the_mean_in_linear_power():
    size = 64
    sample = coordinate_sample(size)
    sample["sar"][:] = -10.0
    augment = AugmentSettings(geometric="none", sar_extra_looks=4.0, sar_gain_db=0.0, optical_gain=0.0)
    preparer = Preparer(native_info(size=size), stats(), size, augment, clip_sigma=1e9)
    out = preparer(sample, np.random.default_rng(2))
    linear = 10 ** (out["sar"] / 10)  # stats are mean 0 / std 1: values stay in dB
    assert linear.mean() == pytest.approx(0.1, rel=0.03)
    assert linear.std() > 0.03  # it did add speckle


def test_crop_and_pad_fix_the_shape():
    sample = coordinate_sample(10)
    padded = crop_or_pad(sample, 12, None, 255)
    assert padded["sar"].shape == (2, 12, 12) and np.isnan(padded["sar"][0, 0, 0])
    assert padded["mask"][0, 0] == 255 and padded["sar_valid"][0, 0] == 0
    cropped = crop_or_pad(sample, 4, np.random.default_rng(0), 255)
    assert cropped["sar"].shape == (2, 4, 4)
    np.testing.assert_array_equal(cropped["sar"][0], cropped["mask"])


def test_bad_augment_setting_is_named():
    with pytest.raises(ConfigError, match="augment.geometric='rotate'"):
        AugmentSettings(geometric="rotate")
