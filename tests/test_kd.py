"""kd: the frozen teacher, student initialisation, M&F stages, label-free selection, Ft-D through the
supervised method, and the teacher -> reconstruct -> Ft-A chain on Ray Train. (The cosine loss is
tested in tests/losses/test_cosine.py.)"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from specs import BUILDINGS_32

from xmodal.errors import ConfigError
from xmodal.methods.base import Export, MethodContext, ModelSettings
from xmodal.methods.exports import save_exports
from xmodal.methods.kd import PAPER_TABLE, KdSettings, KnowledgeDistillation, classify_run, default_switch_epochs
from xmodal.methods.optim import OptimSettings
from xmodal.methods.registry import get_method
from xmodal.methods.supervised import Supervised, SupervisedSettings
from xmodal.models import build_network

torch.set_num_threads(1)

SPEC = BUILDINGS_32
MODEL = ModelSettings(arch="unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 8])
SGD = OptimSettings(epochs=4, lr=0.05, optimizer="sgd", weight_decay=0.0, schedule="constant")


def context(inputs: dict[str, Path]) -> MethodContext:
    return MethodContext(torch.device("cpu"), steps_per_epoch=2, epochs=SGD.epochs, inputs=inputs, log=lambda _: None)


def batch(seed: int = 0, size: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sar": torch.randn(2, 2, size, size, generator=generator),
        "optical": torch.randn(2, 4, size, size, generator=generator),
        "mask": torch.randint(0, 2, (2, size, size), generator=generator),
        "sar_valid": torch.ones(2, size, size, dtype=torch.uint8),
        "optical_valid": torch.ones(2, size, size, dtype=torch.uint8),
    }


@pytest.fixture
def teacher_dir(tmp_path: Path) -> Path:
    """A checkpoint folder exporting a (random) optical teacher, as a teacher phase would."""
    torch.manual_seed(1)
    teacher = build_network("segmenter", **MODEL.segmenter_kwargs(4, 1))
    teacher.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so "unchanged" means something
        teacher(torch.randn(4, 4, 32, 32) * 3 + 1)
    save_exports({"model": Export(teacher, "optical")}, tmp_path)
    return tmp_path


def make_kd(teacher_dir: Path, optim: OptimSettings = SGD, **settings) -> KnowledgeDistillation:
    method = KnowledgeDistillation(KdSettings(**settings), MODEL, optim, SPEC)
    method.setup(context({"teacher": teacher_dir}))
    return method


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="reduction"):
        KdSettings(reduction="channel")
    with pytest.raises(ConfigError, match="switch_epochs"):
        KdSettings(layers="mid+fin", switch_epochs=[1, 2])
    with pytest.raises(ConfigError, match="first_conv"):
        KdSettings(first_conv="zeros")
    with pytest.raises(ConfigError, match="switch_epochs"):
        KnowledgeDistillation(KdSettings(layers="mid+fin", switch_epochs=[4]), MODEL, SGD, SPEC)
    assert get_method("kd") is KnowledgeDistillation
    assert KdSettings().layers == "int" and KdSettings().reduction == "auto"


# ---------------------------------------------------------------------------------------------- method


def test_student_starts_as_the_teacher_except_the_adapted_first_conv(teacher_dir: Path):
    method = make_kd(teacher_dir)
    teacher, student = method.teacher.state_dict(), method.student.state_dict()
    assert teacher.keys() == student.keys()
    first = "encoder.conv1.weight"
    assert teacher[first].shape[1] == 4 and student[first].shape[1] == 2
    # mean_tile: the teacher kernel averaged over its 4 bands, tiled to 2, scaled by 4/2.
    expected = teacher[first].mean(dim=1, keepdim=True).repeat(1, 2, 1, 1) * 2
    assert torch.allclose(student[first], expected)
    for key in teacher:
        if key != first:
            assert torch.equal(teacher[key], student[key]), key


def test_teacher_stays_frozen_while_the_student_learns(teacher_dir: Path):
    method = make_kd(teacher_dir, layers="int")
    before_teacher, before_student = snapshot(method.teacher), snapshot(method.student)
    losses = [method.train_step(batch(seed), step)["loss"] for step, seed in enumerate([0, 1, 0, 1])]
    method.evaluate([batch(2)])
    assert not method.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert all(torch.equal(before_teacher[k], v) for k, v in method.teacher.state_dict().items())
    changed = [k for k, v in method.student.state_dict().items() if not torch.equal(before_student[k], v)]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    assert losses[2] < losses[0]  # same batch again: the reconstruction improved


def test_mid_trains_the_encoder_only_and_keeps_downstream_statistics(teacher_dir: Path):
    method = make_kd(teacher_dir, layers="mid")
    before = snapshot(method.student)
    for step in range(2):
        method.train_step(batch(step), step)
    after = method.student.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.") for k in changed), sorted(changed)[:5]


def test_mid_fin_switches_layers_at_the_configured_epoch(teacher_dir: Path):
    assert default_switch_epochs(2, 150) == [75] and default_switch_epochs(2, 5) == [3]
    method = make_kd(teacher_dir, layers="mid+fin", switch_epochs=[1])
    assert method.active_layers() == ["encoder.out"]
    assert "cosine/encoder.out" in method.train_step(batch(), 0)
    method.finish_epoch(0, {})
    assert method.active_layers() == ["logits"]
    logs = method.train_step(batch(), 1)
    assert "cosine/logits" in logs and "cosine/encoder.out" not in logs
    metrics = method.evaluate([batch(1)]).metrics
    assert {"iou", "teacher/iou", "loss", "loss/stage", "cosine/encoder.out", "cosine/logits"} <= set(metrics)
    # Selection compares epochs on the last stage's objective, whatever stage is training.
    assert metrics["loss"] == pytest.approx(1 - metrics["cosine/logits"], abs=1e-6)
    # The stage survives a resume.
    fresh = make_kd(teacher_dir, layers="mid+fin", switch_epochs=[1])
    fresh.load_state_dict(method.state_dict())
    assert fresh.active_layers() == ["logits"]
    # Default split: half of train.epochs (4) each.
    halves = make_kd(teacher_dir, layers="mid+fin")
    assert [halves.stage_index(done) for done in range(4)] == [0, 0, 1, 1]


def test_mid_fin_stages_train_what_the_paper_says(teacher_dir: Path):
    """M&F: in ``mid`` only the encoder learns (the decoder is downstream of the tap); in ``fin`` the
    encoder is frozen, weights and BatchNorm statistics, and the decoder and head learn the
    teacher's logits. ``stage_freeze_encoder`` overrides the default per stage."""
    method = make_kd(teacher_dir, layers="mid+fin", switch_epochs=[1])
    assert method.stage_frozen_encoder == [False, True] and "(encoder frozen)" in method.describe_stages()

    def changed_after_step(step: int) -> set[str]:
        before = snapshot(method.student)
        method.train_step(batch(step), step)
        return {k for k, v in method.student.state_dict().items() if not torch.equal(before[k], v)}

    mid = changed_after_step(0)
    assert mid and all(k.startswith("encoder.") for k in mid)
    assert any("running_mean" in k for k in mid)  # the encoder's BatchNorm adapts to SAR in mid
    method.finish_epoch(0, {})
    fin = changed_after_step(1)
    assert fin and not any(k.startswith("encoder.") for k in fin), sorted(fin)[:5]
    assert any(k.startswith("decoder.") for k in fin) and any(k.startswith("segmentation_head.") for k in fin)

    unfrozen = make_kd(teacher_dir, layers="mid+fin", switch_epochs=[1], stage_freeze_encoder=[False, False])
    unfrozen.finish_epoch(0, {})
    before = snapshot(unfrozen.student)
    unfrozen.train_step(batch(1), 1)
    assert any(k.startswith("encoder.") and not torch.equal(before[k], v) for k, v in unfrozen.student.state_dict().items())
    with pytest.raises(ConfigError, match="expected 2 value"):
        KdSettings(layers="mid+fin", stage_freeze_encoder=[True])
    with pytest.raises(ConfigError, match="nothing would train"):
        make_kd(teacher_dir, layers="mid", stage_freeze_encoder=[True])
    assert KdSettings(layers="int").frozen_encoder_stages() == [False]


