"""Phantom chest radiographs in the competition's exact on-disk layout.

The real data cannot be downloaded here, so the demo, the tests and the benchmarks run on these
procedural images instead. Each image is drawn from simple analytic shapes (body, two lung fields,
mediastinum and heart, ribs, clavicles) under a random pose and exposure, plus class findings:

* 0 normal — clear lung fields;
* 1 other disease — a dense focal (lobar) consolidation, or a reticular interstitial pattern, usually
  in one lung;
* 2 COVID-19 — hazy ground-glass patches in the lower, outer zones of both lungs.

Severity goes from obvious down to nearly invisible, so a good model scores high but not 1.0.
Nothing here is a claim about clinical appearance or performance.

Layout written by :func:`generate` (``<id>`` are integers, train and test ids disjoint)::

    OUT/data/train_images/img_<id>.png      8-bit grayscale, size x size
    OUT/data/test_images/img_<id>.png
    OUT/data/train_lung_masks/img_<id>.png  0/255 lung mask, train images only
    OUT/data/train_answers.csv              id,target_feature
    OUT/test_answers.csv                    the phantom's known test truth (outside data/)
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import LungsError

__all__ = ["render", "generate", "draw_severity", "burn_marker"]

NUM_CLASSES = 3
MARKER = "PHANTOM.md"  # written beside data/; lungs_utils.data reports such data as synthetic
_SPLITS = {"train": 0, "test": 1}  # part of each image's seed: never renumber
_MIN_SIZE, _MAX_SIZE = 16, 1024

# Share of diseased images whose finding is drawn nearly invisible. Together with the overlap
# between the classes' shapes, this is what keeps a good classifier below a perfect score.
_FAINT_FRACTION = 0.12


#: Class that carries the shortcut marker (``generate(shortcut=...)``): COVID-19, as in the published
#: shortcut studies, where hospital- and device-specific tags told the COVID-19 sources apart.
SHORTCUT_CLASS = 2


def burn_marker(img: np.ndarray) -> np.ndarray:
    """A copy of the 8-bit image ``(H, W)`` with a small bright tag burnt into its top-left corner,
    outside the lungs: the kind of text or device marker a classifier can learn instead of the
    lungs. Its side and offset scale with the image (5 % and 3 % of the side)."""
    out = np.array(img, dtype=np.uint8, copy=True)
    h, w = out.shape
    side, off = max(2, round(0.05 * min(h, w))), max(1, round(0.03 * min(h, w)))
    out[off:off + side, off:off + side] = 255
    return out


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |x|, and one ufunc call.
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean, unit-std random field with features about size/cells pixels across.

    Bicubic upsampling of a coarse grid is a cheap stand-in for Gaussian-filtered noise, and it
    keeps the pattern's scale tied to the image, not to the pixel grid.
    """
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def _lerp(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Piecewise-linear lookup of ``values`` at fractional indices ``pos`` (np.interp is ~20x slower)."""
    i0 = np.clip(pos.astype(np.int32), 0, len(values) - 2)
    t = np.clip(pos - i0, 0.0, 1.0)
    return values[i0] * (1.0 - t) + values[i0 + 1] * t


def _soften(img: np.ndarray, factor: int) -> np.ndarray:
    """Low-pass an image by downsampling and bilinear upsampling (PIL cannot blur float images)."""
    size = img.shape[0]
    small = max(4, size // factor)
    im = Image.fromarray(img).resize((small, small), Image.BOX).resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32)


def draw_severity(rng: np.random.Generator) -> float:
    """How visible a finding is, in [0, 1]: mostly clear, a tail down to nearly invisible."""
    if rng.random() < _FAINT_FRACTION:
        return float(rng.uniform(0.03, 0.12))
    return float(0.35 + 0.65 * rng.beta(2.0, 1.5))


# --------------------------------------------------------------------------------------------
# One radiograph
# --------------------------------------------------------------------------------------------
def render(
    label: int, size: int, rng: np.random.Generator, severity: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom radiograph (uint8 HxW) and its lung mask (uint8 HxW, 0/255).

    ``label`` is 0 normal, 1 other disease, 2 COVID-19. ``severity`` in [0, 1] sets how visible
    the finding is (ignored for normal images); None draws it from :func:`draw_severity`.
    Everything random comes from ``rng``, so the same generator state gives the same pixels.
    """
    if label not in (0, 1, 2) or isinstance(label, bool):
        raise LungsError(f"label must be 0, 1 or 2, got {label!r}")
    _check_int("size", size, _MIN_SIZE, _MAX_SIZE)
    if severity is not None and not (0.0 <= float(severity) <= 1.0):
        raise LungsError(f"severity must be in [0, 1] or None, got {severity!r}")

    f32 = np.float32
    # Canonical chest coordinates: u across (patient's right on the image's left), v downwards,
    # both about [-1, 1]. Pose jitter is a rotation, shift and scale of this frame, applied once,
    # so the anatomy, the findings and the mask all move together.
    lin = (np.arange(size, dtype=f32) + f32(0.5)) * f32(2.0 / size) - f32(1.0)
    x, y = np.meshgrid(lin, lin)
    theta = rng.normal(0.0, 0.04)
    tx, ty = rng.normal(0.0, 0.03, 2)
    sx = rng.uniform(0.92, 1.08)
    sy = sx * rng.uniform(0.94, 1.06)
    c, s = f32(math.cos(theta)), f32(math.sin(theta))
    u = (c * (x - f32(tx)) + s * (y - f32(ty))) / f32(sx)
    v = (-s * (x - f32(tx)) + c * (y - f32(ty))) / f32(sy)
    au = np.abs(u)

    # --- body and soft tissue -----------------------------------------------------------------
    body_w = rng.uniform(0.86, 1.02)
    shoulders = 1.0 - 0.3 * _sigmoid((-0.86 - v) / 0.05)  # the neck is narrower than the chest
    body = _sigmoid((body_w * shoulders - au) / 0.035)
    tissue = rng.uniform(0.5, 0.6) + rng.uniform(0.05, 0.15) * v  # thicker towards the abdomen
    dens = (0.04 + (tissue - 0.04) * body).astype(f32)

    # --- heart and mediastinum ----------------------------------------------------------------
    hx, hy = rng.uniform(0.06, 0.14), rng.uniform(0.3, 0.4)
    ha, hb = rng.uniform(0.3, 0.38), rng.uniform(0.24, 0.31)
    f_heart = ((u - hx) / ha) ** 2 + ((v - hy) / hb) ** 2
    med_w = rng.uniform(0.09, 0.13)

    # --- lung fields --------------------------------------------------------------------------
    lungs = []  # per side: (side, cx, cy, a, b, level f: < 1 inside)
    f_all = np.full_like(u, 10.0)
    cy = rng.uniform(-0.16, -0.06)
    for side in (-1, 1):
        lcx = side * rng.uniform(0.43, 0.5)
        lcy = cy + rng.normal(0.0, 0.015)
        a = rng.uniform(0.32, 0.38)
        b = rng.uniform(0.63, 0.73) * (0.95 if side < 0 else 1.0)  # the liver lifts the right base
        du, dv = u - lcx, v - lcy
        apex_to_base = np.clip(dv / (2 * b) + 0.5, 0.0, 1.0)
        half_w = a * (0.5 + 0.5 * np.sqrt(apex_to_base))  # pointed apex, broad base
        across = np.abs(du) / half_w
        f_shape = across * across * np.sqrt(across) + (dv / b) ** 2  # power 2.5: straighter sides
        lateral = side * du / a
        # Domed diaphragm, lowest at the lateral costophrenic angle.
        f_base = 1.0 + 6.0 * (dv - b * (0.8 + 0.14 * lateral - 0.12 * (1.0 - lateral**2)))
        f_heart_cut = 2.0 - f_heart  # the heart's outline carves the medial lower lung
        f_midline = 1.0 + 8.0 * (med_w - side * u)  # lungs never reach across the mediastinum
        f = np.maximum(np.maximum(f_shape, f_base), np.maximum(f_heart_cut, f_midline))
        lungs.append((side, lcx, lcy, a, b, f))
        f_all = np.minimum(f_all, f)

    mask = f_all < 1.0
    lung_soft = _sigmoid((1.0 - f_all) / 0.08)
    # Findings use a mask pulled slightly inwards and are cut at the border: they stay inside it.
    inner = _sigmoid((0.93 - f_all) / 0.025) * mask

    depth = rng.uniform(0.3, 0.42)
    # Lungs are a little less dark at the bases and near the hila (more tissue in the beam).
    lung_dark = depth * (1.0 - 0.12 * np.clip(v - cy, 0, None) - 0.15 * np.exp(-((au - 0.2) / 0.15) ** 2))
    dens -= lung_dark * lung_soft

    # The heart and mediastinum are mostly "no lung" over soft tissue; a little extra density
    # for the spine and the heart keeps them a shade brighter than the chest wall.
    above_neck = _sigmoid((v + 0.95) / 0.05)
    dens += rng.uniform(0.08, 0.15) * np.exp(-(u**2) / (2 * (1.3 * med_w) ** 2)) * above_neck
    dens += rng.uniform(0.04, 0.09) * np.exp(-((u / 0.05) ** 2)) * above_neck
    dens += rng.uniform(0.02, 0.08) * _sigmoid((1.0 - f_heart) / 0.12)
    trachea = np.exp(-((u / 0.028) ** 2)) * _sigmoid((-0.32 - v) / 0.04) * above_neck
    dens -= rng.uniform(0.05, 0.1) * trachea

    # --- vessels and normal lung texture ------------------------------------------------------
    # Normal lungs are not blank: streaks fanning out from each hilum plus a faint mottle, so that
    # faint disease patterns have something to hide in.
    texture = _smooth_noise(rng, 28, size)
    vessel_amp = rng.uniform(0.05, 0.1)
    n_rays = 40
    for side, lcx, lcy, a, b, _ in lungs:
        # Rays start behind the mediastinum, where their converging point is hidden.
        du, dv = side * (u - side * (med_w - 0.03)), v - (lcy + 0.12 * b)
        ray = _lerp(rng.standard_normal(n_rays).astype(f32), (np.arctan2(dv, du) + np.pi) * ((n_rays - 1) / (2 * np.pi)))
        fade = np.exp(-np.sqrt(du * du + dv * dv) / rng.uniform(0.18, 0.28))
        dens += vessel_amp * lung_soft * fade * (np.clip(ray, 0.0, 1.8) ** 2 + 0.3)
    dens += rng.uniform(0.005, 0.02) * lung_soft * texture

    # --- ribs and clavicles -------------------------------------------------------------------
    rib_zone = _sigmoid((v + 0.92) / 0.04) * _sigmoid((0.6 - v) / 0.06) * _sigmoid((au - 0.07) / 0.02)
    rib_zone *= _sigmoid((body_w * 0.97 - au) / 0.04) * (0.15 + 0.85 * lung_soft)  # bone shows best against air
    spacing = rng.uniform(0.13, 0.165)
    # Posterior ribs: from the spine outwards, curving down to the lateral chest wall.
    phase = (v - rng.uniform(0.5, 0.8) * u * u - rng.uniform(0.0, spacing)) / spacing
    frac = phase - np.floor(phase)
    posterior = np.sqrt(np.clip(np.sin(np.pi * np.clip(frac / 0.45, 0.0, 1.0)), 0.0, None))  # flat-topped bands
    # Anterior ribs, fainter: from the lateral wall down towards the sternum.
    phase = (v + rng.uniform(0.4, 0.6) * au - rng.uniform(0.0, spacing)) / (spacing * 1.3)
    frac = phase - np.floor(phase)
    anterior = np.clip(np.sin(np.pi * np.clip(frac / 0.35, 0.0, 1.0)), 0.0, None)
    dens += rib_zone * (rng.uniform(0.04, 0.08) * posterior + rng.uniform(0.0, 0.03) * anterior)

    if rng.random() < 0.85:
        clav_v = rng.uniform(-0.8, -0.68) - 0.28 * (au - 0.1)
        clavicle = np.exp(-(((v - clav_v) / 0.035) ** 2)) * _sigmoid((au - 0.08) / 0.02) * _sigmoid((0.66 - au) / 0.03)
        dens += rng.uniform(0.08, 0.16) * clavicle * body

    # --- findings -----------------------------------------------------------------------------
    if label != 0:
        sev = draw_severity(rng) if severity is None else float(severity)
        # A finding fills in part of the air, so it is a share of the local lung darkness: it can
        # never be brighter than the soft tissue around it.
        fill = np.minimum(_finding(label, sev, lungs, u, v, size, rng), 1.0)
        dens += fill * inner * lung_dark * lung_soft

    # --- acquisition: heel effect, blur, noise, exposure ----------------------------------------
    dens += rng.normal(0.0, 0.04) * u + rng.normal(0.0, 0.03) * v
    dens = dens.astype(f32)
    blur = rng.uniform(0.0, 0.6)  # sharpness differs between machines
    dens = (1 - blur) * dens + blur * _soften(dens, 2)
    dens += rng.uniform(0.004, 0.02) * rng.standard_normal(dens.shape, dtype=f32)
    dens += rng.uniform(0.0, 0.015) * _smooth_noise(rng, 64, size)

    # Exposure is normalised, then re-randomised: dense findings must not shift the image's mean
    # in a way a classifier could read off without looking at the lungs.
    dens = (dens - dens.mean()) / (dens.std() + 1e-6)
    img = rng.normal(0.51, 0.06) + float(np.clip(rng.normal(0.22, 0.025), 0.15, 0.3)) * dens
    img = np.clip(img, 0.0, 1.0) ** math.exp(rng.normal(0.0, 0.12))
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out, (mask.astype(np.uint8) * 255)


def _finding(label, sev, lungs, u, v, size, rng) -> np.ndarray:
    """Share of the lung's air the finding replaces, >= 0 (before the lung mask is applied)."""
    if label == 1:
        return _consolidation(sev, lungs, u, v, size, rng) if rng.random() < 0.55 else _interstitial(sev, lungs, u, v, size, rng)
    return _ground_glass(sev, lungs, u, v, size, rng)


def _consolidation(sev, lungs, u, v, size, rng) -> np.ndarray:
    """Dense lobar blob(s) with a lumpy edge, mostly in one lung, lower zones more often."""
    out = np.zeros_like(u)
    lumps = _smooth_noise(rng, 10, size)
    first = int(rng.integers(2))
    n_blobs = 1 if rng.random() < 0.75 else 2
    for k in range(n_blobs):
        side, cx, cy, a, b, _ = lungs[first if (k == 0 or rng.random() < 0.5) else 1 - first]
        px = cx + side * a * rng.uniform(-0.4, 0.55)
        py = cy + b * rng.uniform(-0.45, 0.6)
        r1, r2 = rng.uniform(0.12, 0.26), rng.uniform(0.09, 0.2)
        ang = rng.uniform(0, np.pi)
        ca, sa = math.cos(ang), math.sin(ang)
        du, dv = u - px, v - py
        q = ((ca * du + sa * dv) / r1) ** 2 + ((-sa * du + ca * dv) / r2) ** 2
        amp = (1.0 if k == 0 else rng.uniform(0.4, 0.8)) * rng.uniform(0.8, 1.0)
        out += amp * _sigmoid((1.0 - q + 0.45 * lumps) / 0.3)
    return sev * out


def _interstitial(sev, lungs, u, v, size, rng) -> np.ndarray:
    """Reticular network of fine lines (zero crossings of smooth noise) over part of one lung."""
    n1, n2 = _smooth_noise(rng, 16, size), _smooth_noise(rng, 26, size)
    lines = 0.6 * np.exp(-((n1 / 0.3) ** 2)) + 0.4 * np.exp(-((n2 / 0.3) ** 2))
    first = int(rng.integers(2))
    both = rng.random() < 0.25
    zone = np.zeros_like(u)
    for i, (side, cx, cy, a, b, _) in enumerate(lungs):
        if i != first and not both:
            continue
        weight = 1.0 if i == first else rng.uniform(0.3, 0.7)
        zy = cy + b * rng.uniform(-0.3, 0.5)
        zone += weight * np.exp(-((u - cx) / (1.2 * a)) ** 2 - ((v - zy) / (0.7 * b)) ** 2)
    return sev * zone * (rng.uniform(0.75, 0.95) * lines + 0.15)


def _ground_glass(sev, lungs, u, v, size, rng) -> np.ndarray:
    """Faint hazy patches, peripheral and lower-zone, in both lungs (one may be milder)."""
    out = np.zeros_like(u)
    dominant = int(rng.integers(2))
    for i, (side, cx, cy, a, b, _) in enumerate(lungs):
        patches = _sigmoid((_smooth_noise(rng, 9, size) + rng.uniform(0.3, 1.3)) / 0.35)
        outer = _sigmoid((side * (u - cx) / a + 0.1) / 0.25)
        lower = _sigmoid((v - cy - 0.1 * b) / (0.22 * b))
        zone = 0.1 + 0.9 * outer * lower  # mostly peripheral-basal, a little elsewhere
        weight = 1.0 if i == dominant else rng.uniform(0.35, 1.0)
        out += weight * zone * patches
    return sev * rng.uniform(0.85, 1.0) * out


# --------------------------------------------------------------------------------------------
# The dataset on disk
# --------------------------------------------------------------------------------------------
def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise LungsError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _class_counts(n: int, weights: np.ndarray) -> np.ndarray:
    """Exact per-class counts proportional to weights (largest remainder), summing to n."""
    ideal = n * weights
    counts = np.floor(ideal).astype(int)
    rest = n - counts.sum()
    # Stable sort on -remainder: ties go to the lower class index, deterministically.
    order = np.argsort(-(ideal - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _labels(n: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(NUM_CLASSES), _class_counts(n, weights))
    rng.shuffle(labels)
    return labels


def _write_png(path: Path, arr: np.ndarray) -> None:
    # Fixed encoder settings so reruns give byte-identical files.
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def _render_job(job: tuple) -> None:
    """Render and write one image (and its mask for train): the unit of parallel work."""
    data_dir, split, index, img_id, label, size, seed, shortcut = job
    img, mask = render(int(label), size, np.random.default_rng([seed, _SPLITS[split], index]))
    # Its own random stream, so the images without a marker stay byte-identical to a clean phantom.
    if shortcut and label == SHORTCUT_CLASS and np.random.default_rng([seed, _SPLITS[split], index, 7]).random() < shortcut:
        img = burn_marker(img)
    name = f"img_{img_id}.png"
    _write_png(Path(data_dir, f"{split}_images", name), img)
    if split == "train":
        _write_png(Path(data_dir, "train_lung_masks", name), mask)


def _write_answers(path: Path, ids: np.ndarray, labels: np.ndarray) -> None:
    order = np.argsort(ids, kind="stable")
    rows = [f"{int(ids[i])},{int(labels[i])}" for i in order]
    path.write_text("\n".join(["id,target_feature", *rows]) + "\n", encoding="utf-8")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects container / taskset limits
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def generate(
    out: str | Path,
    n_train: int = 600,
    n_test: int = 200,
    size: int = 256,
    seed: int = 0,
    class_weights: Sequence[float] = (1.0, 1.0, 1.0),
    workers: int | None = None,
    overwrite: bool = False,
    shortcut: float = 0.0,
) -> dict:
    """Write the dataset; returns a summary dict: counts per class for train and test, size, seed, seconds, path of data dir.

    Files go to ``out/data/`` (see the module docstring) and ``out/test_answers.csv``. Class counts
    are exactly proportional to ``class_weights`` (largest remainder), in a seeded random order;
    ids are a seeded permutation of ``range(n_train + n_test)``, first ``n_train`` for train. Each
    image is seeded by ``(seed, split, index)``, so output bytes do not depend on ``workers``.

    Everything is written to a temporary folder beside ``out/data`` and renamed into place at the
    end, so an interrupted run never leaves a half-written ``data/``. An existing ``out/data`` is
    replaced only with ``overwrite=True``, and only when ``out/test_answers.csv`` marks it as
    phantom data (never a real download).

    ``shortcut`` (0..1): that share of the COVID-19 images, train and test alike, carries a bright tag
    in a corner (:func:`burn_marker`) — a planted shortcut for checking that the audit catches it.
    """
    t0 = time.perf_counter()
    n_train = _check_int("n_train", n_train, 1)
    n_test = _check_int("n_test", n_test, 0)
    size = _check_int("size", size, _MIN_SIZE, _MAX_SIZE)
    seed = _check_int("seed", seed, 0)
    workers = _default_workers() if workers is None else _check_int("workers", workers, 1)
    if not (isinstance(shortcut, (int, float)) and 0.0 <= float(shortcut) <= 1.0):
        raise LungsError(f"shortcut must be a share between 0 and 1, got {shortcut!r}")
    shortcut = float(shortcut)
    try:
        weights = np.asarray([float(w) for w in class_weights], dtype=np.float64)
    except (TypeError, ValueError):
        raise LungsError(f"class_weights must be {NUM_CLASSES} numbers, got {class_weights!r}") from None
    if weights.shape != (NUM_CLASSES,) or not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise LungsError(
            f"class_weights must be {NUM_CLASSES} finite non-negative numbers with a positive sum, got {class_weights!r}"
        )
    weights = weights / weights.sum()

    out = Path(out)
    data_dir = out / "data"
    answers = out / "test_answers.csv"
    if data_dir.exists() or data_dir.is_symlink():
        if not overwrite:
            raise LungsError(f"phantom data already exists at {data_dir}: delete it or pass overwrite=True (--overwrite)")
        if not answers.exists():
            raise LungsError(f"{data_dir} exists but {answers} does not, so it may be real data: refusing to overwrite; delete it yourself")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LungsError(f"cannot create output folder {out}: {e.strerror}") from None

    # Ids and labels come from their own stream, independent of the per-image streams.
    rng = np.random.default_rng([seed, 99])
    ids = rng.permutation(n_train + n_test)
    splits = {
        "train": (ids[:n_train], _labels(n_train, weights, rng)),
        "test": (ids[n_train:], _labels(n_test, weights, rng)),
    }

    pid = os.getpid()
    tmp = out / f".data.tmp-{pid}"
    tmp_answers = out / f".test_answers.csv.tmp-{pid}"
    old = out / f".data.old-{pid}"
    try:
        for leftover in (tmp, tmp_answers, old):  # from an earlier crashed run that had our pid
            _remove(leftover)
        for sub in ("train_images", "test_images", "train_lung_masks"):
            (tmp / sub).mkdir(parents=True)
        jobs = [
            (str(tmp), split, i, int(img_id), int(label), size, seed, shortcut)
            for split, (split_ids, labels) in splits.items()
            for i, (img_id, label) in enumerate(zip(split_ids, labels))
        ]
        workers = min(workers, len(jobs))
        if workers <= 1:
            for job in jobs:
                _render_job(job)
        else:
            # Threads, not processes: numpy on whole images and PIL's resize / PNG encoder release
            # the GIL, so threads measured as fast as a process pool here, and they need no fork
            # (unsafe once torch has started its threads) and no `if __name__ == "__main__"` guard
            # in the caller's script (spawn / forkserver start methods).
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_render_job, jobs):
                    pass
        _write_answers(tmp / "train_answers.csv", *splits["train"])
        _write_answers(tmp_answers, *splits["test"])

        if data_dir.exists() or data_dir.is_symlink():
            os.replace(data_dir, old)
        os.replace(tmp, data_dir)
        os.replace(tmp_answers, answers)
        _remove(old)
        # A marker beside data/ (never inside it: data/ keeps the competition's exact layout), so
        # code that loads this folder can say the results are synthetic.
        (out / MARKER).write_text(
            f"# Phantom dataset (synthetic)\n\nGenerated by `lungs phantom` (seed {seed}, {size}px, "
            f"{n_train} train / {n_test} test). Procedural images: scores on it say nothing about real "
            "chest X-rays.\n" + (f"\nShortcut planted: {shortcut:.0%} of the COVID-19 images carry a bright tag in "
                                 "the top-left corner.\n" if shortcut else ""), encoding="utf-8")
    finally:
        for leftover in (tmp, tmp_answers):
            if leftover.exists():
                _remove(leftover)

    def counts(labels: np.ndarray) -> dict[int, int]:
        return {k: int(np.sum(labels == k)) for k in range(NUM_CLASSES)}

    return {
        "data_dir": str(data_dir),
        "test_answers": str(answers),
        "train": counts(splits["train"][1]),
        "test": counts(splits["test"][1]),
        "size": size,
        "seed": seed,
        "shortcut": shortcut,
        "workers": workers,
        "seconds": round(time.perf_counter() - t0, 3),
    }
