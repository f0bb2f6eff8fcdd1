"""What every run records about where it ran (``run.json``): git commit, package versions, device, CPU."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..hardware import cpu_kind, describe_cpu
from ..io import atomic_write_text
from ..paths import CHECKOUT
from ..runfolder import RUN_FILE

#: Packages whose versions every run.json records (distribution names).
VERSIONED = ("torch", "torchvision", "numpy", "pandas", "papermill", "lungs")


def git_commit(folder: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout (None outside git or before the first commit)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder or CHECKOUT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def device_description(name: str) -> str:
    """The device a run with ``device: name`` gets on this machine, e.g. ``cuda:0 (NVIDIA H100)`` or
    ``cpu (AMD EPYC, 2 cores, AVX512-BF16)``."""
    import torch

    from ..engine.device import select_device

    device = select_device(name)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({describe_cpu()})"


def machine(device: str) -> dict[str, Any]:
    """Provenance fields of ``run.json``: commit, versions, Python, platform, host, device and CPU kind."""
    return {"git_commit": git_commit(), "versions": versions(), "python": platform.python_version(),
            "platform": platform.platform(), "host": socket.gethostname(), "device": device_description(device),
            # Also on GPU runs: the CPU decodes, augments and caches, and the machines' CPUs differ.
            "cpu": cpu_kind()}


def write_run_json(folder: Path, info: Mapping[str, Any]) -> None:
    atomic_write_text(folder / RUN_FILE, json.dumps(dict(info), indent=2) + "\n")
