"""Training engine: choices by name, augmentation, determinism, exact resume, checkpoints, learning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lungs_utils import params as P
from lungs_utils.xrays import presets
from lungs_utils.engine import loop as T
from lungs_utils.engine import checkpoint as Ck
from lungs_utils.engine import device as Dv
from lungs_utils.engine import optim as Op
from lungs_utils.engine import schedule as Sc
from lungs_utils.xrays.data import XrayDataset
from lungs_utils.errors import LungsError

TIMING = ["train_seconds", "val_seconds", "images_per_s"]


def toy_sets(n: int = 60, size: int = 24, seed: int = 0) -> tuple[XrayDataset, XrayDataset]:
    """Images whose class is a bright band at one of three heights: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size), dtype=np.uint8)
    labels = np.arange(n) % 3
    band = size // 3
    for i, c in enumerate(labels):
        images[i, c * band:(c + 1) * band] += 140
    cut = int(n * 0.75)
    ids = np.arange(n) + 1000
    return (XrayDataset(images, ids, labels, indices=np.arange(cut)),
            XrayDataset(images, ids, labels, indices=np.arange(cut, n)))


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(128, 3))


def quick(**kw) -> dict:
    base = dict(epochs=4, batch_size=16, image_size=24, lr=3e-3, rotate=5.0, seed=0, device="cpu")
    base.update(kw)
    return P.load(overrides=base)


def _no_timing(h: pd.DataFrame) -> pd.DataFrame:
    return h.drop(columns=TIMING)


