"""Inference, TTA views, prediction tables and the submission validator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lungs_utils.engine import predict as P
from lungs_utils.xrays import submission as T
from lungs_utils.xrays.data import XrayDataset
from lungs_utils.errors import LungsError

from conftest import cpu_settings


def tiny_model(channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class FlipInvariant(nn.Module):
    """Pools over the whole image first, so a left-right flip cannot change its output."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1))


def tiny_dataset(n: int = 10, size: int = 32, masks: bool = False, seed: int = 0) -> XrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    m = (rng.random((n, size, size)) > 0.5).astype(np.uint8) * 255 if masks else None
    ids = np.arange(n) * 7 + 3
    return XrayDataset(images, ids, labels=np.arange(n) % 3, masks=m, indices=np.arange(n)[::-1].copy())


# ------------------------------------------------------------------------------------------- predict_proba
def test_predict_proba_ids_in_order_and_rows_sum_to_one() -> None:
    ds = tiny_dataset()
    ids, probs = P.predict_proba(tiny_model(), ds, cpu_settings(image_size=32, batch_size=4))
    assert ids.dtype == np.int64 and probs.dtype == np.float32
    np.testing.assert_array_equal(ids, ds.ids)
    assert probs.shape == (10, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_predict_proba_resizes_to_image_size_and_handles_masks() -> None:
    ds = tiny_dataset(masks=True)
    ids, probs = P.predict_proba(tiny_model(channels=2), ds, cpu_settings(image_size=24, tta=True))
    assert probs.shape == (10, 3) and np.isfinite(probs).all()


def test_batch_size_does_not_change_results() -> None:
    model, ds = tiny_model(), tiny_dataset()
    _, a = P.predict_proba(model, ds, cpu_settings(image_size=32, batch_size=3))
    _, b = P.predict_proba(model, ds, cpu_settings(image_size=32, batch_size=10))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tta_is_different_but_close() -> None:
    model, ds = tiny_model(), tiny_dataset()
    ids0, plain = P.predict_proba(model, ds, cpu_settings(image_size=32))
    ids1, tta = P.predict_proba(model, ds, cpu_settings(image_size=32, tta=True))
    np.testing.assert_array_equal(ids0, ids1)
    assert tta.shape == plain.shape
    assert not np.allclose(tta, plain, atol=1e-7)
    np.testing.assert_allclose(tta, plain, atol=0.1)
    np.testing.assert_allclose(tta.sum(axis=1), 1.0, atol=1e-5)


def test_mode_is_restored() -> None:
    model, ds = tiny_model(), tiny_dataset(n=3)
    model.train()
    model[0].eval()  # a deliberately frozen submodule keeps its own mode
    P.predict_proba(model, ds, cpu_settings(image_size=32))
    assert model.training and not model[0].training and model[2].training
    model.eval()
    P.predict_proba(model, ds, cpu_settings(image_size=32))
    assert not model.training


def test_channels_last_and_bf16_autocast_run() -> None:
    model, ds = tiny_model(), tiny_dataset(n=4)
    _, ref = P.predict_proba(model, ds, cpu_settings(image_size=32))
    _, cl = P.predict_proba(model.to(memory_format=torch.channels_last), ds, cpu_settings(image_size=32, channels_last=True, dtype=torch.bfloat16), progress=True)
    assert cl.dtype == np.float32
    np.testing.assert_allclose(cl, ref, atol=0.05)


def test_empty_dataset() -> None:
    ids, probs = P.predict_proba(tiny_model(), tiny_dataset(n=0), cpu_settings(image_size=32))
    assert ids.shape == (0,) and probs.shape == (0, 3)


# ----------------------------------------------------------------------------------------------- TTA views
def test_hflip_twice_is_identity_and_views_keep_shape() -> None:
    x = torch.randn(5, 2, 32, 32)
    assert torch.equal(P.view_hflip(P.view_hflip(x)), x)
    assert torch.equal(P.view_hflip(x), x.flip(-1))
    for view in P.TTA_VIEWS:
        assert view(x.clone()).shape == x.shape


def test_zoom_views_keep_mask_binary_and_are_small_changes() -> None:
    x = torch.randn(2, 2, 40, 40)
    x[:, 1] = (torch.rand(2, 40, 40) > 0.5).float()
    for view in (P.view_zoom_in, P.view_zoom_out):
        out = view(x.clone())
        assert set(out[:, 1].unique().tolist()) <= {0.0, 1.0}
    smooth = torch.linspace(0, 1, 64).expand(1, 1, 64, 64).contiguous()
    for view in (P.view_zoom_in, P.view_zoom_out):
        delta = (view(smooth) - smooth).abs().max()
        assert 0 < delta < 0.1


def test_flip_invariant_model_gives_identical_flip_views() -> None:
    model, x = FlipInvariant().eval(), torch.randn(6, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(P.view_hflip(x)), model(x))


class LeftSided(nn.Module):
    """Looks only at the left half of the image: a mirrored view changes its answer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3)).unsqueeze(1))


def test_tta_leaves_out_the_mirrored_view_for_a_model_trained_without_flips() -> None:
    ds = tiny_dataset()
    model = LeftSided()
    kw = dict(image_size=32, tta=True)
    _, with_flip = P.predict_proba(model, ds, cpu_settings(**kw))
    _, without = P.predict_proba(model, ds, cpu_settings(mirror=False, **kw))
    with torch.inference_mode():  # the three unmirrored views, averaged by hand
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        from lungs_utils.xrays.presets import to_input
        x = to_input(x, 32)
        views = (P.view_identity, P.view_zoom_in, P.view_zoom_out)
        expected = sum(torch.softmax(model(v(x)), dim=1) for v in views) / 3
    np.testing.assert_allclose(without, expected.numpy(), atol=1e-6)
    assert not np.allclose(with_flip, without)


# ----------------------------------------------------------------------------------------------- frames
def test_frames_have_contract_columns_sorted_by_id() -> None:
    ids = np.array([5, 1, 3])
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.2, 0.5, 0.3]])
    val = T.val_frame(ids, [2, 0, 0], probs)
    assert list(val.columns) == ["id", "true", "predicted", "p0", "p1", "p2"]
    assert val["id"].tolist() == [1, 3, 5] and val["predicted"].tolist() == [0, 1, 2]
    test = T.test_frame(ids, probs)
    assert list(test.columns) == ["id", "p0", "p1", "p2"] and test["id"].tolist() == [1, 3, 5]
    sub = T.submission_frame(ids, probs)
    assert list(sub.columns) == ["id", "target_feature"]
    assert sub["target_feature"].tolist() == [0, 1, 2] and sub.dtypes.tolist() == [np.int64, np.int64]
    assert T.submission_frame(ids, np.array([2, 0, 1]))["target_feature"].tolist() == [0, 1, 2]


def test_write_predictions_writes_exactly_the_contract(tmp_path: Path) -> None:
    ids = np.array([9, 2, 4])
    probs = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.2, 0.5, 0.3]], dtype=np.float32)
    val = T.val_frame(ids, [2, 0, 1], probs).assign(extra=1)
    written = T.write_predictions(tmp_path / "run", val=val, test=T.test_frame(ids + 100, probs))
    assert set(written) == {"val_predictions.csv", "test_predictions.csv", "submission.csv"}
    run = tmp_path / "run"
    assert (run / "val_predictions.csv").read_text().splitlines()[0] == "id,true,predicted,p0,p1,p2"
    assert (run / "test_predictions.csv").read_text().splitlines()[0] == "id,p0,p1,p2"
    sub = T.validate_submission(run / "submission.csv", test_ids=ids + 100)
    assert sub["id"].tolist() == [102, 104, 109] and sub["target_feature"].tolist() == [0, 1, 2]
    back = pd.read_csv(run / "val_predictions.csv")
    np.testing.assert_allclose(back[["p0", "p1", "p2"]].to_numpy(), probs[[1, 2, 0]], rtol=1e-6)
    assert not list(run.glob(".*.tmp"))


def test_write_predictions_val_only(tmp_path: Path) -> None:
    T.write_predictions(tmp_path, val=T.val_frame([1], [0], np.array([[1.0, 0, 0]])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val_predictions.csv"]


# ----------------------------------------------------------------------------------------------- validator
GOOD = "id,target_feature\n1,0\n2,1\n5,2\n"


def write(tmp_path: Path, text: str, name: str = "submission.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_validator_accepts_a_good_submission(tmp_path: Path) -> None:
    sub = T.validate_submission(write(tmp_path, GOOD), test_ids=[5, 2, 1])
    assert sub["id"].tolist() == [1, 2, 5] and sub["target_feature"].tolist() == [0, 1, 2]
    assert sub.dtypes.tolist() == [np.int64, np.int64]
    # a trailing blank line is harmless
    T.validate_submission(write(tmp_path, GOOD + "\n"), test_ids=[1, 2, 5])
    frame = pd.DataFrame({"id": [1, 2, 5], "target_feature": [0, 1, 2]})
    assert T.validate_submission(frame, test_ids=[1, 2, 5]).equals(sub)


@pytest.mark.parametrize("text, match", [
    ("id,label\n1,0\n", r"missing column\(s\) target_feature"),
    ("id\n1\n", r"missing column\(s\) target_feature"),
    ("id,target_feature,extra\n1,0,x\n", r"unexpected column\(s\) extra.*exactly 'id,target_feature'"),
    ("target_feature,id\n0,1\n", r"wrong order"),
    ("id,target_feature\n1,0\nabc,1\n", r"line 3: id 'abc' is not a non-negative integer"),
    ("id,target_feature\n1,0\n2.5,1\n", r"line 3: id '2.5' is not a non-negative integer"),
    ("id,target_feature\n1.0,0\n", r"line 2: id '1.0' is not a non-negative integer"),
    ("id,target_feature\n1,0\n,1\n", r"line 3: id is empty"),
    ("id,target_feature\n1,0\n2,1\n1,2\n", r"line 4: id 1 is a duplicate of line 2"),
    ("id,target_feature\n2,0\n1,1\n", r"line 3: id 1 comes after id 2; sort the rows by id"),
    ("id,target_feature\n1,3\n", r"line 2: label '3' is outside \{0, 1, 2\}"),
    ("id,target_feature\n1,0\n2,covid\n", r"line 3: label 'covid' is not 0, 1 or 2"),
    ("id,target_feature\n1,0\n2,\n", r"line 3: label is empty"),
    ("id,target_feature\n1,0\n2,NaN\n", r"line 3: label is empty"),
    ("id,target_feature\n1,0\n2,1.0\n", r"line 3: label '1.0' is not 0, 1 or 2"),
    ("id,target_feature\n1,0\n\n2,1\n", r"line 3: id is empty"),
    ("", r"is empty; it needs a header 'id,target_feature' and one row per test image"),
    ("id,target_feature\n", r"has a header but no rows"),
    ('id,target_feature\n1,0\n"2,1\n', r"is not a readable CSV"),
])
def test_validator_rejects_malformed_files(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(LungsError, match=match) as exc:
        T.validate_submission(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_validator_reports_missing_and_extra_test_ids(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    missing = r"test id 3 \(and 1 more\) has no row.*one row per test image \(5\)"
    with pytest.raises(LungsError, match=missing):
        T.validate_submission(path, test_ids=[1, 2, 3, 4, 5])
    extra = r"line 3: id 2 \(and 1 more unexpected id\(s\)\) is not a test image"
    with pytest.raises(LungsError, match=extra):
        T.validate_submission(path, test_ids=[1])


def test_validator_missing_file_folder_and_binary(tmp_path: Path) -> None:
    with pytest.raises(LungsError, match="does not exist"):
        T.validate_submission(tmp_path / "nope.csv")
    with pytest.raises(LungsError, match="is a folder"):
        T.validate_submission(tmp_path)
    binary = tmp_path / "sub.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00" * 20)
    with pytest.raises(LungsError):
        T.validate_submission(binary)


def test_validator_on_frames_names_rows() -> None:
    with pytest.raises(LungsError, match=r"submission frame: row 1: label is empty"):
        T.validate_submission(pd.DataFrame({"id": [1, 2], "target_feature": pd.array([0, None], "Int64")}))
    # a float column would be written as "1.0", which Kaggle does not take as an integer id
    with pytest.raises(LungsError, match=r"row 0: id '1.0' is not"):
        T.validate_submission(pd.DataFrame({"id": [1.0, 2.0], "target_feature": [0, 1]}))


def test_score_submission_against_answers(tmp_path: Path) -> None:
    from lungs_utils.stats.scoring import score_submission

    answers = tmp_path / "answers.csv"
    pd.DataFrame({"id": [1, 2, 3, 4], "target_feature": [0, 1, 2, 2]}).to_csv(answers, index=False)
    sub = pd.DataFrame({"id": [1, 2, 3, 4], "target_feature": [0, 1, 2, 0]})
    got = score_submission(sub, answers)
    assert got["accuracy"] == pytest.approx(0.75)
    with pytest.raises(LungsError, match="test id 4 has no row"):
        score_submission(sub.iloc[:3], answers)
