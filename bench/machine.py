"""What the benchmarks print about the machine they ran on."""

import pathlib
import platform


def cpu_isa() -> str:
    """The widest x86 vector extensions the CPU reports (what the multiversioned loops pick at load time), e.g.
    "AVX2, no AVX-512" or "AVX-512, AVX-512-BF16, AMX"; "" where /proc/cpuinfo has no flags line."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return ""
    if not flags:
        return ""
    found = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512-BF16"), ("amx_tile", "AMX"))
             if flag in flags]
    if "avx512f" not in flags:
        found = ["AVX2, no AVX-512"] if "avx2" in flags else ["no AVX2"]
    return ", ".join(found)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else what the platform module reports) with its ISA in parentheses."""
    name = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = cpu_isa()
    return f"{name} ({isa})" if isa else name