# ------------------------------------------------------------------------------------------- choices
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "none"])
def test_optimizers_and_schedules(optimizer: str, scheduler: str) -> None:
    p = quick(optimizer=optimizer, scheduler=scheduler, warmup_epochs=0.5)
    model = tiny_net()
    opt = Op.make_optimizer(model, p)
    sched = Op.make_scheduler(opt, p, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(np.isfinite(lrs)) and max(lrs) <= p["lr"] * 1.0001
    if scheduler == "cosine":
        assert lrs[2] > lrs[0] and lrs[-1] < 1e-6  # warm-up then decay to zero
    if scheduler == "none":
        assert lrs == [p["lr"]] * 40
    decay = {g["weight_decay"] for g in opt.param_groups}
    assert 0.0 in decay  # norms and biases are not decayed


def test_sgd_is_nesterov() -> None:
    opt = Op.make_optimizer(tiny_net(), quick(optimizer="sgd"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]


def test_loss_class_weights_and_smoothing() -> None:
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    w = Op.class_weight_tensor(quick(class_weights="balanced"), labels)
    assert torch.allclose(w, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    loss = Op.make_loss(quick(class_weights=[1, 2, 3], label_smoothing=0.1), labels)
    assert loss.label_smoothing == 0.1 and loss.weight.tolist() == [1.0, 2.0, 3.0]
    assert Op.make_loss(quick(), labels).weight is None


def test_precision_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(Dv, "cpu_has_native_bf16", lambda: True)
    assert Dv.autocast_dtype(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(Dv, "cpu_has_native_bf16", lambda: False)
    assert Dv.autocast_dtype(cpu, "auto") is None  # emulated bf16 would be slower than fp32
    assert Dv.autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert Dv.autocast_dtype(cpu, "fp32") is None


def test_auto_precision_follows_the_cpu_kind_and_an_isa_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from lungs_utils import hardware

    zen5 = "model name : AMD EPYC\nflags : fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16\n"
    for env, native in (({}, True), ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False), ({"ATEN_CPU_CAPABILITY": "avx2"}, True)):
        monkeypatch.setattr(hardware, "cpu_kind", lambda env=env: hardware.parse_cpuinfo(zen5, env, cores=2))
        assert Dv.cpu_has_native_bf16() is native, env
        assert Dv.autocast_dtype(torch.device("cpu"), "auto") is (torch.bfloat16 if native else None)
    avx2_only = "model name : Intel Xeon\nflags : fpu sse2 avx avx2\n"
    monkeypatch.setattr(hardware, "cpu_kind", lambda: hardware.parse_cpuinfo(avx2_only, {}, cores=2))
    assert Dv.autocast_dtype(torch.device("cpu"), "auto") is None


def test_cuda_requested_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LungsError, match="no CUDA GPU"):
        Dv.select_device("cuda")


# ------------------------------------------------------------------------------------------- augmentation
def test_batch_augment_shapes_ranges_and_determinism() -> None:
    p = quick(hflip=0.5, rotate=15, translate=0.1, scale=0.2, brightness=0.3, contrast=0.3, equalize=0.5,
              sharpness=0.5, invert=0.2, crop_scale=0.5, masks="channel")
    x = torch.randint(0, 256, (8, 2, 24, 24), dtype=torch.uint8)
    x[:, 1] = (x[:, 1] > 127).to(torch.uint8) * 255
    a = presets.train_batch(x.clone(), p, torch.Generator().manual_seed(3))
    b = presets.train_batch(x.clone(), p, torch.Generator().manual_seed(3))
    c = presets.train_batch(x.clone(), p, torch.Generator().manual_seed(4))
    assert a.shape == (8, 2, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a[:, 1].unique().tolist()) <= {0.0, 1.0}  # the mask channel stays binary
    # Normalised image channel: inside the range that [0, 1] maps to.
    assert a[:, 0].min() >= (0 - presets.MEAN) / presets.STD - 1e-5
    assert a[:, 0].max() <= (1 - presets.MEAN) / presets.STD + 1e-5


def test_augmentation_off_is_plain_preprocessing() -> None:
    off = quick(hflip=0, rotate=0, translate=0, scale=0, brightness=0, contrast=0)
    x = torch.randint(0, 256, (4, 1, 24, 24), dtype=torch.uint8)
    assert torch.allclose(presets.train_batch(x.clone(), off), presets.to_input(x.clone(), 24))


def test_full_flip_mirrors_the_image() -> None:
    p = quick(hflip=1.0, rotate=0, translate=0, scale=0, brightness=0, contrast=0)
    x = torch.randint(0, 256, (2, 1, 24, 24), dtype=torch.uint8)
    flipped = presets.train_batch(x.clone(), p)
    assert torch.allclose(flipped, presets.to_input(x.flip(-1), 24), atol=1e-5)


def test_item_transform_matches_the_recipe() -> None:
    t = presets.item_transform(quick(equalize=0.5, sharpness=0.5, invert=0.5, crop_scale=0.5))
    out = t(torch.randint(0, 256, (1, 40, 40), dtype=torch.uint8))
    assert out.shape == (1, 24, 24) and out.dtype == torch.float32


def test_mixup_and_cutmix_give_soft_targets() -> None:
    mixer = presets.mix(quick(mixup=0.4, cutmix=1.0))
    x, y = torch.randn(8, 1, 24, 24), torch.arange(8) % 3
    mixed, soft = mixer(x, y)
    assert mixed.shape == x.shape and soft.shape == (8, 3)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert presets.mix(quick()) is None


# ------------------------------------------------------------------------------------------- the loop
def test_training_learns_and_writes_the_run_files(tmp_path: Path) -> None:
    train, val = toy_sets()
    result = T.fit(tiny_net(), train, val, quick(epochs=6), tmp_path, progress=False)
    assert result.best_metrics["macro_f1"] > 0.8
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5, 6]
    for col in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_f1_covid", "lr"):
        assert col in history
    assert (tmp_path / "checkpoints" / "best.pt").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert result.best_metrics["confusion_matrix"] and np.sum(result.best_metrics["confusion_matrix"]) == len(val)


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    train, val = toy_sets()
    p = quick(mixup=0.2, equalize=0.3)
    torch.manual_seed(0)
    a = T.fit(tiny_net(), train, val, p, tmp_path / "a", progress=False)
    torch.manual_seed(0)
    b = T.fit(tiny_net(), train, val, p, tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(_no_timing(a.history), _no_timing(b.history))


def _straight_and_resumed(train: XrayDataset, val: XrayDataset, p: dict, folder: Path) -> tuple:
    """Four epochs in one go, and two then a resume to four (checked to have stopped after two)."""
    torch.manual_seed(0)
    straight = T.fit(tiny_net(), train, val, p, folder / "straight", progress=False)
    torch.manual_seed(0)
    T.fit(tiny_net(), train, val, p, folder / "resumed", progress=False, stop_after=2)
    assert len(pd.read_csv(folder / "resumed" / "history.csv")) == 2
    torch.manual_seed(123)  # a different process state must not matter: everything comes from last.pt
    resumed = T.fit(tiny_net(), train, val, {**p, "resume": True}, folder / "resumed", progress=False)
    return straight, resumed


def test_resume_after_two_of_four_epochs_equals_four_epochs(tmp_path: Path) -> None:
    train, val = toy_sets(size=40)
    # Progressive resizing too: the size changes after the resume point (epochs at 16, 16, 32, 40).
    p = quick(mixup=0.2, cutmix=0.5, equalize=0.2, crop_scale=0.6, image_size=40, start_size=16)
    assert [Sc.train_size(p, e) for e in range(4)] == [16, 16, 32, 40]
    straight, resumed = _straight_and_resumed(train, val, p, tmp_path)
    pd.testing.assert_frame_equal(_no_timing(straight.history), _no_timing(resumed.history))
    assert straight.best_metrics == resumed.best_metrics


def test_early_stopping(tmp_path: Path) -> None:
    train, val = toy_sets()
    result = T.fit(tiny_net(), train, val, quick(epochs=30, lr=0.0, patience=2), tmp_path, progress=False)
    # lr 0: only BatchNorm statistics move, so the best epoch comes early and 2 flat epochs end it.
    assert result.stopped_early and result.epochs_run == result.best_epoch + 2 < 30
    f1 = result.history["val_macro_f1"].to_numpy()
    assert f1[result.best_epoch - 1] == f1.max() and (f1[result.best_epoch:] <= f1.max()).all()


def test_best_weights_are_left_in_the_model(tmp_path: Path) -> None:
    train, val = toy_sets()
    model = tiny_net()
    result = T.fit(model, train, val, quick(epochs=5), tmp_path, progress=False)
    loss, metrics = T.evaluate(model, val, quick(), torch.device("cpu"))
    assert metrics["macro_f1"] == pytest.approx(result.best_metrics["macro_f1"])


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = toy_sets()
    model = tiny_net()
    T.fit(model, train, val, quick(epochs=2), tmp_path, progress=False)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    state = Ck.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert calls and all(k.get("weights_only") is True for k in calls)
    fresh = tiny_net()
    Ck.load_weights(fresh, state)
    x = torch.randn(2, 1, 24, 24)
    model.eval(), fresh.eval()
    assert state["epoch"] == 2 and state["params"]["epochs"] == 2


def test_a_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(LungsError, match="junk.pt is not a lungs checkpoint"):
        Ck.load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(LungsError, match="no 'lungs-checkpoint-1' marker"):
        Ck.load_checkpoint(plain)
    with pytest.raises(LungsError, match="does not exist"):
        Ck.load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    from lungs_utils import models

    train, val = toy_sets()
    T.fit(tiny_net(), train, val, quick(epochs=1, model="resnet_tiny"), tmp_path, progress=False)
    state = Ck.load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(LungsError, match="weights of 'resnet_tiny' that do not fit.*set model: resnet_tiny"):
        Ck.load_weights(models.build("simple_cnn"), state, "best.pt")


def test_batched_sharpen_matches_torchvision() -> None:
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(3, 1, 17, 23)
    assert torch.allclose(presets._sharpen(x), TF.adjust_sharpness(x, 2.0), atol=1e-6)


def test_flip_only_geometry_is_an_exact_mirror() -> None:
    p = quick(hflip=1.0, rotate=0.0, translate=0.0, scale=0.0)
    x = torch.rand(4, 2, 9, 12)
    assert torch.equal(presets.BatchAugment(p).geometry(x), x.flip(-1))


def test_broadcast_affine_grid_matches_torch() -> None:
    theta = torch.randn(5, 2, 3)
    for h, w in ((7, 7), (9, 13)):
        assert torch.allclose(presets._affine_grid(theta, h, w),
                              torch.nn.functional.affine_grid(theta, [5, 1, h, w], align_corners=False), atol=1e-5)


def test_fused_brightness_contrast_matches_the_two_steps() -> None:
    p = quick(brightness=0.3, contrast=0.4, equalize=0.0, sharpness=0.0, invert=0.0)
    x = torch.rand(6, 1, 10, 10)
    out = presets.BatchAugment(p, torch.Generator().manual_seed(1)).photometry(x.clone())
    g = torch.Generator().manual_seed(1)
    b = 0.7 + 0.6 * torch.rand(6, generator=g)
    c = 0.6 + 0.8 * torch.rand(6, generator=g)
    y = x * b.view(6, 1, 1, 1)
    m = y.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, ((y - m) * c.view(6, 1, 1, 1) + m).clamp(0, 1), atol=1e-6)


def test_resumed_run_reports_the_training_time_of_every_epoch(tiny_data: Path, tmp_path: Path) -> None:
    import json

    from lungs_utils.runs import experiment as E

    p = quick(epochs=2, data_dir=str(tiny_data), output_dir=str(tmp_path / "run"))
    first = E.prepare(p, progress=False)
    E.train(first, progress=False, stop_after=1)
    again = E.prepare({**p, "resume": True}, progress=False)
    E.train(again, progress=False)
    E.predict_and_save(again, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2 and metrics["train_seconds"] == pytest.approx(history["train_seconds"].sum())


def test_frame_puts_a_shrunken_film_in_a_black_frame_and_moves_the_mask_with_it() -> None:
    x = torch.full((6, 2, 40, 40), 200, dtype=torch.uint8)
    x[:, 1] = 0
    x[:, 1, 10:30, 8:32] = 255  # a lung box
    p = P.load(overrides=dict(image_size=40, frame=1.0, hflip=0.0, rotate=0.0, translate=0.0, scale=0.0,
                              brightness=0.0, contrast=0.0))
    out = presets.BatchAugment(p, torch.Generator().manual_seed(0)).geometry(x.float() / 255)
    film = out[:, 0] > 0.5
    for i in range(len(x)):
        share = float(film[i].float().mean())  # the film covers z^2 of the image, z in FRAME_ZOOM
        assert presets.FRAME_ZOOM[0] ** 2 - 0.05 <= share <= presets.FRAME_ZOOM[1] ** 2 + 0.05
        assert float(out[i, 0][~film[i]].max()) == 0.0  # black around it, not repeated edge pixels
        # The mask shrinks with the film and stays on it.
        assert bool(out[i, 1].bool()[~film[i]].any()) is False
        assert 0.3 * share < float(out[i, 1].mean()) / (20 * 24 / 1600) < 1.7 * share
    # frame: 0 leaves the geometry alone.
    off = P.load(overrides=dict(image_size=40, hflip=0.0, rotate=0.0, translate=0.0, scale=0.0))
    assert torch.equal(presets.BatchAugment(off).geometry(x.float()), x.float())


def test_histeq_equalises_the_radiograph_everywhere_and_leaves_the_mask() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(60, 120, (3, 2, 24, 24), dtype=torch.uint8, generator=g)  # a dull, low-contrast film
    x[:, 1] = 0
    x[:, 1, 6:18, 4:20] = 255
    eq = presets.equalize(x)
    assert torch.equal(eq[:, 1], x[:, 1])
    assert int(eq[:, 0].min()) < 20 and int(eq[:, 0].max()) == 255  # stretched over the full range
    off = P.load(overrides=dict(image_size=24, hflip=0.0, rotate=0.0, translate=0.0, scale=0.0, brightness=0.0,
                                contrast=0.0, histeq=True, masks="channel"))
    # Training (augmentation off) and evaluation see the same equalised input.
    assert torch.allclose(presets.train_batch(x.clone(), off), presets.to_input(x.clone(), 24, histeq=True))
    assert not torch.allclose(presets.to_input(x.clone(), 24, histeq=True), presets.to_input(x.clone(), 24))


def test_progressive_resizing_ramps_up_to_the_full_size_and_validates_at_full_size(tmp_path: Path) -> None:
    p = quick(epochs=10, image_size=64, start_size=32)
    sizes = [Sc.train_size(p, e) for e in range(10)]
    assert sizes[0] == 32 and sizes[-1] == 64 and sizes == sorted(sizes)
    assert all(s % Sc.SIZE_STEP == 0 for s in sizes) and sizes.index(64) <= round(Sc.RAMP_SHARE * 10)
    assert [Sc.train_size(quick(epochs=10, image_size=64), e) for e in (0, 9)] == [64, 64]  # off by default

    seen: list[tuple[str, int]] = []

    class Recorder(nn.Module):  # a tiny net that notes the input side in train and eval mode
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(("train" if self.training else "eval", x.shape[-1]))
            return self.net(x)

    train, val = toy_sets(size=64)
    result = T.fit(Recorder(), train, val, quick(epochs=4, image_size=48, start_size=16), tmp_path, progress=False)
    assert sorted({s for mode, s in seen if mode == "train"}) == [16, 32, 48]
    assert {s for mode, s in seen if mode == "eval"} == {48}
    assert result.history["train_size"].tolist() == [16, 16, 32, 48]  # ramp over 70 % of 4 epochs


def test_a_diverging_loss_stops_the_run_before_anything_is_saved_from_it(tmp_path: Path) -> None:
    train, val = toy_sets()
    p = quick(epochs=3, lr=1e30, optimizer="sgd", weight_decay=0.0)
    with pytest.raises(LungsError, match=r"training diverged in epoch 1: the loss became (nan|inf).*lower lr"):
        T.fit(tiny_net(), train, val, p, tmp_path, progress=False)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing saved from a broken model
    assert not (tmp_path / "history.csv").exists()
    assert not (tmp_path / "tb").exists()  # no event file either: the folder stays reusable


@pytest.mark.parametrize("override", ["lr=.inf", "lr=.nan", "weight_decay=-.inf", "grad_clip=.nan"])
def test_every_number_in_params_must_be_finite(override: str) -> None:
    with pytest.raises(LungsError, match="must be a finite number"):
        P.load(overrides=[override])


@pytest.mark.parametrize("name", ["../../etc", "/tmp/x", "..", "a/b", "", "x y"])
def test_a_run_name_is_a_plain_folder_name(name: str) -> None:
    with pytest.raises(LungsError, match="not a plain name|must be text"):
        P.load(overrides=[f"run_name={name}"])
    P.load(overrides=["run_name=resnet18_crop-2.v1"])  # plain names still pass


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("1.0e30", 1e30), ("5E-4", 5e-4), (".5e-2", 5e-3)])
def test_scientific_notation_is_a_number_although_yaml_1_1_reads_it_as_text(text: str, value: float) -> None:
    assert P.load(overrides=[f"lr={text}"])["lr"] == value
    assert P.load(overrides=["run_name=1e-3"])["run_name"] == "1e-3"  # a text key keeps the text


