"""Shortcut audit: does the classifier look at the lungs, or at something outside the chest?

COVID-19 X-ray classifiers can score well by reading hospital and device markers, text, borders or
the patient's position instead of the lungs (DeGrave, Janizek & Lee, Nature Machine Intelligence
2021). A Kaggle score cannot tell. Every classifier run therefore measures, on its held-out images (the
validation split, or on a cross-validation run every train image, each by the fold model that never saw
it), three things, each with a bootstrap interval over those images (:mod:`lungs_utils.stats.bootstrap`):

1. **where the evidence outside the chest sits** — an occlusion map. Each cell of a :data:`GRID` x
   :data:`GRID` grid that lies outside the (grown) hull of the lungs is replaced by its own mean
   intensity, one cell at a time, and the drop of the true class's probability is recorded per image and
   cell. Averaged over the images of each class, a marker that a model reads shows as a hot spot: one
   cell whose occlusion takes probability away from one class, wherever on the film the marker sits.
   The hot spot's interval is simultaneous over every (class, cell) searched (max-t bootstrap), so
   picking the largest of ~150 means does not flatter it. Flagged when that interval clears
   :data:`MIN_HOTSPOT`. Occluding one small cell keeps the film close to what the model was trained on,
   unlike blanking everything at once.
2. **attention inside the lungs** — the share of each image's Grad-CAM mass inside its lung mask, next to
   the share of the input the lungs cover. Flagged when the interval of the mean share lies wholly below
   :data:`MIN_ENRICHMENT` times the lungs' area.
3. **blanking** — macro-F1 with everything outside the lungs blanked, and with the lungs blanked, and
   their paired difference. Reported with intervals, never a flag on its own: both blanked inputs are far
   from anything seen in training, and measured on real COVID-QU-Ex films a clean model did better with
   its lungs blanked than with the rest blanked (it uses the heart, the diaphragm and the film's edges
   too), so the order of the two scores does not single out a shortcut.

Validation images are train images, so their given masks (``train_lung_masks/``) are used; where the
data has none, the out-of-fold masks of the run's ``mask_run``; without either the audit says why it
could not run. :func:`model_figures` takes one model's per-image figures, :func:`assess` turns the pooled
figures (several fold models' on a cross-validation run) into the result; ``lungs audit RUN`` reruns it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import CLASS_NAMES, NUM_CLASSES
from ..engine.inference import infer
from ..engine.predict import PredictSettings, predict_proba
from ..progress import bar
from ..stats.bootstrap import Interval, f1_interval, mean_interval, paired_f1_difference, resample_counts
from ..xrays.data import LungsData, XrayDataset
from ..xrays.masks import train_image_masks
from ..xrays.presets import apply_masks, grow_mask, resize
from .gradcam import TARGET_LAYERS, gradcam

#: Flag a run whose Grad-CAM attention avoids the lungs: the interval of the mean share inside lies below
#: this multiple of the share of the input the lungs cover. Not 1: late-layer Grad-CAM maps are coarse and
#: spill onto the lungs' surroundings. Measured: the CPU recipe on real X-rays 31-32 % inside lungs
#: covering 24 % (x1.3); the demo recipe on the clean phantom 19 % of 26 % (x0.73), on the phantom with a
#: planted corner tag 1.4 % (x0.05).
MIN_ENRICHMENT = 0.5
#: Occlusion grid: cells of 1/GRID of the side (a 13 px tag on a 256 px film fits in one).
GRID = 8
#: A cell counts as outside the chest when the grown lung hull covers at most this share of it.
OUTSIDE_COVER = 0.1
#: Flag a hot spot whose simultaneous interval lies above this mean drop of the class's probability: hiding
#: one cell outside the chest takes more than this from one class on average over its images. Measured
#: (docs/research-log.md): clean models on real COVID-QU-Ex films, strongest cell 0.009-0.030 (interval lows <= 0.008); the
#: former demo's models on the clean phantom up to 0.064 (lows <= 0.038: simple_cnn reads the film's corner
#: somewhat); models trained with a corner tag on COVID-19 films 0.08-0.21 (lows >= 0.057), the phantom's
#: tag 0.85.
MIN_HOTSPOT = 0.05
#: A (class, cell) mean needs this many images, and the cell outside the chest on at least this share of
#: the class's films, to be searched: a marker read as a shortcut sits at one place outside the chest on
#: most films of its class, while a cell beside the lungs on a few films only (the lungs' edge moves from
#: film to film) half-hides lung tissue there. Measured: with a quarter, the former demo's simple_cnn on the clean
#: phantom was flagged at such cells (13-18 of 40 films, beside the lungs, where its findings lie).
MIN_CELL_IMAGES = 10
MIN_CELL_SHARE = 0.5
#: A model within this much macro-F1 of chance has learnt nothing to audit.
MIN_SKILL = 0.05
#: Images per Grad-CAM batch (activations and gradients of one batch are held at once).
BATCH = 32
#: Occluded copies per forward batch.
OCCLUSION_BATCH = 128


def _masks_at_input(lungs: torch.Tensor, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """The audit masks ``(N, 1, H, W)`` float {0, 1} in the geometry of the network input: resized,
    or cut to the same lung box as the image when the model was trained with ``masks: crop``."""
    size = params["image_size"]
    if params.get("masks") == "crop" and x.shape[1] == 2:
        # Channel 0 is cut out by the box of channel 1 (the model's own mask), as the image was.
        return (apply_masks(torch.cat([lungs, x[:, 1:2].float() / 255.0], dim=1), "crop", size) > 0.5).float()
    return (resize(lungs, size) > 0.5).float() if lungs.shape[-1] != size else lungs


def hull(mask: torch.Tensor) -> torch.Tensor:
    """An orthogonally convex hull of a {0, 1} mask batch ``(N, 1, H, W)``: every pixel between two lung
    pixels of its row, then of its column. It holds the mediastinum and the heart between the lungs (the
    chest), and leaves out the corners, shoulders and the film's edges."""
    def span(m: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.minimum(m.cummax(dim=dim).values, m.flip(dim).cummax(dim=dim).values.flip(dim))

    return span(span(mask, 3), 2)


def _cell_edges(size: int) -> np.ndarray:
    return np.round(np.linspace(0, size, GRID + 1)).astype(np.int64)


def outside_cells(chest: torch.Tensor) -> np.ndarray:
    """Per image, which grid cells lie outside the chest: ``(N, GRID * GRID)`` bool from the grown hull
    ``(N, 1, S, S)``."""
    edges = _cell_edges(chest.shape[-1])
    cover = np.stack([chest[:, 0, edges[r]:edges[r + 1], edges[c]:edges[c + 1]].mean(dim=(1, 2)).numpy()
                      for r in range(GRID) for c in range(GRID)], axis=1)
    return cover <= OUTSIDE_COVER


def _cell_masks(size: int, device: torch.device) -> torch.Tensor:
    edges = _cell_edges(size)
    masks = torch.zeros(GRID * GRID, 1, size, size, dtype=torch.bool, device=device)
    for r in range(GRID):
        for c in range(GRID):
            masks[r * GRID + c, 0, edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = True
    return masks


class _Pairs(torch.utils.data.Dataset):
    """(image, cell) pairs of a dataset: items ``(uint8 image, pair code, id)``; code = row * GRID^2 + cell."""

    def __init__(self, dataset: XrayDataset, codes: np.ndarray) -> None:
        self.dataset, self.codes = dataset, codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x, _, image_id = self.dataset[int(self.codes[i]) // (GRID * GRID)]
        return x, int(self.codes[i]), image_id


def occlusion(model: torch.nn.Module, dataset: XrayDataset, outside: np.ndarray, base: np.ndarray,
              settings: PredictSettings, *, progress: bool = False) -> np.ndarray:
    """Drop of the true class's probability when one grid cell outside the chest is replaced by its mean
    intensity: ``(N, GRID * GRID)`` float32, NaN for cells inside the chest. ``base`` (N, 3): the
    probabilities of the intact images."""
    size, cells = settings.image_size, GRID * GRID
    masks = _cell_masks(size, settings.device)
    rows, which = np.nonzero(outside)
    codes = rows * cells + which

    def prepare(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = settings.prepare(x, code)
        m = masks[code % cells]
        img = x[:, :1]
        mean = (img * m).sum(dim=(2, 3), keepdim=True) / m.sum(dim=(2, 3), keepdim=True)
        return torch.cat([torch.where(m, mean, img), x[:, 1:]], dim=1), code  # a mask channel stays

    drops = np.full((len(dataset), cells), np.nan, dtype=np.float32)
    labels = np.asarray(dataset.labels)
    for probs, code, _ in infer(model, _Pairs(dataset, codes), prepare=prepare, device=settings.device,
                                batch_size=OCCLUSION_BATCH, transform=lambda out: torch.softmax(out, dim=1),
                                channels_last=settings.channels_last, autocast_dtype=settings.dtype,
                                progress=progress, desc="occlusion"):
        code = code.cpu().numpy()
        row, cell = code // cells, code % cells
        drops[row, cell] = base[row, labels[row]] - probs.cpu().numpy()[np.arange(len(row)), labels[row]]
    return drops


def attention(model: torch.nn.Module, dataset: XrayDataset, lungs: np.ndarray, params: Mapping[str, Any],
              settings: PredictSettings, progress: bool = False) -> dict[str, np.ndarray]:
    """Per image: ``share`` of the Grad-CAM mass (for the predicted class) inside the lungs (NaN for
    an all-zero map), ``area`` of the input the lungs cover, ``outside`` (which grid cells lie outside
    the chest, for :func:`occlusion`) and ``label``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)
    share, area, outside, layer = [], [], [], ""
    start = 0
    for x, _, _ in bar(loader, desc="audit", disable=not progress, leave=False):
        n = len(x)
        m = torch.from_numpy(lungs[start:start + n] > 127).float().unsqueeze(1)
        start += n
        xin, _ = settings.prepare(x.to(settings.device), None)
        cams, _, layer = gradcam(model, xin, layer=TARGET_LAYERS.get(params.get("model", "")))
        at_input = _masks_at_input(m, x, params)
        mask = at_input[:, 0].numpy()
        mass = cams.reshape(n, -1).sum(axis=1)
        inside = (cams * mask).reshape(n, -1).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            share.append(np.where(mass > 0, inside / mass, np.nan))
        area.append(mask.reshape(n, -1).mean(axis=1))
        outside.append(outside_cells(grow_mask(hull(at_input))))
    return {"share": np.concatenate(share), "area": np.concatenate(area), "outside": np.concatenate(outside),
            "label": np.asarray(dataset.labels), "layer": np.asarray(layer)}


def blanked(dataset: XrayDataset, lungs: np.ndarray, keep: str) -> XrayDataset:
    """The same images with the (grown) lungs kept and the rest black (``keep="lungs"``), or the lungs
    blacked out (``keep="outside"``); a mask channel the model uses is left as it was."""
    grown = grow_mask(torch.from_numpy(lungs > 127).float().unsqueeze(1))[:, 0].numpy() > 0
    inside = grown if keep == "lungs" else ~grown
    images = dataset.films(dataset.indices) * inside
    masks = None if dataset.masks is None else np.asarray(dataset.masks[dataset.indices])
    return XrayDataset(images.astype(np.uint8), dataset.ids, dataset.labels, masks)


def model_figures(model: torch.nn.Module, data: LungsData | None, dataset: XrayDataset, params: Mapping[str, Any],
                  settings: PredictSettings, *, progress: bool = False, lungs: np.ndarray | None = None,
                  source: str = "") -> tuple[dict[str, Any] | None, str]:
    """One model's per-image audit figures on its held-out images: ``(table, mask source)``, or
    ``(None, why not)``. Table columns: ``id``, ``label``, ``pred`` (whole image), ``share``, ``area``,
    ``pred_outside_blanked``, ``pred_lungs_blanked`` and ``drops`` ``(N, GRID^2)``. The lung masks come
    from ``data`` (:func:`lungs_utils.xrays.masks.train_image_masks`) unless given (``lungs``, aligned with
    the dataset's items). ``settings``: the run's prediction settings, without test-time views."""
    if lungs is None:
        lungs, source = train_image_masks(data, dataset.indices, params.get("mask_run"), progress=progress)
    if lungs is None or len(dataset) == 0:
        return None, source if lungs is None else "no validation images"
    per_image = attention(model, dataset, lungs, params, settings, progress=progress)
    _, base = predict_proba(model, dataset, settings)
    per_image["pred"] = base.argmax(axis=1)
    for name, keep in (("pred_outside_blanked", "lungs"), ("pred_lungs_blanked", "outside")):
        per_image[name] = predict_proba(model, blanked(dataset, lungs, keep), settings)[1].argmax(axis=1)
    per_image["drops"] = occlusion(model, dataset, per_image.pop("outside"), base, settings, progress=progress)
    per_image["id"] = np.asarray(dataset.ids)
    per_image["layer"] = str(per_image["layer"])
    return per_image, source


def pool(tables: Sequence[Mapping[str, Any]], folds: Sequence[int] | None = None) -> dict[str, Any]:
    """Several models' tables (the folds of a cross-validation run) as one, with a ``fold`` column."""
    out: dict[str, Any] = {key: np.concatenate([np.asarray(t[key]) for t in tables])
                           for key in tables[0] if key != "layer"}
    out["layer"] = tables[0]["layer"]
    if folds is not None:
        out["fold"] = np.concatenate([np.full(len(t["id"]), k) for t, k in zip(tables, folds)])
    return out


def _spread(values: np.ndarray, seed: int) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    if not len(v):
        return {"mean": None, "std": None, "p10": None, "p90": None, "n": 0, "low": None, "high": None}
    ci = mean_interval(v, seed=seed)
    return {"mean": float(v.mean()), "std": float(v.std()), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "n": int(len(v)), "low": ci.low, "high": ci.high}


def hotspot(drops: np.ndarray, labels: np.ndarray, *, seed: int = 0, n_boot: int = 1000,
            level: float = 0.95) -> dict[str, Any]:
    """The (class, cell) outside the chest whose occlusion costs its class the most, with a simultaneous
    interval over every (class, cell) searched (max-t bootstrap over images: the interval holds for the
    largest mean as much as for any other).

    Returns ``map`` (classes x GRID x GRID means; None where a cell was outside the chest too rarely),
    ``class``, ``cell`` (row, column), ``effect`` (mean drop), ``low``, ``high``, ``n`` (images behind it).
    """
    y = np.asarray(labels, dtype=np.int64)
    valid = np.isfinite(drops)
    filled = np.where(valid, drops, 0.0).astype(np.float64)
    validf = valid.astype(np.float64)
    counts = np.stack([valid[y == c].sum(axis=0) for c in range(NUM_CLASSES)])  # (C, cells)
    class_n = np.bincount(y, minlength=NUM_CLASSES)[:, None]
    searched = counts >= np.maximum(MIN_CELL_IMAGES, np.ceil(MIN_CELL_SHARE * class_n))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.stack([filled[y == c].sum(axis=0) for c in range(NUM_CLASSES)]) / counts
    means = np.where(searched, means, np.nan)
    empty = {"map": [[[None] * GRID for _ in range(GRID)] for _ in range(NUM_CLASSES)], "class": None, "cell": None,
             "effect": None, "low": None, "high": None, "n": 0, "grid": GRID, "threshold": MIN_HOTSPOT}
    if not searched.any():
        return empty
    boot = []
    for w in resample_counts(len(y), n_boot, seed):
        per_class = []
        for c in range(NUM_CLASSES):
            wc = w[:, y == c]
            with np.errstate(invalid="ignore", divide="ignore"):
                per_class.append((wc @ filled[y == c]) / (wc @ validf[y == c]))
        boot.append(np.stack(per_class, axis=1))  # (b, C, cells)
    # Cells never searched are set to 0 (not NaN): their all-empty columns would only raise warnings.
    boot = np.where(searched, np.concatenate(boot), 0.0)
    se = np.nanstd(boot, axis=0)
    ok = searched & (se > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.abs(boot - means) / se
    t_max = np.nanmax(np.where(ok, t, np.nan).reshape(len(boot), -1), axis=1)
    q = float(np.nanquantile(t_max, level)) if np.isfinite(t_max).any() else 0.0
    low = np.where(ok, means - q * se, means)
    c, cell = np.unravel_index(int(np.nanargmax(np.where(searched, low, -np.inf))), low.shape)
    shown = np.where(np.isfinite(means), means, None).reshape(NUM_CLASSES, GRID, GRID)
    return {"map": shown.tolist(), "class": int(c),
            "cell": [int(cell // GRID), int(cell % GRID)], "effect": float(means[c, cell]),
            "low": float(low[c, cell]), "high": float(means[c, cell] + q * se[c, cell]) if ok[c, cell] else
            float(means[c, cell]), "n": int(counts[c, cell]), "grid": GRID, "threshold": MIN_HOTSPOT}


def flags(result: Mapping[str, Any]) -> list[str]:
    """Plain-language warnings for an audit result: only evidence clear of its interval (empty for a
    model without skill, whose attention says nothing)."""
    b = result["blanking"]
    chance = 1.0 / len(CLASS_NAMES)
    if b["full"] - chance <= MIN_SKILL:
        return []
    out = []
    spot = result.get("hotspot") or {}
    if spot.get("low") is not None and spot["low"] > MIN_HOTSPOT:
        r, c = spot["cell"]
        out.append(f"hiding one small patch outside the chest (grid cell row {r}, column {c} of {spot['grid']}x"
                   f"{spot['grid']}) takes {spot['effect']:.2f} of the {CLASS_NAMES[spot['class']]} probability on "
                   f"average (95% CI {spot['low']:.2f} to {spot['high']:.2f}, {spot['n']} images): the model reads "
                   "a marker there")
    share, enrich = result["lung_share"], result.get("enrichment") or {}
    if enrich.get("high") is not None and enrich["high"] < 0:
        out.append(f"only {share['mean']:.0%} (95% CI {share['low']:.0%} to {share['high']:.0%}) of the Grad-CAM "
                   f"attention falls inside the lungs, which cover {result['lung_area']:.0%} of the input: the "
                   "model looks elsewhere")
    return out


def assess(table: Mapping[str, Any], source: str, *, seed: int = 0, seconds: float = 0.0) -> dict[str, Any]:
    """The audit result (figures, intervals, flags) from the pooled per-image table of :func:`model_figures`."""
    y = np.asarray(table["label"])
    share, area = np.asarray(table["share"], dtype=np.float64), np.asarray(table["area"], dtype=np.float64)
    scores: dict[str, Interval] = {name: f1_interval(y, table[col], seed=seed) for name, col in (
        ("full", "pred"), ("outside_blanked", "pred_outside_blanked"), ("lungs_blanked", "pred_lungs_blanked"))}
    gap = paired_f1_difference(y, table["pred_lungs_blanked"], table["pred_outside_blanked"], seed=seed)
    enrich = mean_interval(share - MIN_ENRICHMENT * area, seed=seed)
    result: dict[str, Any] = {
        "status": "ok", "mask_source": source, "n": int(len(y)), "layer": str(table["layer"]),
        "lung_share": _spread(share, seed),
        "lung_share_per_class": {CLASS_NAMES[c]: _spread(share[y == c], seed)["mean"] for c in range(len(CLASS_NAMES))},
        "lung_area": float(np.mean(area)),
        "enrichment": enrich.as_dict(),
        "blanking": {k: v.value for k, v in scores.items()},
        "blanking_ci": {k: [v.low, v.high] for k, v in scores.items()},
        "blanking_gap": gap.as_dict(),
        "hotspot": hotspot(np.asarray(table["drops"]), y, seed=seed),
    }
    result["flags"] = flags(result)
    result["seconds"] = seconds
    return result


def summary_line(result: Mapping[str, Any] | None) -> str:
    """One paragraph for the notebook: the figures with their intervals, then the warnings (or that none
    applies)."""
    if not result:
        return "shortcut audit: off (audit = False)"
    if result.get("status") != "ok":
        return f"shortcut audit: could not run — {result.get('reason')}"
    s, b = result["lung_share"], result["blanking"]
    ci = result.get("blanking_ci", {})
    per = ", ".join(f"{k} {v:.0%}" for k, v in result["lung_share_per_class"].items() if v is not None)

    def f1(name: str) -> str:
        low_high = ci.get(name)
        return f"{b[name]:.3f}" + (f" ({low_high[0]:.3f}-{low_high[1]:.3f})" if low_high else "")

    lines = [f"audited on {result['n']} held-out images; 95% intervals in brackets.",
             f"Grad-CAM attention inside the lungs: {s['mean']:.0%}"
             + (f" ({s['low']:.0%}-{s['high']:.0%})" if s.get("low") is not None else "")
             + f" (p10 {s['p10']:.0%}, p90 {s['p90']:.0%}; {per}); the lungs cover {result['lung_area']:.0%} of the "
             f"input ({result['mask_source']}).",
             f"macro-F1: whole image {f1('full')}, outside the lungs blanked {f1('outside_blanked')}, lungs blanked "
             f"{f1('lungs_blanked')} (blanked films are unlike any training film: shown, not flagged)."]
    spot = result.get("hotspot") or {}
    if spot.get("effect") is not None:
        r, c = spot["cell"]
        lines.append(f"occlusion outside the chest: the strongest patch (row {r}, column {c}) takes "
                     f"{spot['effect']:.3f} of the {CLASS_NAMES[spot['class']]} probability "
                     f"({spot['low']:.3f}-{spot['high']:.3f}, simultaneous over every patch and class; flag above "
                     f"{spot['threshold']:.2f}).")
    if b["full"] - 1.0 / len(CLASS_NAMES) <= MIN_SKILL:
        lines.append("The model scores near chance: there is nothing to audit yet.")
    else:
        lines += [f"WARNING: {f}" for f in result["flags"]] or [
            "No shortcut sign: no patch outside the chest carries a class's evidence beyond the noise, and the "
            "attention is not drawn away from the lungs."]
    return "\n".join(lines)


def audit_table(pooled: Mapping[str, Any], result: Mapping[str, Any]) -> pd.DataFrame:
    """``audit.csv``: one row per audited image, sorted by id."""
    columns = ["id", "label", "pred", "share", "area", "pred_outside_blanked", "pred_lungs_blanked"]
    table = pd.DataFrame({k: pooled[k] for k in columns + (["fold"] if "fold" in pooled else [])})
    spot = result.get("hotspot") or {}
    if spot.get("cell") is not None:
        r, c = spot["cell"]
        table["hotspot_drop"] = np.asarray(pooled["drops"])[:, r * spot["grid"] + c]
    return table.sort_values("id", kind="stable").reset_index(drop=True)