def test_pre_activation_compares_the_pre_relu_maps_of_both_networks(teacher_dir: Path):
    """With ``pre_activation`` the logged cosine is the one of the tensors entering the final ReLU,
    on the teacher AND the student; without it, of the (non-negative) block outputs."""
    from xmodal.losses import layer_cosine
    from xmodal.models import FeatureTaps

    layer = "encoder.stage2"
    cosines = {}
    for pre in (False, True):
        method = make_kd(teacher_dir, layers=[layer], pre_activation=pre, reduction="pixel")
        student, teacher, sample = method.student, method.teacher, batch(3)
        student.train()
        with FeatureTaps(teacher, [layer], detach=True, pre_activation=pre) as t_taps:
            teacher(sample["optical"])
            target = t_taps[layer]
        torch.manual_seed(0)
        with torch.no_grad(), FeatureTaps(student, [layer], detach=True, pre_activation=pre) as s_taps:
            student(sample["sar"])
            feature = s_taps[layer]
        assert (target.min() < 0) == pre and (feature.min() < 0) == pre  # ReLU outputs are >= 0
        expected = float(layer_cosine(feature, target, "pixel", None, 1e-8))
        logged = method.train_step(sample, 0)[f"cosine/{layer}"]
        assert logged == pytest.approx(expected, abs=1e-5)
        cosines[pre] = logged
    assert cosines[True] != pytest.approx(cosines[False], abs=1e-3)


