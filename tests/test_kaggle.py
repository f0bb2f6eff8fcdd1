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
from lungs_utils.competition import kaggle as K
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


# --------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------
from lungs_utils import COMPETITION  # noqa: E402
from lungs_utils.xrays.data import list_images  # noqa: E402
from lungs_utils.errors import DataWarning  # noqa: E402


@pytest.fixture
def fake_submit(monkeypatch):
    """Credentials present; authentication and the upload replaced, every call recorded."""
    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk.competitions.types.competition_api_service import ApiCreateSubmissionResponse

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    calls: list[dict] = []

    def fake_authenticate(self):
        calls.append({"authenticate": True})

    def fake_competition_submit(self, file_name, message, competition, quiet=False, sandbox=False):
        calls.append({"file_name": file_name, "message": message, "competition": competition,
                      "quiet": quiet, "rows": Path(file_name).read_text().count("\n")})
        response = ApiCreateSubmissionResponse()
        response.message = "Successfully submitted to ML Intensive"
        return response

    monkeypatch.setattr(KaggleApi, "authenticate", fake_authenticate)
    monkeypatch.setattr(KaggleApi, "competition_submit", fake_competition_submit)
    return calls


def _submission(path: Path, ids, labels=None) -> Path:
    ids = list(ids)
    labels = [i % 3 for i in range(len(ids))] if labels is None else list(labels)
    path.write_text("id,target_feature\n" + "".join(f"{i},{y}\n" for i, y in zip(ids, labels)))
    return path


@pytest.mark.parametrize("problem, match", [
    ("header", r"missing column\(s\) target_feature"),
    ("missing_id", r"has no row"),
    ("extra_id", r"is not a test image id"),
    ("label", r"line 2: label '7' is outside"),
    ("unsorted", r"sort the rows by id"),
    ("empty_message", r"needs a message"),
    ("absent", r"does not exist"),
])
def test_submit_rejects_a_bad_file_before_any_api_call(tiny_data: Path, tmp_path: Path, fake_submit,
                                                       problem: str, match: str) -> None:
    ids = sorted(list_images(tiny_data / "test_images"))
    path = tmp_path / "submission.csv"
    message = "first try"
    if problem == "header":
        path.write_text("id,label\n" + "".join(f"{i},0\n" for i in ids))
    elif problem == "missing_id":
        _submission(path, ids[:-1])
    elif problem == "extra_id":
        _submission(path, ids + [10**6])
    elif problem == "label":
        _submission(path, ids, [7] + [0] * (len(ids) - 1))
    elif problem == "unsorted":
        _submission(path, ids[::-1])
    elif problem == "empty_message":
        _submission(path, ids)
        message = "  "
    else:
        path = tmp_path / "nope.csv"
    with pytest.raises(LungsError, match=match) as exc:
        K.submit(path, message, test_dir=tiny_data)
    assert "\n" not in str(exc.value)
    assert fake_submit == []  # neither authentication nor the upload was attempted


def test_submit_uploads_a_valid_file(tiny_data: Path, tmp_path: Path, fake_submit) -> None:
    ids = sorted(list_images(tiny_data / "test_images"))
    path = _submission(tmp_path / "submission.csv", ids)
    line = K.submit(path, "  simple cnn, 30 epochs ", test_dir=tiny_data, quiet=True)
    assert fake_submit == [
        {"authenticate": True},
        {"file_name": str(path), "message": "simple cnn, 30 epochs", "competition": COMPETITION,
         "quiet": True, "rows": len(ids) + 1},
    ]
    assert "\n" not in line
    assert f"https://www.kaggle.com/competitions/{COMPETITION}/submissions" in line
    assert "Successfully submitted" in line and f"({len(ids)} rows)" in line


