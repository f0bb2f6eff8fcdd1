"""Progress bars that behave in JupyterLab, in papermill logs and in a terminal."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from typing import Any


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar: widgets in a notebook, plain text when env ``LUNGS_PROGRESS=plain`` (papermill runs,
    where widget bars turn into unreadable logs) or ``off``."""
    mode = os.environ.get("LUNGS_PROGRESS", "auto")
    if mode == "off":
        kwargs["disable"] = True
    if mode == "auto" and importlib.util.find_spec("ipywidgets") is None:
        mode = "text"  # tqdm.auto would warn "IProgress not found" into every notebook
    if mode in ("off", "text"):
        from tqdm import tqdm
    elif mode == "plain":
        from tqdm import tqdm

        if kwargs.get("leave") is False:
            # Nested bars redraw with cursor-up codes, which a notebook log shows as garbage.
            kwargs["disable"] = True
        kwargs.setdefault("mininterval", 10.0)
        kwargs.setdefault("ascii", True)
    else:
        from tqdm.auto import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
