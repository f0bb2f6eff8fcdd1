"""Pictures (lungs_utils.stats.plots) and Grad-CAM (lungs_utils.analysis.gradcam): every function draws, saves and
handles the awkward cases (one epoch, no mistakes, a class missing); Grad-CAM works for every model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from lungs_utils import CLASS_NAMES, LungsError, models
from lungs_utils.analysis import gradcam
from lungs_utils.stats import plots
from lungs_utils.stats.metrics import classification_metrics

from conftest import write_dataset


def history(epochs: int = 3) -> pd.DataFrame:
    e = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                         "train_accuracy": 0.5 + e / 20, "val_accuracy": 0.45 + e / 25,
                         "train_macro_f1": 0.4 + e / 20, "val_macro_f1": [0.5, 0.7, 0.6][:epochs]})


def val_frame() -> pd.DataFrame:
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.05, 0.9, 0.05],
                      [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    frame = pd.DataFrame({"id": [10, 11, 12, 13, 14, 15], "true": [0, 1, 2, 0, 2, 1],
                          "predicted": probs.argmax(axis=1)})
    for k in range(3):
        frame[f"p{k}"] = probs[:, k]
    return frame


def test_show_saves_png_and_returns_nothing(tmp_path: Path) -> None:
    fig = plots.learning_curves(history())
    assert plots.show(fig, tmp_path, "curves") is None
    png = tmp_path / "plots" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("epochs", [1, 3])
def test_learning_curves_marks_the_best_epoch(epochs: int) -> None:
    fig = plots.learning_curves(history(epochs), title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    texts = [t.get_text() for t in fig.axes[2].texts]
    best = 2 if epochs == 3 else 1
    assert any(f"@ {best}" in t for t in texts)


def test_confusion_matrix_annotates_counts_and_row_shares() -> None:
    fig = plots.confusion_matrix([[8, 2, 0], [1, 5, 4], [0, 0, 0]])
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "8\n80%" in texts and "4\n40%" in texts and "0\n0%" in texts  # empty row: no division error


def test_per_class_table_and_bars_from_metrics() -> None:
    metrics = classification_metrics(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0]))
    table = plots.per_class_table(metrics)
    assert list(table.index) == [*CLASS_NAMES, "macro avg"]
    assert table.loc["other disease", "recall"] == 1.0
    assert table.loc["macro avg", "f1"] == pytest.approx(round(metrics["macro_f1"], 3))
    assert table.loc["macro avg", "support"] == 6
    assert isinstance(plots.per_class_bars(metrics), Figure)


def test_most_confident_mistakes_orders_by_confidence() -> None:
    wrong = plots.most_confident_mistakes(val_frame(), n=10)
    assert list(wrong["id"]) == [13, 14, 15]  # 0.9, then 0.6 (id 14) ties 0.6 (id 15): ids break it
    assert (wrong["true"] != wrong["predicted"]).all()
    assert plots.most_confident_mistakes(val_frame(), n=1)["id"].tolist() == [13]


def test_confident_mistakes_grid_and_the_no_mistake_case() -> None:
    images = np.random.default_rng(0).integers(0, 255, (6, 16, 16), dtype=np.uint8)
    ids = np.array([10, 11, 12, 13, 14, 15])
    fig = plots.confident_mistakes(val_frame(), images, ids, n=4, cols=2)
    assert sum(1 for ax in fig.axes if ax.images) == 3
    right = val_frame().assign(true=lambda f: f["predicted"])
    fig = plots.confident_mistakes(right, images, ids)
    assert "no validation mistakes" in fig.axes[0].texts[0].get_text()


def test_data_pictures(tiny_data: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 24, 24), dtype=np.uint8)
    masks = np.zeros_like(images)
    masks[:, 4:20, 4:20] = 255
    labels = np.arange(30) % 3
    for fig in (plots.intensity_histograms(images, labels, masks=masks, max_images=12),
                plots.intensity_histograms(images, labels),
                plots.split_balance(pd.DataFrame({"target_feature": labels,
                                                  "split": ["train", "val"] * 15}))):
        assert isinstance(fig, Figure)
    sizes = plots.image_size_counts(tiny_data)
    assert set(sizes["folder"]) == {"train_images", "test_images", "train_lung_masks"}
    assert (sizes["width"] == 32).all() and sizes["images"].sum() == 12 + 4 + 12


def test_comparison_pictures() -> None:
    table = pd.DataFrame({"run": ["a", "b", "c"], "model": ["x", "y", "ensemble (mean)"],
                          "val_macro_f1": [0.9, 0.8, np.nan], "train_minutes": [1.0, 2.0, np.nan],
                          "images_per_s": [100.0, 50.0, np.nan]})
    assert isinstance(plots.leaderboard_bars(table), Figure)
    assert isinstance(plots.leaderboard_bars(table.iloc[:0]), Figure)
    assert isinstance(plots.leaderboard_tradeoff(table), Figure)
    fig = plots.ensemble_comparison({"a": 0.8, "b": 0.7}, 0.85, "mean")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "ensemble (mean)" or labels[-1] == "ensemble (mean)"
    assert isinstance(plots.run_overview(history(), [[3, 1, 0], [0, 4, 0], [1, 0, 2]], "x"), Figure)


# ------------------------------------------------------------------------------------------------ Grad-CAM
@pytest.mark.parametrize("name", models.names())
def test_gradcam_works_for_every_registered_model(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name).to(memory_format=torch.channels_last)
    model.train()
    x = torch.randn(2, 1, 32, 32)
    cams, probs, layer = gradcam.gradcam(model, x)
    assert cams.shape == (2, 32, 32) and probs.shape == (2, 3)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no gradients left on the weights
    assert isinstance(model.get_submodule(layer), torch.nn.Conv2d)
    if name == "unet":
        assert layer != "mask_head"  # the segmentation head does not feed the classifier


def test_gradcam_layer_override_and_errors() -> None:
    model = models.build("simple_cnn")
    cams, _, layer = gradcam.gradcam(model, torch.randn(1, 1, 32, 32), layer="features.0", target=[2])
    assert layer == "features.0" and cams.shape == (1, 32, 32)
    with pytest.raises(LungsError, match="no layer"):
        gradcam.gradcam(model, torch.randn(1, 1, 32, 32), layer="nope")


def test_gradcam_examples_one_row_per_class(tmp_path: Path) -> None:
    from lungs_utils.xrays import data as data_mod

    write_dataset(tmp_path / "d", n_train=15, n_test=2, size=32)
    dataset = data_mod.load(tmp_path / "d", cache_dir=tmp_path / "cache", progress=False)
    split = data_mod.make_split(dataset.labels, 0.5, seed=0)
    _, val, _ = data_mod.datasets(dataset, split.part(0))
    params = {"image_size": 32, "seed": 0, "model": "resnet_tiny"}
    fig = gradcam.examples(models.build("resnet_tiny"), val, params, per_class=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(gradcam.pick_examples(val.labels, 2))
    assert len(fig.axes) == 3 * 2  # rows = classes, columns = per_class
    assert len(gradcam.pick_examples(np.array([0, 0, 0, 1]), 2)) == 3
