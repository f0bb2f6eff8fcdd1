"""Params: one schema, YAML files, -p overrides; every mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungs_utils import params as P
from lungs_utils.errors import LungsError


def test_defaults_cover_the_contract_keys() -> None:
    d = P.defaults()
    for key in ("notebook", "run_name", "data_dir", "model", "image_size", "epochs", "batch_size",
                "seed", "device"):
        assert key in d
    assert d["data_dir"] is None and d["device"] == "auto"


def test_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("notebook: 10_simple_cnn.ipynb\nrun_name: a\nepochs: 4\nlr: 1\n")
    p = P.load(f, ["epochs=7", "data_dir=null", "run_name=b", "class_weights=[1, 2, 3]"])
    assert p["epochs"] == 7 and p["run_name"] == "b" and p["data_dir"] is None
    assert p["lr"] == 1.0 and isinstance(p["lr"], float)
    assert p["class_weights"] == [1, 2, 3]


@pytest.mark.parametrize("text, pattern", [
    ("epochz: 3\n", r"unknown key 'epochz' \(did you mean 'epochs'\?\); valid keys: .*batch_size"),
    ("epochs: ten\n", r"'epochs' must be integer, got 'ten'"),
    ("epochs: 2.5\n", r"'epochs' must be integer"),
    ("channels_last: 1\n", r"'channels_last' must be true/false"),
    ("device: tpu\n", r"'device' must be one of auto, cpu, cuda"),
    ("image_size: 4\n", r"'image_size' must be >= 16"),
    ("model: null\n", r"'model' must be text, got null"),
    ("class_weights: [1, 2]\n", r"'class_weights' list needs 3"),
    ("class_weights: weird\n", r"'class_weights' must be none, balanced"),
    ("- a\n- b\n", r"expected 'key: value' lines"),
    ("epochs: [1\n", r"is not valid YAML"),
])
def test_bad_params_files(tmp_path: Path, text: str, pattern: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(LungsError, match=pattern) as exc:
        P.load(f)
    assert "\n" not in str(exc.value) and "bad.yaml" in str(exc.value)


def test_binary_file_is_not_yaml(tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    f.write_bytes(bytes(range(256)))
    with pytest.raises(LungsError, match="model.pt"):
        P.load(f)


def test_missing_file() -> None:
    with pytest.raises(LungsError, match="params file not found"):
        P.load("does/not/exist.yaml")


@pytest.mark.parametrize("item, pattern", [
    ("epochs", r"-p 'epochs': expected key=value"),
    ("=3", r"expected key=value"),
    ("epochs=ten", r"-p epochs: 'epochs' must be integer"),
    ("bogus=1", r"unknown key 'bogus'"),
    ("epochs=[1", r"not a YAML scalar"),
])
def test_bad_overrides(item: str, pattern: str) -> None:
    with pytest.raises(LungsError, match=pattern):
        P.parse_overrides([item])


def test_from_namespace_ignores_unrelated_globals() -> None:
    ns = {"epochs": 2, "model": "resnet18", "plt": object(), "_": 1}
    p = P.from_namespace(ns, notebook="11_resnet.ipynb")
    assert p["epochs"] == 2 and p["model"] == "resnet18" and p["notebook"] == "11_resnet.ipynb"


def test_dump_round_trip(tmp_path: Path) -> None:
    p = P.load(overrides={"epochs": 5, "class_weights": "balanced"})
    P.dump(p, tmp_path / "params.yaml")
    assert P.load(tmp_path / "params.yaml") == p


def test_written_files_get_normal_permissions(tmp_path: Path) -> None:
    import os

    P.dump(P.defaults(), tmp_path / "params.yaml")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "params.yaml").stat().st_mode & 0o777 == 0o666 & ~umask
