"""Prediction: how a run predicts (:class:`PredictSettings`, from its params), test-time views, class
probabilities and lung-mask probabilities for a dataset.

Every prediction of a trained model — a run's validation and test sets, ``lungs predict``'s films, a
segmentation run's masks, the audit — takes its settings from :meth:`PredictSettings.from_params` and
goes through :func:`lungs_utils.engine.inference.infer`. The tables the probabilities become live in
:mod:`lungs_utils.xrays.submission`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import NUM_CLASSES
from ..errors import LungsError
from ..xrays.presets import to_input
from .device import autocast_dtype, select_device
from .inference import IDENTITY, View, infer, view_identity

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
# Settings
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictSettings:
    """How a run predicts: input side and lung-mask use, batch, device and precision, test-time views."""

    image_size: int
    device: torch.device
    dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    batch_size: int = 64
    tta: bool = False
    #: With ``tta``, whether the mirrored view is among them: a model trained without flips never saw a
    #: mirrored chest.
    mirror: bool = True
    channels_last: bool = False
    masks: str = "none"  # how a lung-mask channel in the items is used (the params key)
    histeq: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any], device: torch.device | None = None) -> PredictSettings:
        """A run's prediction settings: its ``image_size``, ``masks``, ``histeq``, ``tta``, ``hflip`` (a
        mirrored view only if it trained on mirrored chests), ``channels_last``, ``precision`` and
        ``device``; batches of at least 64 (inference needs no gradients)."""
        device = select_device(params["device"]) if device is None else device
        return cls(image_size=params["image_size"], device=device, dtype=autocast_dtype(device, params["precision"]),
                   batch_size=max(64, params["batch_size"]), tta=params["tta"], mirror=params["hflip"] > 0,
                   channels_last=params["channels_last"], masks=params.get("masks", "none"),
                   histeq=params["histeq"])

    def without_tta(self) -> PredictSettings:
        return replace(self, tta=False)

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A uint8 batch as the network input (see :func:`lungs_utils.xrays.presets.to_input`)."""
        return to_input(x, self.image_size, masks=self.masks, histeq=self.histeq), y

    def class_views(self) -> tuple[View, ...]:
        """The test-time views of class scores: :data:`TTA_VIEWS` with ``tta``, else the batch as is."""
        if not self.tta:
            return (IDENTITY,)
        return tuple((v, None) for v in TTA_VIEWS if self.mirror or v is not view_hflip)

    def mask_views(self) -> tuple[View, ...]:
        """The test-time views of lung masks: the mirrored view (mirrored back) with ``tta``."""
        return (IDENTITY, (view_hflip, view_hflip)) if self.tta else (IDENTITY,)


# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------
def _check_device(model: torch.nn.Module, device: torch.device) -> None:
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise LungsError(f"the model is on {param.device} but prediction was asked on {device}; "
                         f"move it first with model.to({str(device)!r})")


def predict_proba(model: torch.nn.Module, dataset: torch.utils.data.Dataset, settings: PredictSettings, *,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities for every item of ``dataset`` (items ``(uint8 (C,H,W), label, id)``), averaged
    over the settings' test-time views.

    Returns ``(ids int64 (N,), probs float32 (N, classes))`` in dataset order. The model must already
    be on the settings' device (and in channels_last format if ``channels_last``, for the speed-up). The
    model's train/eval modes are restored.
    """
    _check_device(model, settings.device)
    all_ids: list[np.ndarray] = []
    all_probs: list[np.ndarray] = []
    for probs, _, ids in infer(model, dataset, prepare=settings.prepare, device=settings.device,
                               batch_size=settings.batch_size, views=settings.class_views(),
                               transform=lambda out: torch.softmax(out, dim=1), channels_last=settings.channels_last,
                               autocast_dtype=settings.dtype, progress=progress):
        all_probs.append(probs.cpu().numpy().astype(np.float32))
        all_ids.append(ids.numpy().astype(np.int64))
    if not all_ids:
        return np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(all_ids), np.concatenate(all_probs)


def mask_probabilities(model: torch.nn.Module, dataset: torch.utils.data.Dataset, settings: PredictSettings, *,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lung probabilities at ``settings.image_size`` for every item: ``(ids (N,), float16 (N, S, S))``.

    Only the image channel of the items is used (a given mask is never an input); with ``tta`` the mirrored
    view is averaged in, mirrored back.
    """
    _check_device(model, settings.device)
    size = settings.image_size
    ids, probs = [], []
    for p, _, batch_ids in infer(model, dataset, prepare=lambda x, y: (to_input(x[:, :1], size, histeq=settings.histeq),
                                                                        y),
                                 device=settings.device, batch_size=settings.batch_size, views=settings.mask_views(),
                                 transform=torch.sigmoid, channels_last=settings.channels_last,
                                 autocast_dtype=settings.dtype, progress=progress):
        probs.append(p[:, 0].to(torch.float16).cpu().numpy())
        ids.append(batch_ids.numpy().astype(np.int64))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, size, size), np.float16)
    return np.concatenate(ids), np.concatenate(probs)
