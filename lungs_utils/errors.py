"""The one exception type users see: a single actionable line, no traceback."""

from __future__ import annotations


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
