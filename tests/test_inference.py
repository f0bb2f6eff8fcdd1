"""The one inference loop (lungs_utils.engine.inference.infer) and its three thin callers: validation in training,
class probabilities and lung-mask probabilities give the numbers a plain, hand-written loop gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lungs_utils import params as P
from lungs_utils.engine import predict
from lungs_utils.xrays import presets
from lungs_utils.engine.inference import IDENTITY, infer
from lungs_utils.stats.metrics import macro_f1
from lungs_utils.engine.predict import mask_probabilities
from lungs_utils.engine.tasks import SEGMENTATION
from lungs_utils.models import segmenter
from lungs_utils.engine.loop import evaluate

from conftest import cpu_settings
from test_predict import tiny_dataset, tiny_model

CPU = torch.device("cpu")


def plain_outputs(model: nn.Module, ds: torch.utils.data.Dataset, prepare, views=(lambda x: x,),
                  backs=(None,), transform=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: every item through the model one at a time, no loader, no autocast."""
    model.eval()
    outs, targets, ids = [], [], []
    with torch.no_grad():
        for i in range(len(ds)):
            x, y, item_id = ds[i]
            x, target = prepare(x[None], torch.tensor([y]))
            total = 0
            for view, back in zip(views, backs):
                out = model(view(x)).float()
                out = transform(out) if transform else out
                total = total + (back(out) if back else out)
            outs.append((total / len(views))[0].numpy())
            targets.append(target[0].numpy())
            ids.append(item_id)
    return np.stack(outs), np.stack(targets), np.array(ids)


def test_predict_proba_equals_a_plain_loop_with_and_without_tta() -> None:
    ds, model = tiny_dataset(n=11, size=32, masks=True), tiny_model(channels=2)
    prepare = lambda x, y: (presets.to_input(x, 24, masks="channel"), y)  # noqa: E731
    softmax = lambda z: torch.softmax(z, dim=1)  # noqa: E731
    for tta in (False, True):
        views = predict.TTA_VIEWS if tta else (predict.view_identity,)
        ref, _, ref_ids = plain_outputs(model, ds, prepare, views, (None,) * len(views), softmax)
        ids, probs = predict.predict_proba(model, ds, cpu_settings(image_size=24, batch_size=4, tta=tta, masks="channel"))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(probs, ref, atol=1e-6)


def test_evaluate_equals_a_plain_loop_and_agrees_with_predict_proba() -> None:
    ds, model = tiny_dataset(n=13, size=32), tiny_model()
    params = P.resolve({"image_size": 24, "batch_size": 4, "masks": "none", "precision": "fp32",
                        "channels_last": True, "num_workers": 0})
    loss, metrics = evaluate(model, ds, params, CPU)
    prepare = lambda x, y: (presets.to_input(x, 24, masks="none"), y)  # noqa: E731
    logits, labels, _ = plain_outputs(model, ds, prepare)
    ref_loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert metrics["macro_f1"] == pytest.approx(macro_f1(labels, logits.argmax(1)))
    _, probs = predict.predict_proba(model, ds, cpu_settings(image_size=24, batch_size=5, masks="none", channels_last=True))
    assert metrics["macro_f1"] == pytest.approx(macro_f1(labels, probs.argmax(1)))


def test_mask_probabilities_and_mask_validation_equal_a_plain_loop() -> None:
    ds, model = tiny_dataset(n=6, size=32, masks=True), segmenter("unet_small")
    prepare = lambda x, y: (presets.to_input(x[:, :1], 32), y)  # noqa: E731
    flip = lambda z: z.flip(-1)  # noqa: E731
    for tta in (False, True):
        views, backs = ((lambda x: x, flip), (None, flip)) if tta else ((lambda x: x,), (None,))
        ref, _, ref_ids = plain_outputs(model, ds, prepare, views, backs, torch.sigmoid)
        ids, probs = mask_probabilities(model, ds, cpu_settings(image_size=32, batch_size=4, tta=tta))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(probs.astype(np.float32), ref[:, 0], atol=1e-3)  # float16 output
    params = P.resolve({"image_size": 32, "batch_size": 4, "precision": "fp32", "num_workers": 0})
    _, metrics = evaluate(model, ds, params, CPU, task=SEGMENTATION)
    logits, target, _ = plain_outputs(model, ds, lambda x, y: SEGMENTATION.eval_inputs(x, y, params))
    pred, truth = logits > 0, target > 0.5
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert metrics["dice"] == pytest.approx(dice, abs=1e-6)


def test_infer_restores_each_modules_mode_and_yields_float_outputs_in_dataset_order() -> None:
    ds, model = tiny_dataset(n=7), tiny_model()
    model.train()
    model[0].eval()  # a deliberately frozen submodule stays frozen
    before = [m.training for m in model.modules()]
    batches = list(infer(model, ds, prepare=lambda x, y: (presets.to_input(x, 16), y), batch_size=3,
                         views=(IDENTITY,), autocast_dtype=torch.bfloat16))
    assert [m.training for m in model.modules()] == before
    assert [len(out) for out, _, _ in batches] == [3, 3, 1]
    assert all(out.dtype == torch.float32 for out, _, _ in batches)
    assert np.concatenate([ids.numpy() for _, _, ids in batches]).tolist() == [ds[i][2] for i in range(7)]
    # A sampler (a DDP rank's shard) restricts the items without padding.
    shard = list(infer(model, ds, prepare=lambda x, y: (presets.to_input(x, 16), y), sampler=range(1, 7, 2)))
    assert np.concatenate([ids.numpy() for _, _, ids in shard]).tolist() == [ds[i][2] for i in (1, 3, 5)]


def test_inference_has_one_home() -> None:
    """No module but lungs_utils.engine.inference switches a model to eval mode for inference or opens
    inference_mode (Grad-CAM needs gradients and stays apart; the model registry runs one forward pass to
    count FLOPs, below the engine)."""
    from pathlib import Path

    import lungs_utils

    package = Path(lungs_utils.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name in ("inference.py", "gradcam.py", "registry.py"):
            continue
        assert "inference_mode" not in text, path.name
        assert "model.eval()" not in text, path.name
