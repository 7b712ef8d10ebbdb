"""Which CPU this is: the model name and the instruction-set features that decide which kernels are fast."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

# /proc/cpuinfo flag -> what the report calls it. VNNI and AMX make int8 fast; avx512_bf16/AMX-BF16 make bf16 fast.
FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}


@cache
def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def cpu_features() -> list[str]:
    """The features of FEATURES this CPU reports, in FEATURES' order."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [name for flag, name in FEATURES.items() if flag in flags]


def has_int8_dot_product() -> bool:
    """VNNI or AMX: the instructions that make int8 matrix products several times faster than fp32."""
    return bool({"AVX-512 VNNI", "AVX-VNNI", "AMX-INT8"} & set(cpu_features()))


def has_bf16() -> bool:
    return bool({"AVX-512 BF16", "AMX-BF16"} & set(cpu_features()))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def describe_cpu() -> dict[str, object]:
    return {"model": cpu_model(), "features": cpu_features(), "usable_cores": usable_cores(),
            "int8_dot_product": has_int8_dot_product(), "bf16": has_bf16()}