def test_submit_checks_against_discovered_data(tiny_data: Path, tmp_path: Path, fake_submit,
                                               monkeypatch) -> None:
    monkeypatch.setenv("LUNGS_DATA_DIR", str(tiny_data))
    ids = sorted(list_images(tiny_data / "test_images"))
    with pytest.raises(LungsError, match="has no row"):
        K.submit(_submission(tmp_path / "short.csv", ids[:2]), "msg")
    assert fake_submit == []
    K.submit(_submission(tmp_path / "full.csv", ids), "msg")
    assert fake_submit[-1]["competition"] == COMPETITION


def test_submit_without_local_data_checks_format_only(isolated_env: Path, tmp_path: Path, fake_submit) -> None:
    # Phantom demo data is there, but its ids say nothing about the real test set: not used.
    write_dataset(isolated_env / "data" / "phantom" / "data", n_train=6, n_test=3)
    with pytest.warns(DataWarning, match="format only"):
        K.submit(_submission(tmp_path / "s.csv", [5, 9, 11]), "msg")
    assert fake_submit[-1]["file_name"] == str(tmp_path / "s.csv")
    with pytest.raises(LungsError, match="duplicate"):  # format errors come before data discovery
        K.submit(_submission(tmp_path / "dup.csv", [5, 5]), "msg")
    assert len(fake_submit) == 2  # the bad file made no further call


def test_submit_explicit_test_dir_must_hold_test_images(tmp_path: Path, fake_submit) -> None:
    data = write_dataset(tmp_path / "data", n_test=0)
    with pytest.raises(LungsError, match="holds no img_<id>.png test images"):
        K.submit(_submission(tmp_path / "s.csv", [1, 2]), "msg", test_dir=data)
    with pytest.raises(LungsError, match="does not exist"):
        K.submit(_submission(tmp_path / "s.csv", [1, 2]), "msg", test_dir=tmp_path / "missing")
    assert fake_submit == []


def test_submit_without_credentials_is_one_line_and_never_imports_kaggle(tiny_data: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "kaggle", raising=False)
    path = _submission(tmp_path / "submission.csv", sorted(list_images(tiny_data / "test_images")))
    with pytest.raises(LungsError, match=r"no Kaggle credentials, needed to submit.*kaggle.json") as exc:
        K.submit(path, "msg", test_dir=tiny_data)
    assert "\n" not in str(exc.value)
    assert "kaggle" not in sys.modules


@pytest.mark.parametrize("failure, match", [
    (OSError("403 Client Error: Forbidden"), "accept the competition rules"),
    (ValueError("Could not find competition - please verify\n  Error: 404"), "still open"),
    (ConnectionError("Max retries exceeded"), "check the network connection"),
])
def test_submit_network_failure_is_one_line(tiny_data: Path, tmp_path: Path, fake_submit, monkeypatch,
                                            failure: Exception, match: str) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi

    def refused(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(KaggleApi, "competition_submit", refused)
    path = _submission(tmp_path / "submission.csv", sorted(list_images(tiny_data / "test_images")))
    with pytest.raises(LungsError, match=rf"Kaggle submission failed.*{match}") as exc:
        K.submit(path, "msg", test_dir=tiny_data)
    assert "\n" not in str(exc.value)


def test_submit_incomplete_upload_is_an_error(tiny_data: Path, tmp_path: Path, fake_submit, monkeypatch) -> None:
    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk.competitions.types.competition_api_service import ApiCreateSubmissionResponse

    def upload_failed(self, *args, **kwargs):
        response = ApiCreateSubmissionResponse()
        response.message = KaggleApi.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE
        return response

    monkeypatch.setattr(KaggleApi, "competition_submit", upload_failed)
    path = _submission(tmp_path / "submission.csv", sorted(list_images(tiny_data / "test_images")))
    with pytest.raises(LungsError, match="upload of submission.csv did not complete"):
        K.submit(path, "msg", test_dir=tiny_data)


def test_username_sources(isolated_env: Path, monkeypatch) -> None:
    assert K.username() is None
    (isolated_env / ".kaggle").mkdir()
    (isolated_env / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "from_json", "key": "k"}))
    assert K.username() == "from_json"
    monkeypatch.setenv("KAGGLE_USERNAME", "from_env")
    assert K.username() == "from_env"
