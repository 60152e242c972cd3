"""The default thread count honours a container's CPU quota (cgroup v1 and v2), and --threads is checked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemmaspec.cpu_threads import cpu_quota, quota_threads
from test_cli_errors import _assert_one_line_error, _generate


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_quota_is_the_tightest_limit_from_the_process_cgroup_up(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/app.service\n")
    root = tmp_path / "fs"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "system.slice" / "cpu.max", "250000 100000\n")
    _write(root / "system.slice" / "app.service" / "cpu.max", "max 100000\n")
    assert cpu_quota(str(proc), str(root)) == 2.5
    _write(root / "system.slice" / "app.service" / "cpu.max", "150000 100000\n")
    assert cpu_quota(str(proc), str(root)) == 1.5
    for folder in (root / "system.slice", root / "system.slice" / "app.service"):
        _write(folder / "cpu.max", "max 100000\n")
    assert cpu_quota(str(proc), str(root)) is None


def test_v1_quota_from_the_cpu_controller_and_a_container_view(tmp_path):
    proc = tmp_path / "cgroup"
    # a container sees its own cgroup at the controller's root; the host path in /proc does not exist there
    proc.write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    root = tmp_path / "fs"
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(str(proc), str(root)) == 3.0
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert cpu_quota(str(proc), str(root)) is None


def test_unreadable_cgroups_mean_no_quota(tmp_path):
    assert cpu_quota(str(tmp_path / "missing"), str(tmp_path)) is None
    (tmp_path / "cgroup").write_text("garbage\n0::/x\n")
    _write(tmp_path / "fs" / "x" / "cpu.max", "not numbers\n")
    assert cpu_quota(str(tmp_path / "cgroup"), str(tmp_path / "fs")) is None


def test_quota_caps_threads_at_whole_cpus():
    assert quota_threads(8, None) == 8
    assert quota_threads(8, 2.0) == 2
    assert quota_threads(8, 1.9) == 1  # part of a CPU would stall the others at every barrier
    assert quota_threads(8, 0.5) == 1
    assert quota_threads(2, 16.0) == 2


def _v1_cpu_controller() -> Path | None:
    for name in ("cpu", "cpu,cpuacct"):
        base = Path("/sys/fs/cgroup") / name
        if (base / "cpu.cfs_quota_us").exists() and os.access(base, os.W_OK):
            return base
    return None


@pytest.mark.skipif(_v1_cpu_controller() is None or (os.cpu_count() or 1) < 2,
                    reason="needs a writable cgroup v1 cpu controller and 2+ CPUs")
def test_a_real_cpu_quota_sets_the_default_threads(tmp_path):
    """In a cgroup allowed one CPU, the CLI's default is one thread (PyTorch alone would take every core);
    --threads and OMP_NUM_THREADS still win."""
    group = _v1_cpu_controller() / f"gemmaspec_test_{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        code = ("import torch; from gemmaspec.cpu_threads import configure_threads;"
                "print(torch.get_num_threads(), configure_threads(None), configure_threads(2))")
        # the child moves itself into the group before it reads the quota
        script = f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -c \"{code}\""
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        before, default, requested = map(int, out.stdout.split())
        assert before >= 2 and default == 1 and requested == 2
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120,
                             env=dict(env, OMP_NUM_THREADS="2"))
        assert out.stdout.split()[:2] == ["2", "2"], out.stderr
    finally:
        group.rmdir()


def test_negative_threads_is_a_one_line_error(tiny_gemma3_dir):
    _assert_one_line_error(_generate("hi", "--model", str(tiny_gemma3_dir), "--threads", "-1"), "--threads")
