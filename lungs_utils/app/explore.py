"""One film at a time with a finished run, for the ``96_explore`` notebook: a teaching tool, not a diagnosis.

:func:`explain` draws what a run makes of one film — the film as the model sees it (turned upright when
it was inverted), where the model looked (Grad-CAM), the lungs (when a segmentation run predicts them)
and the three class probabilities. :func:`widget` wraps it in JupyterLab controls (ipywidgets): pick a
finished run, pick one of the data's test films or upload your own. All predictions go through
:mod:`lungs_utils.analysis.apply`, exactly as ``lungs predict`` makes them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import CLASS_NAMES
from ..analysis.apply import Films, Trained, open_run, predict, predict_lungs, read_films
from ..analysis.gradcam import gradcam
from ..errors import LungsError
from ..paths import find_data_dir, outputs_dir
from ..runfolder import CLASSIFIER, CV, ENSEMBLE, METRICS_FILE, SEGMENTATION, TEST_MASKS, RunFolder
from ..xrays.layout import TEST_IMAGES, list_images
from ..xrays.presets import to_input

DISCLAIMER = ("This is a teaching tool, not a diagnosis: a small model trained on a few hundred or thousand "
              "films from a public dataset, which can be confidently wrong, and has never been checked on patients "
              "like yours. Never use it to make or change a medical decision.")


def finished_runs(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the runs under ``outputs/`` that can predict (classifier, cross-validation or ensemble),
    newest first."""
    root = Path(root) if root is not None else outputs_dir()
    found = [RunFolder(f) for f in (root.iterdir() if root.is_dir() else [])]
    ready = [f for f in found if f.scored and (f.kind == ENSEMBLE or (f.kind in (CLASSIFIER, CV) and f.trained))]
    return [f.path.name for f in sorted(ready, key=lambda f: (f.path / METRICS_FILE).stat().st_mtime, reverse=True)]


def pick_run(runs: Sequence[str] = ()) -> str:
    """The run to explore: the first of ``runs``, else the newest finished one under ``outputs/``."""
    if runs:
        return str(runs[0])
    found = finished_runs()
    if not found:
        raise LungsError(f"no finished run in {outputs_dir()} to explore: run a model notebook first (e.g. "
                         "10_simple_cnn, or `make demo`), or name one: runs = [\"<run name>\"]")
    return found[0]


def pick_mask_run(mask_run: str | None = None) -> str | None:
    """The lung segmentation run that draws the lungs: ``mask_run``, else the newest one under ``outputs/``
    (None when there is none: the lungs are then not drawn)."""
    if mask_run:
        return mask_run
    root = outputs_dir()
    segs = [f for f in map(RunFolder, root.iterdir() if root.is_dir() else [])
            if f.kind == SEGMENTATION and (f.masks / TEST_MASKS).is_dir() and f.trained]
    return max(segs, key=lambda f: f.path.stat().st_mtime).path.name if segs else None


def sample_films(data_dir: str | os.PathLike[str] | None = None, n: int = 12) -> list[Path]:
    """The first ``n`` test films of the data that discovery finds (``lungs download``, the phantom...)."""
    return list(list_images(find_data_dir(data_dir) / TEST_IMAGES).values())[:n]


def _model_input(trained: Trained, films: Films, lungs: np.ndarray | None) -> tuple[Any, Any]:
    """The first model of a run (an ensemble's first member's) and a film batch as its input."""
    import torch

    while trained.kind == "ensemble":
        trained = trained.members[0]
    p = trained.params
    x = torch.from_numpy(films.images).unsqueeze(1)
    if p["masks"] != "none" and lungs is not None:
        x = torch.cat([x, torch.from_numpy(lungs).unsqueeze(1)], dim=1)
    model = trained.models[0]
    device = next(model.parameters()).device
    return model, to_input(x.to(device), p["image_size"], masks=p["masks"], histeq=p["histeq"])


