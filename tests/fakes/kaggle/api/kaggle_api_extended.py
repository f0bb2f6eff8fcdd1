"""The fake ``KaggleApi``: the methods lungs_utils calls, with the real signatures and reply shapes."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from kaggle import server


class KaggleApi:
    COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE = "Could not submit to competition"
    KERNEL_METADATA_FILE = server.METADATA_FILE

    def __init__(self) -> None:
        self.authenticated_user: str | None = None

    def authenticate(self) -> None:
        """Like the real client: without credentials it prints what to do and exits with status 1."""
        name = server.user()
        if name is None:
            print("Could not find kaggle.json. Make sure it's located in ~/.kaggle. Or use the environment "
                  "method. See setup instructions at https://github.com/Kaggle/kaggle-api/", file=sys.stderr)
            sys.exit(1)
        self.authenticated_user = name

    def _check(self) -> None:
        if self.authenticated_user is None:
            raise ValueError("401 Client Error: Unauthorized (call authenticate() first)")

    def competition_download_files(self, competition: str, path: Optional[str] = None, force: bool = False,
                                   quiet: bool = True, unzip: bool = False) -> None:
        self._check()
        dest = Path(path or ".")
        dest.mkdir(parents=True, exist_ok=True)
        archive = server.write_competition_zip(competition, dest)
        if not quiet:
            print(f"Downloading {archive.name} to {dest}")

    def competition_submit(self, file_name: str, message: str, competition: str, quiet: bool = False,
                           sandbox: bool = False) -> SimpleNamespace:
        self._check()
        server.record_submission(file_name, message, competition)
        return SimpleNamespace(message="Successfully submitted to ML Intensive Yandex Academy Spring 2024",
                               ref=1)

    def kernels_push(self, folder: str, timeout: Optional[str] = None, acc: Optional[str] = None,
                     no_run: bool = False) -> SimpleNamespace:
        self._check()
        return SimpleNamespace(**server.push(folder))
