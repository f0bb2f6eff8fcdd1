"""Input presets: uint8 batches → normalised float tensors, and training augmentation.

Augmentation runs on whole batches on the training device (per-sample random parameters, vectorised),
so an epoch never goes through PIL and the CPU data path costs almost nothing. Every one of the original
project's nine augmentation flags has an equivalent here: flips, rotation, affine shift/zoom,
brightness, contrast, equalize, sharpness, invert, random resized crop — plus mixup/cutmix
(torchvision ``v2.MixUp`` / ``v2.CutMix``). :func:`item_transform` builds the same recipe as a
per-item torchvision v2 pipeline for code that wants one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .. import NUM_CLASSES
from ..params import MASK_MODES

#: Grayscale intensity statistics reported for the competition set (on [0, 1]).
MEAN, STD = 0.514, 0.225


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise the radiograph (channel 0) of a uint8 batch ``(N, C, H, W)``; a mask channel
    is left alone."""
    if x.shape[1] == 1:
        return TF.equalize(x)
    return torch.cat([TF.equalize(x[:, :1].contiguous()), x[:, 1:]], dim=1)


def to_input(x: torch.Tensor, image_size: int | None = None, masks: str = "channel",
             histeq: bool = False) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` → float32 network input at ``image_size``.

    Channel 0 is the radiograph (histogram-equalised first with ``histeq``), normalised with the
    dataset's mean/std; a second channel, if present, is a lung mask, used as ``masks`` says
    (:func:`apply_masks`; the default keeps it as a {0, 1} channel).
    """
    if histeq:
        x = equalize(x)
    x = apply_masks(x.float().div_(255.0), masks, image_size)
    if image_size is not None and x.shape[-2:] != (image_size, image_size):
        x = resize(x, image_size)
    x[:, :1].sub_(MEAN).div_(STD)
    return x


#: Margin kept around the lungs (fraction of the side): the mask's edge runs along the pleura and
#: costophrenic angles, where findings sit, and predicted masks are a little tight there.
MASK_MARGIN = 0.03
#: Masks covering less than this share of the image are treated as missing (a failed prediction),
#: so the whole image is used rather than a blank one.
MIN_MASK_AREA = 0.01


def apply_masks(x: torch.Tensor, mode: str, image_size: int | None = None) -> torch.Tensor:
    """Use the mask channel of a float batch ``(N, 2, H, W)`` in [0, 1] as ``mode`` says.

    ``none`` drops it; ``multiply`` zeroes everything outside the (slightly grown) lungs; ``crop``
    cuts each image to its lungs' bounding box plus a margin, resized to ``image_size`` (one batched
    ``roi_align``); ``channel`` keeps it as a second channel. 1-channel batches pass through.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {mode!r}")
    if x.shape[1] == 1 or mode == "channel":
        return x
    img, mask = x[:, :1], (x[:, 1:2] > 0.5).to(x.dtype)
    if mode == "none":
        return img
    n, _, h, w = x.shape
    present = mask.mean(dim=(1, 2, 3)) >= MIN_MASK_AREA
    if mode == "multiply":
        grown = torch.where(present.view(n, 1, 1, 1), grow_mask(mask), torch.ones_like(mask))
        return img * grown
    from torchvision.ops import roi_align

    rows, cols = mask[:, 0].amax(dim=2) > 0, mask[:, 0].amax(dim=1) > 0  # (N, H), (N, W)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    top = torch.where(rows, ar_h, h).amin(dim=1)
    bottom = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    left = torch.where(cols, ar_w, w).amin(dim=1)
    right = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    mh, mw = MASK_MARGIN * h, MASK_MARGIN * w
    boxes = torch.stack([(left - mw).clamp(min=0), (top - mh).clamp(min=0),
                         (right + mw).clamp(max=w), (bottom + mh).clamp(max=h)], dim=1).to(x.dtype)
    full = torch.tensor([0, 0, w, h], dtype=x.dtype, device=x.device)
    boxes = torch.where(present.view(n, 1), boxes, full)
    size = image_size or (h, w)
    index = torch.arange(n, dtype=x.dtype, device=x.device).view(n, 1)
    return roi_align(img, torch.cat([index, boxes], dim=1), output_size=size, spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def grow_mask(mask: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask batch ``(N, 1, H, W)`` grown by :data:`MASK_MARGIN` of the side (square dilation)."""
    h, w = mask.shape[-2:]
    k = 2 * max(1, round(MASK_MARGIN * max(h, w))) + 1
    # A row pass then a column pass: 2k instead of k*k comparisons per pixel.
    grown = F.max_pool2d(mask, (k, 1), stride=1, padding=(k // 2, 0))
    return F.max_pool2d(grown, (1, k), stride=1, padding=(0, k // 2))


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Batched bilinear resize with antialiasing (float input)."""
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True)


#: Side of a "framed" film (``frame`` augmentation) as a share of the image side: smallest, largest.
FRAME_ZOOM = (0.55, 0.9)


class BatchAugment:
    """Per-sample random augmentation of a float batch in [0, 1] (before normalisation).

    Geometric transforms (flip, rotation, shift, zoom, random resized crop) are folded into one affine
    grid per sample and applied with a single ``grid_sample``; photometric ones are per-sample factors.
    A second (mask) channel follows the geometry but not the photometry.
    """

    def __init__(self, params: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
        self.p = dict(params)
        self.generator = generator

    def _rand(self, n: int, device: torch.device) -> torch.Tensor:
        # Drawn on the CPU (one seeded stream whatever the device). A copy from pageable memory
        # would wait for the GPU to finish all queued work; pinned + non_blocking does not.
        r = torch.rand(n, generator=self.generator)
        if device.type == "cuda":
            return r.pin_memory().to(device, non_blocking=True)
        return r

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return low + (high - low) * self._rand(n, device)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        n, dev, p = x.shape[0], x.device, self.p
        if not (p["rotate"] or p["translate"] or p["scale"] or p["crop_scale"] or p["frame"]):
            if not p["hflip"]:
                return x
            # A flip alone moves pixels exactly: no resampling needed (several times cheaper).
            flip = (self._rand(n, dev) < p["hflip"]).view(n, 1, 1, 1)
            return torch.where(flip, x.flip(-1), x)
        angle = self._uniform(n, -p["rotate"], p["rotate"], dev) * (math.pi / 180)
        zoom = self._uniform(n, 1 - p["scale"], 1 + p["scale"], dev)
        sx = sy = 1.0 / zoom  # output samples a window 1/zoom the size of the input
        tx = self._uniform(n, -p["translate"], p["translate"], dev) * 2
        ty = self._uniform(n, -p["translate"], p["translate"], dev) * 2
        if p["crop_scale"]:
            # Random resized crop: a window of area in [crop_scale, 1] and aspect in [3/4, 4/3].
            area = self._uniform(n, p["crop_scale"], 1.0, dev)
            log_ratio = self._uniform(n, math.log(3 / 4), math.log(4 / 3), dev)
            ratio = torch.exp(log_ratio)
            sx = sx * torch.sqrt(area * ratio).clamp(max=1.0)
            sy = sy * torch.sqrt(area / ratio).clamp(max=1.0)
            tx = tx + (1 - sx) * self._uniform(n, -1, 1, dev)
            ty = ty + (1 - sy) * self._uniform(n, -1, 1, dev)
        framed = None
        if p["frame"]:
            # A small film inside a black frame (real radiographs often are): zoom out to z of the
            # side, anywhere the whole film stays in view; black (not edge pixels) around it.
            framed = self._rand(n, dev) < p["frame"]
            z = self._uniform(n, *FRAME_ZOOM, dev)
            room = (1 - z) / z
            sx = torch.where(framed, 1 / z, sx)
            sy = torch.where(framed, 1 / z, sy)
            tx = torch.where(framed, room * self._uniform(n, -1, 1, dev), tx)
            ty = torch.where(framed, room * self._uniform(n, -1, 1, dev), ty)
        flip = torch.where(self._rand(n, dev) < p["hflip"], -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * sx * flip, -sin * sy, tx], dim=1),
            torch.stack([sin * sx * flip, cos * sy, ty], dim=1),
        ], dim=1)
        grid = _affine_grid(theta.to(x.dtype), x.shape[-2], x.shape[-1])
        # channels_last takes grid_sample's faster CPU kernel (same memory for one channel).
        out = F.grid_sample(x.contiguous(memory_format=torch.channels_last), grid, mode="bilinear",
                            padding_mode="border", align_corners=False)
        if framed is not None:
            inside = (grid.abs() <= 1).all(dim=-1).unsqueeze(1)  # (N, 1, H, W): on the film
            out = torch.where(framed.view(n, 1, 1, 1) & ~inside, torch.zeros((), dtype=out.dtype, device=dev), out)
        if x.shape[1] > 1:
            out[:, 1:] = (out[:, 1:] > 0.5).to(out.dtype)
        return out

    def photometry(self, x: torch.Tensor) -> torch.Tensor:
        n, dev, p = x.shape[0], x.device, self.p
        img = x[:, :1]
        if p["brightness"] or p["contrast"]:
            # Brightness b then contrast c about the mean m is one affine map per image:
            # (b*img - b*m) * c + b*m = img * (b*c) + b*m*(1 - c); one pass instead of five.
            b = self._uniform(n, 1 - p["brightness"], 1 + p["brightness"], dev) if p["brightness"] \
                else torch.ones(n, device=dev)
            scale, shift = b, torch.zeros(n, device=dev)
            if p["contrast"]:
                c = self._uniform(n, 1 - p["contrast"], 1 + p["contrast"], dev)
                shift = b * img.mean(dim=(1, 2, 3)) * (1 - c)
                scale = b * c
            img = torch.addcmul(shift.view(n, 1, 1, 1), img, scale.view(n, 1, 1, 1).to(img.dtype))
        img = img.clamp(0.0, 1.0)
        for key, fn in (("equalize", _equalize), ("sharpness", _sharpen), ("invert", TF.invert)):
            if p[key]:
                # Chosen on the CPU: no GPU→CPU sync to learn which images (or whether any) to change.
                chosen = (self._rand(n, torch.device("cpu")) < p[key]).nonzero().squeeze(1)
                if len(chosen):
                    chosen = chosen.to(dev, non_blocking=True)
                    img = img.clone()
                    img[chosen] = fn(img[chosen])
        return torch.cat([img, x[:, 1:]], dim=1) if x.shape[1] > 1 else img

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.photometry(self.geometry(x))


def _equalize(img: torch.Tensor) -> torch.Tensor:
    # torchvision's equalize works on uint8 histograms; round-trip keeps it exact.
    return TF.equalize((img * 255).round().to(torch.uint8)).float() / 255


def _sharpen(img: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """``TF.adjust_sharpness(img, factor)`` for a (N, 1, H, W) batch; border pixels stay as they are,
    like PIL's. PIL's SMOOTH kernel is (3x3 box sum + 4 * centre) / 13, and blending with it is
    ``centre * (factor + (1 - factor) * 4/13) + box * (1 - factor) / 13``: a separable box sum from
    shifted adds, several times faster on a CPU than a 1-channel convolution."""
    rows = img[..., :-2, :] + img[..., 1:-1, :] + img[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = img.clone()
    centre = img[..., 1:-1, 1:-1]
    out[..., 1:-1, 1:-1] = torch.add(centre * (factor + (1 - factor) * 4 / 13), box, alpha=(1 - factor) / 13)
    return out.clamp_(0.0, 1.0)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, h, w), align_corners=False)`` by broadcasting (~5x faster on a
    CPU than its batched matrix product)."""
    n = theta.shape[0]
    xs = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    a = theta.reshape(n, 6, 1, 1)
    grid = torch.empty(n, h, w, 2, dtype=theta.dtype, device=theta.device)
    grid[..., 0] = a[:, 0] * xs.view(1, 1, w) + a[:, 1] * ys.view(1, h, 1) + a[:, 2]
    grid[..., 1] = a[:, 3] * xs.view(1, 1, w) + a[:, 4] * ys.view(1, h, 1) + a[:, 5]
    return grid


def mix(params: Mapping[str, Any]) -> v2.Transform | None:
    """MixUp / CutMix on (normalised batch, labels) → (batch, soft labels), or None when both are off."""
    choices: list[v2.Transform] = []
    if params["mixup"] > 0:
        choices.append(v2.MixUp(alpha=params["mixup"], num_classes=NUM_CLASSES))
    if params["cutmix"] > 0:
        choices.append(v2.CutMix(alpha=params["cutmix"], num_classes=NUM_CLASSES))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def train_batch(x: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator | None = None,
                masks: str | None = None) -> torch.Tensor:
    """uint8 batch → augmented, normalised float batch at ``params['image_size']``.

    A mask channel is used as ``masks`` (default ``params['masks']``) says, before augmentation; kept
    as a channel, it follows the geometry but not the photometry.
    """
    if params["histeq"]:
        x = equalize(x)
    x = apply_masks(x.float().div_(255.0), masks or params["masks"], params["image_size"])
    if x.shape[-2:] != (params["image_size"],) * 2:
        x = resize(x, params["image_size"])
    x = BatchAugment(params, generator)(x)
    x[:, :1].sub_(MEAN).div_(STD)
    return x


def item_transform(params: Mapping[str, Any]) -> v2.Compose:
    """The same recipe as a per-item torchvision v2 pipeline (uint8 ``(C,H,W)`` → normalised float)."""
    size = params["image_size"]
    steps: list[v2.Transform] = []
    if params["crop_scale"]:
        steps.append(v2.RandomResizedCrop(size, scale=(params["crop_scale"], 1.0), antialias=True))
    else:
        steps.append(v2.Resize((size, size), antialias=True))
    if params["hflip"]:
        steps.append(v2.RandomHorizontalFlip(params["hflip"]))
    if params["rotate"] or params["translate"] or params["scale"]:
        steps.append(v2.RandomAffine(params["rotate"], translate=(params["translate"],) * 2,
                                     scale=(1 - params["scale"], 1 + params["scale"])))
    if params["frame"]:
        # Film shrunk into a black frame (fill 0), placed anywhere it fits.
        room = 1 - FRAME_ZOOM[1]
        steps.append(v2.RandomApply([v2.RandomAffine(0, translate=(room, room), scale=FRAME_ZOOM, fill=0)],
                                    p=params["frame"]))
    if params["brightness"] or params["contrast"]:
        steps.append(v2.ColorJitter(brightness=params["brightness"], contrast=params["contrast"]))
    if params["equalize"]:
        steps.append(v2.RandomEqualize(params["equalize"]))
    if params["sharpness"]:
        steps.append(v2.RandomAdjustSharpness(2.0, params["sharpness"]))
    if params["invert"]:
        steps.append(v2.RandomInvert(params["invert"]))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])]
    return v2.Compose(steps)