def test_pre_activation_and_explicit_tap_lists(teacher_dir: Path):
    method = make_kd(teacher_dir, layers=["encoder.stage2", "decoder.block1"], pre_activation=True, reduction="sample")
    logs = method.train_step(batch(), 0)
    assert set(logs) >= {"cosine/encoder.stage2", "cosine/decoder.block1"}
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


def test_student_architecture_must_match_the_teacher(teacher_dir: Path):
    other = ModelSettings(arch="unet", encoder="resnet18", encoder_depth=3, decoder_channels=[8, 8, 8])
    method = KnowledgeDistillation(KdSettings(), other, SGD, SPEC)
    with pytest.raises(ConfigError, match="share the architecture"):
        method.setup(context({"teacher": teacher_dir}))
    with pytest.raises(ConfigError, match="no such input"):
        KnowledgeDistillation(KdSettings(teacher="optical"), MODEL, SGD, SPEC).setup(context({"teacher": teacher_dir}))


def test_ft_d_trains_the_decoder_and_keeps_encoder_batchnorm(teacher_dir: Path, tmp_path: Path):
    student_dir = tmp_path / "student"
    kd = make_kd(teacher_dir, layers="fin")
    save_exports(kd.exports(), student_dir)
    settings = SupervisedSettings(input="sar", init="student", init_export="model", freeze_encoder=True)
    finetune = Supervised(settings, MODEL, SGD, SPEC)
    finetune.setup(context({"student": student_dir}))
    before = snapshot(finetune.model)
    assert all(torch.equal(before[k], v) for k, v in kd.student.state_dict().items())  # starts as the student
    for step in range(2):
        finetune.train_step(batch(step), step)
    after = finetune.model.state_dict()
    encoder = [k for k in after if k.startswith("encoder.")]
    assert any("running_mean" in k for k in encoder)
    assert all(torch.equal(before[k], after[k]) for k in encoder)  # weights and BatchNorm statistics
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(("decoder.", "segmentation_head.")))


@pytest.mark.parametrize(
    "model",
    [
        ModelSettings(arch="segnet", encoder=None, kwargs={"width": 0.125}),
        ModelSettings(arch="pspnet", encoder="resnet18", encoder_depth=3),
        ModelSettings(arch="deeplabv3plus", encoder="resnet18", decoder_channels=None),
    ],
    ids=["segnet", "pspnet", "deeplabv3plus"],
)
def test_ft_d_freezes_exactly_the_encoder_on_other_architectures(model: ModelSettings, tmp_path: Path):
    """Ft-D's boundary: every ``encoder.`` tensor (weights and BatchNorm statistics) stays, every
    decoder and head parameter may learn, on SegNet, PSPNet and DeepLabV3+ as on U-Net."""
    torch.manual_seed(2)
    student = build_network("segmenter", **model.segmenter_kwargs(2, 2))
    student.train()
    with torch.no_grad():
        student(torch.randn(4, 2, 32, 32) * 2)
    save_exports({"model": Export(student, "sar")}, tmp_path)
    settings = SupervisedSettings(input="sar", init="student", freeze_encoder=True, binary_head="softmax", dice_weight=0.0)
    finetune = Supervised(settings, model, SGD, SPEC)
    finetune.setup(context({"student": tmp_path}))
    trainable = {name for name, p in finetune.model.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("encoder.") for name in trainable)
    assert any(name.startswith("decoder.") for name in trainable) and any(name.startswith("segmentation_head.") for name in trainable)
    before = snapshot(finetune.model)
    for step in range(2):
        finetune.train_step(batch(step), step)
    after = finetune.model.state_dict()
    encoder = [k for k in after if k.startswith("encoder.")]
    assert any("running_mean" in k for k in encoder)
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    moved = {k for k in after if not k.startswith("encoder.") and not torch.equal(before[k], after[k])}
    assert any(k.startswith("decoder.") for k in moved) and any(k.startswith("segmentation_head.") for k in moved)


