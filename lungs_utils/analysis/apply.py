"""Question a finished model: its predictions for any folder of X-rays (``lungs predict``).

The competition's test folder is one set of films; the honest check of a COVID-19 classifier is films
from another hospital, and a person exploring wants one film at a time. :func:`predict_folder` takes a
finished run — a classifier, a cross-validation run (its fold models averaged) or an ensemble (its
members, combined as the ensemble was) — and any files: PNG or JPEG, any size, RGB or 16-bit, converted
as the data layer converts the competition's films (:func:`lungs_utils.xrays.cache.decode`), turned upright
when the run's polarity detector finds them inverted (:mod:`lungs_utils.xrays.polarity`), and predicted with
the run's own test-time views and temperature. A file that is no image is one warning line, never a
traceback. With the films' answers it scores them (macro-F1 with its interval, confusion matrix), and
with their lung masks (given, or predicted by a segmentation run) it audits the model on them.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import CLASS_NAMES, NUM_CLASSES
from ..engine.checkpoint import load_model
from ..engine.device import select_device
from ..engine.predict import PredictSettings, mask_probabilities, predict_proba
from ..errors import DataWarning, LungsError
from ..io import atomic_write_csv, atomic_write_text
from ..paths import named_run, outputs_dir
from ..runfolder import ENSEMBLE, ENSEMBLE_FILE, POLARITY_FILE, SEGMENTATION, RunFolder, read_json
from ..stats.bootstrap import f1_interval
from ..stats.calibration import apply_temperature
from ..stats.metrics import classification_metrics
from ..xrays.cache import decode, pil_bomb_warning_silenced
from ..xrays.data import XrayDataset
from ..xrays.layout import check_labels, file_line, read_text_csv
from ..xrays.masks import binarize, mask_run_dir
from ..xrays.polarity import Polarity
from . import audit
from .ensemble import combined

#: Files tried as images (anything else in the folder is listed once and skipped).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
#: Size films are decoded to when a run does not record its data's (the competition's).
DEFAULT_SHAPE = (256, 256)
PREDICTIONS_FILE = "predictions.csv"
_ID = re.compile(r"^img_(\d+)$", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ films
@dataclass
class Films:
    """Decoded films: ``images`` uint8 ``(N, H, W)``, upright; which were turned upright; what was skipped."""

    files: list[Path]
    images: np.ndarray
    inverted: np.ndarray
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ids(self) -> list[int | None]:
        """The id in a name like ``img_<id>.png``, else None."""
        return [int(m.group(1)) if (m := _ID.match(f.stem)) else None for f in self.files]

    def __len__(self) -> int:
        return len(self.files)


def list_films(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files to predict: a folder's files (sorted; hidden files left out), or the files given."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise LungsError(f"{path} does not exist; pass a folder of X-ray images or image files")
    if not files:
        raise LungsError(f"{items[0]} holds no files; pass a folder of X-ray images (PNG or JPEG)")
    return files


def read_films(files: Sequence[Path], shape: tuple[int, int] = DEFAULT_SHAPE,
               polarity: Polarity | None = None) -> Films:
    """Decode ``files`` to 8-bit grayscale at ``shape`` (H, W), as the data layer decodes the competition's
    films; anything that is not a decodable image is skipped with one warning line. With a ``polarity``
    detector, inverted films are turned upright (one warning line says how many)."""
    kept, images, skipped = [], [], []
    notes: Counter[str] = Counter()
    example: dict[str, Path] = {}
    with pil_bomb_warning_silenced():
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((path, f"not an image file ({path.suffix or 'no suffix'})"))
                continue
            try:
                image, note = decode(path, shape)
            except LungsError as exc:
                skipped.append((path, str(exc).split(f"{path}: ", 1)[-1].split(";")[0]))
                continue
            kept.append(path)
            images.append(image)
            for part in filter(None, note.split(", ")):
                kind = part[part.index("resized"):] if "resized" in part else part
                notes[kind] += 1
                example.setdefault(kind, path)
    for path, why in skipped:
        warnings.warn(f"{path}: {why}; skipped", DataWarning, stacklevel=2)
    for kind, count in notes.items():
        warnings.warn(f"{count} film(s): {kind}, e.g. {example[kind]}", DataWarning, stacklevel=2)
    if not kept:
        raise LungsError(f"none of the {len(files)} file(s) is a readable X-ray image (PNG, JPEG, TIFF, BMP); "
                         f"e.g. {skipped[0][0]}: {skipped[0][1]}")
    stack = np.stack(images)
    inverted = polarity.upright(stack) if polarity is not None else np.zeros(len(kept), dtype=bool)
    if inverted.any():
        first = kept[int(np.flatnonzero(inverted)[0])]
        warnings.warn(f"{int(inverted.sum())} of {len(kept)} film(s) look intensity-inverted (lungs bright, bones "
                      f"dark), e.g. {first}: turned upright before predicting", DataWarning, stacklevel=2)
    return Films(kept, stack, inverted, skipped)


def read_masks(films: Films, folder: str | os.PathLike[str]) -> np.ndarray:
    """Lung masks for ``films`` from a folder of mask files named like the films (any suffix), decoded as
    the data layer decodes masks (any nonzero encoding), at the films' size; one error names the first
    film without a mask."""
    folder = Path(folder)
    by_stem = {p.stem: p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    if not by_stem:
        raise LungsError(f"--masks {folder}: no mask files there; pass the folder of lung masks named like the films")
    missing = [f for f in films.files if f.stem not in by_stem]
    if missing:
        raise LungsError(f"--masks {folder}: no mask for {len(missing)} of {len(films)} film(s), e.g. {missing[0].name}; "
                         "name each mask like its film")
    shape = films.images.shape[1:]
    masks = np.stack([decode(by_stem[f.stem], shape, mask=True)[0] for f in films.files])
    return masks


# ------------------------------------------------------------------------------------------------ a finished run
@dataclass
class Trained:
    """A finished run, ready to predict: its models (one, or one per fold), params, temperature and
    polarity detector; or, for an ensemble, its members and how they are combined."""

    name: str
    folder: Path
    kind: str  # classifier, cv or ensemble (lungs_utils.runfolder)
    params: dict[str, Any]
    models: list[Any] = field(default_factory=list)
    temperature: float = 1.0
    polarity: Polarity | None = None
    shape: tuple[int, int] = DEFAULT_SHAPE
    members: list[Trained] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    method: str = "mean"
    synthetic: bool = False  # trained on the phantom dataset

    @property
    def needs_masks(self) -> bool:
        return self.params.get("masks", "none") != "none" or any(m.needs_masks for m in self.members)


def open_run(run: str | os.PathLike[str]) -> Trained:
    """A finished classifier, cross-validation or ensemble run, from its folder (nothing is written)."""
    folder = RunFolder(named_run(run))
    if not folder.path.is_dir():
        raise LungsError(f"run {str(run)!r} not found (neither a folder nor under outputs/); pass a finished "
                         "classifier, cross-validation or ensemble run")
    if folder.kind == ENSEMBLE:
        spec = read_json(folder.path / ENSEMBLE_FILE)
        weights = spec.get("weights")
        if not isinstance(weights, dict) or not weights or \
                not all(isinstance(w, (int, float)) for w in weights.values()):
            raise LungsError(f"{folder.path / ENSEMBLE_FILE} is damaged (no members and weights); make the ensemble "
                             "again with lungs ensemble or its notebook")
        parent = folder.path.parent
        members = [open_run(parent / name if (parent / name).is_dir() else name) for name in spec.get("weights", {})]
        return Trained(folder.name, folder.path, ENSEMBLE, {}, members=members,
                       weights=list(spec.get("weights", {}).values()), method=spec.get("method", "mean"),
                       polarity=members[0].polarity if members else None,
                       shape=members[0].shape if members else DEFAULT_SHAPE,
                       synthetic=any(m.synthetic for m in members))
    params = folder.load_params()
    if folder.kind == SEGMENTATION:
        raise LungsError(f"{folder.path} is a lung segmentation run; pass a classifier run (its masks: --mask-run)")
    if not folder.scored:
        raise LungsError(f"{folder.path} holds no finished classifier (no readable metrics.json with a validation "
                         "score); finish the run first (--resume)")
    missing = [c for c in folder.checkpoints() if not c.is_file()]
    if missing:
        raise LungsError(f"{missing[0]} is missing, so run {folder.name} cannot predict ({len(missing)} of "
                         f"{len(folder.parts)} model(s) lack their best checkpoint); continue the run with --resume")
    device = select_device(params["device"])
    calibration = folder.metrics.get("calibration") or {}
    return Trained(folder.name, folder.path, folder.kind, params,
                   [load_model(params, c, device) for c in folder.checkpoints()],
                   float(calibration["temperature"]) if calibration.get("applied") else 1.0,
                   _polarity(folder),
                   tuple(folder.metrics.get("image_shape") or DEFAULT_SHAPE),  # type: ignore[arg-type]
                   synthetic=bool(folder.synthetic))


def _polarity(folder: RunFolder) -> Polarity | None:
    """The run's polarity detector (None for a set too small to fit one, which writes no file); a damaged
    ``polarity.json`` is refused: predicting without the run's detector would take inverted films as they are."""
    path = folder.path / POLARITY_FILE
    found = Polarity.load(path)
    if found is None and path.is_file():
        raise LungsError(f"{path} is damaged (no detector weights); continue run {folder.name} with -p resume=true, "
                         "which writes it again")
    return found


