"""What CPU a run gets: its model, core count and best vector instruction set, as torch will use it.

The machines this project runs on change, and the CPU kind decides the training speed: with bf16
instructions (AVX512-BF16, AMX) bf16 autocast trains faster than fp32; without them only fp32 pays,
here 1.5x slower with AVX512 and 2.3x with AVX2 (capped as below). ``run.json`` and every benchmark
record it (:func:`cpu_kind`, :func:`describe_cpu`), so their figures can be compared across machines.

Two environment variables cap what torch uses, each for its own part, measured on a 2-core
AVX512-BF16 CPU (resnet_tiny training step, bf16 autocast, 380 img/s uncapped):

* ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) caps oneDNN: convolutions and matmuls, nearly all
  of a training step's time. ``AVX2`` gave 15 img/s, ``AVX512_CORE`` 121 (bf16 without bf16
  instructions), against fp32's 250 uncapped and 162 at ``AVX2``. This is the cap :func:`cpu_kind`
  reports as the effective ``isa``.
* ``ATEN_CPU_CAPABILITY`` caps ATen's own vectorised kernels (elementwise ops, reductions): ``avx2``
  gave 370 img/s (no change: the convolutions keep their bf16 instructions), ``default`` 120. Reported
  as ``aten_isa``, torch's own name for it (``torch.backends.cpu.get_cpu_capability()``).

Torch-free on purpose: ``run.json`` is written before any training, and the benchmarks print it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

__all__ = ["CpuKind", "ISA_LEVELS", "cpu_kind", "describe_cpu", "parse_cpuinfo"]

CPUINFO = Path("/proc/cpuinfo")
UNKNOWN = "unknown"

#: Vector instruction sets, worst to best, with the /proc/cpuinfo flags that show each one.
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("other", ()),
    ("AVX2", ("avx2",)),
    ("AVX512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),  # what oneDNN and ATen call AVX512 (core)
    ("AVX512-BF16", ("avx512_bf16",)),
    ("AMX-BF16", ("amx_bf16",)),
)
_RANK = {name: rank for rank, (name, _flags) in enumerate(ISA_LEVELS)}
_BF16 = ("AVX512-BF16", "AMX-BF16")

#: ATen's dispatch levels on x86, as torch names them, each with the ISA level it needs.
_ATEN_LEVELS = {"DEFAULT": "other", "AVX2": "AVX2", "AVX512": "AVX512"}


class CpuKind(TypedDict):
    """The CPU as :func:`cpu_kind` reports it (JSON-ready, for ``run.json``)."""

    model: str  # "model name" from /proc/cpuinfo, e.g. "AMD EPYC"
    cores: int | None  # os.cpu_count()
    isa: str  # best ISA of the convolutions and matmuls (oneDNN): an ISA_LEVELS name, or "unknown"
    cpu_isa: str  # best ISA the CPU has (differs from isa when ONEDNN_MAX_CPU_ISA caps it)
    aten_isa: str  # ATen's own kernels: DEFAULT, AVX2 or AVX512 (x86), or "unknown"
    bf16: bool  # the convolutions have bf16 instructions: bf16 autocast beats fp32
    limited: list[str]  # the variables that cap what torch uses, e.g. ["ONEDNN_MAX_CPU_ISA=AVX2"]


def _onednn_cap(value: str) -> str | None:
    """The ISA level a ``ONEDNN_MAX_CPU_ISA`` value allows (None: no cap, or a value we don't know)."""
    v = value.strip().upper()
    if v in ("", "ALL"):
        return None
    if "AMX" in v:
        return "AMX-BF16"
    if v.startswith("AVX10") or v in ("AVX512_CORE_BF16", "AVX512_CORE_FP16"):
        return "AVX512-BF16"
    if v.startswith("AVX512"):
        return "AVX512"
    if v.startswith("AVX2"):  # AVX2, AVX2_VNNI, AVX2_VNNI_2: no bf16 dot products
        return "AVX2"
    if v in ("DEFAULT", "SSE41", "AVX"):
        return "other"
    # An unknown value would better under-report a cap than fail the run that records it.
    return None


def _best(flags: set[str]) -> str:
    return max((name for name, needs in ISA_LEVELS if all(f in flags for f in needs)), key=_RANK.__getitem__)


def _field(text: str, *names: str) -> str | None:
    """The first ``name : value`` line's value among ``names`` (the first CPU's block suffices)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in names:
            return value.strip()
    return None


def _onednn(cpu_isa: str, env: Mapping[str, str]) -> tuple[str, str | None]:
    """The convolutions' ISA and the ``NAME=value`` that caps it (None: not capped)."""
    # oneDNN reads the older DNNL_ name too (measured: the same slowdown), the ONEDNN_ one first.
    name = "ONEDNN_MAX_CPU_ISA" if "ONEDNN_MAX_CPU_ISA" in env else "DNNL_MAX_CPU_ISA"
    value = env.get(name, "").strip()
    cap = _onednn_cap(value)
    if cap is not None and _RANK[cap] < _RANK[cpu_isa]:
        return cap, f"{name}={value}"
    return cpu_isa, None


def _aten(cpu_isa: str, env: Mapping[str, str]) -> tuple[str, str | None]:
    """ATen's level as torch names it and the ``ATEN_CPU_CAPABILITY=value`` that caps it (None: not capped)."""
    own = "AVX512" if _RANK[cpu_isa] >= _RANK["AVX512"] else "AVX2" if cpu_isa == "AVX2" else "DEFAULT"
    value = env.get("ATEN_CPU_CAPABILITY", "")
    # Torch takes lower case only ("AVX2" is ignored: measured); above the CPU's own level, or another
    # architecture's (vsx, zvector, sve), the value changes nothing here either.
    level = value.upper() if value.islower() else ""
    if level in _ATEN_LEVELS and _RANK[_ATEN_LEVELS[level]] < _RANK[_ATEN_LEVELS[own]]:
        return level, f"ATEN_CPU_CAPABILITY={value}"
    return own, None


def parse_cpuinfo(text: str, env: Mapping[str, str] | None = None, *, cores: int | None = None,
                  fallback_model: str = "unknown CPU") -> CpuKind:
    """The CPU kind from the text of ``/proc/cpuinfo`` and the environment ``env`` (default: none set).

    Empty ``text`` (no /proc/cpuinfo: macOS, Windows) gives isa ``unknown``; ``fallback_model`` names the
    CPU when the text does not.
    """
    env = {} if env is None else env
    model = _field(text, "model name")
    flags_line = _field(text, "flags", "features")  # "Features" on ARM
    flags = set(flags_line.lower().split()) if flags_line is not None else set()
    cpu_isa = _best(flags) if flags_line is not None else UNKNOWN
    isa, aten_isa, caps = cpu_isa, UNKNOWN, []
    if cpu_isa != UNKNOWN:
        isa, onednn_cap = _onednn(cpu_isa, env)
        caps.append(onednn_cap)
    if "sse2" in flags:  # x86: ATen's levels are x86 ones
        aten_isa, aten_cap = _aten(cpu_isa, env)
        caps.append(aten_cap)
    return CpuKind(model=" ".join(model.split()) if model else fallback_model, cores=cores, isa=isa,
                   cpu_isa=cpu_isa, aten_isa=aten_isa, bf16=isa in _BF16, limited=[c for c in caps if c])


def cpu_kind() -> CpuKind:
    """This machine's CPU kind (``/proc/cpuinfo`` and the capping environment variables)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, os.environ, cores=os.cpu_count(),
                         fallback_model=platform.processor() or platform.machine() or "unknown CPU")


def describe_cpu(kind: CpuKind | None = None) -> str:
    """One line, e.g. ``AMD EPYC, 2 cores, AVX512-BF16``, with any cap said in parentheses, e.g. ``AVX2
    (limited by ONEDNN_MAX_CPU_ISA=AVX2; the CPU has AVX512-BF16)``; default: this machine's kind."""
    kind = cpu_kind() if kind is None else kind
    cores = f"{kind['cores']} cores" if kind["cores"] is not None else "? cores"
    notes = []
    for setting in kind["limited"]:
        if setting.startswith(("ONEDNN_MAX_CPU_ISA=", "DNNL_MAX_CPU_ISA=")):
            notes += [f"limited by {setting}", f"the CPU has {kind['cpu_isa']}"]
        else:
            notes.append(f"ATen's own kernels limited to {kind['aten_isa']} by {setting}")
    isa = kind["isa"] if kind["isa"] != UNKNOWN else "unknown ISA"
    return f"{kind['model']}, {cores}, {isa}" + (f" ({'; '.join(notes)})" if notes else "")
