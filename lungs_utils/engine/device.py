"""Where and in what precision a run computes: the device, autocast on GPUs and on CPUs with bf16
instructions, and the seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .. import hardware
from ..errors import LungsError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` → the local CUDA device when present (per-rank under torchrun), else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise LungsError("device: cuda was requested but no CUDA GPU is visible; use device: auto or cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """True where the convolutions get bf16 instructions (AVX512-BF16 or AMX, and not capped below them
    by ``ONEDNN_MAX_CPU_ISA``): there bf16 autocast is ~1.5x fp32; elsewhere bf16 is emulated and ~10x
    slower (measured: 15 vs 162 img/s under an AVX2 cap). :mod:`lungs_utils.hardware` reads the CPU and
    the cap; without /proc/cpuinfo, torch's own probes decide."""
    kind = hardware.cpu_kind()
    if kind["isa"] != hardware.UNKNOWN:
        return kind["bf16"]
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)  # private probes: absent in some torch builds
        try:
            if probe is not None and probe():
                return True
        except Exception:  # noqa: BLE001 - a failed probe means "don't rely on it"
            pass
    return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device, or None for fp32.

    ``auto``: bf16 on CUDA GPUs that support it, fp16 on older ones; on a CPU bf16 where it has bf16
    instructions (measured on a small real mixed-source X-ray set, not in the repository, with
    params/cpu_small.yaml, two seeds: test macro-F1
    0.918 / 0.903 in bf16 vs 0.931 / 0.903 in fp32, i.e. within one of 76 images, in 150 s instead of
    254-280 s), else fp32. ``fp32`` turns autocast off anywhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
