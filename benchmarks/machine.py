"""What machine a benchmark ran on: CPU model, cores, JAX device, package versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "llms-from-scratch", "numpy")


def machine() -> dict[str, Any]:
    """{"cpu", "cores", "jax_device", "versions"} for the JSON result and the printed header."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
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
    return {"cpu": cpu, "cores": os.cpu_count(), "jax_device": device, "versions": versions}