def predict(trained: Trained, films: Films, masks: np.ndarray | None = None, *, progress: bool = False
            ) -> np.ndarray:
    """Calibrated class probabilities ``(N, 3)``: the run's model, its fold models' mean, or its ensemble's
    members combined as the ensemble was."""
    if trained.kind == ENSEMBLE:
        probs = np.stack([predict(m, films, masks, progress=progress) for m in trained.members])
        return combined(probs, np.asarray(trained.weights), trained.method)
    p = trained.params
    if p["masks"] != "none" and masks is None:
        raise LungsError(f"run {trained.name} was trained with masks: {p['masks']}; pass the films' lung masks "
                         "(--masks DIR) or a segmentation run to predict them (--mask-run RUN)")
    settings = PredictSettings.from_params(p)
    dataset = XrayDataset(films.images, np.arange(len(films)), masks=masks if p["masks"] != "none" else None)
    out = [apply_temperature(predict_proba(model, dataset, settings, progress=progress)[1], trained.temperature)
           for model in trained.models]
    return np.mean(out, axis=0)


def predict_lungs(mask_run: str, films: Films) -> np.ndarray:
    """Lung masks (uint8 0 / 255, at the films' size) for ``films``, predicted by a finished segmentation
    run's models from their checkpoints: averaged and post-processed as the run's own test masks were
    (``lungs predict --mask-run``)."""
    folder = RunFolder(mask_run_dir(mask_run))
    if folder.kind != SEGMENTATION or not folder.trained:
        raise LungsError(f"mask_run {mask_run!r}: no trained lung segmentation run in {folder.path} (checkpoints/"
                         "best.pt in each fold); finish the run first")
    p = folder.load_params()
    settings = PredictSettings.from_params(p)
    dataset = XrayDataset(np.asarray(films.images, dtype=np.uint8), np.arange(len(films)))
    total = None
    for checkpoint in folder.checkpoints():
        _, probs = mask_probabilities(load_model(p, checkpoint, settings.device), dataset, settings)
        total = probs.astype(np.float32) if total is None else total + probs
    return binarize((total / len(folder.parts)).astype(np.float16), tuple(films.images.shape[1:]), p["postprocess"])


