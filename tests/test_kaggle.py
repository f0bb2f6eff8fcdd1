"""Kaggle download without network: credentials checks and the unpack/verify path.

Only the network call (``KaggleApi.competition_download_files``) and authentication are replaced.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import snapshot, write_dataset
from lungs_utils import kaggle as K
from lungs_utils.errors import LungsError


def test_no_credentials_is_one_line_and_never_imports_kaggle(isolated_env: Path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "kaggle", raising=False)
    with pytest.raises(LungsError, match=r"no Kaggle credentials.*kaggle.json.*KAGGLE_USERNAME") as exc:
        K.download()
    assert "\n" not in str(exc.value)
    assert "kaggle" not in sys.modules  # importing it would try to authenticate
    assert snapshot(isolated_env / "data") == {}


@pytest.mark.parametrize("how", ["env", "json", "token_env", "token_file"])
def test_credential_sources(isolated_env: Path, monkeypatch, how: str) -> None:
    assert K.credentials_source() is None
    if how == "env":
        monkeypatch.setenv("KAGGLE_USERNAME", "u")
        monkeypatch.setenv("KAGGLE_KEY", "k")
    elif how == "json":
        (isolated_env / ".kaggle").mkdir()
        (isolated_env / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    elif how == "token_env":
        monkeypatch.setenv("KAGGLE_API_TOKEN", "t")
    else:
        (isolated_env / ".kaggle").mkdir()
        (isolated_env / ".kaggle" / "access_token").write_text("t")
    assert K.credentials_source() is not None


@pytest.fixture
def fake_network(monkeypatch, tmp_path: Path):
    """Replace the network boundary: authenticate succeeds, download writes a competition-like zip."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    src = write_dataset(tmp_path / "zipsrc" / "data")
    archive = shutil.make_archive(str(tmp_path / "archive"), "zip", tmp_path / "zipsrc")
    calls: list[dict] = []

    def fake_download(self, competition, path=None, force=False, quiet=True, unzip=False):
        calls.append({"competition": competition, "path": path})
        shutil.copy(archive, Path(path) / f"{competition}.zip")

    monkeypatch.setattr(KaggleApi, "authenticate", lambda self: None)
    monkeypatch.setattr(KaggleApi, "competition_download_files", fake_download)
    return calls, src


def test_download_unpacks_and_verifies(isolated_env: Path, fake_network) -> None:
    from lungs_utils.paths import find_data_dir

    calls, src = fake_network
    folder = K.download()
    assert folder == isolated_env / "data" / "competition" / "data"
    assert calls == [{"competition": "ml-intensive-yandex-academy-spring-2024", "path": calls[0]["path"]}]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in src.iterdir())
    assert find_data_dir() == folder  # discovery finds the download destination
    # Nothing temporary is left, and a second call does not download again.
    assert [p.name for p in folder.parent.iterdir()] == ["data"]
    K.download()
    assert len(calls) == 1


def test_download_of_a_broken_archive_leaves_nothing(isolated_env: Path, fake_network, monkeypatch) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi

    def bad_zip(self, competition, path=None, **_kw):
        (Path(path) / f"{competition}.zip").write_bytes(b"PK\x03\x04 truncated")

    monkeypatch.setattr(KaggleApi, "competition_download_files", bad_zip)
    with pytest.raises(LungsError, match="not a valid zip.*--force"):
        K.download()
    assert not (isolated_env / "data" / "competition" / "data").exists()
    assert list((isolated_env / "data" / "competition").iterdir()) == []


def test_network_failure_is_one_line(isolated_env: Path, fake_network, monkeypatch) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi

    def refused(self, competition, path=None, **_kw):
        raise OSError("403 Client Error: Forbidden for url")

    monkeypatch.setattr(KaggleApi, "competition_download_files", refused)
    with pytest.raises(LungsError, match=r"Kaggle download failed.*accept the competition rules"):
        K.download()


def test_rejected_credentials(isolated_env: Path, monkeypatch) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "wrong")
    monkeypatch.setattr(KaggleApi, "authenticate", lambda self: sys.exit(1))
    with pytest.raises(LungsError, match="Kaggle rejected the credentials"):
        K.download()
