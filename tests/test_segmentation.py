"""Lung segmentation (metrics, loss, training, predicted masks) and mask-aware classification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lungs_utils.xrays import data as D
from lungs_utils.runs import experiment as E
from lungs_utils import params as P
from lungs_utils.xrays import phantom
from lungs_utils.xrays import presets
from lungs_utils.runs import segmentation as S
from lungs_utils import models, runfolder
from lungs_utils.engine.tasks import DiceBCELoss
from lungs_utils.xrays import masks as masks_mod
from lungs_utils.errors import LungsError
from lungs_utils.stats.metrics import MaskOverlap, dice_iou

PHANTOM_SIZE, SEG_SIZE = 96, 48


# ------------------------------------------------------------------------------------------- metrics
def test_dice_and_iou_match_hand_computed_values() -> None:
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    true = np.array([[1, 0, 1, 0], [1, 0, 0, 1]])
    # intersection 2, |pred| 3, |true| 4, union 5
    assert dice_iou(pred, true) == pytest.approx({"dice": 4 / 7, "iou": 2 / 5})
    assert dice_iou(np.zeros(4), np.zeros(4)) == {"dice": 1.0, "iou": 1.0}
    assert dice_iou(np.ones(4), np.zeros(4)) == {"dice": 0.0, "iou": 0.0}


def test_mask_overlap_pools_the_whole_set_and_averages_per_image() -> None:
    true = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool).view(3, 1, 2, 2)
    pred = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool).view(3, 1, 2, 2)
    meter = MaskOverlap()
    meter.update(true[:2], pred[:2])  # two batches add up to the whole set
    meter.update(true[2:], pred[2:])
    m = meter.metrics()
    # pooled: intersection 5, |pred| 5, |true| 6 → Dice 10/11, IoU 5/6
    assert m["dice"] == pytest.approx(10 / 11) and m["iou"] == pytest.approx(5 / 6)
    # per image: 2/3, 1, 1 (both empty) → mean 8/9
    assert m["mean_dice"] == pytest.approx(8 / 9) and m["images"] == 3
    assert m["dice"] == pytest.approx(dice_iou(pred, true)["dice"])


def test_dice_bce_loss_is_small_for_a_confident_right_mask_and_adds_up() -> None:
    target = torch.zeros(4, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    loss = DiceBCELoss()
    right, wrong = (target * 2 - 1) * 20, (1 - target * 2) * 20
    assert float(loss(right, target)) < 1e-3
    assert float(loss(wrong, target)) > 10
    logits = torch.randn(4, 1, 8, 8)
    assert float(loss(logits, target, reduction="sum")) == pytest.approx(4 * float(loss(logits, target)))


# ------------------------------------------------------------------------------------------- mask modes
def _batch() -> torch.Tensor:
    """Two 40x40 images (a ramp) with a lung box (rows 10..19, cols 8..31); the second mask is empty."""
    x = torch.zeros(2, 2, 40, 40)
    x[:, 0] = torch.linspace(0.1, 1.0, 40).view(1, 1, 40)
    x[0, 1, 10:20, 8:32] = 1.0
    return x


def test_masks_none_drops_the_mask_channel_and_channel_keeps_it() -> None:
    x = _batch()
    assert torch.equal(presets.apply_masks(x.clone(), "none"), x[:, :1])
    assert torch.equal(presets.apply_masks(x.clone(), "channel"), x)
    one = x[:, :1]
    for mode in P.MASK_MODES:  # 1-channel batches pass through every mode
        assert torch.equal(presets.apply_masks(one.clone(), mode), one)


def test_masks_multiply_blanks_outside_the_grown_lungs_and_keeps_unmasked_images() -> None:
    x = _batch()
    out = presets.apply_masks(x.clone(), "multiply")
    assert out.shape == (2, 1, 40, 40)
    margin = round(presets.MASK_MARGIN * 40)
    inside = torch.zeros(40, 40, dtype=torch.bool)
    inside[10 - margin:20 + margin, 8 - margin:32 + margin] = True
    assert torch.equal(out[0, 0][inside], x[0, 0][inside])
    assert float(out[0, 0][~inside].abs().max()) == 0.0
    # An empty (failed) mask keeps the whole image rather than blanking it.
    assert torch.equal(out[1], x[1, :1])


def test_masks_crop_cuts_each_image_to_its_lung_box() -> None:
    x = _batch()
    out = presets.apply_masks(x.clone(), "crop", image_size=16)
    assert out.shape == (2, 1, 16, 16)
    # The ramp's value at the crop's left / right edges is that of the box's columns (± the margin).
    ramp = torch.linspace(0.1, 1.0, 40)
    margin = presets.MASK_MARGIN * 40
    assert float(out[0, 0, :, 0].mean()) == pytest.approx(float(ramp[8]), abs=float(ramp[1] - ramp[0]) * (margin + 1))
    assert float(out[0, 0, :, -1].mean()) == pytest.approx(float(ramp[31]), abs=float(ramp[1] - ramp[0]) * (margin + 1))
    # Without a mask the whole image is used: edges are the ramp's ends.
    assert float(out[1, 0, :, 0].mean()) < float(ramp[2]) and float(out[1, 0, :, -1].mean()) > float(ramp[-3])


@pytest.mark.parametrize("mode, channels", [("none", 1), ("multiply", 1), ("crop", 1), ("channel", 2)])
def test_training_and_eval_inputs_have_the_mode_s_channels(mode: str, channels: int) -> None:
    p = P.load(overrides=dict(image_size=24, masks=mode))
    x = (_batch() * 255).to(torch.uint8)
    assert presets.train_batch(x.clone(), p, torch.Generator().manual_seed(0)).shape == (2, channels, 24, 24)
    assert presets.to_input(x.clone(), 24, masks=mode).shape == (2, channels, 24, 24)


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, S.SegExperiment]:
    """A phantom set and a 2-fold segmentation run on it (explicit paths: module-scoped)."""
    root = tmp_path_factory.mktemp("seg")
    phantom.generate(root / "ph", n_train=60, n_test=9, size=PHANTOM_SIZE, seed=5, workers=1)
    params = seg_params(root, cv=2)
    return root, S.run(params, progress=False)


def seg_params(root: Path, **kw) -> dict:
    base = dict(data_dir=str(root / "ph" / "data"), output_dir=str(root / "seg_run"), cache_dir=str(root / "cache"),
                model="unet_small", image_size=SEG_SIZE, epochs=12, batch_size=8, lr=3e-3, warmup_epochs=0.5,
                rotate=5.0, translate=0.05, scale=0.05, seed=0, device="cpu")
    base.update(kw)
    return P.load(overrides=base)


def test_short_segmentation_training_reaches_dice_0_9_on_phantom(seg_run) -> None:
    root, exp = seg_run
    summary = json.loads((exp.run_dir / "metrics.json").read_text())
    assert summary["task"] == "segmentation"
    assert summary["val_dice"] >= 0.9, summary  # out-of-fold masks vs the given ones, full resolution
    assert all(f["val_dice"] >= 0.9 for f in summary["folds"])
    # Post-processing is on by default; the raw figure shows what it bought, the tail what is left.
    assert summary["postprocess"] is True and summary["raw_val_dice"] >= 0.9
    assert summary["val_dice_min"] <= summary["val_dice_p5"] <= summary["val_mean_dice"]
    assert summary["oof_rejected"] >= 0 and summary["test_rejected"] >= 0
    history = pd.read_csv(exp.run_dir / "history.csv")
    assert set(history["fold"]) == {0, 1} and {"val_dice", "val_iou", "train_loss"} <= set(history.columns)
    for k in (0, 1):
        assert (exp.run_dir / f"fold_{k}" / "checkpoints" / "best.pt").is_file()


def test_predicted_masks_exist_for_every_test_id_at_the_image_size(seg_run) -> None:
    root, exp = seg_run
    data_dir = root / "ph" / "data"
    test_ids = set(D.list_images(data_dir / D.TEST_IMAGES))
    written = D.list_images(exp.run_dir / runfolder.MASKS_DIR / runfolder.TEST_MASKS)
    assert set(written) == test_ids
    for path in written.values():
        with Image.open(path) as im:
            assert im.size == (PHANTOM_SIZE, PHANTOM_SIZE) and im.mode == "L"
            assert set(np.unique(np.asarray(im)).tolist()) <= {0, 255}
    oof = D.list_images(exp.run_dir / runfolder.MASKS_DIR / runfolder.OOF_MASKS)
    assert set(oof) == set(D.list_images(data_dir / D.TRAIN_IMAGES))  # every train image, out of fold


def test_segmentation_resume_trains_nothing_more_and_gives_the_same_masks(seg_run) -> None:
    root, exp = seg_run
    before = (exp.run_dir / "masks" / "test").iterdir().__next__().read_bytes()
    again = S.run({**exp.params, "resume": True}, progress=False)
    assert [p.result.epochs_run for p in again.parts] == [p.result.epochs_run for p in exp.parts]
    assert again.outputs["metrics"]["val_dice"] == pytest.approx(exp.outputs["metrics"]["val_dice"])
    assert (exp.run_dir / "masks" / "test").iterdir().__next__().read_bytes() == before


def test_segmentation_needs_a_mask_head_and_masks(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(LungsError, match="has no mask head; for segmentation use one of: .*unet_small"):
        models.segmenter("resnet18")
    for f in (tiny_data / D.TRAIN_MASKS).iterdir():
        f.unlink()
    with pytest.raises(LungsError, match="train_lung_masks is missing"):
        S.prepare(P.load(overrides=dict(data_dir=str(tiny_data), model="unet_small",
                                        output_dir=str(tmp_path / "run"))), progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- classifiers
def cls_params(root: Path, mode: str, mask_run: str | None, **kw) -> dict:
    base = dict(data_dir=str(root / "ph" / "data"), output_dir=str(root / f"cls_{mode}"),
                cache_dir=str(root / "cache"), model="simple_cnn", image_size=32, epochs=1, batch_size=16,
                seed=0, device="cpu", masks=mode, mask_run=mask_run)
    base.update(kw)
    return P.load(overrides=base)


@pytest.mark.parametrize("mode", ["multiply", "crop", "channel"])
def test_classifier_uses_given_masks_for_train_and_predicted_for_val_and_test(seg_run, mode: str) -> None:
    root, seg = seg_run
    exp = E.prepare(cls_params(root, mode, str(seg.run_dir)), progress=False)
    assert exp.train.masks is exp.data.masks.images  # given masks to learn from
    oof = np.stack([np.asarray(Image.open(seg.run_dir / "masks" / "train_oof" / f"img_{i}.png"))
                    for i in exp.val.ids])
    assert np.array_equal(np.asarray(exp.val.masks[exp.val.indices]), oof)
    test_pred = np.stack([np.asarray(Image.open(seg.run_dir / "masks" / "test" / f"img_{i}.png"))
                          for i in exp.test.ids])
    assert np.array_equal(np.asarray(exp.test.masks), test_pred)  # never true masks at test time
    assert next(exp.model.parameters()).shape[1] == (2 if mode == "channel" else 1)
    E.train(exp, progress=False)
    summary = E.predict_and_save(exp, progress=False)
    assert summary["n_test"] == 9 and (exp.run_dir / "submission.csv").is_file()


def test_mask_modes_need_a_usable_mask_run(seg_run, tmp_path: Path) -> None:
    root, seg = seg_run
    with pytest.raises(LungsError, match="masks: crop needs mask_run"):
        E.prepare(cls_params(root, "crop", None, output_dir=str(tmp_path / "a")), progress=False)
    with pytest.raises(LungsError, match="mask_run 'nowhere': no masks/test/"):
        E.prepare(cls_params(root, "crop", "nowhere", output_dir=str(tmp_path / "b")), progress=False)
    partial = tmp_path / "partial"
    (partial / "masks" / "test").mkdir(parents=True)
    with pytest.raises(LungsError, match=r"no predicted mask for 60 of 60 train images .*cv: 3"):
        E.prepare(cls_params(root, "crop", str(partial), output_dir=str(tmp_path / "c")), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_mask_run_of_other_images_is_refused_even_with_the_same_ids(seg_run, tmp_path: Path) -> None:
    root, seg = seg_run
    made_on = json.loads((seg.run_dir / "masks" / runfolder.DATASET_FILE).read_text())
    assert made_on["fingerprint"] == seg.data.fingerprint and made_on["n_train"] == 60
    # Another phantom set with the very same ids (60 train, 9 test) but other films.
    phantom.generate(tmp_path / "other", n_train=60, n_test=9, size=PHANTOM_SIZE, seed=6, workers=1)
    other = cls_params(root, "crop", str(seg.run_dir), data_dir=str(tmp_path / "other" / "data"),
                       output_dir=str(tmp_path / "cls"))
    with pytest.raises(LungsError, match=r"was made on other images .*run 05_lung_segmentation on this dataset"):
        E.prepare(other, progress=False)
    assert not (tmp_path / "cls").exists()
    # Other ids altogether: the hint names the dataset, not cv (the run had folds).
    phantom.generate(tmp_path / "more", n_train=75, n_test=9, size=PHANTOM_SIZE, seed=6, workers=1)
    (seg.run_dir / "masks" / runfolder.DATASET_FILE).rename(tmp_path / "dataset.json")  # as a run made before the record
    try:
        with pytest.raises(LungsError, match=r"no predicted mask for .* made on another dataset") as info:
            E.prepare(cls_params(root, "crop", str(seg.run_dir), data_dir=str(tmp_path / "more" / "data"),
                                 output_dir=str(tmp_path / "cls2")), progress=False)
        assert "cv: 3" not in str(info.value)
    finally:
        (tmp_path / "dataset.json").rename(seg.run_dir / "masks" / runfolder.DATASET_FILE)


def test_leaderboard_leaves_out_segmentation_runs(seg_run) -> None:
    from lungs_utils.analysis import leaderboard

    root, exp = seg_run
    assert exp.run_dir not in leaderboard.run_folders(root)  # no macro-F1 to rank it by


def test_lungs_train_runs_a_segmentation_params_file(seg_run, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from lungs_utils.app import cli

    root, _ = seg_run
    recipe = Path(__file__).resolve().parents[1] / "params" / "05_lung_segmentation.yaml"
    overrides = dict(data_dir=root / "ph" / "data", output_dir=tmp_path / "masks_run", cache_dir=root / "cache",
                     image_size=32, epochs=1, cv=2, device="cpu")
    code = cli.main(["train", str(recipe), *[a for k, v in overrides.items() for a in ("-p", f"{k}={v}")]])
    assert code == 0 and "out-of-fold Dice" in capsys.readouterr().out
    assert len(list((tmp_path / "masks_run" / "masks" / "test").glob("img_*.png"))) == 9


def test_review_shows_the_worst_out_of_fold_masks_with_their_dice(seg_run) -> None:
    _, exp = seg_run
    shown = S.review(exp, worst=3, random=2)
    assert len(shown["ids"]) == 5 and len(set(shown["ids"].tolist())) == 5
    for pred, truth, dice in zip(shown["predicted"], shown["truth"], shown["dice"]):
        assert dice == pytest.approx(dice_iou(pred > 127, truth > 127)["dice"])
    assert shown["dice"][:3].max() <= np.sort(exp.outputs["oof_dice"])[2] + 1e-12


# ------------------------------------------------------------------------------------------- post-processing
def _lungs(size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    m[12:50, 10:28] = 255
    m[12:50, 36:54] = 255
    return m


def test_clean_mask_keeps_two_lungs_drops_specks_and_fills_holes() -> None:
    m = _lungs()
    m[20:24, 15:19] = 0  # a hole (an opacity the model missed)
    m[2:4, 2:4] = 255  # a speck in the corner
    m[56:58, 60:62] = 255  # another
    cleaned, kept = masks_mod.clean_mask(m)
    assert kept
    assert np.array_equal(cleaned, _lungs() > 0)


def test_clean_mask_keeps_one_lung_when_the_other_is_missed() -> None:
    m = _lungs()
    m[:, 32:] = 0
    m[40:42, 50:52] = 255  # a speck well under a tenth of the lung
    cleaned, kept = masks_mod.clean_mask(m)
    assert kept and cleaned[:, 32:].sum() == 0 and cleaned[12:50, 10:28].all()


@pytest.mark.parametrize("case", ["empty", "tiny", "everything", "corner blob"])
def test_clean_mask_rejects_implausible_masks(case: str) -> None:
    m = np.zeros((64, 64), dtype=np.uint8)
    if case == "tiny":
        m[30:33, 30:33] = 255
    elif case == "everything":
        m[:] = 255
    elif case == "corner blob":  # a blob outside the chest, as on a small film in a black frame
        m[44:64, 0:16] = 255
    cleaned, kept = masks_mod.clean_mask(m)
    assert not kept and cleaned.sum() == 0  # empty: a classifier then uses the whole image


def test_clean_masks_keeps_the_encoding_and_reports_rejects() -> None:
    stack = np.stack([_lungs(), np.zeros((64, 64), np.uint8)])
    out, kept = masks_mod.clean_masks(stack)
    assert out.dtype == np.uint8 and set(np.unique(out[0])) == {0, 255}
    assert kept.tolist() == [True, False]
