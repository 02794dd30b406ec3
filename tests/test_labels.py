"""Labelled subsets, withheld labels, the lockstep labelled stream and augmented views."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.data.labels import LabelSettings, choose_labelled, oversample
from xmodal.data.prepared import DataSettings, prepare_data
from xmodal.data.stats import BandStats, DatasetStats
from xmodal.data.torch_data import TileDataset, labelled_loader, torch_loader
from xmodal.data.transforms import AugmentSettings, Preparer
from xmodal.engine.config import build_config, fingerprint
from xmodal.engine.setup import prepare_run_data
from xmodal.errors import ConfigError, DataError
from xmodal.losses import segmentation_loss

from conftest import native_info


def records(classes: list[int]) -> list[dict]:
    return [{"tile_id": f"t{i}", "scene_label": c} for i, c in enumerate(classes)]


@pytest.mark.parametrize("settings, expected", [(LabelSettings(fraction=0.3), 30), (LabelSettings(count=32), 32), (LabelSettings(), 100)])
def test_subset_size_is_exact_for_fractions_and_counts(settings: LabelSettings, expected: int):
    chosen = choose_labelled(records([0] * 100), settings)
    assert len(chosen) == expected == len(set(chosen.tolist()))


def test_stratified_subset_is_proportional_exact_and_seeded():
    classes = [0] * 50 + [1] * 30 + [2] * 15 + [3] * 5
    chosen = choose_labelled(records(classes), LabelSettings(count=32, stratify=True, seed=3))
    per_class = Counter(classes[i] for i in chosen)
    assert sum(per_class.values()) == 32
    for label, size in Counter(classes).items():
        assert abs(per_class[label] - 32 * size / 100) < 1, per_class  # largest remainders: within one
    again = choose_labelled(records(classes), LabelSettings(count=32, stratify=True, seed=3))
    other = choose_labelled(records(classes), LabelSettings(count=32, stratify=True, seed=4))
    assert again.tolist() == chosen.tolist() and other.tolist() != chosen.tolist()


def test_subset_errors_name_the_setting():
    with pytest.raises(DataError, match=r"data.labels.count=200: the training split has only 100"):
        choose_labelled(records([0] * 100), LabelSettings(count=200))
    with pytest.raises(DataError, match="stratify needs a scene class"):
        choose_labelled(records([0, -1, 1]), LabelSettings(count=2, stratify=True))
    with pytest.raises(ConfigError, match="fraction .* or count .*, not both"):
        LabelSettings(fraction=0.5, count=3)
    with pytest.raises(ConfigError, match="unlabelled='maybe'"):
        LabelSettings(unlabelled="maybe")


def test_oversampling_spreads_every_tile_evenly():
    counts = Counter(oversample(7, 30, seed=0).tolist())
    assert sum(counts.values()) == 30 and set(counts) == set(range(7)) and set(counts.values()) <= {4, 5}


def world_settings(world: Path, **labels) -> DataSettings:
    return DataSettings(root=str(world), tile_size=64, batch_size=2, mask_layer="buildings", labels=LabelSettings(**labels))


def test_unlabelled_tiles_are_kept_with_labels_withheld_or_dropped(tiny_world: Path):
    full = prepare_data(world_settings(tiny_world))
    dropped = prepare_data(world_settings(tiny_world, fraction=0.5))
    kept = dropped.for_method(keep_unlabelled=True, views=1)
    train = full.records("train")
    assert len(dropped.records("train")) == round(0.5 * len(train)) and all(r["labelled"] for r in dropped.records("train"))
    assert len(kept.records("train")) == len(train)
    assert [r["tile_id"] for r in kept.labelled_records()] == [r["tile_id"] for r in dropped.records("train")]

    # The labels of a withheld tile never reach a model: masks unknown, scene label -1, flag 0.
    dataset = TileDataset(kept, "train", train=False)
    flags = [r["labelled"] for r in kept.records("train")]
    hidden = dataset[flags.index(False)]
    shown = dataset[flags.index(True)]
    assert hidden["labelled"] == 0 and int(hidden["label"]) == -1 and (hidden["mask"] == 255).all()
    assert shown["labelled"] == 1 and int(shown["label"]) >= 0 and (shown["mask"] != 255).any()
    truth = TileDataset(full, "train", train=False)[flags.index(False)]
    assert (truth["mask"] != 255).any(), "the file itself has labels: they are withheld, not missing"
    logits = torch.zeros(1, 1, 64, 64, requires_grad=True)
    segmentation_loss(logits, torch.as_tensor(hidden["mask"])[None], 255).backward()
    assert logits.grad.abs().max() == 0


def test_a_full_epoch_draws_the_labelled_tiles_to_the_size_of_the_training_split(tiny_world: Path):
    subset = prepare_data(world_settings(tiny_world, count=3, epoch="full"))
    train = subset.manifest.split("train")
    records = subset.records("train")
    ids = [r["tile_id"] for r in records]
    assert len(records) == len(train) and len(set(ids)) == 3 and set(ids) == {r["tile_id"] for r in subset.labelled_records()}
    counts = Counter(ids).values()
    assert max(counts) - min(counts) <= 1  # every labelled tile as evenly as possible
    assert len(prepare_data(world_settings(tiny_world, count=3)).records("train")) == 3
    with pytest.raises(ConfigError, match="data.labels.epoch='x'"):
        LabelSettings(epoch="x")


def test_methods_decide_whether_unlabelled_tiles_stay(tiny_world: Path, tmp_path: Path):
    base = {
        "name": "x", "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 2, "labels": {"fraction": 0.5}},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        "run": {"storage": str(tmp_path)},
    }
    supervised, spec, _ = prepare_run_data(build_config({**base, "method": "supervised"}))
    assert spec.labelled_tiles == spec.train_tiles == len(supervised.records("train"))  # drops what it cannot use
    kd, spec, needs = prepare_run_data(build_config({**base, "method": "kd", "inputs": {"teacher": str(tmp_path)}}))
    assert needs.unlabelled and spec.train_tiles > spec.labelled_tiles == len(kd.labelled_records())  # learns from all
    forced = build_config({**base, "method": "kd", "inputs": {"teacher": str(tmp_path)}, "data": {**base["data"], "labels": {"fraction": 0.5, "unlabelled": "drop"}}})
    assert prepare_run_data(forced)[1].train_tiles == spec.labelled_tiles
    # The subset is part of what a resumed run must share.
    other_seed = build_config({**base, "method": "supervised", "data": {**base["data"], "labels": {"fraction": 0.5, "seed": 1}}})
    assert fingerprint(other_seed) != fingerprint(build_config({**base, "method": "supervised"}))


def test_labelled_stream_runs_in_lockstep_with_the_main_stream(tiny_world: Path):
    prepared = prepare_data(world_settings(tiny_world, count=3)).for_method(keep_unlabelled=True, views=1)
    main, labelled = torch_loader(prepared, "train"), labelled_loader(prepared)
    assert len(main) == len(labelled)
    seen = Counter()
    for batch, extra in zip(main, labelled):
        assert extra["labelled"].all() and extra["sar"].shape == batch["sar"].shape
        seen.update(extra["index"].tolist())
    assert set(seen) == {r["index"] for r in prepared.labelled_records()}
    assert max(seen.values()) - min(seen.values()) <= 1, "oversampled evenly"


def ramp_sample(size: int = 12) -> dict[str, np.ndarray]:
    """A decoded sample whose SAR and optical show the same asymmetric ramp, with a matching mask."""
    ramp = np.arange(size * size, dtype=np.float32).reshape(size, size) / (size * size)
    return {
        "sar": np.stack([ramp, ramp]),
        "optical": np.stack([ramp] * 4),
        "sar_valid": np.ones((size, size), np.uint8),
        "optical_valid": np.ones((size, size), np.uint8),
        "mask": (ramp > 0.5).astype(np.int64),
        "label": np.int64(1), "index": np.int64(0), "labelled": np.uint8(1),
    }


def test_views_differ_geometrically_but_stay_aligned_across_modalities():
    info = native_info()
    stats = DatasetStats(
        sar=[BandStats(name, "dB", 0.0, 1.0, 0.0, 1.0, 1.0) for name in ("VV", "VH")],
        optical=[BandStats(name, "reflectance", 0.0, 1.0, 0.0, 1.0, 1.0) for name in ("B02", "B03", "B04", "B08")],
        sar_db=True, tiles=1,
    )
    info.tile_size = 12
    augment = AugmentSettings(geometric="d4", photometric=False)
    preparer = Preparer(info, stats, 12, augment)
    views = preparer.views(ramp_sample(), np.random.default_rng(0), 6)
    assert views["sar"].shape == (6, 2, 12, 12) and views["mask"].shape == (6, 12, 12) and np.ndim(views["label"]) == 0
    for v in range(6):  # every view: SAR, optical and mask transformed alike
        np.testing.assert_array_equal(views["sar"][v, 0], views["optical"][v, 0])
        np.testing.assert_array_equal(views["mask"][v], (views["sar"][v, 0] > 0.5).astype(np.int64))
    assert len({views["sar"][v, 0].tobytes() for v in range(6)}) > 1, "views draw their own geometry"
    assert preparer.views(ramp_sample(), np.random.default_rng(0), 1)["sar"].shape == (2, 12, 12)


def test_views_without_augmentation_are_refused(tiny_world: Path, tmp_path: Path):
    from xmodal.engine.setup import check_needs
    from xmodal.methods.base import DataNeeds

    config = build_config({
        "name": "x", "method": "supervised", "run": {"storage": str(tmp_path)},
        "data": {"root": str(tiny_world), "tile_size": 64, "augment": {"geometric": "none", "photometric": False}},
    })
    with pytest.raises(ConfigError, match="2 augmented views .* would be identical"):
        check_needs(config, prepare_data(config.data), DataNeeds(views=2))
    with pytest.raises(ConfigError, match="reads noisy masks; set data.noisy_layer"):
        check_needs(config, prepare_data(config.data), DataNeeds(fields=("sar", "noisy_mask")))