# ------------------------------------------------------------------------------------------- val_every, ema
def test_val_every_validates_every_kth_epoch_and_the_whole_last_quarter() -> None:
    p = quick(epochs=20, val_every=3)
    # 3, 6, 9, 12, 15 by the stride; 16-20 are the last quarter (ceil(20 / 4) = 5 epochs).
    assert [e for e in range(1, 21) if Sc.validates(p, e)] == [3, 6, 9, 12, 15, 16, 17, 18, 19, 20]
    assert Sc.validated_epochs(p) == 10 and Sc.validated_epochs(p, done=16) == 4
    assert all(Sc.validates(quick(epochs=7), e) for e in range(1, 8))
    assert [e for e in range(1, 5) if Sc.validates(quick(epochs=4, val_every=10), e)] == [4]


def test_val_every_trains_the_same_weights_and_keeps_the_best_of_the_validated_epochs(tmp_path: Path) -> None:
    train, val = toy_sets()
    every = quick(epochs=8)
    torch.manual_seed(0)
    full = T.fit(tiny_net(), train, val, every, tmp_path / "full", progress=False)
    torch.manual_seed(0)
    sparse = T.fit(tiny_net(), train, val, {**every, "val_every": 3}, tmp_path / "sparse", progress=False)
    validated = [3, 6, 7, 8]
    history = pd.read_csv(tmp_path / "sparse" / "history.csv")
    assert history.loc[history["val_macro_f1"].notna(), "epoch"].tolist() == validated
    # Validation changes nothing in training: the training columns and the validated epochs' scores match.
    cols = ["epoch", "train_loss", "train_macro_f1", "lr"]
    pd.testing.assert_frame_equal(_no_timing(sparse.history)[cols], _no_timing(full.history)[cols])
    f1 = full.history.set_index("epoch")["val_macro_f1"]
    assert sparse.history.set_index("epoch")["val_macro_f1"].dropna().tolist() == f1.loc[validated].tolist()
    assert sparse.best_epoch == int(f1.loc[validated].idxmax())
    assert sparse.best_metrics["macro_f1"] == f1.loc[validated].max()


