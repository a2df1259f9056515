"""Tests of jobworker, grouped by the sections of jobworker.py. Real cgroups, real processes.

Tiers: tests marked `root` create cgroups, processes as other users, mounts or namespaces;
tests marked `slow` take minutes (QEMU guest, network namespaces, every CPython, 1,000-job
runs). `pytest -m "not slow and not root"` runs the rest as an ordinary user in seconds;
`make test` runs everything, as root.

Every cgroup a test makes lives under one parent made for this test run
(jobworker-test-<pid>, below this process's own cgroup in each hierarchy) and is removed
afterwards, also on failure.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import datetime
import fcntl
import glob
import hashlib
import itertools
import json
import os
import pathlib
import queue
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid

import pytest
import jobworker as jw

RUN_PARENT = f"jobworker-test-{os.getpid()}"
# Every launcher this run starts (in-process or through a server) inherits this, so one left
# behind by a run that was killed can be found and ended.
os.environ["JOBWORKER_TEST_RUN"] = str(os.getpid())
# CLI calls go direct (no mux of the test run's user outlives it); the mux's own tests give it
# a runtime dir of their own (mux_env).
os.environ["JOBWORKER_MUX"] = "off"
_counter = itertools.count()
HERE = os.path.dirname(os.path.abspath(jw.__file__))
root = pytest.mark.root
slow = pytest.mark.slow


def _host_cgroup_version():
    try:
        return jw.detect_cgroups("probe").version
    except jw.JobworkerError:
        return None


v1_only = pytest.mark.skipif(_host_cgroup_version() != 1, reason="cgroup v1 files")


def _unified_mount():
    for mountpoint, fstype, _, _ in jw._mounts("/proc/self/mountinfo"):
        if fstype == "cgroup2":
            return mountpoint
    return None


def _launchers_of_runs(keep):
    """pids of launcher processes started by test runs for which keep(run pid) is false."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"jobworker.launcher_main" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        run = env.get(b"JOBWORKER_TEST_RUN", b"").decode()
        if run.isdigit() and not keep(int(run)):
            found.append(int(pid))
    return found


def _remove_stale_run_parents():
    """Parents (and launchers) of earlier test runs that were killed before their teardown
    ran."""
    for pid in _launchers_of_runs(keep=lambda run: os.path.exists(f"/proc/{run}")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    dead = lambda name: (lambda pid: pid.isdigit() and not os.path.exists(f"/proc/{pid}"))(
        name.removeprefix("jobworker-test-").split("-")[0])
    found = glob.glob(f"{jw.CGROUP_ROOT}/*/jobworker-test-*")
    found += glob.glob(f"{jw.CGROUP_ROOT}/memory/**/jobworker-test-*", recursive=True)
    for name in {os.path.basename(p) for p in found if dead(os.path.basename(p))}:
        jw.detect_cgroups(name).remove_parent()
    # A run's memory cgroups sit below the memory cgroup of the process that ran it (this
    # host's layout), which may not be this one's: those are removed where they are found.
    for path in (p for p in found if dead(os.path.basename(p)) and os.path.isdir(p)):
        for d, _, _ in os.walk(path, topdown=False):
            with contextlib.suppress(OSError):
                with open(f"{d}/cgroup.procs") as f:
                    for pid in f.read().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.rmdir(d)


@pytest.fixture(scope="session")
def cgroup_run_parent():
    assert os.geteuid() == 0, "tests marked root need root: they create cgroups and run jobs"
    _remove_stale_run_parents()
    yield RUN_PARENT
    left = _launchers_of_runs(keep=lambda run: run != os.getpid())
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    jw.detect_cgroups(RUN_PARENT).remove_parent()
    assert not left, f"launchers left running by this run's tests: {left}"


@pytest.fixture(autouse=True)
def _root_tests_get_the_run_parent(request):
    """A test marked root gets the run's cgroup parent (and the root check) before it runs."""
    if request.node.get_closest_marker("root"):
        request.getfixturevalue("cgroup_run_parent")


@pytest.fixture
def make_manager(tmp_path):
    """make_manager(state=None, cgroups=None, **kw) -> an open JobManager with a cgroup parent
    of its own below the run's. Each one made is closed and its cgroups removed after the
    test, also on failure."""
    made = []

    def make(state=None, cgroups=None, **kw):
        driver = cgroups or jw.detect_cgroups(f"{RUN_PARENT}/t{next(_counter)}")
        state = state or tmp_path / ("state" if not made else f"state{len(made)}")
        m = jw.JobManager(str(state), driver, **kw)
        made.append(m)
        return m.open()
    yield make
    for m in reversed(made):
        m.close(grace=0)
        m.cgroups.remove_parent()


@pytest.fixture
def manager(make_manager):
    return make_manager()


class FakeCgroup(jw.Cgroup):
    """A job "cgroup" without the kernel's cgroup code: the child writes its pid into a plain
    file, and the job's processes are those in its session (the child calls setsid). Limits
    are recorded, not enforced; usage reads zero; oom_kills is what a test sets. Lets the
    JobManager's logic (states, races, records, retention) run as an ordinary user."""

    def __init__(self, path):
        self.path = path
        self.procs_files = (f"{path}.procs",)
        self.limits = None
        self.oom = 0

    def create(self):
        with open(self.procs_files[0], "x"):
            pass

    def set_limits(self, limits, devices):
        self.limits = limits

    def _session(self):
        try:
            with open(self.procs_files[0]) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    def pids(self):
        sid = self._session()
        if sid is None:
            return set()
        found = set()
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] != "Z" and int(fields[3]) == sid:
                    found.add(int(name))
        return found

    def oom_kills(self):
        return self.oom

    def usage(self):
        return dict.fromkeys(jw.USAGE_KEYS, 0)

    def remove(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.procs_files[0])

    def to_record(self):
        return {}


class FakeCgroupDriver(jw.CgroupDriver):
    """Makes FakeCgroups in a directory; remembers them so a test can reach one by id."""

    version = 0

    def __init__(self, directory):
        self.dir = str(directory)
        self.made = {}

    def setup(self):
        os.makedirs(self.dir, exist_ok=True)

    def job(self, job_id):
        jw.validate_job_id(job_id)
        return self.made.setdefault(job_id, FakeCgroup(f"{self.dir}/{job_id}"))

    def parent_dirs(self):
        return [self.dir]

    def leftover_job_ids(self):
        if not os.path.isdir(self.dir):
            return []
        return sorted(n[:-6] for n in os.listdir(self.dir) if n.endswith(".procs"))

    def remove_parent_if_empty(self):
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)

    def remove_parent(self):
        for job_id in self.leftover_job_ids():
            cg = self.job(job_id)
            cg.kill_all()
            cg.remove()
        self.remove_parent_if_empty()

    def _check_controllers(self):
        return []


@pytest.fixture
def fake_manager(tmp_path):
    """fake_manager(state=None, **kw) -> an open JobManager on FakeCgroups (no root needed);
    closed after the test."""
    made = []

    def make(state=None, **kw):
        m = jw.JobManager(str(state or tmp_path / "state"), FakeCgroupDriver(tmp_path / "cg"),
                          devices=[], **kw)
        made.append(m)
        return m.open()
    yield make
    for m in reversed(made):
        m.close(grace=0)
        m.cgroups.remove_parent()


def crash(m):
    """As if the server process were killed: nothing stops its jobs or finishes their records
    (the engine goes first, so nothing is left to notice the launcher's death)."""
    m.queue.stop()
    m._engine.stop()
    m._finisher.shutdown()
    m.supervisor.launcher.process.kill()
    m.supervisor.launcher.process.wait()
    m._closed = True   # a later close() has nothing to do


def output(m, job_id, offset=0):
    """(stdout bytes, stderr bytes, chunks) of a job, following it until it is final."""
    chunks = list(m.follow(job_id, offset))
    out = b"".join(c.data for c in chunks if c.stream == jw.STDOUT)
    err = b"".join(c.data for c in chunks if c.stream == jw.STDERR)
    return out, err, chunks


def wait_final(m, job_id, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = m.status(job_id)
        if s.state in jw.FINAL_STATES:
            return s
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still running after {timeout}s")


def wait_for(predicate, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid):
    """True unless the pid is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def zombies_of(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(p) for p in f.read().split()]
    return [k for k in kids if not pid_alive(k)]


def cpu_share(m, job_id, seconds):
    """Fraction of one CPU the job used over `seconds` of wall time."""
    before = m.status(job_id).usage["cpu_seconds"]
    t0 = time.monotonic()
    time.sleep(seconds)
    used = m.status(job_id).usage["cpu_seconds"] - before
    return used / (time.monotonic() - t0)


# ================================================================================================
# Limits
# ================================================================================================


@pytest.mark.parametrize("text,expected", [
    ("50%", 50.0), ("150%", 150.0), ("1%", 1.0), ("12.5%", 12.5), (" 50 % ", 50.0), ("", None)])
def test_cpu_quota_parses_systemd_percent(text, expected):
    if expected and expected > 100 * os.cpu_count():
        pytest.skip("needs more CPUs")
    assert jw.parse_cpu_quota(text) == expected


@pytest.mark.parametrize("text", ["0%", "-5%", "abc", "50", "0.5%", "50%%", "1e3%", "%", "٥٠%",
                                  "²%", "9" * 400 + "%"])
def test_cpu_quota_rejects_bad_values_naming_the_field(text):
    with pytest.raises(jw.InvalidArgument) as e:
        jw.parse_cpu_quota(text)
    assert e.value.field == "cpu_quota" and "50%" in str(e.value)


def test_cpu_quota_above_host_cpus_is_rejected():
    too_many = f"{os.cpu_count() * 100 + 1}%"
    with pytest.raises(jw.InvalidArgument, match="on this host"):
        jw.parse_cpu_quota(too_many)
    assert jw.parse_cpu_quota(f"{os.cpu_count() * 100}%") == os.cpu_count() * 100


@pytest.mark.parametrize("text,expected", [
    ("256M", 256 << 20), ("256m", 256 << 20), ("1G", 1 << 30), ("4096", 4096), ("64K", 64 << 10),
    ("1.5G", 3 << 29), ("256MB", 256 << 20), ("256MiB", 256 << 20), ("1T", 1 << 40), ("", None)])
def test_memory_parses_base_1024(text, expected):
    assert jw.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["0", "4095", "1K", "abc", "-5M", "10XB", "M", "256 MBs",
                                  "٢٥٦M", "9" * 400, "9" * 400 + "T"])
def test_memory_rejects_bad_values(text):
    with pytest.raises(jw.InvalidArgument) as e:
        jw.parse_memory(text)
    assert e.value.field == "memory_limit" and "256M" in str(e.value)


@pytest.mark.parametrize("text,expected", [
    ("10MB/s", 10_000_000), ("10M", 10_000_000), ("10mb/s", 10_000_000), ("1GB/s", 10 ** 9),
    ("10MiB/s", 10 << 20), ("500KB/s", 500_000), ("4096", 4096), ("", None)])
def test_disk_io_parses_systemd_units(text, expected):
    assert jw.parse_disk_io(text) == expected


@pytest.mark.parametrize("text", ["10XB/s", "0", "abc", "-1MB/s", "10MB/h", "100", "iB/s",
                                  "9" * 400 + "MB/s"])
def test_disk_io_rejects_bad_values(text):
    with pytest.raises(jw.InvalidArgument) as e:
        jw.parse_disk_io(text)
    assert e.value.field == "disk_io" and "10MB/s" in str(e.value)


def test_pids_parse():
    assert jw.parse_pids("100") == 100 and jw.parse_pids("") is None
    for bad in ["-1", "abc", "1.5", str(jw.MAX_PIDS + 1), "²", "٥٠", "1" * 100]:
        with pytest.raises(jw.InvalidArgument, match="pids"):
            jw.parse_pids(bad)


@root
@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "x\0y", "A" * 10_000, "",
                                 "6F9619FF-8B86-D011-B42D-00C04FC964FF"])
def test_job_id_validated_before_any_path_use(bad, manager):
    with pytest.raises(jw.InvalidArgument):
        jw.validate_job_id(bad)
    with pytest.raises(jw.InvalidArgument):
        manager.status(bad)
    with pytest.raises(jw.InvalidArgument):
        manager.cgroups.job(bad)


@root
def test_unknown_job_is_not_found(manager):
    with pytest.raises(jw.JobNotFound):
        manager.status("6f9619ff-8b86-4011-b42d-00c04fc964ff")


@root
def test_bad_limits_create_nothing(manager):
    with pytest.raises(jw.InvalidArgument):
        jw.parse_limits(cpu="50%", memory="10XB")
    assert manager.list() == [] and manager.cgroups.leftover_job_ids() == []


@root
def test_huge_argv_is_refused_before_anything_is_created(manager):
    with pytest.raises(jw.CapReached):
        manager.start("echo", ["x" * (jw.MAX_ARGV_BYTES + 1)])
    with pytest.raises(jw.CapReached):
        manager.start("echo", ["x"] * jw.MAX_ARGS)
    with pytest.raises(jw.InvalidArgument):
        manager.start("echo", ["a\0b"])
    assert manager.list() == [] and manager.cgroups.leftover_job_ids() == []


# ================================================================================================
# Cgroups
# ================================================================================================


def test_detect_hybrid_layout(tmp_path):
    (tmp_path / "mountinfo").write_text(
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "36 31 0:33 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    (tmp_path / "cgroup").write_text(
        "4:memory:/user.slice\n3:cpuset:/\n2:cpu,cpuacct:/system.slice/x.service\n0::/system.slice/x.service\n")
    d = jw.detect_cgroups("jw", str(tmp_path / "mountinfo"), str(tmp_path / "cgroup"))
    assert d.version == 1
    assert d.parents == {"cpu": "/sys/fs/cgroup/cpu,cpuacct/system.slice/x.service/jw",
                         "cpuacct": "/sys/fs/cgroup/cpu,cpuacct/system.slice/x.service/jw",
                         "memory": "/sys/fs/cgroup/memory/user.slice/jw"}
    assert d.unified_parent == "/sys/fs/cgroup/unified/system.slice/x.service/jw"
    job = d.job("6f9619ff-8b86-4011-b42d-00c04fc964ff")
    assert len(job.procs_files) == 3   # co-mounted cpu,cpuacct joined once


def test_detect_pure_v2_layout(tmp_path):
    (tmp_path / "mountinfo").write_text(
        "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
    (tmp_path / "cgroup").write_text("0::/system.slice/jobworker.service\n")
    d = jw.detect_cgroups("jobworker", str(tmp_path / "mountinfo"), str(tmp_path / "cgroup"))
    assert d.version == 2
    assert d.parent == "/sys/fs/cgroup/system.slice/jobworker.service/jobworker"
    # a restarted server, started in the leaf an earlier one moved itself into, finds the
    # same job cgroups (its live-restored jobs are there)
    (tmp_path / "cgroup").write_text("0::/system.slice/jobworker.service/server\n")
    d = jw.detect_cgroups("jobworker", str(tmp_path / "mountinfo"), str(tmp_path / "cgroup"))
    assert d.parent == "/sys/fs/cgroup/system.slice/jobworker.service/jobworker"


def test_detect_refuses_escaping_parent():
    for bad in ["/abs", "../up", "a/../../b"]:
        with pytest.raises(jw.InvalidArgument):
            jw.detect_cgroups(bad)


def test_v2_controller_files_written_exactly(tmp_path):
    cg = jw.CgroupV2(str(tmp_path))
    for name in ["cpu.max", "memory.max", "memory.swap.max", "io.max", "pids.max"]:
        (tmp_path / name).write_text("")
    cg.set_limits(jw.parse_limits("50%", "256M", "10MB/s", "100"), ["254:0"])
    assert (tmp_path / "cpu.max").read_text() == "50000 100000"
    assert (tmp_path / "memory.max").read_text() == str(256 << 20)
    assert (tmp_path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "io.max").read_text() == "254:0 rbps=10000000 wbps=10000000"
    assert (tmp_path / "pids.max").read_text() == "100"
    (tmp_path / "pids.max").unlink()
    with pytest.raises(jw.CgroupError, match="pids.max"):
        cg.set_limits(jw.Limits(pids=5), [])


def test_v2_setup_moves_server_into_leaf_and_enables_controllers(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
    real_makedirs = os.makedirs

    def makedirs(path, *a, **kw):   # a real cgroupfs fills new dirs with its files
        real_makedirs(path, *a, **kw)
        for name, text in [("cgroup.controllers", "cpu io memory pids"),
                           ("cgroup.subtree_control", ""), ("cgroup.procs", "")]:
            p = os.path.join(path, name)
            if not os.path.exists(p):
                open(p, "w").write(text)
    os.makedirs = makedirs
    try:
        jw.CgroupV2Driver(str(own), "jobworker").setup()
    finally:
        os.makedirs = real_makedirs
    assert (own / "server" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"
    assert (own / "jobworker" / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"


def test_block_devices_skip_virtual_disks(tmp_path):
    for name, size, dev in [("vda", "100", "254:0"), ("loop0", "100", "7:0"),
                            ("zram0", "0", "253:0"), ("sr0", "0", "11:0"), ("ram0", "8", "1:0")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size)
        (tmp_path / name / "dev").write_text(dev + "\n")
    assert jw.block_devices(str(tmp_path)) == ["254:0"]


@root
@v1_only
def test_v1_limit_files_hold_exactly_the_requested_values(manager):
    limits = jw.parse_limits("50%", "256M", "10MB/s", "77")
    job = manager.start("sleep", ["60"], limits)
    cg = manager.cgroups.job(job.id)
    read = lambda c, f: open(f"{cg.dirs[c]}/{f}").read().strip()
    assert read("cpu", "cpu.cfs_quota_us") == "50000"
    assert read("cpu", "cpu.cfs_period_us") == "100000"
    assert read("memory", "memory.limit_in_bytes") == str(256 << 20)
    if os.path.exists(f"{cg.dirs['memory']}/memory.memsw.limit_in_bytes"):
        assert read("memory", "memory.memsw.limit_in_bytes") == str(256 << 20)
    expected = sorted(f"{dev} 10000000" for dev in jw.block_devices())
    assert expected, "this host should have a disk to throttle"
    assert sorted(read("blkio", "blkio.throttle.read_bps_device").splitlines()) == expected
    assert sorted(read("blkio", "blkio.throttle.write_bps_device").splitlines()) == expected
    assert read("pids", "pids.max") == "77"
    manager.stop(job.id, grace=0)


@root
@v1_only
def test_default_pids_limit_applies(manager):
    job = manager.start("sleep", ["60"])
    assert job.limits.pids == jw.DEFAULT_PIDS_LIMIT
    assert open(f"{manager.cgroups.job(job.id).dirs['pids']}/pids.max").read().strip() == \
        str(jw.DEFAULT_PIDS_LIMIT)
    manager.stop(job.id, grace=0)


@root
@v1_only
@pytest.mark.parametrize("into", ["clone3", "not sent", "refused"])
def test_child_is_in_every_job_cgroup_before_exec(manager, monkeypatch, tmp_path, into):
    # clone3 creates it in the cgroup2 dir; a request without `into` (an older server's) and
    # a clone3 the kernel refuses (not a cgroup: EBADF) leave it to fork and join by writes
    request = jw.JobSpawner.request

    def with_into(self, *a):
        req = request(self, *a)
        req.into = {"clone3": req.into, "not sent": "", "refused": str(tmp_path)}[into]
        return req
    monkeypatch.setattr(jw.JobSpawner, "request", with_into)
    job = manager.start("cat", ["/proc/self/cgroup"])
    out, _, _ = output(manager, job.id)
    lines = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in out.decode().splitlines()}
    drv = manager.cgroups
    for controller in drv.parents:
        key = next(k for k in lines if controller in k.split(","))
        assert lines[key].endswith(f"/{job.id}"), (controller, lines[key])
    if drv.unified_parent:
        assert lines[""].endswith(f"/{job.id}")


def unified_driver(parent):
    """(the cgroup2 mount, a CgroupV2Driver on it with `parent` below this process's own
    cgroup there); skips the test where there is no cgroup2 mount."""
    mount = _unified_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount on this host")
    own = jw._join(mount, "/", jw._own_cgroups("/proc/self/cgroup")["unified"])
    return mount, jw.CgroupV2Driver(own, parent)


CLONE_INTO = """
import ctypes, errno, os, sys
import jobworker as jw
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
try:
    pid = jw._clone_into(libc, os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY))
except OSError as e:
    if e.errno in jw._NO_CLONE_INTO:
        sys.exit(f"no clone3 here: {e}")
    raise
if pid == 0:
    os.write(w, open("/proc/self/cgroup", "rb").read())
    os._exit(0)
os.close(w)
print(os.read(r, 65536).decode(), end="")
assert os.waitpid(pid, 0)[1] == 0
try:   # not a cgroup: refused (the launcher then forks)
    pid = jw._clone_into(libc, os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY))
except OSError as e:
    assert e.errno == errno.EBADF, e
else:
    os._exit(0) if pid == 0 else sys.exit("clone3 into a plain directory was not refused")
"""


@root
def test_clone3_creates_the_child_in_its_cgroup2_directory(tmp_path):
    # the launcher's fast path: were clone3 refused here, it would fork (and this would fail)
    mount, driver = unified_driver(f"{RUN_PARENT}-clone3")
    driver.setup()
    cg = driver.job(str(uuid.uuid4()))
    cg.create()
    try:
        r = subprocess.run([sys.executable, "-c", CLONE_INTO, cg.clone_into, str(tmp_path)],
                           cwd=HERE, capture_output=True, text=True, timeout=30)
        if r.stderr.startswith("no clone3 here"):   # (a kernel before 5.7, or seccomp)
            pytest.skip(r.stderr.strip())
        assert r.returncode == 0, r.stderr
        assert f"0::{cg.path[len(mount):]}" in r.stdout.splitlines(), r.stdout
    finally:
        cg.remove()
        driver.remove_parent()


@root
def test_unified_mount_mechanics_create_attach_kill_events_remove(make_manager):
    """The v2 implementation on this host's real cgroup2 mount (no controllers here)."""
    mount, driver = unified_driver(f"{RUN_PARENT}-v2")
    own = driver.own
    m = make_manager(cgroups=driver, default_pids=None)
    job = m.start("sh", ["-c", "trap '' TERM; cat /proc/self/cgroup; setsid sleep 600 & echo $!; "
                               "sleep 600"])
    cg = driver.job(job.id)
    wait_for(lambda: len(cg.pids()) == 3, what="three processes in the job cgroup")
    events = open(f"{cg.path}/cgroup.events").read()
    assert "populated 1" in events
    stopped = m.stop(job.id, grace=0)
    assert stopped.state == jw.STOPPED and stopped.signal == signal.SIGKILL
    out, _, _ = output(m, job.id)
    lines = out.decode().splitlines()
    assert f"0::{own[len(mount):].rstrip('/')}/{RUN_PARENT}-v2/{job.id}" in lines
    assert not pid_alive(int(lines[-1]))
    assert not os.path.exists(cg.path)


@root
@v1_only
def test_v1_kill_works_without_cgroup_kill_through_the_freezer(manager):
    """A fork loop is frozen, killed and thawed until nothing is left."""
    job = manager.start("sh", ["-c", "i=0; while [ $i -lt 40 ]; do sleep 600 & i=$((i+1)); done; "
                                     "while :; do /bin/true; done"], jw.Limits(pids=64))
    cg = manager.cgroups.job(job.id)
    wait_for(lambda: len(cg.pids()) > 40, what="the fork loop to grow")
    cg_without_unified = jw.CgroupV1(cg.dirs, None)
    cg_without_unified.kill_all()
    assert cg.pids() == set()
    assert wait_final(manager, job.id).state == jw.EXITED


# ================================================================================================
# Logs
# ================================================================================================


PY = "python3"


@root
def test_output_is_byte_exact_and_streams_kept_apart(manager):
    code = ("import sys, os\n"
            "os.write(1, b'\\x00\\xff\\xfe not utf-8 \\x00')\n"
            "os.write(2, b'err\\x00')\n"
            "os.write(1, b'x' * 1000000)\n")
    job = manager.start(PY, ["-c", code])
    out, err, _ = output(manager, job.id)
    assert out == b"\x00\xff\xfe not utf-8 \x00" + b"x" * 1_000_000
    assert err == b"err\x00"


@root
def test_relative_order_of_stdout_and_stderr_is_kept(manager):
    job = manager.start("sh", ["-c", "for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; "
                                     "sleep 0.05; done"])
    _, _, chunks = output(manager, job.id)
    seen = [(c.stream, line) for c in chunks for line in c.data.decode().split()]
    assert seen == [(jw.STDOUT, "out1"), (jw.STDERR, "err1"), (jw.STDOUT, "out2"),
                    (jw.STDERR, "err2"), (jw.STDOUT, "out3"), (jw.STDERR, "err3")]
    offsets = [c.offset for c in chunks]
    assert offsets == sorted(offsets) and offsets[0] == 0


@root
def test_followers_early_and_late_get_identical_output_live(manager):
    # The job writes half its output, waits until the late follower has caught up with it,
    # then writes the rest: the late one attaches to a running job and goes on live.
    gate = f"/tmp/jobworker-gate-{uuid.uuid4()}"
    job = manager.start("sh", ["-c", "for i in $(seq 1 15); do echo line $i; echo e$i >&2; "
                                     f"done; while [ ! -e {gate} ]; do sleep 0.01; done; "
                                     "for i in $(seq 16 30); do echo line $i; echo e$i >&2; "
                                     "sleep 0.02; done"])
    results = {"early": [], "late": []}

    def follow(name):
        for c in manager.follow(job.id):
            results[name].append((c.stream, c.offset, c.data))

    joined = lambda name: b"".join(d for _, _, d in list(results[name]))
    early = threading.Thread(target=follow, args=("early",))
    early.start()
    wait_for(lambda: joined("early").count(b"line") == 15, what="the early follower")
    late = threading.Thread(target=follow, args=("late",))
    late.start()
    try:
        wait_for(lambda: joined("late").count(b"line") == 15, what="the late one's catch-up")
        assert manager.status(job.id).state == jw.RUNNING
    finally:
        open(gate, "w").close()
    early.join(30)
    late.join(30)
    os.unlink(gate)
    assert joined("early") == joined("late")
    assert joined("early").count(b"line") == 30
    assert manager.status(job.id).state == jw.EXITED


@root
def test_follow_resumes_from_an_offset(manager):
    job = manager.start("sh", ["-c", "printf abc; sleep 0.1; printf DEF >&2; sleep 0.1; printf ghi"])
    _, _, chunks = output(manager, job.id)
    everything = b"".join(c.data for c in chunks)
    for offset in range(len(everything) + 1):
        assert b"".join(c.data for c in manager.follow(job.id, offset)) == everything[offset:]
    tail = list(manager.follow(job.id, 4))
    assert [(c.stream, c.offset, c.data) for c in tail] == \
        [(jw.STDERR, 4, b"EF"), (jw.STDOUT, 6, b"ghi")]
    with pytest.raises(jw.InvalidArgument, match="offset"):
        manager.follow(job.id, len(everything) + 1)
    with pytest.raises(jw.InvalidArgument, match="offset"):
        manager.follow(job.id, -1)


@root
def test_output_cap_drops_with_a_visible_marker_and_flag(make_manager, tmp_path):
    m = make_manager(log_cap=64 << 10)
    job = m.start("head", ["-c", "10000000", "/dev/zero"])
    out, err, _ = output(m, job.id)
    status = m.status(job.id)
    assert status.state == jw.EXITED and status.exit_code == 0   # not blocked, not killed
    assert status.log_truncated
    assert 0 < len(out) < 64 << 10
    assert b"output cap of 65536 bytes reached" in err
    assert os.path.getsize(tmp_path / "state" / "jobs" / job.id / "output.log") <= 64 << 10


@root
def test_cancelled_follower_returns_at_once(manager):
    job = manager.start("sleep", ["60"])
    follow = manager.follow(job.id)
    done = threading.Event()
    threading.Thread(target=lambda: (list(follow), done.set())).start()
    time.sleep(0.1)
    assert not done.is_set()
    follow.cancel()
    assert done.wait(5)
    manager.stop(job.id, grace=0)


@root
def test_log_files_are_private(manager):
    job = manager.start("echo", ["hi"])
    output(manager, job.id)
    assert os.stat(manager.state_dir).st_mode & 0o777 == 0o700
    for name in ["output.log", "output.idx", "job.json"]:
        assert os.stat(f"{manager.jobs_dir}/{job.id}/{name}").st_mode & 0o777 == 0o600


# ================================================================================================
# Launcher
# ================================================================================================


@root
def test_nonexistent_program_fails_synchronously_leaving_nothing(manager):
    with pytest.raises(jw.SpawnError) as e:
        manager.start("no-such-program-xyz")
    assert str(e.value) == "no such file: no-such-program-xyz"
    assert manager.list() == []
    assert manager.cgroups.leftover_job_ids() == []
    assert os.listdir(manager.jobs_dir) == []


@root
def test_non_executable_program_reports_permission_denied(manager, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(jw.SpawnError, match=f"permission denied: {script}"):
        manager.start(str(script))
    assert manager.cgroups.leftover_job_ids() == []


def test_the_launcher_looks_up_only_the_default_path_and_as_execvp_would(tmp_path, monkeypatch):
    env = {"PATH": jw.JOB_PATH}
    assert jw._first_on_path("sh", env) == shutil.which("sh", path=jw.JOB_PATH)
    assert jw._first_on_path("no-such-program-here", env) is None
    assert jw._first_on_path("./sh", env) is None and jw._first_on_path("/bin/sh", env) is None
    assert jw._first_on_path("sh", {"PATH": "/usr/bin"}) is None   # a PATH the caller gave
    assert jw._first_on_path("sh", {}) is None
    dirs = [tmp_path / n for n in ("missing", "file", "dir", "plain", "exe", "later")]
    dirs[1].write_text("")                                    # not a directory
    for d in dirs[2:]:
        d.mkdir()
    (dirs[2] / "prog").mkdir()                                # a directory of that name
    (dirs[3] / "prog").write_text("#!/bin/sh\n")              # no x bit
    for d in dirs[4:]:
        (d / "prog").write_text("#!/bin/sh\n")
        (d / "prog").chmod(0o755)
    monkeypatch.setattr(jw, "JOB_PATH", ":".join(map(str, dirs)))
    env = {"PATH": jw.JOB_PATH}
    assert jw._first_on_path("prog", env) == str(dirs[4] / "prog")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)   # an entry that cannot be looked at: the child searches itself
    monkeypatch.setattr(jw, "JOB_PATH", ":".join(map(str, [loop, *dirs])))
    assert jw._first_on_path("prog", {"PATH": jw.JOB_PATH}) is None


@root
def test_path_entries_that_depend_on_the_process_mean_the_job_s(manager, tmp_path):
    (tmp_path / "prog").write_text("#!/bin/sh\necho workdir\n")
    (tmp_path / "prog").chmod(0o755)
    other = tmp_path / "other"
    other.mkdir()
    (other / "prog").write_text("#!/bin/sh\necho other\n")
    (other / "prog").chmod(0o755)
    job = manager.start("prog", env={"PATH": f"/proc/self/cwd:{other}"}, workdir=str(tmp_path))
    assert output(manager, job.id)[0] == b"workdir\n"
    wait_final(manager, job.id)


@root
def test_program_is_searched_in_the_job_s_path_as_execvp_does(manager, tmp_path):
    dirs = [tmp_path / n for n in ("missing", "plain", "notdir", "script")]
    for d in dirs[1:]:
        d.mkdir()
    (dirs[1] / "prog").write_text("#!/bin/sh\necho plain\n")   # not executable: skipped
    (dirs[2] / "prog").mkdir()                                  # a directory: skipped
    (dirs[3] / "prog").write_text("#!/bin/sh\necho found\n")
    (dirs[3] / "prog").chmod(0o755)
    path = ":".join(map(str, dirs))
    job = manager.start("prog", env={"PATH": path})
    assert output(manager, job.id)[0] == b"found\n"
    # a relative entry is relative to the job's workdir
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "prog").write_text("#!/bin/sh\necho relative\n")
    (tmp_path / "rel" / "prog").chmod(0o755)
    rel = manager.start("prog", env={"PATH": f"rel:{path}"}, workdir=str(tmp_path))
    assert output(manager, rel.id)[0] == b"relative\n"
    wait_final(manager, rel.id)
    # no entry runs it: the first error other than "not there" is the one reported
    with pytest.raises(jw.SpawnError, match="permission denied: prog"):
        manager.start("prog", env={"PATH": ":".join(map(str, dirs[:3]))})
    with pytest.raises(jw.SpawnError, match="no such file: prog"):
        manager.start("prog", env={"PATH": str(dirs[0])})
    with pytest.raises(jw.SpawnError, match="no such file: prog"):
        manager.start("prog", env={"PATH": ""})   # an empty PATH: the current directory
    wait_final(manager, job.id)
    assert manager.cgroups.leftover_job_ids() == []


@root
def test_job_gets_only_fds_0_to_2_and_devnull_stdin(manager):
    job = manager.start("ls", ["-l", "/proc/self/fd"])
    out, _, _ = output(manager, job.id)
    fds = {}
    for line in out.decode().splitlines()[1:]:
        name, _, target = line.split()[-3:]
        fds[int(name)] = target
    assert fds[0] == "/dev/null"
    assert fds[1].startswith("pipe:") and fds[2].startswith("pipe:") and fds[1] != fds[2]
    assert set(fds) == {0, 1, 2, 3} and fds[3].startswith("/proc/")   # 3: ls reading the dir


@root
def test_job_environment_is_clean_and_documented(make_manager, monkeypatch):
    monkeypatch.setenv("JOBWORKER_TEST_SECRET", "hunter2")
    m = make_manager()
    job = m.start("sh", ["-c", "env; pwd; ps -o sid= -p $$; echo $$"])
    out, _, _ = output(m, job.id)
    lines = out.decode().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert "JOBWORKER_TEST_SECRET" not in env and b"hunter2" not in out
    assert env["PATH"] == jw.JOB_PATH and env["LANG"] == jw.JOB_LANG and env["HOME"] == "/root"
    assert lines[-3] == jw.JOB_CWD
    assert lines[-2].strip() == lines[-1]   # its own session: sid == pid


@root
def test_a_root_job_sees_neither_the_state_dir_nor_hidden_files(make_manager, tmp_path):
    secret_dir, secret_file = tmp_path / "certs", tmp_path / "elsewhere.key"
    secret_dir.mkdir()
    (secret_dir / "server.key").write_text("PRIVATE")
    secret_file.write_text("PRIVATE TOO")
    m = make_manager(hide_paths=[str(secret_dir), str(secret_file)])
    other = m.start("sh", ["-c", "echo bob-secret"], owner="bob")
    wait_final(m, other.id)
    job = m.start("sh", ["-c", f"cat {secret_dir}/server.key {secret_file} "
                               f"{m.jobs_dir}/{other.id}/output.log; ls -A {secret_dir} "
                               f"{m.state_dir}; echo uid=$(id -u); "
                               f"touch {secret_dir}/x || echo read-only"], owner="alice")
    out, err, _ = output(m, job.id)
    assert b"PRIVATE" not in out and b"bob-secret" not in out, out
    assert b"uid=0" in out and b"read-only" in out       # root, and still it cannot
    assert b"No such file" in err or b"Permission denied" in err
    mountinfo = open("/proc/self/mountinfo").read()       # nothing came back to the host
    assert str(secret_dir) not in mountinfo and str(m.state_dir) not in mountinfo
    assert (secret_dir / "server.key").read_text() == "PRIVATE"


@pytest.fixture
def shared_dir():
    """A directory under /tmp that every uid may write in (sticky, as /tmp itself)."""
    import pathlib
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(prefix="jwtest-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d)


@pytest.mark.parametrize("table,problem", [
    ('{"alice": 0}', "gives 'alice' the uid 0, outside --job-uid-range 65000-65534"),
    ('{"alice": 65001, "bob": 65001}', "gives 'bob' and 'alice' the same uid 65001"),
    ('{"alice": 65534}', "gives 'alice' the uid 65534, which /etc/passwd or /etc/group has"),
    ('{"alice": "65001"}', "gives 'alice' the uid '65001', outside"),
    ('{"alice": true}', "gives 'alice' the uid True, outside"),
    ('{"": 65001}', "has an entry of no valid owner name: ''"),
    ('[]', "is not an object of owner names and uids (it is list)"),
    ('{"alice": 650', "cannot read the job uid table")])
def test_a_bad_uid_table_stops_the_server_naming_the_file_and_the_entry(table, problem,
                                                                       tmp_path):
    path = tmp_path / "uids.json"
    path.write_text(table)
    users = jw.DynamicUsers(str(path), (65000, 65534))
    with pytest.raises(jw.LocalFileError) as e:
        users.load()
    assert problem in str(e.value) and str(path) in str(e.value)


@root
def test_a_uid_is_handed_out_only_once_it_is_on_disk(tmp_path):
    # a full disk once left bob's uid in memory only: after a restart carol was given it too
    with small_tmpfs(tmp_path, size="64k") as mnt:
        users = jw.DynamicUsers(str(mnt / "uids.json"))
        alice = users.uid_of("alice")
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 4096)
        for _ in range(2):   # and not a second time either
            with pytest.raises(jw.DiskFull) as e:
                users.uid_of("bob")
            assert jw.status_code_for(e.value) == "RESOURCE_EXHAUSTED"
            assert "uids.json" in str(e.value)
        assert sorted(os.listdir(mnt)) == ["filler", "uids.json"]   # no temp file left
        assert json.loads((mnt / "uids.json").read_text()) == {"alice": alice}
        filler.unlink()
        again = jw.DynamicUsers(str(mnt / "uids.json"))   # a restart
        again.load()
        carol, bob = again.uid_of("carol"), again.uid_of("bob")
        assert len({alice, bob, carol}) == 3
        assert json.loads((mnt / "uids.json").read_text()) == {"alice": alice, "bob": bob,
                                                               "carol": carol}


@root
def test_dynamic_users_keep_owners_apart(make_manager, shared_dir):
    import pwd
    m = make_manager(job_user="dynamic", uid_range=(61184, 65519))
    alice = m.start("sh", ["-c", f"umask 077; echo secret > {shared_dir}/a.txt && "
                                 f"mkdir {shared_dir}/a.d && echo ok; sleep 600"], owner="alice")
    wait_for(lambda: m.status(alice.id).output_bytes, what="alice's files")
    assert (shared_dir / "a.txt").exists() and (shared_dir / "a.d").is_dir()
    bob = m.start("sh", ["-c", f"id -u; cat {shared_dir}/a.txt; ls {shared_dir}/a.d; "
                               f"kill -9 {alice.pid}; grep -E '^(CapEff|NoNewPrivs|Groups)' "
                               "/proc/self/status"], owner="bob")
    out, err, _ = output(m, bob.id)
    bob_uid = int(out.split()[0])
    assert b"secret" not in out and err.count(b"Permission denied") == 2, err
    assert b"Operation not permitted" in err and pid_alive(alice.pid)
    status = dict(line.split(":", 1) for line in out.decode().splitlines()[1:])
    assert status["CapEff"].strip() == "0000000000000000" and status["NoNewPrivs"].strip() == "1"
    assert status["Groups"].strip() == ""
    alice_uid = os.stat(shared_dir / "a.txt").st_uid
    assert 61184 <= alice_uid <= 65519 and 61184 <= bob_uid <= 65519 and alice_uid != bob_uid
    for uid in (alice_uid, bob_uid):
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)                                # never a uid of an account
    m.stop(alice.id, grace=0)
    m.close()
    again = make_manager(state=m.state_dir, job_user="dynamic")   # stable across restarts
    j = again.start("id", ["-u"], owner="alice")
    assert int(output(again, j.id)[0]) == alice_uid


@root
def test_job_runs_as_configured_unprivileged_user(make_manager):
    m = make_manager(job_user="nobody")
    job = m.start("sh", ["-c", "id -u; id -g; echo $HOME"])
    out, _, _ = output(m, job.id)
    import pwd
    pw = pwd.getpwnam("nobody")
    assert out.decode().split() == [str(pw.pw_uid), str(pw.pw_gid), pw.pw_dir]


@root
def test_an_unprivileged_job_s_workdir_is_checked_as_its_user(make_manager, tmp_path):
    # checked by root, "Not a directory" against "No such file" told a job owner what exists
    # in directories its jobs cannot read
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "file").write_text("x")
    m = make_manager(job_user="nobody")
    said = []
    for path in (secret / "file", secret / "missing", secret):
        with pytest.raises(jw.InvalidArgument) as e:
            m.start("true", workdir=str(path))
        said.append(str(e.value).replace(str(path), "PATH"))
    assert len(set(said)) == 1 and "Permission denied (as the job's user)" in said[0], said
    assert m.list() == [] and m.cgroups.leftover_job_ids() == []


def _low_nofile_and_blocked_term():
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


@root
def test_serve_starts_clean_of_its_parent_s_signals_and_jobs_get_its_first_limits(pki,
                                                                                  tmp_path):
    # A wrapper that blocked SIGTERM made the server unstoppable; jobs were given the
    # open-files limit the server had raised for itself (to fs.nr_open where it could).
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for extra, expected in [((), f"1024 {hard}"), (("--job-nofile", "512"), "512 512")]:
        server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/nofile",
                              extra=extra, preexec=_low_nofile_and_blocked_term)
        try:
            r = cli(SRC, "run", "--", "sh", "-c", "echo $(ulimit -Sn) $(ulimit -Hn); exit 3",
                    certs=pki, port=server.port)
            assert r.returncode == 3 and r.stdout.decode().strip() == expected, r
        finally:
            assert server.stop(timeout=30) == 0


@root
def test_signals_ignored_by_the_server_are_default_in_the_job(tmp_path):
    # Python ignores SIGPIPE, and GNU make runs its recipes with signal 32 ignored (glibc
    # reserves it, so Python cannot reset it); a job must inherit neither.
    code = ("import signal, sys; sys.path.insert(0, %r); import ctypes, jobworker as jw\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "act = (ctypes.c_ulong * 4)(1, 0, 0, 0)\n"   # SIG_IGN for signal 32, as make does
            "ctypes.CDLL(None).syscall(jw._SYS_RT_SIGACTION[__import__('os').uname().machine], "
            "32, ctypes.byref(act), None, 8)\n"
            "m = jw.JobManager(%r, jw.detect_cgroups(%r)).open()\n"
            "j = m.start('grep', ['-E', '^SigIgn', '/proc/self/status'])\n"
            "print(b''.join(c.data for c in m.follow(j.id)).decode(), end='')\n"
            "m.close(); m.cgroups.remove_parent()\n") % (
        os.path.dirname(jw.__file__), str(tmp_path / "state"), f"{RUN_PARENT}/sig")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["SigIgn:", "0000000000000000"]


# The launcher protocol as this build speaks it. A change to its ops or to what a spawn
# request carries must bump LAUNCHER_PROTOCOL (a server refuses a launcher of another
# version, so jobs are never handed to a peer that misreads them): then record it here.
# A spawn request's field that a launcher of the same version may ignore (SpawnRequest's
# IGNORABLE) needs no bump, and is recorded in the second table; each has a test that a
# launcher ignoring it serves right.
LAUNCHER_PROTOCOLS = {
    2: ("hello spawn take_over forget ping bye | job ready spawned out eof exit pong | "
        "job dir cap argv env cwd procs hide empty_file nofile uid gid seq"),
    3: ("hello spawn take_over forget close_input ping bye | job ready spawned out eof exit "
        "pong | job dir cap argv env cwd procs hide empty_file nofile uid gid stdio seq"),
}
LAUNCHER_IGNORABLE = {
    3: "into",   # test_child_is_in_every_job_cgroup_before_exec
}


def test_the_launcher_protocol_changes_only_with_its_version():
    ignorable = jw.SpawnRequest.IGNORABLE
    spoken = " | ".join([" ".join(jw.SERVER_OPS), " ".join(jw.LAUNCHER_OPS),
                         " ".join(f.name for f in dataclasses.fields(jw.SpawnRequest)
                                  if f.name not in ignorable)])
    assert LAUNCHER_PROTOCOLS.get(jw.LAUNCHER_PROTOCOL) == spoken, \
        "the launcher protocol changed: bump LAUNCHER_PROTOCOL and record it here"
    assert LAUNCHER_IGNORABLE.get(jw.LAUNCHER_PROTOCOL, "") == " ".join(ignorable), \
        "a field a launcher may ignore was added: record it here, with its test"
    assert all(f.default == "" for f in dataclasses.fields(jw.SpawnRequest)
               if f.name in ignorable)   # (absent: what an older server sends)
    req = jw.SpawnRequest(job="j", dir="/d", cap=1, argv=["p", "x"], env={"A": "b"}, cwd="/",
                          procs=["/p"], nofile=[5, 6], uid=7, gid=8, seq=9)
    message = json.loads(json.dumps(req.encode()))   # as it crosses the socket
    assert message["op"] == jw.OP_SPAWN and jw.SpawnRequest.decode(message) == req
    handled = jw.LauncherProcess("/nonexistent", False).ops
    assert set(handled) == set(jw.SERVER_OPS)
    assert set(jw.LauncherClient("/nonexistent", None).ops) | {jw.OP_JOB, jw.OP_READY} == \
        set(jw.LAUNCHER_OPS)


# ================================================================================================
# Jobs
# ================================================================================================


# -- the manager's logic on FakeCgroups (no root, no cgroup kernel code) -----------------------

def test_a_cgroup_that_cannot_be_joined_fails_start_leaving_nothing(fake_manager, monkeypatch):
    m = fake_manager()
    record = FakeCgroup.set_limits

    def vanish(self, limits, devices):   # one of its cgroups goes before the launcher opens it
        record(self, limits, devices)
        self.procs_files = (self.procs_files[0], f"{self.procs_files[0]}.gone")
    monkeypatch.setattr(FakeCgroup, "set_limits", vanish)
    launcher_fds = lambda: len(os.listdir(f"/proc/{m.supervisor.launcher.pid}/fd"))
    before = launcher_fds()
    for _ in range(3):
        with pytest.raises(jw.SpawnError) as e:
            m.start("true")
        assert (e.value.stage, e.value.errno) == ("cgroup", errno.ENOENT)
    assert m.list() == [] and os.listdir(m.jobs_dir) == []
    assert launcher_fds() == before   # what it opened for those spawns it closed
    monkeypatch.setattr(FakeCgroup, "set_limits", record)
    assert wait_final(m, m.start("true").id).exit_code == 0   # the launcher is fine


@pytest.mark.parametrize("stdin", [jw.STDIN_NULL, jw.STDIN_PIPE])
def test_a_job_whose_end_is_finished_before_its_start_returns_keeps_no_fd(fake_manager,
                                                                          monkeypatch, stdin):
    # On a busy host the launcher's word that a quick job has ended, and the finisher's work
    # on it, can come before the Start's thread is given the spawn's reply: the pidfd and
    # pipes it then holds must not outlive the job.
    m = fake_manager()
    wait_final(m, m.start("true", stdin=stdin).id)   # (threads and pools made, their fds too)
    finished, close_fds, running = threading.Event(), jw.Job.close_fds, jw.Job.running

    def closed_and_said(job):
        close_fds(job)
        finished.set()

    def running_once_its_end_is_finished(job, pid, pidfd, fds):
        assert finished.wait(30), "the job's end was not finished"
        running(job, pid, pidfd, fds)
    monkeypatch.setattr(jw.Job, "close_fds", closed_and_said)
    monkeypatch.setattr(jw.Job, "running", running_once_its_end_is_finished)
    before = sorted(os.listdir("/proc/self/fd"))
    status = m.start("true", stdin=stdin)
    assert wait_final(m, status.id).exit_code == 0
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_states_and_exit_status_without_the_kernel(fake_manager):
    m = fake_manager()
    a = m.start("sh", ["-c", "echo out; exit 3"])
    b = m.start("sh", ["-c", "kill -9 $$"])
    c = m.start("sh", ["-c", "trap 'exit 7' TERM; echo set; while :; do sleep 0.05; done"])
    sa, sb = wait_final(m, a.id), wait_final(m, b.id)
    assert (sa.state, sa.exit_code, sa.signal, sa.output_bytes) == (jw.EXITED, 3, None, 4)
    assert (sb.state, sb.exit_code, sb.signal) == (jw.EXITED, None, signal.SIGKILL)
    wait_for(lambda: m.status(c.id).output_bytes > 0, what="the trap to be set")
    sc = m.stop(c.id, grace=5)
    assert (sc.state, sc.exit_code, sc.signal) == (jw.STOPPED, 7, None)
    assert m.cgroups.job(a.id).limits.pids == jw.DEFAULT_PIDS_LIMIT
    with pytest.raises(jw.JobNotRunning):
        m.stop(a.id)
    assert m.cgroups.leftover_job_ids() == []


def test_concurrent_stops_share_one_transition_without_the_kernel(fake_manager):
    from concurrent.futures import ThreadPoolExecutor
    m = fake_manager()
    job = m.start("sh", ["-c", "trap '' TERM; echo ready; sleep 600"])
    wait_for(lambda: m.status(job.id).output_bytes, what="the trap set (the job said ready)")
    with ThreadPoolExecutor(10) as pool:
        finals = list(pool.map(lambda _: m.stop(job.id, grace=0.3), range(10)))
    assert {(s.state, s.signal) for s in finals} == {(jw.STOPPED, signal.SIGKILL)}
    assert len({s.ended_at for s in finals}) == 1


def test_restart_keeps_records_and_marks_running_jobs_lost_without_the_kernel(fake_manager):
    m = fake_manager()
    done = m.start("sh", ["-c", "printf 'a\\0'; printf b >&2; exit 4"], owner="alice")
    before = wait_final(m, done.id)
    stopped = m.start("sleep", ["600"])
    m.stop(stopped.id, grace=0)
    running = m.start("sleep", ["600"])
    crash(m)
    assert pid_alive(running.pid)
    m2 = fake_manager()
    assert m2.status(done.id, owner="alice") == before
    assert m2.status(stopped.id).state == jw.STOPPED
    lost = m2.status(running.id)
    assert lost.state == jw.LOST and lost.ended_at >= lost.started_at
    assert not pid_alive(running.pid)
    with pytest.raises(jw.JobNotFound):
        m2.status(done.id, owner="bob")


def crash_leaving_the_launcher(m):
    """As if the server process were killed while its launcher lives on (live restore)."""
    m.queue.stop()
    m._engine.stop()
    m._finisher.shutdown()
    m.supervisor.launcher.detach()
    m._closed = True


def test_a_start_that_never_reached_the_launcher_ends_failed_not_lost(fake_manager,
                                                                      monkeypatch):
    # a server killed during a burst of Starts: jobs that never ran were listed `lost`,
    # "the server and its launcher stopped while it ran", though the launcher never stopped
    m = fake_manager()
    ran = m.start("sleep", ["600"])
    gate = threading.Event()

    def never_sent(req, fds):
        gate.wait()
        raise jw.LauncherError("the test let it go")
    monkeypatch.setattr(m.supervisor.launcher, "spawn", never_sent)
    def start():
        with contextlib.suppress(jw.JobworkerError):
            m.start("true")
    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    jobs_dir = m.store.jobs_dir
    wait_for(lambda: len(os.listdir(jobs_dir)) == 2, what="the second job's record")
    crash_leaving_the_launcher(m)   # (its Start stays where it was: nothing of it runs on)
    m2 = fake_manager()
    never = next(s for s in m2.list() if s.id != ran.id)
    assert (never.state, never.failure) == (jw.FAILED, "the server stopped before the job was "
                                                       "started")
    assert never.lost_reason == "" and never.pid is None and never.ended_at >= never.started_at
    assert m2.status(ran.id).state == jw.RUNNING   # adopted: it runs on
    m2.stop(ran.id, grace=0)
    gate.set()
    starting.join()


def test_records_of_the_wrong_shape_are_quarantined_once_and_the_rest_serves(fake_manager,
                                                                             caplog):
    m = fake_manager()
    good = m.start("sh", ["-c", "echo hi"])
    final = wait_final(m, good.id)
    m.close()
    record = json.loads((pathlib.Path(m.store.job_dir(good.id)) / "job.json").read_text())
    bad = {"[]": [], "null": None, "a string": "x", "limits": dict(record, limits="x"),
           "ended_at": dict(record, ended_at=None), "started_at": dict(record, started_at="now"),
           "command": dict(record, command=5), "exit_code": dict(record, exit_code="0"),
           "pid": dict(record, state="running", pid="1", ended_at=None)}
    ids = {}
    for what, data in bad.items():
        job_id = str(uuid.uuid4())
        d = pathlib.Path(m.store.job_dir(job_id))
        d.mkdir()
        if isinstance(data, dict):
            data = dict(data, id=job_id)
        (d / "job.json").write_text(json.dumps(data))
        (d / "output.log").write_text("")
        (d / "output.idx").write_text("")
        ids[what] = job_id
    half = str(uuid.uuid4())   # a removal cut short: the record stayed, the output went
    (pathlib.Path(m.store.job_dir(half))).mkdir()
    (pathlib.Path(m.store.job_dir(half)) / "job.json").write_text(
        json.dumps(dict(record, id=half, output_bytes=3)))
    caplog.set_level("WARNING", logger="jobworker")
    m2 = fake_manager()
    assert [s.id for s in m2.list()] == [good.id] and m2.status(good.id) == final
    assert b"".join(c.data for c in m2.follow(good.id)) == b"hi\n"
    named = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(named) == len(bad) and all(any(i in n for n in named) for i in ids.values())
    quarantine = pathlib.Path(m2.state_dir) / "quarantine"
    assert sorted(os.listdir(quarantine)) == sorted(ids.values())
    with pytest.raises(jw.JobNotFound):
        m2.status(half)
    assert not os.path.exists(m2.store.job_dir(half))
    m2.close()
    caplog.clear()
    m3 = fake_manager()   # named once: nothing of them is read again
    assert not [r for r in caplog.records if "cannot read" in r.getMessage()]
    assert [s.id for s in m3.list()] == [good.id]


def test_a_removal_cut_short_never_leaves_a_record_without_its_files(tmp_path, monkeypatch):
    store = jw.JobStore(str(tmp_path))
    store.open()
    job_id = str(uuid.uuid4())
    d = pathlib.Path(store.create(job_id))
    for name in ("output.log", "output.idx", "job.json"):
        (d / name).write_text("x")
    unlink, calls = os.unlink, []

    def dies_after_one(path):
        if calls:
            raise KeyboardInterrupt   # as a kill -9 between the two
        calls.append(path)
        unlink(path)
    monkeypatch.setattr(os, "unlink", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        store.discard(job_id)
    monkeypatch.setattr(os, "unlink", unlink)
    assert calls == [str(d / "job.json")]
    assert store.load() == [] and not d.exists()   # finished off at start


@root
def test_exit_code_and_signal_are_reported_without_guessing(manager):
    a = manager.start("sh", ["-c", "exit 3"])
    b = manager.start("sh", ["-c", "kill -9 $$"])
    c = manager.start("sh", ["-c", "exit 137"])
    sa, sb, sc = (wait_final(manager, j.id) for j in (a, b, c))
    assert (sa.state, sa.exit_code, sa.signal) == (jw.EXITED, 3, None)
    assert (sb.state, sb.exit_code, sb.signal, sb.oom_killed) == (jw.EXITED, None, 9, False)
    assert (sc.exit_code, sc.oom_killed) == (137, False)
    assert sa.ended_at >= sa.started_at


@root
def test_cpu_quota_holds_near_half_a_cpu(manager):
    job = manager.start("sh", ["-c", "while :; do :; done"], jw.parse_limits(cpu="50%"))
    time.sleep(0.5)
    share = cpu_share(manager, job.id, 3)
    manager.stop(job.id, grace=0)
    assert 0.35 <= share <= 0.65, share


@root
def test_cpu_hogs_side_by_side_each_get_their_share(manager):
    a = manager.start("sh", ["-c", "while :; do :; done"], jw.parse_limits(cpu="20%"))
    b = manager.start("sh", ["-c", "while :; do :; done"], jw.parse_limits(cpu="60%"))
    time.sleep(0.5)
    before = [manager.status(j.id).usage["cpu_seconds"] for j in (a, b)]
    t0 = time.monotonic()
    time.sleep(3)
    after = [manager.status(j.id).usage["cpu_seconds"] for j in (a, b)]
    elapsed = time.monotonic() - t0
    for j in (a, b):
        manager.stop(j.id, grace=0)
    share_a, share_b = ((x - y) / elapsed for x, y in zip(after, before))
    assert 0.10 <= share_a <= 0.30, share_a
    assert 0.40 <= share_b <= 0.75, share_b


@root
def test_memory_limit_oom_is_read_from_the_kernel_and_neighbour_survives(manager):
    neighbour = manager.start("sleep", ["60"], jw.parse_limits(memory="64M"))
    hog = manager.start(PY, ["-c", "b = bytearray(200 << 20)\n"
                                   "for i in range(0, len(b), 4096): b[i] = 1\n"],
                        jw.parse_limits(memory="64M"))
    s = wait_final(manager, hog.id)
    assert s.oom_killed and s.signal == signal.SIGKILL
    assert s.usage["memory_peak_bytes"] <= (64 << 20) + (1 << 20)
    assert manager.status(neighbour.id).state == jw.RUNNING
    assert not manager.status(neighbour.id).oom_killed
    manager.stop(neighbour.id, grace=0)


@root
def test_pids_limit_stops_a_fork_bomb(manager):
    job = manager.start("sh", ["-c", "i=0; while [ $i -lt 200 ]; do sleep 600 & i=$((i+1)); done; "
                                     "echo started; wait"], jw.Limits(pids=30))
    cg = manager.cgroups.job(job.id)
    most = 0
    while manager.status(job.id).state == jw.RUNNING and most < 30:
        most = max(most, len(cg.pids()))
    time.sleep(0.3)
    most = max(most, len(cg.pids()))
    assert most <= 30
    try:   # dash gives up once fork fails; the leftovers are killed with it
        manager.stop(job.id, grace=0)
    except jw.JobNotRunning:
        pass
    _, err, _ = output(manager, job.id)
    assert b"fork" in err.lower()
    assert manager.cgroups.leftover_job_ids() == []


@root
def test_disk_io_limit_throttles_direct_writes(manager, tmp_path):
    target = tmp_path / "io-test"
    job = manager.start("dd", ["if=/dev/zero", f"of={target}", "bs=1M", "count=20", "oflag=direct"],
                        jw.parse_limits(disk_io="10MB/s"))
    s = wait_final(manager, job.id, timeout=60)
    took = s.ended_at - s.started_at
    assert s.exit_code == 0, output(manager, job.id)[1]
    assert 1.5 <= took <= 12, took   # 20 MiB at 10 MB/s is about 2.1 s
    assert s.usage["io_write_bytes"] >= 20 << 20


@root
def test_stop_kills_a_setsid_double_forked_daemon(manager):
    job = manager.start("sh", ["-c", "setsid sh -c 'sleep 600 & echo $!' ; sleep 600"])
    out = wait_for(lambda: b"".join(c.data for c in itertools.islice(manager.follow(job.id), 1)),
                   what="the daemon's pid")
    daemon = int(out.split()[0])
    assert pid_alive(daemon)
    final = manager.stop(job.id, grace=2)
    assert final.state == jw.STOPPED
    assert not pid_alive(daemon)
    assert manager.cgroups.job(job.id).pids() == set()
    assert manager.cgroups.leftover_job_ids() == []


@root
def test_stop_escalates_to_sigkill_for_a_sigterm_ignoring_job(manager):
    job = manager.start("sh", ["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
    wait_for(lambda: manager.status(job.id).output_bytes > 0, what="the trap")
    t0 = time.monotonic()
    final = manager.stop(job.id, grace=0.5)
    took = time.monotonic() - t0
    assert final.state == jw.STOPPED and final.signal == signal.SIGKILL
    assert took >= 0.5
    with pytest.raises(jw.JobNotRunning):
        manager.stop(job.id)


@root
def test_stop_sends_sigterm_first(manager):
    job = manager.start("sh", ["-c", "trap 'echo got TERM; exit 7' TERM; echo ready; "
                                     "while :; do sleep 0.1; done"])
    wait_for(lambda: manager.status(job.id).output_bytes > 0, what="the trap")
    final = manager.stop(job.id, grace=10)
    assert (final.state, final.exit_code) == (jw.STOPPED, 7)
    assert b"got TERM" in output(manager, job.id)[0]


@root
def test_leftovers_are_killed_when_the_main_process_exits(manager):
    job = manager.start("sh", ["-c", "setsid sleep 600 & echo $!"])
    s = wait_final(manager, job.id)
    out, _, _ = output(manager, job.id)
    assert s.state == jw.EXITED and s.exit_code == 0
    assert not pid_alive(int(out))
    assert manager.cgroups.leftover_job_ids() == []


@root
def test_sub_cgroups_made_by_the_job_are_removed(manager):
    script = ("d=/sys/fs/cgroup/pids$(grep ':pids:' /proc/self/cgroup | cut -d: -f3); "
              "mkdir $d/sub && sh -c \"echo \\$\\$ > $d/sub/cgroup.procs; exec sleep 600\" & "
              "sleep 0.3; echo $d")
    job = manager.start("sh", ["-c", script])
    s = wait_final(manager, job.id)
    path = output(manager, job.id)[0].decode().strip()
    assert s.state == jw.EXITED and path.endswith(job.id)
    assert not os.path.exists(path)
    assert manager.cgroups.leftover_job_ids() == []


def test_populated_is_what_cgroup_events_says(tmp_path):
    v2 = jw.CgroupV2(str(tmp_path / "job"))
    assert not v2.populated()   # no such cgroup (any more): nothing in it
    os.mkdir(v2.path)
    for text, expected in [("populated 1\nfrozen 0\n", True), ("populated 0\nfrozen 0\n", False)]:
        (tmp_path / "job" / "cgroup.events").write_text(text)
        assert v2.populated() is expected
        hybrid = jw.CgroupV1({"pids": str(tmp_path / "nowhere")}, unified=v2.path)
        assert hybrid.populated() is expected   # the unified dir says it, not cgroup.procs


@root
def test_populated_counts_a_process_moved_into_a_sub_cgroup(manager):
    job = manager.start("sleep", ["600"])
    cg = manager.cgroups.job(job.id)
    d = getattr(cg, "unified", None) or cg.path   # where cgroup.events is
    os.mkdir(f"{d}/sub")
    with open(f"{d}/sub/cgroup.procs", "w") as f:
        f.write(str(job.pid))
    with open(f"{d}/cgroup.procs") as f:
        assert f.read() == ""   # nothing in the job's own cgroup, yet
    assert cg.populated()
    assert manager.stop(job.id, grace=0).state == jw.STOPPED
    assert not pid_alive(job.pid) and manager.cgroups.leftover_job_ids() == []


@root
def test_populated_says_whether_any_process_is_in_the_job_or_below(manager):
    job = manager.start("sh", ["-c", "sleep 600 & wait"])
    cg = manager.cgroups.job(job.id)
    assert cg.populated() and cg.pids()
    manager.stop(job.id, grace=0)
    assert not cg.populated() and not cg.pids()   # stopped, and its cgroups removed
    assert not jw.Cgroup.populated(cg)            # the generic way agrees


@root
def test_concurrent_stops_make_one_transition(manager):
    job = manager.start("sleep", ["600"])
    results, errors = [], []

    def stop():
        try:
            results.append(manager.stop(job.id, grace=1).state)
        except jw.JobNotRunning as e:
            errors.append(e)

    threads = [threading.Thread(target=stop) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) + len(errors) == 10 and results
    assert set(results) == {jw.STOPPED}
    assert manager.status(job.id).state == jw.STOPPED


@root
def test_stop_racing_a_natural_exit_gives_only_the_documented_outcomes(manager):
    """Stop while the finisher removes the cgroup: a final status or JobNotRunning, no other error."""
    outcomes = set()
    for i in range(300):
        job = manager.start("sh", ["-c", f"exit {i % 2}"])
        try:
            outcomes.add(manager.stop(job.id, grace=0).state)
        except jw.JobNotRunning:
            outcomes.add("not running")
    assert outcomes <= {jw.STOPPED, jw.EXITED, "not running"}
    assert manager.cgroups.leftover_job_ids() == []


COUNTER = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done"


def numbers(data):
    """The integers of a counter job's output lines."""
    return [int(x) for x in data.split()]


@root
def test_list_filters_by_owner_and_status_hides_foreign_jobs(manager):
    a = manager.start("true", owner="alice")
    b = manager.start("true", owner="bob")
    assert [s.id for s in manager.list("alice")] == [a.id]
    assert {s.id for s in manager.list()} == {a.id, b.id}
    with pytest.raises(jw.JobNotFound):
        manager.status(b.id, owner="alice")
    with pytest.raises(jw.JobNotFound):
        manager.follow(b.id, owner="alice")
    with pytest.raises(jw.JobNotFound):
        manager.stop(b.id, owner="alice")


# -- retention, Remove and the List walk (FakeCgroups: no root) --------------------------------

def finished_records(state, n, start=1_000_000.0, owners=("alice", "bob"), argv_bytes=0):
    """Write n finished job records straight into a state dir (as a server that ran n jobs
    would have left them); returns their ids, oldest first."""
    store = jw.JobStore(str(state))
    store.open()
    ids = []
    for i in range(n):
        job_id = str(__import__("uuid").uuid4())
        store.create(job_id)
        for name in ("output.log", "output.idx"):   # as the launcher makes them
            open(f"{store.job_dir(job_id)}/{name}", "wb").close()
        store.save(jw.JobStatus(id=job_id, owner=owners[i % len(owners)],
                                command=["true", "x" * argv_bytes] if argv_bytes else ["true"],
                                limits=jw.Limits(), state=[jw.EXITED, jw.STOPPED, jw.LOST][i % 3],
                                exit_code=0, started_at=start + i, ended_at=start + i + 0.5))
        ids.append(job_id)
    return ids


class Clock:
    """An injected clock a test moves by hand."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def test_a_walk_of_2000_jobs_lists_each_once_while_jobs_come_and_go(fake_manager, tmp_path):
    n, size = 2_000, 50   # 40 pages
    ids = finished_records(tmp_path / "state", n)
    m = fake_manager(keep_finished=100_000, keep_for=None)
    assert [s.id for s in m.table.walk()] == ids
    # a page walk while jobs are added and removed, ahead and behind it
    seen, after, removed, added, page_no = [], None, set(), [], 0
    while True:
        page = list(itertools.islice(m.table.walk(after=after), size))
        if not page:
            break
        page_no += 1
        seen += [s.id for s in page]
        after = page[-1].order_key
        for k in (size * page_no + 2 * size, size * page_no - 1):   # one ahead, one seen
            if k < len(ids) and ids[k] not in removed:
                m.remove(ids[k])
                removed.add(ids[k])
        if page_no <= 30:   # new jobs join the walk's end (a walk with no end would never stop)
            added.append(m.start("true").id)
    assert len(seen) == len(set(seen))                         # none twice
    ahead = {ids[size * p + 2 * size] for p in range(1, page_no + 1)
             if size * p + 2 * size < len(ids)}
    assert set(ids) - ahead <= set(seen) and not ahead & set(seen)   # none skipped that stayed
    assert set(added) <= set(seen)
    newest = [s.id for s in itertools.islice(m.table.walk(newest_first=True), 3)]
    assert newest == [s.id for s in m.list()][::-1][:3]
    assert {s.id for s in m.table.walk(owner="alice", states={jw.STOPPED})} == \
        {ids[i] for i in range(n) if i % 2 == 0 and i % 3 == 1} - removed


def test_retention_by_count_and_age_at_runtime_and_at_start(fake_manager, tmp_path):
    clock = Clock(1_000_000.0)
    ids = finished_records(tmp_path / "state", 10, start=clock.now - 100)
    m = fake_manager(keep_finished=6, keep_for=3600, clock=clock)   # at start: by count
    assert [s.id for s in m.list()] == ids[4:]
    assert sorted(os.listdir(m.jobs_dir)) == sorted(ids[4:])
    running = m.start("sleep", ["600"])
    clock.now += 1
    a = m.start("true")
    wait_final(m, a.id)                                   # at runtime, when a job ends
    assert [s.id for s in m.list()] == ids[5:] + [running.id, a.id]
    clock.now += 3600 - 51                                # the old records pass keep_for
    assert m.apply_retention() == ids[5:]
    assert [s.id for s in m.list()] == [running.id, a.id]
    clock.now += 10 * 86400                               # running jobs are never removed
    assert m.apply_retention() == [a.id]
    assert [s.id for s in m.list()] == [running.id]
    assert sorted(os.listdir(m.jobs_dir)) == [running.id]
    m.stop(running.id, grace=0)
    m.close()
    again = fake_manager(keep_finished=0, keep_for=None)  # a restart with tighter rules
    assert again.list() == [] and os.listdir(again.jobs_dir) == []


def test_remove_deletes_a_finished_job_and_refuses_a_running_one(fake_manager, tmp_path):
    m = fake_manager()
    done = m.start("sh", ["-c", "echo out; echo err >&2"], owner="alice")
    wait_final(m, done.id)
    running = m.start("sleep", ["600"], owner="alice")
    with pytest.raises(jw.JobRunning, match="stop it first"):
        m.remove(running.id)
    with pytest.raises(jw.JobNotFound):
        m.remove(done.id, owner="bob")
    m.remove(done.id, owner="alice")
    assert not os.path.exists(f"{m.jobs_dir}/{done.id}")
    for call in (m.status, m.follow, m.remove, m.stop):
        with pytest.raises(jw.JobNotFound):
            call(done.id)
    m.stop(running.id, grace=0)
    m.remove(running.id)
    m.close()
    assert fake_manager().list() == []


def test_a_follower_of_a_removed_job_still_gets_all_of_it(fake_manager):
    m = fake_manager()
    job = m.start("head", ["-c", "3000000", "/dev/zero"])
    wait_final(m, job.id)
    follows = [m.follow(job.id, max_chunk=1 << 16) for _ in range(5)]
    iters = [iter(f) for f in follows]
    firsts = [next(it) for it in iters]           # each has begun reading
    m.remove(job.id)
    assert not os.path.exists(f"{m.jobs_dir}/{job.id}")
    for f, it, first in zip(follows, iters, firsts):
        data = first.data + b"".join(c.data for c in it)
        assert data == b"\0" * 3_000_000
        assert f.final_status().state == jw.EXITED and f.final_status().output_bytes == 3_000_000
    with pytest.raises(jw.JobNotFound):
        m.status(job.id)


@root
def test_usage_is_live_and_kept_after_the_end(manager):
    job = manager.start(PY, ["-c", "b = bytearray(30 << 20)\n"
                                   "for i in range(0, len(b), 4096): b[i] = 1\n"
                                   "import time; t = time.time()\n"
                                   "while time.time() - t < 0.5: pass\n"
                                   "print('ok', flush=True)\n"
                                   "time.sleep(60)\n"])
    wait_for(lambda: manager.status(job.id).output_bytes > 0, what="the job to print")
    live = manager.status(job.id).usage
    assert live["memory_bytes"] >= 30 << 20 and live["cpu_seconds"] > 0.3 and live["tasks"] == 1
    final = manager.stop(job.id, grace=0)
    assert final.usage["memory_peak_bytes"] >= 30 << 20 and final.usage["cpu_seconds"] > 0.3


@root
def test_records_and_output_survive_a_restart(make_manager, tmp_path):
    driver = jw.detect_cgroups(f"{RUN_PARENT}/t{next(_counter)}")
    m = jw.JobManager(str(tmp_path / "state"), driver).open()
    job = m.start("sh", ["-c", "printf 'one\\0'; printf two >&2"], owner="alice")
    out, err, chunks = output(m, job.id)
    running = m.start("sleep", ["600"])
    pid = running.pid
    crash(m)
    assert pid_alive(pid)
    m2 = make_manager(state=tmp_path / "state", cgroups=driver)
    s = m2.status(job.id, owner="alice")
    assert (s.state, s.exit_code, s.command) == (jw.EXITED, 0, ["sh", "-c", job.command[2]])
    again = list(m2.follow(job.id))
    assert [(c.stream, c.offset, c.data) for c in again] == \
        [(c.stream, c.offset, c.data) for c in chunks]
    lost = m2.status(running.id)
    assert lost.state == jw.LOST
    wait_for(lambda: not pid_alive(pid), what="the lost job's process to be killed")
    assert driver.leftover_job_ids() == []


@root
def test_unreadable_records_are_skipped_at_start(make_manager, tmp_path):
    jobs = tmp_path / "state" / "jobs"
    for job_id, text in [("6f9619ff-8b86-4011-b42d-00c04fc964ff", "{not json"),
                         ("7f9619ff-8b86-4011-b42d-00c04fc964ff",
                          '{"id": "7f9619ff-8b86-4011-b42d-00c04fc964ff", "owner": "", '
                          '"command": ["x"], "limits": {}, "state": "exploded"}')]:
        (jobs / job_id).mkdir(parents=True)
        (jobs / job_id / "job.json").write_text(text)
    m = make_manager()
    assert m.list() == []
    assert m.start("true").state == jw.RUNNING


@root
@slow
def test_many_jobs_leak_nothing(manager):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    for _ in range(10):   # warm up lazily created threads and fds
        output(manager, manager.start("true").id)
    base_fds, base_threads = fds(), threading.active_count()
    for i in range(200):
        kind = i % 4
        if kind == 0:
            output(manager, manager.start("echo", [str(i)]).id)
        elif kind == 1:
            manager.stop(manager.start("sleep", ["600"]).id, grace=0)
        elif kind == 2:
            with pytest.raises(jw.SpawnError):
                manager.start("/nonexistent")
        else:
            output(manager, manager.start("sh", ["-c", "setsid sleep 600 & exit 1"]).id)
    time.sleep(0.2)
    assert fds() <= base_fds + 2
    assert threading.active_count() <= base_threads + 2
    assert manager.cgroups.leftover_job_ids() == []
    assert zombies_of(manager.supervisor.launcher.process.pid) == []
    assert all(s.state in jw.FINAL_STATES for s in manager.list())


# ================================================================================================
# Auth (real server on a free loopback port, real certificates from the certs code)
# ================================================================================================


grpc = pb = pb_grpc = SC = None   # set by the rpc fixture: importing this file needs neither


@pytest.fixture(scope="session")
def rpc():
    """grpc and the generated modules (from `make stubs`), loaded on first use."""
    global grpc, pb, pb_grpc, SC
    grpc = jw._grpc()
    pb, pb_grpc = jw._pb()
    SC = grpc.StatusCode
METHODS = ["Start", "Stop", "Query", "Stream", "List", "Remove"]


@pytest.fixture(scope="session")
def pki(rpc, tmp_path_factory):
    """A CA with server and client certificates of every kind the tests need."""
    d = tmp_path_factory.mktemp("pki")
    jw.certs_init(str(d))
    for name, role in [("reader", "reader"), ("alice", "writer"), ("bob", "writer"),
                       ("admin", "admin"), ("client", "writer")]:
        jw.certs_issue(str(d), name, [role])
    ca_key, ca_cert = jw._load_ca(str(d))
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    odd = {
        "norole": dict(roles=None),
        "malformed": dict(role_der=b"\x30\x05\x0c\x09admin"),
        "unknownrole": dict(role_der=jw.encode_roles(["root"])),
        "noeku": dict(roles=["admin"], client_auth=False),
        "expired": dict(roles=["admin"], not_before=now - 10 * day, not_after=now - day),
        "notyet": dict(roles=["admin"], not_before=now + day, not_after=now + 10 * day),
    }
    for name, kw in odd.items():
        key, cert = jw.make_leaf(ca_key, ca_cert, name, **kw)
        jw._write_secret(str(d / f"{name}.key"), jw._pem_key(key))
        jw._write_public(str(d / f"{name}.crt"), jw._pem_cert(cert))
    other_key, other_cert = jw.make_ca("someone else's CA")
    key, cert = jw.make_leaf(other_key, other_cert, "foreign", roles=["admin"])
    jw._write_secret(str(d / "foreign.key"), jw._pem_key(key))
    jw._write_public(str(d / "foreign.crt"), jw._pem_cert(cert))
    return d


@contextlib.contextmanager
def running_server(pki, tmp_path, **kw):
    manager_kw = {k: kw.pop(k) for k in ("max_jobs", "max_jobs_per_owner", "grace", "observer",
                                         "max_queued", "max_queued_per_owner") if k in kw}
    kw["limits"] = jw.ServerLimits(**{f.name: kw.pop(f.name)
                                      for f in dataclasses.fields(jw.ServerLimits)
                                      if f.name in kw})
    driver = jw.detect_cgroups(f"{RUN_PARENT}/t{next(_counter)}")
    m = jw.JobManager(str(tmp_path / "state"), driver, **manager_kw).open()
    try:
        with jw.serve_grpc(m, "127.0.0.1:0", ca=str(pki / "ca.crt"), cert=str(pki / "server.crt"),
                           key=str(pki / "server.key"), **kw) as port:
            yield m, port
    finally:
        m.close(grace=0)
        driver.remove_parent()


@pytest.fixture(scope="module")
def api(pki, tmp_path_factory):
    with running_server(pki, tmp_path_factory.mktemp("api")) as (m, port):
        yield m, port


class Peer:
    """A client with one identity's certificate."""

    def __init__(self, pki, port, name, ca=None):
        read = lambda p: open(p, "rb").read()
        creds = grpc.ssl_channel_credentials(read(ca or pki / "ca.crt"), read(pki / f"{name}.key"),
                                             read(pki / f"{name}.crt"))
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
        self.stub = pb_grpc.JobServiceStub(self.channel)

    def start(self, *argv, **resources):
        return self.stub.Start(pb.StartRequest(name=argv[0], args=argv[1:],
                                               resources=pb.ResourceConfig(**resources)),
                               timeout=30).job_id

    def stream_some(self, job_id, text):
        """Whether `text` is in the job's output so far (read up to its size now)."""
        size = self.stub.Query(pb.QueryRequest(job_id=job_id), timeout=10).status.output_bytes
        got, call = b"", self.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=10)
        try:
            for msg in call if size else ():
                got += msg.chunk.data if msg.HasField("chunk") else b""
                if len(got) >= size or msg.HasField("final_status"):
                    break
        finally:
            call.cancel()
        return text in got

    def stream(self, job_id, offset=0):
        """(stdout, stderr, final status) of a whole stream."""
        out, err, final = b"", b"", None
        for msg in self.stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset), timeout=60):
            if msg.HasField("chunk"):
                if msg.chunk.stream == pb.OUTPUT_STREAM_STDOUT:
                    out += msg.chunk.data
                else:
                    err += msg.chunk.data
            else:
                final = msg.final_status
        return out, err, final

    def call(self, method, job_id=""):
        """Status code of one call of `method` on job_id."""
        try:
            if method == "Start":
                self.start("true")
            elif method == "List":
                self.stub.List(pb.ListRequest(), timeout=30)
            elif method == "Stream":
                list(self.stub.Stream(pb.StreamRequest(job_id=job_id), timeout=30))
            else:
                req = getattr(pb, f"{method}Request")(job_id=job_id)
                getattr(self.stub, method)(req, timeout=30)
            return SC.OK
        except grpc.RpcError as e:
            return e.code()

    def list(self, **filters):
        """Every job of a full page walk, oldest first."""
        req, jobs = pb.ListRequest(**filters), []
        while True:
            page = self.stub.List(req, timeout=30)
            jobs += page.jobs
            if not page.next_page_token:
                return jobs
            req.page_token = page.next_page_token

    def close(self):
        self.channel.close()


@pytest.fixture
def peers(pki, api):
    made = {}

    def peer(name):
        if name not in made:
            made[name] = Peer(pki, api[1], name)
        return made[name]
    yield peer
    for p in made.values():
        p.close()


# Expected code per (caller, method). "foreign" is a writer acting on another identity's job.
MATRIX = {
    "norole":  dict(Start="PERMISSION_DENIED", Stop="PERMISSION_DENIED",
                    Query="PERMISSION_DENIED", Stream="PERMISSION_DENIED",
                    List="PERMISSION_DENIED", Remove="PERMISSION_DENIED"),
    "reader":  dict(Start="PERMISSION_DENIED", Stop="PERMISSION_DENIED", Query="OK",
                    Stream="OK", List="OK", Remove="PERMISSION_DENIED"),
    "alice":   dict(Start="OK", Stop="OK", Query="OK", Stream="OK", List="OK", Remove="OK"),
    "foreign": dict(Start="OK", Stop="NOT_FOUND", Query="NOT_FOUND", Stream="NOT_FOUND",
                    List="OK", Remove="NOT_FOUND"),
    "admin":   dict(Start="OK", Stop="OK", Query="OK", Stream="OK", List="OK", Remove="OK"),
}


@root
@pytest.mark.parametrize("caller", list(MATRIX))
@pytest.mark.parametrize("method", METHODS)
def test_method_by_role_matrix(caller, method, peers):
    owner = peers("alice")
    # a running job for Stop, a finished one for the rest (a stream of it ends)
    job = owner.start("sleep", "600") if method == "Stop" else owner.start("echo", "hi")
    if method != "Stop":
        owner.stream(job)
    who = peers("bob" if caller == "foreign" else caller)
    assert who.call(method, job) == getattr(SC, MATRIX[caller][method])
    if method == "Stop" and MATRIX[caller][method] != "OK":
        assert owner.call("Stop", job) == SC.OK


@root
def test_list_shows_writers_only_their_jobs_and_readers_everything(peers):
    a = peers("alice").start("true")
    b = peers("bob").start("true")
    mine = {j.job_id for j in peers("alice").list()}
    everyone = {j.job_id for j in peers("reader").list()}
    assert a in mine and b not in mine
    assert {a, b} <= everyone
    assert {j.owner for j in peers("alice").list()} == {"alice"}
    assert {j.job_id for j in peers("reader").list(owner="bob")} >= {b}
    assert {j.owner for j in peers("reader").list(owner="bob")} == {"bob"}
    assert peers("alice").list(owner="bob") == []      # a writer's list is its own


@root
def test_remove_of_a_running_job_says_stop_it_first(peers):
    job = peers("alice").start("sleep", "600")
    for who, code in [("alice", "FAILED_PRECONDITION"), ("admin", "FAILED_PRECONDITION"),
                      ("bob", "NOT_FOUND"), ("reader", "PERMISSION_DENIED")]:
        assert peers(who).call("Remove", job) == getattr(SC, code), who
    with pytest.raises(grpc.RpcError) as e:
        peers("alice").stub.Remove(pb.RemoveRequest(job_id=job))
    assert "stop it first" in e.value.details()
    peers("alice").stub.Stop(pb.StopRequest(job_id=job, grace_seconds=0))
    assert peers("alice").call("Remove", job) == SC.OK
    assert peers("alice").call("Query", job) == SC.NOT_FOUND


@root
def test_list_pages_are_bounded_and_tokens_checked(peers):
    alice = peers("alice")
    big = [alice.start("true", "x" * (125 << 10), "y" * (125 << 10)) for _ in range(12)]
    pages, req = [], pb.ListRequest(page_size=5000)
    while True:
        page = alice.stub.List(req)
        pages.append(page)
        assert page.ByteSize() <= (1 << 20) + 4096 and len(page.jobs) <= 1000
        if not page.next_page_token:
            break
        req.page_token = page.next_page_token
    ids = [j.job_id for p in pages for j in p.jobs]
    assert len(ids) == len(set(ids)) and set(big) <= set(ids) and len(pages) >= 3
    assert [j.job_id for j in alice.list(newest_first=True)] == ids[::-1]
    only = alice.list(states=[pb.JOB_STATE_STOPPED])
    assert all(j.state == pb.JOB_STATE_STOPPED for j in only)
    for bad in [pb.ListRequest(page_token="garbage"), pb.ListRequest(states=[0]),
                pb.ListRequest(states=[99]),
                pb.ListRequest(page_token=pages[0].next_page_token, newest_first=True)]:
        with pytest.raises(grpc.RpcError) as e:
            alice.stub.List(bad)
        assert e.value.code() == SC.INVALID_ARGUMENT, bad
    # a client built from the proto before paging sends an empty ListRequest: first page
    raw = alice.channel.unary_unary(f"/{jw.SERVICE_NAME}/List")(b"", timeout=30)
    first = pb.ListResponse.FromString(raw)
    assert [j.job_id for j in first.jobs] == [j.job_id for j in pages[0].jobs]


@root
def test_a_job_removed_while_five_clients_stream_it_reaches_each_in_full(peers):
    alice = peers("alice")
    job = alice.start("head", "-c", "20000000", "/dev/zero")
    alice.stream(job)                                       # it has ended
    calls = [alice.stub.Stream(pb.StreamRequest(job_id=job), timeout=60) for _ in range(5)]
    firsts = [next(c) for c in calls]                       # every stream has begun
    assert peers("admin").call("Remove", job) == SC.OK
    for first, call in zip(firsts, calls):
        data, final = first.chunk.data, None
        for msg in call:
            if msg.HasField("chunk"):
                data += msg.chunk.data
            else:
                final = msg.final_status
        assert len(data) == 20_000_000 and data.count(0) == 20_000_000
        assert final.state == pb.JOB_STATE_EXITED and final.output_bytes == 20_000_000
    assert alice.call("Stream", job) == SC.NOT_FOUND


@root
@pytest.mark.parametrize("name", ["malformed", "unknownrole", "norole"])
def test_bad_role_extension_is_permission_denied(name, peers):
    with pytest.raises(grpc.RpcError) as e:
        peers(name).stub.List(pb.ListRequest(), timeout=30)
    assert e.value.code() == SC.PERMISSION_DENIED
    assert "role extension" in e.value.details()


@root
def test_certificate_without_client_auth_eku_is_refused(peers):
    code = peers("noeku").call("List")
    assert code in (SC.UNAVAILABLE, SC.PERMISSION_DENIED)


def _der(tag, body):
    n = len(body)
    size = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + \
        n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + size + body


def odd_client_cert(pki, name, *, cns=1, duplicate_roles=False):
    """A client certificate signed by the test CA with `cns` subject CNs, or with the role
    extension twice (which cryptography's builder refuses: the TBS is patched and re-signed)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_key, ca_cert = jw._load_ca(str(pki))
    key = jw._new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}{i}")
                         for i in range(cns)] or [x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                                     name)])
    role_oid = int(jw.ROLE_OID.split(".")[2])
    twin = f"2.25.{role_oid - 1}"   # encodes to as many bytes as the role OID
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
         .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(jw.ROLE_OID),
                                                   jw.encode_roles(["admin"])), False))
    if duplicate_roles:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(twin),
                                                       jw.encode_roles(["writer"])), False)
    cert = b.sign(ca_key, hashes.SHA256())
    der = cert.public_bytes(serialization.Encoding.DER)
    if duplicate_roles:
        tbs = cert.tbs_certificate_bytes.replace(_der(6, _oid_body(twin)),
                                                 _der(6, _oid_body(jw.ROLE_OID)))
        sig = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        alg = bytes.fromhex("300a06082a8648ce3d040302")   # ecdsa-with-SHA256
        der = _der(0x30, tbs + alg + _der(3, b"\0" + sig))
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    (pki / f"{name}.crt").write_bytes(pem)
    jw._write_secret(str(pki / f"{name}.key"), jw._pem_key(key))
    return pem


def _oid_body(dotted):
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        while p > 0x7F:
            p >>= 7
            chunk.append(0x80 | (p & 0x7F))
        body += bytes(reversed(chunk))
    return body


def test_a_certificate_names_exactly_one_identity_once(pki, tmp_path):
    ctx = lambda pem: {"ssl_tls_version": [b"TLSv1.3"], "x509_pem_cert": [pem]}
    method = f"/{jw.SERVICE_NAME}/List"
    certs = tmp_path / "odd"
    shutil.copytree(pki, certs)
    for kw, reason in [(dict(cns=2), "exactly one subject CN"),
                       (dict(cns=0), "exactly one subject CN"),
                       (dict(duplicate_roles=True), "duplicated extension")]:
        pem = odd_client_cert(certs, "odd", **kw)
        with pytest.raises(jw.AccessDenied, match=reason) as e:
            jw.authorize(method, ctx(pem))
        assert jw.status_code_for(e.value) == "PERMISSION_DENIED"


@root
def test_odd_certificates_are_permission_denied_over_the_wire(pki, api, tmp_path):
    certs = tmp_path / "odd"
    shutil.copytree(pki, certs)
    for kw, reason in [(dict(cns=2), "exactly one subject CN"),
                       (dict(duplicate_roles=True), "duplicated extension")]:
        odd_client_cert(certs, "odd", **kw)
        peer = Peer(certs, api[1], "odd")
        try:
            with pytest.raises(grpc.RpcError) as e:
                peer.stub.List(pb.ListRequest(), timeout=30)
            assert e.value.code() == SC.PERMISSION_DENIED and reason in e.value.details()
        finally:
            peer.close()


@root
def test_a_revoked_or_expired_certificate_is_refused_on_an_open_connection(pki, tmp_path):
    certs = tmp_path / "certs"
    shutil.copytree(pki, certs)
    jw.certs_issue(str(certs), "carol", ["writer"])
    jw.certs_issue(str(certs), "erin", ["writer"])
    ca_key, ca_cert = jw._load_ca(str(certs))
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=4)
    key, cert = jw.make_leaf(ca_key, ca_cert, "dave", roles=["writer"], not_after=soon)
    jw._write_secret(str(certs / "dave.key"), jw._pem_key(key))
    jw._write_public(str(certs / "dave.crt"), jw._pem_cert(cert))
    server = ServeProcess(SRC, certs, tmp_path / "state", f"{RUN_PARENT}/revoke")
    carol, dave, erin, bob = (Peer(certs, server.port, n)
                              for n in ("carol", "dave", "erin", "bob"))
    try:
        for p in (carol, dave, erin, bob):
            assert p.call("List") == SC.OK                 # connections are open and work
        r = cli(SRC, "certs", "revoke", str(certs), "carol", certs=certs)
        assert r.returncode == 0, r.stderr
        serial = f"{cert.serial_number:x}"
        from cryptography import x509
        erin_serial = x509.load_pem_x509_certificate((certs / "erin.crt").read_bytes()) \
            .serial_number.to_bytes(20, "big").hex(":")   # as openssl prints it
        r = cli(SRC, "certs", "revoke", str(certs), erin_serial, certs=certs)
        assert r.returncode == 0, r.stderr
        server.proc.send_signal(signal.SIGHUP)             # reread at once (or within 1 s)
        wait_for(lambda: carol.call("List") == SC.UNAUTHENTICATED, what="the revocation")
        wait_for(lambda: erin.call("List") == SC.UNAUTHENTICATED, what="the revocation")
        with pytest.raises(grpc.RpcError) as e:
            carol.stub.List(pb.ListRequest(), timeout=30)
        assert "is revoked" in e.value.details()
        wait_for(lambda: dave.call("List") == SC.UNAUTHENTICATED, timeout=20,
                 what="the expiry")
        with pytest.raises(grpc.RpcError) as e:
            dave.stub.List(pb.ListRequest(), timeout=30)
        assert "not valid now" in e.value.details() and serial in e.value.details()
        assert bob.call("List") == SC.OK                   # others are not touched
        audit = "".join(server.lines)
        assert "code=UNAUTHENTICATED" in audit and "serial=" in audit
    finally:
        for p in (carol, dave, erin, bob):
            p.close()
        assert server.stop() == 0


@root
def test_a_revocation_ends_the_certificate_s_calls_in_flight(pki, tmp_path):
    # revoked, the certificate's open Stream went on for as long as the job ran
    revoked = tmp_path / "revoked.txt"
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/revoke-live",
                          extra=["--revoked", str(revoked)])
    bob, alice = Peer(pki, server.port, "bob"), Peer(pki, server.port, "alice")
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        job = bob.start("sleep", "600")
        stream = bob.stub.Stream(pb.StreamRequest(job_id=job), timeout=20)
        stream.initial_metadata()                                 # admitted, and waiting
        watch = health_pb2_grpc.HealthStub(bob.channel).Watch(health_pb2.HealthCheckRequest(),
                                                              timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        theirs = alice.stub.Stream(pb.StreamRequest(job_id=alice.start("sleep", "600")))
        theirs.initial_metadata()
        # a long unary call too: a Stop of a job that ignores SIGTERM, with a grace of 60 s
        stubborn = bob.start("sh", "-c",
                             "trap 'echo term' TERM; echo ready; while :; do sleep 0.1; done")
        admin = Peer(pki, server.port, "admin")
        wait_for(lambda: admin.stream_some(stubborn, b"ready"), 30,
                 "the trap set (the job said ready)")   # (else SIGTERM would end it)
        stop = bob.stub.Stop.future(pb.StopRequest(job_id=stubborn, grace_seconds=60),
                                    timeout=90)
        wait_for(lambda: admin.stream_some(stubborn, b"term"), 30, "the Stop's SIGTERM")
        revoked.write_text(_serial_of(pki, "bob") + "\n")
        t0 = time.monotonic()
        for call in (stream, watch):
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == SC.UNAUTHENTICATED and "revoked" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stop.result()
        assert e.value.code() == SC.UNAUTHENTICATED and "revoked" in e.value.details()
        admin.stub.Stop(pb.StopRequest(job_id=stubborn, grace_seconds=0), timeout=30)
        admin.close()
        assert time.monotonic() - t0 < 10, "ended within a few seconds of the revocation"
        assert theirs.running()                                   # others' calls go on
        assert bob.call("List") == SC.UNAUTHENTICATED
        theirs.cancel()
    finally:
        for p in (bob, alice):
            p.close()
        assert server.stop() == 0


@root
@pytest.mark.parametrize("name", ["expired", "notyet", "foreign"])
def test_invalid_certificates_fail_the_handshake(name, peers):
    assert peers(name).call("List") == SC.UNAVAILABLE


@root
def test_client_without_certificate_fails_the_handshake(pki, api):
    creds = grpc.ssl_channel_credentials(open(pki / "ca.crt", "rb").read())
    with grpc.secure_channel(f"127.0.0.1:{api[1]}", creds) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.JobServiceStub(channel).List(pb.ListRequest(), timeout=30)
    assert e.value.code() == SC.UNAVAILABLE


def _s_client(pki, port, version):
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version,
         "-CAfile", str(pki / "ca.crt"), "-cert", str(pki / "admin.crt"),
         "-key", str(pki / "admin.key"), "-alpn", "h2"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=30)


@root
def test_tls12_is_refused_at_the_handshake_and_tls13_works(pki, api):
    r12 = _s_client(pki, api[1], "-tls1_2")
    assert r12.returncode != 0 and "Cipher is (NONE)" in r12.stdout + r12.stderr
    r13 = _s_client(pki, api[1], "-tls1_3")
    assert "TLSv1.3" in r13.stdout and "Verify return code: 0 (ok)" in r13.stdout


def test_authorize_refuses_anything_but_tls13_and_unlisted_methods(pki):
    pem = open(pki / "admin.crt", "rb").read()
    ctx = {"ssl_tls_version": [b"TLSv1.3"], "x509_pem_cert": [pem]}
    assert jw.authorize(f"/{jw.SERVICE_NAME}/List", ctx).scope == jw.ANY
    with pytest.raises(jw.AccessDenied, match="not allowed to anyone"):
        jw.authorize(f"/{jw.SERVICE_NAME}/Exec", ctx)
    with pytest.raises(jw.Unauthenticated, match="TLS 1.3") as e:
        jw.authorize(f"/{jw.SERVICE_NAME}/List", dict(ctx, ssl_tls_version=[b"TLSv1.2"]))
    assert jw.status_code_for(e.value) == "UNAUTHENTICATED"
    with pytest.raises(jw.Unauthenticated, match="TLS 1.3"):
        jw.authorize(f"/{jw.SERVICE_NAME}/List", {"x509_pem_cert": [pem]})


def test_roles_extension_round_trips_and_rejects_garbage():
    assert jw.decode_roles(jw.encode_roles(["reader", "admin"])) == ("reader", "admin")
    for bad in [b"", b"\x30\x00", b"\x31\x02\x0c\x00", b"\x30\x08\x0c\x06writer\x00",
                b"\x30\x03\x04\x01a", jw.encode_roles(["writer"])[:-1], b"\x30\x84\xff\xff\xff\xff"]:
        with pytest.raises(ValueError):
            jw.decode_roles(bad)


def test_server_refuses_a_key_readable_by_others_or_not_ecdsa(pki, tmp_path):
    import shutil
    key = tmp_path / "server.key"
    shutil.copy(pki / "server.key", key)
    key.chmod(0o640)
    with pytest.raises(jw.JobworkerError, match="readable by group or others"):
        jw.check_server_key(str(key))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    rsa_key = rsa.generate_private_key(65537, 2048)
    key.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    with pytest.raises(jw.JobworkerError, match="ECDSA"):
        jw.check_server_key(str(key))


def test_certs_files_and_modes(pki):
    for name in ["ca", "server", "alice"]:
        assert (pki / f"{name}.key").stat().st_mode & 0o777 == 0o600
        assert (pki / f"{name}.crt").stat().st_mode & 0o777 == 0o644
    from cryptography import x509
    server = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    with pytest.raises(jw.JobworkerError, match="exists"):
        jw.certs_init(str(pki))


def test_certs_write_through_no_planted_symlink_and_refuse_open_dirs(rpc, tmp_path):
    d, target = tmp_path / "certs", tmp_path / "victim"
    d.mkdir(mode=0o700)
    target.write_text("not a key")
    (d / "server.key").symlink_to(target)          # planted by someone who could write here
    jw.certs_init(str(d))
    assert target.read_text() == "not a key"
    assert not (d / "server.key").is_symlink() and (d / "server.key").stat().st_mode & 0o777 == 0o600
    assert not list(d.glob(".*.tmp"))
    new = tmp_path / "new"
    jw.certs_init(str(new))
    assert new.stat().st_mode & 0o777 == 0o700
    d.chmod(0o777)
    with pytest.raises(jw.LocalFileError, match="writable by group or others"):
        jw.certs_issue(str(d), "carol", ["writer"])
    d.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(jw.LocalFileError, match="is a symlink"):
        jw.certs_issue(str(link), "carol", ["writer"])
    assert not (d / "carol.crt").exists()


@root
def test_certs_and_serve_refuse_a_directory_of_another_user(pki, tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(jw.LocalFileError, match="belongs to uid 65534"):
        jw.certs_init(str(other))
    code, err = serve_once(pki, other, f"{RUN_PARENT}/otherstate")
    assert code == 1 and "refusing the state dir" in err and "uid 65534" in err, err
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    code, err = serve_once(pki, open_dir, f"{RUN_PARENT}/otherstate")
    assert code == 1 and "writable by group or others" in err, err


def test_human_output_escapes_control_characters(rpc):
    s = jw.JobStatus(id="6f9619ff-8b86-4011-b42d-00c04fc964ff", owner="eve\x1b[2J",
                     command=["printf", "\x1b]0;pwned\x07\rok"], limits=jw.Limits(),
                     state=jw.EXITED, exit_code=0, started_at=1.0, ended_at=2.0)
    msg = jw.status_to_proto(pb, s)
    human = jw.format_status(pb, msg)
    assert "\x1b" not in human and "\r" not in human and "\x07" not in human
    assert "eve\\x1b[2J" in human and "\\x1b]0;pwned\\x07\\x0dok" in human
    assert jw.status_to_dict(pb, msg)["command"][1] == "\x1b]0;pwned\x07\rok"   # --json: exact


# ================================================================================================
# Service
# ================================================================================================


def test_status_maps_to_the_proto_field_by_field(rpc):
    limits = jw.Limits(cpu_percent=50.0, memory_bytes=64 << 20, io_bytes_per_second=10_000_000, pids=50)
    usage = {"cpu_seconds": 1.5, "memory_bytes": 2, "memory_peak_bytes": 3, "io_read_bytes": 4,
             "io_write_bytes": 5, "tasks": 6}
    s = jw.JobStatus(id="6f9619ff-8b86-4011-b42d-00c04fc964ff", owner="alice",
                     command=["sh", "-c", "x"], limits=limits, state=jw.EXITED, exit_code=0,
                     started_at=1.25, ended_at=2.5, usage=usage, output_bytes=7, pid=42)
    d = jw.status_to_dict(pb, jw.status_to_proto(pb, s))
    assert (d["id"], d["owner"], d["command"], d["state"], d["exit_code"], d["signal"]) == \
        (s.id, "alice", ["sh", "-c", "x"], "exited", 0, None)
    assert d["limits"] == {"cpu_percent": 50.0, "memory_bytes": 64 << 20,
                           "io_bytes_per_second": 10_000_000, "pids": 50}
    assert d["usage"] == usage and d["output_bytes"] == 7 and d["pid"] == 42
    assert (d["started_at"], d["ended_at"]) == ("1970-01-01T00:00:01.250Z", "1970-01-01T00:00:02.500Z")
    with pytest.raises(ValueError, match="without a proto field"):
        jw.status_to_proto(pb, dataclasses.replace(s, usage={"gpu_seconds": 1}))
    assert {pb.OutputStream.Value(v) for v in jw.STREAM_TO_PROTO.values()} == \
        {pb.OUTPUT_STREAM_STDOUT, pb.OUTPUT_STREAM_STDERR}


@pytest.mark.parametrize("stream", [1, 2])
def test_output_messages_sent_encoded_are_what_protobuf_encodes(rpc, stream):
    from hypothesis import given, settings, strategies as st
    u64 = st.integers(0, 2**64 - 1)

    @settings(max_examples=300, deadline=None)
    @given(offset=u64, data=st.binary(max_size=300), lengths=st.lists(u64, max_size=20))
    def check(offset, data, lengths):
        chunk = pb.StreamResponse(chunk=pb.OutputChunk(stream=stream, offset=offset, data=data))
        assert jw.encode_output_chunk(stream, offset, data) == chunk.SerializeToString()
        batch = pb.StreamResponse(batch=pb.OutputBatch(offset=offset, data=data,
                                                       first_stream=stream, lengths=lengths))
        assert jw.encode_output_batch(offset, data, stream, lengths) == \
            batch.SerializeToString()
    check()
    # the encoders know these fields and no others: a field added to the proto must be added
    # to them too
    from google.protobuf.descriptor import FieldDescriptor as T
    fields = lambda m: [(f.name, f.number, f.type) for f in m.DESCRIPTOR.fields]
    assert fields(pb.OutputChunk) == [("stream", 1, T.TYPE_ENUM), ("offset", 2, T.TYPE_UINT64),
                                      ("data", 3, T.TYPE_BYTES)]
    assert fields(pb.OutputBatch) == [("offset", 1, T.TYPE_UINT64), ("data", 2, T.TYPE_BYTES),
                                      ("first_stream", 3, T.TYPE_ENUM),
                                      ("lengths", 4, T.TYPE_UINT64)]
    assert [(n, f.number) for n, f in pb.StreamResponse.DESCRIPTOR.fields_by_name.items()
            if f.containing_oneof] == [("chunk", 1), ("final_status", 2), ("batch", 3)]
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            jw.encode_output_chunk(stream, bad, b"x")
    big = b"x" * (1 << 20)   # a whole read: the length takes three bytes
    assert pb.StreamResponse.FromString(jw.encode_output_chunk(stream, 7, big)).chunk.data == big


def test_attach_input_is_encoded_and_decoded_as_protobuf_does(rpc):
    decode = jw.decode_attach_request(pb.AttachRequest.FromString)
    for data in (b"", b"x", b"\0\377" * 100, os.urandom(300_000)):
        raw = jw.encode_attach_input(data)
        assert raw == pb.AttachRequest(input=data).SerializeToString()
        got = decode(raw)
        assert isinstance(got, jw.AttachInput) and bytes(got.data) == data
    for msg in (pb.AttachRequest(eof=True), pb.AttachRequest(resize=pb.WindowSize(rows=2)),
                pb.AttachRequest(start=pb.AttachStart(job_id="j", offset=0))):
        assert decode(msg.SerializeToString()) == msg   # the rest: protobuf's parse
    # input followed by another field is no lone input: protobuf decides (the last one wins)
    raw = jw.encode_attach_input(b"abc") + pb.AttachRequest(eof=True).SerializeToString()
    assert decode(raw) == pb.AttachRequest.FromString(raw)
    with pytest.raises(Exception):
        decode(b"\x12\x05ab")   # cut short: protobuf refuses it (the call: INVALID_ARGUMENT)


def test_every_library_error_has_one_status_code():
    req = jw.SpawnRequest(job="j", dir="/d", cap=1, argv=["p"], env={}, cwd="/w", procs=[])
    failed = lambda kind: jw.spawn_error(req, {"error": kind, "errno": 2})
    cases = [(jw.InvalidArgument("f", "v", "x"), "INVALID_ARGUMENT"),
             (jw.MalformedRequest("bad"), "INVALID_ARGUMENT"),
             (failed(jw.SPAWN_EXEC), "INVALID_ARGUMENT"),
             (failed(jw.SPAWN_CHDIR), "INVALID_ARGUMENT"),
             (failed(jw.SPAWN_SETUID), "FAILED_PRECONDITION"),
             (failed(jw.SPAWN_FDS), "RESOURCE_EXHAUSTED"),
             (failed(jw.SPAWN_LAUNCHER), "UNAVAILABLE"),
             (jw.RequestTimeout(5), "DEADLINE_EXCEEDED"),
             (jw.JobNotFound("x"), "NOT_FOUND"), (jw.JobNotRunning("x", "exited"),
                                                   "FAILED_PRECONDITION"),
             (jw.CapReached("jobs", 1), "RESOURCE_EXHAUSTED"),
             (jw.LauncherError("gone"), "UNAVAILABLE"), (jw.Unauthenticated("tls"),
                                                         "UNAUTHENTICATED"),
             (jw.AccessDenied("role"), "PERMISSION_DENIED"), (KeyError("x"), "INTERNAL")]
    for exc, code in cases:
        assert jw.status_code_for(exc) == code, exc
    assert str(failed(jw.SPAWN_EXEC)) == "no such file: p"
    assert "invalid workdir '/w': No such file or directory (as the job's user)" == \
        str(failed(jw.SPAWN_CHDIR))


def test_sources_pass_pyflakes():
    files = ["jobworker.py", "build_zipapp.py", "v2_guest.py", "test_jobworker.py",
             *glob.glob("bench/*.py"), *glob.glob("*_main.py"), *glob.glob("*_checks.py"),
             *glob.glob("ansible_plugins/*/*.py")]
    r = subprocess.run([sys.executable, "-m", "pyflakes", *files], cwd=HERE, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@root
def test_start_stream_query_round_trip(peers):
    alice = peers("alice")
    job = alice.start("sh", "-c", "printf 'out\\0'; printf err >&2; exit 4", cpu_quota="50%",
                      memory_limit="64M", disk_io="10MB/s", pids="50")
    out, err, final = alice.stream(job)
    assert (out, err) == (b"out\0", b"err")
    assert final.state == pb.JOB_STATE_EXITED and final.exit_code == 4
    assert not final.HasField("signal")
    q = alice.stub.Query(pb.QueryRequest(job_id=job)).status
    assert q.owner == "alice" and list(q.command)[:2] == ["sh", "-c"]
    assert (q.limits.cpu_percent, q.limits.memory_bytes, q.limits.io_bytes_per_second,
            q.limits.pids) == (50.0, 64 << 20, 10_000_000, 50)
    assert q.ended_at.ToNanoseconds() >= q.started_at.ToNanoseconds() > 0


@root
@pytest.mark.parametrize("field,value", [("cpu_quota", "0%"), ("memory_limit", "10XB"),
                                         ("disk_io", "abc"), ("pids", "-1")])
def test_bad_limits_are_invalid_argument_naming_the_field(field, value, peers):
    with pytest.raises(grpc.RpcError) as e:
        peers("alice").start("true", **{field: value})
    assert e.value.code() == SC.INVALID_ARGUMENT and field in e.value.details()


@root
@pytest.mark.parametrize("job_id", ["..", "../x", "a/b", "x\0y", "A" * 10_000, ""])
def test_bad_job_ids_are_invalid_argument(job_id, peers):
    for method in ["Stop", "Query", "Stream"]:
        assert peers("admin").call(method, job_id) == SC.INVALID_ARGUMENT


@root
def test_missing_program_is_invalid_argument_with_the_os_reason(peers):
    with pytest.raises(grpc.RpcError) as e:
        peers("alice").start("no-such-program-xyz")
    assert e.value.code() == SC.INVALID_ARGUMENT
    assert e.value.details() == "no such file: no-such-program-xyz"


@root
def test_stop_with_grace_period_and_its_validation(peers):
    alice = peers("alice")
    job = alice.start("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
    wait_for(lambda: alice.stub.Query(pb.QueryRequest(job_id=job)).status.output_bytes,
             what="the trap set (the job said ready)")   # (else SIGTERM would end it)
    for bad in [-1.0, float("nan"), 1e9]:
        with pytest.raises(grpc.RpcError) as e:
            alice.stub.Stop(pb.StopRequest(job_id=job, grace_seconds=bad))
        assert e.value.code() == SC.INVALID_ARGUMENT
    t0 = time.monotonic()
    s = alice.stub.Stop(pb.StopRequest(job_id=job, grace_seconds=0.3)).status
    assert s.state == pb.JOB_STATE_STOPPED and s.signal == signal.SIGKILL
    assert time.monotonic() - t0 < 8
    with pytest.raises(grpc.RpcError) as e:
        alice.stub.Stop(pb.StopRequest(job_id=job))
    assert e.value.code() == SC.FAILED_PRECONDITION


@root
def test_stream_resumes_from_an_offset(peers):
    alice = peers("alice")
    job = alice.start("sh", "-c", "printf 0123456789")
    assert alice.stream(job)[0] == b"0123456789"
    assert alice.stream(job, offset=7)[0] == b"789"
    with pytest.raises(grpc.RpcError) as e:
        alice.stream(job, offset=11)
    assert e.value.code() == SC.INVALID_ARGUMENT
    running = alice.start("sh", "-c", "printf 01234; sleep 600")
    wait_for(lambda: alice.stub.Query(pb.QueryRequest(job_id=running)).status.output_bytes,
             what="output")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:     # at once, as for a finished job
        alice.stream(running, offset=6)
    assert e.value.code() == SC.INVALID_ARGUMENT and "at most the output size so far, 5" in \
        e.value.details() and time.monotonic() - t0 < 20
    assert alice.stub.Stop(pb.StopRequest(job_id=running, grace_seconds=0))


INTERLEAVED = ("import os\n"
               "for i in range(50000):\n"
               "    os.write(1, b'o'); os.write(2, b'e')\n")


@root
def test_interleaved_output_comes_back_whole_in_batches_or_one_chunk_a_message(peers):
    alice = peers("alice")
    job = alice.start("python3", "-c", INTERLEAVED)
    alice.stream(job)
    singly, batched = [], []
    for msg in alice.stub.Stream(pb.StreamRequest(job_id=job), timeout=120):
        assert msg.WhichOneof("item") in ("chunk", "final_status")   # what an old client knows
        if msg.HasField("chunk"):
            singly.append(msg.chunk)
    messages = 0
    for msg in alice.stub.Stream(pb.StreamRequest(job_id=job, batch=True), timeout=120):
        if msg.HasField("batch"):
            messages += 1
            batched += jw.output_pieces(pb, msg)
    assert [(c.stream, c.offset, c.data) for c in singly] == batched
    assert messages < len(batched)
    assert [c.offset for c in singly] == list(itertools.accumulate(
        [0] + [len(c.data) for c in singly[:-1]]))                       # contiguous
    out = b"".join(c.data for c in singly if c.stream == pb.OUTPUT_STREAM_STDOUT)
    err = b"".join(c.data for c in singly if c.stream == pb.OUTPUT_STREAM_STDERR)
    assert (out, err) == (b"o" * 50000, b"e" * 50000)


@root
def test_two_clients_attached_early_and_late_get_identical_output(peers):
    alice = peers("alice")
    gate = f"/tmp/jobworker-gate-{uuid.uuid4()}"   # the job waits for it halfway
    job = alice.start("sh", "-c", "for i in $(seq 1 20); do echo line $i; echo e$i >&2; "
                                  f"done; while [ ! -e {gate} ]; do sleep 0.01; done; "
                                  "for i in $(seq 21 40); do echo line $i; echo e$i >&2; "
                                  "sleep 0.02; done")
    results, late_seen = {}, []
    early = threading.Thread(target=lambda: results.update(early=alice.stream(job)))
    early.start()
    wait_for(lambda: alice.stub.Query(pb.QueryRequest(job_id=job)).status.output_bytes > 0,
             what="the job's first half")

    def late_stream():
        out = err = b""
        for msg in peers("admin").stub.Stream(pb.StreamRequest(job_id=job), timeout=60):
            if msg.HasField("chunk"):
                if msg.chunk.stream == pb.OUTPUT_STREAM_STDOUT:
                    out += msg.chunk.data
                    late_seen.append(msg.chunk.data)
                else:
                    err += msg.chunk.data
        results["late"] = (out, err)
    late = threading.Thread(target=late_stream)
    late.start()
    try:   # the late one attaches while the job waits, catches up, then goes on live
        wait_for(lambda: b"".join(late_seen).count(b"line") == 20, what="the late catch-up")
        assert alice.stub.Query(pb.QueryRequest(job_id=job)).status.state == \
            pb.JOB_STATE_RUNNING
    finally:
        open(gate, "w").close()
    early.join(30)
    late.join(30)
    os.unlink(gate)
    out, err, _ = results["early"]
    assert (out, err) == results["late"]
    assert out.count(b"line") == 40 and err.count(b"e") == 40


@root
def test_unexpected_errors_are_internal_without_details(peers, api, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(api[0].table, "walk", broken)
    with pytest.raises(grpc.RpcError) as e:
        peers("admin").stub.List(pb.ListRequest())
    assert e.value.code() == SC.INTERNAL
    assert "secret" not in e.value.details() and "Traceback" not in e.value.details()


@root
def test_every_call_writes_one_audit_line(pki, peers, caplog):
    caplog.set_level("INFO", logger="jobworker.audit")
    alice = peers("alice")
    job = alice.start("true")
    alice.stream(job)
    alice.call("Query", job)
    peers("reader").call("Stop", job)
    peers("bob").call("Query", job)
    peers("norole").call("List")
    peers("bob").call("Remove", job)
    alice.call("Remove", job)
    from cryptography import x509
    serial = {n: f"{x509.load_pem_x509_certificate((pki / f'{n}.crt').read_bytes()).serial_number:x}"
              for n in ("alice", "reader", "bob", "norole")}
    lines = [r.getMessage() for r in caplog.records if r.name == "jobworker.audit"]
    peers_seen = {line.split(" peer=")[1].split()[0] for line in lines}
    assert all(p.startswith("ipv4:127.0.0.1:") for p in peers_seen), peers_seen
    assert [" ".join(f for f in line.split() if not f.startswith("peer=")) for line in lines] == [
        f'identity="alice" role=writer serial={serial["alice"]} method=Start job={job} code=OK',
        f'identity="alice" role=writer serial={serial["alice"]} method=Stream job={job} code=OK',
        f'identity="alice" role=writer serial={serial["alice"]} method=Query job={job} code=OK',
        f'identity=- role=- serial={serial["reader"]} method=Stop job={job} '
        'code=PERMISSION_DENIED',
        f'identity="bob" role=writer serial={serial["bob"]} method=Query job={job} '
        'code=NOT_FOUND',
        f'identity=- role=- serial={serial["norole"]} method=List job=- code=PERMISSION_DENIED',
        f'identity="bob" role=writer serial={serial["bob"]} method=Remove job={job} '
        'code=NOT_FOUND',
        f'identity="alice" role=writer serial={serial["alice"]} method=Remove job={job} code=OK',
    ]


@root
def test_caps_answer_resource_exhausted(pki, tmp_path):
    # caps of 3: one of each is kept for admins
    with running_server(pki, tmp_path, max_streams=3, max_jobs=3,
                        max_request_bytes=16 << 10) as (m, port):
        alice, admin = Peer(pki, port, "alice"), Peer(pki, port, "admin")
        try:
            jobs = [alice.start("sleep", "600") for _ in range(2)]
            assert alice.call("Start") == SC.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as e:
                alice.start("true")
            assert "1 more are kept for admins" in e.value.details()
            admin_job = admin.start("sleep", "600")          # the admin's share
            assert admin.call("Start") == SC.RESOURCE_EXHAUSTED
            admin.stub.Stop(pb.StopRequest(job_id=admin_job, grace_seconds=0))
            with pytest.raises(grpc.RpcError) as e:
                alice.start("echo", "x" * (32 << 10))
            assert e.value.code() == SC.RESOURCE_EXHAUSTED
            streams = [alice.stub.Stream(pb.StreamRequest(job_id=j)) for j in jobs]
            for s in streams:   # wait until both are really open on the server
                wait_for(lambda: s.initial_metadata() is not None, what="stream open")
            wait_for(lambda: alice.call("Stream", jobs[0]) == SC.RESOURCE_EXHAUSTED,
                     what="the stream cap")
            # a cancelled client frees its slot at once
            for s in streams:
                s.cancel()
            wait_for(lambda: _stream_opens(alice, jobs[0]), what="a freed stream slot")
            alice.stub.Stop(pb.StopRequest(job_id=jobs[0], grace_seconds=0))
            assert alice.call("Start") == SC.OK
        finally:
            alice.close()
            admin.close()


@root
def test_one_owner_cannot_starve_another_or_the_admin(pki, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/starve", extra=[
        "--max-jobs", "6", "--max-jobs-per-owner", "2", "--max-streams", "4",
        "--max-streams-per-owner", "2", "--grace", "1"])
    alice, bob, admin = (Peer(pki, server.port, n) for n in ("alice", "bob", "admin"))
    pool = ThreadPoolExecutor(80)
    try:
        stubborn = alice.start("sh", "-c", "trap '' TERM; echo ready; sleep 600")
        wait_for(lambda: alice.stub.Query(pb.QueryRequest(job_id=stubborn)).status.output_bytes,
                 30, "the trap set (the job said ready)")   # (else a slow Stop would be quick)
        alice.start("sleep", "600")
        assert alice.call("Start") == SC.RESOURCE_EXHAUSTED               # her jobs
        hogs = [alice.stub.Stream(pb.StreamRequest(job_id=stubborn)) for _ in range(2)]
        for h in hogs:                                                    # never read
            h.initial_metadata()
        assert alice.call("Stream", stubborn) == SC.RESOURCE_EXHAUSTED    # her streams
        def slow_stop():
            try:
                alice.stub.Stop(pb.StopRequest(job_id=stubborn, grace_seconds=45), timeout=120)
                return SC.OK
            except grpc.RpcError as e:
                return e.code()
        stops = [pool.submit(slow_stop) for _ in range(70)]   # slow Stops hold threads
        with pytest.raises(grpc.RpcError):
            alice.start("echo", *["x" * 60000] * 20)                     # too big a request
        time.sleep(1)
        took = {}
        for who, what, call in [
                ("bob", "Start", lambda: bob.start("sleep", "600")),
                ("bob", "Query", lambda: bob.stub.Query(pb.QueryRequest(job_id=bob_job[0]))),
                ("bob", "List", lambda: bob.list()),
                ("admin", "List", lambda: admin.list()),
                ("admin", "Stop", lambda: admin.stub.Stop(pb.StopRequest(
                    job_id=bob_job[0], grace_seconds=0)))]:
            t0 = time.monotonic()
            result = call()
            took[f"{who} {what}"] = time.monotonic() - t0
            if what == "Start":
                bob_job = [result]
        assert max(took.values()) < 3, took                # each answered at once (wide band)
        refused = sum(1 for f in stops if f.done() and f.result() == SC.RESOURCE_EXHAUSTED)
        assert refused >= 70 - jw.UNARY_CALLS_PER_OWNER - 2, refused   # her calls are capped
        for h in hogs:
            h.cancel()
    finally:
        for p in (alice, bob, admin):
            p.close()
        assert server.stop() == 0
        pool.shutdown(wait=True)


def _stream_opens(peer, job_id):
    call = peer.stub.Stream(pb.StreamRequest(job_id=job_id))
    try:
        call.initial_metadata()
        time.sleep(0.1)
        return call.running() or call.code() != SC.RESOURCE_EXHAUSTED
    finally:
        call.cancel()


@root
def test_cancelled_stream_gives_its_thread_back(pki, api, peers):
    alice = peers("alice")
    job = alice.start("sleep", "600")   # no output: each stream waits in the server
    before = _rpc_threads_in("Stream")
    calls = [alice.stub.Stream(pb.StreamRequest(job_id=job)) for _ in range(20)]
    for c in calls:
        c.initial_metadata()   # sent once the call is admitted, in its handler's thread
    assert _rpc_threads_in("Stream") == before + 20
    for c in calls:
        c.cancel()
    wait_for(lambda: _rpc_threads_in("Stream") == before,
             what="server threads to leave the cancelled streams")
    alice.stub.Stop(pb.StopRequest(job_id=job, grace_seconds=0))


def _rpc_threads_in(function):
    """Server pool threads (of this process) whose stack is in `function` now."""
    busy = 0
    for tid, frame in sys._current_frames().items():
        t = threading._active.get(tid)
        if t and t.name.startswith("jobworker-rpc"):
            names = set()
            while frame:
                names.add(frame.f_code.co_name)
                frame = frame.f_back
            busy += function in names
    return busy


@root
@slow
def test_500_concurrent_followers_get_the_same_bytes(pki, tmp_path):
    # One identity follows 500 times: the per-owner stream cap is raised to admit them.
    with running_server(pki, tmp_path, max_streams_per_owner=600) as (_, port):
        alice = Peer(pki, port, "alice")
        try:
            job = alice.start("sh", "-c",
                              "sleep 2; for i in $(seq 1 200); do echo line $i; done; sleep 1")
            results = _follow_500(pki, port, job)
        finally:
            alice.close()
    expected = b"".join(f"line {i}\n".encode() for i in range(1, 201))
    assert len(results) == 500
    assert all(data == expected for data, _ in results)
    assert all(final.state == pb.JOB_STATE_EXITED for _, final in results)


def _follow_500(pki, port, job):
    import asyncio
    read = lambda p: open(p, "rb").read()

    async def follow_all():
        creds = grpc.ssl_channel_credentials(read(pki / "ca.crt"), read(pki / "reader.key"),
                                             read(pki / "reader.crt"))
        channels = [grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) for _ in range(5)]

        async def one(i):
            stub = pb_grpc.JobServiceStub(channels[i % 5])
            data, final = b"", None
            async for msg in stub.Stream(pb.StreamRequest(job_id=job), timeout=120):
                if msg.HasField("chunk"):
                    data += msg.chunk.data
                else:
                    final = msg.final_status
            return data, final

        try:
            return await asyncio.gather(*(one(i) for i in range(500)))
        finally:
            for c in channels:
                await c.close()

    return asyncio.run(follow_all())


# ================================================================================================
# Server: fork safety of the whole process under load; health, reflection, metrics
# ================================================================================================


@root
@slow
def test_fork_safety_2000_spawns_while_8_followers_stream(pki, api, peers, capfd):
    """Jobs are spawned from the server process while gRPC streams run: no hang, no failure,
    no corrupted stream, no grpc fork warning."""
    alice = peers("alice")
    writer = alice.start("sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo \"line $i $(date +%N)\"; "
                                     "i=$((i+1)); done")
    results = [None] * 8
    errors = []

    def follow(i):
        try:
            peer = Peer(pki, api[1], "reader")
            results[i] = peer.stream(writer)
            peer.close()
        except Exception as e:   # collected and asserted below
            errors.append(e)

    followers = [threading.Thread(target=follow, args=(i,)) for i in range(8)]
    for t in followers:
        t.start()
    failures = 0
    spawn_deadline = time.monotonic() + 300
    for i in range(2000):
        assert time.monotonic() < spawn_deadline, f"only {i} spawns in 300 s"
        try:
            alice.start("true")
        except grpc.RpcError:
            failures += 1
    for t in followers:
        t.join(120)
    assert not any(t.is_alive() for t in followers), "a follower hung"
    assert errors == [] and failures == 0
    digests = {hashlib.sha256(r[0]).hexdigest() for r in results}
    assert len(digests) == 1 and results[0][0].count(b"\n") == 3000
    assert all(r[2].state == pb.JOB_STATE_EXITED for r in results)
    captured = capfd.readouterr()
    assert "fork" not in (captured.out + captured.err).lower()


def test_the_server_s_threads_carry_their_names_in_the_kernel_for_top_and_ps():
    """`top -H` and `ps -L` tell the server's threads apart: a named thread and a pool's
    threads carry their Python names (their first 15 bytes) in /proc."""
    def comm():
        with open("/proc/thread-self/comm") as f:
            return f.read().strip()
    seen = []
    thread = jw.NamedThread(lambda: seen.append(comm()), "jobworker-engine")
    thread.start()
    thread.join()
    with jw.thread_pool(1, "jobworker-rpc") as pool:
        seen.append(pool.submit(comm).result())
    assert seen == ["jobworker-engin", "jobworker-rpc_0"]
    assert comm() != "jobworker-engin"   # the calling thread keeps its own


# -- ops protocols: gRPC health, server reflection, Prometheus metrics ---------------------------


def _health(pki, port, name):
    from grpc_health.v1 import health_pb2_grpc
    peer = Peer(pki, port, name)
    return peer, health_pb2_grpc.HealthStub(peer.channel)


@root
def test_health_serves_any_certificate_and_says_not_serving_at_sigterm(pki, tmp_path):
    from grpc_health.v1 import health_pb2 as hpb
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/health")
    port = server.port
    peer, health = _health(pki, port, "norole")   # no role at all: health is open to it
    try:
        for service in ("", "jobworker.v1.JobService"):
            assert health.Check(hpb.HealthCheckRequest(service=service),
                                timeout=30).status == hpb.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health.Check(hpb.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert e.value.code() == SC.NOT_FOUND
        h = cli(SRC, "health", certs=pki, port=port, name="reader")
        assert (h.returncode, h.stdout) == (0, b"SERVING\n"), h
        h = cli(SRC, "health", "--service", "no.such.Service", certs=pki, port=port)
        assert h.returncode == 4 and b"no service 'no.such.Service'" in h.stderr, h
        job = cli(SRC, "start", "sh", "-c", "echo up; sleep 600", certs=pki,
                  port=port).stdout.decode().strip()
        follower = Peer(pki, port, "client")
        stream = follower.stub.Stream(pb.StreamRequest(job_id=job), timeout=120)
        assert next(stream).chunk.data == b"up\n"   # the stream is open
        watch = health.Watch(hpb.HealthCheckRequest(service=""), timeout=120)
        seen = [next(watch).status]
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        seen += [m.status for m in watch]   # NOT_SERVING, then the watch ends
        assert seen == [hpb.HealthCheckResponse.SERVING, hpb.HealthCheckResponse.NOT_SERVING]
        finals = [m.final_status for m in stream if m.HasField("final_status")]
        assert [f.state for f in finals] == [pb.JOB_STATE_STOPPED]   # after the watch ended
        assert server.stop() == 0
        assert time.monotonic() - t0 < jw.SHUTDOWN_GRACE   # no open watch holds the stop up
        follower.close()
    finally:
        peer.close()
        server.stop()
    assert any("method=Check" in line and 'identity="norole"' in line for line in server.lines)


@root
def test_reflection_lists_and_describes_every_service_unless_turned_off(pki, tmp_path):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
    with running_server(pki, tmp_path) as (_, port):
        peer = Peer(pki, port, "norole")
        try:
            db = ProtoReflectionDescriptorDatabase(peer.channel)
            assert set(db.get_services()) == {"jobworker.v1.JobService", "grpc.health.v1.Health",
                                              "grpc.reflection.v1alpha.ServerReflection"}
            pool = DescriptorPool(db)
            service = pool.FindServiceByName("jobworker.v1.JobService")
            assert {m.name for m in service.methods} == {
                "Start", "Stop", "Query", "Stream", "Attach", "List", "Remove", "Info"}
            start = pool.FindMessageTypeByName("jobworker.v1.StartRequest")
            assert {"name", "args", "resources", "env", "workdir", "timeout_seconds",
                    "job_name"} <= set(start.fields_by_name)
            resources = pool.FindMessageTypeByName("jobworker.v1.ResourceConfig")
            assert {"cpu_quota", "memory_limit", "disk_io"} <= set(resources.fields_by_name)
        finally:
            peer.close()
    with running_server(pki, tmp_path / "off", reflection=False) as (_, port):
        peer = Peer(pki, port, "reader")
        try:
            with pytest.raises(grpc.RpcError) as e:
                ProtoReflectionDescriptorDatabase(peer.channel).get_services()
            assert e.value.code() == SC.UNIMPLEMENTED
        finally:
            peer.close()


def _scrape(port, path="/metrics", method="GET"):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def _samples(body):
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


@root
def test_metrics_follow_real_jobs_and_the_port_serves_only_get_metrics(pki, tmp_path):
    driver = jw.detect_cgroups(f"{RUN_PARENT}/metrics")
    metrics = jw.Metrics(driver.version)
    m = jw.JobManager(str(tmp_path / "state"), driver, observer=metrics, grace=1).open()
    http = jw.MetricsServer("127.0.0.1:0", metrics.registry)
    try:
        with jw.serve_grpc(m, "127.0.0.1:0", ca=str(pki / "ca.crt"),
                           cert=str(pki / "server.crt"), key=str(pki / "server.key"),
                           metrics=metrics) as port:
            alice = Peer(pki, port, "alice")
            ok = alice.start("sh", "-c", "head -c 5000 /dev/zero")
            oom = alice.start("python3", "-c", "x = bytearray(512 << 20)", memory_limit="32M")
            stopped = alice.start("sleep", "600")
            with pytest.raises(grpc.RpcError) as e:
                alice.start("/no/such/program")
            assert e.value.code() == SC.INVALID_ARGUMENT
            for job in (ok, oom):
                alice.stream(job)
            got = _samples(_scrape(http.port)[2])
            owner = (("owner", "alice"),)
            assert got[("jobworker_jobs_running", owner)] == 1
            alice.stub.Stop(pb.StopRequest(job_id=stopped, grace_seconds=0), timeout=30)
            alice.stream(stopped)
            got = _samples(_scrape(http.port)[2])
            alice.close()
        assert got[("jobworker_jobs_started_total", owner)] == 3
        assert got[("jobworker_jobs_ended_total", owner + (("state", "exited"),))] == 2
        assert got[("jobworker_jobs_ended_total", owner + (("state", "stopped"),))] == 1
        assert got[("jobworker_jobs_oom_killed_total", owner)] == 1
        assert got.get(("jobworker_jobs_running", owner), 0) == 0
        assert got[("jobworker_start_failures_total",
                    (("reason", "program_not_runnable"),))] == 1
        assert got[("jobworker_rpcs_total", (("code", "OK"), ("method", "Start")))] == 3
        assert got[("jobworker_rpcs_total", (("code", "INVALID_ARGUMENT"),
                                             ("method", "Start")))] == 1
        assert got[("jobworker_rpc_duration_seconds_count", (("method", "Stop"),))] == 1
        assert got[("jobworker_output_stored_bytes_total", ())] >= 5000
        assert got[("jobworker_output_streamed_bytes_total", ())] >= 5000
        assert got[("jobworker_streams_open", ())] == 0
        assert got[("jobworker_info", (("cgroup_version", str(driver.version)),
                                       ("version", jw.__version__)))] == 1
        assert got[("process_open_fds", ())] > 0 and got[("process_resident_memory_bytes", ())]
        status, kind, _ = _scrape(http.port, "/metrics?name[]=x")
        assert status == 200 and kind.startswith("text/plain")
        assert _scrape(http.port, "/")[0] == 404
        assert _scrape(http.port, "/metrics/../x")[0] == 404
        for verb in ("POST", "PUT", "DELETE", "HEAD"):
            assert _scrape(http.port, method=verb)[0] == 405
    finally:
        http.close()
        m.close(grace=0)
        driver.remove_parent()


def test_metrics_owner_labels_are_capped(monkeypatch):
    monkeypatch.setattr(jw, "METRICS_MAX_OWNERS", 3)
    metrics = jw.Metrics(2)
    labels = [metrics.owner(f"user{i}") for i in range(6)] + [metrics.owner("user1")]
    assert labels == ["user0", "user1", "user2", "other", "other", "other", "user1"]
    for i in range(6):
        metrics.job_started(jw.JobStatus(id="x", owner=f"user{i}", command=["true"],
                                         limits=jw.Limits(), state=jw.RUNNING))
    from prometheus_client import generate_latest
    got = _samples(generate_latest(metrics.registry))
    assert got[("jobworker_jobs_started_total", (("owner", "other"),))] == 3


def test_metrics_listen_in_use_is_exit_9_like_the_grpc_port(tmp_path):
    import socket
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        with pytest.raises(jw.AddressInUse):
            jw.MetricsServer(f"127.0.0.1:{blocker.getsockname()[1]}", jw.Metrics(2).registry)


# ================================================================================================
# CLI and jobworker.pyz (built once, run by every CPython on this machine as users do)
# ================================================================================================


PYTHONS = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-3].*/bin/python3")))


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """jobworker.pyz for every CPython 3.10-3.13 found here, built with build_zipapp.py."""
    assert len(PYTHONS) >= 4, f"CPython 3.10-3.13 expected under ~/.pyenv, found {PYTHONS}"
    out = tmp_path_factory.mktemp("pyz") / "jobworker.pyz"
    versions = ",".join(".".join(p.split("/versions/")[1].split(".")[:2]) for p in PYTHONS)
    subprocess.run([sys.executable, os.path.join(HERE, "build_zipapp.py"), "-o", str(out),
                    "--python", versions], check=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def venvs(tmp_path_factory):
    """{version: python} of venvs with no packages at all, one per CPython."""
    made = {}
    for python in PYTHONS:
        version = ".".join(python.split("/versions/")[1].split(".")[:2])
        d = tmp_path_factory.mktemp(f"venv{version}")
        subprocess.run([python, "-m", "venv", "--without-pip", str(d)], check=True, timeout=120)
        made[version] = str(d / "bin" / "python")
    return made


class ServeProcess:
    """`jobworker serve` in a subprocess on a free port; stop() sends SIGTERM."""

    def __init__(self, argv, certs, state, parent, listen="127.0.0.1:0", env=None, extra=(),
                 preexec=None):
        self.state = state
        self.proc = subprocess.Popen(
            [*argv, "serve", "--listen", listen, "--certs", str(certs), "--state-dir", str(state),
             "--cgroup-parent", parent, *extra], stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=preexec)
        self.lines = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving on" in line:
                    self.port = int(line.split("(port ")[1].split(")")[0])
                    ready.set()
        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not ready.wait(60):
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.lines))

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(10)
        return code


def cli_env(pki, port=None, name="client", host="127.0.0.1", base=None):
    """The environment of a CLI call as `name` (to host:port, if given). GRPC_VERBOSITY: this
    process set it for its own servers; a CLI chooses its own."""
    env = dict(base or {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"},
               JOBWORKER_CA=str(pki / "ca.crt"), JOBWORKER_CERT=str(pki / f"{name}.crt"),
               JOBWORKER_KEY=str(pki / f"{name}.key"))
    if port:
        env["JOBWORKER_SERVER"] = f"{host}:{port}"
    env.setdefault("JOBWORKER_MUX", "off")
    return env


def as_from_a_terminal():
    """preexec_fn of a CLI a test signals: the dispositions a shell on a terminal gives its
    commands (a suite started in the background, or by a wrapper, may have SIGINT ignored or
    blocked, and the CLI rightly keeps an inherited ignore)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


def cli(argv, *args, certs, port=None, host="127.0.0.1", name="client", timeout=60, env=None):
    return subprocess.run([*argv, *args], env=cli_env(certs, port, name, host, env),
                          capture_output=True, timeout=timeout)


SRC = [sys.executable, os.path.join(HERE, "jobworker.py")]


@pytest.fixture(scope="module")
def src_server(pki, tmp_path_factory):
    """`jobworker.py serve` from the source tree, as a separate process."""
    s = ServeProcess(SRC, pki, tmp_path_factory.mktemp("srcstate"), f"{RUN_PARENT}/src")
    yield s
    assert s.stop() == 0


@root
def test_cli_original_example_with_trailing_options(pki, src_server):
    r = cli(SRC, "start", "bash", "-c", "while true; do echo hello; sleep 1; done", "--cpu", "50%",
            "--memory", "256M", "--disk-io", "10MB/s", certs=pki, port=src_server.port)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.decode().strip()
    assert jw._JOB_ID_RE.fullmatch(job_id), r.stdout   # only the id on stdout
    q = cli(SRC, "query", job_id, "--json", certs=pki, port=src_server.port)
    d = json.loads(q.stdout)
    assert d["command"] == ["bash", "-c", "while true; do echo hello; sleep 1; done"]
    assert d["limits"] == {"cpu_percent": 50.0, "memory_bytes": 256 << 20,
                           "io_bytes_per_second": 10_000_000, "pids": jw.DEFAULT_PIDS_LIMIT}
    assert set(d) >= {"id", "owner", "command", "state", "exit_code", "signal", "oom_killed",
                      "started_at", "ended_at", "limits", "usage"}
    assert (d["state"], d["owner"]) == ("running", "client")
    human = cli(SRC, "query", job_id, certs=pki, port=src_server.port).stdout.decode()
    assert "State: running" in human and "cpu 50%" in human and "memory 256 MiB" in human
    stop = cli(SRC, "stop", job_id, "--grace", "1", certs=pki, port=src_server.port)
    assert stop.returncode == 0 and stop.stdout == f"{job_id} stopped (SIGTERM)\n".encode()
    listing = cli(SRC, "list", certs=pki, port=src_server.port).stdout.decode()
    assert job_id[:8] in listing and "stopped" in listing


@root
def test_cli_double_dash_gives_the_command_its_own_flags(pki, src_server):
    r = cli(SRC, "start", "--memory", "64M", "--", "echo", "--cpu", "50%", certs=pki,
            port=src_server.port)
    job_id = r.stdout.decode().strip()
    out = cli(SRC, "stream", job_id, certs=pki, port=src_server.port)
    assert out.stdout == b"--cpu 50%\n"
    d = json.loads(cli(SRC, "query", job_id, "--json", certs=pki, port=src_server.port).stdout)
    assert d["limits"]["memory_bytes"] == 64 << 20 and d["limits"]["cpu_percent"] is None


@root
def test_cli_stream_is_byte_exact_on_both_streams(pki, src_server):
    code = "import os; os.write(1, bytes(range(256)) * 1000); os.write(2, b'\\xff\\x00err')"
    job_id = cli(SRC, "start", "python3", "-c", code, certs=pki,
                 port=src_server.port).stdout.decode().strip()
    r = cli(SRC, "stream", job_id, certs=pki, port=src_server.port)
    assert r.returncode == 0
    assert r.stdout == bytes(range(256)) * 1000 and r.stderr == b"\xff\x00err"


@root
def test_cli_ctrl_c_leaves_stream_quietly_with_130(pki, src_server):
    job_id = cli(SRC, "start", "sh", "-c", "echo up; sleep 600", certs=pki,
                 port=src_server.port).stdout.decode().strip()
    p = subprocess.Popen([*SRC, "stream", job_id], env=cli_env(pki, src_server.port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=as_from_a_terminal)
    assert p.stdout.readline() == b"up\n"   # the stream is live
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err == b""
    assert cli(SRC, "stop", job_id, "--grace", "0", certs=pki, port=src_server.port).returncode == 0


@root
@pytest.mark.parametrize("args,code,message", [
    (["query", "6f9619ff-8b86-4011-b42d-00c04fc964ff"], 4, "no such job"),
    (["query", "../etc"], 6, "invalid job_id"),
    (["start", "--memory", "10XB", "true"], 2, "invalid --memory '10XB'"),   # checked here
    (["start", "no-such-program-xyz"], 6, "no such file: no-such-program-xyz"),
    (["start", "--cpu", "0%", "true"], 6, "invalid --cpu '0%'"),   # by the server's CPUs
])
def test_cli_errors_are_one_line_with_distinct_exit_codes(args, code, message, pki, src_server):
    r = cli(SRC, *args, certs=pki, port=src_server.port)
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert err.startswith("jobworker: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["certs", "init", "{d}/pki"],                        # a CA is there already
    ["certs", "issue", "{d}/nowhere", "bob", "--role", "reader"],
    ["certs", "revoke", "{d}/pki", "nobody-such"],
    ["context", "use", "nosuch"], ["context", "rm", "nosuch"],
    ["context", "add", "x", "--server", "h", "--ca", "{d}/no.crt", "--cert", "{d}/no.crt",
     "--key", "{d}/no.key"],
    ["completion", "fish"], ["doctor", "--certs", "{d}/nowhere"],
    ["serve", "--certs", "{d}/nowhere", "--state-dir", "{d}/state"],
    ["serve", "--key", "{d}/pki/server.key", "--state-dir", "{d}/state"],   # --ca, --cert?
    ["start", "--memory", "10X", "true"], ["start", "--pids", "-3", "true"],
])
def test_local_failures_never_say_server_error(argv, tmp_path):
    # A failure of the CLI's own (no server involved) exits 1 or 2, never 8 (server error).
    jw.certs_init(str(tmp_path / "pki"))
    argv = [a.format(d=tmp_path) for a in argv]
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path))
    if argv[0] == "doctor" and os.geteuid() == 0:
        pytest.skip("doctor is checked here without root (the fast tier, as a user); as root "
                    "it would probe the default cgroup parent, not the run's")
    r = subprocess.run([*SRC, *argv], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode in (1, 2), (r.returncode, r.stderr)
    said = r.stdout if argv[0] == "doctor" else r.stderr   # doctor's report is its output
    assert said.startswith(("jobworker: ", "usage: ", "FAIL", "ok")) and "Traceback" not in said
    assert not (tmp_path / "state").exists()   # a serve that could not start made nothing


def test_cli_words_as_a_user_types_them(tmp_path):
    run = lambda *a: subprocess.run([*SRC, *a], capture_output=True, text=True, timeout=60)
    bare = run()
    assert bare.returncode == 2 and "SUBCOMMAND" in bare.stderr and " run " in bare.stderr
    top = run("--help")
    assert "--cpu 50%)" in top.stdout and "%%" not in top.stdout
    assert "list (ps)" in top.stdout and "stream (logs)" in top.stdout
    assert run("ps", "-h").stdout.startswith("usage: jobworker list")
    assert run("logs", "-h").stdout.startswith("usage: jobworker stream")
    mem = run("run", "--memory", "10X", "--", "true")
    assert mem.returncode == 2 and mem.stderr.startswith("jobworker: invalid --memory '10X'")
    for sub in ("stop", "run", "list", "health"):   # the connection flags in a group of theirs
        helped = run(sub, "-h").stdout
        assert "\nconnection:\n  --server HOST[:PORT]  the server (env JOBWORKER_SERVER" in helped
    serve = run("serve", "--certs", str(tmp_path / "none"), "--state-dir", str(tmp_path / "s"))
    assert serve.returncode == 1 and "jobworker certs init" in serve.stderr, serve.stderr
    assert "--certs DIR" in serve.stderr and not (tmp_path / "s").exists()


def test_readme_first_steps_are_what_make_run_prints():
    said = subprocess.run(["make", "-n", "run"], cwd=HERE, capture_output=True, text=True,
                          timeout=60).stdout
    printed = [line[len('echo "'):-1].replace("\\$", "$") for line in said.splitlines()
               if line.startswith('echo "    ')]
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("`make run` prints what to try from a second terminal:\n\n", 1)[1]
    block = block.split("\n\n", 1)[0].splitlines()
    assert len(printed) >= 5 and printed == block
    second = subprocess.run(["make", "-n", "run", "PORT=50052", "STATE=build/s2",
                             "CGROUP_PARENT=dev2"], cwd=HERE, capture_output=True, text=True,
                            timeout=60).stdout
    assert "export JOBWORKER_SERVER=localhost:50052" in second
    assert ("serve --listen localhost:50052 --certs certs --state-dir build/s2 "
            "--cgroup-parent dev2") in second


def test_cli_start_without_a_command_is_a_usage_error():
    r = subprocess.run([*SRC, "start", "--cpu", "50%"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "a command to run is required" in r.stderr
    r = subprocess.run([*SRC, "start", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "after `--` everything is the" in r.stdout


@root
def test_cli_reader_may_not_start(pki, src_server):
    r = cli(SRC, "start", "true", certs=pki, port=src_server.port, name="reader")
    assert r.returncode == 5 and r.stderr.decode().startswith("jobworker: role reader may not")


def test_cli_connection_failure_names_server_and_files(pki):
    with socket_port() as port:
        r = cli(SRC, "list", certs=pki, port=port, timeout=90)
    err = r.stderr.decode()
    assert r.returncode == 3
    assert f"127.0.0.1:{port}" in err and str(pki / "client.crt") in err and err.count("\n") == 1
    r = cli(SRC, "list", "--cert", "/nonexistent.crt", certs=pki, port=port)
    assert r.returncode == 3 and "/nonexistent.crt" in r.stderr.decode()


@contextlib.contextmanager
def socket_port():
    """A loopback port with nothing listening on it."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@root
def test_cli_list_walks_every_page_of_50_jobs_with_250_kb_argv(pki, src_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=src_server.port)
    argv = ["true", "x" * (125 << 10), "y" * (125 << 10)]
    big = [run("start", "--", *argv).stdout.decode().strip() for _ in range(50)]
    assert all(jw._JOB_ID_RE.fullmatch(j) for j in big)
    r = run("list", "--json")
    assert r.returncode == 0, r.stderr[-500:]
    jobs = json.loads(r.stdout)          # one array, oldest first, every page
    ids = [j["id"] for j in jobs]
    assert set(big) <= set(ids) and len(ids) == len(set(ids))
    assert [j["started_at"] for j in jobs] == sorted(j["started_at"] for j in jobs)
    human = run("list")
    assert human.returncode == 0 and all(j[:8] in human.stdout.decode() for j in big)
    last = json.loads(run("list", "--json", "--last", "3").stdout)
    assert [j["id"] for j in last] == ids[-3:]
    running = run("start", "sleep", "600").stdout.decode().strip()
    only = json.loads(run("list", "--json", "--state", "running").stdout)
    assert running in [j["id"] for j in only] and {j["state"] for j in only} == {"running"}
    mixed = json.loads(run("list", "--json", "--state", "running,exited").stdout)
    assert {j["state"] for j in mixed} <= {"running", "exited"} and set(big) <= \
        {j["id"] for j in mixed}
    assert json.loads(run("list", "--json", "--owner", "nobody-at-all").stdout) == []
    bad = run("list", "--state", "sleeping")
    assert bad.returncode == 2 and b"--state" in bad.stderr and b"running" in bad.stderr
    run("stop", running, "--grace", "0")


@root
def test_cli_rm_removes_each_and_reports_each_failure(pki, src_server):
    run = lambda *a, name="client": cli(SRC, *a, certs=pki, port=src_server.port, name=name)
    done = [run("start", "true").stdout.decode().strip() for _ in range(2)]
    running = run("start", "sleep", "600").stdout.decode().strip()
    for j in done:
        run("stream", j)
    unknown = "6f9619ff-8b86-4011-b42d-00c04fc964ff"
    r = run("rm", running, done[0], unknown, done[1])
    err = r.stderr.decode().splitlines()
    assert r.returncode == 6 and len(err) == 2
    assert err[0] == f"jobworker: job {running} is running; stop it first"
    assert err[1] == f"jobworker: no such job: {unknown}"
    for j in done:
        assert run("query", j).returncode == 4
    r = run("rm", unknown)
    assert r.returncode == 4
    assert run("rm", running, name="reader").returncode == 5
    run("stop", running, "--grace", "0")
    assert run("rm", running).returncode == 0 and run("query", running).returncode == 4


@root
def test_serve_retention_flags_and_a_restart_after_removals(pki, tmp_path):
    for flags, says in [(["--keep-for", "3x"], "argument --keep-for: invalid value '3x': "
                                                "seconds, or a number with s, m, h or d"),
                        (["--keep-finished", "-1"], "argument --keep-finished: invalid value")]:
        r = subprocess.run([*SRC, "serve", *flags], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    state, parent = tmp_path / "state", f"{RUN_PARENT}/keep"
    server = ServeProcess([*SRC], pki, state, parent, extra=["--keep-finished", "3"])
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    try:
        jobs = []
        for i in range(5):
            jobs.append(run("start", "echo", str(i)).stdout.decode().strip())
            run("stream", jobs[-1])
        running = run("start", "sleep", "600").stdout.decode().strip()
        kept = [j["id"] for j in json.loads(run("list", "--json").stdout)]
        assert kept == jobs[2:] + [running]                  # the 3 newest finished, and running
        assert sorted(os.listdir(state / "jobs")) == sorted(kept)
        assert run("rm", jobs[3]).returncode == 0
    finally:
        assert server.stop() == 0                           # stops the running job
    server = ServeProcess([*SRC], pki, state, parent, extra=["--keep-finished", "3"])
    try:
        after = [j["id"] for j in json.loads(run("list", "--json").stdout)]
        assert after == [jobs[2], jobs[4], running]
        assert run("stream", jobs[4]).stdout == b"4\n"
    finally:
        assert server.stop() == 0


@root
def test_a_job_of_the_server_cannot_read_its_key(pki, src_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=src_server.port)
    job = run("start", "sh", "-c", f"cat {pki}/server.key; ls -A {pki}").stdout.decode().strip()
    r = run("stream", job)
    assert b"PRIVATE KEY" not in r.stdout and b"server.crt" not in r.stdout
    assert b"No such file" in r.stderr
    assert b"PRIVATE KEY" in (pki / "server.key").read_bytes()


AUDITED_SERVE = """
import logging, sys
sys.path.insert(0, sys.argv[1])
import jobworker
serving = []
logging.getLogger("jobworker").addFilter(
    lambda r: serving.append(1) or True if r.getMessage().startswith("serving on") else True)
sys.addaudithook(lambda event, args: event == "import" and serving and print(
    "IMPORTED", args[0], file=sys.stderr, flush=True))
sys.exit(jobworker.main(sys.argv[2:]))
"""


@root
def test_the_server_imports_nothing_once_it_serves(pki, tmp_path):
    server = ServeProcess([sys.executable, "-c", AUDITED_SERVE, HERE], pki, tmp_path / "state",
                          f"{RUN_PARENT}/audit")
    try:
        peer = Peer(pki, server.port, "alice")
        job = peer.start("sh", "-c", "echo hi; exit 3")
        peer.stream(job)
        for method in ("Query", "Stop", "Remove", "Query"):
            peer.call(method, job)
        peer.start("sleep", "600")
        peer.list(states=[pb.JOB_STATE_RUNNING], page_size=1)
        for name in ("reader", "norole", "expired", "malformed"):
            Peer(pki, server.port, name).call("Start")
        with pytest.raises(grpc.RpcError):
            peer.channel.unary_unary(f"/{jw.SERVICE_NAME}/Query")(b"\xff\xff", timeout=30)
        peer.close()
    finally:
        assert server.stop() == 0
    assert not [line for line in server.lines if line.startswith("IMPORTED")], server.lines


@root
def test_cli_flags_win_over_environment(pki, src_server):
    r = cli(SRC, "list", "--server", f"127.0.0.1:{src_server.port}", certs=pki, port=1)
    assert r.returncode == 0, r.stderr


@root
def test_cli_client_commands_do_not_import_cryptography(pki, src_server):
    code = ("import sys; sys.path.insert(0, %r); import jobworker; "
            "rc = jobworker.main(['list', '--json']); "
            "print('cryptography' in sys.modules, rc, file=sys.stderr)") % HERE
    r = cli([sys.executable, "-c", code], certs=pki, port=src_server.port)
    assert r.stderr.decode().split()[-2:] == ["False", "0"]
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import "
                        "jobworker; print(sorted(m for m in ('grpc', 'cryptography', "
                        "'google.protobuf') if m in sys.modules))" % HERE],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "[]"


@slow
def test_pyz_is_reproducible(pyz, tmp_path):
    again = tmp_path / "again.pyz"
    subprocess.run([sys.executable, os.path.join(HERE, "build_zipapp.py"), "-o", str(again),
                    "--python", ",".join(".".join(p.split("/versions/")[1].split(".")[:2])
                                         for p in PYTHONS)], check=True, timeout=600)
    assert again.read_bytes() == pyz.read_bytes()
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(pyz, os.X_OK)
    import zipfile
    names = zipfile.ZipFile(pyz).namelist()
    assert {"__main__.py", "jobworker.py", "jobworker_pb2.py", "jobworker_pb2_grpc.py"} <= set(names)
    r = subprocess.run([str(pyz), "completion", "bash"], capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout == zipfile.ZipFile(pyz).read("completions/jobworker.bash")
    assert subprocess.run(["bash", "-n"], input=r.stdout, timeout=60).returncode == 0


@slow
def test_pyz_first_runs_race_safely_into_a_private_cache(pyz, venvs, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, JOBWORKER_CACHE_DIR=str(cache))
    python = venvs["3.11"] if "3.11" in venvs else next(iter(venvs.values()))
    procs = [subprocess.Popen([python, str(pyz), "--version"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(8)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 and out.startswith(b"jobworker ") for out, _, rc in results), results
    extracted = [p for p in os.listdir(cache)]
    assert len(extracted) == 1 and not extracted[0].startswith(".")
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert (cache / extracted[0]).stat().st_mode & 0o777 == 0o700


@slow
def test_pyz_refuses_an_unsafe_cache_dir(pyz, venvs, tmp_path):
    python = next(iter(venvs.values()))
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    r = subprocess.run([python, str(pyz), "--version"], capture_output=True, timeout=60,
                       env=dict(os.environ, JOBWORKER_CACHE_DIR=str(link)))
    assert r.returncode == 1 and b"symlink" in r.stderr
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    r = subprocess.run([python, str(pyz), "--version"], capture_output=True, timeout=60,
                       env=dict(os.environ, JOBWORKER_CACHE_DIR=str(open_dir)))
    assert r.returncode == 1 and b"chmod 700" in r.stderr


@slow
def test_pyz_names_the_targets_when_none_fits(pyz):
    old = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9.*/bin/python3")))
    if not old:
        pytest.skip("no CPython 3.9 here to try")
    r = subprocess.run([old[0], str(pyz), "--version"], capture_output=True, timeout=60)
    assert r.returncode == 1
    assert b"no packages for cpython 3.9" in r.stderr and b"cp310-" in r.stderr


@root
@slow
@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_pyz_end_to_end_on_each_python(version, pyz, venvs, tmp_path):
    python = venvs.get(version)
    assert python, f"CPython {version} missing"
    env = dict(os.environ, JOBWORKER_CACHE_DIR=str(tmp_path / "cache"))
    argv = [python, str(pyz)]
    r = subprocess.run([*argv, "--version"], capture_output=True, env=env, timeout=120)
    assert r.stdout.decode().strip() == f"jobworker {jw.__version__}"
    certs = tmp_path / "certs"
    for args in (["certs", "init", str(certs)], ["certs", "issue", str(certs), "client", "--role",
                                                 "writer"]):
        assert subprocess.run([*argv, *args], env=env, timeout=120).returncode == 0
    server = ServeProcess(argv, certs, tmp_path / "state", f"{RUN_PARENT}/pyz{version}", env=env,
                          extra=["--metrics-listen", "127.0.0.1:0"])
    try:
        job_id = cli(argv, "start", "sh", "-c", "echo out; echo err >&2; exit 3", certs=certs,
                     port=server.port, env=env).stdout.decode().strip()
        s = cli(argv, "stream", job_id, certs=certs, port=server.port, env=env)
        assert (s.stdout, s.stderr, s.returncode) == (b"out\n", b"err\n", 0)
        d = json.loads(cli(argv, "query", job_id, "--json", certs=certs, port=server.port,
                           env=env).stdout)
        assert (d["state"], d["exit_code"]) == ("exited", 3)
        # the bundled ops packages: health (CLI), reflection (on by default), metrics
        r = cli(argv, "run", "sh", "-c", "echo again; exit 3", certs=certs, port=server.port,
                env=env)
        assert (r.returncode, r.stdout) == (3, b"again\n")
        h = cli(argv, "health", certs=certs, port=server.port, env=env)
        assert (h.returncode, h.stdout) == (0, b"SERVING\n"), h
        assert 'jobworker_jobs_started_total{owner="client"} 2.0' in scrape(server).decode()
    finally:
        assert server.stop() == 0


def scrape(server, path="/metrics"):
    """The body of an HTTP GET of a ServeProcess's metrics port (from its log line)."""
    import urllib.request
    line = next(x for x in server.lines if "metrics on" in x)
    port = int(line.split("(port ")[1].split(")")[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return r.read()


def streams_open(server):
    """Stream calls the ServeProcess (serving metrics) has open now."""
    return float(re.search(rb"^jobworker_streams_open (\S+)$", scrape(server), re.M).group(1))


def serve_once(pki, state, parent, listen="127.0.0.1:0", certs=None):
    """`serve` expected to refuse to start: (exit code, stderr)."""
    r = subprocess.run([*SRC, "serve", "--listen", listen, "--certs", str(certs or pki),
                        "--state-dir", str(state), "--cgroup-parent", parent],
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr


@root
def test_a_second_server_by_mistake_touches_nothing_of_the_first(pki, tmp_path):
    parent = f"{RUN_PARENT}/twice"
    server = ServeProcess(SRC, pki, tmp_path / "state", parent)
    driver = jw.detect_cgroups(parent)
    try:
        run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
        job = run("start", "sleep", "600").stdout.decode().strip()
        record = (tmp_path / "state" / "jobs" / job / "job.json").read_bytes()
        for attempt in range(2):
            # another state dir, the same cgroup parent, the port in use
            code, err = serve_once(pki, tmp_path / f"other{attempt}", parent,
                                   f"127.0.0.1:{server.port}")
            assert code == 10, err
            assert f"pid {server.proc.pid}" in err and "job cgroup parent" in err, err
            assert "give it its own with --cgroup-parent" in err, err
            assert not (tmp_path / f"other{attempt}").exists()   # nor a state dir of its own
            # the same state dir
            code, err = serve_once(pki, tmp_path / "state", f"{RUN_PARENT}/elsewhere")
            assert code == 10 and f"pid {server.proc.pid}" in err and "state dir" in err, err
            assert "give it its own with --state-dir" in err, err
        assert driver.leftover_job_ids() == [job]
        assert json.loads(run("query", job, "--json").stdout)["state"] == "running"
        assert (tmp_path / "state" / "jobs" / job / "job.json").read_bytes() == record
        assert run("start", "true").returncode == 0          # the first server still works
        assert not os.path.exists(f"{jw.CGROUP_ROOT}/pids/{RUN_PARENT}/elsewhere")
        run("stop", job, "--grace", "0")
    finally:
        assert server.stop() == 0


@root
def test_a_server_that_cannot_start_leaves_no_cgroup_behind(pki, tmp_path):
    import socket
    with socket.socket() as blocker:   # another process's listener on the port
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        code, err = serve_once(pki, tmp_path / "a", f"{RUN_PARENT}/inuse",
                               f"127.0.0.1:{blocker.getsockname()[1]}")
    assert code == 9 and "in use" in err and "Traceback" not in err, err
    broken = tmp_path / "broken"
    shutil.copytree(pki, broken)
    (broken / "ca.crt").unlink()
    code, err = serve_once(pki, tmp_path / "b", f"{RUN_PARENT}/nocerts", certs=broken)
    assert code == 1 and "ca.crt" in err, err
    for parent in ("inuse", "nocerts"):
        assert jw.detect_cgroups(f"{RUN_PARENT}/{parent}").leftover_job_ids() == []
        assert not glob.glob(f"{jw.CGROUP_ROOT}/*/{RUN_PARENT}/{parent}"), parent


def patched_pyz(tmp_path, name, replacements):
    """A pyz for CPython 3.11 built from this tree with jobworker.py edited: another build."""
    src = tmp_path / f"src-{name}"
    src.mkdir()
    for f in ("jobworker.py", "jobworker.proto", "build_zipapp.py", "zipapp_main.py",
              "requirements.txt"):
        shutil.copy(os.path.join(HERE, f), src / f)
    code = (src / "jobworker.py").read_text()
    for old, new in replacements:
        assert old in code, old
        code = code.replace(old, new)
    (src / "jobworker.py").write_text(code)
    out = tmp_path / f"{name}.pyz"
    subprocess.run([sys.executable, str(src / "build_zipapp.py"), "-o", str(out), "--python",
                    "3.11", "--wheel-cache", os.path.join(HERE, "build", "wheels")],
                   check=True, timeout=600, capture_output=True)
    return out


@root
@slow
def test_an_upgrade_adopts_the_jobs_and_an_incompatible_build_touches_nothing(pyz, venvs,
                                                                             pki, tmp_path):
    python = venvs["3.11"]
    env = dict(os.environ, JOBWORKER_CACHE_DIR=str(tmp_path / "cache"))
    newer = patched_pyz(tmp_path, "newer", [  # a compatible change: a new field in the hello
        ('__version__ = "', '__version__ = "9.9-'),
        ('"live_restore": self.live_restore})', '"live_restore": self.live_restore, '
                                                '"feature": "newer"})')])
    version = jw.LAUNCHER_PROTOCOL
    other = patched_pyz(tmp_path, "other", [(f"\nLAUNCHER_PROTOCOL = {version}\n",
                                             f"\nLAUNCHER_PROTOCOL = {version + 1}\n")])
    state, parent = tmp_path / "state", f"{RUN_PARENT}/upgrade"
    serve = lambda p, **kw: ServeProcess([python, str(p)], pki, state, parent, env=env, **kw)
    server = serve(pyz)
    run = lambda *a: cli([python, str(pyz)], *a, certs=pki, port=server.port, env=env)
    job = run("start", "sh", "-c", COUNTER).stdout.decode().strip()
    wait_for(lambda: (state / "jobs" / job / "output.log").stat().st_size > 20, what="output")
    launcher = launcher_of(state)
    server.proc.kill()                       # as an upgrade under systemd (KillMode=process)
    server.proc.wait(30)
    r = subprocess.run([python, str(other), "serve", "--listen", "127.0.0.1:0", "--certs",
                        str(pki), "--state-dir", str(state), "--cgroup-parent", parent],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 11, r.stderr
    assert f"pid {launcher}, holding 1 running job" in r.stderr
    assert f"protocol {version};" in r.stderr
    assert launcher_of(state) == launcher and pid_alive(launcher)
    assert jw.detect_cgroups(parent).leftover_job_ids() == [job]   # untouched
    server = serve(newer)
    try:
        assert json.loads(run("query", job, "--json").stdout)["state"] == "running"
        assert cli([python, str(newer)], "--version", certs=pki).stdout.startswith(
            b"jobworker 9.9-")
        run("stop", job, "--grace", "0")
        seen = numbers(run("stream", job).stdout)
        assert seen == list(range(len(seen))) and len(seen) > 20
    finally:
        assert server.stop() == 0
    assert not pid_alive(launcher)


@root
def test_serve_sigterm_ends_streams_stops_jobs_and_exits_0(pki, tmp_path):
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/sigterm")
    parent = jw.detect_cgroups(f"{RUN_PARENT}/sigterm")
    job_id = cli(SRC, "start", "sh", "-c", "echo started; sleep 600", certs=pki,
                 port=server.port).stdout.decode().strip()
    peer = Peer(pki, server.port, "client")
    results = {}
    t = threading.Thread(target=lambda: results.update(s=peer.stream(job_id)))
    t.start()
    wait_for(lambda: parent.leftover_job_ids() == [job_id], what="the job cgroup")
    time.sleep(0.5)
    assert server.stop() == 0
    t.join(30)
    out, _, final = results["s"]
    assert out == b"started\n" and final.state == pb.JOB_STATE_STOPPED
    assert parent.leftover_job_ids() == []
    record = json.load(open(tmp_path / "state" / "jobs" / job_id / "job.json"))
    assert record["state"] == "stopped"
    peer.close()


# -- run and wait: exit codes, signals, restarts; per-job env, workdir, timeout and name ---------


@pytest.fixture(scope="module")
def quick_server(pki, tmp_path_factory):
    """A server whose Stop grace is 1 s (timeouts and Ctrl-C end in a second)."""
    s = ServeProcess(SRC, pki, tmp_path_factory.mktemp("quick"), f"{RUN_PARENT}/quick",
                     extra=["--grace", "1"])
    yield s
    assert s.stop() == 0


@root
def test_run_rm_leaves_no_job_behind_and_exits_as_the_job_did(pki, quick_server):
    name = f"rm-{uuid.uuid4().hex[:8]}"
    r = cli(SRC, "run", "--rm", "--name", name, "--", "sh", "-c", "echo hi; exit 4", certs=pki,
            port=quick_server.port)
    assert (r.returncode, r.stdout, r.stderr) == (4, b"hi\n", b"")
    r = cli(SRC, "list", "--name", name, "-q", certs=pki, port=quick_server.port)
    assert r.returncode == 0 and r.stdout == b""
    r = cli(SRC, "run", "--name", name, "--", "sh", "-c", "exit 4", "--rm", certs=pki,
            port=quick_server.port)   # only before the command: here it is the command's
    assert r.returncode == 4
    assert cli(SRC, "list", "--name", name, "-q", certs=pki, port=quick_server.port).stdout


@root
@pytest.mark.parametrize("script, code", [
    ("printf 'out\\0\\377'; printf 'err\\n' >&2", 0),
    ("printf out; printf 'err\\n' >&2; exit 3", 3),
    ("printf out; printf 'err\\n' >&2; kill -9 $$", 137),
    ("printf out; printf 'err\\n' >&2; kill -USR1 $$", 128 + signal.SIGUSR1),
])
def test_run_streams_byte_exact_and_exits_as_the_job_did(script, code, pki, quick_server):
    r = cli(SRC, "run", "sh", "-c", script, certs=pki, port=quick_server.port)
    assert r.returncode == code, r
    assert r.stdout.startswith(b"out") and r.stderr == b"err\n"   # nothing of jobworker's own
    if code == 0:
        assert r.stdout == b"out\0\377"


@root
def test_run_of_an_oom_killed_job_exits_137_and_says_so(pki, quick_server):
    r = cli(SRC, "run", "--memory", "32M", "--", "python3", "-c", "x = bytearray(512 << 20)",
            certs=pki, port=quick_server.port)
    assert r.returncode == 137, r
    last = r.stderr.decode().rstrip("\n").split("\n")[-1]
    assert last.startswith("jobworker: ") and "OOM killer" in last and "32 MiB" in last, r.stderr


@root
def test_a_timeout_stops_a_job_that_ignores_sigterm_after_the_grace(pki, quick_server):
    t0 = time.monotonic()
    r = cli(SRC, "run", "--timeout", "1s", "--", "sh", "-c", "trap '' TERM; echo up; sleep 600",
            certs=pki, port=quick_server.port)
    took = time.monotonic() - t0
    assert r.returncode == 124, r
    assert r.stdout == b"up\n" and b"ran past its timeout of 1.0s" in r.stderr
    assert 2.0 <= took < 30   # the timeout, then the server's 1 s grace before SIGKILL
    job = json.loads(cli(SRC, "list", "--last", "1", "--json", certs=pki,
                         port=quick_server.port).stdout)[0]
    assert (job["state"], job["signal"], job["timed_out"]) == ("stopped", "SIGKILL", True)
    assert job["timeout_seconds"] == 1.0
    assert "timed out after 1.0s" in cli(SRC, "query", job["id"], certs=pki,
                                         port=quick_server.port).stdout.decode()


@root
def test_a_timeout_stops_the_job_as_stop_does(make_manager):
    m = make_manager(grace=1)
    t0 = time.monotonic()
    s = m.start("sleep", ["60"], timeout=0.3)
    final = wait_final(m, s.id)
    assert time.monotonic() - t0 < 20
    assert (final.state, final.signal, final.timed_out) == (jw.STOPPED, signal.SIGTERM, True)
    fast = m.start("true", [], timeout=30)
    assert wait_final(m, fast.id).timed_out is False


@root
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_run_stops_its_job_on_ctrl_c_or_sigterm(sig, code, pki, quick_server):
    p = subprocess.Popen([*SRC, "run", "sh", "-c", "echo started; sleep 600"],
                         env=cli_env(pki, quick_server.port), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=as_from_a_terminal)
    assert p.stdout.readline() == b"started\n"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    job = json.loads(cli(SRC, "list", "--last", "1", "--json", certs=pki,
                         port=quick_server.port).stdout)[0]
    assert job["state"] == "stopped" and job["command"][-1] == "echo started; sleep 600"
    assert f"job {job['id']} stopped (SIGTERM)".encode() in err, err


@root
def test_a_second_ctrl_c_leaves_run_at_once_and_the_stop_goes_on(pki, src_server):
    # src_server's grace is the default 10 s: the job ignores SIGTERM and outlives `run`.
    script = "trap 'echo term' TERM; echo started; while :; do sleep 0.1; done"
    p = subprocess.Popen([*SRC, "run", "sh", "-c", script],
                         env=cli_env(pki, src_server.port), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=as_from_a_terminal)
    assert p.stdout.readline() == b"started\n"
    run = lambda *a: cli(SRC, *a, certs=pki, port=src_server.port)
    job = json.loads(run("list", "--last", "1", "--json").stdout)[0]
    p.send_signal(signal.SIGINT)
    wait_for(lambda: b"term" in run("stream", job["id"], "--no-follow").stdout,
             what="run's Stop to reach the job")
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and time.monotonic() - t0 < jw.DEFAULT_GRACE_SECONDS / 2, err
    assert b"is being stopped" in err
    job = json.loads(run("list", "--last", "1", "--json").stdout)[0]
    assert job["state"] == "running"           # still in its grace period
    w = cli(SRC, "wait", job["id"], certs=pki, port=src_server.port)
    assert w.returncode == 137                 # SIGKILL after the grace


@root
def test_run_detach_is_start(pki, quick_server):
    r = cli(SRC, "run", "--detach", "sleep", "0", certs=pki, port=quick_server.port)
    assert r.returncode == 0 and jw._JOB_ID_RE.fullmatch(r.stdout.decode().strip()), r


@root
def test_run_errors_exit_as_start_does(pki, quick_server):
    r = cli(SRC, "run", "--memory", "lots", "true", certs=pki, port=quick_server.port)
    assert r.returncode == 2 and b"invalid --memory 'lots'" in r.stderr
    r = cli(SRC, "run", "/no/such/program", certs=pki, port=quick_server.port)
    assert r.returncode == 6 and b"no such file: /no/such/program" in r.stderr
    r = cli(SRC, "run", certs=pki, port=quick_server.port)
    assert r.returncode == 2 and b"a command to run is required" in r.stderr
    r = cli(SRC, "run", "true", certs=pki, port=quick_server.port, name="reader")
    assert r.returncode == 5


@root
def test_wait_for_running_ended_several_and_unknown_jobs(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    ended = run("start", "sh", "-c", "exit 4").stdout.decode().strip()
    wait_for(lambda: json.loads(run("query", ended, "--json").stdout)["state"] == "exited",
             what="the job to end")
    t0 = time.monotonic()
    assert run("wait", ended).returncode == 4 and time.monotonic() - t0 < 10
    slow = run("start", "sh", "-c", "sleep 1.5; exit 7").stdout.decode().strip()
    killed = run("start", "sh", "-c", "sleep 0.5; kill -9 $$").stdout.decode().strip()
    r = run("wait", killed, slow)
    assert r.returncode == 7 and r.stdout == b"" and r.stderr == b""   # the last one's
    assert json.loads(run("query", slow, "--json").stdout)["state"] == "exited"
    r = run("wait", slow, killed, "--json")
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert r.returncode == 137 and [d["id"] for d in lines] == [slow, killed]
    assert lines[1]["signal"] == "SIGKILL"
    missing = str(uuid.uuid4())
    r = run("wait", slow, missing)
    assert r.returncode == 4 and missing.encode() in r.stderr and r.stdout == b""
    import pty   # a person at a terminal hears how each ended, on stderr
    leader, follower = pty.openpty()
    try:
        r = subprocess.run([*SRC, "wait", killed, slow], env=cli_env(pki, quick_server.port),
                           stdout=follower, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 7 and r.stderr == (f"{killed} exited (SIGKILL)\n"
                                              f"{slow} exited (exit code 7)\n").encode()


@root
def test_run_and_wait_go_on_across_a_server_upgrade(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/runrestart"
    server = ServeProcess(SRC, pki, state, parent, listen="127.0.0.1:0",
                          extra=["--keep-jobs", "--metrics-listen", "127.0.0.1:0"])
    port = server.port
    env = cli_env(pki, port)
    script = "for i in $(seq 1 30); do echo line $i; sleep 0.1; done; echo done >&2; exit 5"
    runner = subprocess.Popen([*SRC, "run", "--name", "upgrade", "sh", "-c", script], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert runner.stdout.readline() == b"line 1\n"
    waiter = subprocess.Popen([*SRC, "wait", "--json", *json.loads(cli(
        SRC, "list", "--json", certs=pki, port=port).stdout)[0]["id"].split()], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: streams_open(server) == 2, what="the runner's and the waiter's streams")
    assert server.stop() == 0   # --keep-jobs: the job goes on without a server
    server = ServeProcess(SRC, pki, state, parent, listen=f"127.0.0.1:{port}",
                          extra=["--keep-jobs"])
    try:
        out, err = runner.communicate(timeout=90)
        assert runner.returncode == 5, err
        assert b"line 1\n" + out == b"".join(f"line {i}\n".encode() for i in range(1, 31))
        assert err == b"done\n"                      # no line twice, none lost, nothing extra
        wout, werr = waiter.communicate(timeout=60)
        assert waiter.returncode == 5, werr
        d = json.loads(wout)
        assert (d["state"], d["exit_code"], d["name"]) == ("exited", 5, "upgrade")
    finally:
        server.stop()


@root
def test_wait_for_a_job_lost_in_a_crash_exits_125(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/waitlost"
    server = ServeProcess(SRC, pki, state, parent,
                          extra=["--no-live-restore", "--metrics-listen", "127.0.0.1:0"])
    port = server.port
    job = cli(SRC, "start", "sleep", "600", certs=pki, port=port).stdout.decode().strip()
    waiter = subprocess.Popen([*SRC, "wait", job], env=cli_env(pki, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:   # the waiter is waiting before the crash (one that came after it would pass too)
        wait_for(lambda: streams_open(server) == 1, what="the waiter's stream")
    except AssertionError:
        waiter.kill()
        server.stop()
        raise
    server.proc.kill()           # a crash: without live restore its jobs end with it
    server.proc.wait(30)
    server = ServeProcess(SRC, pki, state, parent, listen=f"127.0.0.1:{port}",
                          extra=["--no-live-restore"])
    try:
        out, err = waiter.communicate(timeout=90)
        assert waiter.returncode == 125, err
        assert cli(SRC, "wait", job, certs=pki, port=port).returncode == 125
    finally:
        assert server.stop() == 0


@root
def test_env_reaches_the_job_and_its_values_are_never_shown(pki, quick_server, tmp_path):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    r = run("run", "--env", "SECRET=hunter2=x", "--env", "PATH=/usr/bin:/bin", "--env",
            "EMPTY=", "--", "sh", "-c", 'echo "$SECRET|$PATH|${EMPTY-unset}|$HOME"')
    assert r.returncode == 0 and r.stdout == b"hunter2=x|/usr/bin:/bin||/root\n", r
    job = json.loads(run("list", "--last", "1", "--json").stdout)[0]
    assert job["env_keys"] == ["EMPTY", "PATH", "SECRET"]
    for shown in (run("query", job["id"]).stdout, run("query", job["id"], "--json").stdout,
                  run("list", "--json").stdout):
        assert b"hunter2" not in shown
    assert b"SECRET" in run("query", job["id"]).stdout
    records = list(pathlib.Path(quick_server.state).glob(f"jobs/{job['id']}/*"))
    assert records and not [p for p in records if p.is_file() and b"hunter2" in p.read_bytes()
                            and p.name != "output.log"]
    for bad, why in [("1X=a", b"NAME=VALUE"), ("NOEQUALS_UNSET", b"not set here"),
                     ("A B=c", b"NAME")]:
        r = run("start", "--env", bad, "true")
        assert r.returncode == 2 and why in r.stderr, r


def test_env_is_checked_and_counts_toward_the_request_cap():
    assert jw.validate_env({"A": "1", "_b9": ""}) == {"A": "1", "_b9": ""}
    for env in ({"9A": "x"}, {"A-B": "x"}, {"": "x"}, {"A": "x\0y"}):
        with pytest.raises(jw.InvalidArgument) as e:
            jw.validate_env(env)
        assert "x\0y" not in str(e.value)   # a value is never echoed back
    big = "x" * (jw.MAX_ARGV_BYTES // 2)
    jw.validate_command("true", [big], {})
    with pytest.raises(jw.CapReached):
        jw.validate_command("true", [big], {"A": big})


@root
def test_workdir_is_used_and_a_bad_one_fails_start_creating_nothing(pki, quick_server,
                                                                    tmp_path):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    (tmp_path / "work").mkdir()
    (tmp_path / "file").write_text("")
    r = run("run", "--workdir", str(tmp_path / "work"), "--", "sh", "-c", "pwd; touch made")
    assert r.returncode == 0 and r.stdout.decode().strip() == str(tmp_path / "work")
    assert (tmp_path / "work" / "made").exists()
    before = run("list", "--json").stdout
    for path, why in [(tmp_path / "nope", "No such file or directory"),
                      (tmp_path / "file", "Not a directory"), ("relative", "absolute path")]:
        r = run("start", "--workdir", str(path), "true")
        assert r.returncode == 6 and str(path).encode() in r.stderr and why.encode() in r.stderr
    assert run("list", "--json").stdout == before   # nothing was made
    job = json.loads(run("list", "--last", "1", "--json").stdout)[0]
    assert job["workdir"] == str(tmp_path / "work")
    assert f"Workdir: {tmp_path / 'work'}" in run("query", job["id"]).stdout.decode()


@root
def test_names_are_shown_filtered_and_checked(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    tag = f"nightly-{uuid.uuid4().hex[:6]}"
    ids = [run("start", "--name", tag, "true").stdout.decode().strip() for _ in range(2)]
    run("start", "--name", tag + "-other", "true")
    listed = json.loads(run("list", "--name", tag, "--json").stdout)
    assert [d["id"] for d in listed] == ids and all(d["name"] == tag for d in listed)
    assert tag in run("list", "--name", tag).stdout.decode()
    assert f"Name: {tag}" in run("query", ids[0]).stdout.decode()
    for bad in ("x" * 101, "tab\there"):
        r = run("start", "--name", bad, "true")
        assert r.returncode == 2 and b"invalid --name" in r.stderr, r


@root
def test_job_options_are_kept_in_the_record_across_a_restart(make_manager, tmp_path):
    m = make_manager()
    s = m.start("sh", ["-c", "exit 0"], env={"TOKEN": "s3cret"}, workdir="/tmp", timeout=60,
                name="keep me")
    wait_final(m, s.id)
    state = m.state_dir
    m.close()
    again = make_manager(state=state)
    d = again.status(s.id)
    assert (d.name, d.env_keys, d.workdir, d.timeout, d.timed_out) == (
        "keep me", ("TOKEN",), "/tmp", 60.0, False)
    assert b"s3cret" not in (pathlib.Path(state) / "jobs" / s.id / "job.json").read_bytes()


# -- the CLI for daily use: the option rule, short ids, tails, tables ----------------------------


@root
def test_option_rule_leaves_the_command_its_own_flags(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    # a jobworker option in the middle of the command is the command's
    r = run("run", "echo", "--memory=100MiB", "-T0", "f")
    assert (r.returncode, r.stdout) == (0, b"--memory=100MiB -T0 f\n"), r
    job = json.loads(run("list", "--last", "1", "--json").stdout)[0]
    assert job["limits"]["memory_bytes"] is None
    r = run("run", "echo", "--cert", "/etc/ssl/c.pem", "URL")
    assert (r.returncode, r.stdout) == (0, b"--cert /etc/ssl/c.pem URL\n"), r
    # a trailing run is jobworker's; a value it refuses suggests --
    r = run("start", "stress-ng", "--cpu", "2")
    assert r.returncode == 6 and b"put -- before the command" in r.stderr, r
    r = run("run", "echo", "hi", "--memory", "64M", "--name", "trailing")
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r
    job = json.loads(run("list", "--last", "1", "--json").stdout)[0]
    assert (job["limits"]["memory_bytes"], job["name"]) == (64 << 20, "trailing")
    # an unknown option before the command is a usage error, not a program name
    r = run("start", "--nmae", "x", "true")
    assert r.returncode == 2 and b"unknown option --nmae" in r.stderr, r
    r = run("qeury", "x")
    assert r.returncode == 2 and b"did you mean 'query'" in r.stderr, r


def test_split_start_args_cases():
    split = jw.split_start_args
    assert split(["bash", "-c", "x", "--cpu", "50%", "--memory", "256M", "--disk-io",
                  "10MB/s"]) == (["--cpu", "50%", "--memory", "256M", "--disk-io", "10MB/s"],
                                 ["bash", "-c", "x"],
                                 ["--cpu", "50%", "--memory", "256M", "--disk-io", "10MB/s"])
    assert split(["--cpu", "5%", "--", "ls", "--cpu"]) == (["--cpu", "5%"], ["ls", "--cpu"], [])
    assert split(["git", "log", "--", "f"]) == ([], ["git", "log", "--", "f"], [])
    assert split(["stress", "--cpu"]) == ([], ["stress", "--cpu"], [])
    assert split(["xz", "--memory=1G", "-T0", "f"]) == ([], ["xz", "--memory=1G", "-T0", "f"], [])
    assert split(["--detach", "sleep", "1", "--detach"]) == (
        ["--detach", "--detach"], ["sleep", "1"], ["--detach"])
    # -i and -t are jobworker's only before the command: after it they are the command's
    assert split(["-it", "--memory", "1G", "bash"]) == (["-it", "--memory", "1G"], ["bash"], [])
    assert split(["-i", "-tt", "--tty", "cat"]) == (["-i", "-tt", "--tty"], ["cat"], [])
    assert split(["sort", "-t", ","]) == ([], ["sort", "-t", ","], [])
    assert split(["grep", "-i", "x", "-t"]) == ([], ["grep", "-i", "x", "-t"], [])
    assert split(["cat", "--detach-keys", "ctrl-a"]) == (
        ["--detach-keys", "ctrl-a"], ["cat"], ["--detach-keys", "ctrl-a"])
    with pytest.raises(jw.UsageError):
        split(["--nmae", "x", "true"])


@root
def test_id_prefixes_resolve_uniquely_and_never_reveal_other_owners_jobs(pki, quick_server):
    run = lambda *a, name="client": cli(SRC, *a, certs=pki, port=quick_server.port, name=name)
    job = run("start", "sh", "-c", "echo found").stdout.decode().strip()
    wait_for(lambda: run("wait", job).returncode == 0, what="the job")
    for prefix in (job[:4], job[:9].upper(), job):
        assert run("stream", prefix).stdout == b"found\n", prefix
    assert run("query", job[:6], "--json").returncode == 0
    r = run("query", job[:3])
    assert r.returncode == 6 and b"4 or more" in r.stderr
    # another writer's job: its prefix is not found (as an unknown id), and says nothing more
    theirs = run("start", "true", name="alice").stdout.decode().strip()
    r = run("query", theirs[:8])
    assert r.returncode == 4 and theirs.encode() not in r.stderr
    assert run("query", theirs[:8], name="reader").returncode == 0   # readers see every job
    # an ambiguous prefix lists the candidates: made by starting until two share 4 chars
    # (1,500 random ids share none with a chance of 4e-8)
    seen, pair = {}, None
    peer = Peer(pki, quick_server.port, "client")
    try:
        for _ in range(1500):
            j = peer.start("true")
            if j[:4] in seen:
                pair = (seen[j[:4]], j)
                break
            seen[j[:4]] = j
    finally:
        peer.close()
    assert pair, "no two of 1,500 ids shared their first 4 characters"
    r = run("query", pair[0][:4])
    assert r.returncode == 6 and all(p.encode() in r.stderr for p in pair), r


@root
def test_stop_takes_several_ids_and_an_ended_job_is_fine(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    a, b = (run("start", "sleep", "600").stdout.decode().strip() for _ in range(2))
    ended = run("start", "true").stdout.decode().strip()
    run("wait", ended)
    r = run("stop", a[:8], b, ended, "--grace", "1s")
    assert r.returncode == 0, r
    assert f"{ended} had already ended: exited (exit code 0)".encode() in r.stdout
    assert r.stderr == b"" and r.stdout.count(b"\n") == 3
    for j in (a, b):
        assert json.loads(run("query", j, "--json").stdout)["state"] == "stopped"
    running = run("list", "-q", "--state", "running").stdout.decode().split()
    assert a not in running and all(jw._JOB_ID_RE.fullmatch(j) for j in running)
    missing = str(uuid.uuid4())
    r = run("stop", missing, ended)
    assert r.returncode == 4 and r.stderr.count(b"\n") == 1 and r.stdout.count(b"\n") == 1


@root
def test_stop_waits_for_the_servers_grace_not_the_clients_default(pki, tmp_path, monkeypatch,
                                                                   capsys):
    # The client once set Stop's deadline from its own default grace: with `serve --grace`
    # longer than that, stopping a job that ignores SIGTERM was reported as "cannot reach
    # server". Here the client's own figures are made small, the server's grace longer.
    monkeypatch.setattr(jw, "RPC_TIMEOUT", 1.0)
    monkeypatch.setattr(jw, "DEFAULT_GRACE_SECONDS", 0.5)
    with running_server(pki, tmp_path, grace=3) as (m, port):
        for var, value in cli_env(pki, port).items():
            monkeypatch.setenv(var, value)
        job = m.start("sh", ["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
                      owner="client")
        wait_for(lambda: m.status(job.id).output_bytes > 0, what="the trap")
        assert jw.main(["stop", job.id]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == f"{job.id} stopped (SIGKILL)\n"
    with pytest.raises(SystemExit) as e:
        jw.main(["serve", "--grace", "3601"])
    assert e.value.code == 2 and "--grace" in capsys.readouterr().err


@root
def test_stream_tail_and_no_follow(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    job = run("start", "sh", "-c", "for i in $(seq 1 100000); do echo line $i; done; "
              "printf 'no newline'; echo err >&2; sleep 600").stdout.decode().strip()
    wait_for(lambda: b"err" in run("stream", job, "--no-follow").stderr, what="output")
    r = run("stream", job, "--tail", "3", "--no-follow")
    assert r.returncode == 0 and r.stdout == b"line 99999\nline 100000\nno newline", r
    assert r.stderr == b"err\n"
    assert run("stream", job, "--tail", "0", "--no-follow").stdout == b""
    whole = run("stream", job, "--no-follow").stdout
    assert whole.startswith(b"line 1\n") and whole.endswith(b"no newline")
    assert whole.count(b"\n") == 100000
    for bad in ("-1", "x", "1.5"):
        r = run("stream", job, "--offset", bad)
        assert r.returncode == 2 and b"--offset" in r.stderr and b"Traceback" not in r.stderr
    run("stop", job, "--grace", "0")


@root
def test_a_stream_cut_by_a_server_upgrade_says_where_to_resume(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/cut"
    server = ServeProcess(SRC, pki, state, parent, extra=["--keep-jobs"])
    env = cli_env(pki, server.port)
    job = cli(SRC, "start", "sh", "-c", "echo first; sleep 600", certs=pki,
              port=server.port).stdout.decode().strip()
    p = subprocess.Popen([*SRC, "stream", job], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"first\n"
    assert server.stop() == 0
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3 and err.count(b"\n") == 1, err
    assert f"resume with: jobworker stream {job} --offset 6".encode() in err
    server = ServeProcess(SRC, pki, state, parent)
    try:
        r = cli(SRC, "stream", job, "--offset", "6", "--no-follow", certs=pki, port=server.port)
        assert (r.returncode, r.stdout) == (0, b"")
    finally:
        assert server.stop() == 0


@root
def test_list_fits_the_terminal_and_leaves_quietly_under_head(pki, quick_server):
    run = lambda *a, **kw: cli(SRC, *a, certs=pki, port=quick_server.port, **kw)
    for _ in range(3):
        run("start", "sh", "-c", "echo x\n" + "y" * 300)
    oom = run("run", "--memory", "32M", "--", "python3", "-c", "x = bytearray(512 << 20)")
    assert oom.returncode == 137
    r = run("list", env=dict(os.environ, COLUMNS="100"))
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "STATE", "EXIT", "OWNER", "NAME", "STARTED", "COMMAND"]
    assert all(len(line) <= 100 for line in lines), lines
    assert any(line.endswith("…") for line in lines) and "oom-killed" in lines[-1]
    assert "ago" in lines[-1]
    env = cli_env(pki, quick_server.port)
    while len(run("list", "-q").stdout.split()) < 120:   # --json: more than a pipe holds
        run("start", "true")
    for how in ("list", "list --json"):
        p = subprocess.run(f"{sys.executable} {SRC[1]} {how} | head -1; "
                           "echo \"rc=${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                           env=dict(env, COLUMNS="100"), capture_output=True, timeout=60)
        code = p.stdout.decode().splitlines()[-1]
        assert code == "rc=141" or (how == "list" and code == "rc=0"), p   # (a table may fit)
        assert p.stderr == b"", p.stderr


@root
def test_list_json_shows_live_usage_of_running_jobs(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    job = run("start", "sh", "-c", "while :; do :; done").stdout.decode().strip()
    try:
        wait_for(lambda: json.loads(run("query", job, "--json").stdout)["usage"]["cpu_seconds"]
                 > 0.2, what="CPU use")
        listed = {d["id"]: d for d in json.loads(run("list", "--json").stdout)}
        assert listed[job]["usage"]["cpu_seconds"] > 0.2
    finally:
        run("stop", job, "--grace", "0")


def test_server_without_a_port_means_50051():
    assert jw.with_default_port("host") == "host:50051"
    assert jw.with_default_port("host:7") == "host:7"
    assert jw.with_default_port("[::1]") == "[::1]:50051"
    assert jw.with_default_port("[::1]:7") == "[::1]:7"
    assert jw.with_default_port("::1") == "[::1]:50051"


def test_durations_for_grace_and_certs_issue_needs_force(tmp_path):
    args = jw.build_parser().parse_args(["stop", "x", "--grace", "5s"])
    assert args.grace == 5.0
    d = tmp_path / "certs"
    jw.certs_init(str(d), ())
    jw.certs_issue(str(d), "alice", ["writer"])
    before = (d / "alice.crt").read_bytes()
    r = subprocess.run([*SRC, "certs", "issue", str(d), "alice", "--role", "admin"],
                       capture_output=True, timeout=60)
    assert r.returncode == 1 and b"--force" in r.stderr and (d / "alice.crt").read_bytes() == before
    r = subprocess.run([*SRC, "certs", "issue", str(d), "alice", "--role", "admin", "--force"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0 and (d / "alice.crt").read_bytes() != before


def test_log_lines_carry_an_iso_time_with_offset():
    import logging
    record = logging.LogRecord("jobworker", logging.INFO, __file__, 1, "hello", (), None)
    line = jw._log_handler().format(record)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO jobworker: hello",
                        line), line


@root
def test_contexts_and_their_precedence(pki, quick_server, tmp_path):
    cfg = tmp_path / "cfg"
    base = {k: v for k, v in os.environ.items() if not k.startswith("JOBWORKER_")}
    env = dict(base, XDG_CONFIG_HOME=str(cfg))
    ctl = lambda *a, **kw: subprocess.run([*SRC, *a], env=dict(env, **kw), capture_output=True,
                                          timeout=60, cwd=tmp_path)
    # certs given relative to here are saved absolute
    shutil.copytree(pki, tmp_path / "mine")
    r = ctl("context", "add", "quick", "--server", f"127.0.0.1:{quick_server.port}",
            "--ca", "mine/ca.crt", "--cert", "mine/client.crt", "--key", "mine/client.key")
    assert r.returncode == 0, r
    saved = cfg / "jobworker" / "contexts.json"
    assert stat_mode(saved) == 0o600 and stat_mode(saved.parent) == 0o700
    assert json.loads(saved.read_text())["contexts"]["quick"]["cert"] == str(
        tmp_path / "mine" / "client.crt")
    assert ctl("list", "-q").returncode == 0                      # the current context
    r = ctl("context", "add", "reader", "--server", f"127.0.0.1:{quick_server.port}",
            "--ca", "mine/ca.crt", "--cert", "mine/reader.crt", "--key", "mine/reader.key")
    assert r.returncode == 0
    assert b"* quick" in ctl("context", "ls").stdout
    assert ctl("start", "true").returncode == 0                    # quick: a writer
    assert ctl("start", "--context", "reader", "true").returncode == 5
    assert ctl("start", "true", JOBWORKER_CONTEXT="reader").returncode == 5
    # the environment beats the context, a flag beats the environment
    assert ctl("start", "true", JOBWORKER_CERT=str(pki / "reader.crt"),
               JOBWORKER_KEY=str(pki / "reader.key")).returncode == 5
    assert ctl("start", "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key"),
               "true", JOBWORKER_CONTEXT="reader").returncode == 0
    # a context named by --context is a flag: it beats the environment, before or after
    assert ctl("start", "--context", "quick", "true", JOBWORKER_CERT=str(pki / "reader.crt"),
               JOBWORKER_KEY=str(pki / "reader.key")).returncode == 0
    assert ctl("--context", "reader", "start", "true").returncode == 5
    assert ctl("context", "use", "reader").returncode == 0
    assert ctl("start", "true").returncode == 5
    r = ctl("list", "--context", "nope")
    assert r.returncode == 2 and b"no context 'nope'" in r.stderr
    r = ctl("context", "add", "quick", "--server", "x", "--ca", "mine/ca.crt", "--cert",
            "mine/client.crt", "--key", "mine/client.key")
    assert r.returncode == 2 and b"--force" in r.stderr


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


@root
def test_connection_errors_say_what_to_do_in_one_line(pki, quick_server, tmp_path):
    other = tmp_path / "other"
    jw.certs_init(str(other), ())
    jw.certs_issue(str(other), "client", ["writer"])
    port = quick_server.port
    cases = [
        (dict(key=pki / "reader.key"), "does not belong to the certificate"),
        (dict(cert=other / "client.crt", key=other / "client.key"),
         "does not accept the client certificate"),
        (dict(ca=other / "ca.crt"), "a certificate the CA"),
    ]
    for files, says in cases:
        env = dict(cli_env(pki, port), **{f"JOBWORKER_{k.upper()}": str(v)
                                           for k, v in files.items()})
        r = subprocess.run([*SRC, "list"], env=env, capture_output=True, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 3 and says in err and err.count("\n") == 1, (files, err)
    with socket_port() as closed:
        r = cli(SRC, "list", certs=pki, port=closed)
    assert r.returncode == 3 and b"connection refused" in r.stderr
    assert r.stderr.count(b"\n") == 1
    # an address the server's certificate does not name
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/noname",
                          listen="127.0.0.2:0")
    try:
        r = cli(SRC, "list", certs=pki, port=server.port, host="127.0.0.2")
        assert r.returncode == 3 and r.stderr.count(b"\n") == 1, r
        assert b"does not name '127.0.0.2'" in r.stderr
        assert b"jobworker certs server DIR --host 127.0.0.2" in r.stderr
    finally:
        assert server.stop() == 0


@root
def test_certs_server_reissues_for_more_names_and_keeps_clients_valid(pki, tmp_path):
    d = tmp_path / "certs"
    shutil.copytree(pki, d)
    r = subprocess.run([*SRC, "certs", "server", str(d), "--host", "127.0.0.2"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r
    server = ServeProcess(SRC, d, tmp_path / "state", f"{RUN_PARENT}/reissue",
                          listen="127.0.0.2:0")
    try:
        r = cli(SRC, "list", "-q", certs=d, port=server.port, host="127.0.0.2")
        assert r.returncode == 0, r          # the old client certificate, the new name
    finally:
        assert server.stop() == 0


@root
def test_version_shows_both_sides_and_info_is_open_to_every_role(pki, quick_server):
    r = cli(SRC, "version", "--json", certs=pki, port=quick_server.port, name="reader")
    assert r.returncode == 0, r
    d = json.loads(r.stdout)   # JSON alone
    assert d["client"] == jw.__version__ and d["server"]["version"] == jw.__version__
    assert d["server"]["cpu_percent_max"] == (os.cpu_count() or 1) * 100
    assert d["server"]["default_grace_seconds"] == 1.0 and d["server"]["live_restore"] is True
    human = cli(SRC, "version", certs=pki, port=quick_server.port).stdout.decode()
    assert human.startswith(f"client: jobworker {jw.__version__}") and "server: jobworker" in human
    p = subprocess.run(f"{sys.executable} {SRC[1]} version | head -1; echo rc=${{PIPESTATUS[0]}}",
                       shell=True, executable="/bin/bash", env=cli_env(pki, quick_server.port),
                       capture_output=True, timeout=60)
    assert p.stdout.decode().splitlines()[-1] in ("rc=141", "rc=0") and p.stderr == b"", p
    peer = Peer(pki, quick_server.port, "norole")
    try:
        with pytest.raises(grpc.RpcError) as e:
            peer.stub.Info(pb.InfoRequest(), timeout=30)
        assert e.value.code() == SC.PERMISSION_DENIED   # a role is needed, any one
    finally:
        peer.close()


@root
def test_top_shows_live_cpu_and_memory_of_running_jobs(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    job = run("start", "--memory", "256M", "--name", "spin", "--", "python3", "-c",
              "x = bytearray(64 << 20)\nwhile True: pass").stdout.decode().strip()
    try:
        wait_for(lambda: json.loads(run("query", job, "--json").stdout)["usage"]["memory_bytes"]
                 > 60 << 20, what="memory use")
        r = run("top", "--no-stream")
        assert r.returncode == 0, r
        lines = r.stdout.decode().splitlines()
        assert lines[0].split()[:3] == ["ID", "NAME", "CPU"]
        row = next(line for line in lines if line.startswith(job[:8])).split()
        assert row[1] == "spin" and float(row[2]) > 20          # busy: CPU % of one CPU
        assert "MiB" in row[4] and row[5:7] == ["256", "MiB"]   # memory, then its limit
        line = next(line for line in lines if line.startswith(job[:8]))
        assert "  python3 -c 'x = bytearray" in line and lines[0].endswith("COMMAND")
    finally:
        run("stop", job, "--grace", "0")


def test_detach_keys_are_read_as_docker_writes_them():
    assert jw.parse_detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    assert jw.parse_detach_keys("ctrl-@, ctrl-_ ,x") == b"\x00\x1fx"
    assert jw.parse_detach_keys("") == b""
    for bad in ("ctrl-", "ctrl-pq", "ab", "ctrl-1"):
        with pytest.raises(Exception, match="invalid key"):
            jw.parse_detach_keys(bad)
    r = subprocess.run([*SRC, "run", "--detach-keys", "ctrl-1", "--", "true"], capture_output=True)
    assert r.returncode == 2 and b"--detach-keys" in r.stderr


def test_every_subcommand_has_an_example_and_its_arguments_help():
    import argparse

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield path + [name], sub
                    yield from walk(sub, path + [name])
    for path, sub in walk(jw.build_parser(), []):
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            continue
        assert sub.epilog and "example: jobworker" in sub.epilog, path
        for action in sub._actions:
            assert action.help, (path, action.dest)


def test_completion_scripts_load_in_bash(tmp_path):
    pytest.importorskip("shtab")
    r = subprocess.run([*SRC, "completion", "bash"], capture_output=True, timeout=60)
    assert r.returncode == 0 and b"_shtab_jobworker" in r.stdout
    script = tmp_path / "c.bash"
    script.write_bytes(r.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    check = subprocess.run(["bash", "-c", f"source {script}; complete -p jobworker"],
                           capture_output=True, text=True, timeout=60)
    assert "jobworker" in check.stdout, check
    z = subprocess.run([*SRC, "completion", "zsh"], capture_output=True, timeout=60)
    assert z.returncode == 0 and z.stdout.startswith(b"#compdef jobworker")


def test_running_jobs_are_capped_by_the_open_files_limit(fake_manager, caplog):
    m = fake_manager(max_jobs=5000)
    jw._cap_by_fd_limit(m._running, 20000, m.max_jobs)
    assert m.caps()["max_jobs"] == (20000 - jw.FD_RESERVE) // jw.FDS_PER_JOB
    assert "allows 3248 running jobs, fewer than --max-jobs 5000" in caplog.text
    assert m.caps()["kept_for_admins"] == jw.admin_reserve(m.caps()["max_jobs"])
    roomy = fake_manager(state=m.state_dir + "-2", max_jobs=100)
    jw._cap_by_fd_limit(roomy._running, 20000, roomy.max_jobs)
    assert roomy.caps()["max_jobs"] == 100


@root
def test_health_watch_of_unknown_names_ends_and_keeps_nothing(pki, tmp_path):
    from grpc_health.v1 import health_pb2 as hpb
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/healthleak")
    peer, health = _health(pki, server.port, "norole")
    try:
        rss = lambda: int(dict(line.split(":", 1) for line in open(
            f"/proc/{server.proc.pid}/status"))["VmRSS"].split()[0]) << 10
        watch = health.Watch(hpb.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert [m.status for m in watch] == [hpb.HealthCheckResponse.SERVICE_UNKNOWN]
        before = rss()
        for i in range(100):   # 100 names of 1,000,000 bytes each, each watched once
            name = f"{i:04d}".ljust(1_000_000, "x")
            list(health.Watch(hpb.HealthCheckRequest(service=name), timeout=30))
        assert rss() - before < 40 << 20, (before, rss())   # not 100 MB kept
    finally:
        peer.close()
        assert server.stop() == 0


@slow   # seconds of slow clients held on to (the attack runs for as long as it is measured)
@pytest.mark.parametrize("slow", [16, 100])
def test_metrics_port_answers_scrapes_while_slow_clients_hold_on(slow, monkeypatch):
    # "GET /metrics HTTP/1.1" and then one byte at a time, each within the time a read may
    # take (5 s against 10 s by default; 1 s against 3 s here): a limit per read keeps such a
    # client for ever, 16 of them took every slot, and any local user or job can open them.
    import urllib.request
    monkeypatch.setattr(jw, "METRICS_TIMEOUT", 3.0)
    http = jw.MetricsServer("127.0.0.1:0", jw.Metrics(2).registry)
    attack = None
    try:
        threads = threading.active_count()
        attack = Attack("slow-http", http.port, slow, 6, 1)
        took, until = [], time.monotonic() + 3
        while time.monotonic() < until:   # scrapes for as long as the slow clients hold on
            t0 = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics",
                                        timeout=30) as r:
                assert r.status == 200 and b"jobworker_info" in r.read()
            took.append(time.monotonic() - t0)
        assert max(took) < 1.0, took
        assert threading.active_count() == threads   # one thread serves them all
        result = attack.result()
        # each closed by the server: for a newer one, or at its deadline for the request
        assert result["closed"] == slow and result["open_for_max"] < 3.0 + 1.5, result
    finally:
        if attack:
            attack.close()
        http.close()


@slow   # seconds of connections churned while scrapes are measured
def test_metrics_port_answers_scrapes_while_connections_churn_from_the_same_address():
    # No certificate needed: connect() and close() at once, from the scraper's own address. A
    # closed connection is only seen once read, so the bound per address evicted the oldest
    # one still sending its request: often the scraper's (7 of 15 scrapes failed).
    import urllib.request
    http = jw.MetricsServer("127.0.0.1:0", jw.Metrics(2).registry)
    attacks = []
    try:
        attacks = [Attack("churn", http.port, 4) for _ in range(2)]
        failed, until = [], time.monotonic() + 3
        while time.monotonic() < until:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics",
                                            timeout=30) as r:
                    assert r.status == 200 and b"jobworker_info" in r.read()
            except OSError as e:   # (ConnectionResetError, RemoteDisconnected, ...)
                failed.append(repr(e))
        churned = [a.result()["opened"] for a in attacks]
        assert failed == [] and sum(churned) > 2000, (failed, churned)   # (it was churned)
    finally:
        for a in attacks:
            a.close()
        http.close()


def test_env_errors_never_show_a_value_and_name_alone_passes_this_shell_s(monkeypatch):
    parse = lambda *a: jw.build_parser().parse_args(["start", *a])
    monkeypatch.setenv("JW_TEST_TOKEN", "from-here")
    assert parse("--env", "JW_TEST_TOKEN").env == [("JW_TEST_TOKEN", "from-here")]
    for bad in ("1BAD=s3cret", "A B=s3cret"):
        r = subprocess.run([*SRC, "start", "--env", bad, "true"], capture_output=True,
                           timeout=60)
        assert r.returncode == 2 and b"s3cret" not in r.stderr and b"invalid name" in r.stderr
    r = subprocess.run([*SRC, "start", "--env", "JW_TEST_UNSET_XYZ", "true"],
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and b"JW_TEST_UNSET_XYZ is not set here" in r.stderr


@root
def test_a_workdir_in_a_hidden_path_answers_as_a_missing_one(pki, quick_server):
    run = lambda *a: cli(SRC, *a, certs=pki, port=quick_server.port)
    job = run("start", "true").stdout.decode().strip()
    for path in (quick_server.state / "jobs" / job, quick_server.state / "jobs" / "made-up",
                 pki, pki / "ca.key"):
        r = run("start", "--workdir", str(path), "true")
        assert r.returncode == 6, r
        assert r.stderr.decode().rstrip().endswith(": No such file or directory"), r.stderr


@root
def test_the_running_jobs_cap_follows_the_open_files_limit(pki, tmp_path):
    server = ServeProcess(["prlimit", "--nofile=1100:1100", *SRC], pki, tmp_path / "state",
                          f"{RUN_PARENT}/fdcap")
    try:
        fits = (1100 - jw.FD_RESERVE) // jw.FDS_PER_JOB
        assert any(f"allows {fits} running jobs" in line for line in server.lines)
        r = cli(SRC, "version", "--json", certs=pki, port=server.port)
        assert json.loads(r.stdout)["server"]["max_jobs"] == fits
    finally:
        assert server.stop() == 0


# -- many hosts: saved contexts with labels, --hosts, --selector --------------------------------

@pytest.fixture
def fleet(pki, quick_server, src_server, tmp_path):
    """Saved contexts as hosts: web1 (quick_server) and web2 (src_server) with labels env=prod,
    web3 a port nothing listens on, web4 one that accepts TCP and never answers TLS; ctl(*argv)
    runs the CLI with them."""
    import socket as socketlib
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("JOBWORKER_") and k != "GRPC_VERBOSITY"}
    env = dict(base, XDG_CONFIG_HOME=str(tmp_path / "cfg"), JOBWORKER_MUX="off")
    ctl = lambda *a, **kw: subprocess.run([*SRC, *a], env=env, capture_output=True, timeout=120,
                                          **kw)
    mute = socketlib.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)   # (the kernel completes the TCP handshakes; no byte ever comes back)
    dead = socketlib.socket()
    dead.bind(("127.0.0.1", 0))   # bound, not listening: refused
    hosts = {"web1": (quick_server.port, ["env=prod"]), "web2": (src_server.port, ["env=prod"]),
             "web3": (dead.getsockname()[1], []), "web4": (mute.getsockname()[1], [])}
    for name, (port, labels) in hosts.items():
        r = ctl("context", "add", name, "--server", f"127.0.0.1:{port}", "--ca", str(pki / "ca.crt"),
                "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key"),
                "--label", "role=web", *[x for label in labels for x in ("--label", label)])
        assert r.returncode == 0, r
    ctl.env = env
    ctl.files = ["--ca", str(pki / "ca.crt"), "--cert", str(pki / "client.crt"), "--key",
                 str(pki / "client.key")]
    yield ctl
    mute.close()
    dead.close()


@root
def test_run_on_many_hosts_prefixes_lines_sums_up_and_exits_with_the_worst(fleet, tmp_path):
    script = ("seq 1 150000; echo err >&2; printf tail; "
              "if grep -q /quick/ /proc/self/cgroup; then exit 2; fi")
    expected = subprocess.run(["sh", "-c", "seq 1 150000; printf tail"], capture_output=True,
                              check=True).stdout
    logs = tmp_path / "logs"
    r = fleet("run", "--hosts", "web*", "--connect-timeout", "2s", "--log-dir", str(logs), "--",
              "sh", "-c", script)
    assert r.returncode == 3, r.stderr   # the largest: web3 and web4 unreachable (3), web1 2
    lines = r.stdout.split(b"\n")
    assert lines.pop() == b""
    for host in ("web1", "web2"):
        mine = [line[len(host) + 2:] for line in lines if line.startswith(f"{host}: ".encode())]
        assert b"\n".join(mine) == expected   # complete, in order; the partial line flushed
        assert (logs / f"{host}.stdout").read_bytes() == expected   # byte-exact
        assert (logs / f"{host}.stderr").read_bytes() == b"err\n"
    assert len(lines) == 2 * 150001   # nothing else, nothing unprefixed
    err = r.stderr.decode().splitlines()
    assert sorted(err[:-1]) == ["web1: err", "web2: err"]
    summary = err[-1]
    assert summary.startswith("jobworker: 4 hosts: 1 succeeded, 3 failed (web1: exit 2; web3: "
                              "unreachable: "), summary
    assert "connection refused" in summary and "web4: unreachable: " in summary
    assert "did not answer within 2s" in summary
    r = fleet("run", "--selector", "env=prod", "--json", "--", "sh", "-c",
              "echo said; grep -q /quick/ /proc/self/cgroup && kill -9 $$; exit 0")
    assert r.returncode == 137
    by_host = {d["host"]: d for d in json.loads(r.stdout)}   # stdout is the JSON alone
    assert b"web1: said\n" in r.stderr and b"web2: said\n" in r.stderr
    assert set(by_host) == {"web1", "web2"}
    assert (by_host["web1"]["signal"], by_host["web2"]["exit_code"]) == ("SIGKILL", 0)
    assert all(d["error"] is None and _JOB_ID.fullmatch(d["id"]) for d in by_host.values())


_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@root
def test_start_on_many_hosts_and_what_selects_them(fleet):
    r = fleet("start", "--selector", "role=web,env=prod", "--", "true")
    assert r.returncode == 0, r.stderr
    started = [line.split() for line in r.stdout.decode().splitlines()]
    assert [h for h, _ in started] == ["web1", "web2"]
    assert all(_JOB_ID.fullmatch(job) for _, job in started)
    r = fleet("start", "--hosts", "web2,web3", "--", "true")   # web3 refuses: said, exit 3
    assert r.returncode == 3 and r.stdout.decode().startswith("web2 ")
    assert b"web3: unreachable" in r.stderr
    r = fleet("run", "--selector", "role=db", "--", "true")
    assert r.returncode == 2 and b"matches no context" in r.stderr
    assert b"web1 env=prod role=web" in r.stderr   # the known ones, with their labels
    r = fleet("run", "--hosts", "db*", "--", "true")
    assert r.returncode == 2 and b"--hosts db* matches no context" in r.stderr
    r = fleet("context", "ls", "--json")
    listed = {c["name"]: c["labels"] for c in json.loads(r.stdout)}
    assert listed["web1"] == {"role": "web", "env": "prod"} and listed["web3"] == {"role": "web"}
    r = fleet("context", "add", "bad", "--server", "x", "--ca", "x", "--cert", "x", "--key", "x",
              "--label", "no value")
    assert r.returncode == 2 and b"invalid label" in r.stderr
    r = fleet("run", "-i", "--hosts", "web1", "--", "cat")
    assert r.returncode == 2 and b"one server" in r.stderr
    # what cannot be meant is a usage error, never a guess (every host sent to one --server)
    for argv, said in ((["--selector", "env"], b"--selector: invalid label 'env'"),
                       (["--hosts", "web1,web2", "--server", "127.0.0.1:1"], b"--server name"),
                       (["--hosts", "web1", "--context", "web2"], b"--context name"),
                       (["--hosts", "web1", "--connect-timeout", "0"], b"--connect-timeout")):
        r = fleet("run", *argv, "--", "true")
        assert r.returncode == 2 and said in r.stderr, (argv, r.stderr)
    for name in ("../escape", ".hidden", "a/b", "web:1", ""):
        r = fleet("context", "add", name, "--server", "x", "--ca", "x", "--cert", "x", "--key",
                  "x")
        assert r.returncode == 2 and b"invalid value" in r.stderr, (name, r.stderr)
    r = fleet("health", "--hosts", "web1,web2,web3")
    assert r.returncode == 3 and r.stdout == b"web1: SERVING\nweb2: SERVING\n", r
    assert b"web3: unreachable" in r.stderr
    r = fleet("version", "--selector", "env=prod", "--json")
    servers = json.loads(r.stdout)["servers"]
    assert r.returncode == 0 and set(servers) == {"web1", "web2"}
    assert all(info["version"] == jw.__version__ for info in servers.values())


@root
def test_context_colon_id_addresses_a_job_on_a_named_host(fleet):
    r = fleet("start", "--hosts", "web2", "--", "sh", "-c", "echo from-web2; sleep 600")
    job = r.stdout.split()[1].decode()
    r = fleet("query", f"web2:{job[:8]}", "--json")   # a prefix too
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == job
    assert fleet("query", f"web1:{job}").returncode == 4   # another server: not there
    r = fleet("stream", f"web2:{job}", "--no-follow")
    assert r.stdout == b"from-web2\n"
    r = fleet("stop", f"web2:{job}", "web1:" + job)
    assert r.returncode == 4 and r.stdout.decode().startswith(f"{job} stopped"), r
    assert fleet("wait", f"web2:{job}").returncode == 143
    r = fleet("list", "--hosts", "web1,web2,web3", "-q")   # HOST:ID, as stop takes it
    assert r.returncode == 3 and f"web2:{job}".encode() in r.stdout.split()
    assert b"web3: unreachable" in r.stderr
    r = fleet("list", "--selector", "env=prod", "--json")
    assert {(j["host"], j["id"]) for j in json.loads(r.stdout)} >= {("web2", job)}
    r = fleet("list", "--selector", "env=prod")
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["HOST", "ID"]
    assert any(line.startswith("web2 ") and job[:8] in line for line in lines[1:])
    assert fleet("rm", f"web2:{job}").returncode == 0
    r = fleet("query", f"nosuch:{job}")
    assert r.returncode == 2 and b"no context 'nosuch'" in r.stderr
    # stop with --hosts/--selector: each id looked for on every host, stopped where it is
    other = fleet("start", "--hosts", "web1", "--", "sleep", "600").stdout.split()[1].decode()
    r = fleet("stop", "--selector", "env=prod", other[:8])
    assert r.returncode == 0 and r.stdout.decode().startswith(f"web1: {other} stopped"), r
    assert r.stderr == b""   # (not on web2: no news)
    unknown = str(uuid.uuid4())
    r = fleet("stop", "--selector", "env=prod", unknown)
    assert r.returncode == 4 and r.stderr.count(unknown.encode()) >= 2
    # a host that takes the connection and never speaks TLS holds stop --hosts only for
    # --connect-timeout, and is said to be silent, not to refuse the certificate
    other = fleet("start", "--hosts", "web1", "--", "sleep", "600").stdout.split()[1].decode()
    r = fleet("stop", "--hosts", "web1,web4", "--connect-timeout", "2s", other)
    assert r.stdout.decode().startswith(f"web1: {other} stopped"), r
    assert r.returncode == 3 and b"web4" in r.stderr and b"did not answer within 2s" in r.stderr
    r = fleet("stop", "--hosts", "web1", "--server", "127.0.0.1:1", unknown)
    assert r.returncode == 2 and b"--server name" in r.stderr


@root
def test_ansible_runs_tasks_as_jobs_through_the_connection_plugin(fleet, pki, tmp_path):
    exe = tmp_path / "jobworker"
    exe.write_text(f"#!/bin/sh\nexec {shlex.join(SRC)} \"$@\"\n")
    exe.chmod(0o755)
    env = dict(fleet.env, ANSIBLE_CONNECTION_PLUGINS=os.path.join(HERE, "ansible_plugins",
                                                                  "connection"),
               ANSIBLE_JOBWORKER_EXECUTABLE=str(exe), ANSIBLE_PYTHON_INTERPRETER="auto_silent",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "local"), ANSIBLE_REMOTE_TEMP=str(tmp_path / "remote"),
               ANSIBLE_NOCOLOR="1")
    bin_dir = os.path.dirname(sys.executable)
    # ansible_host is where ssh would go; the context is the inventory name (nothing is sent
    # to 198.18.250.1: it is no context's)
    (tmp_path / "inventory").write_text("web1 ansible_host=198.18.250.1\nweb2\nweb3\nweb9\n")
    ansible = lambda tool, *a: subprocess.run(
        [os.path.join(bin_dir, tool), "-i", str(tmp_path / "inventory"), "-c", "jobworker", *a],
        env=env, capture_output=True, text=True, timeout=300)
    r = subprocess.run([os.path.join(bin_dir, "ansible-doc"), "-t", "connection", "jobworker"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ansible_jobworker_memory" in r.stdout, r.stderr
    r = ansible("ansible", "all", "-m", "ping")
    assert r.returncode == 4, r.stdout   # web3 is unreachable, web9 no context
    assert "web1 | SUCCESS" in r.stdout and "web2 | SUCCESS" in r.stdout
    assert "web3 | UNREACHABLE" in r.stdout and "connection refused" in r.stdout
    assert "web9 | UNREACHABLE" in r.stdout and "no context 'web9'" in r.stdout
    # a command's own exit 3 with a line of jobworker's words is its result, not a lost host
    r = ansible("ansible", "web1", "-m", "raw", "-a", "echo 'jobworker: x' >&2; exit 3")
    assert r.returncode == 2 and "web1 | FAILED | rc=3" in r.stdout, r.stdout
    # Ansible's connection timeout (-T) is not the job's: only ansible_jobworker_timeout is
    r = ansible("ansible", "web1", "-vvv", "-T", "7", "-m", "raw", "-a", "true")
    runs = re.findall(r"JOBWORKER: (.*jobworker run .*)", r.stdout)
    assert r.returncode == 0 and runs and not any("--timeout" in x for x in runs), r.stdout
    r = ansible("ansible", "web1", "-vvv", "-e", "ansible_jobworker_timeout=30s", "-m", "raw",
                "-a", "true")
    assert re.search(r"jobworker run .*--timeout 30s", r.stdout), r.stdout
    r = ansible("ansible", "web1", "-m", "command", "-a", "uname -r")
    assert r.returncode == 0 and os.uname().release in r.stdout, r.stdout
    data = os.urandom(5 << 20)
    (tmp_path / "five").write_bytes(data)
    there, back = tmp_path / "five.there", tmp_path / "five.back"
    r = ansible("ansible", "web2", "-m", "copy", "-a", f"src={tmp_path / 'five'} dest={there}")
    assert r.returncode == 0 and there.read_bytes() == data, r.stdout
    r = ansible("ansible", "web2", "-m", "fetch", "-a", f"src={there} dest={back} flat=yes")
    assert r.returncode == 0 and hashlib.sha256(back.read_bytes()).digest() == \
        hashlib.sha256(data).digest(), r.stdout
    # the jobs that moved the file were removed: its bytes are not kept in the server's logs
    moved = json.loads(fleet("list", "--context", "web2", "--json").stdout)
    assert not any(there.name in " ".join(j["command"]) for j in moved), moved
    # a file larger than the server keeps of a job's output is not fetched cut short
    capped = ServeProcess(SRC, pki, tmp_path / "capped", f"{RUN_PARENT}/capped",
                          extra=["--log-cap", "1M"])
    try:
        assert fleet("context", "add", "capped", "--server", f"127.0.0.1:{capped.port}",
                     *fleet.files).returncode == 0
        (tmp_path / "inventory").write_text("capped\n")
        cut = tmp_path / "five.cut"
        r = ansible("ansible", "capped", "-m", "fetch", "-a", f"src={there} dest={cut} flat=yes")
        assert r.returncode == 2 and "--log-cap" in r.stdout and not cut.exists(), r.stdout
    finally:
        assert capped.stop() == 0
    (tmp_path / "inventory").write_text("web1\nweb2\n")
    r = ansible("ansible", "web1", "-vvv", "-e", "ansible_jobworker_memory=300M", "-e",
                "ansible_jobworker_queue=true", "-m", "shell", "-a",
                "cat /sys/fs/cgroup/memory$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup)"
                "/memory.limit_in_bytes")
    assert r.returncode == 0 and str(300 << 20) in r.stdout, r.stdout   # the task's own cgroup
    assert re.search(r"jobworker run .*--memory 300M .*--queue (-i )?-- ", r.stdout), r.stdout
    (tmp_path / "play.yml").write_text(
        "- hosts: web1\n  gather_facts: false\n  tasks:\n"
        "    - command: echo first\n    - command: sh -c 'exit 5'\n")
    r = ansible("ansible-playbook", str(tmp_path / "play.yml"))
    assert r.returncode == 2 and '"rc": 5' in r.stdout and "ok=1" in r.stdout, r.stdout


@root
def test_ctrl_c_stops_the_job_on_every_host(fleet):
    name = f"fan-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([*SRC, "run", "--selector", "env=prod", "--name", name, "--",
                             "sleep", "600"], env=fleet.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=as_from_a_terminal)

    def ids(host):
        r = fleet("list", "--context", host, "--name", name, "--json")
        return [j["id"] for j in json.loads(r.stdout)] if r.returncode == 0 else []
    wait_for(lambda: ids("web1") and ids("web2"), timeout=30, what="the job on both hosts")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    for host in ("web1", "web2"):
        r = fleet("query", "--context", host, ids(host)[0], "--json")
        assert json.loads(r.stdout)["state"] == "stopped"


class HoldingProxy:
    """A TCP proxy to 127.0.0.1:`port` that forwards the client's bytes at once until `after`
    of them have passed, then holds the rest until release(): a request larger than the
    handshake and the calls before it is caught in flight (`holding` is set then)."""

    def __init__(self, port, after):
        self.port, self.after = port, after
        self.holding, self.released = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.port))
                threading.Thread(target=self._pipe, args=(client, server, True),
                                 daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, False),
                                 daemon=True).start()

    def _pipe(self, src, dst, upstream):
        passed = 0
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if upstream and passed + len(data) > self.after:
                    self.holding.set()
                    self.released.wait()
                passed += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def release(self):
        self.released.set()

    def close(self):
        self.release()
        self.listener.close()


@root
def test_ctrl_c_while_a_start_is_in_flight_stops_that_job_too(fleet, pki, quick_server):
    """A signal that comes while a host's Start is on its way: the job it starts is stopped as
    soon as its id comes back (the CLI waits for it), not left running."""
    proxy = HoldingProxy(quick_server.port, after=64 << 10)
    try:
        assert fleet("context", "add", "slow", "--server", proxy.address, "--ca",
                     str(pki / "ca.crt"), "--cert", str(pki / "client.crt"), "--key",
                     str(pki / "client.key")).returncode == 0
        name = f"inflight-{uuid.uuid4().hex[:8]}"
        big = ["x" * (50 << 10)] * 4   # the Start request is what passes the proxy's 64 KiB
        proc = subprocess.Popen([*SRC, "run", "--hosts", "slow,web2", "--name", name, "--",
                                 "sh", "-c", "sleep 600", "sh", *big], env=fleet.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=as_from_a_terminal)
        assert proxy.holding.wait(60), "the Start never reached the proxy"
        proc.send_signal(signal.SIGINT)
        said = proc.stderr.readline()   # it has the signal; then the Start goes on, and returns
        assert b"SIGINT: stopping the job on" in said, said
        proxy.release()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        r = fleet("list", "--context", "web1", "--name", name, "--json")
        jobs = json.loads(r.stdout)
        assert len(jobs) == 1 and jobs[0]["state"] == "stopped", jobs
    finally:
        proxy.close()


# -- connection sharing: this user's mux holds the channels of later calls ----------------------

@pytest.fixture
def mux_env(pki, quick_server, tmp_path):
    """The environment of CLI calls that share a mux of their own (a runtime dir of this test's),
    as `client` to quick_server; the mux is stopped, and waited for, at the end."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = MuxEnv(cli_env(pki, quick_server.port), XDG_RUNTIME_DIR=str(run))
    env.pop("JOBWORKER_MUX")
    env.sock = pathlib.Path(jw.mux_socket_path(env))
    yield env
    pid = mux_pid(env.sock)
    subprocess.run([*SRC, "mux", "stop"], env=env, capture_output=True, timeout=30)
    if pid:
        wait_for(lambda: not pid_alive(pid), 30, "the mux to end")


class MuxEnv(dict):
    """An environment, and the mux socket its calls share."""
    sock = None


def mux_pid(sock):
    """pid of the mux listening on `sock`, or None."""
    conn = jw.mux_connect(str(sock), timeout=5)
    if conn is None:
        return None
    with conn:
        return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   12))[0]


def mux_cli(env, *args, name=None, **kw):
    if name:
        env = dict(env, JOBWORKER_CERT=env["JOBWORKER_CERT"].replace("client.", f"{name}."),
                   JOBWORKER_KEY=env["JOBWORKER_KEY"].replace("client.", f"{name}."))
    return subprocess.run([*SRC, *args], env=env, capture_output=True, timeout=60, **kw)


@root
def test_the_first_call_starts_the_mux_and_later_calls_skip_grpc_saying_the_same(
        pki, quick_server, mux_env):
    script = "printf 'out\\0\\377'; printf 'err\\n' >&2; exit 3"
    direct = mux_cli(mux_env, "run", "--", "sh", "-c", script)   # starts the mux
    assert (direct.returncode, direct.stdout, direct.stderr) == (3, b"out\0\377", b"err\n")
    pid = wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    st = os.stat(mux_env.sock)
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(
        os.stat(mux_env.sock.parent).st_mode) == 0o700
    # through the mux: the same bytes and exit code, and grpc is not loaded
    shared = mux_cli(dict(mux_env, PYTHONPROFILEIMPORTTIME="1"), "run", "--", "sh", "-c", script)
    lines = shared.stderr.split(b"\n")
    assert shared.returncode == 3 and shared.stdout == b"out\0\377"
    assert [ln for ln in lines if not ln.startswith(b"import time:")] == [b"err", b""]
    assert not any(re.search(rb"\| +grpc(\.|$)", ln) for ln in lines), "grpc was loaded"
    assert mux_pid(mux_env.sock) == pid   # the same mux served it
    status = mux_cli(mux_env, "mux", "status")
    assert status.returncode == 0 and f"mux pid {pid}".encode() in status.stdout
    assert f"127.0.0.1:{quick_server.port}".encode() in status.stdout
    # errors keep their codes and words
    r = mux_cli(mux_env, "query", "6f9619ff-8b86-4011-b42d-00c04fc964ff")
    assert r.returncode == 4 and r.stderr.startswith(b"jobworker: no such job")
    r = mux_cli(mux_env, "start", "--cpu", "0%", "true")
    assert r.returncode == 6 and b"invalid --cpu '0%'" in r.stderr
    r = mux_cli(mux_env, "start", "true", name="reader")
    assert r.returncode == 5, r.stderr
    assert mux_pid(mux_env.sock) == pid


@root
def test_each_certificate_is_its_own_identity_through_the_mux(pki, quick_server, mux_env):
    """One mux, two users' certificates: the server sees each call's own (its audit line), a
    job of one is not the other's, and a reader is a reader."""
    mux_cli(mux_env, "run", "true")
    wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    alice = mux_cli(mux_env, "start", "sleep", "60", name="alice").stdout.decode().strip()
    bob = mux_cli(mux_env, "start", "sleep", "60", name="bob").stdout.decode().strip()
    wait_for(lambda: any(f"job={bob}" in ln and 'identity="bob"' in ln and "method=Start" in ln
                         for ln in quick_server.lines), 10, "bob's audit line")
    assert any(f"job={alice}" in ln and 'identity="alice"' in ln for ln in quick_server.lines)
    assert mux_cli(mux_env, "stop", alice, name="bob").returncode == 4   # not bob's
    assert mux_cli(mux_env, "query", alice, name="reader").returncode == 0
    assert mux_cli(mux_env, "stop", alice, name="reader").returncode == 5
    for who, job in (("alice", alice), ("bob", bob)):
        assert mux_cli(mux_env, "stop", job, "--grace", "0", name=who).returncode == 0


@root
def test_input_and_ctrl_c_go_through_the_mux(pki, quick_server, mux_env):
    mux_cli(mux_env, "run", "true")
    wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    data = os.urandom(8 << 20)
    r = mux_cli(mux_env, "run", "-i", "--", "sha256sum", input=data)
    assert r.returncode == 0 and r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert mux_cli(mux_env, "run", "-i", "--", "sort", input=b"b\na\n").stdout == b"a\nb\n"
    name = f"mux-{uuid.uuid4().hex[:8]}"
    p = subprocess.Popen([*SRC, "run", "--name", name, "--", "sh", "-c", "echo up; sleep 600"],
                         env=mux_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=as_from_a_terminal)
    assert p.stdout.readline() == b"up\n"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    job = json.loads(mux_cli(mux_env, "list", "--name", name, "--json").stdout)[0]
    assert job["state"] == "stopped"


@root
def test_a_mux_killed_under_a_run_leaves_it_to_go_on_directly(pki, quick_server, mux_env):
    mux_cli(mux_env, "run", "true")
    pid = wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    p = subprocess.Popen([*SRC, "run", "--", "sh", "-c", "echo up; sleep 2; echo done; exit 7"],
                         env=mux_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"up\n"
    os.kill(pid, signal.SIGKILL)   # its calls in flight are lost with it
    out, err = p.communicate(timeout=90)
    assert (p.returncode, out) == (7, b"done\n"), err
    assert mux_pid(mux_env.sock) is None or mux_pid(mux_env.sock) != pid


@root
def test_a_call_through_the_mux_outlives_the_persist_time(pki, quick_server, mux_env):
    """The mux closed a channel unused for its persist time counting from when its last call
    began: a run longer than that lost its stream (and left its job running)."""
    env = dict(mux_env, JOBWORKER_MUX="1s")
    mux_cli(env, "run", "true")
    wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    r = mux_cli(env, "run", "--", "sh", "-c", "sleep 4; echo done; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"done\n", b"")


@root
@slow   # MUX_SILENT_FOR (20 s) of silence before the call goes on directly
def test_a_run_whose_mux_is_stopped_goes_on_directly(pki, quick_server, mux_env):
    mux_cli(mux_env, "run", "true")
    pid = wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    p = subprocess.Popen([*SRC, "run", "--", "sh", "-c", "echo up; sleep 3; echo done; exit 7"],
                         env=mux_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"up\n"
        os.kill(pid, signal.SIGSTOP)   # it says nothing more, not even that it lives
        out, err = p.communicate(timeout=120)
        assert (p.returncode, out) == (7, b"done\n"), err
    finally:
        os.kill(pid, signal.SIGCONT)


@root
def test_a_mux_serves_calls_made_where_it_was_started_only(pki, quick_server, mux_env):
    """A mux started in a network namespace of its own (a sandbox) made every later call go
    through it, and a call from inside a sandbox reached the network through the host's."""
    mux_cli(mux_env, "run", "true")
    wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    r = subprocess.run(["unshare", "--net", *SRC, "mux", "status"], env=mux_env,
                       capture_output=True, timeout=60)
    assert r.returncode == 1 and b"no mux answers" in r.stdout, r
    r = subprocess.run(["unshare", "--net", *SRC, "query", str(uuid.uuid4())], env=mux_env,
                       capture_output=True, timeout=60)
    assert r.returncode == 3 and b"unreachable" in r.stderr.lower(), r   # no network there
    r = mux_cli(dict(mux_env, https_proxy="http://198.18.0.1:3128"), "mux", "status")
    assert r.returncode == 1, r   # (another proxy: another mux)
    assert mux_cli(mux_env, "mux", "status").returncode == 0


@root
def test_an_idle_mux_ends_and_removes_its_socket(pki, quick_server, mux_env):
    assert mux_cli(dict(mux_env, JOBWORKER_MUX="1s"), "run", "true").returncode == 0
    pid = wait_for(lambda: mux_pid(mux_env.sock), 30, "the mux")
    assert mux_cli(mux_env, "query", "6f9619ff-8b86-4011-b42d-00c04fc964ff").returncode == 4
    wait_for(lambda: not pid_alive(pid), 30, "the idle mux to end")
    assert not mux_env.sock.exists()
    assert mux_cli(mux_env, "mux", "status").returncode == 1


@root
def test_no_mux_where_its_directory_is_another_user_s_or_open_to_others(pki, quick_server,
                                                                       tmp_path):
    """A mux directory someone else made first, or one others may write, is passed over: calls
    go direct, and nothing is started or written there."""
    run, tmp = tmp_path / "run" / "jobworker", tmp_path / "tmp" / f"jobworker-{os.getuid()}"
    for d in (run, tmp):
        d.mkdir(parents=True)
        os.chown(d, 65534, 65534)
    env = dict(cli_env(pki, quick_server.port), XDG_RUNTIME_DIR=str(run.parent),
               TMPDIR=str(tmp.parent), JOBWORKER_MUX="60s")
    assert jw.mux_socket_path(env) is None
    assert mux_cli(env, "run", "--", "echo", "hi").stdout == b"hi\n"
    assert os.listdir(run) == [] and os.listdir(tmp) == []
    os.chown(run, os.getuid(), os.getgid())
    os.chmod(run, 0o777)
    assert jw.mux_socket_path(env) is None
    os.chmod(run, 0o700)
    os.chown(run.parent, 65534, 65534)   # a runtime dir of another user (sudo -E keeps it)
    assert jw.mux_socket_path(env) is None
    os.chown(run.parent, os.getuid(), os.getgid())
    assert re.fullmatch(re.escape(str(run / f"mux-{jw.MUX_PROTOCOL}-")) + r"[0-9a-f]{8}\.sock",
                        jw.mux_socket_path(env))


def test_mux_settings_say_what_they_accept(monkeypatch):
    assert jw.mux_setting(None, {}) == jw.MUX_PERSIST
    assert jw.mux_setting(None, {"JOBWORKER_MUX": "10m"}) == 600
    for off in ("off", "0", "no", "OFF"):
        assert jw.mux_setting(None, {"JOBWORKER_MUX": off}) is None
    assert jw.mux_setting(argparse.Namespace(no_mux=True), {}) is None
    with pytest.raises(jw.CliError) as e:
        jw.mux_setting(None, {"JOBWORKER_MUX": "sometimes"})
    assert e.value.code == jw.EXIT_USAGE and "JOBWORKER_MUX" in str(e.value)


# ================================================================================================
# Interactive jobs: stdin pipes, terminals, attach (real pseudo-terminals; tmux as the user's)
# ================================================================================================

def pts_in_use():
    """Pseudo-terminals open on this host now (/dev/pts holds one entry per pair)."""
    return len([n for n in os.listdir("/dev/pts") if n.isdigit()])


def attach_all(m, job_id, chunks=(), end=True, offset=0):
    """Attach to a job from `offset`, write `chunks`, end the input (if `end`) and read its
    output to its end: (output bytes, final status, input bytes counted)."""
    a = m.attach(job_id, offset)
    for data in chunks:
        a.write(data, lambda: False)
    if end:
        a.end_input()
    out = b"".join(c.data for c in a.follow)
    return out, a.follow.final_status(), a.input_bytes


@root
def test_a_pipe_job_reads_what_is_attached_and_its_end(manager):
    job = manager.start("sort", [], stdin=jw.STDIN_PIPE)
    assert job.stdin == jw.STDIN_PIPE
    out, final, n = attach_all(manager, job.id, [b"b\n", b"a\n"])
    assert (out, final.exit_code, n) == (b"a\nb\n", 0, 4)
    # EOF reaches the job only once every copy of the pipe's write end is closed (the
    # launcher holds one): wc ends, and counts exactly
    job = manager.start("wc", ["-c"], stdin=jw.STDIN_PIPE)
    out, final, _ = attach_all(manager, job.id, [b"x" * 100_000])
    assert (out.strip(), final.state) == (b"100000", jw.EXITED)


@root
def test_a_terminal_job_leads_its_session_on_its_own_terminal(manager):
    before = pts_in_use()
    script = ('stty size; tty; ps -o sid= -o tpgid= -p $$; echo "TERM=$TERM"; read x; '
              'stty size; echo "got $x"; exit 3')
    job = manager.start("bash", ["-c", script], stdin=jw.STDIN_TTY, window=(33, 101),
                        term="screen")
    assert pts_in_use() == before + 1
    a = manager.attach(job.id, 0)
    seen = bytearray()
    follow = iter(a.follow)
    while b"TERM=" not in seen:
        seen += next(follow).data
    a.resize(40, 120)
    a.write(b"hello\r", lambda: False)
    for chunk in follow:
        seen += chunk.data
    lines = bytes(seen).decode().split("\r\n")   # a terminal's newlines (ONLCR)
    sid, tpgid = lines[2].split()
    final = a.follow.final_status()
    assert lines[0] == "33 101" and lines[1].startswith("/dev/pts/")
    assert int(sid) == int(tpgid) == final.pid   # session leader, in the foreground
    assert "TERM=screen" in lines and "40 120" in lines and "got hello" in lines
    assert final.exit_code == 3
    assert pts_in_use() == before   # the terminal went with the job


@root
def test_attach_refuses_what_it_cannot_do_and_bad_sizes(manager):
    plain = manager.start("sleep", ["600"])
    with pytest.raises(jw.InputUnavailable, match="started without stdin"):
        manager.attach(plain.id)
    piped = manager.start("sleep", ["600"], stdin=jw.STDIN_PIPE)
    a = manager.attach(piped.id)
    with pytest.raises(jw.InputUnavailable, match="not on a terminal"):
        a.resize(24, 80)
    a.end_input()
    a.end_input()   # again: no error
    with pytest.raises(jw.InputUnavailable, match="stdin closed"):
        a.write(b"late", lambda: False)
    a.close()
    tty = manager.start("sleep", ["600"], stdin=jw.STDIN_TTY)
    a = manager.attach(tty.id)
    for rows, columns in ((0, 80), (24, 0), (10_001, 80), (24, 10_001)):
        with pytest.raises(jw.InvalidArgument, match="window size"):
            a.resize(rows, columns)
    a.resize(10_000, 10_000)
    a.close()
    for bad in ((0, 80), (24, 10_001)):
        with pytest.raises(jw.InvalidArgument):
            manager.start("true", [], stdin=jw.STDIN_TTY, window=bad)
    with pytest.raises(jw.InvalidArgument):
        manager.start("true", [], stdin="file")
    with pytest.raises(jw.JobNotFound):
        manager.attach(str(uuid.uuid4()))
    for job in (plain, piped, tty):
        manager.stop(job.id, grace=0)
    with pytest.raises(jw.InputUnavailable, match="has ended"):
        manager.attach(piped.id)


@root
def test_stop_and_timeout_end_interactive_jobs_and_a_writer_held_back(manager):
    # a writer waiting on a job that does not read is let go when the job ends
    job = manager.start("sleep", ["600"], stdin=jw.STDIN_PIPE, timeout=1)
    a = manager.attach(job.id, 0)
    writer = threading.Thread(target=a.write, args=(b"x" * (8 << 20), lambda: False))
    writer.start()
    out = b"".join(c.data for c in a.follow)   # ends with the job
    final = a.follow.final_status()
    assert (out, final.state, final.timed_out) == (b"", jw.STOPPED, True)
    writer.join(10)
    assert not writer.is_alive()
    assert 0 < a.input_bytes < 8 << 20   # what the pipe took, not more
    tty = manager.start("bash", ["-c", "trap '' HUP; sleep 600"], stdin=jw.STDIN_TTY)
    assert manager.stop(tty.id, grace=1).state == jw.STOPPED
    with pytest.raises(jw.InputUnavailable, match="has ended"):
        manager.attach(tty.id)


@root
def test_a_job_keeps_its_stdin_when_its_launcher_dies(manager):
    job = manager.start("sha256sum", [], stdin=jw.STDIN_PIPE)
    data = os.urandom(3 << 20)
    a = manager.attach(job.id, 0)
    a.write(data[:1 << 20], lambda: False)
    dead = manager.supervisor.launcher.pid
    os.kill(dead, signal.SIGKILL)
    wait_for(lambda: manager.supervisor.launcher.pid != dead and manager.supervisor.launcher.alive,
             timeout=30, what="a new launcher")
    a.write(data[1 << 20:], lambda: False)
    a.end_input()   # the new launcher was given the pipe: it closes its copy
    out = b"".join(c.data for c in a.follow)
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()


@root
def test_terminal_and_pipe_jobs_leak_no_fd_thread_or_terminal(manager):
    # (the manager's finishing pool grows to its fixed size as it is used: not counted)
    threads = lambda: len([t for t in threading.enumerate()
                           if not t.name.startswith("jobworker-finish")])
    before_pts, before_threads = pts_in_use(), threads()
    launcher_fds = lambda: len(os.listdir(f"/proc/{manager.supervisor.launcher.pid}/fd"))
    own_fds = lambda: len(os.listdir("/proc/self/fd"))
    attach_all(manager, manager.start("cat", [], stdin=jw.STDIN_PIPE).id, [b"warm"])
    fds, lfds = own_fds(), launcher_fds()
    for i in range(10):
        piped = manager.start("cat", [], stdin=jw.STDIN_PIPE)
        assert attach_all(manager, piped.id, [b"x\n"])[0] == b"x\n"
        on_tty = manager.start("cat", [], stdin=jw.STDIN_TTY)
        a = manager.attach(on_tty.id)
        a.write(b"y\r", lambda: False)
        a.close()
        manager.stop(on_tty.id, grace=0)
    wait_for(lambda: own_fds() == fds and launcher_fds() == lfds, what="fds back "
             f"(server {own_fds()} of {fds}, launcher {launcher_fds()} of {lfds})")
    assert pts_in_use() == before_pts
    wait_for(lambda: threads() <= before_threads, what="threads back")


# -- over gRPC --------------------------------------------------------------------------------

class Attached:
    """A raw Attach call: requests put() in order after the start; responses collected by a
    thread: output bytes, the final status, the status code it ended with."""

    def __init__(self, peer, job_id, offset=0, first=None):
        self.q = queue.Queue()
        self.out, self.final, self.code, self.details = bytearray(), None, None, ""
        start = pb.AttachStart(job_id=job_id)
        if offset is not None:
            start.offset = offset
        first = first if first is not None else pb.AttachRequest(start=start)

        def requests():
            yield first
            while (item := self.q.get()) is not None:
                yield item
        self.call = peer.stub.Attach(requests(), timeout=60)
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for msg in self.call:
                if msg.HasField("final_status"):
                    self.final = msg.final_status
                for _, _, data in jw.output_pieces(pb, msg):
                    self.out += data
            self.code = SC.OK
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details()
        finally:
            self.done.set()

    def put(self, **item):
        self.q.put(pb.AttachRequest(**item))

    def wait(self, timeout=30):
        assert self.done.wait(timeout), "the Attach call did not end"
        self.q.put(None)
        return self.code


def start_interactive(peer, *argv, mode=None):
    return peer.stub.Start(pb.StartRequest(name=argv[0], args=argv[1:],
                                           stdin=mode or pb.STDIN_MODE_PIPE), timeout=30).job_id


@root
def test_attach_by_role_and_owner(peers):
    alice = peers("alice")
    job = start_interactive(alice, "cat")
    assert Attached(peers("reader"), job).wait() == SC.PERMISSION_DENIED
    assert Attached(peers("bob"), job).wait() == SC.NOT_FOUND
    admin, own = Attached(peers("admin"), job), Attached(alice, job)
    wait_for(lambda: own.call.initial_metadata() is not None, what="attached")
    wait_for(lambda: admin.call.initial_metadata() is not None, what="attached")
    own.put(input=b"from alice\n")
    wait_for(lambda: b"alice" in admin.out, what="alice's input echoed to the admin")
    admin.put(input=b"from admin\n")
    wait_for(lambda: b"admin" in own.out, what="the admin's input echoed to alice")
    own.put(eof=True)
    assert own.wait() == SC.OK and admin.wait() == SC.OK
    assert bytes(own.out) == bytes(admin.out) == b"from alice\nfrom admin\n"   # to each, in order
    assert own.final.state == pb.JOB_STATE_EXITED


@root
def test_attach_bad_requests_get_clear_codes_and_one_audit_line(pki, peers, caplog):
    caplog.set_level("INFO", logger="jobworker.audit")
    alice = peers("alice")
    plain = alice.start("sleep", "600")
    a = Attached(alice, plain)
    assert a.wait() == SC.FAILED_PRECONDITION and "-i or -t" in a.details
    assert Attached(alice, str(uuid.uuid4())).wait() == SC.NOT_FOUND
    piped = start_interactive(alice, "cat")
    a = Attached(alice, piped, first=pb.AttachRequest(input=b"no start"))
    assert a.wait() == SC.INVALID_ARGUMENT and "AttachStart" in a.details
    a = Attached(alice, piped)
    a.put(resize=pb.WindowSize(rows=24, columns=80))
    assert a.wait() == SC.FAILED_PRECONDITION and "not on a terminal" in a.details
    a = Attached(alice, piped)
    a.put(input=b"x" * (jw.DEFAULT_MAX_REQUEST_BYTES + 1))
    assert a.wait() == SC.RESOURCE_EXHAUSTED
    tty = start_interactive(alice, "cat", mode=pb.STDIN_MODE_TTY)
    a = Attached(alice, tty)
    a.put(resize=pb.WindowSize(rows=0, columns=80))
    assert a.wait() == SC.INVALID_ARGUMENT and "window size" in a.details
    caplog.clear()
    a = Attached(alice, piped)
    a.put(input=b"12345")
    a.put(input=b"678")
    a.put(eof=True)
    assert a.wait() == SC.OK and bytes(a.out) == b"12345678"
    lines = [r.getMessage() for r in caplog.records if "method=Attach" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(f"job={piped} code=OK input_bytes=8"), lines
    assert "12345" not in lines[0]
    caplog.clear()
    a = Attached(alice, tty)   # a client that leaves (detaches) in the middle
    a.put(input=b"ab")
    wait_for(lambda: b"ab" in a.out, what="the terminal's echo")
    a.call.cancel()
    assert a.wait() == SC.CANCELLED
    wait_for(lambda: [r for r in caplog.records if "method=Attach" in r.getMessage()],
             what="the audit line")
    lines = [r.getMessage() for r in caplog.records if "method=Attach" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(f"job={tty} code=CANCELLED input_bytes=2")
    for job in (plain, tty):
        alice.call("Stop", job)
    a = Attached(alice, plain)
    assert a.wait() == SC.FAILED_PRECONDITION


@root
def test_writers_queued_behind_a_stuck_one_leave_with_their_calls(peers):
    # One client's input fills a job that does not read; others who attach, send and leave
    # must not leave a thread (and their message) behind, waiting for their turn.
    alice = peers("alice")
    job = start_interactive(alice, "sleep", "600")
    stuck = Attached(alice, job)
    for _ in range(8):
        stuck.put(input=b"x" * (900 << 10))
    feeders = lambda: len([t for t in threading.enumerate() if t.name == "jobworker-attach"])
    for _ in range(30):
        a = Attached(alice, job)
        a.put(input=b"y" * (1000 << 10))
        wait_for(lambda: a.call.initial_metadata() is not None, what="attached")
        a.call.cancel()
        assert a.wait() == SC.CANCELLED
    wait_for(lambda: feeders() <= 1, timeout=10, what=f"the left calls' threads to end "
             f"({feeders()} left)")
    alice.call("Stop", job)
    assert stuck.wait() == SC.OK and stuck.final.state == pb.JOB_STATE_STOPPED


@root
def test_an_old_client_start_has_dev_null_stdin(peers):
    alice = peers("alice")
    job = alice.start("sh", "-c", "cat; echo end")   # no stdin field: as before
    out, _, final = alice.stream(job)
    assert out == b"end\n" and final.stdin == pb.STDIN_MODE_NULL


# -- the CLI ----------------------------------------------------------------------------------

def cli_input(argv, data, *args, certs, port, timeout=120, name="client"):
    return subprocess.run([*argv, *args], input=data, env=cli_env(certs, port, name),
                          capture_output=True, timeout=timeout)


@root
def test_run_i_gives_the_job_this_stdin_and_its_end(pki, quick_server):
    r = cli_input(SRC, b"b\na\n", "run", "-i", "--", "sort", certs=pki, port=quick_server.port)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"a\nb\n", b"")
    r = cli_input(SRC, b"abc", "run", "-i", "--", "sh", "-c", "wc -c; exit 4", certs=pki,
                  port=quick_server.port)
    assert (r.returncode, r.stdout.strip()) == (4, b"3")
    r = cli_input(SRC, b"y\n" * 1_000_000, "run", "-i", "--", "head", "-c", "4", certs=pki,
                  port=quick_server.port)   # a job that stops reading: the rest is dropped
    assert (r.returncode, r.stdout) == (0, b"y\ny\n")
    r = cli_input(SRC, b"", "run", "-i", "--", "true", certs=pki, port=quick_server.port)
    assert r.returncode == 0, r   # it may end before it is attached to


@root
def test_run_i_carries_100_mib_byte_exact_and_a_tree_by_tar(pki, quick_server, tmp_path):
    data = os.urandom(100 << 20)
    r = cli_input(SRC, data, "run", "-i", "--", "cat", certs=pki, port=quick_server.port)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    dst.mkdir()
    (src / "big").write_bytes(data[:20 << 20])
    (src / "sub" / "small").write_bytes(b"\0\377 small\n")
    os.symlink("sub/small", src / "link")
    tar = subprocess.run(["tar", "-C", str(src), "-c", "."], capture_output=True, check=True)
    r = cli_input(SRC, tar.stdout, "run", "-i", "--", "tar", "-C", str(dst), "-x", certs=pki,
                  port=quick_server.port)
    assert r.returncode == 0, r.stderr
    assert (dst / "big").read_bytes() == data[:20 << 20]
    assert (dst / "sub" / "small").read_bytes() == b"\0\377 small\n"
    assert os.readlink(dst / "link") == "sub/small"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


@root
def test_input_to_a_job_that_does_not_read_holds_the_client_back_keeping_memory_flat(
        pki, quick_server, tmp_path):
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; sha256sum"
    server, launcher = quick_server.proc.pid, launcher_of(quick_server.state)
    before = rss_kib(server), rss_kib(launcher)
    cli_proc = subprocess.Popen([*SRC, "run", "-i", "--", "sh", "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=cli_env(pki, quick_server.port))
    data, sent, step = os.urandom(64 << 20), [0], 1 << 16

    def feed():
        with contextlib.suppress(BrokenPipeError):
            for i in range(0, len(data), step):
                cli_proc.stdin.write(data[i:i + step])
                sent[0] = i + step
            cli_proc.stdin.close()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    last, still = -1, 0
    while still < 20:   # 2 s without progress: everything on the way is full
        time.sleep(0.1)
        still, last = (still + 1, last) if sent[0] == last else (0, sent[0])
    during = rss_kib(server), rss_kib(launcher)
    assert sent[0] < len(data) / 2, f"{sent[0]} bytes went in: nothing held the client back"
    # a fixed buffer per job (pipes, grpc's flow-control window), not what was pushed
    assert during[0] - before[0] < 16 << 10 and during[1] - before[1] < 4 << 10, (before, during)
    gate.touch()
    feeder.join(120)
    assert sent[0] >= len(data) and not feeder.is_alive()
    out = cli_proc.stdout.read()
    assert cli_proc.wait(60) == 0
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()   # nothing lost, no dup


@root
def test_t_needs_a_terminal_here_unless_given_twice(pki, quick_server):
    r = cli_input(SRC, b"", "run", "-t", "--", "tty", certs=pki, port=quick_server.port)
    assert r.returncode == 2 and b"-t needs a terminal" in r.stderr and b"-tt" in r.stderr
    r = cli_input(SRC, b"", "run", "-tt", "--", "sh", "-c", "tty; stty size", certs=pki,
                  port=quick_server.port)
    lines = r.stdout.decode().split("\r\n")
    assert r.returncode == 0 and lines[0].startswith("/dev/pts/") and lines[1] == "24 80", r
    r = cli(SRC, "run", "--", "sort", "-t", ",", certs=pki, port=quick_server.port)
    assert r.returncode == 0   # a command's own -t is its own


@root
def test_attach_to_a_job_without_stdin_exits_6_saying_so(pki, quick_server):
    job = cli(SRC, "start", "sleep", "600", certs=pki, port=quick_server.port).stdout.decode().strip()
    r = cli(SRC, "attach", job, certs=pki, port=quick_server.port)
    assert r.returncode == 6 and b"without stdin (-i or -t)" in r.stderr, r
    r = cli(SRC, "attach", job, certs=pki, port=quick_server.port, name="reader")
    assert r.returncode == 5, r
    r = cli(SRC, "attach", job, certs=pki, port=quick_server.port, name="bob")
    assert r.returncode == 4, r
    cli(SRC, "stop", job, certs=pki, port=quick_server.port)


class Tmux:
    """A real terminal: a tmux server of its own with one window running `command` (its own
    config: the pane stays after its command ends, to be read)."""

    def __init__(self, tmp_path, command, env, width=100, height=30):
        self.sock = str(tmp_path / "tmux.sock")
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g status off\n")
        script = tmp_path / "pane.sh"
        script.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
                          + command + "\n")
        self.tmux("-f", str(conf), "new-session", "-d", "-s", "t", "-x", str(width), "-y",
                  str(height), f"sh {script}")

    def tmux(self, *args):
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout

    def screen(self):
        return self.tmux("capture-pane", "-p", "-J", "-t", "t")   # (-J: wrapped lines joined)

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, text, timeout=30):
        return wait_for(lambda: text in self.screen(), timeout, f"{text!r} on the screen:\n"
                        + self.screen())

    def wait_for_match(self, pattern, timeout=30):
        """The first match of a regex (multiline) on the screen, once there is one."""
        return wait_for(lambda: re.search(pattern, self.screen(), re.M), timeout,
                        f"{pattern!r} on the screen")

    def resize(self, rows, columns):
        """Resize the window; returns once its terminal has the size (tmux may apply it to
        the terminal later than it takes the keys sent after)."""
        self.tmux("resize-window", "-t", "t", "-x", str(columns), "-y", str(rows))
        tty = self.tmux("display", "-p", "-t", "t", "#{pane_tty}").strip()

        def size():
            fd = os.open(tty, os.O_RDONLY | os.O_NOCTTY)
            try:
                return struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))[:2]
            finally:
                os.close(fd)
        wait_for(lambda: size() == (rows, columns), 30, f"the terminal to be {rows}x{columns}")

    def wait_dead(self, timeout=30):
        wait_for(lambda: self.tmux("display", "-p", "-t", "t", "#{pane_dead}").strip() == "1",
                 timeout, "the pane's command to end")

    def close(self):
        with contextlib.suppress(subprocess.SubprocessError):
            self.tmux("kill-server")


@pytest.fixture
def tmux_of(tmp_path):
    made = []

    def make(command, env, **kw):
        made.append(Tmux(tmp_path, command, env, **kw))
        return made[-1]
    before = pts_in_use()
    yield make
    for t in made:
        t.close()
    wait_for(lambda: pts_in_use() <= before, what="the terminals closed")


def _cli_line(*args):
    return " ".join(shlex.quote(a) for a in [*SRC, *args])


SHELL = ("run", "-it", "--env", "PS1=jwp> ", "--", "bash", "--norc", "-i")   # (a prompt to see)


@root
def test_a_terminal_that_hangs_up_under_run_it_stops_the_job_and_a_vast_one_is_the_largest(
        pki, quick_server, tmp_path, tmux_of):
    """Its terminal closing sends `run -it` SIGHUP: the job is stopped, though nothing can be
    said on that terminal any more. A window wider than a server takes (MAX_WINDOW) is sent
    as the widest it takes, and the session goes on."""
    name = f"hup-{uuid.uuid4().hex[:8]}"
    env = cli_env(pki, quick_server.port, base={"PATH": os.environ["PATH"], "TERM": "screen"})
    t = tmux_of(_cli_line("run", "-it", "--name", name, "--env", "PS1=jwp> ", "--env",
                          "IGNOREEOF=1000", "--", "bash", "--norc", "-i"), env)
    t.wait_for("jwp> ")
    tty = t.tmux("display", "-p", "-t", "t", "#{pane_tty}").strip()
    subprocess.run(["stty", "-F", tty, "cols", "20000"], check=True, timeout=30)

    def remote_size():   # (asked again until the resize has reached the job's terminal)
        t.keys("clear; stty size", "Enter")
        with contextlib.suppress(AssertionError):
            return t.wait_for_match(rf"^\d+ {jw.MAX_WINDOW}\s*$", timeout=1)
    wait_for(remote_size, 30, "the job's terminal to be as wide as a server takes")
    job = lambda: json.loads(cli(SRC, "list", "--name", name, "--json", certs=pki,
                                 port=quick_server.port).stdout)[0]
    assert job()["state"] == "running"
    t.tmux("kill-server")   # (its input's end, a Ctrl-D, does not end this shell: IGNOREEOF)
    wait_for(lambda: job()["state"] == "stopped", 30, "the job to be stopped")


@root
def test_run_it_is_a_remote_terminal_under_a_real_one(pki, quick_server, tmp_path, tmux_of):
    d = tmp_path
    t = tmux_of(f"stty -a > {d}/before; {_cli_line(*SHELL)}; "
                f"echo $? > {d}/rc; stty -a > {d}/after", cli_env(pki, quick_server.port, base={
                    "PATH": os.environ["PATH"], "TERM": "screen"}))
    t.wait_for("jwp>")   # the prompt of the job's shell
    t.keys("stty size; echo TERM=$TERM", "Enter")
    t.wait_for("TERM=screen")
    assert "30 100" in t.screen()
    # keys typed at once after a resize see the new size (SIGWINCH alone may come later)
    for rows, columns in ((35, 110), (25, 90), (33, 107), (28, 95), (36, 111), (26, 93),
                          (34, 104), (40, 120)):
        t.resize(rows, columns)
        t.keys("clear; stty size", "Enter")
        t.wait_for(f"{rows} {columns}")
    t.keys("clear; sleep 100", "Enter")
    wait_for(lambda: subprocess.run(["pgrep", "-x", "-f", "sleep 100"],
                                    stdout=subprocess.DEVNULL).returncode == 0,
             what="sleep to run")
    t.keys("C-c")   # a byte to the job's terminal: its foreground program gets SIGINT
    t.wait_for("^C")
    t.keys("echo alive-$((6*7))", "Enter")
    t.wait_for("alive-42")   # the shell lives
    t.keys("exit 3", "Enter")
    t.wait_dead()
    assert (d / "rc").read_text().strip() == "3"
    modes = lambda f: (d / f).read_text().split("\n", 1)[1]   # (line 1: speed and the size)
    assert modes("before") == modes("after")   # the terminal is as it was


@root
def test_detach_leaves_the_job_running_and_attach_takes_it_up(pki, quick_server, tmp_path,
                                                               tmux_of):
    env = cli_env(pki, quick_server.port, base={"PATH": os.environ["PATH"], "TERM": "xterm"})
    t = tmux_of(f"{_cli_line(*SHELL)}; echo rc=$?; exec sh", env)
    t.wait_for("jwp>")
    t.keys("echo first-$((6*7))", "Enter")
    t.wait_for("first-42")
    t.keys("C-p", "C-q")
    t.wait_for("rc=0")
    job = t.wait_for_match(r"jobworker attach ([0-9a-f-]{36})").group(1)
    r = cli(SRC, "query", job, "--json", certs=pki, port=quick_server.port)
    assert json.loads(r.stdout)["state"] == "running"
    t.keys(_cli_line("attach", "--tail", "1", job), "Enter")
    t.keys("echo second-$((6*7))", "Enter")   # (typed ahead: the terminal keeps it for attach)
    t.wait_for("second-42")
    t.keys("exit 5; ", "Enter")
    r = cli(SRC, "wait", job, certs=pki, port=quick_server.port)
    assert r.returncode == 5


@root
def test_a_server_killed_and_restarted_under_run_it_keeps_the_shell(pki, tmp_path, tmux_of):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/restart-it"
    server = ServeProcess(SRC, pki, state, parent, listen="127.0.0.1:0")
    port = server.port
    try:
        env = cli_env(pki, port, base={"PATH": os.environ["PATH"], "TERM": "xterm"})
        t = tmux_of(f"{_cli_line(*SHELL)}; echo rc=$?", env)
        t.wait_for("jwp>")
        t.keys("echo shell-$$", "Enter")
        shell = t.wait_for_match(r"^shell-(\d+)$").group(1)
        server.proc.kill()
        server.proc.wait()
        t.keys("echo still-$$", "Enter")   # typed while no server is there: kept, in order
        server = ServeProcess(SRC, pki, state, parent, listen=f"127.0.0.1:{port}")
        t.wait_for(f"still-{shell}", timeout=60)
        t.keys("echo and-then-$((6*7))", "Enter")
        t.wait_for("and-then-42")
        server.proc.kill()   # again, and the user detaches while the CLI reconnects
        server.proc.wait()
        t.keys("C-p", "C-q")
        t.wait_for("rc=0")
        job = t.wait_for_match(r"jobworker attach ([0-9a-f-]{36})").group(1)
        server = ServeProcess(SRC, pki, state, parent, listen=f"127.0.0.1:{port}")
        r = cli(SRC, "query", job, "--json", certs=pki, port=port)
        assert json.loads(r.stdout)["state"] == "running"   # the shell goes on, detached
        assert cli(SRC, "stop", job, certs=pki, port=port).returncode == 0
    finally:
        assert server.stop() == 0


# ================================================================================================
# Deploy: three hosts in network namespaces, driven by the CLI from the root namespace
# ================================================================================================


@root
@slow
def test_three_hosts_in_network_namespaces(pyz, venvs, tmp_path):
    for tool in ("ip", "nsenter"):   # `ip netns exec` would also hide /sys/fs/cgroup
        if not shutil.which(tool):
            pytest.fail(f"`{tool}` is needed (apt-get install iproute2 util-linux)")
    tag = f"jw{os.getpid() % 100000}"
    hosts = [(f"{tag}h{i}", f"veth{tag}{i}", f"198.18.{i}.1", f"198.18.{i}.2") for i in (1, 2, 3)]
    python = venvs.get("3.11") or next(iter(venvs.values()))
    env = dict(os.environ, JOBWORKER_CACHE_DIR=str(tmp_path / "cache"))
    argv = [python, str(pyz)]
    certs = tmp_path / "certs"
    servers = []
    ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True, timeout=30)
    try:
        for ns, veth, host_addr, ns_addr in hosts:
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("addr", "add", f"{host_addr}/24", "dev", veth)
            ip("link", "set", veth, "up")
            ip("-n", ns, "addr", "add", f"{ns_addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run([*argv, "certs", "init", str(certs), *sum((["--host", h[3]] for h in hosts),
                                                                  [])], check=True, env=env)
        subprocess.run([*argv, "certs", "issue", str(certs), "client", "--role", "writer"],
                       check=True, env=env)
        for ns, _, _, ns_addr in hosts:
            servers.append(ServeProcess(["nsenter", f"--net=/run/netns/{ns}", *argv], certs,
                                        tmp_path / f"state-{ns}", f"{RUN_PARENT}/{ns}",
                                        listen=f"{ns_addr}:50051", env=env))
        for (ns, _, _, ns_addr), server in zip(hosts, servers):
            run = lambda *a: cli(argv, *a, certs=certs, port=50051, host=ns_addr, env=env)
            job_id = run("start", "sh", "-c", "ip -4 -o addr show dev eth0; sleep 600").stdout
            job_id = job_id.decode().strip()
            assert jw._JOB_ID_RE.fullmatch(job_id), job_id
            wait_for(lambda: json.loads(run("query", job_id, "--json").stdout)["output_bytes"],
                     what="the job's output")
            stop = run("stop", job_id, "--grace", "1")
            assert stop.returncode == 0, stop.stderr
            out = run("stream", job_id).stdout.decode()
            assert f"inet {ns_addr}/24" in out   # it ran on that host
        # the three at once, as saved contexts: each line from its own host
        fan = dict(env, XDG_CONFIG_HOME=str(tmp_path / "cfg"))
        ctl = lambda *a: subprocess.run([*argv, *a], env=fan, capture_output=True, timeout=120)
        for ns, _, _, ns_addr in hosts:
            assert ctl("context", "add", ns, "--server", f"{ns_addr}:50051", "--ca",
                       str(certs / "ca.crt"), "--cert", str(certs / "client.crt"), "--key",
                       str(certs / "client.key"), "--label", "fleet=test").returncode == 0
        r = ctl("run", "--selector", "fleet=test", "--", "sh", "-c", "ip -4 -o addr show dev eth0")
        assert r.returncode == 0, r.stderr
        for ns, _, _, ns_addr in hosts:
            assert any(line.startswith(f"{ns}: ") and f"inet {ns_addr}/24" in line
                       for line in r.stdout.decode().splitlines()), r.stdout
        assert r.stderr.decode().strip().endswith("3 hosts: 3 succeeded, 0 failed")
        assert servers[2].stop() == 0
        r = ctl("run", "--selector", "fleet=test", "--connect-timeout", "2s", "--", "true")
        assert r.returncode == 3 and f"{hosts[2][0]}: unreachable".encode() in r.stderr, r.stderr
    finally:
        codes = [s.stop() for s in servers]
        for ns, veth, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)
    assert codes == [0, 0, 0]


# ================================================================================================
# Real cgroup v2: a Linux guest under QEMU runs the pyz and checks enforcement (v2_guest.py)
# ================================================================================================


@root
@slow
def test_real_cgroup_v2_guest(pyz, tmp_path):
    if os.environ.get("JOBWORKER_SKIP_V2_GUEST") == "1":
        pytest.skip("JOBWORKER_SKIP_V2_GUEST=1")
    assert shutil.which("qemu-system-x86_64"), \
        "qemu is missing: `make test` installs it (or set JOBWORKER_SKIP_V2_GUEST=1 to skip)"
    report = tmp_path / "guest.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "v2_guest.py"), "--pyz", str(pyz),
                        "--json", str(report)], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert report.exists(), r.stdout[-4000:] + r.stderr[-2000:]
    checks = json.loads(report.read_text())["checks"]
    assert set(checks) == {"server_starts", "no_internal_process", "cpu_50_percent", "usage_cpu",
                           "memory_oom", "io_direct", "io_buffered_fsync", "usage_io",
                           "pids_fork_bomb", "stop_kills_daemon", "live_restore",
                           "cgroups_removed", "server_sigterm_exit_0"}
    failed = {name: c["detail"] for name, c in checks.items() if not c["ok"]}
    assert not failed, failed
    assert r.returncode == 0


# ================================================================================================
# Reliability: crashes, restarts, floods, hostile input
# ================================================================================================


from hypothesis import HealthCheck, given, settings, strategies as st


def proc_stats(pid):
    """(fds, threads, RSS bytes) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return fds, int(status["Threads"]), int(status["VmRSS"].split()[0]) * 1024


# The server's thread pools, by the kernel's name of their threads (its first 15 bytes): each
# grows on demand up to its bound and never shrinks, so more of them after a burst is no leak.
SERVER_POOLS = {"jobworker-rpc_": jw.DEFAULT_MAX_STREAMS + jw.UNARY_WORKERS,
                "jobworker-finis": jw.FINISHERS, "jobworker-deque": jw.QUEUE_STARTERS}


def server_threads(pid):
    """The threads of a server process by kind: (Counter of its own threads by name, pools
    excepted; Counter of its pools' threads by pool; how many are grpc's native threads).
    Python threads the server did not name carry the process's own name and count as its own."""
    ours, pools, native = collections.Counter(), collections.Counter(), 0
    with open(f"/proc/{pid}/comm") as f:
        process = f.read().strip()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().strip()
        except FileNotFoundError:   # it ended meanwhile
            continue
        pool = next((p for p in SERVER_POOLS if name.startswith(p)), None)
        if pool:
            pools[pool] += 1
        elif name.startswith("jobworker-") or name == process:
            ours[name] += 1
        else:
            native += 1
    return ours, pools, native


def children_of(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        kids += [int(k) for k in open(f"/proc/{pid}/task/{task}/children").read().split()]
    return kids


def launcher_of(state):
    """pid of the launcher process of a state dir, from its lock's holder."""
    fd = os.open(str(state / "launcher.lock"), os.O_RDONLY)
    try:
        return jw._lock_holder(fd)[0]
    finally:
        os.close(fd)


@root
def test_live_restore_a_killed_server_s_jobs_run_on_and_are_adopted(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/live"
    driver = jw.detect_cgroups(parent)
    server = ServeProcess(SRC, pki, state, parent)
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    try:
        ids = {"writer": run("start", "sh", "-c", COUNTER),
               "idle": run("start", "sleep", "600"),
               "ends": run("start", "sh", "-c", "sleep 1; echo bye; exit 5"),
               "oom": run("start", "--memory", "16M", "--", "sh", "-c",
                          "sleep 1; head -c 100000000 /dev/zero | tail")}
        ids = {k: v.stdout.decode().strip() for k, v in ids.items()}
        before = {k: json.loads(run("query", j, "--json").stdout) for k, j in ids.items()}
        wait_for(lambda: json.loads(run("query", ids["writer"], "--json").stdout)
                 ["output_bytes"] > 20, what="the counter")
        launcher = launcher_of(state)
        server.proc.kill()                       # SIGKILL: nothing of the server runs on
        server.proc.wait(30)
        killed_at = time.time()
        time.sleep(2)                            # the writer writes, two jobs end meanwhile
        assert pid_alive(launcher) and launcher_of(state) == launcher
    finally:
        server.stop()
    server = ServeProcess(SRC, pki, state, parent)
    try:
        assert any("adopted running job" in line for line in server.lines)
        after = {k: json.loads(run("query", j, "--json").stdout) for k, j in ids.items()}
        for k in ("writer", "idle"):
            assert after[k]["state"] == "running"
            assert (after[k]["started_at"], after[k]["pid"]) == \
                (before[k]["started_at"], before[k]["pid"])
        ends = after["ends"]
        assert (ends["state"], ends["exit_code"]) == ("exited", 5)
        assert ends["ended_at"] < jw._iso(killed_at + 2)          # it ended in the downtime
        assert run("stream", ids["ends"]).stdout == b"bye\n"
        assert after["oom"]["oom_killed"] and after["oom"]["state"] == "exited"
        stop = run("stop", ids["writer"], "--grace", "1")
        assert stop.returncode == 0, stop.stderr
        seen = numbers(run("stream", ids["writer"]).stdout)
        assert seen == list(range(len(seen))) and len(seen) > 200   # every line, once
        assert run("stop", ids["idle"], "--grace", "0").returncode == 0
        assert json.loads(run("query", ids["idle"], "--json").stdout)["state"] == "stopped"
    finally:
        assert server.stop() == 0
    assert driver.leftover_job_ids() == []
    assert not pid_alive(launcher)               # a plain SIGTERM ends it with its jobs


@root
def test_a_restart_with_another_cgroup_parent_stops_adopted_jobs_where_they_run(pki, tmp_path):
    # The adopted job was once looked for under the new parent: Stop signalled nothing and
    # waited for ever, and SIGTERM to the server never finished.
    state = tmp_path / "state"
    first, second = f"{RUN_PARENT}/parent-a", f"{RUN_PARENT}/parent-b"
    server = ServeProcess(SRC, pki, state, first)
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    try:
        job = run("start", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
        job = job.stdout.decode().strip()
        wait_for(lambda: run("stream", job, "--no-follow").stdout == b"ready\n",
                 what="the job's trap")
        server.proc.kill()
        server.proc.wait(30)
    finally:
        server.stop()
    assert jw.detect_cgroups(first).leftover_job_ids() == [job]
    server = ServeProcess(SRC, pki, state, second, extra=["--grace", "1"])
    try:
        assert json.loads(run("query", job, "--json").stdout)["state"] == "running"
        stop = run("stop", job)
        assert stop.returncode == 0, stop.stderr
        assert json.loads(run("query", job, "--json").stdout)["state"] == "stopped"
        assert any("outside this server's --cgroup-parent" in line for line in server.lines)
        assert jw.detect_cgroups(first).leftover_job_ids() == []
        again = run("start", "sh", "-c", "trap '' TERM; while :; do sleep 1; done")
        assert again.returncode == 0, again.stderr
    finally:
        assert server.stop(timeout=30) == 0   # stops the new job too: SIGTERM ends
    for parent in (first, second):
        assert jw.detect_cgroups(parent).leftover_job_ids() == []
        jw.detect_cgroups(parent).remove_parent()


@root
def test_sigterm_with_keep_jobs_leaves_them_to_the_next_server(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/keep"
    server = ServeProcess(SRC, pki, state, parent, extra=["--keep-jobs"])
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    job = run("start", "sh", "-c", COUNTER).stdout.decode().strip()
    wait_for(lambda: (state / "jobs" / job / "output.log").stat().st_size > 20, what="output")
    assert server.stop() == 0                    # SIGTERM, --keep-jobs: the job goes on
    size = (state / "jobs" / job / "output.log").stat().st_size
    wait_for(lambda: (state / "jobs" / job / "output.log").stat().st_size > size + 50,
             what="the job to go on writing with no server")
    server = ServeProcess(SRC, pki, state, parent)
    try:
        assert json.loads(run("query", job, "--json").stdout)["state"] == "running"
        run("stop", job, "--grace", "0")
        seen = numbers(run("stream", job).stdout)
        assert seen == list(range(len(seen)))
    finally:
        assert server.stop() == 0
    r = subprocess.run([*SRC, "serve", "--keep-jobs", "--no-live-restore"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--keep-jobs needs live restore" in r.stderr


@root
def test_without_live_restore_a_dead_server_s_jobs_are_stopped_and_lost(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/nolive"
    server = ServeProcess(SRC, pki, state, parent, extra=["--no-live-restore"])
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    job = run("start", "sh", "-c", COUNTER).stdout.decode().strip()
    wait_for(lambda: (state / "jobs" / job / "output.log").stat().st_size > 20, what="output")
    pid = json.loads(run("query", job, "--json").stdout)["pid"]
    server.proc.kill()
    server.proc.wait(30)
    wait_for(lambda: not pid_alive(pid), what="the launcher to stop the job")
    server = ServeProcess(SRC, pki, state, parent, extra=["--no-live-restore"])
    try:
        d = json.loads(run("query", job, "--json").stdout)
        assert d["state"] == "lost" and "stopped while it ran" in d["lost_reason"]
        assert numbers(run("stream", job).stdout)[:3] == [0, 1, 2]
    finally:
        assert server.stop() == 0


@root
def test_every_field_of_every_end_state_survives_a_restart(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/fields"
    server = ServeProcess(SRC, pki, state, parent, extra=["--log-cap", "1M"])
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    ids = {}
    try:
        ids["exited"] = run("start", "sh", "-c", "echo out; echo err >&2; exit 3")
        ids["truncated"] = run("start", "head", "-c", "3000000", "/dev/zero")
        ids["oom"] = run("start", "--memory", "16M", "--", "sh", "-c",
                         "head -c 100000000 /dev/zero | tail")
        ids["stopped"] = run("start", "sh", "-c", "echo a; sleep 600")
        ids = {k: v.stdout.decode().strip() for k, v in ids.items()}
        for k in ("exited", "truncated", "oom"):
            run("stream", ids[k])
        wait_for(lambda: json.loads(run("query", ids["stopped"], "--json").stdout)
                 ["output_bytes"], what="output")
        run("stop", ids["stopped"], "--grace", "0")
        before = {k: json.loads(run("query", j, "--json").stdout) for k, j in ids.items()}
        assert before["truncated"]["log_truncated"] and before["oom"]["oom_killed"]
        assert before["exited"]["usage"]["cpu_seconds"] > 0
    finally:
        assert server.stop() == 0
    server = ServeProcess(SRC, pki, state, parent, extra=["--log-cap", "1M"])
    try:
        after = {k: json.loads(run("query", j, "--json").stdout) for k, j in ids.items()}
        assert after == before
        for k, j in ids.items():
            assert (state / "jobs" / j / "output.log").stat().st_size == \
                after[k]["output_bytes"]
    finally:
        assert server.stop() == 0


@contextlib.contextmanager
def small_tmpfs(tmp_path, size="1m"):
    """A tmpfs of `size` mounted for the test and unmounted after it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "jwtest", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@root
def test_a_full_disk_loses_no_record_and_refuses_new_jobs_cleanly(make_manager, tmp_path,
                                                                  caplog):
    with small_tmpfs(tmp_path) as mnt:
        state = mnt / "state"
        m = make_manager(state=state)
        try:
            job = m.start("head", ["-c", "20000000", "/dev/zero"])
            s = wait_final(m, job.id)
            assert (s.state, s.exit_code) == (jw.EXITED, 0)       # not blocked
            assert "No space left on device" in s.log_error
            on_disk = (state / "jobs" / job.id / "output.log").stat().st_size
            assert s.output_bytes == on_disk > 0                   # a partial write counted
            assert b"".join(c.data for c in m.follow(job.id)) == b"\0" * s.output_bytes
            with pytest.raises(jw.DiskFull, match="no room for a new job") as e:
                m.start("true")                                    # refused, nothing made
            assert jw.status_code_for(e.value) == "RESOURCE_EXHAUSTED"
            assert os.listdir(state / "jobs") == [job.id]
            assert m.cgroups.leftover_job_ids() == []
            assert m.status(job.id).log_error == s.log_error
        finally:
            m.close(grace=0)   # its files are closed before the unmount
        assert not glob.glob(f"{state}/jobs/*/*.tmp")
        assert f"job {job.id}'s record was written in its reserved space" in caplog.text
        record = json.loads((state / "jobs" / job.id / "job.json").read_text())
        assert (record["state"], record["exit_code"], record["output_bytes"]) == \
            ("exited", 0, on_disk)
        again = make_manager(state=state)
        try:
            assert again.status(job.id) == s                   # every field, exactly
        finally:
            again.close(grace=0)


@root
def test_job_directories_without_a_record_are_removed_at_start(make_manager, tmp_path):
    jobs = tmp_path / "state" / "jobs"
    orphans = ["6f9619ff-8b86-4011-b42d-00c04fc964ff", "7f9619ff-8b86-4011-b42d-00c04fc964ff"]
    (jobs / orphans[0]).mkdir(parents=True)
    (jobs / orphans[0] / "output.log").write_bytes(b"x")
    (jobs / orphans[1]).mkdir()
    (jobs / orphans[1] / "job.json.tmp").write_text("{")
    m = make_manager()
    assert m.list() == [] and os.listdir(jobs) == []


class Attack:
    """bench/attackers.py in a process of its own (as `user` if given, with the system's
    python3 that every user may run): started, and waited for until its calls or connections
    are open; result() is what it reports at its end."""

    def __init__(self, *args, user=None):
        python = "/usr/bin/python3" if user else sys.executable
        argv = [python, os.path.join(HERE, "bench", "attackers.py"), *map(str, args)]
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise AssertionError(f"the attack did not start: {self.proc.stderr.read()}")

    def result(self, timeout=180):
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out.splitlines()[-1])

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def _serial_of(pki, name):
    from cryptography import x509
    return f"{x509.load_pem_x509_certificate((pki / f'{name}.crt').read_bytes()).serial_number:x}"


def _timed(took, what, call):
    t0 = time.monotonic()
    result = call()
    took[what] = time.monotonic() - t0
    return result


@root
@pytest.mark.parametrize("attacker", ["reader", "norole"])
def test_calls_that_never_send_their_request_lock_no_one_out(attacker, pki, tmp_path):
    # 2,000 calls whose request message never comes: grpc's unary handlers would each hold a
    # thread waiting for it, before any of our code ran, until the pool was full for everyone.
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/nosend",
                          extra=["--request-timeout", "1s"])
    admin, bob = Peer(pki, server.port, "admin"), Peer(pki, server.port, "bob")
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(admin.channel)
    attack = None
    try:
        job = bob.start("sleep", "600")
        attack = Attack("never-send", server.port, pki, attacker, 2000, 120)
        # rounds of everyone else's calls for as long as the attacker's calls may be held
        rounds, until = [], time.monotonic() + 3
        while time.monotonic() < until:
            took = {}
            _timed(took, "admin List", admin.list)
            _timed(took, "admin Query", lambda: admin.stub.Query(pb.QueryRequest(job_id=job),
                                                                 timeout=10))
            _timed(took, "health", lambda: health.Check(health_pb2.HealthCheckRequest(),
                                                        timeout=10))
            _timed(took, "bob Start", lambda: bob.start("true"))
            _timed(took, "bob Query", lambda: bob.stub.Query(pb.QueryRequest(job_id=job),
                                                             timeout=10))
            rounds.append(took)
        _timed(took, "admin Stop", lambda: admin.stub.Stop(
            pb.StopRequest(job_id=job, grace_seconds=0), timeout=10))
        assert max(max(t.values()) for t in rounds) < 1.0, rounds
        result = attack.result()
        codes = result["codes"]
        assert sum(codes.values()) == 2000, codes
        # Calls past the connection's stream limit wait at the client; each that reaches the
        # server ends by the server's deadline (or is refused at once), never the attacker's.
        ours = {"PERMISSION_DENIED"} if attacker == "norole" else {"DEADLINE_EXCEEDED",
                                                                    "RESOURCE_EXHAUSTED"}
        assert set(codes) <= ours, codes
        assert result["last_ended"] < 2000 / jw.MAX_STREAMS_PER_CONNECTION * 1 + 30, result
        serial = _serial_of(pki, attacker)
        audited = lambda: [line for line in list(server.lines)
                           if f"serial={serial} " in line and "method=Query" in line]
        wait_for(lambda: len(audited()) >= 2000, what="an audit line for each call")
        assert len(audited()) == 2000
        if attacker == "reader":
            assert any('identity="reader"' in a and "code=DEADLINE_EXCEEDED" in a
                       for a in audited())
    finally:
        if attack:
            attack.close()
        for p in (admin, bob):
            p.close()
        assert server.stop() == 0


@root
@pytest.mark.parametrize("source", ["127.0.0.1", "127.0.0.2"], ids=["admins-address", "other"])
def test_a_flood_of_connections_that_never_start_tls_locks_no_one_out(source, pki, tmp_path):
    # Any local user, no certificate: bare connect()s that send nothing. grpc held each for
    # its 120 s handshake timeout, to the open-files limit, and kept their memory.
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/flood", extra=[
        "--handshake-timeout", "3s", "--max-unauthenticated", "256",
        "--max-unauthenticated-per-source", "64"])
    pid = server.proc.pid
    attack = None
    try:
        admin = Peer(pki, server.port, "admin")
        admin.list()
        _, _, rss_before = proc_stats(pid)
        attack = Attack("connect", server.port, 5000, 20, source, user="nobody")
        took, peaks = [], []
        until = time.monotonic() + 5
        while time.monotonic() < until:   # fresh connections, from the admin's address
            fresh = Peer(pki, server.port, "admin")
            try:
                t0 = time.monotonic()
                fresh.list()
                took.append(time.monotonic() - t0)
            finally:
                fresh.close()
            peaks.append(sum(1 for c in jw.tcp_connections(server.port) if c.address == source))
        assert max(took) < 2.0, took
        result = attack.result()
        assert result["opened"] == 5000 and result["closed"] == 5000, result
        # shut down before grpc's own handshake deadline (3 s here): they were past the bound
        assert result["open_for_median"] < 3.0, result
        assert min(peaks) < 5000, peaks
        # the flood's memory given back once it is over (a wide band: grpc keeps some)
        wait_for(lambda: any("memory handed back" in line for line in server.lines)
                 and proc_stats(pid)[2] < rss_before + (50 << 20), timeout=30,
                 what=f"the server to hand back the flood's memory (RSS {rss_before} before, "
                      f"{proc_stats(pid)[2]} now)")
        fds, _, _ = proc_stats(pid)
        assert fds < 200, fds
        admin.list()
    finally:
        if attack:
            attack.close()
        assert server.stop() == 0


@root
def test_one_identity_s_idle_connections_cannot_fill_the_server(pki, tmp_path):
    """A reader's connections that each made one authorized call were never closed: 300 took
    every connection the server allows (--max-connections), and an admin could not connect.
    Past --max-connections-per-identity, an identity's idlest go (never one with a call in
    flight, never an admin's)."""
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/conns", extra=[
        "--max-connections", "64", "--max-connections-per-identity", "8"])
    read = lambda name: (pki / name).read_bytes()
    channels, refused = [], 0

    def channel(name):   # a connection of its own
        channels.append(grpc.secure_channel(
            f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(
                read("ca.crt"), read(f"{name}.key"), read(f"{name}.crt")),
            options=[("grpc.use_local_subchannel_pool", 1)]))
        return pb_grpc.JobServiceStub(channels[-1])
    try:
        busy = channel("reader").Stream(pb.StreamRequest(job_id=Peer(pki, server.port, "alice")
                                                         .start("sleep", "600")))
        assert busy.initial_metadata() is not None   # a call in flight on its connection
        for _ in range(5):   # 100 more, 20 at a time, each used for one call
            for stub in [channel("reader") for _ in range(20)]:
                try:
                    stub.Info(pb.InfoRequest(), timeout=10)
                except grpc.RpcError:
                    refused += 1
        wait_for(lambda: len(jw.tcp_connections(server.port)) <= 8 + 2, 30,
                 "the reader's idle connections past its bound to be closed")
        for _ in range(3):   # fresh admin connections get in, and answer
            assert channel("admin").List(pb.ListRequest(), timeout=10) is not None
        assert busy.is_active()   # the reader's one with a call in flight was kept
        assert any("closing idle connections of reader" in line for line in server.lines)
        assert refused < 60, refused
    finally:
        for ch in channels:
            ch.close()
        assert server.stop() == 0


@root
@slow
def test_1000_concurrent_starts_succeed_or_hit_the_cap(pki, tmp_path):
    import asyncio
    with running_server(pki, tmp_path, max_jobs=150) as (m, port):
        read = lambda p: open(p, "rb").read()

        async def flood():
            creds = grpc.ssl_channel_credentials(read(pki / "ca.crt"), read(pki / "alice.key"),
                                                 read(pki / "alice.crt"))
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                stub = pb_grpc.JobServiceStub(channel)

                async def one():
                    try:
                        r = await stub.Start(pb.StartRequest(name="sleep", args=["600"]),
                                             timeout=120)
                        return r.job_id
                    except grpc.aio.AioRpcError as e:
                        return e.code()
                return await asyncio.gather(*(one() for _ in range(1000)))

        results = asyncio.run(flood())
        started = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if not isinstance(r, str)]
        assert set(refused) <= {SC.RESOURCE_EXHAUSTED}
        allowed = 150 - jw.admin_reserve(150)    # the rest is kept for admins
        assert len(started) == allowed and len(refused) == 1000 - allowed
        assert {s.id for s in m.list() if s.state == jw.RUNNING} == set(started)
        assert set(m.cgroups.leftover_job_ids()) == set(started)
        assert set(os.listdir(m.jobs_dir)) == set(started)


@root
@slow
def test_non_reading_client_and_500_idle_streams_keep_memory_bounded(pki, tmp_path):
    import asyncio
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/slow")
    try:
        idle_job = cli(SRC, "start", "sleep", "600", certs=pki, port=server.port).stdout.decode().strip()
        base_rss = proc_stats(server.proc.pid)[2]
        read = lambda p: open(p, "rb").read()
        creds = grpc.ssl_channel_credentials(read(pki / "ca.crt"), read(pki / "client.key"),
                                             read(pki / "client.crt"))
        measured = {}

        async def scenario():
            channels = [grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds) for _ in range(5)]
            stubs = [pb_grpc.JobServiceStub(c) for c in channels]
            idle = [stubs[i % 5].Stream(pb.StreamRequest(job_id=idle_job)) for i in range(500)]
            for call in idle:
                await call.initial_metadata()
            big = cli(SRC, "start", "head", "-c", "500000000", "/dev/zero", certs=pki,
                      port=server.port).stdout.decode().strip()
            stalled = stubs[0].Stream(pb.StreamRequest(job_id=big))   # opened, never read
            await stalled.initial_metadata()
            t0 = time.monotonic()
            while True:
                q = await stubs[1].Query(pb.QueryRequest(job_id=big))
                if q.status.state != pb.JOB_STATE_RUNNING or time.monotonic() - t0 > 120:
                    break
                measured["rss"] = max(measured.get("rss", 0), proc_stats(server.proc.pid)[2])
                await asyncio.sleep(0.2)
            measured["seconds"] = time.monotonic() - t0
            measured["state"], measured["bytes"] = q.status.state, q.status.output_bytes
            for call in idle + [stalled]:
                call.cancel()
            for c in channels:
                await c.close()

        asyncio.run(scenario())
        assert measured["state"] == pb.JOB_STATE_EXITED and measured["bytes"] == 500_000_000
        assert measured["seconds"] < 120                      # the writer was never blocked
        assert measured["rss"] - base_rss < 200 << 20, (base_rss, measured["rss"])
    finally:
        assert server.stop() == 0


@root
@slow
def test_no_leaks_after_1000_jobs(pki, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    server = ServeProcess(SRC, pki, tmp_path / "state", f"{RUN_PARENT}/leaks")
    driver = jw.detect_cgroups(f"{RUN_PARENT}/leaks")
    peers = [Peer(pki, server.port, "client") for _ in range(4)]
    try:
        def one(i):
            peer = peers[i % 4]
            kind = i % 8
            try:
                if kind in (0, 1, 2):
                    peer.stream(peer.start("sh", "-c", f"echo {i}; echo e >&2"))
                elif kind in (3, 4):
                    job = peer.start("sleep", "600")
                    peer.stub.Stop(pb.StopRequest(job_id=job, grace_seconds=0))
                elif kind == 5:
                    job = peer.start("sh", "-c", "head -c 100000000 /dev/zero | tail",
                                     memory_limit="16M")
                    assert peer.stream(job)[2].oom_killed
                else:
                    with pytest.raises(grpc.RpcError):
                        peer.start("/nonexistent/program")
            except grpc.RpcError as e:
                raise AssertionError(f"job {i}: {e.code()} {e.details()}") from None

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(80)))             # warm up threads, caches, channels
            time.sleep(1)
            fds0, _, rss0 = proc_stats(server.proc.pid)
            ours0, _, native0 = server_threads(server.proc.pid)
            list(pool.map(one, range(1000)))
        time.sleep(1)
        _, _, rss1 = proc_stats(server.proc.pid)
        ours1, pools1, _ = server_threads(server.proc.pid)
        launcher = children_of(server.proc.pid)[0]
        # (a job's end is seen a moment before its fds are closed: they are waited for)
        held = lambda: [os.readlink(f"/proc/{server.proc.pid}/fd/{f}")
                        for f in os.listdir(f"/proc/{server.proc.pid}/fd")]
        with contextlib.suppress(AssertionError):
            wait_for(lambda: len(held()) <= fds0 + 4, 30, "the jobs' fds to be closed")
        assert len(held()) <= fds0 + 4, (fds0, sorted(held()))
        # none of the server's threads outlives its work; its pools stay within their bounds
        # (a thread started from a pool's thread inherits its kernel name: the calls of 4
        # clients in flight at once, each with the previous one still ending, need at most 16
        # handlers); grpc's own pool, grown under the burst, gives back what it grew
        assert ours1 == ours0, (ours0, ours1)
        bounds = dict(SERVER_POOLS, **{"jobworker-rpc_": 4 * len(peers)})
        assert all(pools1[p] <= n for p, n in bounds.items()), pools1
        wait_for(lambda: server_threads(server.proc.pid)[2] <= native0 + 4, 60,
                 "grpc's threads to be as many as before the jobs")
        assert rss1 - rss0 < 40 << 20, (rss0, rss1)
        assert zombies_of(launcher) == [] and children_of(launcher) == []
        assert driver.leftover_job_ids() == []
    finally:
        for p in peers:
            p.close()
        assert server.stop() == 0


# -- hostile input ----------------------------------------------------------------------------

@given(st.one_of(st.text(max_size=40),
                 st.from_regex(r"[0-9]{1,400}(\.[0-9]{1,20})?\s*[KMGTkmgt]?(i?B)?(/s|%)?",
                               fullmatch=True)))
@settings(max_examples=600, deadline=None)
def test_parsers_accept_or_say_invalid_argument(text):
    for parse, field in [(jw.parse_cpu_quota, "cpu_quota"), (jw.parse_memory, "memory_limit"),
                         (jw.parse_disk_io, "disk_io"), (jw.parse_pids, "pids"),
                         (jw.validate_job_id, "job_id")]:
        try:
            value = parse(text)
        except jw.InvalidArgument as e:
            assert e.field == field
            continue
        if parse is jw.parse_cpu_quota and value is not None:
            assert 1 <= value <= os.cpu_count() * 100
        elif parse in (jw.parse_memory, jw.parse_disk_io) and value is not None:
            assert value >= 4096
        elif parse is jw.parse_pids and value is not None:
            assert 1 <= value <= jw.MAX_PIDS


@given(st.text(max_size=30), st.lists(st.text(max_size=30), max_size=5))
@settings(max_examples=300, deadline=None)
def test_command_validation_accepts_or_refuses_cleanly(name, args):
    try:
        argv = jw.validate_command(name, args)
    except (jw.InvalidArgument, jw.CapReached):
        return
    assert argv == [name, *args] and name and all("\0" not in a for a in argv)


SAFE_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION",
              "RESOURCE_EXHAUSTED"}
limit_text = st.one_of(st.text(max_size=12), st.sampled_from(["50%", "256M", "10MB/s", "7", ""]))


@root
@given(name=st.one_of(st.just("true"), st.text(max_size=20).map(lambda t: "/nonexistent-jw/" + t),
                      st.text(max_size=8)),
       args=st.lists(st.text(max_size=20), max_size=4),
       cpu=limit_text, memory=limit_text, disk_io=limit_text, pids=limit_text,
       job_id=st.one_of(st.text(max_size=40), st.uuids().map(str)),
       offset=st.integers(min_value=0, max_value=2 ** 64 - 1),
       grace=st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_rpc_messages_never_give_internal(peers, name, args, cpu, memory, disk_io, pids,
                                                 job_id, offset, grace):
    if not name.startswith(("/", "true")):
        name = "/nonexistent-jw/" + name       # never run an arbitrary program
    admin = peers("admin").stub
    calls = [
        lambda: admin.Start(pb.StartRequest(name=name, args=args, resources=pb.ResourceConfig(
            cpu_quota=cpu, memory_limit=memory, disk_io=disk_io, pids=pids)), timeout=30),
        lambda: admin.Query(pb.QueryRequest(job_id=job_id), timeout=30),
        lambda: admin.Stop(pb.StopRequest(job_id=job_id, grace_seconds=grace), timeout=30),
        lambda: list(admin.Stream(pb.StreamRequest(job_id=job_id, offset=offset), timeout=30)),
    ]
    for call in calls:
        try:
            call()
        except grpc.RpcError as e:
            assert e.code().name in SAFE_CODES, (e.code(), e.details())
            assert "Traceback" not in (e.details() or "")


@root
@given(data=st.binary(max_size=200), method=st.sampled_from(METHODS))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_malformed_request_bytes_are_invalid_argument(peers, data, method):
    channel = peers("admin").channel
    path = f"/{jw.SERVICE_NAME}/{method}"
    call = (channel.unary_stream if method == "Stream" else channel.unary_unary)(path)
    try:
        result = call(data, timeout=30)
        if method == "Stream":
            list(result)
    except grpc.RpcError as e:
        assert e.code().name in SAFE_CODES, (e.code(), e.details())


@root
def test_garbage_bytes_get_a_clear_invalid_argument(peers):
    call = peers("admin").channel.unary_unary(f"/{jw.SERVICE_NAME}/Query")
    with pytest.raises(grpc.RpcError) as e:
        call(b"\xff\xff\xff\xff", timeout=30)
    assert e.value.code() == SC.INVALID_ARGUMENT
    assert e.value.details().startswith("malformed request message")
    call = peers("norole").channel.unary_unary(f"/{jw.SERVICE_NAME}/Query")
    with pytest.raises(grpc.RpcError) as e:   # authorization comes before anything else
        call(b"\xff\xff\xff\xff", timeout=30)
    assert e.value.code() == SC.PERMISSION_DENIED


@root
def test_doctor_reports_a_healthy_setup_and_names_problems(pki, tmp_path):
    r = subprocess.run([*SRC, "doctor", "--certs", str(pki), "--cgroup-parent",
                        f"{RUN_PARENT}/doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TLS 1.2 handshake refused, TLS 1.3 works" in r.stdout
    assert "--disk-io applies to:" in r.stdout and "0 problems found" in r.stdout
    bad = tmp_path / "bad"
    shutil.copytree(pki, bad)
    (bad / "server.key").chmod(0o644)
    r = subprocess.run([*SRC, "doctor", "--certs", str(bad), "--cgroup-parent",
                        f"{RUN_PARENT}/doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and f"chmod 600 {bad}/server.key" in r.stdout


# -- a launcher that dies, stops answering or is killed: every such test is here -----------------


def test_a_stopped_launcher_fails_start_in_time_and_is_replaced(fake_manager, monkeypatch):
    # kill -STOP of the launcher hung Start and Stop for ever (20 Starts with 1 s client
    # deadlines left 20 server threads blocked)
    monkeypatch.setattr(jw, "LAUNCHER_TIMEOUT", 1.0)
    monkeypatch.setattr(jw, "LAUNCHER_PING_INTERVAL", 0.2)
    m = fake_manager()
    job = m.start("sleep", ["600"])
    stopped = m.supervisor.launcher.pid
    os.kill(stopped, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(jw.LauncherError) as e:
        m.start("true")
    assert jw.status_code_for(e.value) == "UNAVAILABLE" and "did not answer" in str(e.value)
    assert time.monotonic() - t0 < 10
    assert len(m.list()) == 1   # the Start that was not confirmed left nothing
    wait_for(lambda: m.supervisor.launcher.pid != stopped and m.supervisor.launcher.alive, timeout=20,
             what="a new launcher")
    assert not pid_alive(stopped)
    assert m.stop(job.id, grace=0).state == jw.STOPPED   # its exit is still learned
    assert m.start("true").state == jw.RUNNING


def test_a_launcher_that_stops_answering_while_idle_is_replaced(fake_manager, monkeypatch):
    monkeypatch.setattr(jw, "LAUNCHER_TIMEOUT", 1.0)
    monkeypatch.setattr(jw, "LAUNCHER_PING_INTERVAL", 0.2)
    m = fake_manager()
    job = m.start("sleep", ["600"])
    stopped = m.supervisor.launcher.pid
    os.kill(stopped, signal.SIGSTOP)
    stop = threading.Thread(target=m.stop, args=(job.id, 0), daemon=True)
    stop.start()   # a Stop, waiting for an exit the stopped launcher does not report
    stop.join(30)
    assert not stop.is_alive() and m.status(job.id).state == jw.STOPPED
    assert not pid_alive(stopped)


@root
def test_a_killed_launcher_is_replaced_and_its_jobs_go_on(manager):
    writer = manager.start("sh", ["-c", "trap 'exit 9' TERM; " + COUNTER])
    ends = manager.start("sh", ["-c", "sleep 2; exit 7"])
    daemon = manager.start("sh", ["-c", "setsid sleep 600 & echo $!; sleep 600"])
    wait_for(lambda: manager.status(writer.id).output_bytes > 20, what="the counter")
    wait_for(lambda: manager.status(daemon.id).output_bytes, what="the daemon's pid")
    first = manager.supervisor.launcher.process
    first.kill()
    t0 = time.monotonic()
    wait_for(lambda: manager.supervisor.launcher.process is not first and manager.supervisor.launcher.alive,
             what="a new launcher")
    replaced = time.monotonic() - t0
    assert replaced < 5, replaced                       # wide band: "within a second" in README
    assert first.returncode == -signal.SIGKILL          # reaped: no zombie stays
    hi = manager.start("sh", ["-c", "echo hi"])          # Start works again
    assert output(manager, hi.id)[0] == b"hi\n" and wait_final(manager, hi.id).exit_code == 0
    size = manager.status(writer.id).output_bytes
    wait_for(lambda: manager.status(writer.id).output_bytes > size + 50, what="more output")
    s = wait_final(manager, ends.id)                    # ended while no launcher was its parent
    assert (s.state, s.exit_code, s.lost_reason) == (jw.EXITED, 7, "")
    stopped = manager.stop(writer.id, grace=5)
    assert (stopped.state, stopped.exit_code) == (jw.STOPPED, 9)
    seen = numbers(output(manager, writer.id)[0])
    assert seen == sorted(set(seen)) and seen[-1] > 100   # in order, none twice
    for _ in range(2):                                  # it keeps dying: it keeps coming back
        dying = manager.supervisor.launcher
        os.kill(dying.pid, signal.SIGKILL)
        wait_for(lambda: manager.supervisor.launcher is not dying and manager.supervisor.launcher.alive,
                 timeout=30, what="another launcher")
    assert manager.stop(daemon.id, grace=0).state == jw.STOPPED
    assert manager.cgroups.leftover_job_ids() == []


@root
def test_a_launcher_dying_right_after_its_spawn_reply_leaves_the_job_watched(manager,
                                                                           monkeypatch):
    # The interleaving a job that kills its launcher can cause: the spawn reply is read, then
    # the launcher's end, before the Start thread has stored the job's pidfd.
    spawn = jw.LauncherClient.spawn

    def then_die(launcher, *a):
        pid_and_pidfd = spawn(launcher, *a)
        deaths = len(manager.supervisor.deaths)
        os.kill(launcher.pid, signal.SIGKILL)
        wait_for(lambda: len(manager.supervisor.deaths) > deaths, what="the launcher's end seen")
        return pid_and_pidfd
    monkeypatch.setattr(jw.LauncherClient, "spawn", then_die)
    job = manager.start("sh", ["-c", "sleep 1; exit 3"])
    monkeypatch.setattr(jw.LauncherClient, "spawn", spawn)
    s = wait_final(manager, job.id)   # its end is still learned (from its pidfd)
    assert (s.state, s.exit_code) == (jw.EXITED, 3)
    wait_for(lambda: manager.supervisor.launcher.alive, timeout=30, what="a new launcher")


@root
def test_a_spawn_whose_fds_did_not_all_arrive_is_refused_and_the_launcher_lives(manager):
    # A launcher at its open-files limit receives fewer fds than were sent (the kernel drops
    # the rest): it must refuse that one spawn, not die with every job's pipes.
    running = manager.start("sleep", ["600"])
    launcher = manager.supervisor.launcher
    before = launcher.pid
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        req = jw.SpawnRequest(job=str(uuid.uuid4()), dir=str(manager.store.jobs_dir),
                              cap=1 << 20, argv=["true"], env={}, cwd="/", procs=[],
                              empty_file="/dev/null")
        with pytest.raises(jw.CapReached) as e:
            launcher.spawn(req, [w, r])
        assert "open files of the job launcher" in str(e.value)
        assert jw.status_code_for(e.value) == "RESOURCE_EXHAUSTED"
    finally:
        os.close(r)
        os.close(w)
    assert launcher.alive and manager.supervisor.launcher.pid == before
    assert manager.status(running.id).state == jw.RUNNING
    assert manager.start("true", []).state == jw.RUNNING


@root
def test_a_server_s_launcher_killed_by_a_job_comes_back(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/relaunch"
    server = ServeProcess(SRC, pki, state, parent)
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    try:
        job = run("start", "sh", "-c", COUNTER).stdout.decode().strip()
        first = launcher_of(state)
        # After a pause, so that Start has its answer (a launcher killed before it answers is
        # the next test).
        killer = run("start", "sh", "-c", f"sleep 0.5; kill -9 {first}").stdout.decode().strip()
        wait_for(lambda: launcher_of(state) not in (None, first), what="a new launcher")
        assert run("query", killer, "--json").returncode == 0
        wait_for(lambda: run("start", "true").returncode == 0, timeout=10, what="Start")
        assert first not in children_of(server.proc.pid)       # the old one was reaped
        assert json.loads(run("query", job, "--json").stdout)["state"] == "running"
        run("stop", job, "--grace", "0")
        assert json.loads(run("query", job, "--json").stdout)["state"] == "stopped"
    finally:
        assert server.stop() == 0


@root
def test_a_launcher_killed_before_it_answers_start_fails_it_cleanly(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/relaunch-race"
    server = ServeProcess(SRC, pki, state, parent)
    run = lambda *a: cli(SRC, *a, certs=pki, port=server.port)
    try:
        for _ in range(4):   # (more, and the relaunch backoff grows past a test's patience)
            first = launcher_of(state)
            # The job kills its launcher at once: whether Start gets its answer first is a race.
            r = run("start", "kill", "-9", str(first))
            wait_for(lambda: launcher_of(state) not in (None, first), what="a new launcher")
            if r.returncode == 0:
                assert run("query", r.stdout.decode().strip()).returncode == 0
            else:
                assert r.returncode == jw.EXIT_CONNECT, r
                assert b"job launcher exited while starting the job" in r.stderr, r
                assert b"cannot reach" not in r.stderr, r
            wait_for(lambda: run("start", "true").returncode == 0, timeout=10, what="Start")
        listed = run("list", "--json").stdout.decode()
        # No job dir and no cgroup without a job.
        assert [p.name for p in pathlib.Path(state, "jobs").iterdir()
                if p.name not in listed] == []
        assert [c for c in jw.detect_cgroups(parent).leftover_job_ids() if c not in listed] == []
    finally:
        assert server.stop() == 0


@root
def test_crash_of_server_and_launcher_then_restart(pki, tmp_path):
    state, parent = tmp_path / "state", f"{RUN_PARENT}/crash"
    driver = jw.detect_cgroups(parent)
    server = ServeProcess(SRC, pki, state, parent)
    script = "setsid sleep 600 & echo daemon $!; i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"
    jobs = [cli(SRC, "start", "sh", "-c", script, certs=pki, port=server.port).stdout.decode().strip()
            for _ in range(3)]
    finished = cli(SRC, "start", "sh", "-c", "printf 'done\\0'", certs=pki,
                   port=server.port).stdout.decode().strip()
    peer = Peer(pki, server.port, "client")
    before = peer.stream(finished)
    peer.close()
    for j in jobs:
        wait_for(lambda: (state / "jobs" / j / "output.log").stat().st_size > 100, what="output")
    daemons = [int((state / "jobs" / j / "output.log").read_bytes().split()[1]) for j in jobs]
    launcher = children_of(server.proc.pid)
    assert len(launcher) == 1
    os.kill(server.proc.pid, signal.SIGKILL)
    os.kill(launcher[0], signal.SIGKILL)
    server.proc.wait(30)
    assert all(pid_alive(d) for d in daemons)        # the crash left the jobs behind
    restarted = ServeProcess(SRC, pki, state, parent)
    try:
        peer = Peer(pki, restarted.port, "client")
        for j, daemon in zip(jobs, daemons):
            q = peer.stub.Query(pb.QueryRequest(job_id=j)).status
            assert q.state == pb.JOB_STATE_LOST and q.HasField("ended_at")
            out, _, final = peer.stream(j)
            assert out.startswith(f"daemon {daemon}\ntick 0\ntick 1\n".encode())
            assert final.state == pb.JOB_STATE_LOST
            assert not pid_alive(daemon)
        assert peer.stream(finished) == before      # finished jobs: byte-exact after restart
        assert driver.leftover_job_ids() == []
        peer.close()
    finally:
        assert restarted.stop() == 0


# ================================================================================================
# The proto from another gRPC stack: grpc-js with proto-loader (Node.js), unchanged
# ================================================================================================


@pytest.fixture(scope="session")
def grpc_js():
    """node_modules with pinned grpc-js and proto-loader (cached under build/)."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.fail("node and npm are needed for the cross-stack test")
    prefix = os.path.join(HERE, "build", "node-grpc")
    if not os.path.isdir(os.path.join(prefix, "node_modules", "@grpc", "proto-loader")):
        os.makedirs(prefix, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", prefix,
                        "@grpc/grpc-js@1.14.7", "@grpc/proto-loader@0.8.1"], check=True,
                       timeout=300)
    return prefix


@root
@slow
def test_proto_works_unchanged_from_grpc_js(grpc_js, pki, api):
    script = os.path.join(grpc_js, "client.js")
    shutil.copyfile(os.path.join(HERE, "test_grpc_js_client.js"), script)
    run = lambda name, *mode: subprocess.run(
        ["node", script, os.path.join(HERE, "jobworker.proto"), f"127.0.0.1:{api[1]}", str(pki),
         name, *mode], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, NODE_PATH=os.path.join(grpc_js, "node_modules")))
    r = run("alice")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["out"] == [["OUTPUT_STREAM_STDOUT", "from node\n"], ["OUTPUT_STREAM_STDERR", "err\n"]]
    assert (result["state"], result["owner"], result["memory"]) == \
        ("JOB_STATE_EXITED", "alice", str(64 << 20))
    r = run("reader")
    assert json.loads(r.stdout) == {"start_error": grpc.StatusCode.PERMISSION_DENIED.value[0]}
    r = run("alice", "attach")   # a bidirectional round trip: input up, output down
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"out": "a\nb\n", "state": "JOB_STATE_EXITED",
                                    "stdin": "STDIN_MODE_PIPE"}


# ================================================================================================
# Bootstrap and build helpers (zipapp_main.py, v2_guest_checks.py)
# ================================================================================================


import importlib.util
import tempfile
import zipfile

import build_zipapp
import v2_guest
import zipapp_main


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _pyz_config(pyz):
    with zipfile.ZipFile(pyz) as zf:
        main = zf.read("__main__.py").decode()
    return json.loads(main.split("\nCONFIG = ", 1)[1].split("\n", 1)[0])


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOBWORKER_CACHE_DIR", "XDG_CACHE_HOME", "HOME", "TMPDIR")}
    return dict(env, **extra)


def test_importing_the_bootstrap_runs_nothing():
    r = subprocess.run([sys.executable, "-c", "import sys, zipapp_main; "
                        "print(zipapp_main.CONFIG, 'jobworker' in sys.modules)"],
                       cwd=HERE, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "None False\n", "")


def test_bootstrap_picks_the_target_or_names_what_was_built():
    config = {"targets": {"cp311-x86_64": {"wheels": [], "glibc": [2, 28]},
                          "cp312-aarch64": {"wheels": [], "glibc": [2, 17]}}}
    assert zipapp_main.find_target(config, "cpython", (3, 11), "x86_64", "2.36")[0] == \
        "cp311-x86_64"
    with pytest.raises(zipapp_main.BootstrapError,
                       match=r"no packages for cpython 3\.9 on x86_64; it was built for "
                             r"cp311-x86_64, cp312-aarch64"):
        zipapp_main.find_target(config, "cpython", (3, 9), "x86_64", "2.36")
    with pytest.raises(zipapp_main.BootstrapError, match="no packages for pypy 3.11"):
        zipapp_main.find_target(config, "pypy", (3, 11), "x86_64", "2.36")
    with pytest.raises(zipapp_main.BootstrapError, match=r"needs glibc 2\.28 or newer \(this "
                                                         r"host has 2\.17\)"):
        zipapp_main.find_target(config, "cpython", (3, 11), "x86_64", "2.17")


def _fake_pyz(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return {"build_id": "b1", "lib": "_jobworker_lib", "modules": ["jobworker.py"],
            "targets": {"cp311-x86_64": {"wheels": ["w-1.0"], "glibc": [2, 17]}}}


def test_bootstrap_extracts_its_target_once_into_a_private_dir(tmp_path):
    archive = tmp_path / "fake.pyz"
    config = _fake_pyz(archive, {"jobworker.py": "X = 1\n", "_jobworker_lib/w-1.0/w/__init__.py":
                                 "Y = 2\n", "_jobworker_lib/other-2.0/o.py": "", "README": ""})
    target = config["targets"]["cp311-x86_64"]
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    dest = zipapp_main.extract(config, str(root), "cp311-x86_64", target, str(archive),
                               os.geteuid())
    assert dest == str(root / "b1-cp311-x86_64") and os.listdir(root) == ["b1-cp311-x86_64"]
    assert sorted(os.listdir(dest)) == [zipapp_main.IN_USE, "__pycache__", "jobworker.py", "w"]
    assert glob.glob(f"{dest}/w/__pycache__/__init__.*.pyc")   # bytecode made at extraction
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o700
    archive.unlink()   # a second run finds the dir and reads nothing
    assert zipapp_main.extract(config, str(root), "cp311-x86_64", target, str(archive),
                               os.geteuid()) == dest


def test_bootstrap_refuses_a_path_escaping_the_cache_and_leaves_nothing(tmp_path):
    archive = tmp_path / "evil.pyz"
    config = _fake_pyz(archive, {"_jobworker_lib/w-1.0/../../../escaped.py": "",
                                 "_jobworker_lib/w-1.0/ok.py": ""})
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    with pytest.raises(zipapp_main.BootstrapError, match="bad path in archive"):
        zipapp_main.extract(config, str(root), "cp311-x86_64", config["targets"]["cp311-x86_64"],
                            str(archive), os.geteuid())
    assert os.listdir(root) == [] and not list(tmp_path.glob("**/escaped.py"))


def test_bootstrap_cache_candidates_follow_the_environment():
    env = {"XDG_CACHE_HOME": "/x", "HOME": "/h", "TMPDIR": "/t"}
    assert zipapp_main.cache_candidates(env, 1000) == ["/x/jobworker", "/h/.cache/jobworker",
                                                       "/t/jobworker-1000"]
    assert zipapp_main.cache_candidates({"HOME": "/h"}, 1000) == ["/h/.cache/jobworker",
                                                                  "/tmp/jobworker-1000"]
    assert zipapp_main.cache_candidates(dict(env, JOBWORKER_CACHE_DIR="/c"), 1000) == ["/c"]


def test_bootstrap_cache_root_is_made_private_and_an_open_one_is_refused(tmp_path):
    made = zipapp_main.cache_root({"JOBWORKER_CACHE_DIR": str(tmp_path / "a" / "c")},
                                  os.geteuid())
    assert made == str(tmp_path / "a" / "c")
    assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700
    os.chmod(made, 0o755)
    with pytest.raises(zipapp_main.BootstrapError, match=r"open to others \(mode 755\); "
                                                         r"chmod 700 it"):
        zipapp_main.cache_root({"JOBWORKER_CACHE_DIR": made}, os.geteuid())


def test_build_id_covers_the_bootstrap_text_and_every_entry():
    with open(build_zipapp.BOOTSTRAP) as f:
        text = f.read()
    entries = {"jobworker.py": b"A = 1\n", "_jobworker_lib/w-1.0/w.py": b""}
    targets = {"cp311-x86_64": {"wheels": ["w-1.0"], "glibc": [2, 17]}}
    build_id, main = build_zipapp.main_module(text, entries, targets)
    assert build_zipapp.main_module(text, dict(entries), targets) == (build_id, main)
    assert build_zipapp.main_module(text + "\n", entries, targets)[0] != build_id
    assert build_zipapp.main_module(text, dict(entries, **{"jobworker.py": b"A = 2\n"}),
                                    targets)[0] != build_id
    namespace = {}
    exec(compile(main, "__main__.py", "exec"), namespace)   # the guard keeps main() from running
    assert namespace["CONFIG"] == {"build_id": build_id, "lib": "_jobworker_lib",
                                   "modules": build_zipapp.MODULES, "targets": targets}
    with pytest.raises(ValueError, match="CONFIG = None"):
        build_zipapp.main_module(text.replace(build_zipapp.CONFIG_LINE, ""), entries, targets)


@pytest.mark.slow
def test_pyz_main_is_zipapp_main_with_its_config_filled_in(pyz):
    config = _pyz_config(pyz)
    assert sorted(config["targets"]) == [f"cp3{v}-{os.uname().machine}" for v in range(10, 14)]
    with zipfile.ZipFile(pyz) as zf, open(os.path.join(HERE, "zipapp_main.py")) as f:
        filled = f"CONFIG = {json.dumps(config, sort_keys=True)}\n"
        assert zf.read("__main__.py").decode().replace(filled, build_zipapp.CONFIG_LINE) == \
            f.read()


def test_bootstrap_root_cache_is_fixed_whatever_home_says():
    env = {"XDG_CACHE_HOME": "/home/bob/.cache", "HOME": "/home/bob", "TMPDIR": "/tmp"}
    assert zipapp_main.cache_candidates(env, 0) == ["/var/cache/jobworker"]
    assert zipapp_main.cache_candidates(dict(env, JOBWORKER_CACHE_DIR="/srv/c"), 0) == ["/srv/c"]


@pytest.mark.parametrize("mode,problem", [(0o777, "is writable by group or others (mode 777)"),
                                          (0o775, "is writable by group or others (mode 775)"),
                                          (0o1777, None), (0o755, None)])
def test_bootstrap_checks_every_component_before_making_anything_below(tmp_path, mode, problem):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    cache = shared / "sub" / "cache"
    if problem:
        with pytest.raises(zipapp_main.BootstrapError) as e:
            zipapp_main.make_private_dir(str(cache), os.geteuid())
        assert str(e.value).startswith(f"unsafe cache dir {cache}: {shared} {problem}; ")
        assert os.listdir(shared) == []
    else:
        assert zipapp_main.make_private_dir(str(cache), os.geteuid()) == str(cache)
        assert stat.S_IMODE((shared / "sub").stat().st_mode) == 0o700
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_bootstrap_refuses_a_symlink_or_a_file_on_the_way(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("")
    for component, problem in [("link", "is a symlink"), ("file", "is not a directory")]:
        with pytest.raises(zipapp_main.BootstrapError,
                           match=f": {tmp_path / component} {problem}; "):
            zipapp_main.make_private_dir(str(tmp_path / component / "cache"), os.geteuid())
    assert os.listdir(tmp_path / "real") == []


def _dir_with(path, files=("f", zipapp_main.IN_USE), age=0):
    """A dir as the cache holds them (a build carries its in-use file), last used `age` ago."""
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"x" * 4096)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def _holding(*argv, env=None):
    """A process that says "ok" once it holds what argv gives it."""
    p = subprocess.Popen([sys.executable, "-c", *argv], stdout=subprocess.PIPE, env=env)
    if p.stdout.readline() != b"ok\n":
        p.kill()
        p.wait()
        raise AssertionError(f"{argv} did not start")
    return p


HOLD_BUILD = ("import fcntl, os, time; fd = os.open(os.environ['F'], os.O_RDONLY); "
              "fcntl.flock(fd, fcntl.LOCK_SH); print('ok', flush=True); time.sleep(60)")


def test_bootstrap_prune_removes_unused_builds_and_leftovers_and_keeps_the_rest(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    day, old = zipapp_main.UNUSED_FOR, zipapp_main.UNUSED_FOR + 3600
    keep = _dir_with(root / "0123456789abcdef-cp311-x86_64", age=old)   # this run's own
    gone = [_dir_with(root / "1111111111111111-cp311-x86_64", age=old),
            _dir_with(root / "2222222222222222-cp312-aarch64", age=old),
            _dir_with(root / ".extract-k2j4abcd", age=old),                 # a failed extraction
            _dir_with(root / ".prune-4444444444444444-cp311-x86_64"),       # unfinished removals,
            _dir_with(root / ".prune-9999999999999999-cp311-x86_64", files=("f",)),  # in-use gone
            _dir_with(root / ".prune-aaaaaaaaaaaaaaaa-cp311-x86_64")]       # (see below)
    # its removal's name is taken: that one goes first, this build at the next prune
    later = _dir_with(root / "aaaaaaaaaaaaaaaa-cp311-x86_64", age=old)
    kept = [_dir_with(root / "3333333333333333-cp311-x86_64", age=day - 3600),   # used lately
            _dir_with(root / ".extract-m3n8abcd"),                          # extracting
            # without an in-use file: an older bootstrap's build, or not the cache's at all
            _dir_with(root / "5555555555555555-cp311-x86_64", files=("f",), age=old),
            _dir_with(root / ".extract-zz99yy88", files=("f",), age=old),
            _dir_with(root / "notes", age=old),                 # not the cache's, by their names
            _dir_with(root / "0123-cp311-x86_64", age=old),
            _dir_with(root / ".prune-old-photos", age=old),
            _dir_with(root / ".extract-thesis", age=old)]
    (root / "7777777777777777-cp311-x86_64").write_text("a file")
    outside = _dir_with(tmp_path / "outside", age=old)
    (root / "8888888888888888-cp311-x86_64").symlink_to(outside)
    held = _dir_with(root / "6666666666666666-cp311-x86_64", age=old)
    # a process running from it (a server, a CLI, a launcher kept across an upgrade)
    user = _holding(HOLD_BUILD, env=dict(os.environ, F=str(held / zipapp_main.IN_USE)))
    try:
        removed = zipapp_main.prune(str(root), str(keep))
    finally:
        user.kill()
        user.wait()
    assert sorted(removed) == sorted(p.name for p in gone)
    assert sorted(os.listdir(root)) == sorted(
        [p.name for p in (keep, *kept, held, later)] +
        ["7777777777777777-cp311-x86_64", "8888888888888888-cp311-x86_64"])
    assert sorted(os.listdir(outside)) == sorted(["f", zipapp_main.IN_USE])
    # once no process holds it, it goes too: the next new build's first run prunes again
    assert zipapp_main.prune(str(root), str(keep)) == sorted([held.name, later.name])


def test_bootstrap_prune_removes_nothing_while_a_run_holds_the_cache(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    old = _dir_with(root / "1111111111111111-cp311-x86_64", age=2 * zipapp_main.UNUSED_FOR)
    with zipapp_main.locked(str(root), fcntl.LOCK_SH) as got:
        assert got   # a run between finding its build and holding it
        assert zipapp_main.prune(str(root), "") == []
        assert old.exists()
    assert zipapp_main.prune(str(root), "") == [old.name]


def test_bootstrap_use_build_holds_its_build_and_says_whether_it_was_new(tmp_path, monkeypatch):
    archive = tmp_path / "fake.pyz"
    config = _fake_pyz(archive, {"jobworker.py": "X = 1\n"})
    target = config["targets"]["cp311-x86_64"]
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    use = lambda: zipapp_main.use_build(config, str(root), "cp311-x86_64", target,
                                        str(archive), os.geteuid())
    extract, locked = zipapp_main.extract, zipapp_main.locked
    locked_out, held_first = [], []

    def free(path, how):   # would `how` be granted now? (probed and given back at once)
        fd = zipapp_main._flock(path, how | fcntl.LOCK_NB)
        if fd is not None:
            os.close(fd)
        return fd is not None
    monkeypatch.setattr(zipapp_main, "extract", lambda *a: (locked_out.append(
        free(str(root), fcntl.LOCK_EX)), extract(*a))[1])

    @contextlib.contextmanager
    def probing(*a):   # as the cache's lock is given back, is the build's held already?
        with locked(*a) as got:
            yield got
            held_first.append(not free(str(root / "b1-cp311-x86_64" / zipapp_main.IN_USE),
                                       fcntl.LOCK_EX))
    monkeypatch.setattr(zipapp_main, "locked", probing)
    held = len(zipapp_main._held)
    try:
        dest, new = use()
        assert new and dest == str(root / "b1-cp311-x86_64")
        assert locked_out == [False]   # no prune while it looks for and extracts its build
        assert held_first == [True]   # and none between that and holding the build
        assert not free(os.path.join(dest, zipapp_main.IN_USE), fcntl.LOCK_EX)   # held
        os.utime(dest, (0, 0))
        before = time.time()
        assert use() == (dest, False)
        assert os.stat(dest).st_mtime >= before - 1   # a run started from it just now
    finally:
        for fd in zipapp_main._held[held:]:
            os.close(fd)
        del zipapp_main._held[held:]


def test_bootstrap_prune_removes_what_it_renamed_without_holding_the_cache(tmp_path,
                                                                         monkeypatch):
    import shutil
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    old = _dir_with(root / "1111111111111111-cp311-x86_64", age=2 * zipapp_main.UNUSED_FOR)
    rmtree, free = shutil.rmtree, []

    def probing(path, *a, **kw):   # may a starting run take the cache's lock meanwhile?
        fd = zipapp_main._flock(str(root), fcntl.LOCK_SH | fcntl.LOCK_NB)
        free.append(fd is not None)
        if fd is not None:
            os.close(fd)
        return rmtree(path, *a, **kw)
    monkeypatch.setattr(shutil, "rmtree", probing)
    assert zipapp_main.prune(str(root), "") == [old.name] and free == [True]


def test_a_launcher_is_given_a_lock_on_its_pyz_build(tmp_path):
    (tmp_path / jw.PYZ_IN_USE).write_text("")
    fd = jw.build_lock(str(tmp_path))
    try:
        assert zipapp_main._flock(str(tmp_path / jw.PYZ_IN_USE),
                                  fcntl.LOCK_EX | fcntl.LOCK_NB) is None
    finally:
        os.close(fd)
    assert jw.build_lock(str(tmp_path / "nothing-here")) is None


def test_the_launcher_holds_the_in_use_file_the_bootstrap_makes():
    assert jw.PYZ_IN_USE == zipapp_main.IN_USE


@slow
@root
def test_pyz_runs_from_a_read_only_cache(pyz, venvs, tmp_path):
    python = venvs["3.11"] if "3.11" in venvs else next(iter(venvs.values()))
    cache = tmp_path / "cache"
    env = dict(os.environ, JOBWORKER_CACHE_DIR=str(cache))
    assert subprocess.run([python, str(pyz), "--version"], env=env, capture_output=True,
                          timeout=120).returncode == 0   # made beforehand, as in an image
    # read-only in a mount namespace of this test's own
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$1" && '
                        'mount -o remount,bind,ro "$1" && exec "$2" "$3" --version', "-",
                        str(cache), python, str(pyz)], env=env, capture_output=True, timeout=120)
    assert (r.returncode, r.stderr) == (0, b"") and r.stdout.startswith(b"jobworker ")


@slow
@root
def test_a_launcher_kept_across_an_upgrade_keeps_its_pyz_build(pyz, venvs, pki, tmp_path):
    python = venvs["3.11"]
    cache = tmp_path / "cache"
    env = dict(os.environ, JOBWORKER_CACHE_DIR=str(cache))
    state, parent = tmp_path / "state", f"{RUN_PARENT}/keepbuild"
    serve = lambda: ServeProcess([python, str(pyz)], pki, state, parent, env=env)
    server = serve()
    job = cli([python, str(pyz)], "start", "sleep", "600", certs=pki, port=server.port,
              env=env).stdout.decode().strip()
    launcher = launcher_of(state)
    server.proc.kill()   # as an upgrade under systemd: the launcher and the job go on
    server.proc.wait(30)
    (build,) = [d for d in os.listdir(cache) if not d.startswith(".")]
    unused = lambda: os.utime(cache / build, (time.time() - 2 * zipapp_main.UNUSED_FOR,) * 2)
    try:
        unused()
        assert zipapp_main.prune(str(cache), "") == [] and (cache / build).is_dir()
        server = serve()   # adopts the job from the same launcher
        try:
            cli([python, str(pyz)], "stop", job, "--grace", "0", certs=pki, port=server.port,
                env=env)
        finally:
            assert server.stop() == 0
        wait_for(lambda: not pid_alive(launcher), what="the launcher's exit")
    finally:
        if pid_alive(launcher):   # (a failure above: the job goes with the test's cgroups)
            os.kill(launcher, signal.SIGKILL)
    unused()
    assert zipapp_main.prune(str(cache), "") == [build] and os.listdir(cache) == []


@slow
def test_pyz_first_run_of_a_new_build_removes_the_unused_ones(pyz, venvs, tmp_path):
    python = venvs["3.11"] if "3.11" in venvs else next(iter(venvs.values()))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    old = _dir_with(cache / "ffffffffffffffff-cp311-x86_64", age=2 * zipapp_main.UNUSED_FOR)
    env = dict(os.environ, JOBWORKER_CACHE_DIR=str(cache))
    run = lambda: subprocess.run([python, str(pyz), "--version"], env=env, capture_output=True,
                                 timeout=120)
    r = run()
    assert (r.returncode, r.stderr) == (0, b"")
    (ours,) = os.listdir(cache)
    assert ours.startswith(f"{_pyz_config(pyz)['build_id']}-cp3")
    # a later run of the same build leaves the cache alone: the next new build tidies it
    old = _dir_with(cache / "ffffffffffffffff-cp311-x86_64", age=2 * zipapp_main.UNUSED_FOR)
    r = run()
    assert r.returncode == 0 and sorted(os.listdir(cache)) == sorted([ours, old.name])


def test_bootstrap_says_which_cache_dirs_it_could_not_make():
    with pytest.raises(zipapp_main.BootstrapError, match=r"^cannot create a cache dir "
                                                         r"\(/proc/jobworker-test/c: .+\)$"):
        zipapp_main.cache_root({"JOBWORKER_CACHE_DIR": "/proc/jobworker-test/c"}, os.geteuid())


@pytest.mark.root
def test_bootstrap_refuses_a_component_of_another_user(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(zipapp_main.BootstrapError, match=f": {theirs} belongs to uid 65534; "
                                                         f"every directory down to the cache "
                                                         f"must be owned by root,"):
        zipapp_main.make_private_dir(str(theirs / "cache"), 0)
    assert os.listdir(theirs) == []


@pytest.fixture
def reachable_dir():
    """A dir in /tmp that uid 65534 can reach (pytest's dirs are root's alone), removed after."""
    d = tempfile.mkdtemp(prefix="jwtest-reachable-")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("make,problem", [
    pytest.param(lambda d: os.chown(d, 65534, 65534), "belongs to uid 65534", id="theirs"),
    pytest.param(lambda d: d.chmod(0o777), "is writable by group or others (mode 777)",
                 id="world-writable"),
    # sticky, as /tmp: others may add entries but not rename ours
    pytest.param(lambda d: d.chmod(0o1777), None, id="sticky")])
def test_pyz_as_root_refuses_a_cache_below_a_dir_another_user_can_write(make, problem, pyz,
                                                                        venvs, reachable_dir):
    shared = reachable_dir / "shared"
    shared.mkdir(mode=0o755)
    make(shared)
    cache = shared / "cache"
    # the other user can write there, as the attack needs
    probe = subprocess.run([*AS_NOBODY, "mkdir", str(shared / "probe")], capture_output=True)
    assert probe.returncode == 0, probe.stderr
    r = subprocess.run([venvs["3.11"], str(pyz), "--version"], capture_output=True, text=True,
                       timeout=120, env=_clean_env(JOBWORKER_CACHE_DIR=str(cache)))
    if problem:
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr.startswith(f"jobworker: unsafe cache dir {cache}: {shared} {problem}; ")
        assert r.stderr.count("\n") == 1
        assert not cache.exists()
    else:
        assert (r.returncode, r.stdout, r.stderr) == (0, f"jobworker {jw.__version__}\n", "")
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and cache.stat().st_uid == 0
        rename = subprocess.run([*AS_NOBODY, "mv", str(cache), str(shared / "moved")],
                                capture_output=True)
        assert rename.returncode != 0 and cache.is_dir()


@pytest.mark.root
@pytest.mark.slow
def test_pyz_as_root_refuses_a_symlink_on_the_way_to_its_cache(pyz, venvs, tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    r = subprocess.run([venvs["3.11"], str(pyz), "--version"], capture_output=True, text=True,
                       timeout=120, env=_clean_env(JOBWORKER_CACHE_DIR=str(tmp_path / "link/c")))
    assert r.returncode == 1
    assert r.stderr.startswith(f"jobworker: unsafe cache dir {tmp_path}/link/c: {tmp_path}/link "
                               f"is a symlink; ")
    assert os.listdir(tmp_path / "real") == []


@pytest.mark.root
@pytest.mark.slow
def test_pyz_as_root_uses_var_cache_whatever_home_and_xdg_say(pyz, venvs, tmp_path):
    theirs = tmp_path / "theirs"   # HOME as `sudo -E` keeps it: another user's dir
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    extracted = os.path.join(zipapp_main.ROOT_CACHE,
                             f"{_pyz_config(pyz)['build_id']}-cp311-{os.uname().machine}")
    existed = os.path.lexists(extracted)
    try:
        r = subprocess.run([venvs["3.11"], str(pyz), "--version"], capture_output=True,
                           text=True, timeout=120,
                           env=_clean_env(HOME=str(theirs), XDG_CACHE_HOME=str(theirs / "xdg"),
                                          TMPDIR=str(theirs)))
        assert (r.returncode, r.stderr) == (0, "")
        assert os.listdir(theirs) == []
        for path in (zipapp_main.ROOT_CACHE, extracted):
            info = os.lstat(path)
            assert (stat.S_ISDIR(info.st_mode), info.st_uid, stat.S_IMODE(info.st_mode)) == \
                (True, 0, 0o700), path
    finally:
        if not existed:   # the real cache of this machine: only what this test made goes
            shutil.rmtree(extracted, ignore_errors=True)


def _python_for_nobody():
    """An interpreter the pyz has packages for that uid 65534 may run (~root is private)."""
    for python in ["/usr/bin/python3", *(f"/usr/bin/python3.{m}" for m in range(10, 14))]:
        r = subprocess.run([*AS_NOBODY, python, "-c", "import sys; print(sys.version_info[1])"],
                           capture_output=True, text=True, env=_clean_env())
        if r.returncode == 0 and 10 <= int(r.stdout) <= 13:
            return python, f"cp31{int(r.stdout) - 10}-{os.uname().machine}"
    pytest.skip("no CPython 3.10-3.13 outside ~root for uid 65534 to run")


@pytest.mark.root
@pytest.mark.slow
def test_pyz_as_another_user_keeps_the_user_cache_rules(pyz, reachable_dir):
    python, tag = _python_for_nobody()
    build = _pyz_config(pyz)["build_id"]
    base = str(reachable_dir)
    shutil.copy(pyz, f"{base}/jobworker.pyz")
    home = f"{base}/home"
    os.mkdir(home, 0o700)
    os.chown(home, 65534, 65534)
    for name, mode in [("tmp", 0o1777), ("open", 0o777)]:
        os.mkdir(f"{base}/{name}")
        os.chmod(f"{base}/{name}", mode)

    def run(**env):
        return subprocess.run([*AS_NOBODY, python, f"{base}/jobworker.pyz", "--version"],
                              capture_output=True, text=True, timeout=120, env=_clean_env(**env))
    for env, cache in [({"HOME": home}, f"{home}/.cache/jobworker"),
                       ({"HOME": home, "XDG_CACHE_HOME": f"{home}/xdg"},
                        f"{home}/xdg/jobworker"),
                       ({"HOME": "/nonexistent", "TMPDIR": f"{base}/tmp"},
                        f"{base}/tmp/jobworker-65534"),
                       ({"HOME": home, "JOBWORKER_CACHE_DIR": f"{home}/mine"}, f"{home}/mine")]:
        r = run(**env)
        assert (r.returncode, r.stdout, r.stderr) == \
            (0, f"jobworker {jw.__version__}\n", ""), env
        for path in (cache, f"{cache}/{build}-{tag}"):
            info = os.lstat(path)
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (65534, 0o700), path
    r = run(HOME=home, JOBWORKER_CACHE_DIR=f"{base}/open/cache")
    assert r.returncode == 1 and r.stderr.startswith(
        f"jobworker: unsafe cache dir {base}/open/cache: {base}/open is writable by group or "
        f"others (mode 777); every directory down to the cache must be owned by root or uid "
        f"65534,")


def test_importing_the_guest_checks_runs_nothing():
    r = subprocess.run([sys.executable, "-c", "import v2_guest_checks as c; print(c.results)"],
                       cwd=HERE, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "{}\n", "")


def test_each_guest_run_carries_the_pyz_and_the_checks_file():
    with open(os.path.join(HERE, "v2_guest_checks.py"), "rb") as f:
        checks = f.read()
    assert v2_guest.run_files(b"PYZ") == [("jobworker.pyz", 0o100755, b"PYZ"),
                                          ("checks.py", 0o100644, checks),
                                          ("v2_guest_checks.py", 0o100644, checks)]
    with open(os.path.join(HERE, "bench", "tenk_guest.py"), "rb") as f:
        tenk = f.read()
    assert v2_guest.run_files(b"PYZ", os.path.join(HERE, "bench", "tenk_guest.py"))[1:] == [
        ("checks.py", 0o100644, tenk), ("v2_guest_checks.py", 0o100644, checks)]
    init = v2_guest.init_script()
    assert "\npython3.11 /checks.py\n" in init
    assert "for m in virtio_ring.ko virtio.ko " in init and "{" not in init


def test_the_guest_init_script_is_valid_shell():
    r = subprocess.run(["sh", "-n", v2_guest.INIT], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    broken = subprocess.run(["sh", "-n"], input="for m in a; do\n", capture_output=True,
                            text=True, timeout=60)
    assert broken.returncode != 0   # sh -n does report a syntax error


def test_bench_bare_server_answers_empty_and_streams_over_mutual_tls(pki):
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "bench", "bare_server.py"),
                             str(pki)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        creds = grpc.ssl_channel_credentials(*((pki / n).read_bytes() for n in
                                               ("ca.crt", "client.key", "client.crt")))
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            assert channel.unary_unary("/bench.Bare/Empty")(b"", timeout=30) == b""
            stream = channel.unary_stream("/bench.Bare/Stream")
            assert list(stream(struct.pack("!II", 5, 3), timeout=30)) == [b"xxxxx"] * 3
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.root
def test_bench_fork_floor_times_each_round_and_leaves_no_job_cgroup():
    parent = f"{RUN_PARENT}/floor"
    try:
        for mode in ("joined", "fresh"):
            r = subprocess.run([sys.executable, os.path.join(HERE, "bench", "fork_floor.py"),
                                parent, "3", mode], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            times, (began, ended) = out["times"], out["span"]
            assert len(times) == 3 and all(t > 0 for t in times), times
            assert ended - began >= sum(times), out   # the span holds every round
            assert jw.detect_cgroups(parent).leftover_job_ids() == []
    finally:
        jw.detect_cgroups(parent).remove_parent()


def test_programs_kept_out_of_strings_lint_clean_where_they_run():
    # the bootstrap runs on every CPython the pyz serves, the checks on the guest's 3.11
    compiles = "import sys; compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')"
    for python, name in [*((p, "zipapp_main.py") for p in PYTHONS),
                         *((p, "v2_guest_checks.py") for p in PYTHONS if "/3.11." in p)]:
        r = subprocess.run([python, "-c", compiles, os.path.join(HERE, name)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (python, name, r.stderr)
    files = ["zipapp_main.py", "v2_guest_checks.py", "bench/bare_server.py",
             "bench/fork_floor.py", "bench/attackers.py", "bench/run.py", "bench/peers.py"]
    lint = ["-m", "pyflakes"] if importlib.util.find_spec("pyflakes") else ["-m", "py_compile"]
    r = subprocess.run([sys.executable, *lint, *files], cwd=HERE, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["node", "--check", "test_grpc_js_client.js"], cwd=HERE,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# -- the queue: a full host holds work until a slot frees --------------------------------------

def job_cgroups(m):
    """How many job cgroups the manager `m` has now: the most in any one hierarchy (a union of
    the hierarchies, each listed at a moment of its own, counts a job that ends and one that
    starts meanwhile as two)."""
    if isinstance(m.cgroups, FakeCgroupDriver):
        return len(m.cgroups.leftover_job_ids())
    return max([sum(1 for n in os.listdir(d) if jw._JOB_ID_RE.fullmatch(n))
                for d in m.cgroups.parent_dirs() if os.path.isdir(d)] or [0])


@contextlib.contextmanager
def most_at_once(count, interval=0.002):
    """While the block runs, count() as often as it can be looked at (every `interval`
    seconds); yields [the most it said]."""
    most, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            most[0] = max(most[0], count())
            time.sleep(interval)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield most
    finally:
        done.set()
        sampler.join()


def queue_manager(fake_manager, **kw):
    """A manager of 4 running jobs at most, 2 kept for admins: the others share 2, and 2 per
    owner."""
    return fake_manager(max_jobs=4, max_jobs_per_owner=2, **kw)


def hold(m, owner="alice", n=2):
    """n jobs that run until they are stopped."""
    return [m.start("sleep", ["600"], owner=owner) for _ in range(n)]


def test_a_full_host_queues_in_order_round_robin_between_owners_within_the_caps(fake_manager):
    m = queue_manager(fake_manager)
    with most_at_once(lambda: job_cgroups(m)) as most:
        alice = [m.start("sleep", ["600"], owner="alice", queue=True) for _ in range(10)]
        bob = m.start("sleep", ["600"], owner="bob", queue=True)
        assert [s.state for s in alice] == [jw.RUNNING] * 2 + [jw.QUEUED] * 8
        assert bob.state == jw.QUEUED and bob.queue_position == 2   # after alice's next one
        assert [m.status(s.id).queue_position for s in alice[2:5]] == [1, 3, 4]
        assert m.queued_by_owner() == {"alice": 8, "bob": 1}
        started = []   # the queued jobs, in the order they began
        for _ in range(9):   # one slot frees at a time: the oldest running job is stopped
            running = [s for s in m.list() if s.state == jw.RUNNING]
            assert len(running) == 2
            m.stop(running[0].id, grace=0)
            # (a job whose turn came is DEQUEUED before it is STARTING: the queue is empty
            # then, but it has not begun)
            settled = lambda: not any(j.phase in (jw.Phase.DEQUEUED, jw.Phase.STARTING)
                                      for j in m.table.live())
            now = wait_for(lambda: [s.id for s in m.list() if s.state == jw.RUNNING]
                           if settled() and (sum(s.state == jw.RUNNING for s in m.list()) == 2
                                             or m.queue.total == 0) else None,
                           what="the next job to start")
            started += [i for i in now if i not in started and i not in
                        {alice[0].id, alice[1].id}]
    assert bob.id in started[:2]   # at the second freed slot at the latest
    assert [i for i in started if i != bob.id] == [s.id for s in alice[2:]]   # in their order
    assert most[0] <= 2, most   # never above the share the caps leave to non-admins
    assert m.queue.total == 0 and m.queued_by_owner() == {}


def test_a_queued_job_stops_or_is_removed_without_ever_having_run(fake_manager):
    m = queue_manager(fake_manager)
    held = hold(m)
    q, gone = (m.start("true", owner="alice", queue=True) for _ in range(2))
    follow = m.follow(q.id)
    output, ended = [], []
    reader = threading.Thread(target=lambda: output.extend(follow))
    waiter = threading.Thread(target=lambda: ended.append(m.table.get(q.id).wait_final(30)))
    reader.start()
    waiter.start()
    final = m.stop(q.id)
    reader.join(30)
    waiter.join(30)
    assert (final.state, final.started_at, final.pid, final.exit_code) == (jw.STOPPED, 0.0,
                                                                           None, None)
    assert not final.queue_timed_out and final.ended_at >= final.queued_at
    assert output == [] and ended == [True] and follow.final_status().state == jw.STOPPED
    assert q.id not in m.cgroups.made   # no cgroup was ever made for it
    with pytest.raises(jw.JobNotRunning):
        m.stop(q.id)
    m.remove(gone.id)   # queued: it is stopped and removed
    with pytest.raises(jw.JobNotFound):
        m.status(gone.id)
    assert not os.path.exists(m.store.job_dir(gone.id))
    for s in held:
        m.stop(s.id, grace=0)
    assert m.queue.total == 0 and gone.id not in m.cgroups.made
    m.close()
    again = fake_manager()   # what never ran is kept as it ended
    assert again.status(q.id) == dataclasses.replace(final, queue_position=0)
    assert list(again.follow(q.id)) == []


def test_wait_and_follow_of_a_queued_job_last_until_it_has_run(fake_manager):
    m = queue_manager(fake_manager)
    held = hold(m)
    q = m.start("sh", ["-c", "echo ran; sleep 600"], owner="alice", queue=True, timeout=0.3)
    follow = m.follow(q.id)
    output = []
    reader = threading.Thread(target=lambda: output.extend(c.data for c in follow))
    reader.start()
    entry = m.table.get(q.id)
    assert not entry.wait_final(0.6)   # queued longer than its timeout: it is not stopped
    assert m.status(q.id).state == jw.QUEUED and output == []
    m.stop(held[0].id, grace=0)
    assert entry.wait_final(30)   # its timeout counts from its start
    reader.join(30)
    s = m.status(q.id)
    assert (s.state, s.timed_out, b"".join(output)) == (jw.STOPPED, True, b"ran\n")
    assert s.queued_at < s.started_at and 0.3 <= s.ended_at - s.started_at < 20


def test_queued_jobs_that_leave_the_line_are_not_kept_in_memory(fake_manager):
    # a heap of queue timeouts held every removed job, its environment too, while others'
    # jobs without timeouts filled the queue
    m = queue_manager(fake_manager)
    hold(m)
    for i in range(300):
        m.start("true", owner=f"u{i % 2}", queue=True)
    secret = {f"K{k}": "s" * 1000 for k in range(20)}
    for _ in range(3):
        for job_id in [m.start("true", owner="evil", queue=True, queue_timeout=3600,
                               env=secret).id for _ in range(100)]:
            m.remove(job_id)
    assert len(m.queue._deadlines) <= 64 + 1 and m.queue.total == 300
    kept = [d[2] for d in m.queue._deadlines if d[2].phase is not jw.Phase.QUEUED]
    assert all(j.pending is None for j in kept)


def test_list_and_query_answer_while_queued_jobs_start(fake_manager):
    # a job on its way out of the queue was `running` with no cgroup yet: a List with live
    # usage failed (INTERNAL) and a snapshot showed running without a start time or a pid
    m = queue_manager(fake_manager)
    failures, odd, stop = [], [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                for s in m.table.walk(live_usage=True):
                    if s.state == jw.RUNNING and (not s.started_at or not s.pid):
                        odd.append(s)
            except Exception as e:
                failures.append(e)
            time.sleep(0.0002)   # (the GIL: the jobs go on meanwhile)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        ids = [m.start("true", owner="bob", queue=True).id for _ in range(100)]
        for job_id in ids:
            assert m.table.get(job_id).wait_final(30)
    finally:
        stop.set()
        poller.join()
    assert failures == [] and odd == []


def test_a_change_of_a_queued_job_wakes_only_its_own_waiters(fake_manager):
    m = queue_manager(fake_manager)
    held = hold(m)
    followed = [m.start("true", owner="alice", queue=True) for _ in range(30)]
    follows = [m.follow(q.id) for q in followed]
    readers = [threading.Thread(target=list, args=(f,)) for f in follows]
    for r in readers:
        r.start()
    wait_for(lambda: all(m.table.get(q.id).shared is None for q in followed),
             what="the followers to wait")
    assert not m.queue.cond._waiters   # each waits on its own job's, not the queue's
    others = [m.start("true", owner="bob", queue=True) for _ in range(20)]
    assert all(m.table.get(q.id).shared is m.queue.cond for q in others)   # (no one waits)
    for q in others:
        m.stop(q.id)
    for f in follows:
        f.cancel()
    for r in readers:
        r.join(30)
    for s in held:
        m.stop(s.id, grace=0)


def test_a_cancel_as_a_queued_job_starts_raises_nothing(fake_manager):
    # wake() read job.cond twice: when the job got its own cond in between, it notified a
    # lock it did not hold (RuntimeError), and Attach then lost its owner's stream slot
    m = queue_manager(fake_manager)
    for _ in range(5):
        held = hold(m)
        q = m.start("sleep", ["600"], owner="bob", queue=True)
        follow = m.follow(q.id)
        raised = []

        def cancel():
            try:
                follow.cancel()
            except Exception as e:
                raised.append(e)
        with m.queue.cond:   # the queue's thread and the cancel both wait for it
            os.kill(held[0].pid, signal.SIGKILL)
            wait_for(lambda: m._running.total < 2, what="the slot to free")
            canceller = threading.Thread(target=cancel)
            canceller.start()
            wait_for(lambda: canceller.is_alive(), what="the cancel")
        canceller.join(30)
        assert raised == []
        for job_id in (held[1].id, q.id):
            with contextlib.suppress(jw.JobNotRunning):
                m.stop(job_id, grace=0)


def test_input_attached_to_a_queued_job_reaches_it_once_it_runs(fake_manager):
    m = queue_manager(fake_manager)
    held = hold(m)
    q = m.start("sort", owner="alice", queue=True, stdin=jw.STDIN_PIPE)
    attached = m.attach(q.id)
    done = threading.Event()

    def feed():   # the input waits for the job, the end of it too
        attached.write(b"b\na\n", done.is_set)
        attached.end_input(done.is_set)
    feeder = threading.Thread(target=feed)
    feeder.start()
    output = []
    reader = threading.Thread(target=lambda: output.extend(c.data for c in attached.follow))
    reader.start()
    assert m.status(q.id).state == jw.QUEUED
    m.stop(held[0].id, grace=0)
    feeder.join(30)
    reader.join(30)
    assert b"".join(output) == b"a\nb\n" and attached.input_bytes == 4
    assert wait_final(m, q.id).exit_code == 0
    attached.close()


def test_a_queue_timeout_gives_up_only_on_a_job_that_got_no_slot(fake_manager):
    m = queue_manager(fake_manager)
    held = hold(m)
    late = m.start("true", owner="alice", queue=True, queue_timeout=0.3)
    soon = m.start("true", owner="alice", queue=True, queue_timeout=60)
    s = wait_final(m, late.id)
    assert (s.state, s.queue_timed_out, s.started_at, s.queue_timeout) == (jw.STOPPED, True,
                                                                           0.0, 0.3)
    assert 0.3 <= s.ended_at - s.queued_at < 20 and late.id not in m.cgroups.made
    m.stop(held[0].id, grace=0)
    s = wait_final(m, soon.id)
    assert (s.state, s.exit_code, s.queue_timed_out) == (jw.EXITED, 0, False)
    with pytest.raises(jw.InvalidArgument, match="queue_timeout_seconds"):
        m.start("true", owner="alice", queue=True, queue_timeout=-1)


def test_a_restart_keeps_the_queue_in_order_and_then_starts_it(fake_manager):
    m = queue_manager(fake_manager)
    hold(m)
    owners = ["alice", "bob", "alice", "bob", "alice", "bob"]
    queued = [m.start("sh", ["-c", "echo $N-$SECRET"], owner=o, env={"N": str(i), "SECRET": "s"},
                      queue=True) for i, o in enumerate(owners)]
    pending = [os.path.join(m.store.job_dir(q.id), jw.PENDING_FILE) for q in queued]
    assert os.stat(pending[0]).st_mode & 0o777 == 0o600   # its variables: secrets
    with open(pending[-1], "w") as f:
        f.write("{broken")
    m.close(grace=0)   # the running ones are stopped; the queue stays on disk, in order
    # one job at a time now (2 at most, 1 kept for admins): the order they start in shows
    m2 = fake_manager(max_jobs=2, max_jobs_per_owner=1)
    finals = [wait_final(m2, q.id) for q in queued]
    assert [(f.state, f.exit_code) for f in finals[:-1]] == [(jw.EXITED, 0)] * 5
    starts = [f.started_at for f in finals[:-1]]
    assert starts == sorted(starts)   # alice, bob, alice, ...: as they were queued
    for q in queued[:-1]:
        assert b"".join(c.data for c in m2.follow(q.id)).endswith(b"-s\n")
    broken = finals[-1]
    assert broken.state == jw.FAILED and "cannot be read" in broken.failure
    assert not any(os.path.exists(p) for p in pending)   # no secret stays on disk


def test_a_restart_keeps_whose_turn_it_is(fake_manager):
    m = queue_manager(fake_manager)
    held = hold(m, owner="hog")
    a = [m.start("sleep", ["600"], owner="alice", queue=True) for _ in range(3)]
    b = [m.start("sleep", ["600"], owner="bob", queue=True) for _ in range(2)]
    m.stop(held[0].id, grace=0)
    m.table.get(a[0].id).wait_started()   # alice was served: bob's turn is next
    names = {j.id: f"a{i}" for i, j in enumerate(a)} | {j.id: f"b{i}" for i, j in enumerate(b)}
    line = lambda m: sorted((m.status(i).queue_position, n) for i, n in names.items()
                            if m.status(i).state == jw.QUEUED)
    before = line(m)
    assert before == [(1, "b0"), (2, "a1"), (3, "b1"), (4, "a2")]
    m.close(keep_jobs=True)
    m2 = queue_manager(fake_manager)
    assert line(m2) == before
    m2.stop(held[1].id, grace=0)
    m2.table.get(b[0].id).wait_started()
    assert m2.status(a[1].id).state == jw.QUEUED
    for job_id in names:
        with contextlib.suppress(jw.JobNotRunning):
            m2.stop(job_id, grace=0)


def test_a_start_that_hangs_holds_up_neither_the_queue_nor_its_timeouts(fake_manager, tmp_path):
    # (a workdir on a mount that hangs: the queue's one thread stat()ed it and stood still)
    m = queue_manager(fake_manager)
    held = hold(m, owner="hog")
    stuck_dir, gate = tmp_path / "stuck", threading.Event()
    stuck_dir.mkdir()
    check = m.spawner.check_again

    def hanging(status, env):
        if status.workdir == str(stuck_dir):
            gate.wait(60)
        check(status, env)
    m.spawner.check_again = hanging
    stuck = m.start("true", owner="alice", queue=True, workdir=str(stuck_dir))
    later = m.start("true", owner="bob", queue=True)
    given_up = m.start("true", owner="carol", queue=True, queue_timeout=0.3)
    m.stop(held[0].id, grace=0)   # the stuck one's turn
    wait_for(lambda: m.table.get(stuck.id).phase is jw.Phase.STARTING, what="its start")
    s = wait_final(m, given_up.id)
    assert (s.state, s.queue_timed_out) == (jw.STOPPED, True)
    m.stop(held[1].id, grace=0)   # bob's turn: it runs while alice's start hangs
    assert wait_final(m, later.id).exit_code == 0
    gate.set()
    assert wait_final(m, stuck.id).exit_code == 0


def hanging_starts(m, workdir):
    """Starts of jobs in `workdir` hang (as on a hung mount) until the returned Event is set."""
    gate, check = threading.Event(), m.spawner.check_again

    def hanging(status, env):
        if status.workdir == str(workdir):
            gate.wait(60)
        check(status, env)
    m.spawner.check_again = hanging
    return gate


def test_an_owner_s_starts_that_hang_hold_up_that_owner_only(fake_manager, tmp_path):
    """Four starts that hang (one owner's workdir on a hung mount) took every thread that
    starts queued jobs: no other owner's job started again, nor left by a Stop."""
    n = jw.QUEUE_STARTERS + 2   # more than there are threads to start them
    m = fake_manager(max_jobs=2 * n, max_jobs_per_owner=2 * n)
    held = hold(m, owner="hog", n=2 * n - jw.admin_reserve(2 * n))
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    gate = hanging_starts(m, stuck)
    mallory = [m.start("true", owner="mallory", queue=True, workdir=str(stuck))
               for _ in range(n)]
    for s in held[:jw.QUEUE_STARTERS]:   # a slot for each thread that starts queued jobs
        m.stop(s.id, grace=0)
    wait_for(lambda: [m.table.get(s.id).phase for s in mallory].count(jw.Phase.STARTING) >=
             jw.QUEUE_STARTS_PER_OWNER, what="mallory's starts under way")
    bob = m.start("true", owner="bob", queue=True)   # (queued: mallory's wait before it)
    m.stop(held[jw.QUEUE_STARTERS].id, grace=0)   # a slot for bob's, whatever mallory holds
    assert wait_final(m, bob.id).exit_code == 0   # not held up by mallory's
    for s in held[jw.QUEUE_STARTERS + 1:]:
        m.stop(s.id, grace=0)
    waiting = [s for s in mallory if m.table.get(s.id).phase is jw.Phase.QUEUED]
    assert len(waiting) == n - jw.QUEUE_STARTS_PER_OWNER
    assert m.stop(waiting[0].id).state == jw.STOPPED   # still in line: ended unrun at once
    gate.set()
    assert [wait_final(m, s.id).exit_code for s in mallory if s is not waiting[0]] == \
        [0] * (n - 1)


def test_a_stop_after_a_queued_job_s_turn_came_and_before_its_start_began_ends_it_unrun(
        fake_manager, tmp_path, monkeypatch):
    monkeypatch.setattr(jw, "QUEUE_STARTERS", 1)   # one start at a time: the others wait
    m = queue_manager(fake_manager)
    held = hold(m, owner="hog")
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    gate = hanging_starts(m, stuck)
    alice = m.start("true", owner="alice", queue=True, workdir=str(stuck))
    bob = m.start("true", owner="bob", queue=True)
    for s in held:
        m.stop(s.id, grace=0)
    wait_for(lambda: m.table.get(bob.id).phase is jw.Phase.DEQUEUED, what="bob's turn")
    final = m.stop(bob.id)   # its start has not begun: no thread is free for it
    assert (final.state, final.started_at, final.pid) == (jw.STOPPED, 0.0, None)
    gate.set()
    assert wait_final(m, alice.id).exit_code == 0
    assert m.status(bob.id) == dataclasses.replace(final, queue_position=0)
    assert bob.id not in m.cgroups.made   # it never ran, when its start's thread came free


def test_a_job_s_cond_is_the_one_in_use_once_held_though_swapped_meanwhile():
    """A queued job's shared cond swapped for its own (a waiter came) between the read and the
    acquire: `with job.cond` would hold the old one, and change_phase raise RuntimeError."""
    class Watched:   # the shared cond's lock, saying when the ending thread goes for it
        def __init__(self):
            self.lock, self.tried = threading.RLock(), threading.Event()

        def __enter__(self):
            if threading.current_thread() is not main:
                self.tried.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

        def acquire(self, *args):
            return self.lock.acquire(*args)

        def release(self):
            self.lock.release()
    main, watched = threading.current_thread(), Watched()
    shared = threading.Condition(watched)
    status = jw.JobStatus(id="j", owner="o", command=["true"], limits=None, state=jw.QUEUED)
    job = jw.Job(status, None, jw.Phase.QUEUED, shared)
    done = []

    def end():
        with job.locked():
            job.change_phase(jw.Phase.ENDED)
            done.append(job.cond)
    with shared:   # the ending thread has read job.cond (shared) and goes for it ...
        t = threading.Thread(target=end)
        t.start()
        assert watched.tried.wait(10)
        job.cond, job.shared = threading.Condition(), None   # ... as a waiter's own_cond()
    t.join(10)
    assert done == [job.cond] and job.phase is jw.Phase.ENDED


def test_the_queue_bounds_refuse_saying_which_and_leave_nothing(fake_manager):
    m = queue_manager(fake_manager, max_queued=3, max_queued_per_owner=2)
    hold(m)
    with pytest.raises(jw.CapReached, match=r"running jobs cap reached \(2; 2 more"):
        m.start("true", owner="alice")   # without queue: refused, as it always was
    m.start("true", owner="alice", queue=True)
    m.start("true", owner="alice", queue=True)
    with pytest.raises(jw.CapReached, match=r"queued jobs of one owner cap reached \(2\)"):
        m.start("true", owner="alice", queue=True)
    m.start("true", owner="bob", queue=True)
    with pytest.raises(jw.CapReached, match=r"^queued jobs cap reached \(3\)"):
        m.start("true", owner="carol", queue=True)
    assert len(os.listdir(m.store.jobs_dir)) == 5 and m.queue.total == 3


def test_the_queue_never_uses_what_is_kept_for_admins(fake_manager):
    m = queue_manager(fake_manager)
    hold(m)
    first = m.start("true", owner="alice", queue=True)
    mine = m.start("sleep", ["600"], owner="admin", admin=True, queue=True)
    assert (first.state, mine.state) == (jw.QUEUED, jw.QUEUED)   # others wait before it
    direct = m.start("sleep", ["600"], owner="admin", admin=True)   # an admin's own Start
    assert direct.state == jw.RUNNING
    assert m.table.get(mine.id).wait_final(0.3) is False
    assert m.status(mine.id).state == jw.QUEUED   # the reserve has room: the queue waits


def test_queue_metrics_count_by_owner_and_time_queued(fake_manager):
    from prometheus_client import generate_latest
    metrics = jw.Metrics(0)
    m = queue_manager(fake_manager, observer=metrics)
    metrics.watch(m, jw.Quota("streams", 10, 10))
    held = hold(m)
    q = [m.start("true", owner=o, queue=True) for o in ("alice", "alice", "bob")]
    got = _samples(generate_latest(metrics.registry))
    assert got[("jobworker_jobs_queued", (("owner", "alice"),))] == 2
    assert got[("jobworker_jobs_queued", (("owner", "bob"),))] == 1
    for s in held:
        m.stop(s.id, grace=0)
    for s in q:
        wait_final(m, s.id)
    got = _samples(generate_latest(metrics.registry))
    assert got[("jobworker_job_queued_seconds_count", ())] == 3
    assert ("jobworker_jobs_queued", (("owner", "alice"),)) not in got


def queue_start(peer, *argv, **fields):
    return peer.stub.Start(pb.StartRequest(name=argv[0], args=argv[1:], queue=True, **fields),
                           timeout=30)


@root
def test_queued_jobs_over_grpc_wait_in_turn_with_the_cgroups_held_to_the_caps(pki, tmp_path):
    with running_server(pki, tmp_path, max_jobs=4, max_jobs_per_owner=2) as (m, port):
        alice, bob = Peer(pki, port, "alice"), Peer(pki, port, "bob")
        with most_at_once(lambda: job_cgroups(m)) as most:
            held = [alice.start("sleep", "600") for _ in range(2)]
            with pytest.raises(grpc.RpcError) as e:   # an old client: no queue field
                alice.start("true")
            assert e.value.code() == SC.RESOURCE_EXHAUSTED
            assert "running jobs cap reached" in e.value.details()
            mine = queue_start(alice, "sh", "-c", "echo alice")
            theirs = queue_start(bob, "sh", "-c", "echo bob")
            assert (mine.status.state, mine.status.queue_position) == (pb.JOB_STATE_QUEUED, 1)
            assert theirs.status.queue_position == 2 and not theirs.status.HasField("started_at")
            q = bob.stub.Query(pb.QueryRequest(job_id=theirs.job_id), timeout=30).status
            assert (q.state, q.queue_position, q.pid) == (pb.JOB_STATE_QUEUED, 2, 0)
            assert q.queued_at.seconds > 0
            listed = alice.list(states=[pb.JOB_STATE_QUEUED])
            assert [j.job_id for j in listed] == [mine.job_id]   # a writer sees its own
            gone = queue_start(bob, "true", queue_timeout_seconds=600)
            stopped = bob.stub.Stop(pb.StopRequest(job_id=gone.job_id), timeout=30).status
            assert (stopped.state, stopped.queue_timeout_seconds) == (pb.JOB_STATE_STOPPED, 600)
            outputs = {}
            readers = [threading.Thread(target=lambda p, j: outputs.update({j: p.stream(j)}),
                                        args=(p, j)) for p, j in ((alice, mine.job_id),
                                                                  (bob, theirs.job_id))]
            for r in readers:
                r.start()
            for job_id in held:
                alice.stub.Stop(pb.StopRequest(job_id=job_id, grace_seconds=0), timeout=30)
            for r in readers:
                r.join(60)
        assert outputs[mine.job_id][0] == b"alice\n" and outputs[theirs.job_id][0] == b"bob\n"
        assert outputs[theirs.job_id][2].state == pb.JOB_STATE_EXITED
        assert 1 <= most[0] <= 2, most
        info = alice.stub.Info(pb.InfoRequest(), timeout=30)
        assert (info.max_queued, info.max_queued_per_owner) == (jw.DEFAULT_MAX_QUEUED,
                                                                jw.DEFAULT_MAX_QUEUED_PER_OWNER)
        assert gone.job_id not in m.cgroups.leftover_job_ids()
        alice.close()
        bob.close()


@root
def test_cli_queue_run_waits_for_a_slot_times_out_124_and_survives_a_restart(pki, tmp_path):
    flags = ["--max-jobs", "4", "--max-jobs-per-owner", "2", "--grace", "1"]
    parent = f"{RUN_PARENT}/queue-cli"
    servers = [ServeProcess(SRC, pki, tmp_path / "state", parent, extra=[*flags, "--keep-jobs"])]
    run = lambda *a, **kw: cli(SRC, *a, certs=pki, port=servers[-1].port, **kw)
    try:
        held = [run("start", "sleep", "600").stdout.decode().strip() for _ in range(2)]
        r = run("start", "true")
        assert r.returncode == 7 and b"(--queue waits for a slot instead)" in r.stderr, r
        r = run("run", "--queue-timeout", "0.5s", "--", "true")
        assert r.returncode == 124, r
        assert b"waited in the queue past its queue timeout of 0.5s: it never ran" in r.stderr
        waiting = subprocess.Popen([*SRC, "run", "--queue", "--", "sh", "-c", "echo hi"],
                                   env=cli_env(pki, servers[-1].port), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        job = wait_for(lambda: run("list", "--state", "queued", "-q").stdout.decode().split(),
                       what="the job to be queued")[0]
        assert "State: queued (position 1)" in run("query", job).stdout.decode()
        assert run("stop", held.pop(0)).returncode == 0
        out, err = waiting.communicate(timeout=60)
        assert (waiting.returncode, out) == (0, b"hi\n"), err
        assert f"job {job} is queued (position 1)".encode() in err
        held.append(run("start", "sleep", "600").stdout.decode().strip())   # full again
        later = run("start", "--queue", "--", "sh", "-c", "echo after").stdout.decode().strip()
        assert json.loads(run("query", later, "--json").stdout)["state"] == "queued"
        assert servers[-1].stop() == 0   # the running jobs live on; the queue stays on disk
        servers.append(ServeProcess(SRC, pki, tmp_path / "state", parent, extra=flags))
        assert json.loads(run("query", later, "--json").stdout)["state"] == "queued"
        assert run("stop", *held).returncode == 0
        r = run("wait", later)
        assert r.returncode == 0, r
        assert run("stream", later).stdout == b"after\n"
        table = run("list").stdout.decode()
        assert "queue-timed-out" in table, table
    finally:
        for server in servers:
            server.stop()
        jw.detect_cgroups(parent).remove_parent()


@root
@slow
def test_a_flood_of_5000_queued_jobs_from_3_owners_all_run_once_within_the_caps(pki, tmp_path):
    started = collections.Counter()

    class Count(jw._NoObserver):
        def job_started(self, status):
            started[status.id] += 1
    with running_server(pki, tmp_path, max_jobs=16, max_jobs_per_owner=4, observer=Count(),
                        max_queued_per_owner=2000) as (m, port):
        peers = [Peer(pki, port, name) for name in ("alice", "bob", "client")]
        ids = {}
        with most_at_once(lambda: job_cgroups(m), 0.005) as most:
            def submit(peer, n):
                ids[peer] = [queue_start(peer, "true").job_id for _ in range(n)]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                list(pool.map(submit, peers, (1667, 1667, 1666)))
            everything = [j for p in peers for j in ids[p]]
            deadline = time.monotonic() + 600
            for job_id in everything:   # each one's end, as it comes
                assert m.table.get(job_id).wait_final(max(0, deadline - time.monotonic()))
        finals = [m.status(j) for j in everything]
        assert len(set(everything)) == 5000
        assert {(s.state, s.exit_code) for s in finals} == {(jw.EXITED, 0)}
        assert set(started) == set(everything) and set(started.values()) == {1}
        assert most[0] <= 8, most   # 16, of which 8 are kept for admins
        for p in peers:
            p.close()
