"""The Kaggle round trip through the official ``kaggle`` package.

``import kaggle`` authenticates (and may touch the network) at import time, so it is imported lazily,
only after we have checked that credentials exist; without them the user gets one line saying what to
create, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from .. import COMPETITION
from ..errors import DataWarning, LungsError
from ..paths import download_dir, is_data_dir

RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
SUBMISSIONS_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/submissions"
HOW_TO_AUTH = ("create an API token at https://www.kaggle.com/settings (section API) and save it as "
               "~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY, or "
               "KAGGLE_API_TOKEN")


def _config_dirs() -> list[Path]:
    """Where the ``kaggle`` package looks for kaggle.json / access_token, in its order."""
    home = Path(os.path.expanduser("~"))
    dirs = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    return dirs + [home / ".kaggle", Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]


def credentials_source() -> str | None:
    """Where Kaggle credentials would come from, or None when there are none (no network used)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for folder in _config_dirs():
        for name in ("kaggle.json", "access_token", "access_token.txt"):
            if (folder / name).is_file():
                return str(folder / name)
    return None


def api(action: str = "use the Kaggle API") -> Any:
    """An authenticated ``KaggleApi``; a one-line ``LungsError`` when credentials are missing or bad."""
    if credentials_source() is None:
        raise LungsError(f"no Kaggle credentials, needed to {action}: {HOW_TO_AUTH}")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise LungsError("the 'kaggle' package is not installed: run `make install` "
                         "(or pip install kaggle)") from None
    client = KaggleApi()
    try:
        client.authenticate()
    except SystemExit:
        # The package prints its own help and calls exit(1) when authentication fails.
        raise LungsError(f"Kaggle rejected the credentials from {credentials_source()}: {HOW_TO_AUTH}") from None
    return client


def network_error(exc: Exception, action: str) -> LungsError:
    """A failed Kaggle API call as one line with what to do (rules not accepted, wrong name, no network)."""
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    if "403" in text:
        hint = f"accept the competition rules at {RULES_URL}"
    elif "404" in text or "Could not find" in text:
        hint = f"check the name ({COMPETITION}, your user name) and that the competition is still open"
    else:
        hint = "check the network connection and that you joined the competition"
    return LungsError(f"Kaggle {action} failed ({text}); {hint}")


def username() -> str | None:
    """The Kaggle user name from ``KAGGLE_USERNAME`` or kaggle.json (no network, no ``kaggle`` import)."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"].strip() or None
    for folder in _config_dirs():
        path = folder / "kaggle.json"
        try:
            name = json.loads(path.read_text(encoding="utf-8")).get("username")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: the next place may still have it
        if isinstance(name, str) and name.strip():
            return name.strip()
    return None


def _find_data_dir(root: Path) -> Path | None:
    for answers in sorted(root.rglob("train_answers.csv")):
        if is_data_dir(answers.parent):
            return answers.parent
    return None


def download(dest: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Download and unpack the competition data; returns the data folder (the one with train_images/).

    The archive is unpacked in a temporary folder and moved into place only after its layout checks
    out, so an interrupted download never leaves a half-unpacked dataset where discovery would find it.
    """
    from ..xrays.layout import TEST_IMAGES, read_answers  # deferred: keeps this module light to import

    dest = Path(dest).expanduser().resolve() if dest is not None else download_dir()
    final = dest / "data"
    if is_data_dir(final) and not force:
        return final
    client = api("download the competition data")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        tmp_path = Path(tmp)
        try:
            client.competition_download_files(COMPETITION, path=str(tmp_path), quiet=False)
        except Exception as exc:  # the API raises many types (HTTPError, ApiException, OSError, ...)
            raise network_error(exc, "download") from None
        archives = sorted(tmp_path.glob("*.zip"))
        if not archives:
            raise LungsError(f"Kaggle download produced no zip archive in {tmp_path}; try again with --force")
        unpacked = tmp_path / "unpacked"
        try:
            with zipfile.ZipFile(archives[0]) as zf:
                zf.extractall(unpacked)
        except (zipfile.BadZipFile, OSError) as exc:
            raise LungsError(f"{archives[0].name} is not a valid zip ({exc}); run `lungs download --force`") from None
        found = _find_data_dir(unpacked)
        if found is None or not (found / TEST_IMAGES).is_dir():
            raise LungsError(f"the downloaded archive lacks train_images/, test_images/ and train_answers.csv; "
                             f"check the competition name ({COMPETITION}) and run `lungs download --force`")
        read_answers(found)
        if final.exists():
            shutil.rmtree(final)
        os.replace(found, final)
    return final


def _submission_test_ids(test_dir: str | os.PathLike[str] | None) -> list[int] | None:
    """Ids of the local test images, or None (with a warning) when no real dataset is found.

    An explicit ``test_dir`` must hold test images. Discovery never settles for the phantom demo
    data: its ids say nothing about the competition's test set.
    """
    from ..xrays.layout import TEST_IMAGES, list_images
    from ..paths import find_data_dir

    if test_dir is not None:
        folder = find_data_dir(test_dir)
    else:
        try:
            folder = find_data_dir(allow_phantom=False)
        except LungsError:
            warnings.warn("no local competition data found, so the submission was checked for format "
                          "only (not against the test image ids); run `lungs download` or pass the "
                          "data folder for the full check", DataWarning, stacklevel=3)
            return None
    ids = list(list_images(folder / TEST_IMAGES))
    if not ids:
        raise LungsError(f"{folder / TEST_IMAGES} holds no img_<id>.png test images, so the submission "
                         "cannot be checked; point the data folder at the full competition data")
    return ids


def submit(file: str | os.PathLike[str], message: str, *, test_dir: str | os.PathLike[str] | None = None,
           quiet: bool = False) -> str:
    """Validate a submission CSV against the local test set, then upload it to the competition.

    Everything local (message, file format, ids against ``test_dir`` or the discovered data) is
    checked before credentials or the network are touched, so a bad file never costs one of the
    day's submissions. Returns one line saying what was sent and where to see the score.
    """
    from ..xrays.submission import validate_submission  # deferred: keeps this module light to import

    if not message or not message.strip():
        raise LungsError("the submission needs a message (-m \"what changed\"); Kaggle shows it next to the score")
    path = Path(file).expanduser()
    table = validate_submission(path)  # format first: a broken file is reported before data discovery
    test_ids = _submission_test_ids(test_dir)
    if test_ids is not None:
        table = validate_submission(path, test_ids)
    client = api("submit to the competition")
    try:
        response = client.competition_submit(str(path), message.strip(), COMPETITION, quiet=quiet)
    except Exception as exc:  # the API raises many types (HTTPError, ApiException, ValueError, ...)
        raise network_error(exc, "submission") from None
    said = " ".join(str(getattr(response, "message", "") or "").split())
    # On a failed upload the package prints the cause and returns this message instead of raising.
    if said == getattr(client, "COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE", None):
        raise LungsError(f"Kaggle submission failed (the upload of {path.name} did not complete); "
                         "check the network connection and try again")
    reply = f" ({said})" if said else ""
    return (f"submitted {path.name} ({len(table)} rows) to {COMPETITION}{reply}; "
            f"the score appears at {SUBMISSIONS_URL}")
