"""Shortcut audit: does the classifier look at the lungs?

COVID-19 X-ray classifiers can score well by reading hospital and device markers, text, borders or
the patient's position instead of the lungs (DeGrave, Janizek & Lee, Nature Machine Intelligence
2021). A Kaggle score cannot tell. Every classifier run therefore measures, on its validation images:

1. **attention inside the lungs** — the share of each image's (positive) Grad-CAM mass that falls inside
   its lung mask, per true class and overall, next to the share of the input the lungs cover (what an
   attention spread evenly over the image would give);
2. **blanking** — validation macro-F1 when everything outside the lungs is blanked, and when the lungs
   are blanked (mask grown by :data:`~lungs_utils.presets.MASK_MARGIN`, black fill as in
   ``masks: multiply``). A model that keeps most of its skill without the lungs is reading something else.

Validation images are train images, so their given masks (``train_lung_masks/``) are used; where the
data has none, the out-of-fold masks of the run's ``mask_run``; without either the audit says why it
could not run. Everything is batched and runs once per run (seconds on a GPU, well under a minute on a
CPU for a few hundred images); ``lungs audit RUN`` reruns it on a finished run from its checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import CLASS_NAMES
from .data import LungsData, XrayDataset
from .presets import apply_masks, grow_mask, resize, to_input

#: Flag a run whose Grad-CAM attention avoids the lungs: mean share inside below this multiple of the
#: share of the input the lungs cover. Not an absolute threshold, and not 1: late-layer Grad-CAM maps are
#: coarse and spill onto the lungs' surroundings. Measured: the CPU recipe on real X-rays 31-32 % inside
#: lungs covering 24 % (x1.3); the demo recipe on the clean phantom 19 % of 26 % (x0.73), on the phantom
#: with a planted corner tag 1.4 % (x0.05).
MIN_ENRICHMENT = 0.5
#: Flag a run whose validation macro-F1 with the lungs blanked keeps at least this share of its
#: skill above chance (chance = 1 / classes) ...
MAX_BLANKED_SKILL = 0.5
#: ... or beats its macro-F1 with everything outside the lungs blanked by this much: it does better
#: without its lungs than without the rest of the film. (Both blanked inputs are far from anything seen
#: in training, so either score alone can collapse to a constant prediction; their order still tells.)
BLANKED_MARGIN = 0.05
#: A model within this much macro-F1 of chance has learnt nothing to audit.
MIN_SKILL = 0.05
#: Images per Grad-CAM batch (activations and gradients of one batch are held at once).
BATCH = 32


def lung_masks(data: LungsData, dataset: XrayDataset, mask_run: str | None,
               progress: bool = False) -> tuple[np.ndarray | None, str]:
    """Lung masks aligned with ``dataset`` (a part of the train images) and where they come from:
    ``(uint8 (N, H, W) or None, source or the reason there are none)``."""
    if data.masks is not None:
        return np.asarray(data.masks.images[dataset.indices]), "given masks (train_lung_masks/)"
    if mask_run:
        from .segmentation import predicted_masks

        oof, _ = predicted_masks(data, mask_run, progress=progress)
        return np.asarray(oof.images[dataset.indices]), f"out-of-fold masks of mask_run {mask_run}"
    return None, ("no lung masks: the data has no train_lung_masks/ and the run has no mask_run; "
                  "train 05_lung_segmentation and pass its run as mask_run to audit this model")


def _masks_at_input(lungs: torch.Tensor, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """The audit masks ``(N, 1, H, W)`` float {0, 1} in the geometry of the network input: resized,
    or cut to the same lung box as the image when the model was trained with ``masks: crop``."""
    size = params["image_size"]
    if params.get("masks") == "crop" and x.shape[1] == 2:
        # Channel 0 is cut out by the box of channel 1 (the model's own mask), as the image was.
        return (apply_masks(torch.cat([lungs, x[:, 1:2].float() / 255.0], dim=1), "crop", size) > 0.5).float()
    return (resize(lungs, size) > 0.5).float() if lungs.shape[-1] != size else lungs


def attention(model: torch.nn.Module, dataset: XrayDataset, lungs: np.ndarray, params: Mapping[str, Any],
              device: torch.device, progress: bool = False) -> dict[str, np.ndarray]:
    """Per image: ``share`` of the Grad-CAM mass (for the predicted class) inside the lungs (NaN for
    an all-zero map), ``area`` of the input the lungs cover, ``pred`` and ``label``."""
    from .gradcam import TARGET_LAYERS, gradcam
    from .progress import bar

    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)
    share, area, pred, layer = [], [], [], ""
    start = 0
    for x, _, _ in bar(loader, desc="audit", disable=not progress, leave=False):
        n = len(x)
        m = torch.from_numpy(lungs[start:start + n] > 127).float().unsqueeze(1)
        start += n
        xin = to_input(x.to(device), params["image_size"], masks=params.get("masks", "none"),
                       histeq=params.get("histeq", False))
        cams, probs, layer = gradcam(model, xin, layer=TARGET_LAYERS.get(params.get("model", "")))
        mask = _masks_at_input(m, x, params)[:, 0].numpy()
        mass = cams.reshape(n, -1).sum(axis=1)
        inside = (cams * mask).reshape(n, -1).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share.append(np.where(mass > 0, inside / mass, np.nan))
        area.append(mask.reshape(n, -1).mean(axis=1))
        pred.append(probs.argmax(axis=1))
    return {"share": np.concatenate(share), "area": np.concatenate(area), "pred": np.concatenate(pred),
            "label": np.asarray(dataset.labels), "layer": np.asarray(layer)}


def blanked(dataset: XrayDataset, lungs: np.ndarray, keep: str) -> XrayDataset:
    """The same images with the (grown) lungs kept and the rest black (``keep="lungs"``), or the lungs
    blacked out (``keep="outside"``); a mask channel the model uses is left as it was."""
    grown = grow_mask(torch.from_numpy(lungs > 127).float().unsqueeze(1))[:, 0].numpy() > 0
    inside = grown if keep == "lungs" else ~grown
    images = np.asarray(dataset.images[dataset.indices]) * inside
    masks = None if dataset.masks is None else np.asarray(dataset.masks[dataset.indices])
    return XrayDataset(images.astype(np.uint8), dataset.ids, dataset.labels, masks)


def _spread(values: np.ndarray) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    if not len(v):
        return {"mean": None, "std": None, "p10": None, "p90": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "n": int(len(v))}


def _skill(full_f1: float) -> float:
    """Macro-F1 above chance (1 / classes)."""
    return full_f1 - 1.0 / len(CLASS_NAMES)


def flags(result: Mapping[str, Any]) -> list[str]:
    """Plain-language warnings for an audit result (empty when nothing looks wrong, and for a model
    without skill, whose attention says nothing)."""
    b = result["blanking"]
    chance = 1.0 / len(CLASS_NAMES)
    skill = _skill(b["full"])
    if skill <= MIN_SKILL:
        return []
    out = []
    share, area = result["lung_share"]["mean"], result["lung_area"]
    if share is not None and share < MIN_ENRICHMENT * area:
        out.append(f"only {share:.0%} of the Grad-CAM attention falls inside the lungs, which cover {area:.0%} of "
                   "the input: the model looks elsewhere")
    kept = b["lungs_blanked"] - chance >= MAX_BLANKED_SKILL * skill
    if kept or b["lungs_blanked"] >= b["outside_blanked"] + BLANKED_MARGIN:
        out.append(f"with the lungs blanked it scores macro-F1 {b['lungs_blanked']:.3f} (whole image {b['full']:.3f}, "
                   f"outside the lungs blanked {b['outside_blanked']:.3f}, chance {chance:.2f}): it reads "
                   "something outside the lungs")
    return out


def run(model: torch.nn.Module, data: LungsData, val: XrayDataset, params: Mapping[str, Any], *,
        device: torch.device, autocast_dtype: torch.dtype | None = None, progress: bool = False
        ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """The audit of one model on its validation set: ``(result for metrics.json, per-image table)``.

    Without lung masks the result is ``{"status": "skipped", "reason": ...}`` and the table None.
    """
    from .metrics import macro_f1
    from .predict import predict_proba

    t0 = time.perf_counter()
    lungs, source = lung_masks(data, val, params.get("mask_run"), progress=progress)
    if lungs is None or len(val) == 0:
        reason = source if lungs is None else "no validation images"
        return {"status": "skipped", "reason": reason}, None
    per_image = attention(model, val, lungs, params, device, progress=progress)
    kwargs = dict(image_size=params["image_size"], device=device, batch_size=max(64, params["batch_size"]),
                  channels_last=params.get("channels_last", False), masks=params.get("masks", "none"),
                  histeq=params.get("histeq", False), autocast_dtype=autocast_dtype)
    y = np.asarray(val.labels)
    scores = {}
    for name, dataset in (("full", val), ("outside_blanked", blanked(val, lungs, "lungs")),
                          ("lungs_blanked", blanked(val, lungs, "outside"))):
        _, probs = predict_proba(model, dataset, **kwargs)
        scores[name] = float(macro_f1(y, probs.argmax(axis=1)))
    share = per_image["share"]
    result: dict[str, Any] = {
        "status": "ok", "mask_source": source, "n": int(len(y)), "layer": str(per_image.pop("layer")),
        "lung_share": _spread(share),
        "lung_share_per_class": {CLASS_NAMES[c]: _spread(share[y == c])["mean"] for c in range(len(CLASS_NAMES))},
        "lung_area": float(np.mean(per_image["area"])),
        "blanking": scores,
    }
    result["flags"] = flags(result)
    result["seconds"] = time.perf_counter() - t0
    per_image["id"] = np.asarray(val.ids)
    return result, per_image


def summary_line(result: Mapping[str, Any] | None) -> str:
    """One paragraph for the notebook: the figures, then the warnings (or that none applies)."""
    if not result:
        return "shortcut audit: off (audit = False)"
    if result.get("status") != "ok":
        return f"shortcut audit: could not run — {result.get('reason')}"
    s, b = result["lung_share"], result["blanking"]
    per = ", ".join(f"{k} {v:.0%}" for k, v in result["lung_share_per_class"].items() if v is not None)
    lines = [f"Grad-CAM attention inside the lungs: {s['mean']:.0%} (p10 {s['p10']:.0%}, p90 {s['p90']:.0%}; "
             f"{per}); the lungs cover {result['lung_area']:.0%} of the input ({result['mask_source']}).",
             f"validation macro-F1: whole image {b['full']:.3f}, outside the lungs blanked "
             f"{b['outside_blanked']:.3f}, lungs blanked {b['lungs_blanked']:.3f}."]
    if _skill(b["full"]) <= MIN_SKILL:
        lines.append("The model scores near chance: there is nothing to audit yet.")
    else:
        lines += [f"WARNING: {f}" for f in result["flags"]] or [
            "No shortcut sign: attention is not drawn away from the lungs, and blanking them costs at least as "
            "much as blanking the rest."]
    return "\n".join(lines)
