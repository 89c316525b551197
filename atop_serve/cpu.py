"""What the CPU can do with int8 graphs (serving) and with bf16 (training and benchmarks).

ONNX Runtime multiplies uint8 activations by int8 weights (U8S8). On x86 CPUs with VNNI (``avx512_vnni``,
``avx_vnni``, ``amx_int8``) one instruction sums the products exactly in 32 bits; without it (AVX2 and AVX-512
CPUs before Cascade Lake / Ice Lake, AMD before Zen 4) MLAS uses VPMADDUBSW, which adds pairs of products in
16 bits and *saturates* once a pair exceeds 32,767: 255 x 127 x 2 = 64,770 can, 255 x 64 x 2 = 32,640 cannot. So a
graph with full 8-bit weights computes different, wrong sums there (ONNX Runtime's quantisation docs: weights
of 7 bits, ``reduce_range``, avoid it). Measured on the shipped model (docs/export.md): 8-bit weights lost 3.5
points of clean accuracy on a Skylake-SP Xeon (no VNNI) that they did not lose on the exporting CPU.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
# the features reports name (benchmarks, evaluations): what decides int8, bf16 and vector kernel speed
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


@lru_cache(maxsize=None)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo`` names), or None where they cannot be read; read once."""
    flags = _cpuinfo_field(cpuinfo, "flags")
    if flags is not None:
        return frozenset(flags.split())
    try:  # elsewhere: what NumPy's runtime dispatch detected (its names, mapped to the Linux ones we need)
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features  # NumPy 1.x
        except ImportError:
            return None
    return frozenset({"avx512_vnni"} if features.get("AVX512VNNI") else ())


@lru_cache(maxsize=None)
def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, ...), or None where it cannot be read."""
    return _cpuinfo_field(cpuinfo, "vendor_id")


def _cpuinfo_field(cpuinfo: Path, key: str) -> str | None:
    """The value of the first ``key : value`` line of /proc/cpuinfo, or None."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def int8_saturates(machine: str | None = None, flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether ONNX Runtime's U8S8 kernels on this CPU can saturate with 8-bit weights: an x86 CPU without VNNI
    (or one whose flags cannot be read: assume the worst). Other architectures take no such shortcut."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is None or not (flags & VNNI_FLAGS)


def bf16_native(machine: str | None = None, flags: frozenset[str] | set[str] | None = None) -> bool | None:
    """Whether an x86 CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16``); None where that is unknown
    (another architecture, or flags that cannot be read). Without them PyTorch emulates bf16 matmuls and
    convolutions: measured on a 2-core AMD EPYC Zen 3 (AVX2 only), airnet training steps ran 8 images/s in bf16
    autocast against 130 in fp32 (one-off timing, not in the repository: batch 256, channels_last, 3 steps after
    a warm-up), and a 2048^3 bf16 matmul 0.3 GFLOP/s against 127 in fp32 (`atop bench`, docs/benchmarks.md)."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return None
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else bool(flags & BF16_FLAGS)
