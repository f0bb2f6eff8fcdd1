"""Classification metrics over a whole set, from one confusion matrix.

A confusion matrix is additive across batches and across processes (DDP: one ``all_reduce``), so the
training loop accumulates it on the device with no per-batch ``.item()`` or sklearn call, and every
metric is computed once per epoch from it. Macro-F1 here is the competition's: the mean over the three
classes of per-class F1 on the whole set — not an average of per-batch F1 values, which is biased.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import CLASS_NAMES, NUM_CLASSES

if TYPE_CHECKING:  # torch only where the meters live on a device: scoring a CSV needs none of it
    import torch


class ConfusionMatrix:
    """Accumulates a ``(C, C)`` count matrix (rows = true class, columns = predicted) on a device."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str = "cpu") -> None:
        import torch

        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, predicted: torch.Tensor) -> None:
        """Add a batch of hard labels (rows with target < 0, i.e. unlabelled, are skipped)."""
        # index_add_ with 0/1 weights instead of mask-select + bincount: neither sizes an output from
        # the data, so on a GPU nothing waits for the device (no sync per batch).
        keep = target >= 0
        index = target.clamp(min=0) * self.num_classes + predicted
        self.counts.index_add_(0, index, keep.to(self.counts.dtype))

    def matrix(self) -> np.ndarray:
        """The counts as a NumPy ``(C, C)`` array (one device-to-host copy)."""
        return self.counts.view(self.num_classes, self.num_classes).cpu().numpy()


def from_confusion(cm: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision / recall / F1 / support from a confusion matrix.

    Zero-division conventions match scikit-learn's ``zero_division=0``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                   "support": int(support[c])}
            for c, name in enumerate(CLASS_NAMES[: len(cm)])
        },
        "confusion_matrix": cm.tolist(),
    }


def classification_metrics(y_true: Any, y_pred: Any, num_classes: int = NUM_CLASSES) -> dict[str, Any]:
    """Metrics for hard labels over a whole set (see :func:`from_confusion`); arrays, lists or CPU tensors.
    Rows with a negative true label (unlabelled) are skipped, as in :class:`ConfusionMatrix`."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    keep = t >= 0
    cm = np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes * num_classes)
    return from_confusion(cm.reshape(num_classes, num_classes))


def macro_f1(y_true: Any, y_pred: Any) -> float:
    """Macro-F1 of hard labels, the competition metric: the mean of the three classes' F1, a class that
    is never predicted (or absent) counting 0 — the one definition, used by training, predictions,
    ensembles, the leaderboard and ``lungs score``."""
    return classification_metrics(y_true, y_pred)["macro_f1"]


def flat(metrics: dict[str, Any], prefix: str = "val_") -> dict[str, float]:
    """One-level dict for history rows and leaderboards: accuracy, macro_f1 and per-class F1."""
    row = {f"{prefix}accuracy": metrics["accuracy"], f"{prefix}macro_f1": metrics["macro_f1"]}
    for name, values in metrics["per_class"].items():
        row[f"{prefix}f1_{name.split()[0].lower().replace('-19', '')}"] = values["f1"]
    return row


# --------------------------------------------------------------------------------------------------
# Segmentation (lung masks)
# --------------------------------------------------------------------------------------------------
def dice_iou(predicted: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Dice and IoU of two binary masks (any shape; nonzero = lung), pooled over every pixel given.

    Two empty masks agree perfectly (1.0), the usual convention.
    """
    import torch

    p = torch.as_tensor(np.array(predicted) if not isinstance(predicted, torch.Tensor) else predicted) != 0
    t = torch.as_tensor(np.array(target) if not isinstance(target, torch.Tensor) else target) != 0
    inter, total = int((p & t).sum()), int(p.sum() + t.sum())
    union = total - inter
    return {"dice": 2 * inter / total if total else 1.0, "iou": inter / union if union else 1.0}


class MaskOverlap:
    """Accumulates pixel overlap of binary masks over a whole set, on a device.

    ``counts`` = (intersection, predicted pixels, true pixels, sum of per-image Dice, images): all
    additive across batches and DDP ranks, like :class:`ConfusionMatrix`. :meth:`metrics` gives the
    pooled Dice and IoU of the whole set and the mean per-image Dice.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import torch

        self.counts = torch.zeros(5, dtype=torch.float64, device=device)

    def update(self, target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """Add a batch of ``(N, 1, H, W)`` binary masks (bool or {0, 1}); returns the batch's per-image
        Dice ``(N,)`` (two empty masks: 1.0)."""
        import torch

        t, p = target.flatten(1).bool(), predicted.flatten(1).bool()
        inter = (t & p).sum(dim=1).double()
        n_p, n_t = p.sum(dim=1).double(), t.sum(dim=1).double()
        total = n_p + n_t
        per_image = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
        self.counts += torch.stack([inter.sum(), n_p.sum(), n_t.sum(), per_image.sum(),
                                    torch.tensor(float(len(t)), dtype=torch.float64, device=t.device)])
        return per_image

    def metrics(self) -> dict[str, float]:
        inter, n_p, n_t, dice_sum, n = self.counts.tolist()
        total, union = n_p + n_t, n_p + n_t - inter
        return {"dice": 2 * inter / total if total else 1.0, "iou": inter / union if union else 1.0,
                "mean_dice": dice_sum / n if n else 0.0, "images": int(n)}
