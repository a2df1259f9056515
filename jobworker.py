#!/usr/bin/env python3
"""jobworker: run and watch arbitrary commands on a Linux host, each job in its own cgroup.

Library (no gRPC inside):
    JobManager(state_dir, cgroups=None, ...)   start, stop, status, list, follow, close
    Limits, parse_cpu_quota, parse_memory, parse_disk_io, parse_pids
    detect_cgroups(parent)                      -> CgroupDriver (v1/hybrid or v2, decided once)
Server:
    serve_grpc(manager, listen, ca, cert, key)  context manager yielding the bound port
Command line (``jobworker.py SUBCOMMAND --help``):
    serve, start, stop, query, stream, list, certs

Only the standard library is imported at module level. grpc, protobuf and cryptography are
imported inside the sections that need them: the CLI starts fast, and the job launcher process
is started before any gRPC thread exists.
"""

import array
import bisect
import concurrent.futures
import dataclasses
import errno
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

__version__ = "0.1.0"

log = logging.getLogger("jobworker")

DEFAULT_STATE_DIR = "/var/lib/jobworker"
DEFAULT_CGROUP_PARENT = "jobworker"   # relative to the server's own cgroup in each hierarchy
DEFAULT_GRACE_SECONDS = 10.0          # SIGTERM -> SIGKILL on Stop
DEFAULT_PIDS_LIMIT = 1024             # every job gets a pids limit: a fork bomb stops here
DEFAULT_LOG_CAP = 2 << 30             # bytes of output kept per job (stdout + stderr)
DEFAULT_MAX_JOBS = 1000               # concurrently running jobs
MAX_ARGS = 4096                       # argv entries per job
MAX_ARGV_BYTES = 256 << 10            # total argv size per job
CPU_PERIOD_US = 100_000               # cfs period (systemd uses 100 ms too)
MIN_CPU_QUOTA_US = 1_000              # the kernel refuses quotas below 1 ms
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIN_IO_BPS = 4096                     # below one page per second any I/O stalls
MAX_PIDS = 4_194_304                  # the kernel's pid_max ceiling

# The environment a job starts with: none of the server's own variables leak into it.
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_LANG = "C.UTF-8"
JOB_CWD = "/"

CGROUP_ROOT = "/sys/fs/cgroup"
STDOUT, STDERR = 1, 2
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}

# Job states. A job is created running; every other state is final.
RUNNING = "running"
EXITED = "exited"       # the main process ended by itself (exit code or signal)
STOPPED = "stopped"     # ended by a Stop request
LOST = "lost"           # the server died while the job ran; found again at restart
FINAL_STATES = frozenset({EXITED, STOPPED, LOST})
STATES = frozenset({RUNNING}) | FINAL_STATES

_JOB_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# ================================================================================================
# Errors
# ================================================================================================

class JobworkerError(Exception):
    """Base of every error the library raises on purpose; the RPC layer maps subclasses to codes."""


class InvalidArgument(JobworkerError):
    """A request field is malformed or out of range."""

    def __init__(self, field, value, accepted):
        self.field, self.value, self.accepted = field, value, accepted
        shown = value if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        super().__init__(f"invalid {field} {shown!r}: {accepted}")


class JobNotFound(JobworkerError):
    """No such job, or not one the caller may see (existence is not revealed)."""

    def __init__(self, job_id):
        self.job_id = job_id
        super().__init__(f"no such job: {job_id}")


class JobNotRunning(JobworkerError):
    """The job is already in a final state."""

    def __init__(self, job_id, state):
        self.job_id, self.state = job_id, state
        super().__init__(f"job {job_id} is not running (state {state})")


class CapReached(JobworkerError):
    """A configured cap (jobs, streams, argv size) is reached."""

    def __init__(self, cap, limit):
        self.cap, self.limit = cap, limit
        super().__init__(f"{cap} cap reached ({limit})")


class SpawnError(JobworkerError):
    """The program could not be started; nothing of the job is left behind."""

    _REASONS = {errno.ENOENT: "no such file", errno.EACCES: "permission denied",
                errno.ENOEXEC: "exec format error", errno.ENOTDIR: "not a directory in path",
                errno.EISDIR: "is a directory", errno.E2BIG: "argument list too long"}

    def __init__(self, program, err, stage, detail=""):
        self.program, self.errno, self.stage = program, err, stage
        reason = self._REASONS.get(err) if stage == "exec" else None
        if reason is None:
            reason = f"{stage} failed: {detail or os.strerror(err)}"
        super().__init__(f"{reason}: {program}")


class CgroupError(JobworkerError):
    """A cgroupfs operation failed; carries the path and the value written."""

    def __init__(self, path, value, err):
        self.path, self.value, self.errno = path, value, err
        what = f"writing {value!r} to {path}" if value is not None else f"{path}"
        super().__init__(f"cgroup: {what}: {os.strerror(err) if err else 'failed'}")


class LauncherError(JobworkerError):
    """The job launcher process is gone; no job can be started."""


