"""The Kaggle round trip through the official ``kaggle`` package.

``import kaggle`` authenticates (and may touch the network) at import time, so it is imported lazily,
only after we have checked that credentials exist; without them the user gets one line saying what to
create, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from . import COMPETITION
from .errors import LungsError
from .paths import download_dir, is_data_dir

RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
HOW_TO_AUTH = ("create an API token at https://www.kaggle.com/settings (section API) and save it as "
               "~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and KAGGLE_KEY, or "
               "KAGGLE_API_TOKEN")


def credentials_source() -> str | None:
    """Where Kaggle credentials would come from, or None when there are none (no network used)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    home = Path(os.path.expanduser("~"))
    config_dirs = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    config_dirs += [home / ".kaggle",
                    Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]
    for folder in config_dirs:
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


def _network_error(exc: Exception, action: str) -> LungsError:
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    hint = f"accept the competition rules at {RULES_URL}" if "403" in text else \
        "check the network connection and that you joined the competition"
    return LungsError(f"Kaggle {action} failed ({text}); {hint}")


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
    from .data import read_answers, TEST_IMAGES  # deferred: keeps this module light to import

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
            raise _network_error(exc, "download") from None
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
