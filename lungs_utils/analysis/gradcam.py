"""Grad-CAM (Selvaraju et al. 2017): where in the image the network looked for its decision.

The class score's gradient with respect to a late convolution's activations, averaged over space,
weights those activation maps; their ReLU'd sum, upsampled to the input, is the heat map.

The layer is found generically: the last ``nn.Conv2d`` that ``forward`` actually executes *and* that
the class score depends on. Module order is not enough — the U-Net's segmentation head is its last
registered convolution but takes no part in classification. Pass ``layer=`` (a module or its dotted
name) to choose another one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from .. import CLASS_NAMES
from ..errors import LungsError
from ..xrays.presets import to_input

#: Per-architecture layer overrides (registry name -> dotted module name); empty while the
#: generic choice works for every registered model.
TARGET_LAYERS: dict[str, str] = {}


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module | None:
    if layer is None or isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        raise LungsError(f"model has no layer {layer!r}; pass a dotted name from model.named_modules()") from None


def gradcam(model: nn.Module, x: torch.Tensor, target: Sequence[int] | torch.Tensor | None = None,
            layer: nn.Module | str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Heat maps for a normalised input batch ``x`` (N, C, H, W) on the model's device.

    ``target``: the class to explain per image (default: the predicted class). Returns
    ``(cams (N, H, W) float32 in [0, 1], probs (N, classes), layer name)``. The model is run in eval
    mode (restored afterwards); parameter gradients are left untouched.
    """
    chosen = _resolve_layer(model, layer)
    names = {m: n for n, m in model.named_modules()}
    executed: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        executed.append((module, output))

    watch = [chosen] if chosen is not None else [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in watch]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            probs = torch.softmax(logits.float(), dim=1)
            cls = probs.argmax(dim=1) if target is None else torch.as_tensor(target, device=logits.device)
            score = logits.gather(1, cls.view(-1, 1).long()).sum()
            candidates = [(m, out) for m, out in executed if out.requires_grad]
            if not candidates:
                raise LungsError("Grad-CAM found no convolution on the path to the class scores; "
                                 "pass layer= with a convolution's name")
            grads = torch.autograd.grad(score, [out for _, out in candidates], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # The last executed convolution that the score depends on. An all-zero gradient counts as
    # "does not depend": zero-initialised residual BatchNorms cut the last block off early in training.
    pairs = [(m, a, g) for (m, a), g in zip(candidates, grads) if g is not None]
    if not pairs:
        raise LungsError("the class scores do not depend on any convolution; pass layer= explicitly")
    module, activation, grad = next((p for p in reversed(pairs) if bool(p[2].abs().amax() > 0)), pairs[-1])
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach().float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return (cam.cpu().numpy().astype(np.float32), probs.detach().cpu().numpy(),
            names.get(module, type(module).__name__))


def pick_examples(labels: np.ndarray, per_class: int = 2, seed: int = 0) -> np.ndarray:
    """Positions of up to ``per_class`` seeded-random items of each class, class by class."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(np.asarray(labels) == c)
        if len(pool):
            out += sorted(rng.choice(pool, size=min(per_class, len(pool)), replace=False).tolist())
    return np.asarray(out, dtype=np.int64)


def overlay_grid(images: Sequence[np.ndarray | None], cams: Sequence[np.ndarray | None], titles: Sequence[str],
                 cols: int, title: str | None = None, alpha: float = 0.45) -> Figure:
    """Images (H, W) with their heat maps drawn over them, filled row by row (``None`` = empty slot)."""
    from ..stats.plots import image_grid

    fig, axes = image_grid(len(images), cols)
    for ax, img, cam, text in zip(axes, images, cams, titles):
        if img is None:
            continue
        ax.imshow(img, cmap="gray")
        ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax.set_title(text, fontsize=7.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def examples(model: nn.Module, dataset: torch.utils.data.Dataset, params: Mapping[str, Any],
             per_class: int = 2, layer: nn.Module | str | None = None) -> Figure:
    """Grad-CAM overlays for ``per_class`` validation images of each class (one row per true class,
    seeded by ``params['seed']``).

    ``dataset`` yields ``(uint8 (C, H, W), label, id)`` (an :class:`~lungs_utils.data.XrayDataset`);
    each panel explains the predicted class and is titled true → predicted (probability).
    """
    labels = np.asarray(getattr(dataset, "labels"))
    picks = pick_examples(labels, per_class, params.get("seed", 0))
    if len(picks) == 0:
        raise LungsError("no labelled images to explain; Grad-CAM needs the validation set")
    items = [dataset[int(i)] for i in picks]
    batch = torch.stack([x for x, _, _ in items])
    device = next(model.parameters()).device
    x = to_input(batch.to(device), params["image_size"], masks=params.get("masks", "channel"),
                 histeq=params.get("histeq", False))
    layer = layer if layer is not None else TARGET_LAYERS.get(params.get("model", ""))
    cams, probs, name = gradcam(model, x, layer=layer)
    shown = x[:, 0].detach().cpu().numpy()  # the network's view: resized, normalised
    slots: list[tuple[np.ndarray | None, np.ndarray | None, str]] = []
    for c in range(len(CLASS_NAMES)):
        row = [i for i, (_, label, _) in enumerate(items) if label == c]
        for i in row:
            _, label, image_id = items[i]
            k = int(probs[i].argmax())
            mark = "" if k == label else "  WRONG"
            slots.append((shown[i], cams[i],
                          f"id {image_id}{mark}\n{CLASS_NAMES[label]} → {CLASS_NAMES[k]} ({probs[i][k]:.0%})"))
        if row:
            slots += [(None, None, "")] * (per_class - len(row))
    images, heat, titles = zip(*slots)
    return overlay_grid(images, heat, titles, cols=max(per_class, 1),
                        title=f"Grad-CAM on layer {name} (rows: true class)")
