"""What machine a benchmark ran on: CPU model, cores, JAX device, package versions, date."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

# The /proc/cpuinfo flags that decide matmul kernels: AVX2/FMA, AVX-512 and its bf16/VNNI, AMX.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "llms-from-scratch", "numpy")


def machine() -> dict[str, Any]:
    """{"cpu", "vector_extensions", "cores", "jax_device", "versions", "date"} for results and
    headers (`benchmarks/report.py` prints them above each table; date: UTC, when measured)."""
    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = str(jax.devices()[0].device_kind)
    return {
        "cpu": cpu,
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "jax_device": device,
        "versions": versions,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
