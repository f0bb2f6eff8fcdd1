"""The one inference loop: a model over a dataset, batch by batch, without gradients.

Validation during training (:func:`lungs_utils.engine.loop.evaluate`), class probabilities
(:func:`lungs_utils.engine.predict.predict_proba`) and lung-mask probabilities
(:func:`lungs_utils.engine.predict.mask_probabilities`) are thin callers of :func:`infer`: eval mode (each
module's own mode restored afterwards), ``inference_mode``, autocast, channels_last and batching are
decided here once. What differs between them is an argument: how a uint8 batch becomes the network input
(``prepare``), the test-time views and how a view's output is mapped back (``views``), and the output
transform (softmax, sigmoid, or none for losses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..progress import bar

#: A test-time view of a prepared batch, and the map that brings the view's output back to the original
#: geometry (``None``: the output does not depend on it, e.g. class scores).
View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor] | None]
#: Prepare a batch on the device: ``(uint8 images, labels) → (network input, target)``.
Prepare = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]



def view_identity(x: torch.Tensor) -> torch.Tensor:
    """The batch as is."""
    return x


IDENTITY: View = (view_identity, None)


def infer(model: nn.Module, dataset: torch.utils.data.Dataset, *, prepare: Prepare,
          device: torch.device | str = "cpu", batch_size: int = 64, views: Sequence[View] = (IDENTITY,),
          transform: Callable[[torch.Tensor], torch.Tensor] | None = None, channels_last: bool = False,
          autocast_dtype: torch.dtype | None = None, sampler: Sequence[int] | None = None, num_workers: int = 0,
          progress: bool = False, desc: str = "predict"
          ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(output, target, ids)`` for each batch of ``dataset`` (items ``(uint8 image, label, id)``).

    ``output`` is float32 on ``device``: ``transform`` (if any) of the model's output, averaged over
    ``views`` after each view's output is mapped back. The model must already be on ``device``. A
    ``sampler`` (indices) restricts and orders the items, e.g. one DDP rank's shard.
    """
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    # Per-module modes, so a deliberately frozen submodule (e.g. eval-mode BatchNorm) stays as it was.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            for x, y, ids in bar(loader, desc=desc, disable=not progress, leave=False):
                # uint8 crosses the bus (4x smaller than float), then becomes the network input there.
                x, target = prepare(x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                total = None
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    for view, back in views:
                        out = model(view(x)).float()
                        out = transform(out) if transform is not None else out
                        out = back(out) if back is not None else out
                        total = out if total is None else total + out
                yield total / len(views), target, torch.as_tensor(ids)
    finally:
        for module, mode in modes:
            module.training = mode