def test_ema_validates_and_keeps_the_moving_average_of_the_weights(tmp_path: Path) -> None:
    train, val = toy_sets()
    p = quick(epochs=3, ema=0.9)
    torch.manual_seed(0)
    model = tiny_net()
    result = T.fit(model, train, val, p, tmp_path, progress=False)
    last = Ck.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    # By hand: the same steps, and their weights averaged with decay 0.9 from the first step's (AveragedModel's
    # start), batch-norm statistics included.
    torch.manual_seed(0)
    plain = tiny_net()
    s = T.start_fit(plain, train, {**p, "ema": 0.0})
    average: dict[str, torch.Tensor] = {}
    for _ in range(3):
        for x, y, _ in s.loader:
            T.train_step(s.net, x, y, p, loss_fn=s.loss_fn, optimizer=s.optimizer, scaler=s.scaler,
                         scheduler=s.scheduler, mixer=s.mixer, generator=s.generators["augment"], dtype=s.dtype)
            for k, v in plain.state_dict().items():
                if v.dtype.is_floating_point:
                    average[k] = v.detach().clone() if k not in average else 0.9 * average[k] + 0.1 * v.detach()
    for k, v in average.items():
        torch.testing.assert_close(last["ema"]["module." + k], v, rtol=1e-4, atol=1e-6)
    # last.pt keeps the raw weights (exact resume) beside the average; they differ.
    assert not torch.equal(last["model"]["0.weight"], last["ema"]["module.0.weight"])
    # The averaged weights are what is validated and kept: the model scores its best epoch's metrics.
    _, metrics = T.evaluate(model, val, p, torch.device("cpu"))
    assert metrics["macro_f1"] == pytest.approx(result.best_metrics["macro_f1"])
    best = Ck.load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]
    assert set(best) == set(model.state_dict()) and torch.equal(best["0.weight"], model.state_dict()["0.weight"])
    # Without ema the last step's weights are validated: other validation losses.
    torch.manual_seed(0)
    plain_run = T.fit(tiny_net(), train, val, {**p, "ema": 0.0}, tmp_path / "plain", progress=False)
    assert not plain_run.history["val_loss"].equals(result.history["val_loss"])


def test_ema_resumes_exactly(tmp_path: Path) -> None:
    train, val = toy_sets()
    straight, resumed = _straight_and_resumed(train, val, quick(epochs=4, ema=0.95), tmp_path)
    pd.testing.assert_frame_equal(_no_timing(straight.history), _no_timing(resumed.history))
    assert straight.best_metrics == resumed.best_metrics
