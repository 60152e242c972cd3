"""How many CPU threads the model runs on: the user's count, else PyTorch's, capped by the container's CPU quota.

PyTorch and OpenMP count the processors a process may run on, not the CPU time its cgroup allows: in a container
started with `--cpus=1` on a 2-core machine they take two threads, and every barrier of a decode step then waits
for a thread the quota has put to sleep. Measured here (default model, plain decoding, a cgroup v1 quota of one
CPU on the 2-core VM): int4 weights 63 tok/s on two threads against 103 on one, bf16 28-33 against 38-40.
The cap takes whole CPUs of the quota (rounded down, at least one) for the same reason: a thread that only gets
part of a CPU holds up the others at each barrier.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import GemmaspecError


def cpu_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time per period that this process's cgroups allow (the tightest limit on the path from the
    process's own cgroup up to the root, cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`),
    or None where no quota is set or none can be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            limits += [q for q in (_v2_limit(d) for d in _dirs(Path(root), path)) if q is not None]
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            base = next((Path(root) / name for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")
                         if (Path(root) / name).is_dir()), None)
            if base is not None:
                limits += [q for q in (_v1_limit(d) for d in _dirs(base, path)) if q is not None]
    return min(limits) if limits else None


def _dirs(base: Path, path: str) -> list[Path]:
    """The cgroup's folder and its parents up to `base` (a namespaced path may not exist: then its parents)."""
    out = [base]
    for part in filter(None, path.strip("/").split("/")):
        out.append(out[-1] / part)
    return [d for d in out if d.is_dir()]


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def quota_threads(available: int, quota: float | None) -> int:
    """`available` threads capped at the whole CPUs of `quota` (at least one)."""
    return available if quota is None else max(1, min(available, math.floor(quota)))


def configure_threads(requested: int | None) -> int:
    """Set PyTorch's (and so the C kernels') thread count: `requested` when given (0 or None: automatic), else
    PyTorch's default capped by the CPU quota, unless OMP_NUM_THREADS / MKL_NUM_THREADS chose it. Returns it."""
    import torch

    if requested is not None and requested < 0:
        raise GemmaspecError(f"--threads must be 0 (automatic) or more, got {requested}")
    if requested:
        torch.set_num_threads(requested)
    elif not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
        capped = quota_threads(torch.get_num_threads(), cpu_quota())
        if capped != torch.get_num_threads():
            torch.set_num_threads(capped)
    return torch.get_num_threads()
