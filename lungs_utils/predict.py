"""Inference: class probabilities for a dataset, optionally with test-time augmentation.

The tables these probabilities become (``val_predictions.csv``, ``test_predictions.csv``,
``submission.csv``) and the submission validator live in :mod:`lungs_utils.submission`, which needs no
torch; their names are re-exported here for code that imports them from this module.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import NUM_CLASSES
from .errors import LungsError
from .inference import IDENTITY, infer, view_identity
from .presets import to_input
from .submission import (PROB_COLUMNS, SUBMISSION_COLUMNS, SUBMISSION_FILE, TEST_COLUMNS, TEST_FILE,  # noqa: F401
                         VAL_COLUMNS, VAL_FILE, score_submission, submission_frame, test_frame,
                         validate_submission, val_frame, write_predictions)

#: Relative zoom of the two scale-shift TTA views.
TTA_ZOOM = 0.08


# --------------------------------------------------------------------------------------------------
# Test-time augmentation views (batched ops on the normalised input)
# --------------------------------------------------------------------------------------------------
def _rebinarise_mask(x: torch.Tensor) -> torch.Tensor:
    # Interpolation smears the {0,1} lung-mask channel; the network was trained on hard masks.
    if x.shape[1] > 1:
        x[:, 1:] = (x[:, 1:] > 0.5).to(x.dtype)
    return x


def view_hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal (left-right) flip."""
    return torch.flip(x, dims=(-1,))


def view_zoom_in(x: torch.Tensor, zoom: float = TTA_ZOOM) -> torch.Tensor:
    """Zoom in by ``zoom``: centre crop of 1/(1+zoom) of the side, resized back to full size."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h / (1 + zoom))), max(1, round(w / (1 + zoom)))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
    return _rebinarise_mask(out)


def view_zoom_out(x: torch.Tensor, zoom: float = TTA_ZOOM) -> torch.Tensor:
    """Zoom out by ``zoom``: shrink to 1/(1+zoom) of the side, pad back with the border pixels."""
    h, w = x.shape[-2:]
    sh, sw = max(1, round(h / (1 + zoom))), max(1, round(w / (1 + zoom)))
    small = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (h - sh) // 2, (w - sw) // 2
    # Replicate rather than zero padding: a black frame is a pattern the network never saw in training.
    out = F.pad(small, (left, w - sw - left, top, h - sh - top), mode="replicate")
    return _rebinarise_mask(out)


#: The TTA views whose softmax outputs are averaged when ``tta=True``.
TTA_VIEWS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    view_identity, view_hflip, view_zoom_in, view_zoom_out)


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------
def predict_proba(model: torch.nn.Module, dataset: torch.utils.data.Dataset, *, image_size: int,
                  device: torch.device | str = "cpu", batch_size: int = 128, tta: bool = False,
                  channels_last: bool = False, autocast_dtype: torch.dtype | None = None,
                  progress: bool = False, masks: str = "channel", histeq: bool = False, flip: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities for every item of ``dataset`` (items ``(uint8 (C,H,W), label, id)``).

    Returns ``(ids int64 (N,), probs float32 (N, classes))`` in dataset order. The model must already
    be on ``device`` (and in channels_last format if ``channels_last``, for the speed-up). With ``tta``
    the probabilities are averaged over :data:`TTA_VIEWS` (without the mirrored view when ``flip`` is
    false: a model trained without flips never saw a mirrored chest). A lung-mask channel in the items is used
    as ``masks`` says (the run's params key); ``histeq`` equalises the radiographs first, as in
    training. The model's train/eval modes are restored.
    """
    device = torch.device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise LungsError(f"the model is on {param.device} but prediction was asked on {device}; "
                         f"move it first with model.to({str(device)!r})")
    views = tuple((v, None) for v in TTA_VIEWS if flip or v is not view_hflip) if tta else (IDENTITY,)
    all_ids: list[np.ndarray] = []
    all_probs: list[np.ndarray] = []
    for probs, _, ids in infer(model, dataset, prepare=lambda x, y: (to_input(x, image_size, masks=masks,
                                                                             histeq=histeq), y),
                               device=device, batch_size=batch_size, views=views,
                               transform=lambda out: torch.softmax(out, dim=1), channels_last=channels_last,
                               autocast_dtype=autocast_dtype, progress=progress):
        all_probs.append(probs.cpu().numpy().astype(np.float32))
        all_ids.append(ids.numpy().astype(np.int64))
    if not all_ids:
        return np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(all_ids), np.concatenate(all_probs)
