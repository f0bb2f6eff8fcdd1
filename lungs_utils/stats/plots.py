"""Pictures for notebooks and reports. Every function returns a matplotlib ``Figure`` (no pyplot state),
which Jupyter shows inline and :func:`save` writes atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import CLASS_NAMES
from ..io import atomic_path

PALETTE = ("#4C72B0", "#DD8452", "#C44E52")  # normal, other disease, COVID-19 — same in every plot


def save(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write a figure (format from the suffix) via a temporary file; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return path


def class_balance(labels: pd.Series | Sequence[int], title: str = "Class balance") -> Figure:
    """Bar chart of images per class with counts and shares on the bars."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(CLASS_NAMES))
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    bars = ax.bar(CLASS_NAMES, counts, color=PALETTE)
    total = max(int(counts.sum()), 1)
    for bar, n in zip(bars, counts):
        ax.annotate(f"{n} ({n / total:.0%})", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.set_ylim(0, counts.max() * 1.18 + 1)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def sample_grid(images: np.ndarray, labels: Sequence[int], ids: Sequence[int], per_class: int = 6,
                seed: int = 0, masks: np.ndarray | None = None, title: str | None = None) -> Figure:
    """A row of random examples per class (``images``: ``(N, H, W)`` uint8), optional mask outlines."""
    labels = np.asarray(labels)
    ids = np.asarray(ids)
    rng = np.random.default_rng(seed)
    n_rows = len(CLASS_NAMES)
    fig = Figure(figsize=(1.6 * per_class, 1.75 * n_rows))
    axes = fig.subplots(n_rows, per_class, squeeze=False)
    for c, row in enumerate(axes):
        pool = np.flatnonzero(labels == c)
        pick = np.sort(rng.choice(pool, size=min(per_class, len(pool)), replace=False)) if len(pool) else []
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if j >= len(pick):
                continue
            k = int(pick[j])
            ax.imshow(images[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if masks is not None:
                ax.contour(masks[k] > 127, levels=[0.5], colors=["#39d353"], linewidths=0.8)
            ax.set_title(f"id {ids[k]}", fontsize=7)
        row[0].set_ylabel(CLASS_NAMES[c], fontsize=10, color=PALETTE[c])
        row[0].spines[:].set_visible(True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Showing and saving (notebooks)
# ------------------------------------------------------------------------------------------------
def _png(fig: Figure, dpi: int) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def show(fig: Figure, run_dir: str | os.PathLike[str] | None = None, name: str | None = None,
         dpi: int = 110) -> None:
    """Display ``fig`` inline (in IPython) and, given a run folder, save it as ``plots/<name>.png``.

    The PNG is rendered once and shown as an image, so display does not depend on matplotlib's
    inline-backend hooks (figures here never go through pyplot). Returns nothing, so a notebook
    cell ending with it shows the picture and no ``Out[]`` line.
    """
    data = _png(fig, dpi)
    if run_dir is not None:
        with atomic_path(Path(run_dir) / "plots" / f"{name or 'figure'}.png") as tmp:
            tmp.write_bytes(data)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:  # plain Python without IPython: saving is all we can do
        return
    if get_ipython() is not None:
        display(Image(data=data, format="png"))


def _clean(ax) -> None:  # noqa: ANN001
    ax.spines[["top", "right"]].set_visible(False)


# ------------------------------------------------------------------------------------------------
# Data (00_data)
# ------------------------------------------------------------------------------------------------
def split_balance(split: pd.DataFrame, title: str = "Images per class and split") -> Figure:
    """Grouped bars: images per class in the train and validation parts of a split."""
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.subplots()
    parts = [p for p in ("train", "val") if p in set(split["split"])]
    width = 0.8 / max(len(parts), 1)
    x = np.arange(len(CLASS_NAMES))
    for j, part in enumerate(parts):
        labels = split.loc[split["split"] == part, "target_feature"].to_numpy(np.int64)
        counts = np.bincount(labels, minlength=len(CLASS_NAMES))
        bars = ax.bar(x + (j - (len(parts) - 1) / 2) * width, counts, width, label=part,
                      color=PALETTE, alpha=1.0 if part == "train" else 0.55, edgecolor="black",
                      linewidth=0.4)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, CLASS_NAMES)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(frameon=False)
    _clean(ax)
    return fig


def _sample_rows(n: int, max_images: int, seed: int) -> np.ndarray:
    if n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))


def intensity_histograms(images: np.ndarray, labels: Sequence[int], masks: np.ndarray | None = None,
                         bins: int = 64, max_images: int = 300, seed: int = 0) -> Figure:
    """Per-class grey-level distributions: pixel histograms (inside the lung masks when given) and
    the distribution of per-image mean intensity.

    At most ``max_images`` images (a seeded random sample) are read, so it stays fast on the real
    27k-image set; ``images`` may be a memory map.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rows = _sample_rows(len(labels), max_images, seed)
    sample = np.asarray(images[rows], dtype=np.float32) / 255.0
    inside = None if masks is None else np.asarray(masks[rows]) > 127
    y = labels[rows]
    fig = Figure(figsize=(10, 3.4))
    ax_pix, ax_mean = fig.subplots(1, 2)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for c, name in enumerate(CLASS_NAMES):
        pick = y == c
        if not pick.any():
            continue
        pixels = sample[pick][inside[pick]] if inside is not None else sample[pick].ravel()
        hist, _ = np.histogram(pixels, bins=edges, density=True)
        ax_pix.plot((edges[:-1] + edges[1:]) / 2, hist, color=PALETTE[c], label=name, lw=1.6)
        means = sample[pick].mean(axis=(1, 2))
        ax_mean.hist(means, bins=20, range=(0, 1), color=PALETTE[c], alpha=0.45, label=name)
    where = "inside lung masks" if inside is not None else "whole image"
    ax_pix.set(title=f"Pixel intensity ({where})", xlabel="intensity (0-1)", ylabel="density")
    ax_mean.set(title="Mean intensity per image", xlabel="mean intensity (0-1)", ylabel="images")
    for ax in (ax_pix, ax_mean):
        ax.legend(frameon=False, fontsize=8)
        _clean(ax)
    fig.suptitle(f"{len(rows)} train images" + (" (random sample)" if len(rows) < len(labels) else ""),
                 fontsize=9)
    fig.tight_layout()
    return fig


def image_size_counts(data_dir: str | os.PathLike[str], max_files: int = 2000, seed: int = 0
                      ) -> pd.DataFrame:
    """Image sizes found on disk per folder: ``folder, width, height, mode, images``.

    Reads only PNG headers, of at most ``max_files`` seeded-random files per folder. The network
    sees every image at ``image_size`` anyway; this shows whether the cache had to resize any.
    """
    from PIL import Image

    rows = []
    for folder in ("train_images", "test_images", "train_lung_masks"):
        files = sorted((Path(data_dir) / folder).glob("img_*.png"))
        if not files:
            continue
        pick = _sample_rows(len(files), max_files, seed)
        for i in pick:
            with Image.open(files[int(i)]) as im:
                rows.append((folder, im.size[0], im.size[1], im.mode))
    frame = pd.DataFrame(rows, columns=["folder", "width", "height", "mode"])
    return (frame.groupby(["folder", "width", "height", "mode"], sort=False).size()
            .rename("images").reset_index())


# ------------------------------------------------------------------------------------------------
# Training results (model notebooks)
# ------------------------------------------------------------------------------------------------
def learning_curves(history: pd.DataFrame, title: str | None = None) -> Figure:
    """Loss and the task's metrics per epoch, train (dashed) vs validation (solid), best epoch marked.

    Classification: loss, accuracy, macro-F1. Segmentation (a ``val_dice`` column): loss, IoU, Dice,
    one colour per fold when there is a ``fold`` column.
    """
    seg = "val_dice" in history
    panels = (("loss", "loss"), ("iou", "IoU"), ("dice", "Dice")) if seg else \
        (("loss", "loss"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
    score = panels[-1][0]
    fig = Figure(figsize=(12, 3.3))
    axes = fig.subplots(1, 3)
    groups = list(history.groupby("fold")) if "fold" in history else [(None, history)]
    colours = sns_palette(len(groups)) if len(groups) > 1 else ["#4C72B0"]
    for (fold, part_history), colour in zip(groups, colours):
        epochs = part_history["epoch"].to_numpy() if "epoch" in part_history else \
            np.arange(1, len(part_history) + 1)
        marker = "o" if len(part_history) <= 12 else None
        suffix = "" if fold is None else f" (fold {fold})"
        for ax, (metric, label) in zip(axes, panels):
            for part, style in (("train", "--"), ("val", "-")):
                col = f"{part}_{metric}"
                if col in part_history:
                    shown = part_history[col].notna().to_numpy()  # val_every: only the validated epochs
                    ax.plot(epochs[shown], part_history[col][shown], style, marker=marker, ms=3.5, label=part + suffix,
                            color=colour if part == "val" or fold is not None else "#8C8C8C",
                            alpha=1.0 if part == "val" else 0.6)
            ax.set(title=label, xlabel="epoch")
        col = f"val_{score}"
        if col in part_history and len(part_history):
            best = int(np.nanargmax(part_history[col].to_numpy()))
            value = float(part_history[col].iloc[best])
            axes[2].axvline(epochs[best], color="#C44E52", lw=0.8, ls=":")
            axes[2].annotate(f"best {value:.3f} @ {epochs[best]}", (epochs[best], value), fontsize=8,
                             xytext=(4, -12), textcoords="offset points", color="#C44E52")
    for ax in axes:
        _clean(ax)
        ax.legend(frameon=False, fontsize=7 if len(groups) > 1 else 8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sns_palette(n: int) -> list:
    """``n`` distinct colours (seaborn's default palette)."""
    import seaborn as sns

    return sns.color_palette(n_colors=n)


def image_grid(n: int, cols: int, cell: tuple[float, float] = (2.0, 2.2)) -> tuple[Figure, np.ndarray]:
    """A figure of ``n`` image slots filled row by row, ``cols`` wide, axes off: (figure, flat axes)."""
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(cell[0] * cols, cell[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    return fig, axes


def mask_comparison(images: np.ndarray, predicted: np.ndarray, ids: Sequence[int],
                    truth: np.ndarray | None = None, cols: int = 6, title: str | None = None) -> Figure:
    """Images ``(N, H, W)`` with predicted lung masks (red outline) and, when given, the true ones
    (green), each titled with its id and, with ``truth``, its Dice."""
    from .metrics import dice_iou

    n = len(images)
    fig, axes = image_grid(n, cols, cell=(1.9, 2.05))
    for k, ax in enumerate(axes[:n]):
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        text = f"id {ids[k]}"
        if truth is not None:
            ax.contour(truth[k] > 127, levels=[0.5], colors=["#39d353"], linewidths=0.9)
            text += f"  Dice {dice_iou(predicted[k] > 127, truth[k] > 127)['dice']:.3f}"
        if (predicted[k] > 127).any():
            ax.contour(predicted[k] > 127, levels=[0.5], colors=["#ff4d4d"], linewidths=0.9)
        ax.set_title(text, fontsize=7.5)
    legend = "red: predicted" + (", green: given" if truth is not None else "")
    fig.suptitle(f"{title}  ({legend})" if title else legend, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, title: str = "Validation confusion matrix",
                     ax=None) -> Figure:  # noqa: ANN001
    """Seaborn heatmap of a confusion matrix (rows true, columns predicted): counts and row shares,
    coloured by the share of each true class (so small classes read as clearly as big ones)."""
    import seaborn as sns

    cm = np.asarray(cm, dtype=np.int64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    annot = np.array([[f"{cm[i, j]}\n{share[i, j]:.0%}" for j in range(cm.shape[1])]
                      for i in range(cm.shape[0])])
    fig = ax.figure if ax is not None else Figure(figsize=(4.6, 3.9))
    ax = ax if ax is not None else fig.subplots()
    names = list(CLASS_NAMES[: cm.shape[0]])
    sns.heatmap(share, annot=annot, fmt="", cmap="Blues", vmin=0, vmax=1, cbar=False, square=True,
                xticklabels=names, yticklabels=names, ax=ax, linewidths=0.5, linecolor="white",
                annot_kws={"fontsize": 9})
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.tick_params(axis="y", rotation=0)
    return fig


def per_class_table(metrics: dict) -> pd.DataFrame:
    """Precision / recall / F1 / support per class plus the macro average, from ``metrics.json``
    (or :func:`lungs_utils.stats.metrics.from_confusion`) output."""
    per_class = metrics["per_class"]
    frame = pd.DataFrame(per_class).T[["precision", "recall", "f1", "support"]]
    frame.loc["macro avg"] = [frame["precision"].mean(), frame["recall"].mean(), frame["f1"].mean(),
                              frame["support"].sum()]
    frame["support"] = frame["support"].astype(int)
    return frame.round(3)


def per_class_bars(metrics: dict, title: str = "Per-class validation metrics") -> Figure:
    """Grouped bars of precision, recall and F1 for each class."""
    table = per_class_table(metrics).drop(index="macro avg")
    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.subplots()
    x = np.arange(len(table))
    for j, (col, color) in enumerate((("precision", "#9ECAE1"), ("recall", "#4292C6"), ("f1", "#08519C"))):
        bars = ax.bar(x + (j - 1) * 0.27, table[col], 0.27, label=col, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, table.index)
    ax.set_ylim(0, 1.12)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, ncols=3, loc="upper center")
    _clean(ax)
    return fig


def most_confident_mistakes(val_frame: pd.DataFrame, n: int = 12) -> pd.DataFrame:
    """The ``n`` wrong validation predictions with the highest predicted-class probability
    (``val_predictions.csv`` columns plus ``confidence``), most confident first."""
    probs = val_frame[[f"p{k}" for k in range(len(CLASS_NAMES))]].to_numpy()
    frame = val_frame.assign(confidence=probs.max(axis=1))
    wrong = frame[frame["true"] != frame["predicted"]]
    return wrong.sort_values(["confidence", "id"], ascending=[False, True], kind="stable").head(n)


def confident_mistakes(val_frame: pd.DataFrame, images: np.ndarray, ids: Sequence[int], n: int = 12,
                       cols: int = 6) -> Figure:
    """Image grid of :func:`most_confident_mistakes` (``images``/``ids``: the train image array)."""
    mistakes = most_confident_mistakes(val_frame, n)
    position = {int(i): k for k, i in enumerate(np.asarray(ids))}
    rows = max(1, -(-len(mistakes) // cols))
    fig = Figure(figsize=(1.9 * cols, 2.15 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    if mistakes.empty:
        axes[0].text(0, 0.5, "no validation mistakes", fontsize=11)
    for ax, row in zip(axes, mistakes.itertuples(index=False)):
        ax.imshow(images[position[int(row.id)]], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"id {row.id}: {CLASS_NAMES[row.true]}\n→ {CLASS_NAMES[row.predicted]} "
                     f"({row.confidence:.0%})", fontsize=7.5, color=PALETTE[row.predicted])
    fig.suptitle(f"Most confident mistakes ({len(mistakes)} of "
                 f"{int((val_frame['true'] != val_frame['predicted']).sum())} wrong)", fontsize=10)
    fig.tight_layout()
    return fig


def run_overview(history: pd.DataFrame, cm: Sequence[Sequence[int]] | np.ndarray,
                 title: str | None = None) -> Figure:
    """One compact figure of a run: loss and macro-F1 curves next to the confusion matrix."""
    fig = Figure(figsize=(11, 3.4))
    ax_loss, ax_f1, ax_cm = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.9]})
    epochs = history["epoch"].to_numpy()
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_f1, "macro_f1", "macro-F1")):
        ax.plot(epochs, history[f"train_{metric}"], "--", color="#8C8C8C", label="train")
        shown = history[f"val_{metric}"].notna().to_numpy()  # val_every: only the validated epochs
        ax.plot(epochs[shown], history[f"val_{metric}"][shown], "-", color="#4C72B0", label="val")
        ax.set(title=label, xlabel="epoch")
        ax.legend(frameon=False, fontsize=8)
        _clean(ax)
    confusion_matrix(cm, ax=ax_cm)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Comparing runs (90_ensemble, 95_leaderboard)
# ------------------------------------------------------------------------------------------------
def ensemble_comparison(members_f1: dict[str, float], ensemble_f1: float, method: str = "ensemble"
                        ) -> Figure:
    """Horizontal bars: each member's validation macro-F1 and the ensemble's (highlighted)."""
    names = list(members_f1) + [f"ensemble ({method})"]
    values = list(members_f1.values()) + [ensemble_f1]
    fig = Figure(figsize=(6.5, 0.45 * len(names) + 1.2))
    ax = fig.subplots()
    colors = ["#8C8C8C"] * len(members_f1) + ["#C44E52"]
    bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
    ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xlim(min(0.0, min(values)), 1.08)
    ax.set(xlabel="validation macro-F1", title="Members vs ensemble")
    _clean(ax)
    return fig


def leaderboard_bars(table: pd.DataFrame, top: int = 25) -> Figure:
    """Validation macro-F1 of each run (best first), coloured by model, with its 95 % interval."""
    import seaborn as sns

    data = table.dropna(subset=["val_macro_f1"]).head(top).reset_index(drop=True)
    fig = Figure(figsize=(7, 0.4 * max(len(data), 1) + 1.3))
    ax = fig.subplots()
    if data.empty:
        ax.text(0.5, 0.5, "no finished runs", ha="center")
        ax.axis("off")
        return fig
    sns.barplot(data=data, y="run", x="val_macro_f1", hue="model", dodge=False, ax=ax, palette="deep")
    for container in ax.containers:
        ax.bar_label(container, fmt="%.3f", fontsize=8, padding=2)
    if {"val_f1_low", "val_f1_high"} <= set(data.columns):
        f1 = pd.to_numeric(data["val_macro_f1"], errors="coerce").to_numpy()
        low = pd.to_numeric(data["val_f1_low"], errors="coerce").to_numpy()
        high = pd.to_numeric(data["val_f1_high"], errors="coerce").to_numpy()
        ok = np.isfinite(low) & np.isfinite(high)
        ax.errorbar(f1[ok], np.flatnonzero(ok), xerr=[f1[ok] - low[ok], high[ok] - f1[ok]], fmt="none",
                    ecolor="#333333", elinewidth=1, capsize=2, label="95% CI")
    ax.set(xlabel="validation macro-F1 (95% bootstrap interval)", ylabel="", xlim=(0, 1.1),
           title="Runs by validation macro-F1")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    _clean(ax)
    return fig


def leaderboard_tradeoff(table: pd.DataFrame) -> Figure:
    """Validation macro-F1 against training time and against training throughput, one dot per run."""
    data = table.dropna(subset=["val_macro_f1"])
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for ax, col, label in ((axes[0], "train_minutes", "training time (minutes)"),
                           (axes[1], "images_per_s", "training throughput (images/s)")):
        part = data.dropna(subset=[col]) if col in data else data.iloc[:0]
        for model_name, group in part.groupby("model", sort=True):
            ax.scatter(group[col], group["val_macro_f1"], label=model_name, s=30)
            for row in group.itertuples(index=False):
                ax.annotate(str(row.run), (getattr(row, col), row.val_macro_f1), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel="validation macro-F1")
        _clean(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle("Accuracy vs cost")
    fig.tight_layout()
    return fig


def audit_panels(result: dict, table: dict | pd.DataFrame) -> Figure:
    """The shortcut audit at a glance. Top: the share of Grad-CAM attention inside the lungs per held-out
    image and true class (with the lungs' area for reference), and macro-F1 on the whole image, with
    everything outside the lungs blanked, and with the lungs blanked (95 % intervals). Bottom: per class,
    how much of its probability each grid cell outside the chest carries when occluded (grey: inside the
    chest, not searched); the hot spot is outlined, in red when it is flagged."""
    frame = pd.DataFrame({k: table[k] for k in ("label", "share")})
    fig = Figure(figsize=(11, 6.4))
    grid = fig.add_gridspec(2, 4, height_ratios=(1, 1.15), width_ratios=(1, 1, 1, 0.05))
    ax, bx = fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2:])
    shares = [frame.loc[frame["label"] == c, "share"].dropna().to_numpy() for c in range(len(CLASS_NAMES))]
    shown = [(name, s) for name, s in zip(CLASS_NAMES, shares) if len(s)]
    if shown:
        ax.boxplot([s for _, s in shown], tick_labels=[n for n, _ in shown], widths=0.5,
                   orientation="horizontal")
    ax.axvline(result["lung_area"], color="#888", ls="--", lw=1, label=f"lung area {result['lung_area']:.0%}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of Grad-CAM attention inside the lungs")
    ax.set_title(f"Attention inside the lungs (mean {result['lung_share']['mean']:.0%}, {result['n']} images)",
                 fontsize=10)
    ax.legend(frameon=False, fontsize=7.5, loc="lower right")
    b, ci = result["blanking"], result.get("blanking_ci", {})
    keys = ("full", "outside_blanked", "lungs_blanked")
    values = [b[k] for k in keys]
    errors = np.array([[b[k] - ci[k][0], ci[k][1] - b[k]] if k in ci else [0, 0] for k in keys]).T
    bars = bx.bar(("whole", "outside\nblanked", "lungs\nblanked"), values, yerr=errors, capsize=3,
                  color=("#4C72B0", "#55A868", "#C44E52"))
    bx.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    bx.axhline(1 / len(CLASS_NAMES), color="#888", ls="--", lw=1, label="chance")
    bx.set_ylim(0, 1.1)
    bx.set_ylabel("macro-F1")
    bx.set_title("Blanking (shown, not flagged)", fontsize=10)
    bx.tick_params(axis="x", labelsize=8)
    bx.legend(frameon=False, fontsize=7.5)
    for axis in (ax, bx):
        _clean(axis)
    spot = result.get("hotspot") or {}
    maps = np.array(spot.get("map") or [], dtype=float)
    if maps.size:
        from matplotlib.patches import Rectangle

        top = max(0.1, float(np.nanmax(np.abs(maps))) if np.isfinite(maps).any() else 0.1)
        flagged = spot.get("low") is not None and spot["low"] > spot["threshold"]
        for c, name in enumerate(CLASS_NAMES):
            cx = fig.add_subplot(grid[1, c])
            cmap = _colormap("RdBu_r")
            cmap.set_bad("#DDDDDD")
            image = cx.imshow(np.ma.masked_invalid(maps[c]), cmap=cmap, vmin=-top, vmax=top)
            if spot.get("class") == c:
                r, col = spot["cell"]
                cx.add_patch(Rectangle((col - 0.5, r - 0.5), 1, 1, fill=False, lw=2,
                                       ec="#C00000" if flagged else "#222222"))
            cx.set_title(name, fontsize=9)
            cx.set_xticks([])
            cx.set_yticks([])
        fig.colorbar(image, cax=fig.add_subplot(grid[1, 3]), label="probability lost")
        fig.text(0.5, 0.47, f"Occlusion outside the chest: the mean drop of each class's probability when one "
                 f"{spot['grid']}x{spot['grid']} grid cell is hidden (grey: inside the chest)", ha="center",
                 fontsize=9.5)
    fig.subplots_adjust(hspace=0.5, wspace=0.25, left=0.1, right=0.93, top=0.95, bottom=0.04)
    return fig


def _colormap(name: str):  # noqa: ANN202 - a matplotlib Colormap
    """A copy of a named matplotlib colormap (safe to modify)."""
    from matplotlib import colormaps

    return colormaps[name].copy()


def reliability_diagram(raw: np.ndarray, y_true: Sequence[int], temperature: float | None = None) -> Figure:
    """Accuracy against confidence of the top class (15 bins) for the raw validation probabilities and,
    given a ``temperature``, after temperature scaling; the diagonal is perfect calibration. The legend
    gives NLL and ECE of each."""
    from .calibration import apply_temperature, ece, nll, reliability

    calibrated = apply_temperature(raw, temperature) if temperature is not None else None
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#888", ls="--", lw=1)
    sets = [("raw", raw, "#C44E52")] + ([(f"T = {temperature:.2f}", calibrated, "#4C72B0")]
                                        if calibrated is not None else [])
    for label, probs, color in sets:
        r = reliability(probs, np.asarray(y_true))
        used = r["count"] > 0
        ax.plot(r["confidence"][used], r["accuracy"][used], "o-", color=color, ms=4,
                label=f"{label}: NLL {nll(probs, y_true):.3f}, ECE {ece(probs, y_true):.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability on validation images", fontsize=10)
    ax.legend(frameon=False, fontsize=7.5, loc="upper left")
    _clean(ax)
    fig.tight_layout()
    return fig