# ------------------------------------------------------------------------------------------------ answers
def read_answers(path: str | os.PathLike[str], films: Films) -> np.ndarray:
    """Each film's true class from an ``id,target_feature`` or ``file,target_feature`` CSV
    (:func:`lungs_utils.xrays.layout.check_labels`); -1 where the file has no row for it."""
    path = Path(path)
    if not path.is_file():
        raise LungsError(f"--answers {path} does not exist; pass a CSV with id,target_feature or file,target_feature")
    raw = read_text_csv(path, "one row per film")
    columns = [str(c).strip() for c in raw.columns]
    key = "id" if "id" in columns else "file" if "file" in columns else None
    if key is None or "target_feature" not in columns:
        raise LungsError(f"{path}: expected header 'id,target_feature' or 'file,target_feature', found "
                         f"{','.join(columns)}")
    table = check_labels(raw, str(path), file_line, key=key, rows="one row per film")
    if key == "id":
        truth = dict(zip(table["id"], table["target_feature"]))
        found = [truth.get(i, -1) if i is not None else -1 for i in films.ids]
    else:
        truth = dict(zip(table["file"].map(lambda s: Path(s).name), table["target_feature"]))
        found = [truth.get(f.name, -1) for f in films.files]
    y = np.asarray(found, dtype=np.int64)
    if (y < 0).all():
        raise LungsError(f"{path}: no row matches any of the {len(films)} film(s) (by {key}); check the file")
    return y


