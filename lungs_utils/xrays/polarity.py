"""Film polarity: is a radiograph intensity-inverted (lungs bright, bones dark)?

Chest X-rays are shown with air dark and bone bright, but films exported by some systems, or collected
from other sources, come inverted; a model (and the lung segmentation) trained on one polarity fails on
the other. A linear detector decides it: each film becomes a :data:`THUMB` x :data:`THUMB` thumbnail,
standardised (zero mean, unit spread), and a logistic regression is fitted to tell the training films
from their own inversions. Inverting a standardised thumbnail negates it, so the detector is the sign
of one weighted sum, and its training labels come free with the data. Measured: fitted on the 600 train
films of a COVID-QU-Ex subset, it told all 180 test films and all 379 films of another source (pediatric
and adult, other hospitals) from their inversions, with a margin; a fixed rule (lung fields darker than
the mediastinum) wrongly called 18 of 780 upright COVID-QU-Ex films inverted (opaque lungs, off-centre
films). A dataset's detector is fitted on its train films (a few inverted ones among them are outvoted)
and kept with every run (``polarity.json``), so new films are judged the same way (``lungs predict``).
:class:`Polarity` is the detector: it is fitted, saved, loaded and applied here and nowhere else. Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_write_text
from ..runfolder import read_json

#: Thumbnail side: the global layout (bright spine, mediastinum and abdomen, dark lung fields) is all it needs.
THUMB = 16
#: Regularisation of the logistic regression (inverse strength); its margin on unseen films grows with it.
C = 0.1
#: Fits, each on the training films turned upright by the previous one.
PASSES = 3


def thumbnails(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Standardised ``(N, THUMB * THUMB)`` thumbnails of uint8 films ``(N, H, W)`` (area averaging)."""
    from PIL import Image

    out = np.empty((len(images), THUMB * THUMB))
    for i, image in enumerate(images):
        # In float: area means exactly, so a film's inversion gives exactly the negated thumbnail.
        small = np.asarray(Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize((THUMB, THUMB), Image.BOX),
                           dtype=np.float64).ravel()
        out[i] = (small - small.mean()) / (small.std() + 1e-6)
    return out


class Polarity:
    """A fitted polarity detector: the weights of one linear score on standardised thumbnails (positive:
    upright, negative: inverted)."""

    def __init__(self, weights: np.ndarray | Sequence[float]) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)
        if self.weights.shape != (THUMB * THUMB,):
            raise ValueError(f"polarity weights must have {THUMB * THUMB} values, got {self.weights.shape}")

    @classmethod
    def from_films(cls, thumbs: np.ndarray, max_images: int = 4000, seed: int = 0) -> Polarity:
        """Fitted on upright films, given as their :func:`thumbnails`, and their inversions (at most
        ``max_images`` films, a seeded sample: more add nothing to a 256-weight linear model)."""
        from sklearn.linear_model import LogisticRegression

        rows = np.arange(len(thumbs))
        if len(rows) > max_images:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
        x = thumbs[rows]
        labels = np.r_[np.ones(len(x)), np.zeros(len(x))]
        weights = np.zeros(x.shape[1])
        for _ in range(PASSES):
            # Films the previous pass found inverted are turned upright before the next fit: a few inverted
            # films among the training films would otherwise pull the weights their way.
            upright = np.where((x @ weights < 0)[:, None], -x, x)
            model = LogisticRegression(C=C, fit_intercept=False, max_iter=2000)
            model.fit(np.concatenate([upright, -upright]), labels)
            weights = model.coef_[0].astype(np.float64)
        return cls(weights)

    def margin(self, images: np.ndarray | Sequence[np.ndarray], thumbs: np.ndarray | None = None) -> np.ndarray:
        """Per film: positive when upright, negative when inverted (the larger, the surer); ``thumbs`` when
        the films' :func:`thumbnails` are at hand."""
        if len(images) == 0 and thumbs is None:
            return np.zeros(0)
        return (thumbnails(images) if thumbs is None else thumbs) @ self.weights

    def inverted(self, images: np.ndarray | Sequence[np.ndarray], thumbs: np.ndarray | None = None) -> np.ndarray:
        """Per film: True when it looks intensity-inverted."""
        return self.margin(images, thumbs) < 0

    def upright(self, images: np.ndarray) -> np.ndarray:
        """Turn the inverted ones of uint8 films ``(N, H, W)`` upright, in place; returns which those were."""
        turned = self.inverted(images)
        images[turned] = 255 - images[turned]
        return turned

    def save(self, path: str | os.PathLike[str], inverted_ids: dict[str, Sequence[int]] | None = None) -> None:
        """``polarity.json``: the weights and, per part of the data (``train``, ``test``), the ids of the films
        found inverted."""
        record = {"weights": [float(v) for v in self.weights]}
        record.update({f"inverted_{part}_ids": [int(i) for i in ids] for part, ids in (inverted_ids or {}).items()})
        atomic_write_text(path, json.dumps(record) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Polarity | None:
        """The detector a run saved; None when it has none (a set too small to fit one, or an older run)."""
        weights = read_json(Path(path)).get("weights")
        try:
            return cls(weights) if weights else None
        except ValueError:
            return None