def explain(trained: Trained, films: Films, index: int = 0, lungs: np.ndarray | None = None,
            probs: np.ndarray | None = None) -> Figure:
    """Film ``index``: as the model sees it, Grad-CAM of the predicted class, the lungs (if given) and the
    run's calibrated probabilities."""
    probs = predict(trained, films, lungs) if probs is None else probs
    model, x = _model_input(trained, films, lungs)
    cams, _, layer = gradcam(model, x[index:index + 1])
    film = films.images[index]
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 4, width_ratios=(1, 1, 1, 1.2))
    title = films.files[index].name + (" (was inverted: turned upright)" if films.inverted[index] else "")
    axes[0].imshow(film, cmap="gray")
    axes[0].set_title(title, fontsize=8.5)
    axes[1].imshow(film, cmap="gray")
    axes[1].imshow(_resize(cams[0], film.shape), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title(f"where it looked (Grad-CAM, {layer})", fontsize=8.5)
    axes[2].imshow(film, cmap="gray")
    if lungs is not None:
        axes[2].imshow(np.ma.masked_equal(lungs[index], 0), cmap="autumn", alpha=0.35)
        axes[2].set_title("lungs (predicted mask)", fontsize=8.5)
    else:
        axes[2].set_title("lungs: no segmentation run given", fontsize=8.5)
    for ax in axes[:3]:
        ax.axis("off")
    p = probs[index]
    bars = axes[3].barh(list(CLASS_NAMES), p, color=["#4C72B0", "#DD8452", "#C44E52"])
    axes[3].bar_label(bars, labels=[f"{v:.0%}" for v in p], padding=3, fontsize=9)
    axes[3].set_xlim(0, 1.15)
    axes[3].invert_yaxis()
    axes[3].set_title(f"{trained.name}: {CLASS_NAMES[int(p.argmax())]} ({p.max():.0%})", fontsize=9)
    for side in ("top", "right"):
        axes[3].spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def _resize(cam: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.BILINEAR))


def describe(trained: Trained, films: Films, probs: np.ndarray, index: int = 0) -> str:
    """The prediction in plain words, with the disclaimer."""
    p = probs[index]
    ranked = np.argsort(p)[::-1]
    return (f"{films.files[index].name}: the model says {CLASS_NAMES[ranked[0]]} ({p[ranked[0]]:.0%}), then "
            f"{CLASS_NAMES[ranked[1]]} ({p[ranked[1]]:.0%}) and {CLASS_NAMES[ranked[2]]} ({p[ranked[2]]:.0%}). "
            f"{DISCLAIMER}")


def look(run: str | Trained, files: Sequence[str | os.PathLike[str]], mask_run: str | None = None,
         index: int = 0) -> tuple[str, Figure]:
    """Predict ``files`` with ``run`` (a run name, or a run already opened) and explain film ``index``:
    (text, figure)."""
    trained = open_run(run) if isinstance(run, str) else run
    films = read_films([Path(f) for f in files], trained.shape, trained.polarity)
    lungs = predict_lungs(mask_run, films) if mask_run else None
    probs = predict(trained, films, lungs)
    return describe(trained, films, probs, index), explain(trained, films, index, lungs, probs)


def widget(runs: Sequence[str], films: Sequence[Path], mask_run: str | None = None) -> Any:
    """JupyterLab controls: a run, a test film or an uploaded one; the answer is drawn below them."""
    import ipywidgets as w

    from ..stats.plots import show

    run_box = w.Dropdown(options=list(runs), description="run")
    film_box = w.Dropdown(options=[(f.name, str(f)) for f in films], description="film")
    upload = w.FileUpload(accept="image/*", multiple=False, description="upload a film")
    out = w.Output()
    opened: dict[str, Trained] = {}  # each run's models loaded once, not on every pick

    def draw(path: str) -> None:
        out.clear_output(wait=True)
        with out:
            try:
                if run_box.value not in opened:
                    opened[run_box.value] = open_run(run_box.value)
                text, fig = look(opened[run_box.value], [path], mask_run)
            except Exception as exc:  # noqa: BLE001 - any failure is shown to the person, one line
                print(f"cannot explain {Path(path).name}: {str(exc).splitlines()[0]}")
                return
            print(text)
            show(fig)

    def uploaded(change: dict) -> None:
        for item in change["new"]:
            folder = Path(tempfile.mkdtemp(prefix="lungs-upload-"))
            path = folder / Path(item["name"]).name
            path.write_bytes(bytes(item["content"]))
            draw(str(path))

    run_box.observe(lambda _: film_box.value and draw(film_box.value), names="value")
    film_box.observe(lambda change: draw(change["new"]), names="value")
    upload.observe(uploaded, names="value")
    if film_box.value:
        draw(film_box.value)
    return w.VBox([w.HBox([run_box, film_box, upload]), out])