def test_softmax_head_gives_two_channels_and_kd_compares_them_per_pixel(tmp_path: Path):
    """The paper's two-channel softmax head: the supervised loss is cross-entropy over the two
    channels (BCE on softmax), and kd's ``fin`` then runs a per-pixel cosine over classes."""
    settings = SupervisedSettings(input="optical", binary_head="softmax", dice_weight=0.0)
    teacher = Supervised(settings, MODEL, SGD, SPEC)
    teacher.setup(context({}))
    sample = batch(4)
    logits = teacher.model(sample["optical"])
    assert logits.shape[1] == 2
    expected = torch.nn.functional.cross_entropy(logits, sample["mask"].long())
    assert float(teacher._loss(logits, sample["mask"].long()).detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    save_exports(teacher.exports(), tmp_path)
    kd = make_kd(tmp_path, layers="fin")
    assert kd.classes == 2
    logs = kd.train_step(sample, 0)
    assert -1.0 <= logs["cosine/logits"] <= 1.0 and abs(logs["cosine/logits"]) != 1.0  # not sign(s) * sign(t)
    with pytest.raises(ConfigError, match="binary_head"):
        SupervisedSettings(binary_head="tanh")


def test_paper_table_and_run_classification():
    assert len(PAPER_TABLE["rows"]) == 14 and len(PAPER_TABLE["columns"]) == 7
    assert PAPER_TABLE["paper"]["int/ft_a"]["unet-vgg19"] == 46.09
    assert PAPER_TABLE["paper"]["mid/ft_d"]["segnet-vgg19"] is None
    assert KnowledgeDistillation.paper_tables == (PAPER_TABLE,)
    runs = [
        {"name": "c/teacher", "method": "supervised", "method_settings": {"input": "optical"}, "model": {"arch": "unet", "encoder": "mobilenet_v2"}},
        {"name": "c/reconstruct", "method": "kd", "method_settings": {"layers": "int"}, "model": {"arch": "unet", "encoder": "mobilenet_v2"}},
        {"name": "c/ft_d", "method": "supervised", "method_settings": {"input": "sar", "init": "student", "freeze_encoder": True}, "model": {"arch": "unet", "encoder": "mobilenet_v2"}},
        {"name": "c/x_mid", "method": "kd", "method_settings": {"layers": "mid"}, "model": {"arch": "DeepLabV3+", "encoder": "resnet50"}},
        {"name": "c/x_mid_ft_a", "method": "supervised", "method_settings": {"input": "sar", "init": "student"}, "model": {"arch": "DeepLabV3+", "encoder": "resnet50"}, "data": {"labels": {"fraction": 0.05}}},
    ]
    assert [classify_run(r, runs) for r in runs] == [
        ("optical", "unet-mobilenetv2"),
        ("int", "unet-mobilenetv2"),
        ("int/ft_d", "unet-mobilenetv2"),
        ("mid", "deeplabv3plus-resnet50"),
        ("mid/ft_a@0.05", "deeplabv3plus-resnet50"),
    ]


# ---------------------------------------------------------------------------------------------- Ray chain


@pytest.mark.ray
def test_teacher_reconstruct_finetune_chain_on_two_workers(tiny_world: Path, tmp_path: Path, ray_local):
    """The teacher trains in the plain engine; reconstruct -> Ft-A run as a chain on 2 Ray Train
    workers from its tested checkpoint. The kd run's teacher IoU, evaluated by 2 workers each on its
    share of the test split, must equal the teacher's own single-process test IoU."""
    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain
    from xmodal.engine.runner import run_experiment
    from xmodal.report.runs import render_run_report

    base = {
        "method": "supervised",
        "method_settings": {"input": "optical"},
        # Batch 1: several DDP steps per epoch on the 6 training tiles (a parameter left out of
        # the loss only fails DDP from the second step on). Depth 5: no unused ResNet stages.
        "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 1},
        "model": {"arch": "unet", "encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]},
        "train": {"epochs": 1, "lr": 0.003},
        "run": {"storage": str(tmp_path / "runs"), "panels": 0},
    }
    (teacher,) = run_plain(build_config({**base, "name": "kd-chain/teacher"}), log=lambda line: None)
    config = build_config(
        {
            **base,
            "name": "kd-chain",
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "inputs": {"teacher": teacher.checkpoint},
            "phases": [
                {"name": "reconstruct", "overrides": {"method": "kd", "method_settings": {"layers": "int"}}},
                {
                    "name": "ft_a",
                    "inputs": {"student": "reconstruct"},
                    "overrides": {"method_settings": {"input": "sar", "init": "student", "init_export": "model"}},
                },
            ],
        }
    )
    scratch = set(Path(tempfile.gettempdir()).glob("xmodal-inputs-*"))
    reconstruct, finetune = run_experiment(config)
    assert set(Path(tempfile.gettempdir()).glob("xmodal-inputs-*")) <= scratch  # workers' input copies deleted after set-up
    assert 0 <= reconstruct.metrics["test/iou"] <= 1 and "test/cosine/encoder.stage1" in reconstruct.metrics
    assert reconstruct.metrics["test/teacher/iou"] == pytest.approx(teacher.metrics["test/iou"], abs=1e-6)
    assert (Path(reconstruct.checkpoint) / "exports" / "model.pt").is_file()
    summary = json.loads((Path(finetune.results_dir) / "run.json").read_text())
    assert summary["method_settings"]["init"] == "student" and "test/iou" in summary["metrics"]
    # The finetuning started from the checkpoint the reconstruction tested (label-free: its own loss).
    assert summary["inputs"]["student"] == {"run": reconstruct.name, "checkpoint": reconstruct.checkpoint, "which": "tested"}
    assert reconstruct.summary["metric"] == "val/loss" and reconstruct.summary["metric_labelled"] is False

    files = render_run_report(tmp_path / "runs", echo=False)
    assert files.runs == 3 and "Int+Ft-A" in files.text and "unet:resnet18" in files.text


def test_chain_hands_on_the_checkpoint_the_report_shows(tiny_world: Path, tmp_path: Path):
    """Over several epochs the label-free reconstruction tests (and hands to Ft-A) the epoch of its
    lowest validation loss, whatever its SAR IoU; ``checkpoint: last`` hands the last epoch."""
    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain
    from xmodal.engine.training import METRICS_FILE

    base = {
        "method": "supervised",
        "method_settings": {"input": "optical", "binary_head": "softmax", "dice_weight": 0.0},
        "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 2},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        "train": {"epochs": 1, "lr": 0.01},
        "run": {"storage": str(tmp_path / "runs"), "panels": 0},
    }
    finetune = {"method_settings": {"input": "sar", "init": "student", "init_export": "model"}}
    config = build_config(
        {
            **base,
            "name": "handoff",
            "phases": [
                {"name": "teacher"},
                {"name": "reconstruct", "inputs": {"teacher": "teacher"}, "overrides": {"method": "kd", "method_settings": {"layers": "int"}, "train": {"epochs": 4, "lr": 0.05}}},
                {"name": "ft_tested", "inputs": {"student": "reconstruct"}, "overrides": finetune},
                {"name": "ft_last", "inputs": {"student": {"source": "reconstruct", "checkpoint": "last"}}, "overrides": finetune},
            ],
        }
    )
    _, reconstruct, tested, last = run_plain(config, log=lambda line: None)
    history = reconstruct.summary["history"]
    losses = {row["epoch"]: row["val/loss"] for row in history if "val/loss" in row}
    assert len(losses) == 4
    best_epoch = min(losses, key=losses.get)
    assert reconstruct.summary["metric"] == "val/loss" and reconstruct.summary["tested_epoch"] == best_epoch
    assert json.loads((Path(reconstruct.checkpoint) / METRICS_FILE).read_text())["epoch"] == best_epoch
    # The report shows the tested checkpoint's test metrics; Ft-A starts from that same checkpoint.
    assert tested.summary["inputs"]["student"] == {"run": reconstruct.name, "checkpoint": reconstruct.checkpoint, "which": "tested"}
    assert last.summary["inputs"]["student"]["checkpoint"] == reconstruct.last_checkpoint
    assert json.loads((Path(reconstruct.last_checkpoint) / METRICS_FILE).read_text())["epoch"] == max(losses)
