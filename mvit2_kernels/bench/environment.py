"""What a benchmark ran on: the device, its last-level cache, and the versions of everything timed.

Every JSON result carries :func:`describe` so that a figure can be traced to a machine and build.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["best_device", "cpu_name", "describe", "last_level_cache_bytes"]


def best_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(device: str) -> int:
    """Size of the cache a rotated working set must outgrow: the GPU's L2, or the CPU's largest
    cache level as sysfs reports it (32 MiB when unknown)."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    best_level, best_size = 0, 32 << 20
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        if level > best_level and size.rstrip("KMG").isdigit():
            best_level, best_size = level, int(size.rstrip("KMG")) * scale
    return best_size


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: recorded as missing, never fatal
        return None


def _git_commit() -> str | None:
    """The checkout's commit when the package runs from a git working tree (editable install)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def describe(device: str) -> dict[str, Any]:
    """The ``environment`` object of the JSON schema (docs/performance.md)."""
    from .. import __version__, available_backends

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = props.name
        units = props.multi_processor_count
        memory = props.total_memory
    else:
        name, units, memory = cpu_name(), None, None
    return {
        "device": device,
        "device_name": name,
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu_multiprocessors": units,
        "gpu_memory_bytes": memory,
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "mvit2_kernels": __version__,
        "git_commit": _git_commit(),
        "backends": available_backends(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