# ------------------------------------------------------------------------------------------------ the command
def predictions_frame(films: Films, probs: np.ndarray) -> pd.DataFrame:
    """``file, id, predicted, p0, p1, p2`` (and ``inverted`` when a film was turned upright)."""
    frame = pd.DataFrame({"file": [f.name for f in films.files],
                          "id": pd.array(films.ids, dtype="Int64"),
                          "predicted": probs.argmax(axis=1).astype(np.int64)})
    for k in range(NUM_CLASSES):
        frame[f"p{k}"] = probs[:, k].astype(np.float32)
    frame["inverted"] = films.inverted
    return frame


def default_out(trained: Trained, images: str | os.PathLike[str] | Sequence[Any]) -> Path:
    """``outputs/predictions/<run>-<folder of the films>``: beside the runs, not inside one."""
    first = Path(images if isinstance(images, (str, os.PathLike)) else images[0])
    where = first if first.is_dir() else first.parent
    return outputs_dir() / "predictions" / f"{trained.name}-{where.resolve().name or 'films'}"


def predict_folder(run: str | os.PathLike[str], images: str | os.PathLike[str] | Sequence[Any], *,
                   answers: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] | None = None,
                   masks: str | os.PathLike[str] | None = None, mask_run: str | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """``lungs predict``: predictions.csv for every readable film; with ``answers`` macro-F1 (and its
    interval) and the confusion matrix in ``scores.json``; with lung masks also the shortcut audit
    (``audit.json``). Returns what was written and scored."""
    if masks is not None and mask_run is not None:
        raise LungsError("--masks and --mask-run both give lung masks; pass one of them")
    files = list_films(images)
    trained = open_run(run)
    if trained.synthetic:
        warnings.warn(f"run {trained.name} was trained on the SYNTHETIC phantom dataset: its predictions say nothing "
                      "about real X-rays (a phantom-trained model scored macro-F1 0.27 on real films); predict with "
                      "a run trained on real films (lungs download, then lungs run params/cpu_small.yaml)",
                      DataWarning, stacklevel=2)
    if answers is not None and not Path(answers).is_file():
        raise LungsError(f"--answers {answers} does not exist; pass a CSV with id,target_feature or "
                         "file,target_feature")
    films = read_films(files, trained.shape, trained.polarity)
    lungs = read_masks(films, masks) if masks is not None else predict_lungs(mask_run, films) if mask_run else None
    if trained.needs_masks and lungs is None:
        raise LungsError(f"run {trained.name} was trained with lung masks; pass the films' masks (--masks DIR) or a "
                         "segmentation run to predict them (--mask-run RUN)")
    y = read_answers(answers, films) if answers is not None else None  # before the minutes of predicting
    probs = predict(trained, films, lungs, progress=progress)
    folder = Path(out) if out is not None else default_out(trained, images)
    folder.mkdir(parents=True, exist_ok=True)
    frame = predictions_frame(films, probs)
    atomic_write_csv(frame, folder / PREDICTIONS_FILE)
    result: dict[str, Any] = {"run": trained.name, "kind": trained.kind, "films": len(films),
                              "trained_on_phantom": trained.synthetic,
                              "skipped": [[str(p), why] for p, why in films.skipped],
                              "inverted": int(films.inverted.sum()), "out": str(folder),
                              "predictions": str(folder / PREDICTIONS_FILE), "frame": frame}
    if y is not None:
        result["scores"] = score(y, probs)
        atomic_write_text(folder / "scores.json", json.dumps(result["scores"], indent=2))
        if lungs is not None and trained.kind != ENSEMBLE:
            result["audit"] = audit_films(trained, films, y, lungs, progress=progress)
            atomic_write_text(folder / "audit.json", json.dumps(result["audit"], indent=2))
    return result


