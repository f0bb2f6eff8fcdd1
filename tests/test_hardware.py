"""The CPU kind (lungs_utils.hardware): /proc/cpuinfo texts of the CPUs this project meets, the
environment variables that cap torch's instruction set, and where it is recorded (run.json, the device
line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from lungs_utils import hardware
from lungs_utils.runs import provenance, runner
from lungs_utils.hardware import cpu_kind, describe_cpu, parse_cpuinfo
from lungs_utils.paths import outputs_dir

BASE_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht " \
             "syscall nx lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid pni pclmulqdq ssse3 fma cx16 " \
             "pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl"


def cpuinfo(model: str | None, flags: str, cpus: int = 2, key: str = "flags") -> str:
    """A /proc/cpuinfo text as Linux writes it: one block per logical CPU."""
    block = [f"processor\t: {{i}}", "vendor_id\t: GenuineIntel", "cpu family\t: 6"]
    if model is not None:
        block.append(f"model name\t: {model}")
    block += ["cache size\t: 1024 KB", f"{key}\t\t: {flags}", "bogomips\t: 4000.00", ""]
    return "\n".join("\n".join(block).format(i=i) for i in range(cpus))


BROADWELL = cpuinfo("Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", f"{BASE_FLAGS} avx2 bmi1 bmi2 erms")
SKYLAKE = cpuinfo("Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz", f"{BASE_FLAGS} avx2 bmi2 {AVX512}")
GENOA = cpuinfo("AMD EPYC 9R14 96-Core Processor", f"{BASE_FLAGS} avx2 {AVX512} avx512_bf16 avx512_vnni")
SAPPHIRE = cpuinfo("Intel(R) Xeon(R) Platinum 8480+", f"{BASE_FLAGS} avx2 {AVX512} avx512_bf16 amx_bf16 amx_tile "
                   "amx_int8")
OLD = cpuinfo("Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz", BASE_FLAGS)
GRAVITON = cpuinfo(None, "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16", key="Features")


@pytest.mark.parametrize(("text", "model", "isa", "aten_isa", "bf16"), [
    (BROADWELL, "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", "AVX2", "AVX2", False),
    (SKYLAKE, "Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz", "AVX512", "AVX512", False),
    (GENOA, "AMD EPYC 9R14 96-Core Processor", "AVX512-BF16", "AVX512", True),
    (SAPPHIRE, "Intel(R) Xeon(R) Platinum 8480+", "AMX-BF16", "AVX512", True),
    (OLD, "Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz", "other", "DEFAULT", False),
    (GRAVITON, "aarch64", "other", "unknown", False),  # ARM: no model name line, no x86 ISA
    ("", "aarch64", "unknown", "unknown", False),  # no /proc/cpuinfo (macOS, Windows)
])
def test_best_instruction_set_from_the_flags(text: str, model: str, isa: str, aten_isa: str, bf16: bool) -> None:
    kind = parse_cpuinfo(text, {}, cores=2, fallback_model="aarch64")
    assert kind == {"model": model, "cores": 2, "isa": isa, "cpu_isa": isa, "aten_isa": aten_isa, "bf16": bf16,
                    "limited": []}


def test_describe_cpu_is_one_line() -> None:
    assert describe_cpu(parse_cpuinfo(GENOA, cores=2)) == "AMD EPYC 9R14 96-Core Processor, 2 cores, AVX512-BF16"
    assert describe_cpu(parse_cpuinfo(BROADWELL, cores=16)).endswith(", 16 cores, AVX2")
    assert describe_cpu(parse_cpuinfo("", fallback_model="arm")) == "arm, ? cores, unknown ISA"


def test_a_onednn_cap_is_the_effective_isa_and_says_so() -> None:
    kind = parse_cpuinfo(GENOA, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, cores=2)
    assert (kind["isa"], kind["cpu_isa"], kind["bf16"]) == ("AVX2", "AVX512-BF16", False)
    assert kind["limited"] == ["ONEDNN_MAX_CPU_ISA=AVX2"] and kind["aten_isa"] == "AVX512"
    assert describe_cpu(kind) == ("AMD EPYC 9R14 96-Core Processor, 2 cores, AVX2 (limited by "
                                  "ONEDNN_MAX_CPU_ISA=AVX2; the CPU has AVX512-BF16)")
    for value, isa in [("avx512_core", "AVX512"), ("AVX512_CORE_VNNI", "AVX512"), ("AVX512_CORE_BF16", "AVX512-BF16"),
                       ("AVX2_VNNI_2", "AVX2"), ("SSE41", "other")]:
        assert parse_cpuinfo(SAPPHIRE, {"ONEDNN_MAX_CPU_ISA": value})["isa"] == isa, value
    # The older name counts too; the new one wins when both are set.
    assert parse_cpuinfo(SAPPHIRE, {"DNNL_MAX_CPU_ISA": "AVX2"})["limited"] == ["DNNL_MAX_CPU_ISA=AVX2"]
    assert parse_cpuinfo(SAPPHIRE, {"DNNL_MAX_CPU_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "ALL"})["isa"] == "AMX-BF16"


def test_an_aten_cap_limits_atens_kernels_not_the_convolutions() -> None:
    kind = parse_cpuinfo(GENOA, {"ATEN_CPU_CAPABILITY": "avx2"}, cores=2)
    assert (kind["isa"], kind["aten_isa"], kind["bf16"]) == ("AVX512-BF16", "AVX2", True)
    assert describe_cpu(kind) == ("AMD EPYC 9R14 96-Core Processor, 2 cores, AVX512-BF16 (ATen's own kernels "
                                  "limited to AVX2 by ATEN_CPU_CAPABILITY=avx2)")
    both = parse_cpuinfo(SAPPHIRE, {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert (both["isa"], both["aten_isa"]) == ("AVX512", "DEFAULT")
    assert both["limited"] == ["ONEDNN_MAX_CPU_ISA=AVX512_CORE", "ATEN_CPU_CAPABILITY=default"]
    assert describe_cpu(both).endswith("AVX512 (limited by ONEDNN_MAX_CPU_ISA=AVX512_CORE; the CPU has AMX-BF16; "
                                       "ATen's own kernels limited to DEFAULT by ATEN_CPU_CAPABILITY=default)")


@pytest.mark.parametrize("env", [
    {"ATEN_CPU_CAPABILITY": "avx512"},  # ATen's top x86 level
    {"ATEN_CPU_CAPABILITY": "AVX2"},  # torch reads lower case only
    {"ATEN_CPU_CAPABILITY": "zvector"},  # another architecture's level
    {"ONEDNN_MAX_CPU_ISA": "ALL"},
    {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
    {"ONEDNN_MAX_CPU_ISA": "NOT_AN_ISA"},
])
def test_caps_at_or_above_the_cpu_or_unknown_change_nothing(env: dict[str, str]) -> None:
    assert parse_cpuinfo(SAPPHIRE, env) == parse_cpuinfo(SAPPHIRE, {})


def test_a_cap_above_what_the_cpu_has_is_no_limit() -> None:
    kind = parse_cpuinfo(BROADWELL, {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert (kind["isa"], kind["aten_isa"], kind["limited"]) == ("AVX2", "AVX2", [])


def test_cpu_kind_reads_this_machine_and_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    kind = cpu_kind()
    assert kind["cores"] == os.cpu_count() and kind["model"] and kind["limited"] == []
    if Path("/proc/cpuinfo").is_file():
        assert kind["isa"] in [name for name, _flags in hardware.ISA_LEVELS]
    if kind["isa"] not in ("unknown", "other"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
        capped = cpu_kind()
        assert capped["isa"] == "other" and capped["cpu_isa"] == kind["isa"]
        assert "(limited by ONEDNN_MAX_CPU_ISA=SSE41; the CPU has" in describe_cpu()


@pytest.mark.parametrize("value", [None, "avx2", "default", "AVX2"])
def test_aten_isa_is_what_torch_reports(value: str | None) -> None:
    """Checked against torch itself, in a fresh process (torch reads the variable once, at import)."""
    if cpu_kind()["aten_isa"] == "unknown":
        pytest.skip("not an x86 CPU")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if value is not None:
        env["ATEN_CPU_CAPABILITY"] = value
    code = ("import torch, lungs_utils.hardware as h; "
            "print(torch.backends.cpu.get_cpu_capability(), h.cpu_kind()['aten_isa'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    torch_says, we_say = out.stdout.split()
    assert we_say == torch_says


def test_no_cpuinfo_falls_back_to_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(hardware.platform, "processor", lambda: "arm")
    kind = cpu_kind()
    assert kind["model"] == "arm" and kind["isa"] == "unknown" and not kind["bf16"]


def test_importing_hardware_does_not_import_torch() -> None:
    code = "import sys, lungs_utils.hardware as h; h.describe_cpu(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------ records
def test_cpu_device_description_names_the_cpu_kind() -> None:
    assert provenance.device_description("cpu") == f"cpu ({describe_cpu()})"


def test_run_json_records_the_cpu(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.json as a run writes it, with papermill's execution stubbed out (no kernel start)."""
    import papermill

    nb = nbformat.v4.new_notebook()
    nbformat.write(nb, str(isolated_env / "notebooks" / "stub.ipynb"))
    params = isolated_env / "params" / "stub.yaml"
    params.write_text(yaml.safe_dump({"notebook": "stub.ipynb", "run_name": "stub", "device": "cpu"}))
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: None)
    record = runner.execute(params)
    info = json.loads((outputs_dir() / "stub" / "run.json").read_text())
    assert record.ok and info["status"] == "ok"
    assert info["cpu"] == json.loads(json.dumps(cpu_kind()))
    assert info["device"] == f"cpu ({describe_cpu()})"
