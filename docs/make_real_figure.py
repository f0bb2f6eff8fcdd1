"""Make the README's real-X-ray picture from two finished runs on real data (no image is committed but
the figure itself).

    python docs/make_real_figure.py SEG_RUN CLASSIFIER_RUN [--out docs/real_xrays.png]

Top: out-of-fold lung masks of the segmentation run against the given masks (its worst three images and
three at random). Bottom: Grad-CAM of the classifier run on validation images, one row per class.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lungs_utils.xrays import data as data_mod
from lungs_utils.analysis import gradcam
from lungs_utils.stats import plots
from lungs_utils.stats.metrics import dice_iou
from lungs_utils.engine.checkpoint import load_model
from lungs_utils.runfolder import CLASSIFIER, MASKS_DIR, OOF_MASKS, SPLIT_FILE, RunFolder
from lungs_utils.xrays.folds import Split


def _png(fig) -> Image.Image:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def masks_panel(seg_run: Path, data: data_mod.LungsData, worst: int = 3, random: int = 3) -> Image.Image:
    files = data_mod.list_images(seg_run / MASKS_DIR / OOF_MASKS)
    rows = np.flatnonzero(np.isin(data.train.ids, list(files)))
    predicted = np.stack([np.asarray(Image.open(files[int(data.train.ids[r])]).convert("L").resize(
        data.image_size[::-1])) for r in rows])
    truth = np.asarray(data.masks.images[rows])
    dice = np.array([dice_iou(p > 127, t > 127)["dice"] for p, t in zip(predicted, truth)])
    low = np.argsort(dice)[:worst]
    pick = np.concatenate([low, np.random.default_rng(0).choice(np.setdiff1d(np.arange(len(rows)), low),
                                                                  random, replace=False)])
    fig = plots.mask_comparison(np.asarray(data.train.images[rows[pick]]), predicted[pick],
                                data.train.ids[rows[pick]], truth=truth[pick], cols=len(pick),
                                title=f"Real films: out-of-fold lung masks ({worst} worst, {random} random)")
    return _png(fig)


def gradcam_panel(run: Path, data: data_mod.LungsData) -> Image.Image:
    folder = RunFolder(run)
    params = folder.load_params()
    if params["masks"] != "none" or folder.kind != CLASSIFIER:
        raise SystemExit(f"{run}: pick a single-split classifier run with masks: none")
    _, val, _ = data_mod.datasets(data, Split.read(run / SPLIT_FILE).part(0))
    model = load_model(params, folder.checkpoints()[0], torch.device("cpu"))
    return _png(gradcam.examples(model.eval(), val, params, per_class=4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seg_run", type=Path)
    ap.add_argument("classifier_run", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("real_xrays.png"))
    args = ap.parse_args()
    seg_params = RunFolder(args.seg_run).load_params()
    data = data_mod.load(seg_params["data_dir"], progress=False)
    top, bottom = masks_panel(args.seg_run, data), gradcam_panel(args.classifier_run, data)
    width = max(top.width, bottom.width)
    canvas = Image.new("RGB", (width, top.height + bottom.height), "white")
    canvas.paste(top, ((width - top.width) // 2, 0))
    canvas.paste(bottom, ((width - bottom.width) // 2, top.height))
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