def score(y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Macro-F1 (with its 95 % bootstrap interval), accuracy and the confusion matrix of the films that
    have an answer."""
    keep = y >= 0
    pred = probs.argmax(axis=1)
    ci = f1_interval(y[keep], pred[keep])
    return {**classification_metrics(y[keep], pred[keep]), "macro_f1_ci": [ci.low, ci.high],
            "n": int(keep.sum()), "unanswered": int((~keep).sum())}


def audit_films(trained: Trained, films: Films, y: np.ndarray, lungs: np.ndarray, *, progress: bool = False
                ) -> dict[str, Any]:
    """The shortcut audit (:mod:`lungs_utils.analysis.audit`) of the run's model(s) on these films: every
    model's figures pooled (a cross-validation run's fold models each on every film)."""
    p = trained.params
    keep = np.flatnonzero(y >= 0)
    own = lungs if p["masks"] != "none" else None
    dataset = XrayDataset(films.images, np.arange(len(films)), y, own, indices=keep)
    settings = PredictSettings.from_params(p).without_tta()
    t0 = time.perf_counter()
    source = "the films' lung masks (--masks / --mask-run)"
    tables = [audit.model_figures(model, None, dataset, p, settings, lungs=lungs[keep], source=source,
                                  progress=progress)[0] for model in trained.models]
    return audit.assess(audit.pool(tables), source, seed=p["seed"], seconds=time.perf_counter() - t0)


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """What ``lungs predict`` prints."""
    lines = [f"{result['films']} film(s) predicted by {result['run']} ({result['kind']})"
             + (f", {len(result['skipped'])} skipped" if result["skipped"] else "")
             + (f", {result['inverted']} turned upright" if result["inverted"] else "")
             + f": {result['predictions']}"]
    counts = np.bincount(result["frame"]["predicted"], minlength=NUM_CLASSES)
    lines.append("predicted: " + ", ".join(f"{name} {n}" for name, n in zip(CLASS_NAMES, counts)))
    s = result.get("scores")
    if s:
        lo, hi = s["macro_f1_ci"]
        lines.append(f"macro-F1 {s['macro_f1']:.4f} (95% CI {lo:.4f} to {hi:.4f})  accuracy {s['accuracy']:.4f}  "
                     f"({s['n']} films with an answer" + (f", {s['unanswered']} without" if s["unanswered"] else "") + ")")
        width = max(len(n) for n in CLASS_NAMES)
        lines.append("confusion matrix (rows: true, columns: predicted " + " / ".join(CLASS_NAMES) + "):")
        lines += [f"  {name:>{width}}  " + " ".join(f"{v:5d}" for v in row)
                  for name, row in zip(CLASS_NAMES, s["confusion_matrix"])]
    if result.get("audit"):
        lines.append(audit.summary_line(result["audit"]))
    return lines
