"""Where tensor math runs: ``--device auto|cpu|cuda[:N]`` resolved once (merge and compose),
and how many CPU worker threads the machine allows."""

from __future__ import annotations

import os

from adapterctl.errors import UsageError

MAX_WORKERS = 8


def resolve_device(device: str) -> str:
    """``auto`` → the first CUDA device when there is one, else ``cpu``; checks the others.

    Returns a device string (``cpu``, ``cuda``, ``cuda:1``). torch is imported only when the
    answer could be CUDA: on a machine without an NVIDIA driver, ``auto`` and ``cpu`` cost
    nothing (importing torch takes seconds, as long as a whole CPU merge of a small model).
    """
    if device == "cpu":
        return "cpu"
    if device == "auto" and not _nvidia_driver_present():
        return "cpu"
    if device == "auto":
        try:
            import torch
        except ImportError:  # no torch: the CPU engines, whatever the hardware
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    from adapterctl.extras import require

    require("torch", f"--device {device}")
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported --device {device!r}; use auto, cpu or cuda[:N]")
    return str(dev)


def _nvidia_driver_present() -> bool:
    """False only where CUDA surely cannot work: Linux without the NVIDIA driver's device
    files (native or WSL2). Elsewhere, ask torch."""
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def workers() -> int:
    """Worker threads: one per usable core (CPU affinity, and a container's CPU quota where
    cgroup v2 sets one), at most ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores, _cgroup_cpu_quota() or cores))


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs a cgroup v2 quota allows (``docker --cpus 2``: "200000 100000" → 2), or None."""
    try:
        with open(path) as fh:
            quota, period = fh.read().split()[:2]
        return max(1, int(quota) // int(period))
    except (OSError, ValueError):  # no cgroup v2 file, or "max" (no quota)
        return None
