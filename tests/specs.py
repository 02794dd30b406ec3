"""Data descriptions shared by method tests that run without a dataset."""

from __future__ import annotations

from xmodal.methods.base import DataSpec

# SAR VV/VH and optical RGBN of 32 px, binary building masks, SAR already standardised.
BUILDINGS_32 = DataSpec(
    sar_channels=2, optical_channels=4, sar_bands=("VV", "VH"), optical_bands=("B02", "B03", "B04", "B08"),
    num_classes=2, class_names=("background", "building"), mask_layer="buildings", ignore_index=255,
    sar_mean=(0.0, 0.0), sar_std=(1.0, 1.0), tile_size=32,
)


def small_segmentation_run(name: str, root: str, storage: str, input: str = "optical") -> dict:
    """A one-epoch U-Net run on a generated world, as a config mapping (CLI tests write it to YAML)."""
    return {
        "name": name, "method": "supervised", "method_settings": {"input": input},
        "data": {"root": root, "tile_size": 64, "batch_size": 4},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        "train": {"epochs": 1}, "run": {"storage": storage, "panels": 0},
    }
