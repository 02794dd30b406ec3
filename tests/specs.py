"""Data descriptions shared by method tests that run without a dataset."""

from __future__ import annotations

from xmodal.methods.base import DataSpec

# SAR VV/VH and optical RGBN of 32 px, binary building masks, SAR already standardised.
BUILDINGS_32 = DataSpec(
    sar_channels=2, optical_channels=4, sar_bands=("VV", "VH"), optical_bands=("B02", "B03", "B04", "B08"),
    num_classes=2, class_names=("background", "building"), mask_layer="buildings", ignore_index=255,
    sar_mean=(0.0, 0.0), sar_std=(1.0, 1.0), tile_size=32,
)