# ================================================================================================
# Limits
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one job; None means "not limited" (pids gets the manager's default)."""
    cpu_percent: float = None    # 50.0 = half of one CPU, 150.0 = one and a half
    memory_bytes: int = None
    io_bps: int = None           # read and write bandwidth, each, per whole disk
    pids: int = None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


_NUMBER = r"(\d+(?:\.\d+)?)"
_CPU_RE = re.compile(_NUMBER + r"\s*%")
_MEMORY_RE = re.compile(_NUMBER + r"\s*([KMGT]?)(I?B)?", re.IGNORECASE)
_RATE_RE = re.compile(_NUMBER + r"\s*([KMGT]?)(I?B)?(?:/S)?", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_cpu_quota(text, field="cpu_quota"):
    """'50%' -> 50.0 (systemd CPUQuota=: percent of one CPU, at most nCPU x 100%); '' -> None."""
    if text is None or text == "":
        return None
    ncpu = os.cpu_count() or 1
    accepted = f"a percentage of one CPU such as 50% or 150%, from 1% to {ncpu * 100}% on this host"
    m = _CPU_RE.fullmatch(str(text).strip())
    if not m:
        raise InvalidArgument(field, text, accepted)
    percent = float(m.group(1))
    if percent * CPU_PERIOD_US / 100 < MIN_CPU_QUOTA_US or percent > ncpu * 100:
        raise InvalidArgument(field, text, accepted)
    return percent


def parse_memory(text, field="memory_limit"):
    """'256M' -> 268435456 (K, M, G, T are powers of 1024, as systemd's MemoryMax=); '' -> None."""
    if text is None or text == "":
        return None
    accepted = f"bytes, or a number with K, M, G or T (base 1024), such as 256M; at least {PAGE_SIZE}"
    m = _MEMORY_RE.fullmatch(str(text).strip())
    if not m:
        raise InvalidArgument(field, text, accepted)
    value = int(float(m.group(1)) * 1024 ** _POWERS[m.group(2).upper()])
    if value < PAGE_SIZE or value >= 1 << 62:
        raise InvalidArgument(field, text, accepted)
    return value


def parse_disk_io(text, field="disk_io"):
    """'10MB/s' -> 10000000 bytes/s (K, M, G, T base 1000 as systemd's IO*BandwidthMax=;
    KiB, MiB, GiB, TiB base 1024); '' -> None."""
    if text is None or text == "":
        return None
    accepted = ("bytes per second, such as 10MB/s (K, M, G, T: base 1000; KiB, MiB, GiB, TiB: "
                f"base 1024); at least {MIN_IO_BPS}")
    m = _RATE_RE.fullmatch(str(text).strip())
    if not m or (m.group(3) and m.group(3).upper() == "IB" and not m.group(2)):
        raise InvalidArgument(field, text, accepted)
    base = 1024 if m.group(3) and m.group(3).upper() == "IB" else 1000
    value = int(float(m.group(1)) * base ** _POWERS[m.group(2).upper()])
    if value < MIN_IO_BPS or value >= 1 << 62:
        raise InvalidArgument(field, text, accepted)
    return value


def parse_pids(text, field="pids"):
    """'100' -> 100 (most processes and threads the job may have at once); '' / 0 -> None."""
    if text is None or text == "" or text == 0:
        return None
    accepted = f"a whole number of processes from 1 to {MAX_PIDS}"
    s = str(text).strip()
    if not s.isdigit() or not 1 <= int(s) <= MAX_PIDS:
        raise InvalidArgument(field, text, accepted)
    return int(s)


def parse_limits(cpu="", memory="", disk_io="", pids=""):
    """Limits from their text forms; every field is checked before anything is created."""
    return Limits(parse_cpu_quota(cpu), parse_memory(memory), parse_disk_io(disk_io),
                  parse_pids(pids))


def validate_job_id(job_id):
    """Return job_id if it is a canonical uuid4 string; raise InvalidArgument before any path use."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidArgument("job_id", job_id, "a job id as printed by start (a uuid4)")
    return job_id


def validate_command(command, args):
    """Return argv; refuse an empty, NUL-bearing or oversized command line."""
    argv = [command, *args]
    if not command:
        raise InvalidArgument("name", command, "the program to run, such as bash or /usr/bin/env")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str) or "\0" in arg:
            raise InvalidArgument("name" if i == 0 else f"args[{i - 1}]", arg,
                                  "text without NUL bytes")
    if len(argv) > MAX_ARGS:
        raise CapReached("argument count", MAX_ARGS)
    if sum(len(a.encode("utf-8", "surrogateescape")) + 1 for a in argv) > MAX_ARGV_BYTES:
        raise CapReached("argument size", f"{MAX_ARGV_BYTES} bytes")
    return argv


# ================================================================================================
# Cgroups
# ================================================================================================

# A cgroup removed under us reads as ENOENT (its directory) or ENODEV (an open file of it).
_GONE = (errno.ENOENT, errno.ENODEV)


def _write(path, value):
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(path, value, e.errno) from None


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise CgroupError(path, None, e.errno) from None


def _read_keyed(path):
    """'key value' lines -> {key: int}; {} if the file does not exist."""
    try:
        text = _read(path)
    except CgroupError as e:
        if e.errno == errno.ENOENT:
            return {}
        raise
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_int(path, default=0):
    try:
        text = _read(path).strip()
    except CgroupError as e:
        if e.errno == errno.ENOENT:
            return default
        raise
    return int(text) if text.lstrip("-").isdigit() else default


def block_devices(sys_block="/sys/block"):
    """'major:minor' of every whole disk an I/O limit applies to (loop, ram and zram skipped,
    as are devices of size 0, such as an empty CD drive)."""
    devices = []
    for name in sorted(os.listdir(sys_block)):
        if name.startswith(("loop", "ram", "zram")):
            continue
        try:
            with open(f"{sys_block}/{name}/size") as f:
                if int(f.read().strip() or 0) == 0:
                    continue
            with open(f"{sys_block}/{name}/dev") as f:
                devices.append(f.read().strip())
        except OSError:
            continue
    return devices


def _descendants_bottom_up(path):
    """path and every sub-cgroup below it, deepest first."""
    dirs = [root for root, _, _ in os.walk(path, topdown=False)]
    return dirs if dirs else [path]


def _procs(dir_):
    """Pids in dir_ and all its sub-cgroups."""
    pids = set()
    for d in _descendants_bottom_up(dir_):
        try:
            with open(f"{d}/cgroup.procs") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return pids


def _signal_pids(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_via_file(path):
    """Write cgroup.kill: SIGKILL to the whole subtree at once, forks in flight included.
    A cgroup already gone counts as done."""
    try:
        _write(path, "1")
    except CgroupError as e:
        if e.errno not in _GONE:
            raise


def _rmdir_tree(path, attempts=100):
    """Remove a cgroup dir and its sub-cgroups. ENOENT means done; EBUSY (a task still
    exiting) is retried for about a second before giving up."""
    for d in _descendants_bottom_up(path):
        for attempt in range(attempts):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == attempts - 1:
                    raise CgroupError(d, None, e.errno) from None
                time.sleep(0.01)


def _wait_populated_zero(events_path, timeout):
    """Wait until cgroup.events says 'populated 0'; the kernel signals changes with POLLPRI.
    Returns True when empty, False on timeout."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(events_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _GONE:
            return True
        raise
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while True:
            try:
                data = os.pread(fd, 4096, 0).decode()
            except OSError as e:   # removed while we waited: empty by definition
                if e.errno in _GONE:
                    return True
                raise
            if "populated 0" in data:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(min(remaining, 1.0) * 1000)
    finally:
        os.close(fd)


class Cgroup:
    """One job's cgroup, whatever the cgroup version. Made by CgroupDriver.job()."""

    procs_files = ()   # the child writes its pid into each of these before exec

    def create(self): raise NotImplementedError
    def set_limits(self, limits, devices): raise NotImplementedError
    def pids(self): raise NotImplementedError
    def kill_all(self): raise NotImplementedError
    def wait_empty(self, timeout): raise NotImplementedError
    def oom_kills(self): raise NotImplementedError
    def usage(self): raise NotImplementedError
    def remove(self): raise NotImplementedError

    def signal_all(self, sig):
        """Send sig to every process of the job, sub-cgroups included."""
        _signal_pids(self.pids(), sig)

    def _kill_until_empty(self, freeze, thaw, timeout=10.0):
        """SIGKILL everything until no process is left. Freezing first stops a fork loop
        from outrunning the kill."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            try:
                frozen = freeze()
                _signal_pids(pids, signal.SIGKILL)
                if frozen:
                    thaw()
            except CgroupError as e:
                if e.errno in _GONE:
                    return
                raise
            if time.monotonic() > deadline:
                raise CgroupError(self.path, None, errno.EBUSY)
            time.sleep(0.002)


class CgroupV1(Cgroup):
    """A job cgroup on v1 (or hybrid): one directory per controller hierarchy; if a cgroup2
    mount exists beside them, the job joins it too, for cgroup.kill and cgroup.events."""

    def __init__(self, dirs, unified=None):
        self.dirs = dirs                       # controller -> directory
        self.unified = unified                 # directory in the cgroup2 mount, or None
        self.path = next(iter(dirs.values()))
        self._unique = list(dict.fromkeys(list(dirs.values()) + ([unified] if unified else [])))
        self.procs_files = tuple(f"{d}/cgroup.procs" for d in self._unique)
        self._track = unified or dirs.get("freezer") or dirs.get("pids") or self.path

    def create(self):
        made = []
        try:
            for d in self._unique:
                os.mkdir(d, 0o755)
                made.append(d)
        except OSError as e:
            for d in reversed(made):
                _rmdir_tree(d)
            raise CgroupError(d, None, e.errno) from None

    def _controller(self, name, limit):
        if name not in self.dirs:
            raise CgroupError(f"{CGROUP_ROOT}/{name}", None, errno.ENODEV) from None
        return self.dirs[name]

    def set_limits(self, limits, devices):
        if limits.cpu_percent is not None:
            d = self._controller("cpu", "cpu_quota")
            _write(f"{d}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(f"{d}/cpu.cfs_quota_us", str(round(limits.cpu_percent * CPU_PERIOD_US / 100)))
        if limits.memory_bytes is not None:
            d = self._controller("memory", "memory_limit")
            _write(f"{d}/memory.limit_in_bytes", str(limits.memory_bytes))
            if os.path.exists(f"{d}/memory.memsw.limit_in_bytes"):
                # memory+swap equal to memory: the job cannot escape its limit into swap
                _write(f"{d}/memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        if limits.io_bps is not None:
            d = self._controller("blkio", "disk_io")
            for dev in devices:
                _write(f"{d}/blkio.throttle.read_bps_device", f"{dev} {limits.io_bps}")
                _write(f"{d}/blkio.throttle.write_bps_device", f"{dev} {limits.io_bps}")
        if limits.pids is not None:
            d = self._controller("pids", "pids")
            _write(f"{d}/pids.max", str(limits.pids))

    def pids(self):
        return _procs(self._track)

    def kill_all(self):
        if self.unified and os.path.exists(f"{self.unified}/cgroup.kill"):
            _kill_via_file(f"{self.unified}/cgroup.kill")
            if self.wait_empty(10.0):
                return
        freezer = self.dirs.get("freezer")

        def freeze():
            if not freezer:
                return False
            _write(f"{freezer}/freezer.state", "FROZEN")
            for _ in range(500):   # FREEZING -> FROZEN once every task has stopped
                if _read(f"{freezer}/freezer.state").strip() == "FROZEN":
                    break
                time.sleep(0.001)
            return True

        self._kill_until_empty(freeze, lambda: _write(f"{freezer}/freezer.state", "THAWED"))

    def wait_empty(self, timeout):
        if self.unified:
            return _wait_populated_zero(f"{self.unified}/cgroup.events", timeout)
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def oom_kills(self):
        d = self.dirs.get("memory")
        return _read_keyed(f"{d}/memory.oom_control").get("oom_kill", 0) if d else 0

    def usage(self):
        u = {"cpu_seconds": 0.0, "memory_bytes": 0, "memory_peak_bytes": 0,
             "io_read_bytes": 0, "io_write_bytes": 0, "tasks": 0}
        if "cpuacct" in self.dirs:
            u["cpu_seconds"] = _read_int(f"{self.dirs['cpuacct']}/cpuacct.usage") / 1e9
        if "memory" in self.dirs:
            u["memory_bytes"] = _read_int(f"{self.dirs['memory']}/memory.usage_in_bytes")
            u["memory_peak_bytes"] = _read_int(f"{self.dirs['memory']}/memory.max_usage_in_bytes")
        if "blkio" in self.dirs:
            path = f"{self.dirs['blkio']}/blkio.throttle.io_service_bytes_recursive"
            try:
                for line in _read(path).splitlines():
                    parts = line.split()
                    if len(parts) == 3 and parts[1] in ("Read", "Write"):
                        u["io_read_bytes" if parts[1] == "Read" else "io_write_bytes"] += int(parts[2])
            except CgroupError:
                pass
        if "pids" in self.dirs:
            u["tasks"] = _read_int(f"{self.dirs['pids']}/pids.current")
        return u

    def remove(self):
        for d in self._unique:
            _rmdir_tree(d)


class CgroupV2(Cgroup):
    """A job cgroup on the unified hierarchy: one directory."""

    def __init__(self, path):
        self.path = path
        self.procs_files = (f"{path}/cgroup.procs",)

    def create(self):
        try:
            os.mkdir(self.path, 0o755)
        except OSError as e:
            raise CgroupError(self.path, None, e.errno) from None

    def _file(self, name):
        path = f"{self.path}/{name}"
        if not os.path.exists(path):
            # the controller is not enabled in the parent's cgroup.subtree_control
            raise CgroupError(path, None, errno.ENODEV)
        return path

    def set_limits(self, limits, devices):
        if limits.cpu_percent is not None:
            quota = round(limits.cpu_percent * CPU_PERIOD_US / 100)
            _write(self._file("cpu.max"), f"{quota} {CPU_PERIOD_US}")
        if limits.memory_bytes is not None:
            _write(self._file("memory.max"), str(limits.memory_bytes))
            if os.path.exists(f"{self.path}/memory.swap.max"):
                _write(f"{self.path}/memory.swap.max", "0")
        if limits.io_bps is not None:
            path = self._file("io.max")
            for dev in devices:
                _write(path, f"{dev} rbps={limits.io_bps} wbps={limits.io_bps}")
        if limits.pids is not None:
            _write(self._file("pids.max"), str(limits.pids))

    def pids(self):
        return _procs(self.path)

    def kill_all(self):
        if os.path.exists(f"{self.path}/cgroup.kill"):
            _kill_via_file(f"{self.path}/cgroup.kill")
            if self.wait_empty(10.0):
                return
        freeze_file = f"{self.path}/cgroup.freeze"
        has_freeze = os.path.exists(freeze_file)

        def freeze():
            if has_freeze:
                _write(freeze_file, "1")
            return has_freeze

        self._kill_until_empty(freeze, lambda: _write(freeze_file, "0"))

    def wait_empty(self, timeout):
        return _wait_populated_zero(f"{self.path}/cgroup.events", timeout)

    def oom_kills(self):
        return _read_keyed(f"{self.path}/memory.events").get("oom_kill", 0)

    def usage(self):
        cpu = _read_keyed(f"{self.path}/cpu.stat")
        rbytes = wbytes = 0
        try:
            for line in _read(f"{self.path}/io.stat").splitlines():
                fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                rbytes += int(fields.get("rbytes", 0))
                wbytes += int(fields.get("wbytes", 0))
        except CgroupError:
            pass
        return {"cpu_seconds": cpu.get("usage_usec", 0) / 1e6,
                "memory_bytes": _read_int(f"{self.path}/memory.current"),
                "memory_peak_bytes": _read_int(f"{self.path}/memory.peak"),
                "io_read_bytes": rbytes, "io_write_bytes": wbytes,
                "tasks": _read_int(f"{self.path}/pids.current")}

    def remove(self):
        _rmdir_tree(self.path)


class CgroupDriver:
    """Makes job cgroups under one parent per hierarchy. The only place that knows the version."""

    version = 0

    def setup(self): raise NotImplementedError
    def job(self, job_id): raise NotImplementedError
    def parent_dirs(self): raise NotImplementedError

    def leftover_job_ids(self):
        """Ids of job cgroups found under the parent (jobs of an earlier server run)."""
        ids = set()
        for d in self.parent_dirs():
            try:
                ids.update(n for n in os.listdir(d) if _JOB_ID_RE.fullmatch(n))
            except FileNotFoundError:
                continue
        return sorted(ids)

    def remove_parent(self):
        """Kill whatever is left under the parent and remove it (tests, uninstall)."""
        for job_id in self.leftover_job_ids():
            cg = self.job(job_id)
            cg.kill_all()
            cg.remove()
        for d in self.parent_dirs():
            _rmdir_tree(d)


class CgroupV1Driver(CgroupDriver):
    version = 1
    CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")

    def __init__(self, parents, unified_parent=None):
        self.parents = parents              # controller -> parent directory
        self.unified_parent = unified_parent

    def parent_dirs(self):
        dirs = list(self.parents.values()) + ([self.unified_parent] if self.unified_parent else [])
        return list(dict.fromkeys(dirs))

    def setup(self):
        for d in self.parent_dirs():
            os.makedirs(d, exist_ok=True)
        # memory.use_hierarchy is 1 by default since 5.x; on older kernels the oom counter and
        # limits would not cover sub-cgroups a job makes.

    def job(self, job_id):
        validate_job_id(job_id)
        return CgroupV1({c: f"{p}/{job_id}" for c, p in self.parents.items()},
                        f"{self.unified_parent}/{job_id}" if self.unified_parent else None)


class CgroupV2Driver(CgroupDriver):
    version = 2
    CONTROLLERS = ("cpu", "memory", "io", "pids")

    def __init__(self, own, parent_rel, server_leaf="server"):
        self.own = own                               # the server's own cgroup directory
        self.parent = os.path.join(own, parent_rel)
        self.server_leaf = server_leaf

    def parent_dirs(self):
        return [self.parent]

    def _enable(self, path, wanted):
        available = set(_read(f"{path}/cgroup.controllers").split())
        enabled = set(_read(f"{path}/cgroup.subtree_control").split())
        missing = [c for c in wanted if c in available and c not in enabled]
        if missing:
            _write(f"{path}/cgroup.subtree_control", " ".join("+" + c for c in missing))

    def setup(self):
        wanted = [c for c in self.CONTROLLERS
                  if c in _read(f"{self.own}/cgroup.controllers").split()]
        chain = []   # own cgroup down to the parent: each needs the controllers in its subtree
        d = self.parent
        while d != self.own:
            chain.append(d)
            d = os.path.dirname(d)
        os.makedirs(self.parent, exist_ok=True)
        if wanted:
            self._leave_own_cgroup()
            for d in [self.own] + list(reversed(chain))[:-1] + [self.parent]:
                self._enable(d, wanted)

    def _leave_own_cgroup(self):
        """No internal processes on v2: a cgroup that hands controllers to its children may hold
        no process itself (the root excepted). Move this server into a leaf beside the jobs."""
        if os.path.realpath(self.own) == os.path.realpath(CGROUP_ROOT):
            return
        procs = _read(f"{self.own}/cgroup.procs").split()
        if not procs:
            return
        leaf = f"{self.own}/{self.server_leaf}"
        os.makedirs(leaf, exist_ok=True)
        _write(f"{leaf}/cgroup.procs", str(os.getpid()))

    def job(self, job_id):
        validate_job_id(job_id)
        return CgroupV2(f"{self.parent}/{job_id}")


def _mounts(mountinfo):
    """[(mountpoint, fstype, options set, mount root)] of cgroup mounts."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                mountpoint = fields[4].replace("\\040", " ")
                out.append((mountpoint, tail[0], set(tail[2].split(",")), fields[3]))
    return out


def _own_cgroups(proc_cgroup):
    """{frozenset(controllers) or 'unified': path} from /proc/self/cgroup."""
    out = {}
    with open(proc_cgroup) as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            out["unified" if ctrls == "" else frozenset(ctrls.split(","))] = path
    return out


def _join(mountpoint, mount_root, own_path):
    rel = own_path
    if mount_root != "/" and rel.startswith(mount_root):
        rel = rel[len(mount_root):]
    return os.path.normpath(mountpoint + "/" + rel.lstrip("/"))


def detect_cgroups(parent=DEFAULT_CGROUP_PARENT, mountinfo="/proc/self/mountinfo",
                   proc_cgroup="/proc/self/cgroup"):
    """The one place the cgroup version is decided: pure v2 when no v1 hierarchy has a controller
    we use, else v1 (hybrid: the cgroup2 mount is used for tracking and cgroup.kill).
    `parent` is relative to this process's own cgroup in each hierarchy."""
    if parent.startswith("/") or ".." in parent.split("/"):
        raise InvalidArgument("cgroup parent", parent, "a relative path without '..'")
    mounts = _mounts(mountinfo)
    own = _own_cgroups(proc_cgroup)
    v1 = {}
    unified_parent = None
    for mountpoint, fstype, opts, root in mounts:
        if fstype == "cgroup2":
            if "unified" in own:
                unified_parent = _join(mountpoint, root, own["unified"]) + "/" + parent
            continue
        ctrls = [c for c in CgroupV1Driver.CONTROLLERS if c in opts]
        for key, path in own.items():
            if key != "unified" and ctrls and set(ctrls) <= key:
                for c in ctrls:
                    v1.setdefault(c, _join(mountpoint, root, path) + "/" + parent)
    if v1:
        return CgroupV1Driver(v1, unified_parent)
    for mountpoint, fstype, opts, root in mounts:
        if fstype == "cgroup2" and "unified" in own:
            return CgroupV2Driver(_join(mountpoint, root, own["unified"]), parent)
    raise CgroupError(CGROUP_ROOT, None, errno.ENODEV)


# ================================================================================================
# Launcher: the only place that forks a job
# ================================================================================================
# gRPC's C core is not fork-safe: forking a process that runs gRPC threads can hang in its fork
# handlers or corrupt other clients' TLS streams. So jobs are forked by a small single-threaded
# launcher process, started by exec (not fork) so it carries no thread or lock of the server.
# Messages between server and launcher are length-prefixed JSON over a Unix stream socket; the
# job's stdout and stderr pipe ends travel with SCM_RIGHTS. Exec failures come back from the
# child over a close-on-exec pipe as "stage:errno:message", as CPython's subprocess does it.

_FRAME = struct.Struct("!I")
PR_SET_CHILD_SUBREAPER = 36


def _send_msg(sock, obj, fds=()):
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = _FRAME.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("launcher socket closed")
        buf += chunk
    return bytes(buf)


def _recv_msg(sock, maxfds=0):
    """-> (obj, fds). Raises EOFError when the peer has gone."""
    if maxfds:
        head, fds, _, _ = socket.recv_fds(sock, _FRAME.size, maxfds)
        if not head:
            raise EOFError("launcher socket closed")
        head += _recv_exact(sock, _FRAME.size - len(head))
    else:
        head, fds = _recv_exact(sock, _FRAME.size), []
    (size,) = _FRAME.unpack(head)
    return json.loads(_recv_exact(sock, size)), fds


def _child_exec(req, out_w, err_w, err_pipe):
    """In the forked child: join the cgroups, set up fds and session, exec. Never returns."""
    stage = "cgroup"
    try:
        pid = str(os.getpid()).encode()
        for path in req["procs"]:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        stage = "setsid"
        os.setsid()
        stage = "stdio"
        signal.set_wakeup_fd(-1)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        # Only 0-2 survive; the error pipe is close-on-exec.
        os.closerange(3, err_pipe)
        os.closerange(err_pipe + 1, os.sysconf("SC_OPEN_MAX"))
        stage = "signals"
        # Ignored signals survive exec; Python ignores SIGPIPE and SIGXFSZ, the launcher SIGINT.
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if req.get("uid") is not None:
            stage = "setuid"
            os.setgroups(req["groups"])
            os.setgid(req["gid"])
            os.setuid(req["uid"])
        stage = "chdir"
        os.chdir(req["cwd"])
        stage = "exec"
        os.execvpe(req["argv"][0], req["argv"], req["env"])
    except BaseException as exc:  # anything at all: report it and leave without Python cleanup
        err = getattr(exc, "errno", None) or 0
        msg = getattr(exc, "strerror", None) or str(exc)
        try:
            os.write(err_pipe, f"{stage}:{err}:{msg}".encode("utf-8", "replace"))
        finally:
            os._exit(127)


def _launcher_spawn(req, fds, children):
    out_w, err_w = fds
    err_r, err_w_pipe = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as e:
        for fd in (out_w, err_w, err_r, err_w_pipe):
            os.close(fd)
        return {"seq": req["seq"], "error": "fork", "errno": e.errno, "detail": e.strerror}
    if pid == 0:
        _child_exec(req, out_w, err_w, err_w_pipe)
    for fd in (out_w, err_w, err_w_pipe):
        os.close(fd)
    report = b""
    while True:   # EOF comes with a successful exec (close-on-exec) or the child's exit
        try:
            chunk = os.read(err_r, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        report += chunk
    os.close(err_r)
    if report:
        os.waitpid(pid, 0)
        stage, err, detail = report.decode("utf-8", "replace").split(":", 2)
        return {"seq": req["seq"], "error": stage, "errno": int(err), "detail": detail}
    children.add(pid)
    return {"seq": req["seq"], "pid": pid}


def _launcher_reap(sock, children):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in children:   # others are orphans re-parented to us (we are a subreaper)
            children.discard(pid)
            _send_msg(sock, {"exit": pid, "status": status})


def launcher_main(sock_fd):
    """Entry point of the launcher process: serve spawn requests until the server goes away."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    # Orphaned daemons of a job are re-parented here and reaped, so none stays a zombie.
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a Ctrl-C meant for the server
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sock = socket.socket(fileno=sock_fd)
    children = set()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            else:
                try:
                    req, fds = _recv_msg(sock, maxfds=2)
                except (EOFError, ConnectionError):
                    os._exit(0)   # the server is gone; its successor finds the jobs by cgroup
                _send_msg(sock, _launcher_spawn(req, fds, children))
        _launcher_reap(sock, children)


class Launcher:
    """Handle on the launcher process, from the server's side."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = os.path.dirname(os.path.abspath(__file__))   # a directory, or the .pyz itself
        code = (f"import sys; sys.path.insert(0, {root!r}); import jobworker; "
                f"jobworker.launcher_main({theirs.fileno()})")
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", code], pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self.sock = ours
        self.send_lock = threading.Lock()

    def send(self, obj, fds=()):
        with self.send_lock:
            _send_msg(self.sock, obj, fds)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ================================================================================================
# Logs
# ================================================================================================
# A job's output is one file, output.log, holding stdout and stderr bytes in the order they were
# read (like 2>&1), and an index, output.idx, of little-endian u64 records (offset << 1 | is_stderr)
# marking where the stream changes. Offsets are positions in output.log: a follower resumes from
# any offset, and a single-stream log is streamed with large reads.

_MARKER = "\n[jobworker: output cap of {} bytes reached; further output dropped]\n"
_IDX_REC = 8


class JobLog:
    """Append (one writer: the engine thread) and read (many readers) one job's output."""

    def __init__(self, directory, cap, create):
        self.dir = directory
        self.data_path = f"{directory}/output.log"
        self.idx_path = f"{directory}/output.idx"
        self.cap = cap
        self.truncated = False
        self.error = ""
        self.seg_offsets = array.array("Q")
        self.seg_streams = bytearray()
        if create:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._data_fd = os.open(self.data_path, flags, 0o600)
            self._idx_fd = os.open(self.idx_path, flags, 0o600)
            self.size = 0
        else:
            self._data_fd = self._idx_fd = None
            self.size = os.path.getsize(self.data_path) if os.path.exists(self.data_path) else 0
            if os.path.exists(self.idx_path):
                with open(self.idx_path, "rb") as f:
                    raw = f.read()
                recs = array.array("Q")
                recs.frombytes(raw[:len(raw) - len(raw) % _IDX_REC])
                if sys.byteorder != "little":
                    recs.byteswap()
                self.seg_offsets = array.array("Q", (r >> 1 for r in recs))
                self.seg_streams = bytearray(STDERR if r & 1 else STDOUT for r in recs)

    def _used(self):
        return self.size + _IDX_REC * len(self.seg_offsets)

    def _write_all(self, fd, data):
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def _append_raw(self, stream, data):
        if not self.seg_streams or self.seg_streams[-1] != stream:
            rec = self.size << 1 | (stream == STDERR)
            self._write_all(self._idx_fd, rec.to_bytes(_IDX_REC, "little"))
            self.seg_offsets.append(self.size)
            self.seg_streams.append(stream)
        self._write_all(self._data_fd, data)
        self.size += len(data)

    def append(self, stream, data):
        """Store data; past the cap store a marker once and drop the rest; on a write error
        (disk full) record it and drop the rest. Never blocks on readers."""
        if self.truncated or self.error:
            return
        try:
            marker = _MARKER.format(self.cap).encode()
            room = self.cap - self._used() - len(marker) - 2 * _IDX_REC
            if len(data) > room:
                if room > 0:
                    self._append_raw(stream, data[:room])
                self._append_raw(STDERR, marker)
                self.truncated = True
            else:
                self._append_raw(stream, data)
        except OSError as e:
            self.error = f"output write failed: {e.strerror}"
            log.error("job log %s: %s", self.dir, self.error)

    def close_writer(self):
        for fd in (self._data_fd, self._idx_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._idx_fd = None

    def segments(self, offset, end):
        """[(stream, start, stop)] covering offset..end, split where the stream changes.
        Call with the job's lock held, so the index does not move underneath."""
        out = []
        i = max(bisect.bisect_right(self.seg_offsets, offset) - 1, 0)
        while offset < end and i < len(self.seg_offsets):
            stop = self.seg_offsets[i + 1] if i + 1 < len(self.seg_offsets) else end
            stop = min(stop, end)
            if stop > offset:
                out.append((self.seg_streams[i], offset, stop))
                offset = stop
            i += 1
        return out


@dataclasses.dataclass
class Chunk:
    """Output of one stream: data starting at offset in the job's output (both streams)."""
    stream: int
    offset: int
    data: bytes


# ================================================================================================
# Jobs
# ================================================================================================

@dataclasses.dataclass
class JobStatus:
    """A snapshot of one job, as Query and List report it."""
    id: str
    owner: str
    command: list
    limits: Limits
    state: str
    exit_code: int = None
    signal: int = None
    oom_killed: bool = False
    started_at: float = 0.0
    ended_at: float = None
    usage: dict = dataclasses.field(default_factory=dict)
    output_bytes: int = 0
    log_truncated: bool = False
    log_error: str = ""
    pid: int = None

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["limits"] = self.limits.to_dict()
        return d

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["limits"] = Limits.from_dict(d.get("limits") or {})
        return cls(**d)


class Job:
    """A job's live record. Fields change under `cond`; waiters are woken through it."""

    def __init__(self, status, log_, cgroup):
        self.status = status
        self.log = log_
        self.cgroup = cgroup
        self.cond = threading.Condition()
        self.main_exited = threading.Event()
        self.final = threading.Event()
        self.stop_requested = False
        self.open_streams = 0           # pipes not yet at EOF
        self.output_done = threading.Event()
        self.pipe_fds = []

    @property
    def id(self):
        return self.status.id

    def snapshot(self):
        with self.cond:
            s = dataclasses.replace(self.status, usage=dict(self.status.usage))
            s.output_bytes = self.log.size
            s.log_truncated = self.log.truncated
            s.log_error = self.log.error
        return s


def _write_json_atomic(path, obj):
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class _Engine(threading.Thread):
    """One thread for every job's pipes and the launcher's messages (epoll): the thread count
    does not grow with the number of jobs."""

    def __init__(self, launcher, on_reply, on_exit, on_launcher_gone):
        super().__init__(name="jobworker-engine", daemon=True)
        self._ep = select.epoll()
        self._handlers = {}
        self._calls = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._launcher = launcher
        self._on_reply, self._on_exit, self._on_gone = on_reply, on_exit, on_launcher_gone
        self._running = True
        self.add_reader(self._wake_r, self._drain_wake)
        self.add_reader(launcher.sock.fileno(), self._launcher_readable)

    def add_reader(self, fd, handler):
        self._handlers[fd] = handler
        self._ep.register(fd, select.EPOLLIN)

    def call_soon(self, fn):
        """Run fn on the engine thread (fd changes that must not race a read)."""
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def remove_reader(self, fd):
        """Engine thread only."""
        if self._handlers.pop(fd, None) is not None:
            self._ep.unregister(fd)
            os.close(fd)

    def _drain_wake(self, fd):
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            self._calls.pop(0)()

    def _launcher_readable(self, fd):
        try:
            msg, _ = _recv_msg(self._launcher.sock)
        except (EOFError, OSError):
            self._ep.unregister(fd)
            self._handlers.pop(fd, None)
            self._on_gone()
            return
        if "exit" in msg:
            self._on_exit(msg["exit"], msg["status"])
        else:
            self._on_reply(msg)

    def stop(self):
        self._running = False
        self.call_soon(lambda: None)
        self.join()
        for fd in list(self._handlers):
            if fd not in (self._wake_r,):
                self._handlers.pop(fd)
                self._ep.unregister(fd)
                if fd != self._launcher.sock.fileno():
                    os.close(fd)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ep.close()

    def run(self):
        while self._running:
            for fd, _ in self._ep.poll():
                handler = self._handlers.get(fd)
                if handler is not None:
                    try:
                        handler(fd)
                    except Exception:
                        log.exception("engine handler for fd %d", fd)


class _Follow:
    """Iterator of Chunks of one job's output from an offset, live until the job is final.
    cancel() from any thread ends it at once."""

    def __init__(self, job, offset, max_chunk):
        self.job = job
        self.offset = offset
        self.max_chunk = max_chunk
        self.cancelled = False
        self._fd = None

    def cancel(self):
        with self.job.cond:
            self.cancelled = True
            self.job.cond.notify_all()

    def __iter__(self):
        job = self.job
        try:
            self._fd = os.open(job.log.data_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            while True:
                with job.cond:
                    while not (self.cancelled or job.log.size > self.offset or job.final.is_set()):
                        job.cond.wait()
                    if self.cancelled:
                        return
                    end = min(job.log.size, self.offset + self.max_chunk)
                    segments = job.log.segments(self.offset, end)
                    done = job.final.is_set() and not segments
                if done:
                    return
                for stream, start, stop in segments:
                    data = os.pread(self._fd, stop - start, start)
                    if not data:   # the file is shorter than its record says (disk trouble)
                        return
                    yield Chunk(stream, start, data)
                    self.offset = start + len(data)
        finally:
            os.close(self._fd)


class JobManager:
    """Starts, stops and watches jobs on this host. Thread-safe. Create it before gRPC exists in
    the process is not required: jobs are forked by the launcher process (see Launcher)."""

    def __init__(self, state_dir=DEFAULT_STATE_DIR, cgroups=None, *, default_pids=DEFAULT_PIDS_LIMIT,
                 log_cap=DEFAULT_LOG_CAP, max_jobs=DEFAULT_MAX_JOBS, job_user=None,
                 grace=DEFAULT_GRACE_SECONDS, devices=None):
        self.state_dir = state_dir
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.cgroups = cgroups or detect_cgroups()
        self.default_pids = default_pids
        self.log_cap = log_cap
        self.max_jobs = max_jobs
        self.grace = grace
        self.devices = block_devices() if devices is None else devices
        self._user = _job_user(job_user)
        self._lock = threading.Lock()
        self._jobs = {}
        self._by_pid = {}
        self._pending = {}
        self._seq = 0
        self._running = 0
        self._closed = False
        self._launcher_gone = False
        os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        self.cgroups.setup()
        self._finisher = concurrent.futures.ThreadPoolExecutor(8, "jobworker-finish")
        self._launcher = Launcher()
        self._engine = _Engine(self._launcher, self._on_reply, self._on_exit, self._on_launcher_gone)
        self._engine.start()
        self._recover()

    # -- public API ---------------------------------------------------------------------------

    def start(self, command, args=(), limits=None, owner=""):
        """Start a job; returns its JobStatus once the program has been exec'd. Raises
        InvalidArgument, CapReached, SpawnError (nothing left behind) or CgroupError."""
        argv = validate_command(command, list(args))
        limits = limits or Limits()
        if limits.pids is None and self.default_pids:
            limits = dataclasses.replace(limits, pids=self.default_pids)
        with self._lock:
            if self._closed:
                raise LauncherError("the job manager is shutting down")
            if self._launcher_gone:
                raise LauncherError("the job launcher process has exited")
            if self._running >= self.max_jobs:
                raise CapReached("running jobs", self.max_jobs)
            self._running += 1
        try:
            return self._start(argv, limits, owner)
        except BaseException:
            with self._lock:
                self._running -= 1
            raise

    def _start(self, argv, limits, owner):
        job_id = str(uuid.uuid4())
        cgroup = self.cgroups.job(job_id)
        job_dir = os.path.join(self.jobs_dir, job_id)
        cgroup.create()
        pipes = []
        try:
            cgroup.set_limits(limits, self.devices)
            os.mkdir(job_dir, 0o700)
            status = JobStatus(id=job_id, owner=owner, command=argv, limits=limits, state=RUNNING,
                               started_at=time.time())
            job = Job(status, JobLog(job_dir, self.log_cap, create=True), cgroup)
            for _ in (STDOUT, STDERR):
                r, w = os.pipe2(os.O_CLOEXEC)
                pipes += [r, w]
            for r in pipes[0::2]:
                _set_pipe_size(r)
            self._spawn(job, argv, pipes[1::2])
        except BaseException:
            for fd in pipes:
                _close_quietly(fd)
            if 'job' in locals():
                job.log.close_writer()
            _remove_tree(job_dir)
            cgroup.kill_all()
            cgroup.remove()
            raise
        for fd in pipes[1::2]:
            os.close(fd)   # the job holds the only write ends now: EOF when it is done
        job.open_streams = 2
        job.pipe_fds = pipes[0::2]
        with self._lock:
            self._jobs[job_id] = job
        self._save(job)
        for stream, fd in zip((STDOUT, STDERR), pipes[0::2]):
            os.set_blocking(fd, False)
            self._engine.add_reader(fd, self._pipe_reader(job, stream))
        # The main process may have ended before the readers were registered; its exit was
        # recorded by _on_exit and finishing waits for the pipes, so nothing is missed.
        return job.snapshot()

    def stop(self, job_id, grace=None, owner=None):
        """SIGTERM every process of the job, SIGKILL after `grace` seconds; returns the final
        JobStatus once no process of the job remains. Raises JobNotRunning if already final."""
        job = self._get(job_id, owner)
        grace = self.grace if grace is None else grace
        if grace < 0:
            raise InvalidArgument("grace", grace, "seconds, 0 or more")
        with job.cond:
            if job.status.state != RUNNING:
                raise JobNotRunning(job_id, job.status.state)
            first = not job.stop_requested
            job.stop_requested = True
        if first:
            job.cgroup.signal_all(signal.SIGTERM)
        if not job.main_exited.wait(grace):
            job.cgroup.kill_all()
        job.final.wait()
        return job.snapshot()

    def status(self, job_id, owner=None):
        """JobStatus of one job; live usage while it runs."""
        job = self._get(job_id, owner)
        snap = job.snapshot()
        if snap.state == RUNNING:
            try:
                snap.usage = job.cgroup.usage()
            except CgroupError:
                pass   # finished in between; the snapshot is still right
        return snap

    def list(self, owner=None):
        """JobStatus of every job (of `owner` only, if given), oldest first."""
        with self._lock:
            jobs = list(self._jobs.values())
        snaps = [j.snapshot() for j in jobs if owner is None or j.status.owner == owner]
        return sorted(snaps, key=lambda s: s.started_at)

    def follow(self, job_id, offset=0, owner=None, max_chunk=1 << 20):
        """Iterator of Chunks from `offset`, live until the job is final; has .cancel()."""
        job = self._get(job_id, owner)
        if not isinstance(offset, int) or offset < 0:
            raise InvalidArgument("offset", offset, "a byte offset, 0 or more")
        with job.cond:
            if job.final.is_set() and offset > job.log.size:
                raise InvalidArgument("offset", offset, f"at most the output size {job.log.size}")
        return _Follow(job, offset, max_chunk)

    def close(self, grace=None):
        """Stop every running job, finish their records, end the launcher. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = [j for j in self._jobs.values() if not j.final.is_set()]
        pool = concurrent.futures.ThreadPoolExecutor(16) if running else None
        if pool:
            list(pool.map(lambda j: self._stop_quietly(j, grace), running))
            pool.shutdown()
        self._finisher.shutdown(wait=True)
        self._engine.stop()
        self._launcher.close()
        for job in self._jobs.values():
            job.log.close_writer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _stop_quietly(self, job, grace):
        try:
            self.stop(job.id, grace)
        except JobNotRunning:
            pass

    def _get(self, job_id, owner):
        validate_job_id(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or (owner is not None and job.status.owner != owner):
            raise JobNotFound(job_id)
        return job

    def _spawn(self, job, argv, write_fds):
        env = {"PATH": JOB_PATH, "LANG": JOB_LANG, "HOME": "/root"}
        req = {"argv": argv, "env": env, "cwd": JOB_CWD, "procs": list(job.cgroup.procs_files)}
        if self._user:
            req.update(self._user)
            env["HOME"] = self._user["home"]
            env["USER"] = env["LOGNAME"] = self._user["name"]
        done = threading.Event()
        with self._lock:
            self._seq += 1
            req["seq"] = seq = self._seq
            self._pending[seq] = (job, done)
        try:
            self._launcher.send(req, write_fds)
        except OSError:
            with self._lock:
                self._pending.pop(seq, None)
            raise LauncherError("the job launcher process has exited") from None
        done.wait()
        reply = job.spawn_reply
        if "pid" not in reply:
            raise SpawnError(argv[0], reply.get("errno", 0), reply.get("error", "spawn"),
                             reply.get("detail", ""))

    def _on_reply(self, msg):
        with self._lock:
            job, done = self._pending.pop(msg["seq"])
            if "pid" in msg:
                self._by_pid[msg["pid"]] = job
                job.status.pid = msg["pid"]
        job.spawn_reply = msg
        done.set()

    def _on_launcher_gone(self):
        if not self._closed:
            log.error("the job launcher process exited; no new job can start")
        with self._lock:
            self._launcher_gone = True
            pending, self._pending = list(self._pending.values()), {}
        for job, done in pending:
            job.spawn_reply = {"error": "launcher", "errno": errno.EPIPE}
            done.set()

    def _on_exit(self, pid, raw_status):
        with self._lock:
            job = self._by_pid.pop(pid, None)
        if job is None:
            return
        with job.cond:
            if os.WIFSIGNALED(raw_status):
                job.status.signal = os.WTERMSIG(raw_status)
            else:
                job.status.exit_code = os.WEXITSTATUS(raw_status)
        job.main_exited.set()
        self._finisher.submit(self._finish, job)

    def _pipe_reader(self, job, stream):
        def on_readable(fd):
            try:
                data = os.read(fd, 1 << 20)
            except BlockingIOError:
                return
            if data:
                with job.cond:
                    job.log.append(stream, data)
                    job.cond.notify_all()
                return
            self._engine.remove_reader(fd)
            with job.cond:
                job.open_streams -= 1
                if job.open_streams == 0:
                    job.output_done.set()
        return on_readable

    def _finish(self, job):
        """After the main process ended: kill what it left (KillMode=control-group), collect
        the rest of the output, read the OOM counter and usage, remove the cgroup."""
        try:
            if job.cgroup.pids():
                job.cgroup.kill_all()
            if not job.output_done.wait(5.0):
                # a process outside the cgroup holds the pipe: stop reading
                done = threading.Event()

                def drop():
                    for fd in job.pipe_fds:
                        self._engine.remove_reader(fd)
                    done.set()
                self._engine.call_soon(drop)
                done.wait(5.0)
            oom = job.cgroup.oom_kills() > 0
            usage = job.cgroup.usage()
            job.cgroup.remove()
        except Exception:
            log.exception("finishing job %s", job.id)
            oom, usage = False, {}
        with job.cond:
            job.status.state = STOPPED if job.stop_requested else EXITED
            job.status.oom_killed = oom
            job.status.usage = usage
            job.status.ended_at = time.time()
            job.log.close_writer()
        self._save(job)
        with self._lock:
            self._running -= 1
        with job.cond:
            job.final.set()
            job.cond.notify_all()

    def _save(self, job):
        try:
            _write_json_atomic(os.path.join(self.jobs_dir, job.id, "job.json"),
                               job.snapshot().to_dict())
        except OSError as e:
            log.error("saving job %s: %s", job.id, e)

    def _recover(self):
        """Load earlier jobs; those that were running when the server died become `lost`:
        whatever is left of them is killed and their cgroups removed."""
        for name in sorted(os.listdir(self.jobs_dir)):
            if not _JOB_ID_RE.fullmatch(name):
                continue
            path = os.path.join(self.jobs_dir, name, "job.json")
            try:
                with open(path) as f:
                    status = JobStatus.from_dict(json.load(f))
            except (OSError, ValueError, TypeError) as e:
                log.error("skipping unreadable job record %s: %s", path, e)
                continue
            job = Job(status, JobLog(os.path.join(self.jobs_dir, name), self.log_cap, create=False),
                      self.cgroups.job(name))
            if status.state == RUNNING:
                status.state = LOST
                status.ended_at = time.time()
                self._discard_cgroup(job.cgroup)
            job.main_exited.set()
            job.output_done.set()
            job.final.set()
            self._jobs[name] = job
            if status.state == LOST:
                self._save(job)
        for name in self.cgroups.leftover_job_ids():
            if name not in self._jobs:
                self._discard_cgroup(self.cgroups.job(name))

    @staticmethod
    def _discard_cgroup(cgroup):
        try:
            cgroup.kill_all()
            cgroup.remove()
        except CgroupError as e:
            log.error("removing leftover cgroup: %s", e)


def _job_user(name):
    """uid, gid, groups and home of the unprivileged user jobs run as, or None."""
    if not name:
        return None
    import pwd
    try:
        pw = pwd.getpwnam(name) if not str(name).isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise InvalidArgument("job user", name, "an existing user name or uid") from None
    return {"uid": pw.pw_uid, "gid": pw.pw_gid, "groups": os.getgrouplist(pw.pw_name, pw.pw_gid),
            "home": pw.pw_dir, "name": pw.pw_name}


def _set_pipe_size(fd, size=1 << 20):
    """Larger pipes mean fewer wake-ups for a fast writer; the default is 64 KiB."""
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError):
        pass


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def _remove_tree(path):
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
