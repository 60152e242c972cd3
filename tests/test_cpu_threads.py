"""The default thread count honours a container's CPU quota (cgroup v1 and v2), and --threads is checked."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gemmaspec.cpu_threads import cpu_quota, quota_threads
from test_cli_errors import _assert_one_line_error, _generate


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _mountinfo(tmp_path: Path, *mounts: tuple[str, Path, str]) -> str:
    """A /proc/self/mountinfo with cgroup mounts (root within the hierarchy, mount point, "cgroup2" or v1 options)."""
    lines = ["22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw"]
    for i, (root, point, kind) in enumerate(mounts):
        fs = "cgroup2 cgroup2 rw,nsdelegate" if kind == "cgroup2" else f"cgroup cgroup rw,{kind}"
        lines.append(f"{30 + i} 22 0:{40 + i} {root} {point} rw,nosuid,relatime shared:{i} - {fs}")
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_v2_quota_is_the_tightest_limit_from_the_process_cgroup_up(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/app.service\n")
    fs = tmp_path / "fs"
    mounts = _mountinfo(tmp_path, ("/", fs, "cgroup2"))
    _write(fs / "cpu.max", "max 100000\n")
    _write(fs / "system.slice" / "cpu.max", "250000 100000\n")
    _write(fs / "system.slice" / "app.service" / "cpu.max", "max 100000\n")
    assert cpu_quota(str(proc), mounts) == 2.5
    _write(fs / "system.slice" / "app.service" / "cpu.max", "150000 100000\n")
    assert cpu_quota(str(proc), mounts) == 1.5
    for folder in (fs / "system.slice", fs / "system.slice" / "app.service"):
        _write(folder / "cpu.max", "max 100000\n")
    assert cpu_quota(str(proc), mounts) is None


def test_v1_quota_in_a_container_view_of_the_hierarchy(tmp_path):
    """Docker on cgroup v1: the container's own cgroup is the top of its mount (mountinfo's root field); a
    sibling folder's quota there is not this process's."""
    proc = tmp_path / "cgroup"
    proc.write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    fs = tmp_path / "cpu,cpuacct"
    mounts = _mountinfo(tmp_path, ("/docker/abc", fs, "cpu,cpuacct"), ("/docker/abc", tmp_path / "mem", "memory"))
    _write(fs / "cpu.cfs_quota_us", "300000\n")
    _write(fs / "cpu.cfs_period_us", "100000\n")
    _write(fs / "docker" / "cpu.cfs_quota_us", "50000\n")  # not on this process's path
    _write(fs / "docker" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(str(proc), mounts) == 3.0
    _write(fs / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert cpu_quota(str(proc), mounts) is None


def test_v1_bind_mounted_subtree_finds_the_nested_cgroup(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("1:cpu:/outer/inner\n")
    fs = tmp_path / "cpu"
    mounts = _mountinfo(tmp_path, ("/outer", fs, "cpu"))
    _write(fs / "inner" / "cpu.cfs_quota_us", "100000\n")
    _write(fs / "inner" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(str(proc), mounts) == 1.0
    proc.write_text("1:cpu:/elsewhere\n")  # a cgroup this mount does not show
    assert cpu_quota(str(proc), mounts) is None


def test_unreadable_cgroups_mean_no_quota(tmp_path):
    assert cpu_quota(str(tmp_path / "missing"), str(tmp_path / "missing")) is None
    (tmp_path / "cgroup").write_text("garbage\n0::/x\n")
    fs = tmp_path / "fs"
    _write(fs / "x" / "cpu.max", "not numbers\n")
    assert cpu_quota(str(tmp_path / "cgroup"), _mountinfo(tmp_path, ("/", fs, "cgroup2"))) is None
    _write(fs / "x" / "cpu.max", "100000 0\n")  # a zero period
    assert cpu_quota(str(tmp_path / "cgroup"), _mountinfo(tmp_path, ("/", fs, "cgroup2"))) is None


def test_configure_threads_caps_only_the_automatic_count(monkeypatch):
    import torch

    from gemmaspec import cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "cpu_quota", lambda: 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        assert cpu_threads.configure_threads(None) == 1
        torch.set_num_threads(2)
        assert cpu_threads.configure_threads(0) == 1
        assert cpu_threads.configure_threads(2) == 2  # asked for: not capped
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's environment chose it
        assert cpu_threads.configure_threads(None) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")

        def broken():
            raise PermissionError("/sys/fs/cgroup/x")

        monkeypatch.setattr(cpu_threads, "cpu_quota", broken)
        assert cpu_threads.configure_threads(None) == 2  # an unreadable tree: no cap, no error
    finally:
        torch.set_num_threads(before)


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


@pytest.mark.skipif(_v1_cpu_controller() is None, reason="needs a writable cgroup v1 cpu controller")
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
        script = f"echo $$ > {shlex.quote(str(group / 'cgroup.procs'))} && exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        before, default, requested = map(int, out.stdout.split())
        if before < 2:
            pytest.skip("PyTorch takes one thread here by default: no cap to see")
        assert default == 1 and requested == 2
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120,
                             env=dict(env, OMP_NUM_THREADS="2"))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[:2] == ["2", "2"], out.stderr
    finally:
        group.rmdir()


def test_negative_threads_is_a_one_line_error(tiny_gemma3_dir):
    _assert_one_line_error(_generate("hi", "--model", str(tiny_gemma3_dir), "--threads", "-1"), "--threads")
