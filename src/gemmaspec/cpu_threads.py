"""How many CPU threads the model runs on: the user's count, else PyTorch's, capped by the container's CPU quota.

PyTorch and OpenMP count the processors a process may run on, not the CPU time its cgroup allows: in a container
started with `--cpus=1` on a 2-core machine they take two threads, and every barrier of a decode step then waits
for a thread the quota has paused (this VM, a cgroup v1 quota of one CPU, `gemmaspec generate` with int4 weights:
68-70 tok/s on two threads, 108-110 capped at one). The cap takes whole CPUs of the quota (rounded down, at least
one) for the same reason: a thread that only gets part of a CPU holds up the others at each barrier.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import GemmaspecError


def cpu_quota(proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo") -> float | None:
    """CPUs' worth of time per period that this process's cgroups allow: the tightest limit from the process's own
    cgroup up to the top of the hierarchy that this process sees (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), or None where none is set or none can be read."""
    try:
        groups = Path(proc_cgroup).read_text().splitlines()
        mounts = list(_cgroup_mounts(Path(mountinfo).read_text().splitlines()))
    except (OSError, ValueError):
        return None
    limits = []
    for line in groups:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        v2 = controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        for root, point, options in mounts:
            if v2 == (options is None) and (v2 or "cpu" in options):
                for folder in _folders(root, point, path):
                    limit = _v2_limit(folder) if v2 else _v1_limit(folder)
                    if limit is not None:
                        limits.append(limit)
    return min(limits) if limits else None


def _cgroup_mounts(lines: list[str]):
    """(root, mount point, super options or None for cgroup v2) of each cgroup mount in /proc/self/mountinfo
    (fields: id parent dev root point options [optional...] - fstype source super-options)."""
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            yield root, point, None
        elif tail[0] == "cgroup":
            yield root, point, set(tail[2].split(","))


def _unescape(field: str) -> str:  # mountinfo writes space, tab, newline and backslash as octal escapes
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _folders(root: str, point: str, path: str) -> list[Path]:
    """The folders of cgroup `path` and of its parents, down to the mount's top, where the mount (its `root`
    within the hierarchy, at `point`) shows them: a container sees its own cgroup as the top of the mount."""
    root, path = root.rstrip("/"), path.rstrip("/")
    parts = path[len(root):].split("/")
    if (path != root and not path.startswith(root + "/")) or ".." in parts:
        return []  # a mount of another part of the hierarchy, or a cgroup outside this namespace's view
    folders = [Path(point)]
    for part in filter(None, parts):
        folders.append(folders[-1] / part)
    return [f for f in folders if f.is_dir()]


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" or int(period) <= 0 else int(quota) / int(period)
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
        try:
            quota = cpu_quota()
        except Exception:  # an unusual /proc or cgroup tree must not stop a command: no cap
            quota = None
        capped = quota_threads(torch.get_num_threads(), quota)
        if capped != torch.get_num_threads():
            torch.set_num_threads(capped)
    return torch.get_num_threads()
