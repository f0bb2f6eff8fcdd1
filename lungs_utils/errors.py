"""The one exception type users see: a single actionable line, no traceback."""

from __future__ import annotations

import os
from pathlib import Path


class LungsError(Exception):
    """A problem with the user's input or environment.

    The message is one line that names the file / key / row at fault and says what to do.
    The CLI prints it as ``error: <message>`` and exits with status 2.
    """

    def __init__(self, message: str) -> None:
        # One line, always: multi-line messages get lost in papermill logs.
        super().__init__(" ".join(str(message).split()))


class DataWarning(UserWarning):
    """Input that was usable after a deliberate fix-up (e.g. an RGB image converted to grayscale)."""


def failure_line(log: str | os.PathLike[str]) -> str:
    """Why a child process (``lungs train``, torchrun) failed, from its log: the suite's own one-line
    error (the CLI prints it as ``error: <message>``) if the log holds one, else the log's last line."""
    lines = [ln.strip() for ln in Path(log).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.startswith("error: ")), lines[-1] if lines else "(no output)")
