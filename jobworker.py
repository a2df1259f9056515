#!/usr/bin/env python3
"""jobworker: run and watch arbitrary commands on a Linux host, each job in its own cgroup.

Library (no gRPC inside):
    JobManager(state_dir, cgroups=None, ...)   open, start, stop, status, walk, list, follow,
                                                remove, apply_retention, close
    Limits, parse_cpu_quota, parse_memory, parse_disk_io, parse_pids
    detect_cgroups(parent)                      -> CgroupDriver (v1/hybrid or v2, decided once)
Server:
    RpcServer(manager, listen, ServerTLS.load(ca, cert, key), limits)   bind, start, stop
    serve_grpc(manager, listen, ca=, cert=, key=)   the same as a context manager
Command line (``jobworker.py SUBCOMMAND --help``; the table is SUBCOMMANDS):
    serve, start, run, wait, stop, query, stream, list, rm, top, version, health, context,
    completion, doctor, certs

Only the standard library is imported at module level. grpc, protobuf and cryptography are
imported inside the sections that need them: the CLI starts fast, and the job launcher process
is started before any gRPC thread exists.
"""

import array
import bisect
import collections
import contextlib
import dataclasses
import enum
import errno
import fcntl
import heapq
import itertools
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time
import types
import typing

__version__ = "0.1.0"

class _Logger:
    """logging.getLogger(name), made on first use: a CLI call that says nothing does not load
    logging (nor concurrent.futures, subprocess, uuid: a fifth of its start-up, imported where
    they are used)."""

    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        import logging
        return getattr(logging.getLogger(self._name), attr)


log = _Logger("jobworker")

DEFAULT_STATE_DIR = "/var/lib/jobworker"
DEFAULT_CGROUP_PARENT = "jobworker"   # relative to the server's own cgroup in each hierarchy
DEFAULT_GRACE_SECONDS = 10.0          # SIGTERM -> SIGKILL on Stop
DEFAULT_PIDS_LIMIT = 1024             # every job gets a pids limit: a fork bomb stops here
DEFAULT_LOG_CAP = 2 << 30             # bytes of output kept per job (stdout + stderr)
DEFAULT_MAX_JOBS = 1000               # concurrently running jobs
DEFAULT_MAX_JOBS_PER_OWNER = 256      # ... of one owner
DEFAULT_MAX_QUEUED = 10_000           # jobs waiting for a slot (Start with queue)
DEFAULT_MAX_QUEUED_PER_OWNER = 1000   # ... of one owner
QUEUE_STARTERS = 16                   # threads that start queued jobs whose turn has come
QUEUE_STARTS_PER_OWNER = 2            # ... of them one owner's at once (a start that hangs, on
                                      # a workdir of a hung mount, holds up its owner's only)
FINISHERS = 8                         # threads that finish ended jobs (drain, usage, rmdir)
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
DYNAMIC_USER = "dynamic"              # serve --job-user dynamic: a uid per job owner
DEFAULT_UID_RANGE = (61184, 65519)    # systemd's DynamicUser= range

CGROUP_ROOT = "/sys/fs/cgroup"
STDOUT, STDERR = 1, 2

# A job's stdin: /dev/null, a pipe its attached clients write to, or a pseudo-terminal (its
# stdout and stderr too: one output stream).
STDIN_NULL, STDIN_PIPE, STDIN_TTY = "null", "pipe", "tty"
STDIN_MODES = (STDIN_NULL, STDIN_PIPE, STDIN_TTY)
MAX_WINDOW = 10_000                   # rows or columns of a job's terminal, at most
DEFAULT_WINDOW = (24, 80)
DEFAULT_TERM = "xterm"

# Job states. A job is created running (or queued, to run when a slot frees); every other
# state is final.
QUEUED = "queued"       # accepted while the caps were full: it runs when a slot frees
RUNNING = "running"
EXITED = "exited"       # the main process ended by itself (exit code or signal)
STOPPED = "stopped"     # ended by a Stop request
LOST = "lost"           # the server (or its launcher) died while the job ran
FAILED = "failed"       # it never ran: its start failed after it was accepted
FINAL_STATES = frozenset({EXITED, STOPPED, LOST, FAILED})
STATES = frozenset({QUEUED, RUNNING}) | FINAL_STATES

_JOB_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_JOB_ID_PREFIX_RE = re.compile(r"[0-9a-f-]{1,36}")   # the start of one (List's id_prefix)


def check_private_dir(path, what):
    """Make path (mode 0700) if missing; LocalFileError unless it is a directory, not a symlink,
    owned by this user and writable by no one else: what lies in it (keys, job records) must
    not be swapped or read by another local user."""
    import stat
    if not os.path.lexists(path):
        os.makedirs(path, mode=0o700)
    st = os.lstat(path)
    problem = ("is a symlink" if stat.S_ISLNK(st.st_mode) else
               "is not a directory" if not stat.S_ISDIR(st.st_mode) else
               f"belongs to uid {st.st_uid}" if st.st_uid != os.geteuid() else
               f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
               if st.st_mode & 0o022 else None)
    if problem:
        raise LocalFileError(f"refusing the {what} {path}: it {problem}; it must be a "
                             f"directory of uid {os.geteuid()} that only it can write")


def _close_quietly(fd):
    """Close fd on a cleanup path, where an error closing it changes nothing."""
    try:
        os.close(fd)
    except OSError:
        pass


def _remove_tree(path, first=None):
    """Remove a job directory (flat: files only) and the directory itself; gone is done.
    `first` goes before the others (a job's record: a directory cut short by a crash is then
    one without a record, which start-up finishes off, never a record without its files)."""
    if not os.path.isdir(path):
        return
    names = os.listdir(path)
    if first in names:
        names.remove(first)
        names.insert(0, first)
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    os.rmdir(path)


def name_os_thread():
    """Give the calling thread its Python name in the kernel too (the first 15 bytes, what
    /proc/PID/task/TID/comm, `top -H` and `ps -L` show), so an operator tells the server's
    threads apart; CPython does so itself only from 3.14. A kernel without
    /proc/thread-self (before 3.17) keeps the process's name."""
    with contextlib.suppress(OSError):
        with open("/proc/thread-self/comm", "w") as f:
            f.write(threading.current_thread().name.encode()[:15].decode(errors="ignore"))


def thread_pool(workers, name=""):
    """A concurrent.futures.ThreadPoolExecutor whose threads carry their names in the kernel
    (name_os_thread); concurrent.futures is loaded where a pool is made, not by the CLI."""
    import concurrent.futures
    return concurrent.futures.ThreadPoolExecutor(workers, name, initializer=name_os_thread)


class NamedThread(threading.Thread):
    """A daemon thread named in the kernel as in Python (name_os_thread)."""

    def __init__(self, target=None, name=None, args=()):
        super().__init__(target=target, name=name, args=args, daemon=True)

    def run(self):
        name_os_thread()
        super().run()


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


class JobRunning(JobworkerError):
    """The job is still running, and the call needs it ended (Remove)."""

    def __init__(self, job_id):
        self.job_id = job_id
        super().__init__(f"job {job_id} is running; stop it first")


class JobNotRunning(JobworkerError):
    """The job is already in a final state."""

    def __init__(self, job_id, state):
        self.job_id, self.state = job_id, state
        super().__init__(f"job {job_id} is not running (state {state})")


class InputUnavailable(JobworkerError):
    """The job's stdin cannot take what was sent: it was started without one (-i, -t), it was
    closed, or it is not a terminal (a window size)."""

    def __init__(self, job_id, why):
        self.job_id, self.why = job_id, why
        super().__init__(f"job {job_id} {why}")


class CapReached(JobworkerError):
    """A configured cap (jobs, streams, argv size) is reached."""

    def __init__(self, cap, limit):
        self.cap, self.limit = cap, limit
        super().__init__(f"{cap} cap reached ({limit})")


class SpawnError(JobworkerError):
    """The program could not be started; nothing of the job is left behind."""

    def __init__(self, program, err, stage, detail=""):
        self.program, self.errno, self.stage = program, err, stage
        super().__init__(f"{stage} failed: {detail or os.strerror(err)}: {program}")


class ProgramNotRunnable(SpawnError):
    """exec failed: the program named in the request cannot be run."""

    _REASONS = {errno.ENOENT: "no such file", errno.EACCES: "permission denied",
                errno.ENOEXEC: "exec format error", errno.ENOTDIR: "not a directory in path",
                errno.EISDIR: "is a directory", errno.E2BIG: "argument list too long"}

    def __init__(self, program, err):
        self.program, self.errno, self.stage = program, err, "exec"
        reason = self._REASONS.get(err) or f"exec failed: {os.strerror(err)}"
        JobworkerError.__init__(self, f"{reason}: {program}")


class CgroupError(JobworkerError):
    """A cgroupfs operation failed; carries the path and the value written."""

    def __init__(self, path, value, err):
        self.path, self.value, self.errno = path, value, err
        what = f"writing {value!r} to {path}" if value is not None else f"{path}"
        super().__init__(f"cgroup: {what}: {os.strerror(err) if err else 'failed'}")


class LauncherError(JobworkerError):
    """The job launcher process is gone; no job can be started."""


class LauncherMismatch(JobworkerError):
    """The launcher running for this state dir speaks another protocol version."""

    def __init__(self, pid, version, jobs):
        self.pid, self.version, self.jobs = pid, version, jobs
        super().__init__(
            f"the job launcher of this state dir (pid {pid}, holding {jobs} running job"
            f"{'s' if jobs != 1 else ''}) speaks launcher protocol {version}; this server "
            f"speaks {LAUNCHER_PROTOCOL}. Nothing was touched. Serve with the build that "
            "started it until its jobs have ended, or stop them and that launcher first")


class DiskFull(JobworkerError):
    """The state dir's disk has no room for a new job's record."""

    def __init__(self, path, err):
        self.path = path
        super().__init__(f"no room for a new job on the state dir's disk ({path}: "
                         f"{os.strerror(err)})")


class LocalFileError(JobworkerError):
    """A file this process needs (certificates, keys) cannot be read or is unsafe."""


class AddressInUse(JobworkerError):
    """The server's listen address is taken by another process."""


class AlreadyServing(JobworkerError):
    """Another server owns this state dir or job cgroup parent."""


class Unauthenticated(JobworkerError):
    """The connection does not authenticate anyone: not TLS 1.3, or no usable certificate."""


class AccessDenied(JobworkerError):
    """The caller's certificate does not allow the call."""


class RequestTimeout(JobworkerError):
    """A call's request message did not arrive within the server's deadline for it."""

    def __init__(self, seconds):
        self.seconds = seconds
        super().__init__(f"the request message did not arrive within {seconds:g}s")


class MalformedRequest(JobworkerError):
    """A request message that could not be decoded at all."""

    def __init__(self, reason):
        self.reason = reason
        super().__init__(f"malformed request message: {reason[:200]}")


# The one table from errors to gRPC status codes, by name (most specific first). The RPC layer
# (interceptor and servicer) and the CLI's exit codes both read it; anything not listed is
# INTERNAL, and its details stay in the server log.
ERROR_CODES = (
    (MalformedRequest, "INVALID_ARGUMENT"),
    (InvalidArgument, "INVALID_ARGUMENT"),
    (ProgramNotRunnable, "INVALID_ARGUMENT"),   # the program named in the request cannot run
    (JobNotFound, "NOT_FOUND"),
    (JobNotRunning, "FAILED_PRECONDITION"),
    (JobRunning, "FAILED_PRECONDITION"),
    (InputUnavailable, "FAILED_PRECONDITION"),
    (CapReached, "RESOURCE_EXHAUSTED"),
    (DiskFull, "RESOURCE_EXHAUSTED"),
    (SpawnError, "FAILED_PRECONDITION"),
    (CgroupError, "FAILED_PRECONDITION"),
    (LauncherError, "UNAVAILABLE"),
    (RequestTimeout, "DEADLINE_EXCEEDED"),
    (Unauthenticated, "UNAUTHENTICATED"),
    (AccessDenied, "PERMISSION_DENIED"),
)


def status_code_for(exc):
    """Name of the gRPC status code for an error; INTERNAL for anything unexpected."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return "INTERNAL"


# ================================================================================================
# Limits
# ================================================================================================

# One limit, one name per layer; the mapping is said here only:
#   request text (ResourceConfig, CLI)   Limits (library, JobStatus.limits)   record on disk
#   cpu_quota "50%"   (--cpu)            cpu_percent 50.0                     cpu_percent
#   memory_limit "256M" (--memory)       memory_bytes                         memory_bytes
#   disk_io "10MB/s"  (--disk-io)        io_bytes_per_second                  io_bps
#   pids "100"        (--pids)           pids                                 pids
# and to the kernel: cpu_quota_us() of cpu.max / cpu.cfs_quota_us, memory.max /
# memory.limit_in_bytes, rbps and wbps of io.max / blkio.throttle.*_bps_device, pids.max.

@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one job; None means "not limited" (pids gets the manager's default)."""
    cpu_percent: float = None    # 50.0 = half of one CPU, 150.0 = one and a half
    memory_bytes: int = None
    io_bytes_per_second: int = None   # read and write bandwidth, each, per whole disk
    pids: int = None

    _RECORD_KEYS = {"io_bytes_per_second": "io_bps"}   # what records have always called it

    def to_dict(self):
        return {self._RECORD_KEYS.get(f.name, f.name): getattr(self, f.name)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d.get(cls._RECORD_KEYS.get(f.name, f.name))
                      for f in dataclasses.fields(cls)})


# ASCII digits only (\d and str.isdigit() take other scripts' digits), and few enough that the
# float stays finite (a 400-digit number is inf, and int(inf) raises).
_NUMBER = r"([0-9]{1,20}(?:\.[0-9]{1,9})?)"
_CPU_RE = re.compile(_NUMBER + r"\s*%")
_MEMORY_RE = re.compile(_NUMBER + r"\s*([KMGT]?)(I?B)?", re.IGNORECASE)
_RATE_RE = re.compile(_NUMBER + r"\s*([KMGT]?)(I?B)?(?:/S)?", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def cpu_quota_us(percent):
    """Microseconds of CPU time per CPU_PERIOD_US for a quota in percent of one CPU."""
    return round(percent * CPU_PERIOD_US / 100)


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
    if cpu_quota_us(percent) < MIN_CPU_QUOTA_US or percent > ncpu * 100:
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
    if not re.fullmatch(r"[0-9]{1,8}", s) or not 1 <= int(s) <= MAX_PIDS:
        raise InvalidArgument(field, text, accepted)
    return int(s)


_DURATION_RE = re.compile(_NUMBER + r"\s*(ms|s|m|min|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
DURATION_FORM = "seconds, or a number with s, m, h or d, such as 30s, 15m, 12h, 7d"


def parse_duration(text, field="duration"):
    """'30s' -> 30.0, '15m' -> 900.0, '12h', '7d'; a bare number is seconds."""
    m = _DURATION_RE.fullmatch(str(text).strip())
    if not m:
        raise InvalidArgument(field, text, DURATION_FORM)
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]


def parse_limits(cpu="", memory="", disk_io="", pids=""):
    """Limits from their text forms; every field is checked before anything is created."""
    return Limits(parse_cpu_quota(cpu), parse_memory(memory), parse_disk_io(disk_io),
                  parse_pids(pids))


def admin_reserve(cap):
    """The part of a global cap that only admins may use: at least 8 where the cap allows
    (at most half of it), 5% of large caps."""
    return min(max(8, cap // 20), cap // 2)


class Quota:
    """Who holds how much of a capped resource (running jobs, streams, calls in flight): a
    global cap, of which admin_reserve(cap) is kept for admins so that an admin can always
    act, and a cap per owner so that no owner can take what the others need. Thread-safe."""

    def __init__(self, what, cap, per_owner):
        self.what, self.cap, self.per_owner = what, cap, per_owner
        self.reserve = admin_reserve(cap)
        self._lock = threading.Lock()
        self.total = 0
        self._by_owner = {}
        self.on_free = None   # called (without the lock) each time one is given back

    def try_take(self, owner, admin=False):
        """take(), or False where it would raise CapReached."""
        with self._lock:
            if self.total >= (self.cap if admin else self.cap - self.reserve) or \
                    self._by_owner.get(owner, 0) >= self.per_owner:
                return False
            self.total += 1
            self._by_owner[owner] = self._by_owner.get(owner, 0) + 1
            return True

    def take(self, owner, admin=False, force=False):
        """Count one more for owner, or raise CapReached (force: count it anyway)."""
        with self._lock:
            mine = self._by_owner.get(owner, 0)
            if not force:
                limit = self.cap if admin else self.cap - self.reserve
                if self.total >= limit:
                    raise CapReached(self.what, self.cap if admin else
                                     f"{limit}; {self.reserve} more are kept for admins")
                if mine >= self.per_owner:
                    raise CapReached(f"{self.what} of one owner", self.per_owner)
            self.total += 1
            self._by_owner[owner] = mine + 1

    def give(self, owner):
        with self._lock:
            self.total -= 1
            left = self._by_owner[owner] - 1
            if left:
                self._by_owner[owner] = left
            else:
                del self._by_owner[owner]
        if self.on_free is not None:
            self.on_free()

    def held_by(self, owner):
        return self._by_owner.get(owner, 0)

    def lower(self, cap):
        """Lower the global cap (and the admins' share of it); False if it is not above."""
        if cap >= self.cap:
            return False
        self.cap, self.reserve = cap, admin_reserve(cap)
        return True

    def holders(self):
        """{owner: count} of every owner holding some now."""
        with self._lock:
            return dict(self._by_owner)


def validate_job_id(job_id):
    """Return job_id if it is a canonical uuid4 string; raise InvalidArgument before any path use."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidArgument("job_id", job_id, "a job id as printed by start (a uuid4)")
    return job_id


def validate_command(command, args, env=None):
    """Return argv; refuse an empty, NUL-bearing or oversized command line (argv and the
    variables given for the environment share one size cap: both go to execve)."""
    argv = [command, *args]
    if not command:
        raise InvalidArgument("name", command, "the program to run, such as bash or /usr/bin/env")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str) or "\0" in arg:
            raise InvalidArgument("name" if i == 0 else f"args[{i - 1}]", arg,
                                  "text without NUL bytes")
    if len(argv) > MAX_ARGS:
        raise CapReached("argument count", MAX_ARGS)
    size = sum(len(a.encode("utf-8", "surrogateescape")) + 1 for a in argv)
    size += sum(len(f"{k}={v}".encode("utf-8", "surrogateescape")) + 1
                for k, v in (env or {}).items())
    if size > MAX_ARGV_BYTES:
        raise CapReached("argument and environment size", f"{MAX_ARGV_BYTES} bytes")
    return argv


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME_CHARS = 100
MAX_TIMEOUT = 10 * 365 * 86400.0
MAX_GRACE = 3600.0


def validate_env(env):
    """The variables a job is given, checked: names [A-Za-z_][A-Za-z0-9_]*, values without
    NUL. Returns a dict."""
    out = {}
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise InvalidArgument("env", name, "variable names are [A-Za-z_][A-Za-z0-9_]*")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidArgument(f"env[{name}]", "(value)", "a value without NUL bytes")
        out[name] = value
    return out


def validate_workdir(path):
    """An absolute, normalised working directory ("/" if none is given)."""
    if not path:
        return JOB_CWD
    if not isinstance(path, str) or "\0" in path or not path.startswith("/"):
        raise InvalidArgument("workdir", path, "an absolute path of a directory")
    return os.path.normpath(path)


def validate_timeout(seconds, field="timeout_seconds"):
    """A job's timeout (or queue timeout) in seconds, or None for none (0 or unset)."""
    if seconds is None or seconds == 0:
        return None
    if not 0 < seconds <= MAX_TIMEOUT:   # also refuses NaN
        raise InvalidArgument(field, seconds, "seconds, 0 (none) or more, at most "
                              "ten years")
    return float(seconds)


def validate_grace(seconds):
    """Seconds between a Stop's SIGTERM and its SIGKILL: 0 to MAX_GRACE."""
    if not 0 <= seconds <= MAX_GRACE:   # also refuses NaN
        raise InvalidArgument("grace_seconds", seconds, f"seconds from 0 to {MAX_GRACE:g}")
    return float(seconds)


def validate_stdin(mode):
    if mode not in STDIN_MODES:
        raise InvalidArgument("stdin", mode, " or ".join(STDIN_MODES))
    return mode


def validate_window(rows, columns, field="window size"):
    """(rows, columns) of a terminal, each 1 to MAX_WINDOW."""
    for n in (rows, columns):
        if type(n) is not int or not 1 <= n <= MAX_WINDOW:
            raise InvalidArgument(field, f"{rows}x{columns}",
                                  f"rows and columns each 1 to {MAX_WINDOW}")
    return rows, columns


def validate_term(term):
    if not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", term):
        raise InvalidArgument("term", term, "a terminal type such as xterm-256color")
    return term


def validate_name(name):
    """A job's name: up to 100 printable characters ("" for none)."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidArgument("job_name", name, f"up to {MAX_NAME_CHARS} printable characters")
    return name


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


def _read_if_present(path):
    """The file's text; "" if it (or its cgroup, or its controller) is not there."""
    try:
        return _read(path)
    except CgroupError as e:
        if e.errno in _GONE:
            return ""
        raise


def _read_keyed(path):
    """'key value' lines -> {key: int}; {} if the file does not exist."""
    text = _read_if_present(path)
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
        if e.errno in _GONE:
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
        except OSError as e:
            if e.errno not in _GONE:
                raise
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
    try:   # the usual case, an empty cgroup without sub-cgroups: no walk of its files
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
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


def _populated(events_path):
    """What cgroup.events says of the subtree (a cgroup already gone holds nothing)."""
    return _read_keyed(events_path).get("populated", 0) != 0


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
            # short slices: a cgroup removed while we wait sends no notification
            poller.poll(min(remaining, 0.05) * 1000)
    finally:
        os.close(fd)


class Cgroup:
    """One job's cgroup, whatever the cgroup version. Made by CgroupDriver.job()."""

    # Before exec the child joins the job's cgroups: it writes its pid into each cgroup.procs
    # file of procs_files, and "0" (the writer itself) into each v1 tasks file. A process that
    # moves itself as one thread spares the kernel its global threadgroup lock, whose first
    # taking after a quiet spell waits an RCU grace period (6-18 ms here, against 0.2); the
    # child has one thread, so the thread is the process.
    procs_files = ()
    # A cgroup2 directory (its cgroup.procs among procs_files too) the child is created in
    # by clone3's CLONE_INTO_CGROUP, which needs no move at all; None where there is none.
    clone_into = None

    def create(self): raise NotImplementedError
    def set_limits(self, limits, devices): raise NotImplementedError
    def pids(self): raise NotImplementedError
    def oom_kills(self): raise NotImplementedError
    def usage(self): raise NotImplementedError
    def remove(self): raise NotImplementedError

    def populated(self):
        """Whether any process is in it or below it."""
        return bool(self.pids())

    def wait_empty(self, timeout):
        """True once no process is left, False if some still are after `timeout` seconds.
        Here by looking every 5 ms; a cgroup whose kernel says so (cgroup.events) waits for
        that instead."""
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def signal_all(self, sig):
        """Send sig to every process of the job, sub-cgroups included; returns how many."""
        pids = self.pids()
        _signal_pids(pids, sig)
        return len(pids)

    def to_record(self):
        """Where it is, for the job's record: a server started later with another cgroup
        parent still finds it (CgroupDriver.from_record)."""
        raise NotImplementedError

    def kill_all(self, timeout=10.0):
        """SIGKILL every process of the job, forks in flight included; returns once none is
        left. cgroup.kill where the kernel has it (5.14+), else freeze -> kill -> thaw until
        empty: freezing first stops a fork loop from outrunning the kill."""
        kill_file = self._kill_file()
        if kill_file and os.path.exists(kill_file):
            _kill_via_file(kill_file)
            if self.wait_empty(timeout):
                return
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            try:
                frozen = self._freeze()
                _signal_pids(pids, signal.SIGKILL)
                if frozen:
                    self._thaw()
            except CgroupError as e:
                if e.errno in _GONE:
                    return
                raise
            if time.monotonic() > deadline:
                raise CgroupError(self.path, None, errno.EBUSY)
            time.sleep(0.002)

    # Hooks of kill_all, per version.
    def _kill_file(self): return None   # the cgroup.kill file, if this version has one
    def _freeze(self): return False     # freeze every process; False if this cgroup cannot
    def _thaw(self): pass


class CgroupV1(Cgroup):
    """A job cgroup on v1 (or hybrid): one directory per controller hierarchy; if a cgroup2
    mount exists beside them, the job joins it too, for cgroup.kill and cgroup.events."""

    def __init__(self, dirs, unified=None):
        self.dirs = dirs                       # controller -> directory
        self.unified = unified                 # directory in the cgroup2 mount, or None
        self.path = next(iter(dirs.values()))
        self._unique = list(dict.fromkeys(list(dirs.values()) + ([unified] if unified else [])))
        self.procs_files = tuple(f"{d}/tasks" for d in dict.fromkeys(dirs.values())) + (
            (f"{unified}/cgroup.procs",) if unified else ())
        self.clone_into = unified
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

    def _controller(self, name):
        if name not in self.dirs:   # that v1 controller is not mounted on this host
            raise CgroupError(f"{CGROUP_ROOT}/{name}", None, errno.ENODEV)
        return self.dirs[name]

    def set_limits(self, limits, devices):
        if limits.cpu_percent is not None:
            d = self._controller("cpu")
            _write(f"{d}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(f"{d}/cpu.cfs_quota_us", str(cpu_quota_us(limits.cpu_percent)))
        if limits.memory_bytes is not None:
            d = self._controller("memory")
            _write(f"{d}/memory.limit_in_bytes", str(limits.memory_bytes))
            if os.path.exists(f"{d}/memory.memsw.limit_in_bytes"):
                # memory+swap equal to memory: the job cannot escape its limit into swap
                _write(f"{d}/memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        if limits.io_bytes_per_second is not None:
            d = self._controller("blkio")
            for dev in devices:
                bps = limits.io_bytes_per_second
                _write(f"{d}/blkio.throttle.read_bps_device", f"{dev} {bps}")
                _write(f"{d}/blkio.throttle.write_bps_device", f"{dev} {bps}")
        if limits.pids is not None:
            d = self._controller("pids")
            _write(f"{d}/pids.max", str(limits.pids))

    def pids(self):
        return _procs(self._track)

    def populated(self):
        if self.unified:   # one read for the whole subtree
            return _populated(f"{self.unified}/cgroup.events")
        return super().populated()

    def _kill_file(self):
        return f"{self.unified}/cgroup.kill" if self.unified else None

    def _freeze(self):
        freezer = self.dirs.get("freezer")
        if not freezer:
            return False
        _write(f"{freezer}/freezer.state", "FROZEN")
        for _ in range(500):   # FREEZING -> FROZEN once every task has stopped
            if _read(f"{freezer}/freezer.state").strip() == "FROZEN":
                break
            time.sleep(0.001)
        return True

    def _thaw(self):
        _write(f"{self.dirs['freezer']}/freezer.state", "THAWED")

    def wait_empty(self, timeout):
        if self.unified:
            return _wait_populated_zero(f"{self.unified}/cgroup.events", timeout)
        return super().wait_empty(timeout)

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
            for line in _read_if_present(path).splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] in ("Read", "Write"):
                    u["io_read_bytes" if parts[1] == "Read" else "io_write_bytes"] += int(parts[2])
        if "pids" in self.dirs:
            u["tasks"] = _read_int(f"{self.dirs['pids']}/pids.current")
        return u

    def remove(self):
        for d in self._unique:
            _rmdir_tree(d)

    def to_record(self):
        return {"v1": dict(self.dirs), "unified": self.unified}


class CgroupV2(Cgroup):
    """A job cgroup on the unified hierarchy: one directory."""

    def __init__(self, path):
        self.path = path
        self.procs_files = (f"{path}/cgroup.procs",)
        self.clone_into = path

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
            _write(self._file("cpu.max"), f"{cpu_quota_us(limits.cpu_percent)} {CPU_PERIOD_US}")
        if limits.memory_bytes is not None:
            _write(self._file("memory.max"), str(limits.memory_bytes))
            if os.path.exists(f"{self.path}/memory.swap.max"):
                _write(f"{self.path}/memory.swap.max", "0")
        if limits.io_bytes_per_second is not None:
            path = self._file("io.max")
            for dev in devices:
                bps = limits.io_bytes_per_second
                _write(path, f"{dev} rbps={bps} wbps={bps}")
        if limits.pids is not None:
            _write(self._file("pids.max"), str(limits.pids))

    def pids(self):
        return _procs(self.path)

    def _kill_file(self):
        return f"{self.path}/cgroup.kill"

    def _freeze(self):
        if not os.path.exists(f"{self.path}/cgroup.freeze"):
            return False
        _write(f"{self.path}/cgroup.freeze", "1")
        return True

    def _thaw(self):
        _write(f"{self.path}/cgroup.freeze", "0")

    def wait_empty(self, timeout):
        return _wait_populated_zero(f"{self.path}/cgroup.events", timeout)

    def populated(self):
        return _populated(f"{self.path}/cgroup.events")

    def oom_kills(self):
        return _read_keyed(f"{self.path}/memory.events").get("oom_kill", 0)

    def usage(self):
        cpu = _read_keyed(f"{self.path}/cpu.stat")
        rbytes = wbytes = 0
        for line in _read_if_present(f"{self.path}/io.stat").splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            rbytes += int(fields.get("rbytes", 0))
            wbytes += int(fields.get("wbytes", 0))
        return {"cpu_seconds": cpu.get("usage_usec", 0) / 1e6,
                "memory_bytes": _read_int(f"{self.path}/memory.current"),
                "memory_peak_bytes": _read_int(f"{self.path}/memory.peak"),
                "io_read_bytes": rbytes, "io_write_bytes": wbytes,
                "tasks": _read_int(f"{self.path}/pids.current")}

    def remove(self):
        _rmdir_tree(self.path)

    def to_record(self):
        return {"v2": self.path}


class CgroupDriver:
    """Makes job cgroups under one parent per hierarchy. The only place that knows the version."""

    version = 0

    def setup(self): raise NotImplementedError
    def job(self, job_id): raise NotImplementedError
    def parent_dirs(self): raise NotImplementedError
    def _as_cgroup(self): raise NotImplementedError   # the parent itself, as one cgroup

    def from_record(self, job_id, record):
        """The job's cgroup where its record says it is (Cgroup.to_record), or where this
        driver would make it if the record says nothing this cgroup version can use."""
        validate_job_id(job_id)
        dirs = (record or {}).get("v2" if self.version == 2 else "v1")
        if not dirs or not all(_is_job_dir(d, job_id) for d in
                               (dirs.values() if isinstance(dirs, dict) else [dirs])):
            return self.job(job_id)
        if self.version == 2:
            return CgroupV2(dirs)
        unified = record.get("unified")
        return CgroupV1(dict(dirs), unified if _is_job_dir(unified, job_id) else None)

    def leftover_job_ids(self):
        """Ids of job cgroups found under the parent (jobs of an earlier server run)."""
        ids = set()
        for d in self.parent_dirs():
            try:
                ids.update(n for n in os.listdir(d) if _JOB_ID_RE.fullmatch(n))
            except FileNotFoundError:
                continue
        return sorted(ids)

    def remove_parent_if_empty(self):
        """Tidy up at a clean shutdown; a parent still holding cgroups stays."""
        for d in self.parent_dirs():
            try:
                os.rmdir(d)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("removing %s: %s", d, e.strerror)

    def remove_parent(self):
        """Kill every process anywhere below the parent and remove it all (tests, uninstall)."""
        whole = self._as_cgroup()
        whole.kill_all()
        whole.remove()

    def check(self):
        """[(ok, what, advice)] about this host for `doctor`: the controllers jobs need, and
        whether job cgroups can be made under the parent (a probe cgroup, removed again)."""
        out = self._check_controllers()
        probe = f"doctor-{os.getpid()}"
        made = [d for d in self.parent_dirs() if not os.path.exists(d)]
        try:
            for d in self.parent_dirs():
                os.makedirs(f"{d}/{probe}")
                os.rmdir(f"{d}/{probe}")
            out.append((True, f"job cgroup parent is writable: {', '.join(self.parent_dirs())}",
                        ""))
        except OSError as e:
            out.append((False, f"cannot create job cgroups under {e.filename}: {e.strerror}",
                        "run serve as root, with its cgroup delegated to it"))
        finally:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        return out

    def _check_controllers(self): raise NotImplementedError


def _is_job_dir(path, job_id):
    """Whether a recorded path is one job's cgroup directory below the cgroup mounts (a record
    is data from disk: it names no other directory to remove or signal)."""
    return (isinstance(path, str) and os.path.basename(path) == job_id
            and os.path.normpath(path) == path
            and path.startswith(CGROUP_ROOT + "/"))


class CgroupV1Driver(CgroupDriver):
    version = 1
    CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")

    def __init__(self, parents, unified_parent=None):
        self.parents = parents              # controller -> parent directory
        self.unified_parent = unified_parent

    def parent_dirs(self):
        dirs = list(self.parents.values()) + ([self.unified_parent] if self.unified_parent else [])
        return list(dict.fromkeys(dirs))

    def _as_cgroup(self):
        return CgroupV1(dict(self.parents), self.unified_parent)

    def setup(self):
        for d in self.parent_dirs():
            os.makedirs(d, exist_ok=True)
        # memory.use_hierarchy is 1 by default since 5.x; on older kernels the oom counter and
        # limits would not cover sub-cgroups a job makes.

    def _check_controllers(self):
        missing = [c for c in self.CONTROLLERS if c not in self.parents]
        return [(not missing, f"cgroup v1 (hybrid: {'yes' if self.unified_parent else 'no'}); "
                 f"controllers {' '.join(sorted(self.parents))}",
                 f"mount the missing v1 controllers: {' '.join(missing)}" if missing else "")]

    def job(self, job_id):
        validate_job_id(job_id)
        return CgroupV1({c: f"{p}/{job_id}" for c, p in self.parents.items()},
                        f"{self.unified_parent}/{job_id}" if self.unified_parent else None)


class CgroupV2Driver(CgroupDriver):
    version = 2
    CONTROLLERS = ("cpu", "memory", "io", "pids")

    def __init__(self, own, parent_rel, server_leaf="server"):
        if os.path.basename(own) == server_leaf:
            # Started in the leaf an earlier server moved itself into (a restart under live
            # restore: the cgroup above it hands out controllers, so it can take no process;
            # systemd's DelegateSubgroup=server does this too): the layout is the same.
            own = os.path.dirname(own)
        self.own = own                               # the server's own cgroup directory
        self.parent = os.path.join(own, parent_rel)
        self.server_leaf = server_leaf

    def parent_dirs(self):
        return [self.parent]

    def _as_cgroup(self):
        return CgroupV2(self.parent)

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

    def _check_controllers(self):
        have = _read(f"{self.own}/cgroup.controllers").split()
        missing = [c for c in self.CONTROLLERS if c not in have]
        return [(not missing, f"cgroup v2; controllers available to {self.own}: {' '.join(have)}",
                 "delegate them to the server (systemd: Delegate=yes)" if missing else "")]

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
# Logs
# ================================================================================================
# A job's output is one file, output.log, holding stdout and stderr bytes in the order they were
# read (like 2>&1), and an index, output.idx, of little-endian u64 records (offset << 1 | is_stderr)
# marking where the stream changes. Offsets are positions in output.log: a follower resumes from
# any offset, and a single-stream log is streamed with large reads. Readers take the index from
# the file, so memory does not grow with the number of stream changes.

_MARKER = "\n[jobworker: output cap of {} bytes reached; further output dropped]\n"
_IDX_REC = 8
LOG_FILE, INDEX_FILE = "output.log", "output.idx"


class LogWriter:
    """Appends one job's output to its files (one writer, no lock). After each append `size`,
    `records` (index entries), `truncated` and `error` say exactly what is on disk: a partial
    write is counted, and past the cap a marker is stored once and the rest dropped; after a
    write error (disk full) the rest is dropped and `error` says why."""

    _CREATE = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    _RESUME = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

    def __init__(self, directory, cap, resume=False):
        self.dir = directory
        self.cap = cap
        self._marker = _MARKER.format(cap).encode()
        flags = self._RESUME if resume else self._CREATE
        self._data_fd = os.open(f"{directory}/{LOG_FILE}", flags, 0o600)
        try:   # both exist from the start: a follower opens them before any output
            self._idx_fd = os.open(f"{directory}/{INDEX_FILE}", flags, 0o600)
        except OSError:
            os.close(self._data_fd)
            raise
        self.size = self.records = 0
        self.truncated, self.error = False, ""
        self._last_stream = None
        if resume:   # go on where the files end (another launcher wrote them)
            self.size = os.fstat(self._data_fd).st_size
            idx_size = os.fstat(self._idx_fd).st_size
            self.records = idx_size // _IDX_REC
            os.ftruncate(self._idx_fd, self.records * _IDX_REC)   # a torn last record goes
            if self.records:
                self._last_stream = _read_records(self._idx_fd, self.records - 1, 1)[0][1]
            self.truncated = self.size >= len(self._marker) and os.pread(
                self._data_fd, len(self._marker), self.size - len(self._marker)) == self._marker

    def _write_all(self, fd, data):
        """Write everything; returns the bytes written before an error, with the error."""
        view, done = memoryview(data), 0
        while done < len(view):
            try:
                done += os.write(fd, view[done:])
            except OSError as e:
                return done, e
        return done, None

    def _store(self, stream, data):
        if stream != self._last_stream:
            rec = (self.size << 1 | (stream == STDERR)).to_bytes(_IDX_REC, "little")
            n, err = self._write_all(self._idx_fd, rec)
            if err or n != _IDX_REC:
                # a torn record is not counted; readers go by `records`
                raise err or OSError(errno.EIO, "short index write")
            self.records += 1
            self._last_stream = stream
        n, err = self._write_all(self._data_fd, data)
        self.size += n
        if err:
            raise err

    def append(self, stream, data):
        """Store data of one stream. Returns False once nothing more will be stored."""
        if self.truncated or self.error:
            return False
        try:
            room = (self.cap - self.size - _IDX_REC * self.records - len(self._marker)
                    - 2 * _IDX_REC)
            if len(data) > room:
                if room > 0:
                    self._store(stream, data[:room])
                self._store(STDERR, self._marker)
                self.truncated = True
            else:
                self._store(stream, data)
        except OSError as e:
            self.error = f"output write failed: {e.strerror}"
            log.error("job log %s: %s", self.dir, self.error)
        return not (self.truncated or self.error)

    def close(self):
        for fd in (self._data_fd, self._idx_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._idx_fd = None


def index_records(directory):
    """Complete index records on disk (a crash may leave a torn last one)."""
    try:
        return os.path.getsize(f"{directory}/{INDEX_FILE}") // _IDX_REC
    except FileNotFoundError:
        return 0


def output_size(directory):
    """Bytes of output on disk."""
    try:
        return os.path.getsize(f"{directory}/{LOG_FILE}")
    except FileNotFoundError:
        return 0


def _read_records(idx_fd, first, count):
    """[(offset, stream)] of index records first .. first+count-1."""
    raw = os.pread(idx_fd, count * _IDX_REC, first * _IDX_REC)
    recs = array.array("Q")
    recs.frombytes(raw[:len(raw) - len(raw) % _IDX_REC])
    if sys.byteorder != "little":
        recs.byteswap()
    return [(r >> 1, STDERR if r & 1 else STDOUT) for r in recs]


def read_segments(idx_fd, records, offset, end, batch=4096):
    """[(stream, start, stop)] covering offset..end, split where the stream changes, from the
    first `records` entries of the index file open at idx_fd."""
    if records == 0 or offset >= end:
        return []
    lo, hi = 0, records - 1          # the last record at or before `offset`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _read_records(idx_fd, mid, 1)[0][0] <= offset:
            lo = mid
        else:
            hi = mid - 1
    out, i = [], lo
    while offset < end and i < records:
        recs = _read_records(idx_fd, i, min(batch, records - i) + (i + batch < records))
        for k, (_, stream) in enumerate(recs[:batch]):
            nxt = recs[k + 1][0] if k + 1 < len(recs) else end
            stop = min(nxt, end)
            if stop > offset:
                out.append((stream, offset, stop))
                offset = stop
            if offset >= end:
                break
        i += batch
    return out


@dataclasses.dataclass
class Chunk:
    """Output of one stream: data starting at offset in the job's output (both streams)."""
    stream: int
    offset: int
    data: bytes


# ================================================================================================
# Launcher: the only place that forks a job
# ================================================================================================
# gRPC's C core is not fork-safe: forking a process that runs gRPC threads can hang in its fork
# handlers or corrupt other clients' TLS streams. So jobs are forked by a small single-threaded
# launcher process, started by exec (not fork) so it carries no thread or lock of the server.
#
# The launcher is also what lets jobs outlive the server (live restore): one per state dir,
# in its own session, it holds each job's stdout and stderr pipes and writes them into the
# job's log files itself, reaps the jobs (it is their parent, and a child subreaper for
# what they leave), and listens on <state_dir>/launcher.sock. A server connects, says hello
# (the protocol version must match), learns every job the launcher holds, and from then on
# sends spawn requests and receives spawn replies, output progress, end of output and exits.
# When the server goes away, the launcher goes on (live restore) or stops every job and exits.
# The server keeps a duplicate of each pipe's read end and a pidfd of each job's main process:
# if the launcher dies, the jobs do not get SIGPIPE, and a new launcher is started and given
# the pipes to drain while the server (a child subreaper too) learns the exits itself.
#
# Frames are length-prefixed JSON over a Unix stream socket; fds travel with SCM_RIGHTS. Exec
# failures come back from the child over a close-on-exec pipe as "stage:errno:message", as
# CPython's subprocess does it.

PR_SET_CHILD_SUBREAPER = 36
LAUNCHER_TIMEOUT = 5.0         # seconds the launcher may take to answer; then it is replaced
LAUNCHER_PING_INTERVAL = 2.0   # seconds between the server's checks that it answers
LAUNCHER_SOCKET, LAUNCHER_LOCK = "launcher.sock", "launcher.lock"
_READ_SIZE = 1 << 20

# -- the launcher protocol ----------------------------------------------------------------------
# Every message is a JSON object with an "op". A field a peer may ignore can be added freely
# (to SpawnRequest: named in its IGNORABLE); a new op, or a field a peer must understand,
# bumps LAUNCHER_PROTOCOL (and the fingerprint test_jobworker.py keeps of the ops and of
# SpawnRequest's fields): a server refuses a launcher of another version, touching nothing
# (exit 11), so an upgrade that needs no bump keeps the jobs running.
LAUNCHER_PROTOCOL = 3

# the server's requests                  # what goes with them
OP_HELLO = "hello"                       # version, build, live_restore; first, once
OP_SPAWN = "spawn"                       # a SpawnRequest; fds as STDIO_FDS[its stdio] says
OP_TAKE_OVER = "take_over"               # job, dir, cap, fds (names): the pipes of a job of a
                                         # dead launcher, to drain from where its log ends
OP_FORGET = "forget"                     # job: its final record is saved; close its files
OP_CLOSE_INPUT = "close_input"           # job: close the write end of its stdin pipe (EOF)
OP_PING = "ping"                         # answered by OP_PONG
OP_BYE = "bye"                           # stop every job and exit
# the launcher's messages
OP_JOB = "job"                           # after OP_HELLO, one per job held (launcher_job_state
                                         # fields; fds: "pid", "out", "err", "in" as named in
                                         # fds; a terminal's master is its "out")
OP_READY = "ready"                       # after the OP_JOBs
OP_SPAWNED = "spawned"                   # seq, pid (fds: its pidfd), or seq, error (a SPAWN_*
                                         # kind), errno, detail
OP_OUTPUT = "out"                        # a job's output on disk now (launcher_job_state)
OP_EOF = "eof"                           # ... and both its pipes are at their end
OP_EXIT = "exit"                         # job, status (raw wait status), at
OP_PONG = "pong"
SERVER_OPS = (OP_HELLO, OP_SPAWN, OP_TAKE_OVER, OP_FORGET, OP_CLOSE_INPUT, OP_PING, OP_BYE)
LAUNCHER_OPS = (OP_JOB, OP_READY, OP_SPAWNED, OP_OUTPUT, OP_EOF, OP_EXIT, OP_PONG)

# Where a spawn failed (OP_SPAWNED's "error"): the child's steps before exec, in order, and
# the launcher's own. spawn_error() turns each into the library's error, in one table.
SPAWN_CGROUP, SPAWN_NAMESPACE, SPAWN_SETSID, SPAWN_STDIO = "cgroup", "namespace", "setsid", "stdio"
SPAWN_RLIMIT, SPAWN_SIGNALS, SPAWN_SETUID, SPAWN_CHDIR = "rlimit", "signals", "setuid", "chdir"
SPAWN_EXEC = "exec"
SPAWN_FDS = "fds"            # the launcher is at its open-files limit
SPAWN_OUTPUT = "output"      # the job's log files could not be made
SPAWN_FORK = "fork"
SPAWN_LAUNCHER = "launcher"  # (the server's) the launcher went away before it answered


@dataclasses.dataclass
class SpawnRequest:
    """OP_SPAWN: what the launcher needs to make one job's process."""
    job: str                 # the job's id
    dir: str                 # its directory: the log files go there
    cap: int                 # bytes of output kept
    argv: list
    env: dict
    cwd: str
    procs: list              # the files by which the child joins its cgroups (Cgroup's)
    hide: list = dataclasses.field(default_factory=list)   # paths covered in its mount ns
    empty_file: str = ""     # what covers a hidden file
    nofile: list = None      # its RLIMIT_NOFILE (soft, hard); None: the launcher's
    uid: int = None          # None: root
    gid: int = None
    stdio: str = STDIN_NULL  # STDIN_MODES: what its stdin is (and the fds that come along)
    seq: int = 0             # the server's number for the reply
    into: str = ""           # Cgroup.clone_into (a launcher that ignores it joins it by procs)
    # fields a launcher of this protocol may not know, and serves right without
    IGNORABLE: typing.ClassVar = ("into",)

    def encode(self):
        return dict(dataclasses.asdict(self), op=OP_SPAWN)

    @classmethod
    def decode(cls, msg):
        return cls(**{f.name: msg[f.name] for f in dataclasses.fields(cls) if f.name in msg})


# The fds an OP_SPAWN carries, by its stdio: the job's ends of its pipes (or the terminal's
# slave), then the ends the launcher keeps (the terminal's master is its output and input).
STDIO_FDS = {
    STDIN_NULL: ("out_w", "err_w", "out_r", "err_r"),
    STDIN_PIPE: ("out_w", "err_w", "out_r", "err_r", "in_r", "in_w"),
    STDIN_TTY: ("slave", "master"),
}
assert set(STDIO_FDS) == set(STDIN_MODES)


def spawn_error(request, reply):
    """The error for a spawn the launcher reported as failed (OP_SPAWNED with "error")."""
    kind, err, detail = reply.get("error"), reply.get("errno") or 0, reply.get("detail", "")
    program = request.argv[0]
    if kind == SPAWN_EXEC:
        return ProgramNotRunnable(program, err)
    if kind == SPAWN_CHDIR:
        return InvalidArgument("workdir", request.cwd, f"{os.strerror(err)} (as the job's user)")
    if kind == SPAWN_FDS:
        return CapReached("open files of the job launcher", "RLIMIT_NOFILE")
    if kind == SPAWN_LAUNCHER:
        return LauncherError("the job launcher exited while starting the job; what it had "
                             "started was ended")
    return SpawnError(program, err, kind or "spawn", detail)


_FRAME = struct.Struct("!I")


def _frame(obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _FRAME.pack(len(body)) + body


def _send_msg(sock, obj, fds=()):
    data = _frame(obj)
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


def _recv_msg(sock, maxfds=8):
    """-> (obj, fds). Raises EOFError when the peer has gone."""
    head, fds, _, _ = socket.recv_fds(sock, _FRAME.size, maxfds)
    if not head:
        raise EOFError("launcher socket closed")
    head += _recv_exact(sock, _FRAME.size - len(head))
    (size,) = _FRAME.unpack(head)
    return json.loads(_recv_exact(sock, size)), fds


CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 32, 4096, 0x4000, 1 << 19
PR_SET_NO_NEW_PRIVS = 38


def _hide_paths(libc, paths, empty_file):
    """In a new mount namespace, put an empty read-only tmpfs over each directory in `paths`
    and an empty read-only file over each file (as systemd's InaccessiblePaths=). Mounts made
    here never propagate back to the host (the whole tree is made a slave first)."""
    import ctypes

    def check(rc, what):
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    check(libc.unshare(CLONE_NEWNS), "unshare")
    check(libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
    for path in sorted(paths, key=lambda p: os.path.isdir(p)):   # files first: the empty
        p = os.fsencode(path)                                     # file may be in a hidden dir
        if os.path.isdir(path):
            check(libc.mount(b"none", p, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                             b"size=4k,nr_inodes=1,mode=000"), f"hide {path}")
        elif os.path.exists(path):
            check(libc.mount(os.fsencode(empty_file), p, None, MS_BIND, None), f"hide {path}")
            check(libc.mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
                  f"hide {path}")


def _child_exec(req, exe, ignored, procs, stdio, ctty, err_pipe, libc):
    """In the forked child: join the cgroups (`procs`: each file's fd and what to write, None
    for its pid: see Cgroup.procs_files), hide the server's files, set up session and fds
    (`stdio`: what becomes 0, 1 and 2, None for /dev/null; `ctty`: a terminal slave that
    becomes the controlling terminal, or None), drop privileges, exec (`exe` if found before
    the fork, else a search as execvpe's). Never returns; a failure is reported on err_pipe
    as "SPAWN_kind:errno:message"."""
    stage = SPAWN_CGROUP
    try:
        pid = str(os.getpid()).encode()
        for fd, text in procs:
            os.write(fd, text or pid)
        if req.hide:
            stage = SPAWN_NAMESPACE
            _hide_paths(libc, req.hide, req.empty_file)
        stage = SPAWN_SETSID
        os.setsid()
        stage = SPAWN_STDIO
        signal.set_wakeup_fd(-1)
        _child_stdio(stdio, ctty, req.uid)
        # Only 0-2 survive; the error pipe is close-on-exec.
        os.closerange(3, err_pipe)
        os.closerange(err_pipe + 1, os.sysconf("SC_OPEN_MAX"))
        if req.nofile:   # the server's own limit was raised; the job's is not
            stage = SPAWN_RLIMIT
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, tuple(req.nofile))
        stage = SPAWN_SIGNALS
        # Ignored signals survive exec (handlers do not): Python ignores SIGPIPE and SIGXFSZ,
        # the launcher SIGINT. The launcher found the full set once at its start.
        for sig in ignored:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if req.uid is not None:
            # An unprivileged job: no supplementary groups, no capabilities (setuid away from
            # root clears them), and no way back up through setuid binaries.
            stage = SPAWN_SETUID
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(errno.EPERM, "PR_SET_NO_NEW_PRIVS")
            os.setgroups([])
            os.setgid(req.gid)
            os.setuid(req.uid)
        stage = SPAWN_CHDIR
        os.chdir(req.cwd)
        stage = SPAWN_EXEC
        if exe:
            try:
                os.execve(exe, req.argv, req.env)
            except OSError:
                pass   # the search below says why, as execvpe does
        os.execvpe(req.argv[0], req.argv, req.env)
    except BaseException as exc:  # anything at all: report it and leave without Python cleanup
        err = getattr(exc, "errno", None) or 0
        msg = getattr(exc, "strerror", None) or str(exc)
        try:
            os.write(err_pipe, f"{stage}:{err}:{msg}".encode("utf-8", "replace"))
        finally:
            os._exit(127)


def _child_stdio(stdio, ctty, uid):
    """In the forked child, a session leader now: its terminal (`ctty`, made its controlling
    terminal, and given to its user as a login's is) and its fds 0 to 2 (None: /dev/null)."""
    if ctty is not None:   # (a session leader's first terminal would do too; be explicit)
        fcntl.ioctl(ctty, termios.TIOCSCTTY, 0)
        if uid is not None:
            os.fchown(ctty, uid, -1)
    for target, fd in enumerate(stdio):
        os.dup2(os.open("/dev/null", os.O_RDONLY) if fd is None else fd, target)


def _fork(libc):
    """fork(2) without Python's fork hooks: os.fork() runs every os.register_at_fork() hook in
    the child (threading's and logging's re-create their locks in Python), which with this
    module imported doubles the time from fork to the child's first line (0.33 ms against
    0.85 ms here). Safe only as the launcher uses it: a single-threaded process holding no
    lock, whose child calls os, signal and ctypes functions before it execs or _exits.
    Returns the pid (0 in the child)."""
    import ctypes
    pid = libc.fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


SYS_CLONE3 = 435                   # on these machines (alpha's and mips' differ)
_CLONE3_MACHINES = ("x86_64", "aarch64", "i686", "armv7l", "armv8l", "ppc64le", "s390x",
                    "riscv64", "loongarch64")
CLONE_INTO_CGROUP = 0x200000000
_CLONE_ARGS_SIZE = 88              # struct clone_args up to its cgroup field (kernel 5.7)
# clone3's answers that mean it (or CLONE_INTO_CGROUP) is not there: an older kernel, or a
# seccomp filter (docker's says ENOSYS) -- the launcher forks from then on
_NO_CLONE_INTO = (errno.ENOSYS, errno.E2BIG)


def _clone_into(libc, cgroup_fd):
    """clone3(2) with CLONE_INTO_CGROUP: _fork(), the child created in the cgroup2 directory
    open as `cgroup_fd` (it never exists outside it, and no cgroup.procs write is needed).
    Safe where _fork is; glibc's own fork steps are skipped as well, so the child must not
    rely on its cached thread id (raise(), pthread mutex owners). Returns the pid (0 in the
    child); raises OSError as the kernel answered."""
    import ctypes
    args = (ctypes.c_uint64 * 11)()   # flags, pidfd, child_tid, parent_tid, exit_signal,
    args[0], args[4], args[10] = CLONE_INTO_CGROUP, signal.SIGCHLD, cgroup_fd   # ..., cgroup
    pid = libc.syscall(ctypes.c_long(SYS_CLONE3), args, ctypes.c_size_t(_CLONE_ARGS_SIZE))
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


def _first_on_path(file, env):
    """Where execvpe would find `file` on the default PATH, found before fork (in the child,
    every line of Python costs page faults): the first regular file with an x bit, or None
    to leave the search to the child. Only the default PATH's system directories are
    searched here: a PATH the caller gave may be long, or hold entries that mean something
    else to the job (relative ones, /proc/self/cwd), and a directory this process cannot
    read (NFS root_squash) may hold the file for the job's user."""
    import stat
    if os.sep in file or env.get("PATH") != JOB_PATH:
        return None
    for directory in JOB_PATH.split(":"):
        path = os.path.join(directory, file)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return path
    return None


def _ignored_mask(status="/proc/self/status"):
    """The set of signals this process ignores (SigIgn: in /proc), as numbers."""
    with open(status) as f:
        mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


def _ignored_signals():
    """Signals this process ignores (and Python can reset)."""
    return sorted(_ignored_mask() & set(signal.valid_signals()))


_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}


def _reset_reserved_signals(libc):
    """Ignored signals survive exec. Python's signal module can reset every signal but those
    glibc reserves for itself (32, 33), which a parent may still have ignored (GNU make does):
    reset those with the raw syscall, so jobs start with every disposition at its default."""
    import ctypes
    nr = _SYS_RT_SIGACTION.get(os.uname().machine)
    if nr is None:
        return
    act = (ctypes.c_ulong * 4)(0, 0, 0, 0)   # handler SIG_DFL, flags, restorer, mask
    for sig in sorted(_ignored_mask() - set(signal.valid_signals())):
        libc.syscall(nr, sig, ctypes.byref(act), None, 8)


FDS_PER_JOB = 6     # the launcher's per running job: two pipes (and stdin), log, index, pidfd
FD_RESERVE = 512    # for everything else: connections, the state dir, spawns in flight


def _initial_nofile():
    """RLIMIT_NOFILE as this process had it before it raised its own (raise_fd_limit)."""
    import resource
    return _INITIAL_NOFILE or resource.getrlimit(resource.RLIMIT_NOFILE)


_INITIAL_NOFILE = []


def raise_fd_limit():
    """Lift RLIMIT_NOFILE to what the kernel allows (root may raise the hard limit too): each
    running job holds a few fds in the server and in the launcher."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not _INITIAL_NOFILE:
        _INITIAL_NOFILE.extend((soft, hard))
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = hard
    for want in (max(ceiling, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (OSError, ValueError):
            continue
    return soft


def launcher_job_state(job_id, pid, wait_status, at, pipes_open, writer):
    """Where one job stands, as the launcher tells the server (OP_JOB, OP_OUTPUT, OP_EOF)."""
    return {"job": job_id, "pid": pid, "status": wait_status, "at": at,
            "eof": not pipes_open,
            "size": writer.size, "records": writer.records, "truncated": writer.truncated,
            "error": writer.error}


class LauncherJob:
    """A job as the launcher holds it: its log writer, the read ends of its pipes until their
    end, and how its main process ended once it is reaped."""

    __slots__ = ("id", "pid", "pidfd", "writer", "pipes", "stdin", "wait_status", "ended_at")

    def __init__(self, job_id, pid, pidfd, writer, pipes, stdin=None):
        self.id, self.pid, self.pidfd, self.writer = job_id, pid, pidfd, writer
        self.pipes = pipes            # read fd -> stream, until EOF
        self.stdin = stdin            # the write end of its stdin pipe, held (live restore)
        self.wait_status = None       # raw, once reaped (None: running, or not ours)
        self.ended_at = None

    def close_input(self):
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def state(self):
        return launcher_job_state(self.id, self.pid, self.wait_status, self.ended_at,
                                  bool(self.pipes), self.writer)

    def reaped(self, launcher, wait_status, at):
        del launcher.children[self.pid]
        launcher.ended(self, wait_status, at)


@dataclasses.dataclass
class PendingSpawn:
    """A forked child whose exec report (on its close-on-exec pipe) is not read yet."""
    request: SpawnRequest
    pid: int
    pidfd: int
    writer: LogWriter
    pipes: dict               # read fd -> stream
    stdin: int = None         # the write end of its stdin pipe
    report: bytes = b""
    wait_status: int = None   # reaped before its report was read
    at: float = None

    def reaped(self, launcher, wait_status, at):
        self.wait_status, self.at = wait_status, at


class LauncherProcess:
    """The launcher process's main loop (single-threaded, epoll)."""

    def __init__(self, state_dir, live_restore):
        self.state_dir = state_dir
        self.live_restore = live_restore
        self.jobs = {}            # job id -> LauncherJob
        self.children = {}        # pid -> LauncherJob or PendingSpawn (each knows its reaping)
        self.fd_owner = {}        # pipe read fd -> LauncherJob
        self.spawning = {}        # exec report fd -> PendingSpawn
        self.conn = None          # the server's connection
        self.outbox = []          # frames (bytes, fds) for the server, in order
        self.progress = {}        # job id -> LauncherJob with output not yet reported
        self.served = False       # a server has connected at least once
        self.greeted = False      # the connected server has said hello: frames may go to it
        # clone3 with CLONE_INTO_CGROUP may be tried (until the kernel says it has none)
        self.clone_into = os.uname().machine in _CLONE3_MACHINES
        self.ep = select.epoll()
        # what the server may ask, and whether the handler keeps the fds that came with it
        self.ops = {OP_HELLO: (self._hello, False), OP_SPAWN: (self._spawn, True),
                    OP_TAKE_OVER: (self._take_over, True), OP_FORGET: (self._forget, False),
                    OP_CLOSE_INPUT: (self._close_input, False), OP_PING: (self._ping, False),
                    OP_BYE: (self._bye, False)}
        assert set(self.ops) == set(SERVER_OPS)

    # -- setup and loop -----------------------------------------------------------------------

    def run(self, ready_fd):
        import ctypes
        import fcntl
        self.libc = libc = ctypes.CDLL(None, use_errno=True)
        # Orphaned daemons of a job are re-parented here and reaped, so none stays a zombie.
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _reset_reserved_signals(libc)
        for sig in (signal.SIGINT, signal.SIGHUP):   # meant for a server in a terminal
            signal.signal(sig, signal.SIG_IGN)
        raise_fd_limit()
        self.ignored = _ignored_signals()
        lock = os.open(os.path.join(self.state_dir, LAUNCHER_LOCK),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.write(ready_fd, b"another launcher holds this state dir\n")
            os._exit(1)
        path = os.path.join(self.state_dir, LAUNCHER_SOCKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)   # a dead launcher's; the lock says no launcher is alive
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(4)
        self.wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.ep.register(self.wake_r, select.EPOLLIN)
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
        deadline = time.monotonic() + 60   # the server that started it connects at once
        while True:
            for fd, events in self.ep.poll(None if self.served else 1.0):
                self._dispatch(fd, events)
            self._reap()
            self._flush()
            idle = self.conn is None and not self.jobs and not self.spawning
            if idle and (self.served or time.monotonic() > deadline):
                os._exit(0)   # nothing to keep and no server: the next server starts a new one

    def _dispatch(self, fd, events):
        if fd == self.wake_r:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 512):
                    pass
        elif fd == self.listener.fileno():
            self._accept()
        elif self.conn is not None and fd == self.conn.fileno():
            if events & select.EPOLLIN:
                self._from_server()
            elif events & (select.EPOLLHUP | select.EPOLLERR):
                self._server_gone()
            if self.conn is not None and events & select.EPOLLOUT:
                self._flush()
        elif fd in self.spawning:
            self._exec_report(fd)
        elif fd in self.fd_owner:
            self._drain(fd)

    def _accept(self):
        conn, _ = self.listener.accept()
        if self.conn is not None:
            conn.close()   # one server at a time (the server's own lock says there is one)
            return
        self.conn = conn
        self.served = True
        self.greeted = False   # nothing is sent before the reply to its hello
        self.ep.register(conn.fileno(), select.EPOLLIN)

    # -- the server's requests ----------------------------------------------------------------

    def _from_server(self):
        try:
            msg, fds = _recv_msg(self.conn)
        except (EOFError, OSError):
            self._server_gone()
            return
        handler, keeps_fds = self.ops.get(msg.get("op"), (None, False))
        try:
            if handler is not None:
                handler(msg, fds)
        finally:
            if not keeps_fds:
                for fd in fds:
                    _close_quietly(fd)

    def _hello(self, msg, fds):
        self._clear_outbox()
        self.greeted = True
        self._send({"op": OP_HELLO, "version": LAUNCHER_PROTOCOL, "pid": os.getpid(),
                    "build": __version__, "jobs": len(self.jobs)})
        if msg.get("version") != LAUNCHER_PROTOCOL:
            return   # the server refuses to go on; nothing of the jobs is handed out
        self.live_restore = bool(msg.get("live_restore", self.live_restore))
        for job in self.jobs.values():
            names, fds = [], []
            if job.wait_status is None and job.pidfd is not None:
                names.append("pid")
                fds.append(job.pidfd)
            for fd, stream in job.pipes.items():
                names.append("out" if stream == STDOUT else "err")
                fds.append(fd)
            if job.stdin is not None:
                names.append("in")
                fds.append(job.stdin)
            self._send(dict(job.state(), op=OP_JOB, fds=names), fds)
        self._send({"op": OP_READY})

    def _spawn(self, msg, fds):
        """Fork the job; its exec report is read by the loop (another spawn need not wait)."""
        req = SpawnRequest.decode(msg)
        reply = {"op": OP_SPAWNED, "seq": req.seq}
        names = STDIO_FDS.get(req.stdio, ())
        if len(fds) != len(names) or not names:
            # the kernel dropped some: this process is at its open-files limit
            for fd in fds:
                _close_quietly(fd)
            self._send(dict(reply, error=SPAWN_FDS, errno=errno.EMFILE,
                            detail="the launcher is at its open-files limit"))
            return
        fd = dict(zip(names, fds))
        if req.stdio == STDIN_TTY:   # 0, 1 and 2 the terminal; its master the output
            stdio, ctty, theirs = (fd["slave"],) * 3, fd["slave"], [fd["slave"]]
            pipes, stdin = {fd["master"]: STDOUT}, None
        else:
            stdio, ctty = (fd.get("in_r"), fd["out_w"], fd["err_w"]), None
            theirs = [fd["out_w"], fd["err_w"]] + ([fd["in_r"]] if "in_r" in fd else [])
            pipes, stdin = {fd["out_r"]: STDOUT, fd["err_r"]: STDERR}, fd.get("in_w")
        try:
            writer = LogWriter(req.dir, req.cap)
        except OSError as e:
            for fd in fds:
                _close_quietly(fd)
            self._send(dict(reply, error=SPAWN_OUTPUT, errno=e.errno, detail=e.strerror))
            return
        # What can be done before fork is: in the child every line of Python costs page faults.
        report_r = report_w = into = None
        procs, stage = [], SPAWN_CGROUP
        try:
            for path in req.procs:   # (Cgroup.procs_files says what the child writes)
                try:
                    procs.append((os.open(path, os.O_WRONLY | os.O_CLOEXEC),
                                  b"0" if path.endswith("/tasks") else None))
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        stage = SPAWN_FDS   # as when the kernel drops fds sent to us
                    raise
            if req.into and self.clone_into:
                into = os.open(req.into, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                born_in = [p for p, path in zip(procs, req.procs)   # (its cgroup.procs is
                           if path != f"{req.into}/cgroup.procs"]   # not written)
            stage = SPAWN_FORK
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            exe = _first_on_path(req.argv[0], req.env)
            pid, cloned = self._fork_into(into)
        except OSError as e:
            for fd in (*fds, *(fd for fd, _ in procs), into, report_r, report_w):
                if fd is not None:
                    _close_quietly(fd)
            writer.close()
            self._send(dict(reply, error=stage, errno=e.errno, detail=e.strerror))
            return
        if pid == 0:
            _child_exec(req, exe, self.ignored, born_in if cloned else procs, stdio, ctty,
                        report_w, self.libc)
        for fd in (*theirs, report_w, *(fd for fd, _ in procs),
                   *([into] if into is not None else [])):
            os.close(fd)
        pidfd = os.pidfd_open(pid)   # before any reaping: the pid cannot be reused yet
        pending = PendingSpawn(req, pid, pidfd, writer, pipes, stdin)
        self.spawning[report_r] = pending
        self.children[pid] = pending
        self.ep.register(report_r, select.EPOLLIN)

    def _fork_into(self, into):
        """(pid, whether the child was created in the cgroup open as `into`): by clone3 where
        the kernel can, else by fork (the child then joins it by its cgroup.procs)."""
        if into is not None:
            try:
                return _clone_into(self.libc, into), True
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ENOMEM):
                    raise
                # (any other answer: fork, and the child's write says what is wrong, if
                # anything is)
                self.clone_into = e.errno not in _NO_CLONE_INTO
        return _fork(self.libc), False

    def _exec_report(self, fd):
        pending = self.spawning[fd]
        chunk = os.read(fd, 4096)
        if chunk:
            pending.report += chunk
            return
        # EOF: exec succeeded (close-on-exec) or the child reported why it could not
        self.ep.unregister(fd)
        os.close(fd)
        del self.spawning[fd]
        reply = {"op": OP_SPAWNED, "seq": pending.request.seq}
        if pending.report:
            stage, err, detail = pending.report.decode("utf-8", "replace").split(":", 2)
            if pending.wait_status is None:
                os.waitpid(pending.pid, 0)   # it is exiting with 127
            self.children.pop(pending.pid, None)
            os.close(pending.pidfd)
            for r in pending.pipes:
                os.close(r)
            if pending.stdin is not None:
                os.close(pending.stdin)
            pending.writer.close()
            self._send(dict(reply, error=stage, errno=int(err), detail=detail))
            return
        job = LauncherJob(pending.request.job, pending.pid, pending.pidfd, pending.writer, {},
                          pending.stdin)
        self.jobs[job.id] = job
        self.children[job.pid] = job
        self._watch(job, pending.pipes)
        self._send(dict(reply, pid=job.pid), [job.pidfd])
        if pending.wait_status is not None:   # it ended before its report was read
            self.ended(job, pending.wait_status, pending.at)

    def _take_over(self, msg, fds):
        """Drain the pipes of a job a dead launcher spawned (not our child: the server, a
        child subreaper, learns its exit). Its log is continued where the files end."""
        named = dict(zip(msg.get("fds", []), fds))
        writer = LogWriter(msg["dir"], msg["cap"], resume=True)
        job = LauncherJob(msg["job"], None, None, writer, {}, named.pop("in", None))
        self.jobs[job.id] = job
        self._watch(job, {fd: STDOUT if name == "out" else STDERR
                          for name, fd in named.items()})
        if not job.pipes:
            self._eof(job)

    def _forget(self, msg, fds):
        job = self.jobs.pop(msg["job"], None)
        if job is None:
            return
        for fd in list(job.pipes):
            self._unwatch(job, fd)
        job.close_input()
        job.writer.close()
        if job.pidfd is not None:
            os.close(job.pidfd)
        if job.pid is not None and self.children.get(job.pid) is job:
            del self.children[job.pid]
        self.progress.pop(job.id, None)

    def _close_input(self, msg, fds):
        job = self.jobs.get(msg.get("job"))
        if job is not None:
            job.close_input()

    def _ping(self, msg, fds):
        self._send({"op": OP_PONG})

    def _bye(self, msg, fds):
        self._stop_all_and_exit()

    def _stop_all_and_exit(self):
        for job in self.jobs.values():
            if job.pid is not None and job.wait_status is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.pid, signal.SIGKILL)
        os._exit(0)

    def _server_gone(self):
        self.ep.unregister(self.conn.fileno())
        self.conn.close()
        self.conn = None
        self._clear_outbox()
        if not self.live_restore:
            self._stop_all_and_exit()
        # live restore: every job goes on; the next server's hello learns where each stands

    # -- jobs ---------------------------------------------------------------------------------

    def _watch(self, job, pipes):
        for fd, stream in pipes.items():
            os.set_blocking(fd, False)
            job.pipes[fd] = stream
            self.fd_owner[fd] = job
            self.ep.register(fd, select.EPOLLIN)

    def _unwatch(self, job, fd):
        self.ep.unregister(fd)
        os.close(fd)
        del job.pipes[fd]
        del self.fd_owner[fd]

    def _drain(self, fd):
        job = self.fd_owner[fd]
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:   # a terminal's master once no process holds its slave
            if e.errno != errno.EIO:
                raise
            data = b""
        if data:
            job.writer.append(job.pipes[fd], data)
            self.progress[job.id] = job
            return
        self._unwatch(job, fd)
        if not job.pipes:
            self._eof(job)

    def _eof(self, job):
        job.writer.close()
        self.progress.pop(job.id, None)
        self._send(dict(job.state(), op=OP_EOF))

    def _reap(self):
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self.children.get(pid)
            if entry is not None:
                entry.reaped(self, wait_status, time.time())
            # others are orphans re-parented to us (we are a subreaper): reaped, nothing to say

    def ended(self, job, wait_status, at):
        job.wait_status, job.ended_at = wait_status, at
        if job.pidfd is not None:
            os.close(job.pidfd)
            job.pidfd = None
        self._send({"op": OP_EXIT, "job": job.id, "status": wait_status, "at": at})

    # -- to the server ------------------------------------------------------------------------

    def _send(self, obj, fds=()):
        """Queue a frame with copies of fds (the originals stay ours: a job's pidfd may be
        closed before the frame carrying it has left)."""
        if self.conn is not None and self.greeted:
            self.outbox.append([_frame(obj), [os.dup(fd) for fd in fds]])

    def _clear_outbox(self):
        for _, fds in self.outbox:
            for fd in fds:
                os.close(fd)
        self.outbox.clear()
        self.progress.clear()

    def _flush(self):
        """Send what can be sent without blocking; the rest waits for EPOLLOUT. Output
        progress is sent last and coalesced: one frame per job however much was written."""
        if self.conn is None or not self.greeted:
            return
        for job in self.progress.values():
            self.outbox.append([_frame(dict(job.state(), op=OP_OUTPUT)), []])
        self.progress.clear()
        try:
            while self.outbox:
                data, fds = self.outbox[0]
                if fds:
                    n = socket.send_fds(self.conn, [data], fds, socket.MSG_DONTWAIT)
                    for fd in fds:   # sent with the frame's first byte
                        os.close(fd)
                    self.outbox[0][1] = []
                else:
                    n = self.conn.send(data, socket.MSG_DONTWAIT)
                if n < len(data):
                    self.outbox[0][0] = data[n:]
                    break
                self.outbox.pop(0)
        except BlockingIOError:
            pass
        except OSError:
            self._server_gone()
            return
        self.ep.modify(self.conn.fileno(),
                       select.EPOLLIN | (select.EPOLLOUT if self.outbox else 0))


# zipapp_main.IN_USE: in a pyz build's dir, the file every process running from it holds a
# shared flock on, so the pyz's cache does not remove the build from under it
PYZ_IN_USE = ".in-use"
_held_build = []   # the launcher's fd of it, for as long as the launcher runs


def build_lock(directory):
    """An fd holding a shared flock on the in-use file of `directory` if it is a pyz build,
    else None. Taken by the server for the launcher it starts (given with pass_fds), which
    outlives it across an upgrade: while the server holds its own, the build cannot go in
    between."""
    import fcntl
    try:
        fd = os.open(os.path.join(directory, PYZ_IN_USE), os.O_RDONLY)
    except OSError:
        return None   # a source tree: nothing to hold
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)   # no locks on this filesystem: the cache keeps what it cannot lock
        return None
    return fd


def launcher_main(state_dir, live_restore, ready_fd, build_fd=None):
    """Entry point of the launcher process; never returns. `build_fd`: see build_lock (kept
    open for as long as the launcher runs)."""
    if build_fd is not None:
        _held_build.append(build_fd)
    try:
        LauncherProcess(state_dir, live_restore).run(ready_fd)
    except BaseException as e:   # a failure to start is said to the server waiting for it
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"launcher failed: {type(e).__name__}: {e}\n".encode())
        raise


class _SpawnWaiter:
    """A Start waiting for the launcher's OP_SPAWNED: the reply and the pidfd it carries."""

    __slots__ = ("done", "reply", "fds")

    def __init__(self):
        self.done, self.reply, self.fds = threading.Event(), None, []

    def answer(self, reply, fds):
        self.reply, self.fds = reply, fds
        self.done.set()


class LauncherClient:
    """The server's side of the launcher: connects to the one of this state dir (or starts
    one), says hello, sends requests (spawn, take_over, forget, ping) and matches replies to
    them; what the launcher says on its own goes to `events` (on_output(job_id, state, eof),
    on_exit(job_id, raw_status, at), on_gone()). spawn() may be called from any thread;
    on_readable() runs on the engine thread, which watches fileno()."""

    def __init__(self, state_dir, events, live_restore=True):
        self.state_dir = state_dir
        self.events = events
        self.live_restore = live_restore
        self.process = None       # the launcher we started, if we did (we reap it)
        self.started = False      # connect() started it: none ran for this state dir
        self.pid = None
        self.sock = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._seq = 0
        self._pending = {}        # seq -> waiter of a spawn request not yet answered
        self._gone = True
        self._pidfd = None
        self._ping_sent = None    # monotonic time of the ping not answered yet
        self.ops = {OP_OUTPUT: self._output, OP_EOF: self._output, OP_EXIT: self._exit,
                    OP_SPAWNED: self._spawned, OP_PONG: self._pong}

    def connect(self):
        """Connect to the state dir's launcher, starting one if none runs; returns the jobs
        it holds: [(state dict, {fd name: fd})]. LauncherError if it cannot be had."""
        path = os.path.join(self.state_dir, LAUNCHER_SOCKET)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(LAUNCHER_TIMEOUT)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            self._start()
            self.started = True
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(LAUNCHER_TIMEOUT)
            sock.connect(path)
        try:
            _send_msg(sock, {"op": OP_HELLO, "version": LAUNCHER_PROTOCOL, "build": __version__,
                             "live_restore": self.live_restore})
            hello, _ = _recv_msg(sock)
            if hello.get("version") != LAUNCHER_PROTOCOL:
                raise LauncherMismatch(hello.get("pid"), hello.get("version"),
                                       hello.get("jobs", 0))
            jobs = []
            while True:
                msg, fds = _recv_msg(sock, maxfds=4)
                if msg.get("op") == OP_READY:
                    break
                jobs.append((msg, dict(zip(msg.pop("fds", []), fds))))
        except (EOFError, OSError) as e:
            sock.close()
            raise LauncherError(f"the job launcher did not answer: {e}") from None
        except BaseException:
            sock.close()
            raise
        # its pid as the kernel says it, held as a pidfd: the launcher is signalled, never a
        # process that took its pid
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  12))[0]
        self.sock, self.pid, self._gone = sock, pid, False
        self._pidfd = os.pidfd_open(pid)
        sock.settimeout(LAUNCHER_TIMEOUT)   # a stopped launcher fails a call, never hangs it
        return jobs

    def _start(self):
        import subprocess
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        root = os.path.dirname(os.path.abspath(__file__))   # a directory, or the .pyz itself
        build = build_lock(root)
        code = (f"import sys; sys.path.insert(0, {root!r}); import jobworker; "
                f"jobworker.launcher_main({self.state_dir!r}, {self.live_restore!r}, "
                f"{ready_w}, {build})")
        try:
            # Its own session: a Ctrl-C or hangup meant for the server is not meant for it.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code],
                pass_fds=[ready_w] + ([build] if build is not None else []),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
                start_new_session=True)
        finally:
            os.close(ready_w)
            if build is not None:
                os.close(build)   # the launcher's now
        with os.fdopen(ready_r, "rb") as f:
            answer = f.readline().decode(errors="replace").strip()
        if answer != "ok":
            self.process.wait()
            raise LauncherError(answer or "the job launcher exited at start")

    def fileno(self):
        return self.sock.fileno()

    @property
    def alive(self):
        """Connected, and the launcher has not gone."""
        return self.sock is not None and not self._gone

    def _request(self, obj, fds=()):
        try:
            with self._send_lock:
                if self.sock is None:
                    raise OSError(errno.EPIPE, "closed")
                _send_msg(self.sock, obj, fds)
        except OSError:
            raise LauncherError("the job launcher process has exited") from None

    def spawn(self, req, fds):
        """Fork and exec a job as the SpawnRequest says; fds: its stdout and stderr write ends
        and the launcher's copies of their read ends. Returns (pid, pidfd) once the program
        runs. Raises what spawn_error() makes of the launcher's report, or LauncherError."""
        waiter = _SpawnWaiter()
        with self._lock:
            if self._gone:
                raise LauncherError("the job launcher process has exited")
            self._seq += 1
            req.seq = self._seq
            self._pending[req.seq] = waiter
        try:
            self._request(req.encode(), fds)
        except LauncherError:
            with self._lock:
                self._pending.pop(req.seq, None)
            raise
        if not waiter.done.wait(LAUNCHER_TIMEOUT):
            with self._lock:
                self._pending.pop(req.seq, None)
            self.unresponsive(f"it did not answer a spawn request within {LAUNCHER_TIMEOUT:g}s")
            raise LauncherError(f"the job launcher did not answer within {LAUNCHER_TIMEOUT:g}s;"
                                " it is being replaced: try again")
        if "pid" not in waiter.reply:
            raise spawn_error(req, waiter.reply)
        return waiter.reply["pid"], waiter.fds[0]

    def take_over(self, job_id, directory, cap, pipes):
        """Give the launcher the pipes of a running job to drain ({"out": fd, "err": fd})."""
        names = list(pipes)
        self._request({"op": OP_TAKE_OVER, "job": job_id, "dir": directory, "cap": cap,
                       "fds": names}, [pipes[n] for n in names])

    def forget(self, job_id):
        with contextlib.suppress(LauncherError):
            self._request({"op": OP_FORGET, "job": job_id})

    def close_input(self, job_id):
        with contextlib.suppress(LauncherError):
            self._request({"op": OP_CLOSE_INPUT, "job": job_id})

    def on_readable(self):
        """Engine thread: handle one message. Returns False once the launcher has gone."""
        try:
            msg, fds = _recv_msg(self.sock)
        except (EOFError, OSError):
            self._lost()
            return False
        handler = self.ops.get(msg.get("op"))
        if handler is not None:
            fds = handler(msg, fds)
        for fd in fds or ():   # only a spawn reply carries an fd (the job's pidfd)
            _close_quietly(fd)
        return True

    # the launcher's messages: each handler returns the fds it did not keep

    def _output(self, msg, fds):
        self.events.on_output(msg["job"], msg, msg["op"] == OP_EOF)
        return fds

    def _exit(self, msg, fds):
        self.events.on_exit(msg["job"], msg["status"], msg["at"])
        return fds

    def _spawned(self, msg, fds):
        with self._lock:
            waiter = self._pending.pop(msg["seq"], None)
        if waiter is None:   # its Start gave up waiting (and the launcher is being ended)
            return fds
        waiter.answer(msg, fds)
        return ()

    def _pong(self, msg, fds):
        self._ping_sent = None
        return fds

    def ping(self):
        """Engine thread: ask the launcher whether it answers; one that left the last ping
        unanswered for LAUNCHER_TIMEOUT is ended (and replaced, as a dead one is)."""
        if self._gone:
            return
        if self._ping_sent is not None:
            if time.monotonic() - self._ping_sent > LAUNCHER_TIMEOUT:
                self.unresponsive(f"it did not answer for {LAUNCHER_TIMEOUT:g}s")
            return
        self._ping_sent = time.monotonic()
        with contextlib.suppress(LauncherError):
            self._request({"op": OP_PING})

    def unresponsive(self, why):
        """The launcher is alive but does not answer (stopped, or stuck): end it. Its jobs go
        on (the server holds their pipes and pidfds); its end is handled as a death."""
        if self._gone:
            return
        log.error("the job launcher (pid %s) is being ended: %s", self.pid, why)
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _lost(self):
        with self._lock:
            if self._gone:
                return
            self._gone = True
            pending, self._pending = list(self._pending.values()), {}
        for waiter in pending:
            waiter.answer({"error": SPAWN_LAUNCHER, "errno": errno.EPIPE}, [])
        self._end_process()
        self.events.on_gone()

    def _end_process(self):
        """The connection is gone: make sure the launcher is too (one that closed it while
        alive is not trusted with jobs any more; ours is reaped, no zombie stays)."""
        import subprocess
        if self.process is not None:
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def detach(self):
        """Leave the launcher running with its jobs (live restore)."""
        self._close_socket()

    def close(self):
        """After the launcher is gone: what this side held of it."""
        self._close_socket()

    def bye(self):
        """The server stops: the launcher ends whatever still runs, and exits."""
        import subprocess
        with contextlib.suppress(LauncherError):
            self._request({"op": OP_BYE})
        self._close_socket()
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _close_socket(self):
        if self._pidfd is not None:
            _close_quietly(self._pidfd)
            self._pidfd = None
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None


class HeldJob(typing.NamedTuple):
    """A running job as its launcher's supervisor needs it when that launcher dies."""
    id: str
    directory: str      # where its output files are
    pid: int            # its main process
    pidfd: int          # ... as a pidfd; None once that has ended
    pipes: dict         # "out"/"err" -> the server's copy of the pipe's read end
    draining: bool      # its output is not all read yet
    pids: typing.Callable   # -> the pids in its cgroup now
    input_copy: typing.Callable = lambda: None   # -> a copy of its stdin pipe's write end


class LauncherEvents:
    """What a LauncherSupervisor tells its owner, and what it asks of it (JobManager is one)."""

    def on_output(self, job_id, state, eof):
        """The job's output on disk now stands at `state` (launcher_job_state); `eof`: both
        its pipes are at their end."""

    def on_exit(self, job_id, raw_status, at, unknown=""):
        """The job's main process ended (a wait status); `unknown`: why its status is not
        known (it went with a dead launcher)."""

    def held_jobs(self):
        """[HeldJob] of every job whose process runs or ran."""
        return []


class LauncherSupervisor:
    """Keeps a launcher for the state dir: connects to the one running (or starts one), reads
    its messages on the engine thread, and checks every LAUNCHER_PING_INTERVAL that it
    answers. When it dies (a root job may kill it) or stops answering, the jobs go on: their
    exits are learned from their pidfds (this process is a child subreaper), their processes
    re-parented here are reaped, and a new launcher (after 0.2 s, doubling to 30 s while they
    keep dying) is given their pipes to drain from where their logs end."""

    def __init__(self, state_dir, engine, events, live_restore=True, log_cap=DEFAULT_LOG_CAP):
        self.state_dir, self.engine, self.events = state_dir, engine, events
        self.live_restore, self.log_cap = live_restore, log_cap
        self.launcher = None       # the LauncherClient in use (a dead one until replaced)
        self.lived = False         # the first launcher was there before this server
        self.deaths = []           # monotonic times of deaths, for the backoff
        self._ready = threading.Condition()
        self._closing = threading.Event()
        self._orphans = set()      # pids this process may have to reap (a launcher died)
        self._inputs_closed = set()   # jobs whose stdin pipe the server has closed

    def connect(self):
        """Connect to the launcher (starting one if none runs); returns the jobs it holds,
        [(launcher_job_state, {fd name: fd})]. LauncherError, LauncherMismatch."""
        self.launcher = LauncherClient(self.state_dir, self, self.live_restore)
        held = self.launcher.connect()
        self.lived = not self.launcher.started
        return held

    def start(self):
        """Engine thread from now on: read the launcher, ping it."""
        self._read(self.launcher)
        self.engine.call_soon(lambda: self.engine.call_later(LAUNCHER_PING_INTERVAL,
                                                             self._ping))

    def ready(self, wait=5.0):
        """The launcher, waiting up to `wait` seconds while a dead one is being replaced;
        LauncherError if there is none."""
        with self._ready:
            self._ready.wait_for(lambda: self._closing.is_set() or self._alive(), wait)
            if self._closing.is_set() or not self._alive():
                raise LauncherError("the job launcher process has exited and is being "
                                    "restarted; try again")
            return self.launcher

    def _alive(self):
        return self.launcher is not None and self.launcher.alive

    def forget(self, job_id):
        """The job's final record is saved: its launcher closes what it held of it."""
        with self._ready:
            self._inputs_closed.discard(job_id)
        if self.launcher is not None:
            self.launcher.forget(job_id)

    def close_input(self, job_id):
        """The launcher closes its copy of the job's stdin pipe (the server has closed its
        own): the job reads EOF. (A dead launcher's copy went with it; one being replaced is
        told again by _replace, which may have handed the pipe on just before.)"""
        with self._ready:
            self._inputs_closed.add(job_id)
            launcher = self.launcher
        if launcher is not None:
            launcher.close_input(job_id)

    def close(self, keep_jobs):
        """Leave the launcher with its jobs (keep_jobs: live restore), or tell it to end them
        and exit. The engine must be stopped first."""
        self._closing.set()
        with self._ready:
            self._ready.notify_all()
        if self.launcher is not None:
            if keep_jobs:
                self.launcher.detach()
            else:
                self.launcher.bye()

    def stopping(self):
        """Closing begins: no launcher is replaced from now on."""
        self._closing.set()
        with self._ready:
            self._ready.notify_all()

    # -- the launcher's events (LauncherClient calls these) ------------------------------------

    def on_output(self, job_id, state, eof):
        self.events.on_output(job_id, state, eof)

    def on_exit(self, job_id, raw_status, at):
        self.events.on_exit(job_id, raw_status, at)

    def on_gone(self):
        """Engine thread: the launcher died."""
        if self._closing.is_set():
            return
        log.error("the job launcher process died; starting a new one")
        with self._ready:
            self._ready.notify_all()
        for job in self.events.held_jobs():
            self._orphans |= _pids_or_none(job)
            self.watch_exit(job)
        self.engine.call_later(0, self._reap_orphans)
        self.deaths.append(time.monotonic())
        NamedThread(self._replace, "jobworker-relaunch").start()

    # -- while a launcher is dead, and after ---------------------------------------------------

    def watch_exit(self, job):
        """Engine thread: learn a HeldJob's end from its pidfd (its launcher is gone), once."""
        if job.pidfd is not None and not self.engine.has_reader(job.pidfd):
            self.engine.add_reader(job.pidfd, self._exit_of(job.id), close=False)

    def _exit_of(self, job_id):
        def readable(fd):
            self.engine.remove_reader(fd)
            try:
                result = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:   # not our child: someone else reaped it
                self.events.on_exit(job_id, 0, time.time(), unknown="its launcher died and "
                                    "its exit status went with it")
                return
            if result is not None:
                raw = (result.si_status << 8 if result.si_code == os.CLD_EXITED
                       else result.si_status)   # as waitpid would say it
                self.events.on_exit(job_id, raw, time.time())
        return readable

    def _reap_orphans(self):
        """Engine thread, while jobs of a dead launcher run: reap their processes re-parented
        here when they end (only pids seen in job cgroups: other children are not ours)."""
        held = self.events.held_jobs()
        for job in held:
            self._orphans |= _pids_or_none(job)
        watched = {job.pid for job in held if job.pidfd is not None}   # reaped by waitid
        for pid in list(self._orphans - watched):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid if not os.path.exists(f"/proc/{pid}") else 0
            if done:
                self._orphans.discard(pid)
        if self._orphans and not self._closing.is_set():
            self.engine.call_later(1.0, self._reap_orphans)

    def _replace(self):
        """Start a new launcher and give it the pipes of every job still writing."""
        recent = [t for t in self.deaths if time.monotonic() - t < 60]
        delay = min(0.2 * 2 ** (len(recent) - 1), 30.0)
        while not self._closing.wait(delay):
            launcher = LauncherClient(self.state_dir, self, self.live_restore)
            try:
                held = launcher.connect()
            except (LauncherError, OSError) as e:
                log.error("starting a new job launcher: %s", e)
                delay = min(delay * 2, 30.0)
                continue
            for _, fds in held:   # it is new: nothing should be there
                for fd in fds.values():
                    _close_quietly(fd)
            draining = [j for j in self.events.held_jobs() if j.draining and j.pipes]
            for job in draining:
                stdin = job.input_copy()
                try:
                    launcher.take_over(job.id, job.directory, self.log_cap,
                                       dict(job.pipes, **({"in": stdin} if stdin else {})))
                finally:
                    if stdin is not None:
                        os.close(stdin)
            with self._ready:
                self.launcher = launcher
                closed = self._inputs_closed & {j.id for j in draining}
                self._ready.notify_all()
            for job_id in closed:   # (closed while it was being handed on: again, to this one)
                launcher.close_input(job_id)
            self.engine.call_soon(lambda: self._read(launcher))
            log.info("a new job launcher (pid %d) took over %d running job%s", launcher.pid,
                     len(draining), "s" if len(draining) != 1 else "")
            return

    def _read(self, launcher):
        """Engine thread: read this launcher's socket until it goes (bound to it: while a
        successor is being installed, self.launcher may still name the dead one)."""
        def readable(fd):
            if not launcher.on_readable():
                self.engine.remove_reader(fd)
                launcher.close()
        self.engine.add_reader(launcher.fileno(), readable, close=False)

    def _ping(self):
        if self._closing.is_set():
            return
        if self.launcher is not None:
            self.launcher.ping()
        self.engine.call_later(LAUNCHER_PING_INTERVAL, self._ping)


def _pids_or_none(job):
    try:
        return job.pids()
    except CgroupError:
        return set()


# ================================================================================================
# Jobs
# ================================================================================================

USAGE_KEYS = ("cpu_seconds", "memory_bytes", "memory_peak_bytes", "io_read_bytes",
              "io_write_bytes", "tasks")
DEFAULT_KEEP_FINISHED = 10_000        # finished jobs kept (records and output)
DEFAULT_KEEP_FOR = 7 * 86400.0        # seconds a finished job is kept after it ended
RETENTION_INTERVAL = 60.0             # seconds between retention sweeps (also run at each end)


@dataclasses.dataclass(slots=True)
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
    lost_reason: str = ""         # why a lost job's end is not known
    name: str = ""                # a label given at Start
    env_keys: tuple = ()          # names of the variables it was given (values are not kept)
    workdir: str = JOB_CWD
    timeout: float = None         # seconds it may run; None: no limit
    timed_out: bool = False       # stopped because it ran past its timeout
    failure: str = ""             # state failed: why it never ran
    cgroup: dict = None           # where its cgroups are while it runs (Cgroup.to_record)
    stdin: str = STDIN_NULL       # STDIN_MODES: what its stdin is
    queued_at: float = None       # when it was queued (None: it never was); 0 started_at: it
                                  # has not run (yet)
    queue_timeout: float = None   # seconds it may wait in the queue; None: no limit
    queue_timed_out: bool = False # it waited past its queue timeout, and never ran
    queue_position: int = 0       # while queued: 1 for the next to start (Query's; not kept)

    @property
    def order_key(self):
        """Where the job stands in List's order: by start time (by the time it was queued, if
        it was), then id. It never changes."""
        return (self.started_at if self.queued_at is None else self.queued_at, self.id)

    def matches(self, owner=None, states=None, name=None, id_prefix=None):
        """Whether it passes List's filters (None, or empty: any)."""
        return ((owner is None or self.owner == owner) and (not states or self.state in states)
                and (name is None or self.name == name)
                and (id_prefix is None or self.id.startswith(id_prefix)))

    def to_dict(self):
        # by hand: dataclasses.asdict deep-copies and is the slowest part of saving a record
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["limits"] = self.limits.to_dict()
        d["command"], d["usage"] = list(self.command), dict(self.usage)
        d["env_keys"] = list(self.env_keys)
        del d["queue_position"]   # (of the moment)
        if d["cgroup"] is None:
            del d["cgroup"]   # (a finished job's: not kept)
        return d

    @classmethod
    def from_dict(cls, d):
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["limits"] = Limits.from_dict(d.get("limits") or {})
        usage = d.get("usage") or {}
        # the module's own key strings, one owner string per identity: thousands of records
        # kept in memory share them instead of holding a copy each
        d["usage"] = {k: usage[k] for k in USAGE_KEYS if k in usage}
        d["owner"] = sys.intern(str(d.get("owner", "")))
        d["env_keys"] = tuple(d.get("env_keys") or ())
        return cls(**d)


def _is_int(v):
    return type(v) is int


def _is_number(v):
    return type(v) in (int, float)


def _optional(check):
    return lambda v: v is None or check(v)


def _strings(v):
    return isinstance(v, list) and all(type(x) is str for x in v)


_LIMITS_SCHEMA = {"cpu_percent": _optional(_is_number), "memory_bytes": _optional(_is_int),
                  "io_bps": _optional(_is_int), "pids": _optional(_is_int)}
# What each field of a record read back from disk must be (a field may be missing: records
# of older builds lack newer fields).
RECORD_SCHEMA = {
    "id": lambda v: type(v) is str, "owner": lambda v: type(v) is str,
    "command": lambda v: _strings(v) and bool(v), "state": lambda v: v in STATES,
    "limits": lambda v: isinstance(v, dict) and all(_LIMITS_SCHEMA.get(k, bool)(x)
                                                    for k, x in v.items()),
    "exit_code": _optional(_is_int), "signal": _optional(_is_int),
    "oom_killed": lambda v: type(v) is bool, "started_at": _is_number,
    "ended_at": _optional(_is_number),
    "usage": lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
    "output_bytes": lambda v: _is_int(v) and v >= 0, "log_truncated": lambda v: type(v) is bool,
    "log_error": lambda v: type(v) is str, "pid": _optional(_is_int),
    "lost_reason": lambda v: type(v) is str, "name": lambda v: type(v) is str,
    "env_keys": _strings, "workdir": lambda v: type(v) is str,
    "timeout": _optional(_is_number), "timed_out": lambda v: type(v) is bool,
    "failure": lambda v: type(v) is str, "cgroup": _optional(lambda v: isinstance(v, dict)),
    "stdin": lambda v: v in STDIN_MODES, "queued_at": _optional(_is_number),
    "queue_timeout": _optional(_is_number), "queue_timed_out": lambda v: type(v) is bool,
}


def check_record(data, job_id):
    """ValueError saying what is wrong unless `data` (a record read back) is one this server
    wrote for the job `job_id`."""
    if not isinstance(data, dict):
        raise ValueError(f"not an object but {type(data).__name__}")
    for key in ("id", "owner", "command", "state", "started_at"):
        if key not in data:
            raise ValueError(f"no {key!r}")
    for key, value in data.items():
        check = RECORD_SCHEMA.get(key)
        if check is not None and not check(value):
            raise ValueError(f"{key!r} is {value!r:.80}")
    if data["id"] != job_id:
        raise ValueError(f"the id {data['id']!r:.80} is not its directory's")
    if data["state"] not in (QUEUED, RUNNING) and not _is_number(data.get("ended_at")):
        raise ValueError(f"a {data['state']} job without the time it ended")


class Phase(enum.Enum):
    """Where a job is in its life; every change goes through Job.change_phase."""
    QUEUED = "queued"       # accepted while the caps were full: waits in the JobQueue, with
                            # nothing of it in the kernel
    DEQUEUED = "dequeued"   # queued, and its turn has come (its slot is taken): a starter
                            # thread is to start it; a Stop now still ends it unrun
    STARTING = "starting"   # accepted; its process is being made (not listed yet, unless it
                            # was queued)
    RUNNING = "running"     # its main process runs
    STOPPING = "stopping"   # a Stop (or its timeout) sent SIGTERM; the main process runs on
    ENDING = "ending"       # the main process has ended: what it left is killed, the rest of
                            # its output read, its cgroup removed (or, never ran: its end is
                            # being written)
    ENDED = "ended"         # its final record is saved (a FinishedJob takes its place)


PHASE_CHANGES = {
    # DEQUEUED: a slot freed; ENDED: stopped, or given up, while queued
    Phase.QUEUED: {Phase.DEQUEUED, Phase.ENDED},
    # STARTING: a starter took it; ENDING: a Stop came first (it is ended unrun)
    Phase.DEQUEUED: {Phase.STARTING, Phase.ENDING},
    # ENDING: it ended before its start was confirmed to the caller (the launcher says both
    # at once); ENDED: its start failed
    Phase.STARTING: {Phase.RUNNING, Phase.ENDING, Phase.ENDED},
    Phase.RUNNING: {Phase.STOPPING, Phase.ENDING},
    Phase.STOPPING: {Phase.ENDING},
    Phase.ENDING: {Phase.ENDED},
    Phase.ENDED: set(),
}
assert set(PHASE_CHANGES) == set(Phase)
MAIN_ENDED = frozenset({Phase.ENDING, Phase.ENDED})


class JobEntry:
    """What the job table holds for a job, running (Job) or finished (FinishedJob): its
    status, and waits on what it will write and on its end."""

    __slots__ = ()   # each kind has its own: thousands of them are kept
    final = True     # (status, and records: the index records of its output published)

    @property
    def id(self):
        return self.status.id

    def snapshot(self):
        """A JobStatus that no later change alters."""
        return self.status

    def status_now(self):
        """snapshot(), with the usage of now while it runs."""
        return self.snapshot()

    def wait_output(self, offset, cancelled):
        """Wait until output past `offset` is published, the job is final, or cancelled();
        returns (published size, index records, final)."""
        return self.status.output_bytes, self.records, True

    def wait_final(self, timeout=None):
        """Wait until the job is final; False if `timeout` passed first."""
        return True

    def wait_final_or(self, cancelled):
        """Wait until the job is final or cancelled()."""

    def wait_started(self, cancelled=None):
        """Wait while it is queued or starting (unless cancelled() first)."""

    def wake(self):
        """Wake the waiters, to look at cancelled() again."""


INPUT_POLL = 0.25   # seconds a write to a full stdin waits before it looks at its caller again


class JobInput:
    """A job's stdin as this server writes to it: the write end of its pipe, or its
    terminal's master (the launcher holds a copy of each, so the job keeps its stdin when this
    server goes). Writes of several clients go in whole, one at a time, in the order they
    come; a writer waits while the job does not read (the pipe or terminal is full), which
    holds its client back: nothing is buffered here."""

    def __init__(self, job_id, mode, fd):
        self.job_id, self.mode, self.fd = job_id, mode, fd
        os.set_blocking(fd, False)
        self._order = threading.Lock()     # one message at a time, whole
        self._fd_lock = threading.Lock()   # the fd is not closed under a write or an ioctl
        self.closed = False
        self.unread = False   # the job closed its end (EPIPE, EIO): input is dropped

    def write(self, data, cancelled):
        """Write all of `data`, waiting while the job does not read, unless cancelled() first;
        returns the bytes written. InputUnavailable once it is closed; once the job has closed
        its end, as a pipe without a reader, what comes is dropped."""
        view, done = memoryview(data), 0
        while not self._order.acquire(timeout=INPUT_POLL):   # another client's write waits
            if cancelled():
                return 0
        try:
            while done < len(view) and not self.unread and not cancelled():
                with self._fd_lock:
                    if self.fd is None:
                        if self.unread:   # (the job ended meanwhile: dropped, as input to it)
                            break
                        raise InputUnavailable(self.job_id, "has its stdin closed")
                    try:
                        done += os.write(self.fd, view[done:])
                        continue
                    except BlockingIOError:
                        p = select.poll()
                        p.register(self.fd, select.POLLOUT)
                        p.poll(INPUT_POLL * 1000)
                    except OSError as e:   # EPIPE: no reader; EIO: the terminal has no process
                        if e.errno not in (errno.EPIPE, errno.EIO):
                            raise
                        self.unread = True
        finally:
            self._order.release()
        return done

    def end(self):
        """The end of input from a client: a pipe is closed (True: its launcher must close its
        copy too); a terminal is sent its EOF character, as typed."""
        if self.mode == STDIN_TTY:
            with self._fd_lock:
                eof = b"\x04"
                with contextlib.suppress(termios.error, OSError, TypeError):
                    eof = termios.tcgetattr(self.fd)[6][termios.VEOF]
            deadline = time.monotonic() + 5   # (a terminal that stays full: given up)
            self.write(eof, lambda: time.monotonic() > deadline)
            return False
        self.close()
        return True

    def resize(self, rows, columns):
        """Set the terminal's window size (its foreground programs get SIGWINCH)."""
        validate_window(rows, columns)
        if self.mode != STDIN_TTY:
            raise InputUnavailable(self.job_id, "is not on a terminal: it has no window size")
        with self._fd_lock:
            if self.fd is not None:
                set_window_size(self.fd, rows, columns)

    def copy(self):
        """A duplicate of the fd (for a new launcher to hold), or None once it is closed;
        the caller closes it."""
        with self._fd_lock:
            return None if self.fd is None else os.dup(self.fd)

    def close(self, ended=False):
        """Close it: a client's end (`closed`: more input is an error), or the job's end
        (`ended`: what still comes is dropped, the attached clients get the job's end)."""
        if ended:
            self.unread = True
        else:
            self.closed = True
        with self._fd_lock:
            fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def set_window_size(fd, rows, columns):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


class Job(JobEntry):
    """A live job: its status and phase change under `cond`, which wakes its waiters. When
    it has ended, the table keeps a FinishedJob in its place. A queued job uses the queue's
    cond (`shared`: one of its own costs more than the rest of the job) until someone waits
    on it or it starts; then it gets one of its own (a change of a queued job wakes only its
    own waiters). The change is made with the shared cond held: locked() gives the one in use
    (a `with job.cond` may take the shared one just as it is swapped)."""

    __slots__ = ("status", "cond", "shared", "cgroup", "records", "phase", "ends_as",
                 "output_done", "lost", "pidfd", "pipes", "input", "pending", "fds_closed")

    def __init__(self, status, cgroup, phase=Phase.STARTING, shared=None, pending=None):
        self.status = status
        self.cond = shared or threading.Condition()
        self.shared = shared            # the queue's cond, while it uses that one
        self.pending = pending          # a queued job's window size, to start it with
        self.cgroup = cgroup
        self.records = 0
        self.phase = phase
        self.ends_as = EXITED           # the state it takes when final (set as it ends)
        self.output_done = False        # the launcher has read both pipes to their end
        self.lost = ""                  # why its exit status is not known, if it is not
        self.pidfd = None               # of the main process: its exit, if the launcher dies
        self.pipes = {}                 # "out"/"err" -> our copy of the pipe's read end
        self.input = None               # JobInput, of a job with stdin (until it is closed)
        self.fds_closed = False         # by close_fds: the job has let go of them for good

    @classmethod
    def adopted(cls, status, cgroup, state, fds):
        """The Job of one a launcher held while no server was there (its OP_JOB: state, and
        fds by name)."""
        job = cls(status, cgroup, Phase.RUNNING)
        status.pid = state["pid"] if state["pid"] is not None else status.pid
        job.output(state, state["eof"])
        job.pidfd = fds.pop("pid", None)
        held_input = fds.pop("in", None)
        if status.stdin == STDIN_TTY and "out" in fds:   # its master is also its input
            held_input = os.dup(fds["out"])
        if held_input is not None:
            job.input = JobInput(status.id, status.stdin, held_input)
        job.pipes = fds
        return job

    def main_exit(self, raw_status, at, unknown=""):
        """Its main process ended (raw_status: as waitpid says it) at `at`; unknown: why the
        status is not known. False if its end was already known."""
        with self.cond:
            if self.main_ended:
                return False
            if unknown:
                self.lost = unknown
            elif os.WIFSIGNALED(raw_status):
                self.status.signal = os.WTERMSIG(raw_status)
            else:
                self.status.exit_code = os.WEXITSTATUS(raw_status)
            self.status.ended_at = at
            self.ends_as = (LOST if unknown else STOPPED if self.phase is Phase.STOPPING
                            else EXITED)
            self.change_phase(Phase.ENDING)
            return True

    def change_phase(self, new):
        """Move to phase `new` (with `cond` held); RuntimeError for a change the life of a
        job does not have."""
        if new not in PHASE_CHANGES[self.phase]:
            raise RuntimeError(f"job {self.id}: no change from {self.phase.value} to "
                               f"{new.value}")
        self.phase = new
        self.cond.notify_all()

    @property
    def final(self):
        return self.phase is Phase.ENDED

    @property
    def main_ended(self):
        return self.phase in MAIN_ENDED

    def snapshot(self):
        with self.cond:
            return dataclasses.replace(self.status, usage=dict(self.status.usage))

    def status_now(self):
        snap = self.snapshot()
        if snap.state == RUNNING and self.cgroup is not None:
            with contextlib.suppress(CgroupError):   # (ended in between: the snapshot holds)
                snap.usage = self.cgroup.usage()
        return snap

    @contextlib.contextmanager
    def locked(self):
        """The job's cond, acquired: the one in use once it is held (a queued job's shared
        cond may be swapped for its own between the read and the acquire)."""
        while True:
            cond = self.cond
            with cond:
                if self.cond is cond:
                    yield cond
                    return

    def own_cond(self):
        """Give a queued job a cond of its own (a waiter is coming, or it starts); returns
        the job's cond."""
        shared = self.shared
        if shared is not None:
            with shared:
                if self.shared is shared:
                    self.cond, self.shared = threading.Condition(), None
        return self.cond

    def _wait(self, predicate, timeout=None):
        """cond.wait_for(predicate, timeout), on the job's own cond; returns what
        predicate() last said."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            cond = self.own_cond()
            with cond:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done = cond.wait_for(lambda: predicate() or self.cond is not cond, left)
                if self.cond is cond:
                    return done and predicate()

    def wait_output(self, offset, cancelled):
        self._wait(lambda: cancelled() or self.status.output_bytes > offset or self.final)
        with self.cond:
            return self.status.output_bytes, self.records, self.final

    def wake(self):
        while True:
            cond = self.cond
            with cond:
                cond.notify_all()
                if self.cond is cond:
                    return

    def wait_final(self, timeout=None):
        return self._wait(lambda: self.final, timeout)

    def wait_final_or(self, cancelled):
        self._wait(lambda: self.final or cancelled())

    def wait_started(self, cancelled=None):
        self._wait(lambda: self.phase not in (Phase.QUEUED, Phase.DEQUEUED, Phase.STARTING)
                   or (cancelled is not None and cancelled()))

    def signal_main(self, sig):
        """Signal the job's main process through its pidfd (never a reused pid)."""
        with self.cond:
            pidfd = None if self.main_ended else self.pidfd
            if pidfd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, sig)

    def terminate(self):
        """SIGTERM to every process of the job (its main process, if its cgroup holds none)."""
        if not self.cgroup.signal_all(signal.SIGTERM):
            self.signal_main(signal.SIGTERM)

    def kill(self):
        """SIGKILL to everything of the job, its main process too wherever it is."""
        try:
            self.cgroup.kill_all()
        except CgroupError as e:
            log.error("killing job %s: %s", self.id, e)
        self.signal_main(signal.SIGKILL)

    def output(self, state, eof):
        """The launcher's word on its output (launcher_job_state); returns the bytes stored
        since the last word."""
        with self.cond:
            s = self.status
            stored = max(0, state["size"] - s.output_bytes)
            s.output_bytes, self.records = state["size"], state["records"]
            s.log_truncated, s.log_error = state["truncated"], state["error"]
            if eof:
                self.output_done = True
            self.cond.notify_all()
        return stored

    def clean_up(self):
        """After its main process ended: kill what it left (KillMode=control-group), give the
        launcher 5 s to read the rest of its output, read the OOM counter and the usage, and
        remove its cgroup; returns (oom_killed, usage)."""
        try:
            if self.cgroup.populated():
                self.cgroup.kill_all()
            with self.cond:
                self.cond.wait_for(lambda: self.output_done, 5.0)
            # (not done: a process outside the cgroup holds a pipe; the rest is not waited for)
            oom = self.cgroup.oom_kills() > 0
            usage = self.cgroup.usage()
            self.cgroup.remove()
            return oom, usage
        except Exception:
            log.exception("finishing job %s", self.id)
            return False, {}

    def held(self, directory):
        """The HeldJob its launcher's supervisor is given."""
        with self.cond:
            pidfd = None if self.main_ended else self.pidfd
            piped = self.input if self.status.stdin == STDIN_PIPE else None
            return HeldJob(self.id, directory, self.status.pid, pidfd, dict(self.pipes),
                           not self.output_done, self.cgroup.pids,
                           piped.copy if piped is not None else (lambda: None))

    def running(self, pid, pidfd, fds):
        """Its program runs: keep its pidfd and our ends of its stdio (`fds` by STDIO_FDS
        name). If its end has been finished already, they are closed: on a busy host the
        launcher's word that a quick job has ended can come before the spawn's reply."""
        with self.cond:
            self.status.pid = pid
            if not self.fds_closed:
                self.pidfd = pidfd
                if self.status.stdin == STDIN_TTY:
                    self.pipes = {"out": fds["master"]}
                    self.input = JobInput(self.id, STDIN_TTY, os.dup(fds["master"]))
                else:
                    self.pipes = {"out": fds["out_r"], "err": fds["err_r"]}
                    if "in_w" in fds:
                        self.input = JobInput(self.id, STDIN_PIPE, fds["in_w"])
                if self.phase is Phase.STARTING:
                    self.status.state = RUNNING
                    self.change_phase(Phase.RUNNING)
                return
        for fd in (pidfd, *fds.values()):
            _close_quietly(fd)

    def close_fds(self):
        """Close its pidfd, pipes and input, and any given to running() later."""
        with self.cond:   # (not while _signal_main uses the pidfd)
            fds, self.pidfd, self.pipes = [self.pidfd, *self.pipes.values()], None, {}
            held_input, self.input = self.input, None
            self.fds_closed = True
        if held_input is not None:
            held_input.close(ended=True)
        for fd in fds:
            if fd is not None:
                _close_quietly(fd)


class FinishedJob(JobEntry):
    """An ended job, as kept for months: its final status (never changed again) and the number
    of index records of its output. Small, and without a lock: nothing in it moves."""

    __slots__ = ("status", "records")

    def __init__(self, status, records):
        self.status, self.records = status, records


RECORD_FILE = "job.json"
PENDING_FILE = "start.json"   # a queued job's environment and terminal size, until it starts
RECORD_BLOCK = 4096   # a record file fills whole blocks: the slack is the final record's room
RECORD_SLACK = 1024   # what a final record adds at most (exit, times, usage, output figures)


def _encode_record(status, size=0):
    """The record's JSON, padded with spaces (valid JSON still) to at least `size` bytes."""
    data = json.dumps(status.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return data + b" " * (size - len(data)) if size > len(data) else data


def _write_all(fd, data, offset=None):
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


class JobStore:
    """Job records on disk: <state_dir>/jobs/<id>/job.json beside the job's output files.

    A full disk never loses a record: the first record of a job is written before its process
    exists, padded with spaces to whole blocks with room for every field a final record adds,
    so the space its final record needs is taken when the job starts (or Start fails). Records
    are written whole (temp file and rename); when that finds no room, the final record
    overwrites the reserved file in place."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.jobs_dir = os.path.join(state_dir, "jobs")

    def open(self):
        os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)

    def job_dir(self, job_id):
        return os.path.join(self.jobs_dir, job_id)

    def create(self, job_id):
        """A new, empty directory for a job; returns its path."""
        path = self.job_dir(job_id)
        os.mkdir(path, 0o700)
        return path

    def save_pending(self, job_id, env, window):
        """What a queued job starts with (its variables are secrets: only here, beside its
        record, until it starts); DiskFull without room."""
        data = json.dumps({"env": env, "window": list(window)}, separators=(",", ":"))
        try:
            self._replace(os.path.join(self.job_dir(job_id), PENDING_FILE), data.encode())
        except OSError as e:
            raise DiskFull(self.state_dir, e.errno) from None

    def load_pending(self, job_id):
        """(env, window) that save_pending wrote, checked; OSError or ValueError if it cannot
        be read back."""
        with open(os.path.join(self.job_dir(job_id), PENDING_FILE), "rb") as f:
            data = json.loads(f.read())
        if not isinstance(data, dict) or not isinstance(data.get("env"), dict) or \
                not all(type(v) is str for v in data["env"].values()):
            raise ValueError("its environment is not an object of strings")
        window = data.get("window")
        if not (isinstance(window, list) and len(window) == 2 and all(map(_is_int, window))):
            raise ValueError(f"its window size is {window!r:.40}")
        return validate_env(data["env"]), validate_window(*window)

    def forget_pending(self, job_id):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.job_dir(job_id), PENDING_FILE))

    def reserve(self, status):
        """Write a new job's first record, with room for its final one; DiskFull if the disk
        has none (nothing is left behind then but the job's directory)."""
        data = _encode_record(status)
        size = -(-(len(data) + RECORD_SLACK) // RECORD_BLOCK) * RECORD_BLOCK
        path = os.path.join(self.job_dir(status.id), RECORD_FILE)
        try:
            self._replace(path, _encode_record(status, size))
        except OSError as e:
            raise DiskFull(self.state_dir, e.errno) from None

    def save(self, status):
        """Write a job's record; on a full disk, in place over the space reserved for it."""
        path = os.path.join(self.job_dir(status.id), RECORD_FILE)
        data = _encode_record(status)
        try:
            self._replace(path, data)
            return
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.error("saving job %s: %s", status.id, e)
                return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                room = os.fstat(fd).st_size
                if len(data) > room:
                    raise OSError(errno.ENOSPC, f"the record needs {len(data)} bytes, "
                                                f"{room} were reserved")
                _write_all(fd, _encode_record(status, room), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            log.warning("disk full: job %s's record was written in its reserved space",
                        status.id)
        except OSError as e:
            log.error("saving job %s: %s", status.id, e.strerror)

    @staticmethod
    def _replace(path, data):
        tmp = f"{path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)   # no half-written temp file stays behind
            raise

    def load(self):
        """Every record that passes check_record. A record that does not is moved aside to
        <state_dir>/quarantine/ (and named in the log once); a job directory without a record
        (a crash before the record was written, or during a removal) is removed, and so is a
        finished job's that lacks its output files (a removal cut short by an older build;
        a job that went through the queue has them only if it started)."""
        out = []
        for name in os.listdir(self.jobs_dir):
            if not _JOB_ID_RE.fullmatch(name):
                continue
            path = os.path.join(self.jobs_dir, name, RECORD_FILE)
            if not os.path.exists(path):
                log.warning("removing job directory %s: it has no record", name)
                self.discard(name)
                continue
            try:
                with open(path, "rb") as f:
                    data = json.loads(f.read())
                check_record(data, name)
                status = JobStatus.from_dict(data)
            except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
                self._quarantine(name, str(e))
                continue
            if status.state != QUEUED:
                self.forget_pending(name)   # (it has started: no secret stays on disk)
            if status.state not in (QUEUED, RUNNING) and status.queued_at is None and \
                    not self.has_output(name):
                log.warning("removing job %s: its output files are gone (a removal was cut "
                            "short)", name)
                self.discard(name)
                continue
            out.append(status)
        return out

    def has_output(self, job_id):
        """Whether both output files of the job exist (the launcher makes them at its spawn)."""
        d = self.job_dir(job_id)
        return all(os.path.exists(f"{d}/{n}") for n in (LOG_FILE, INDEX_FILE))

    def _quarantine(self, job_id, why):
        aside = os.path.join(self.state_dir, "quarantine")
        os.makedirs(aside, mode=0o700, exist_ok=True)
        target = os.path.join(aside, job_id)
        if os.path.exists(target):
            target += f".{int(time.time())}"
        os.rename(self.job_dir(job_id), target)
        log.error("job %s has a record this server cannot read (%s): moved to %s", job_id,
                  why, target)

    def open_output(self, job_id):
        """(data fd, index fd) of a job's output files, for reading; (None, None) if they are
        not made yet (a job that has not started; one that never ran)."""
        d = self.job_dir(job_id)
        try:
            data_fd = os.open(f"{d}/{LOG_FILE}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        try:
            idx_fd = os.open(f"{d}/{INDEX_FILE}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            idx_fd = None   # no output was ever written
        return data_fd, idx_fd

    def discard(self, job_id):
        """Remove a job's directory and everything in it, the record first."""
        _remove_tree(self.job_dir(job_id), first=RECORD_FILE)


class _Engine(NamedThread):
    """One thread for the launcher's messages, and for the jobs' pidfds and timers when the
    launcher is gone (epoll): the thread count does not grow with the number of jobs."""

    def __init__(self):
        super().__init__(name="jobworker-engine")
        self._ep = select.epoll()
        self._handlers = {}     # fd -> (handler, close the fd when it is removed)
        self._calls = []
        self._timers = []       # heap of (monotonic time, seq, fn)
        self._timer_seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._running = True
        self.add_reader(self._wake_r, self._drain_wake, close=False)

    def add_reader(self, fd, handler, close=True):
        """Call handler(fd) whenever fd is readable; the engine closes fd on removal if
        `close`. Safe from any thread before the fd is first read."""
        self._handlers[fd] = (handler, close)
        self._ep.register(fd, select.EPOLLIN)

    def has_reader(self, fd):
        return fd in self._handlers

    def call_soon(self, fn):
        """Run fn on the engine thread (fd changes that must not race a read)."""
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def call_later(self, delay, fn):
        """Run fn on the engine thread in `delay` seconds (from the engine thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))

    def remove_reader(self, fd):
        """Engine thread only."""
        entry = self._handlers.pop(fd, None)
        if entry is not None:
            self._ep.unregister(fd)
            if entry[1]:
                os.close(fd)

    def _drain_wake(self, fd):
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            self._calls.pop(0)()

    def stop(self):
        """End the thread (if it was started) and close every fd it owns. Once only."""
        self._running = False
        if self.is_alive():
            self.call_soon(lambda: None)
            self.join()
        for fd in list(self._handlers):
            self.remove_reader(fd)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ep.close()

    def _run_one(self, fn, *args):
        try:
            fn(*args)
        except Exception:
            log.exception("engine handler %s", getattr(fn, "__name__", fn))

    def run(self):
        while self._running:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else -1
            for fd, _ in self._ep.poll(timeout):
                entry = self._handlers.get(fd)
                if entry is not None:
                    self._run_one(entry[0], fd)
            while self._timers and self._timers[0][0] <= time.monotonic():
                self._run_one(heapq.heappop(self._timers)[2])


class _Follow:
    """Iterator of Chunks of one job's output from an offset, live until the job is final.
    It holds the output files open: a job removed meanwhile is still read to its end.
    cancel() from any thread ends it at once; so does `leaving` (set when the server leaves
    its jobs running to the next one: the follower goes on with that one). The files of a
    job that has not started yet are opened (`reopen`) once it has output."""

    def __init__(self, job, offset, max_chunk, fds, leaving=None, reopen=None):
        self.job = job
        self.offset = offset
        self.max_chunk = max_chunk
        self._cancelled = False
        self._leaving = leaving or threading.Event()
        self._data_fd, self._idx_fd = fds
        self._reopen = reopen

    @property
    def cancelled(self):
        return self._cancelled or (self._leaving.is_set() and not self.job.final)

    def cancel(self):
        self._cancelled = True
        self.job.wake()

    def __del__(self):
        if hasattr(self, "_idx_fd"):
            self.close()

    def wait_end(self):
        """Wait, reading nothing, until the job is final or the follow is cancelled."""
        self.job.wait_final_or(lambda: self.cancelled)

    def final_status(self):
        """The job's status once the iteration has ended (whether or not the job is still
        listed)."""
        return self.job.snapshot()

    def __iter__(self):
        for offset, data, first, lengths in self.runs():
            stream, start = first, 0
            for n in lengths:
                yield Chunk(stream, offset + start, data[start:start + n])
                stream, start = STDERR if stream == STDOUT else STDOUT, start + n

    def runs(self):
        """(offset, data, first stream, run lengths) per read of the log (at most max_chunk
        bytes): the runs alternate between the streams. Each read is handed on as soon as
        it is made, so live output is never held back."""
        try:
            while True:
                size, records, final = self.job.wait_output(self.offset, lambda: self.cancelled)
                if self.cancelled:
                    return
                end = min(size, self.offset + self.max_chunk)
                if end <= self.offset:   # nothing more, and the job is final
                    return
                if self._data_fd is None and self._reopen is not None:
                    with contextlib.suppress(OSError):   # (gone: removed meanwhile)
                        self._data_fd, self._idx_fd = self._reopen()
                if self._data_fd is None or self._idx_fd is None:
                    return
                segments = read_segments(self._idx_fd, records, self.offset, end)
                data = os.pread(self._data_fd, end - self.offset, self.offset)   # one read
                if not segments or len(data) < end - self.offset:
                    return   # published but not on disk: disk trouble
                yield self.offset, data, segments[0][0], [b - a for _, a, b in segments]
                self.offset = end
        finally:
            self.close()

    def close(self):
        """Close the output files (iteration does it at its end). Idempotent."""
        fds, self._data_fd, self._idx_fd = (self._data_fd, self._idx_fd), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)


class Attachment:
    """One client attached to a job with stdin: the job's output from an offset (`follow`, a
    _Follow) and what the client sends to its stdin (counted: input_bytes)."""

    def __init__(self, job, follow, close_held_input):
        self.job, self.follow = job, follow
        self.input_bytes = 0
        self._close_held_input = close_held_input   # (job id): the launcher's copy of a pipe

    def _input(self):
        """The job's JobInput; None once its main process has ended (what comes then is
        dropped: the call ends with the job's final status). InputUnavailable once a client
        has closed it."""
        held = self.job.input
        if self.job.final or self.job.main_ended:
            return None
        if held is None or held.closed:
            raise InputUnavailable(self.job.id, "has its stdin closed (a client sent its end)")
        return held

    def write(self, data, cancelled):
        """Write `data` to the job's stdin, waiting while it does not read (or is queued),
        unless cancelled() first."""
        self.job.wait_started(cancelled)
        held = self._input()
        if held is not None:
            self.input_bytes += held.write(data, cancelled)

    def end_input(self, cancelled=None):
        """The client's input has ended: a pipe is closed (the job reads EOF once every
        copy is; again is no error), a terminal gets its EOF character. A queued job gets it
        once it runs, unless cancelled() first."""
        self.job.wait_started(cancelled)
        held = self.job.input
        if held is None or held.closed or self.job.main_ended:
            return
        if held.end():
            self._close_held_input(self.job.id)

    def resize(self, rows, columns, cancelled=None):
        validate_window(rows, columns)
        if self.job.status.stdin != STDIN_TTY:
            raise InputUnavailable(self.job.id, "is not on a terminal: it has no window size")
        self.job.wait_started(cancelled)
        held = self._input()
        if held is not None:
            held.resize(rows, columns)

    def close(self):
        self.follow.cancel()
        self.follow.close()


class _NoObserver:
    def job_started(self, status): pass
    def job_ended(self, status): pass
    def start_failed(self, exc): pass
    def output_stored(self, nbytes): pass
    def job_dequeued(self, status, seconds): pass


class JobTable:
    """The jobs a server lists, in List's order (by start time, then id), the finished ones
    also in the order they ended (for the retention rules). add() is the one place a job
    becomes visible. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs = {}        # id -> Job or FinishedJob
        self._order = []       # sorted order_key of every job
        self._finished = {}    # id -> None, in the order the jobs ended

    def load(self, entries):
        """At start: the jobs of earlier runs, beside those already added (adopted ones)."""
        with self._lock:
            for entry in entries:
                self._jobs.setdefault(entry.id, entry)
            self._order = sorted(e.status.order_key for e in self._jobs.values())
            ended = sorted((e for e in self._jobs.values() if e.final),
                           key=lambda e: e.status.ended_at or 0)
            self._finished = dict.fromkeys(e.id for e in ended)

    def add(self, job):
        with self._lock:
            if job.id not in self._jobs:   # (a job that ended at once may be here, finished)
                self._jobs[job.id] = job
                bisect.insort(self._order, job.status.order_key)

    def get(self, job_id, owner=None, then=None):
        """The job, if it exists and `owner` (None: anyone) may see it, else JobNotFound;
        then(job), if given, runs while no removal can happen."""
        validate_job_id(job_id)
        with self._lock:
            job = self._visible(job_id, owner)
            if then is not None:
                then(job)
            return job

    def finished(self, job, entry):
        """The live `job` has ended: `entry` (a FinishedJob) takes its place (and becomes
        visible, if its Start has not yet made it so)."""
        with self._lock:
            present = self._jobs.get(job.id)
            if present is job or present is None:
                if present is None:
                    bisect.insort(self._order, job.status.order_key)
                self._jobs[job.id] = entry
                self._finished[job.id] = None

    def remove(self, job_id, owner=None):
        """Forget a finished job (its files are the caller's to remove): JobRunning if it
        has not ended, JobNotFound if it is unknown or not `owner`'s."""
        validate_job_id(job_id)
        with self._lock:
            self._visible(job_id, owner)
            if job_id not in self._finished:
                raise JobRunning(job_id)
            self._detach(job_id)

    def expired(self, keep, ended_before):
        """Forget the finished jobs beyond the rules, oldest first: past the newest `keep`,
        and those that ended before `ended_before` (None: no age limit); returns their ids."""
        removed = []
        with self._lock:
            for job_id in list(self._finished):
                too_many = len(self._finished) > keep
                too_old = (ended_before is not None
                           and self._jobs[job_id].status.ended_at < ended_before)
                if not (too_many or too_old):
                    break
                self._detach(job_id)
                removed.append(job_id)
        return removed

    def entries(self, after=None, newest_first=False):
        """The jobs past position `after` (an order_key; None: from the start), in List's
        order or its reverse, as they are now."""
        with self._lock:
            if newest_first:
                i = bisect.bisect_left(self._order, after) if after else len(self._order)
                keys = self._order[:i]
                keys.reverse()
            else:
                i = bisect.bisect_right(self._order, after) if after else 0
                keys = self._order[i:]
            return [self._jobs[k[1]] for k in keys]

    def walk(self, owner=None, states=None, after=None, newest_first=False, name=None,
             id_prefix=None, live_usage=False):
        """JobStatus of the jobs past position `after` (an order_key; None: from the start), in
        List's order (oldest first, or newest first), of `owner` only, in one of `states`, of
        that `name` and whose id starts with `id_prefix` if given; running jobs with their
        usage now if `live_usage`. Jobs added or removed meanwhile do not disturb the walk."""
        for job in self.entries(after, newest_first):
            if job.status.matches(owner, states, name, id_prefix):
                yield job.status_now() if live_usage else job.snapshot()

    def has(self, job_id):
        with self._lock:
            return job_id in self._jobs

    def live(self):
        """The jobs that are not final."""
        with self._lock:
            return [j for j in self._jobs.values() if not j.final]

    def _visible(self, job_id, owner):
        job = self._jobs.get(job_id)
        if job is None or (owner is not None and job.status.owner != owner):
            raise JobNotFound(job_id)
        return job

    def _detach(self, job_id):
        job = self._jobs.pop(job_id)
        self._finished.pop(job_id, None)
        del self._order[bisect.bisect_left(self._order, job.status.order_key)]


class JobQueue:
    """The jobs Start accepted with `queue` while the caps were full, waiting for a slot of
    `running` (the Quota of running jobs): first in first out within an owner, and round
    robin between owners (the owner just served goes to the back of the turns), within the
    share of the caps not kept for admins. A queued job holds nothing in the kernel: its
    record and what it starts with are on disk (`store`). One thread hands each job whose
    turn has come, its slot taken, to the `start` given to run(), and each whose queue
    timeout has passed to its `give_up`. Thread-safe."""

    def __init__(self, running, store, clock, max_queued=DEFAULT_MAX_QUEUED,
                 max_per_owner=DEFAULT_MAX_QUEUED_PER_OWNER):
        self.running, self.store, self._clock = running, store, clock
        self.max_queued, self.max_per_owner = max_queued, max_per_owner
        self.cond = threading.Condition()   # the lines'; queued jobs' until they get one
        self._lines = {}   # owner -> [Job], oldest first; the dict's order is whose turn it is
        self.total = 0
        self._last_stamp = 0.0
        self._deadlines = []   # heap of (when its queue timeout passes, queued_at, Job)
        self._timed = 0        # ... of those still queued (the others are dropped lazily)
        self._kick = threading.Event()
        self._stopped = False
        self._thread = self._starters = None
        self._starting = collections.Counter()   # owner -> starts handed out, not yet done

    def enqueue(self, status, env, window):
        """The Job, queued, of a job Start accepted (JobSpawner.accept) while the caps were
        full; CapReached past the bounds (nothing of it is left then), DiskFull."""
        self.check_room(status.owner)
        with self.cond:
            self._last_stamp = max(self._clock(), self._last_stamp + 1e-6)   # its place in line
            status.state, status.queued_at = QUEUED, self._last_stamp
        self.store.create(status.id)
        try:   # (the start file first: a directory without a record is removed at start-up)
            self.store.save_pending(status.id, env, window)
            self.store.reserve(status)
            job = Job(status, None, Phase.QUEUED, self.cond, window)   # (env: on disk only)
            self.put(job)
        except BaseException:
            self.store.discard(status.id)
            raise
        return job

    def restore(self, status):
        """The Job of one queued when the server stopped, back in its place in line (those
        are restored in the order they came); OSError, ValueError or JobworkerError if what
        it starts with cannot be read."""
        _, window = self.store.load_pending(status.id)   # (checked; env: on disk only)
        job = Job(status, None, Phase.QUEUED, self.cond, window)
        self.put(job, force=True)
        return job

    def order_turns(self, served):
        """Put the owners' turns back as they were before a restart: an owner goes to the back
        as a job of theirs leaves the line (`served`: {owner: when one last did}) or as their
        line begins (the oldest job in it)."""
        with self.cond:
            back = lambda item: max(served.get(item[0], 0.0), item[1][0].status.queued_at)
            self._lines = dict(sorted(self._lines.items(), key=back))

    def check_room(self, owner):
        """CapReached if a job of `owner` would not fit (asked before anything is made)."""
        if self.total >= self.max_queued:
            raise CapReached("queued jobs", self.max_queued)
        if len(self._lines.get(owner, ())) >= self.max_per_owner:
            raise CapReached("queued jobs of one owner", self.max_per_owner)

    def put(self, job, force=False):
        """Queue `job` (Phase.QUEUED, on this queue's cond) at the end of its owner's line;
        CapReached past the bounds, unless `force` (what a restart puts back)."""
        s = job.status
        with self.cond:
            if not force:
                self.check_room(s.owner)
            self._last_stamp = max(self._last_stamp, s.queued_at)
            self._lines.setdefault(s.owner, []).append(job)
            self.total += 1
            if s.queue_timeout:
                heapq.heappush(self._deadlines, (s.queued_at + s.queue_timeout, s.queued_at, job))
                self._timed += 1
        self.kick()

    def take_out(self, job):
        """Take a job that has not begun to start out of the queue (to end it unrun): out of
        its line, or out of its turn (cancel_turn); False if it is no such job (its start has
        begun, or it has ended)."""
        if self.cancel_turn(job):
            return True
        with self.cond:
            line = self._lines.get(job.status.owner)
            if job.phase is not Phase.QUEUED or not line or job not in line:
                return False
            line.remove(job)
            if not line:
                del self._lines[job.status.owner]
            self._left(job)
            job.pending = None   # (its environment: not kept in memory past its end)
            return True

    def position(self, job):
        """Where a queued job stands: 1 for the next to start, as the lines are now (round
        robin, one job of each owner in turn); 0 if it is not in one."""
        owner = job.status.owner
        with self.cond:
            line = self._lines.get(owner)
            if not line or job not in line:
                return 0
            k, ahead, before = line.index(job), 0, True
            for other, jobs in self._lines.items():   # whose turn comes first, first
                if other == owner:
                    before = False
                    continue
                ahead += min(len(jobs), k + before)
            return k + ahead + 1

    def by_owner(self):
        """{owner: jobs queued}."""
        with self.cond:
            return {owner: len(line) for owner, line in self._lines.items()}

    def wake_all(self):
        """Wake the waiters of every queued job (to look at what they wait for again)."""
        with self.cond:
            jobs = [j for line in self._lines.values() for j in line]
        for job in jobs:
            job.wake()

    def kick(self):
        """Look for a job that may start (a slot freed, or a job came)."""
        self._kick.set()

    def cancel_turn(self, job):
        """End the turn of a job whose turn has come and whose start has not begun: it is
        ENDING (to be ended unrun) and its slot is given back; False if it is not such a job."""
        with job.locked():
            if job.phase is not Phase.DEQUEUED:
                return False
            job.change_phase(Phase.ENDING)
        self.running.give(job.status.owner)
        return True

    def begin_start(self, job):
        """A starter takes a job whose turn has come (STARTING); False if a Stop came first
        (cancel_turn)."""
        with job.locked():
            if job.phase is not Phase.DEQUEUED:
                return False
            job.change_phase(Phase.STARTING)
            return True

    def run(self, start, give_up, starters=None):
        """Start the thread that hands each job whose turn has come to start(job), on one of
        `starters` (QUEUE_STARTERS) threads, QUEUE_STARTS_PER_OWNER of one owner at once
        (start must give its slot back if it does not run it; one that hangs, on a workdir
        of a hung mount, holds up its owner, not the queue), and calls give_up(job) for each
        whose queue timeout has passed, taken out of its line."""
        self._starters = thread_pool(starters or QUEUE_STARTERS, "jobworker-dequeue")
        self._thread = NamedThread(self._loop, "jobworker-queue", (start, give_up))
        self._thread.start()

    def stop(self):
        """No job leaves the queue from now on (those in it stay queued); returns once the
        starts under way have ended."""
        self._stopped = True
        self._kick.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._starters.shutdown(wait=True)

    def _loop(self, start, give_up):
        def run(fn, job):
            try:
                fn(job)
            except Exception:
                log.exception("queued job %s", job.id)
        while True:
            self._kick.wait(self._next_deadline())
            self._kick.clear()
            while not self._stopped:
                expired = self._expired()
                if expired is not None:
                    run(give_up, expired)
                    continue
                job = self._next()
                if job is None:
                    break
                self._starters.submit(self._hand_off, run, start, job)
            if self._stopped:
                return

    def _hand_off(self, run, start, job):
        try:
            run(start, job)
        finally:   # (its owner may start another)
            with self.cond:
                self._starting[job.status.owner] -= 1
                if not self._starting[job.status.owner]:
                    del self._starting[job.status.owner]
            self.kick()

    def _next_deadline(self):
        """Seconds until the next queue timeout passes (None: there is none)."""
        with self.cond:
            return max(0.0, self._deadlines[0][0] - self._clock()) if self._deadlines else None

    def _expired(self):
        """A job whose queue timeout has passed, out of the queue (take_out); or None."""
        with self.cond:
            while self._deadlines and self._deadlines[0][0] <= self._clock():
                job = heapq.heappop(self._deadlines)[2]
                if self.take_out(job):
                    log.info("job %s waited past its queue timeout of %gs: it will not run",
                             job.id, job.status.queue_timeout)
                    return job
            return None

    def _next(self):
        """The first job of the first owner in turn who may run one more and start one more
        (its slot taken, its phase DEQUEUED, on a cond of its own); None if no one may."""
        with self.cond:
            for owner in list(self._lines):
                if self._starting[owner] < QUEUE_STARTS_PER_OWNER and \
                        self.running.try_take(owner):
                    line = self._lines.pop(owner)
                    job = line.pop(0)
                    if line:
                        self._lines[owner] = line   # to the back of the turns
                    self._left(job)
                    self._starting[owner] += 1
                    with job.own_cond():
                        job.change_phase(Phase.DEQUEUED)   # (wakes its waiters)
                    return job
            return None

    def _left(self, job):
        """Count a job out of the lines; forget the timeouts of jobs no longer queued once
        they are most of the heap (the heap does not keep them, or their memory, alive)."""
        self.total -= 1
        if job.status.queue_timeout:
            self._timed -= 1
            if len(self._deadlines) > 2 * self._timed + 64:
                self._deadlines = [d for d in self._deadlines
                                   if d[2].phase is Phase.QUEUED and d[2] is not job]
                heapq.heapify(self._deadlines)


class Retention:
    """The rules finished jobs are kept by: the newest `keep`, each for `keep_for` seconds
    after it ended (None: forever). apply() removes what is beyond them, oldest first; a
    thread applies them every RETENTION_INTERVAL seconds until `closing` is set."""

    def __init__(self, table, store, clock, keep=DEFAULT_KEEP_FINISHED,
                 keep_for=DEFAULT_KEEP_FOR):
        self.table, self.store, self._clock = table, store, clock
        self.keep, self.keep_for = keep, keep_for
        self._thread = None

    def apply(self):
        """Remove the finished jobs beyond the rules; returns their ids. Running (and
        queued) jobs are never removed."""
        limit = None if self.keep_for is None else self._clock() - self.keep_for
        removed = self.table.expired(self.keep, limit)
        for job_id in removed:
            self.store.discard(job_id)
        if removed:
            log.info("retention: removed %d finished job%s", len(removed),
                     "s" if len(removed) != 1 else "")
        return removed

    def start(self, closing):
        self._thread = NamedThread(self._sweep, "jobworker-retention", (closing,))
        self._thread.start()

    def join(self):
        if self._thread is not None:
            self._thread.join()

    def _sweep(self, closing):
        while not closing.wait(RETENTION_INTERVAL):
            try:
                self.apply()
            except Exception:
                log.exception("retention sweep")


class JobStopper:
    """How running jobs are stopped: SIGTERM to every process of a job once, however many
    stop it, and SIGKILL to what is left after the grace (on the `finisher`); and a job that
    runs past its timeout stopped as Stop would. Timers are the engine's."""

    def __init__(self, engine, finisher, grace, clock):
        self.engine, self.finisher, self.grace, self._clock = engine, finisher, grace, clock

    def begin(self, job, grace):
        """Stop the job; returns at once. False if it had already ended. Concurrent stops
        share the job's one end; the shortest grace decides."""
        with job.cond:
            if job.main_ended:
                return False
            first = job.phase is Phase.RUNNING
            if first:
                job.change_phase(Phase.STOPPING)
        if first:
            job.terminate()

        def escalate():
            if not job.main_ended:
                with contextlib.suppress(RuntimeError):   # (shut down: close() kills it)
                    self.finisher.submit(job.kill)
        self.engine.call_soon(lambda: self.engine.call_later(grace, escalate))
        return True

    def arm_timeout(self, job):
        """Stop the job once it has run its timeout (from its start)."""
        def expire():
            with job.cond:
                if job.main_ended:
                    return
                job.status.timed_out = True
            log.info("job %s ran past its timeout of %gs: stopping it", job.id,
                     job.status.timeout)
            self.begin(job, self.grace)
        left = max(0.0, job.status.started_at + job.status.timeout - self._clock())
        self.engine.call_soon(lambda: self.engine.call_later(left, expire))


class JobRecovery:
    """At start: what became of the jobs of earlier runs that the launcher does not hold."""

    def __init__(self, store, cgroups, clock, launcher_lived):
        self.store, self.cgroups, self._clock = store, cgroups, clock
        self.launcher_lived = launcher_lived   # the launcher was there before this server

    def recover(self, held, adopt, forget, queue):
        """The table's entries of the jobs of earlier runs (JobStore.load). Those the launcher
        still holds (`held`: (state, fds) by id) are adopt(status, state, fds)'ed, running
        (live restore); the queued go back in `queue`, in the order they came and with the
        owners' turns as they were; the others that were running when the server stopped end
        `lost` or `failed` (finished). What the launcher holds without a running record is
        not ours: forget(job_id)."""
        entries, queued, served = [], [], {}
        for status in self.store.load():
            if status.queued_at is not None and status.started_at:   # it left the queue then
                served[status.owner] = max(served.get(status.owner, 0.0), status.started_at)
            if status.state == RUNNING and status.id in held:
                adopt(status, *held.pop(status.id))
            elif status.state == QUEUED:
                queued.append(status)
            else:
                entries.append(self.finished(status))
        for status in sorted(queued, key=lambda s: s.order_key):
            try:
                entries.append(queue.restore(status))
            except (OSError, ValueError, JobworkerError) as e:
                entries.append(self.unqueued(status, f"what it was to start with cannot be "
                                                      f"read ({e})"))
        queue.order_turns(served)
        for job_id, (_, fds) in held.items():
            for fd in fds.values():
                _close_quietly(fd)
            forget(job_id)
        return entries

    def finished(self, status):
        """The FinishedJob of a job of an earlier run; one recorded running that the launcher
        does not hold is ended first (not_held)."""
        if status.state == RUNNING:   # its record was last written when it started
            self.not_held(status)
        return FinishedJob(status, index_records(self.store.job_dir(status.id)))

    def not_held(self, status):
        """A job recorded running that the launcher does not hold. Its output files are made
        by the launcher's spawn, before the fork, and a launcher forgets a job only once its
        final record is saved: so a job without them never ran, and a launcher that lived on
        (live restore) would hold it if it had. Only a job that may have run, when its
        launcher died too, is `lost`. Whatever is left of it is killed, its cgroup removed."""
        spawned = self.store.has_output(status.id)
        if spawned and not self.launcher_lived:
            status.state = LOST
            status.lost_reason = "the server and its launcher stopped while it ran"
        else:
            status.state = FAILED
            status.failure = ("its start failed while the server stopped" if spawned else
                              "the server stopped before the job was started")
        status.ended_at = self._clock()
        status.output_bytes = output_size(self.store.job_dir(status.id))
        self._discard(self.cgroups.from_record(status.id, status.cgroup))
        status.cgroup = None
        self.store.save(status)

    def unqueued(self, status, why):
        """The FinishedJob of one that was queued, and cannot be put back in line: failed."""
        status.state, status.failure, status.ended_at = FAILED, why, self._clock()
        log.error("queued job %s cannot start: %s", status.id, why)
        self.store.save(status)
        self.store.forget_pending(status.id)
        return FinishedJob(status, 0)

    def remove_leftovers(self, known):
        """Job cgroups under the parent of no job known(id): killed and removed."""
        for name in self.cgroups.leftover_job_ids():
            if not known(name):
                self._discard(self.cgroups.job(name))

    @staticmethod
    def _discard(cgroup):
        try:
            cgroup.kill_all()
            cgroup.remove()
        except CgroupError as e:
            log.error("removing leftover cgroup: %s", e)


class JobSpawner:
    """Makes a job's process: its cgroup with its limits, its directory and first record,
    its pipes, and the spawn by the launcher, as the user and in the view the server gives
    jobs; on any failure nothing of it is left."""

    def __init__(self, store, cgroups, devices, log_cap, clock, job_user, uid_range,
                 hide_paths, job_nofile):
        self.store, self.cgroups, self.devices = store, cgroups, devices
        self.log_cap, self._clock = log_cap, clock
        self.supervisor = None   # set when the manager opens
        self._user = _job_user(job_user)
        self._dynamic = (DynamicUsers(os.path.join(store.state_dir, "uids.json"), uid_range)
                         if job_user == DYNAMIC_USER else None)
        # What a job may not see: the state dir (every job's output and record, the launcher's
        # socket) and the server's certificates. Hiding needs root (a mount namespace).
        self._hide = ([store.state_dir, *hide_paths] if os.geteuid() == 0 else [])
        self._empty_file = os.path.join(store.state_dir, ".empty")
        # the open-files limit jobs get: as this process had it before raising its own
        self.job_nofile = tuple(job_nofile or _initial_nofile())

    def prepare(self):
        """At open: what covers hidden files, and the dynamic users' table (checked)."""
        if self._hide:
            os.close(os.open(self._empty_file, os.O_CREAT | os.O_CLOEXEC, 0))
        if self._dynamic:
            self._dynamic.load()

    def accept(self, command, args, limits, owner, env, workdir, timeout, name, stdin, term,
               default_pids):
        """The JobStatus of a job to start, and its environment: every field checked."""
        import uuid
        env = validate_env(env)
        argv = validate_command(command, list(args), env)
        workdir = self.check_workdir(validate_workdir(workdir))
        limits = parse_limits(**limits) if isinstance(limits, dict) else limits or Limits()
        if limits.pids is None and default_pids:
            limits = dataclasses.replace(limits, pids=default_pids)
        status = JobStatus(id=str(uuid.uuid4()), owner=sys.intern(owner), command=argv,
                           limits=limits, state=RUNNING, name=validate_name(name),
                           env_keys=tuple(sorted(env)), workdir=workdir,
                           timeout=validate_timeout(timeout), stdin=validate_stdin(stdin))
        if status.stdin == STDIN_TTY:
            env.setdefault("TERM", validate_term(term or DEFAULT_TERM))
        return status, env

    def check_again(self, status, env):
        """What accept() checked, checked again as a queued job starts (its workdir may be
        gone)."""
        validate_env(env)
        self.check_workdir(status.workdir)

    def check_workdir(self, workdir):
        """The workdir, if a job may be started there (InvalidArgument if not)."""
        if any(workdir == h or workdir.startswith(h.rstrip("/") + "/") for h in self._hide):
            # what the job cannot see does not exist for it: nothing here says otherwise
            raise InvalidArgument("workdir", workdir, os.strerror(errno.ENOENT))
        if not (self._user or self._dynamic):
            # root's jobs: checked here, before anything is made. An unprivileged job's is
            # checked by its chdir, as its user: what root sees here is not its to learn.
            try:
                is_dir = os.path.isdir(workdir)
                os.stat(workdir)
            except OSError as e:
                raise InvalidArgument("workdir", workdir, e.strerror) from None
            if not is_dir:
                raise InvalidArgument("workdir", workdir, os.strerror(errno.ENOTDIR))
        return workdir

    def spawn(self, job, env, watched, window=DEFAULT_WINDOW):
        """The launcher that made the process of `job` (a Job in Phase.STARTING), whose
        program now runs; watched(job) is called before the spawn request (its events may
        come before the reply) and watched(None) if it failed. `window`: (rows, columns) of a
        terminal job's terminal. A job that was queued has its directory and record already
        (kept if the spawn fails: its end is recorded there)."""
        status = job.status
        job_id, queued = status.id, status.queued_at is not None
        cgroup = job.cgroup = self.cgroups.job(job_id)
        cgroup.create()
        job_dir, fds = None, {}
        try:
            cgroup.set_limits(status.limits, self.devices)
            job_dir = self.store.job_dir(job_id) if queued else self.store.create(job_id)
            with job.cond:
                status.started_at = self._clock()
                status.cgroup = cgroup.to_record()
            # before the process exists: a crash finds its record (running: a queued job's
            # shows queued until its program runs)
            self.store.reserve(status if not queued else dataclasses.replace(status,
                                                                             state=RUNNING))
            fds = self._stdio(status.stdin, window)
            launcher = self.supervisor.ready()
            watched(job)
            pid, pidfd = launcher.spawn(self.request(job, env, job_dir),
                                        [fds[name] for name in STDIO_FDS[status.stdin]])
        except BaseException:
            watched(None)
            for fd in fds.values():
                _close_quietly(fd)
            if job_dir is not None and not queued:
                self.store.discard(job_id)
            cgroup.kill_all()
            cgroup.remove()
            raise
        for name in ("out_w", "err_w", "in_r", "slave"):
            if name in fds:
                os.close(fds.pop(name))   # the job's now: EOF when it is done
        job.running(pid, pidfd, fds)
        return launcher

    @staticmethod
    def _stdio(mode, window):
        """The fds of a job's stdio by STDIO_FDS name: its pipes, or a terminal (this
        process's are close-on-exec: openpty's too)."""
        fds = {}
        try:
            if mode == STDIN_TTY:
                fds["master"], fds["slave"] = os.openpty()
                set_window_size(fds["master"], *window)
                return fds
            fds["out_r"], fds["out_w"] = os.pipe2(os.O_CLOEXEC)
            fds["err_r"], fds["err_w"] = os.pipe2(os.O_CLOEXEC)
            _set_pipe_size(fds["out_r"])
            _set_pipe_size(fds["err_r"])
            if mode == STDIN_PIPE:
                fds["in_r"], fds["in_w"] = os.pipe2(os.O_CLOEXEC)
                _set_pipe_size(fds["in_w"])
            return fds
        except BaseException:
            for fd in fds.values():
                _close_quietly(fd)
            raise

    def request(self, job, given_env, job_dir):
        """The SpawnRequest of a job: its default environment (the caller's variables on
        top), its user, what it may not see."""
        env = {"PATH": JOB_PATH, "LANG": JOB_LANG, "HOME": "/root"}
        req = SpawnRequest(job=job.id, dir=job_dir, cap=self.log_cap, argv=job.status.command,
                           env=env, cwd=job.status.workdir, procs=list(job.cgroup.procs_files),
                           into=job.cgroup.clone_into or "",
                           hide=list(self._hide), empty_file=self._empty_file,
                           nofile=list(self.job_nofile), stdio=job.status.stdin)
        if self._user:
            req.uid, req.gid = self._user["uid"], self._user["gid"]
            env["HOME"] = self._user["home"]
            env["USER"] = env["LOGNAME"] = self._user["name"]
        elif self._dynamic:
            req.uid = req.gid = self._dynamic.uid_of(job.status.owner)
            env["HOME"] = "/"   # a uid no account has: no home (as systemd's DynamicUser=)
        env.update(given_env)   # what the caller gave overrides the defaults
        return req


class JobManager(LauncherEvents):
    """Starts, stops and watches jobs on this host, and keeps finished ones within the retention
    rules. Thread-safe. Jobs are forked and their output written by the state dir's launcher
    process (kept by a LauncherSupervisor), so a process that already runs gRPC may use it.

    Construction only records the settings; open() is the step that acts on the host."""

    def __init__(self, state_dir=DEFAULT_STATE_DIR, cgroups=None, *, default_pids=DEFAULT_PIDS_LIMIT,
                 log_cap=DEFAULT_LOG_CAP, max_jobs=DEFAULT_MAX_JOBS,
                 max_jobs_per_owner=DEFAULT_MAX_JOBS_PER_OWNER, job_user=None,
                 grace=DEFAULT_GRACE_SECONDS, devices=None, keep_finished=DEFAULT_KEEP_FINISHED,
                 keep_for=DEFAULT_KEEP_FOR, clock=time.time, live_restore=True,
                 uid_range=DEFAULT_UID_RANGE, hide_paths=(), observer=None, job_nofile=None,
                 max_queued=DEFAULT_MAX_QUEUED, max_queued_per_owner=DEFAULT_MAX_QUEUED_PER_OWNER):
        self.store = JobStore(state_dir)
        self.table = JobTable()
        # Told of what happens, for metrics: job_started(status), job_ended(status),
        # start_failed(exc), output_stored(nbytes), job_dequeued(status, seconds queued).
        # Called from the manager's threads; quick.
        self.observer = observer or _NoObserver()
        self.state_dir = state_dir
        self.jobs_dir = self.store.jobs_dir
        self.cgroups = cgroups or detect_cgroups()
        self.default_pids = default_pids
        self.log_cap = log_cap
        self.max_jobs = max_jobs
        self._running = Quota("running jobs", max_jobs, max_jobs_per_owner)
        self.queue = JobQueue(self._running, self.store, clock, max_queued,
                              max_queued_per_owner)
        self._running.on_free = self.queue.kick
        self.grace = validate_grace(grace)
        self.devices = block_devices() if devices is None else devices
        self.retention = Retention(self.table, self.store, clock, keep_finished, keep_for)
        self.live_restore = live_restore
        self._clock = clock
        self.spawner = JobSpawner(self.store, self.cgroups, self.devices, log_cap, clock,
                                  job_user, uid_range, hide_paths, job_nofile)
        self._lock = threading.Lock()
        self._live = {}     # id -> Job with a process (or about to have one): what the
                            # launcher's events are about
        self._opened = self._closed = False
        self._closing = threading.Event()
        self._leaving = threading.Event()   # closing with the jobs left running: followers end
        self._finisher = self._engine = self.supervisor = self._stopper = None

    def open(self):
        """Make the state dir, set up the cgroup parent (on cgroup v2 this moves the calling
        process into a leaf beside the jobs), make this process a child subreaper, connect to
        the state dir's launcher (starting one if none runs) and adopt the jobs it holds,
        load the records of earlier runs and apply the retention rules. Returns self."""
        try:
            self.store.open()
            self.spawner.prepare()
            self.cgroups.setup()
            _set_child_subreaper()
            _cap_by_fd_limit(self._running, raise_fd_limit(), self.max_jobs)
            self._finisher = thread_pool(FINISHERS, "jobworker-finish")
            self._engine = _Engine()
            self._stopper = JobStopper(self._engine, self._finisher, self.grace, clock=self._clock)
            self.supervisor = self.spawner.supervisor = LauncherSupervisor(
                self.state_dir, self._engine, self, self.live_restore, self.log_cap)
            # adopted jobs are registered before any of their events is read
            self._recover(self.supervisor.connect())
            self.supervisor.start()
            self._engine.start()
            self.queue.run(self._start_queued,
                           lambda job: self._end_unrun(job, STOPPED, queue_timed_out=True))
            self.retention.apply()
            self.retention.start(self._closing)
        except BaseException:
            self._shut_down(keep_jobs=True)   # what was started is ended; no job is touched
            raise
        self._opened = True
        return self

    # -- public API ---------------------------------------------------------------------------

    def start(self, command, args=(), limits=None, owner="", admin=False, *, env=None,
              workdir=None, timeout=None, name="", stdin=STDIN_NULL, term="", window=None,
              queue=False, queue_timeout=None):
        """Start a job; returns its JobStatus once the program has been exec'd. `limits`: a
        Limits, or a dict of parse_limits' text forms. `env` is added to the default
        environment, `workdir` is its working directory, `timeout` (seconds) stops it as Stop
        would, `name` labels it, `stdin` (STDIN_MODES) is what attach() writes to, on a
        terminal of `term` and `window` (rows, columns). With `queue`, a job the caps do not
        admit now (or that others wait before) is queued instead (state QUEUED; it starts
        when its turn comes, or gives up after `queue_timeout` seconds). Raises
        InvalidArgument (a workdir that is not a directory too), CapReached (globally, for
        `owner`, or past what is kept for admins unless `admin`; with `queue`, past the
        queue's bounds), DiskFull, SpawnError (nothing left behind), CgroupError or
        LauncherError. The observer hears of every failure."""
        try:
            status, env = self.spawner.accept(command, args, limits, owner, env, workdir,
                                              timeout, name, stdin, term, self.default_pids)
            window = validate_window(*window) if window else DEFAULT_WINDOW
            queue_timeout = validate_timeout(queue_timeout, "queue_timeout_seconds")
            with self._lock:
                if self._closed or not self._opened:
                    raise LauncherError("the job manager is not open")
            if not queue:
                self._running.take(status.owner, admin)
            elif self.queue.total or not self._running.try_take(status.owner, admin):
                status.queue_timeout = queue_timeout   # (others wait before it: it goes after)
                job = self.queue.enqueue(status, env, window)
                self.table.add(job)   # (no-op if its turn came already: its start added it)
                snap = job.snapshot()
                snap.queue_position = self.queue.position(job)
                return snap
            try:
                return self._start(Job(status, None), env, window)
            except BaseException:
                self._running.give(status.owner)
                raise
        except Exception as e:
            self.observer.start_failed(e)
            raise

    def _start(self, job, env, window):
        status = job.status

        def watched(job):   # its launcher events may come before spawn returns
            with self._lock:
                if job is None:
                    self._live.pop(status.id, None)
                else:
                    self._live[status.id] = job
        launcher = self.spawner.spawn(job, env, watched, window)
        if not launcher.alive:
            # It died after its reply: its end may have been handled before the pidfd was
            # here to be watched (a job that kills its launcher at once does this).
            held = job.held(self.store.job_dir(job.id))
            self._engine.call_soon(lambda: self.supervisor.watch_exit(held))
        self.table.add(job)
        if status.timeout:
            self._stopper.arm_timeout(job)
        snap = job.snapshot()
        self.observer.job_started(snap)
        return snap

    def _start_queued(self, job):
        """Start a job whose turn has come (the queue took its slot); one that cannot start
        now ends failed, saying why."""
        if not self.queue.begin_start(job):
            return   # a Stop came first (cancel_turn)
        job.pending, status = None, job.status
        self.observer.job_dequeued(status, self._clock() - status.queued_at)
        try:
            env, window = self.store.load_pending(job.id)
            self.spawner.check_again(status, env)
            self._start(job, env, window)
        except Exception as e:
            self._running.give(status.owner)
            self.observer.start_failed(e)
            self._end_unrun(job, FAILED, failure=f"it could not start when its turn came: {e}")
        finally:
            self.store.forget_pending(job.id)

    def _dequeue(self, job):
        """End a queued job without running it (stopped); False if it is not queued."""
        if not isinstance(job, Job) or not self.queue.take_out(job):
            return False
        self._end_unrun(job, STOPPED)
        return True

    def _end_unrun(self, job, state, failure="", queue_timed_out=False):
        """The end of a job that never ran, out of the queue (or failed as it left it)."""
        with job.locked():
            s = job.status
            s.state, s.failure, s.queue_timed_out = state, failure, queue_timed_out
            s.started_at, s.ended_at, s.cgroup = 0.0, self._clock(), None   # (it never ran)
        final = job.snapshot()
        self.store.save(final)
        self.store.forget_pending(job.id)
        self.table.finished(job, FinishedJob(final, job.records))
        with job.locked():
            job.change_phase(Phase.ENDED)
        self.observer.job_ended(final)

    def stop(self, job_id, grace=None, owner=None, gone=lambda: False):
        """SIGTERM every process of the job, SIGKILL after `grace` seconds; returns the final
        JobStatus once no process of the job remains (a queued job ends at once, unrun), or
        the status then if gone() says first (looked at twice a second) that the caller has
        left. JobNotRunning (after it is final) if its main process had already ended."""
        job = self.table.get(job_id, owner)
        if self._dequeue(job):
            return job.snapshot()
        job.wait_started()   # (one leaving the queue: it is stopped once it runs)
        grace = self.grace if grace is None else validate_grace(grace)
        if job.final or not self._stopper.begin(job, grace):
            job.wait_final()   # it ended by itself: the stop comes too late
            raise JobNotRunning(job_id, job.status.state)
        while not job.wait_final(0.5) and not gone():
            pass   # (the stop goes on without the caller)
        return job.snapshot()

    def status(self, job_id, owner=None):
        """JobStatus of one job; live usage while it runs, its place in line while queued."""
        job = self.table.get(job_id, owner)
        snap = job.status_now()
        if snap.state == QUEUED:
            snap.queue_position = self.queue.position(job)
        return snap

    def list(self, owner=None):
        """JobStatus of every job (of `owner` only, if given), oldest first."""
        return list(self.table.walk(owner))

    def follow(self, job_id, offset=0, owner=None, max_chunk=1 << 20):
        """Iterator of Chunks from `offset`, live until the job is final; has .cancel() and
        .final_status(). The output files are opened here: a later Remove does not cut it."""
        if not isinstance(offset, int) or offset < 0:
            raise InvalidArgument("offset", offset, "a byte offset, 0 or more")
        opened = []   # (not removed while its files are opened)
        job = self.table.get(job_id, owner, then=lambda _: opened.extend(
            self.store.open_output(job_id)))
        size = job.snapshot().output_bytes
        if offset > size:   # running or not: a later byte may never come
            for fd in opened:
                if fd is not None:
                    os.close(fd)
            raise InvalidArgument("offset", offset, f"at most the output size so far, {size}")
        return _Follow(job, offset, max_chunk, opened, self._leaving,
                       lambda: self.store.open_output(job_id))

    def attach(self, job_id, offset=None, owner=None, max_chunk=1 << 20):
        """An Attachment to a running job with stdin: its output from `offset` (None: the
        current end), and its input. InputUnavailable for a job without stdin, or ended."""
        job = self.table.get(job_id, owner)
        if job.status.stdin == STDIN_NULL:
            raise InputUnavailable(job_id, "was started without stdin (-i or -t): there is "
                                   "nothing to attach to (`stream` shows its output)")
        if job.final or job.main_ended:
            raise InputUnavailable(job_id, f"has ended ({job.status.state}): there is nothing "
                                   "to attach to (`stream` shows its output)")
        offset = job.snapshot().output_bytes if offset is None else offset
        return Attachment(job, self.follow(job_id, offset, owner, max_chunk),
                          self.supervisor.close_input)

    def remove(self, job_id, owner=None):
        """Delete a finished job's record and output (a queued one's too, after it is
        stopped); its id is unknown from then on. Raises JobRunning if it has not ended,
        JobNotFound if unknown or not `owner`'s."""
        self._dequeue(self.table.get(job_id, owner))
        self.table.remove(job_id, owner)
        self.store.discard(job_id)

    def apply_retention(self):
        """Remove the finished jobs beyond the retention rules (Retention)."""
        return self.retention.apply()

    def caps(self):
        """What Start admits: max_jobs (as open files allow), kept_for_admins, per owner."""
        return {"max_jobs": self._running.cap, "kept_for_admins": self._running.reserve,
                "max_jobs_per_owner": self._running.per_owner}

    def running_by_owner(self):
        """{owner: number of running jobs}."""
        return self._running.holders()

    def queued_by_owner(self):
        """{owner: number of queued jobs}."""
        return self.queue.by_owner()

    def close(self, grace=None, keep_jobs=False):
        """Stop every running job, finish their records, end the launcher. With keep_jobs
        (live restore), leave the jobs running in the launcher's hands instead: the next
        server on this state dir adopts them. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        if self.supervisor:
            self.supervisor.stopping()
        if not self._opened:
            return
        self.queue.stop()   # what is queued stays so, on disk, for the next server
        running = [j for j in self.table.live() if j.phase is not Phase.QUEUED]
        if not keep_jobs and running:
            with thread_pool(16, "jobworker-close") as pool:
                list(pool.map(lambda j: self._stop_quietly(j, grace), running))
        self._leaving.set()   # the followers of what is left go on with the next server
        for job in running:
            job.wake()
        self.queue.wake_all()
        self._shut_down(keep_jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _shut_down(self, keep_jobs):
        """End the threads and leave the launcher (those that were started): with keep_jobs
        it goes on with its jobs, else it is told to stop what runs and exit."""
        self._closing.set()
        if self._finisher:
            self._finisher.shutdown(wait=True)
        if self._engine:
            self._engine.stop()
            self._engine = None
        if self.supervisor:
            self.supervisor.close(keep_jobs)
        self.retention.join()
        for job in list(self._live.values()):
            job.close_fds()
        if not keep_jobs:
            self.cgroups.remove_parent_if_empty()

    def _stop_quietly(self, job, grace):
        try:
            self.stop(job.id, grace)
        except (JobNotRunning, JobNotFound):
            pass

    # -- the launcher's events (LauncherEvents) -----------------------------------------------

    def on_output(self, job_id, state, eof):
        job = self._live.get(job_id)
        if job is not None:
            stored = job.output(state, eof)
            if stored:
                self.observer.output_stored(stored)

    def on_exit(self, job_id, raw_status, at, unknown=""):
        job = self._live.get(job_id)
        if job is not None:   # (said at once: the time of the message is the time of its end)
            self._exited(job, raw_status, self._clock(), unknown)

    def held_jobs(self):
        with self._lock:
            live = [j for j in self._live.values() if j.phase is not Phase.STARTING]
        return [j.held(self.store.job_dir(j.id)) for j in live]

    def _exited(self, job, raw_status, at, unknown=""):
        """The job's main process has ended: its end is finished on another thread."""
        if job.main_exit(raw_status, at, unknown):
            with contextlib.suppress(RuntimeError):   # none after shutdown: nothing to finish
                self._finisher.submit(self._finish, job)

    # -- the end of a job ---------------------------------------------------------------------

    def _finish(self, job):
        """After the main process ended: clean up its cgroup, save the final record and keep a
        FinishedJob in the job's place."""
        oom, usage = job.clean_up()
        with job.cond:
            s = job.status
            s.state, s.lost_reason = job.ends_as, job.lost
            s.oom_killed, s.usage = oom, usage
            s.cgroup = None   # removed
            if s.ended_at is None:
                s.ended_at = self._clock()
        final = job.snapshot()
        self.store.save(final)
        self.supervisor.forget(job.id)   # (after the save: a held job's record is never final)
        self._running.give(job.status.owner)
        with self._lock:
            self._live.pop(job.id, None)
        self.table.finished(job, FinishedJob(final, job.records))
        job.close_fds()
        with job.cond:
            job.change_phase(Phase.ENDED)
        self.observer.job_ended(final)
        if not self._closed:
            self.retention.apply()

    # -- start-up -----------------------------------------------------------------------------

    def _recover(self, held):
        """Load earlier jobs. Those the launcher still holds are adopted, running (live
        restore); the others that were running when the server stopped end `lost` or
        `failed` (JobRecovery)."""
        held = {state["job"]: (state, fds) for state, fds in held}
        recovery = JobRecovery(self.store, self.cgroups, self._clock, self.supervisor.lived)
        self.table.load(recovery.recover(held, self._adopt, self.supervisor.forget,
                                         self.queue))
        recovery.remove_leftovers(self.table.has)

    def _adopt(self, status, state, fds):
        """A job the launcher kept running while no server was there."""
        job = Job.adopted(status, self.cgroups.from_record(status.id, status.cgroup), state,
                          fds)
        if job.cgroup.to_record() != self.cgroups.job(status.id).to_record():
            log.warning("job %s runs in the cgroups it was started in, outside this "
                        "server's --cgroup-parent", status.id)
        with self._lock:
            self._live[status.id] = job
        self.table.add(job)   # (before its end may be finished, just below)
        self._running.take(status.owner, force=True)   # adopted: it runs whatever the caps
        if state["status"] is not None:   # it ended while no server was there
            self._exited(job, state["status"], state["at"])
        elif status.timeout:
            self._stopper.arm_timeout(job)   # what is left of it
        log.info("adopted running job %s (pid %s)", status.id, status.pid)



def _cap_by_fd_limit(running, limit, max_jobs):
    """Run no more jobs at once (`running`, their Quota) than the open-files limit allows
    (the launcher, which inherits it, holds FDS_PER_JOB per running job; the server fewer)."""
    fits = max(1, (limit - FD_RESERVE) // FDS_PER_JOB) if limit else running.cap
    if running.lower(fits):
        log.warning("the open-files limit (RLIMIT_NOFILE %d) allows %d running jobs, fewer "
                    "than --max-jobs %d: at most %d run at once (raise the hard limit, "
                    "systemd's LimitNOFILE=, for more)", limit, fits, max_jobs, fits)


def _set_child_subreaper():
    """Make this process adopt the orphans of its descendants (the jobs, if the launcher it
    started dies), so their exit statuses can still be learned."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _job_user(name):
    """uid, gid and home of the one unprivileged user jobs run as, or None ("dynamic" is
    handled by DynamicUsers)."""
    if not name or name == DYNAMIC_USER:
        return None
    import pwd
    try:
        pw = pwd.getpwnam(name) if not str(name).isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise InvalidArgument("job user", name, "an existing user name or uid, or dynamic") \
            from None
    return {"uid": pw.pw_uid, "gid": pw.pw_gid, "home": pw.pw_dir, "name": pw.pw_name}


def parse_uid_range(text):
    """'61184-65519' -> (61184, 65519)."""
    m = re.fullmatch(r"([0-9]{1,10})-([0-9]{1,10})", str(text).strip())
    if not m or not 0 < int(m.group(1)) <= int(m.group(2)) < 2 ** 31:
        raise InvalidArgument("job uid range", text, "FIRST-LAST, such as 61184-65519")
    return int(m.group(1)), int(m.group(2))


class DynamicUsers:
    """A uid and gid of its own for each job owner (serve --job-user dynamic), from a range,
    never one that /etc/passwd or /etc/group knows, and the same for an owner across restarts
    (kept in <state_dir>/uids.json). A uid is handed out only once it is on disk: a table
    that could not be written leaves the owner without one (and the next owner cannot be
    given the same uid after a restart)."""

    def __init__(self, path, uid_range=DEFAULT_UID_RANGE):
        self.path = path
        self.first, self.last = uid_range
        self._lock = threading.Lock()
        self._uids = {}

    def load(self):
        """Read the table; LocalFileError naming the file and the entry if it is not one this
        range could have made (no uid 0, none twice, none an account or group has)."""
        try:
            with open(self.path) as f:
                table = json.load(f)
        except FileNotFoundError:
            table = {}
        except (OSError, ValueError) as e:
            raise LocalFileError(f"cannot read the job uid table {self.path}: {e}") from None
        self._uids = self._checked(table)

    def _checked(self, table):
        def bad(why):
            return LocalFileError(f"the job uid table {self.path} {why}; correct or remove the "
                                  "entry (its owner is given a new uid), or the whole file "
                                  "when no job runs")
        if not isinstance(table, dict):
            raise bad(f"is not an object of owner names and uids (it is {type(table).__name__})")
        seen = {}
        for owner, uid in table.items():
            if not owner or not owner.isprintable():
                raise bad(f"has an entry of no valid owner name: {owner!r}")
            if type(uid) is not int or not self.first <= uid <= self.last:
                raise bad(f"gives {owner!r} the uid {uid!r}, outside --job-uid-range "
                          f"{self.first}-{self.last}")
            if uid in seen:
                raise bad(f"gives {owner!r} and {seen[uid]!r} the same uid {uid}")
            if self._taken_by_system(uid):
                raise bad(f"gives {owner!r} the uid {uid}, which /etc/passwd or /etc/group has")
            seen[uid] = owner
        return dict(table)

    @staticmethod
    def _taken_by_system(uid):
        import grp
        import pwd
        for lookup in (pwd.getpwuid, grp.getgrgid):
            try:
                lookup(uid)
                return True
            except KeyError:
                pass
        return False

    def uid_of(self, owner):
        """The owner's uid (= gid), allocated and saved at its first job. CapReached if the
        range is used up; DiskFull if the table cannot be written (no uid is handed out)."""
        with self._lock:
            uid = self._uids.get(owner)
            if uid is not None:
                return uid
            taken = set(self._uids.values())
            for uid in range(self.first, self.last + 1):
                if uid in taken or self._taken_by_system(uid):
                    continue
                try:
                    _write_json_durably(self.path, {**self._uids, owner: uid})
                except OSError as e:
                    raise DiskFull(self.path, e.errno) from None
                self._uids[owner] = uid
                return uid
        raise CapReached("dynamic job users", f"{self.first}-{self.last}")


def _write_json_durably(path, obj):
    """Replace the file at `path` with obj as JSON, on disk before it returns (file and
    directory synced); a failure leaves the old file and no temp file."""
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, json.dumps(obj, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _set_pipe_size(fd, size=1 << 20):
    """Larger pipes mean fewer wake-ups for a fast writer; the default is 64 KiB."""
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError):   # over fs.pipe-max-size for non-root: keep the default
        pass


# ================================================================================================
# Auth
# ================================================================================================
# Roles travel in a custom X.509 extension of the client certificate:
#   OID   2.25.52511606258847999243873323235950800237  (a UUID-based OID, ITU-T X.667; non-critical)
#   value DER  SEQUENCE OF UTF8String, each one of "reader", "writer", "admin"
# The interceptor reads it from the peer certificate for EVERY call, unary and streaming, and
# decides with POLICY before any servicer code runs. Deny by default.

ROLE_OID = "2.25.52511606258847999243873323235950800237"
ROLES = ("reader", "writer", "admin")
ANY, OWN = "any", "own"          # which jobs a role may act on
AUTHENTICATED = {}               # a method any valid client certificate may call
SERVICE_NAME = "jobworker.v1.JobService"
_READ = {"reader": ANY, "writer": OWN, "admin": ANY}
POLICY = {
    f"/{SERVICE_NAME}/Start": {"writer": OWN, "admin": ANY},
    f"/{SERVICE_NAME}/Stop": {"writer": OWN, "admin": ANY},
    f"/{SERVICE_NAME}/Query": _READ,
    f"/{SERVICE_NAME}/Stream": _READ,
    f"/{SERVICE_NAME}/List": _READ,
    f"/{SERVICE_NAME}/Remove": {"writer": OWN, "admin": ANY},
    f"/{SERVICE_NAME}/Attach": {"writer": OWN, "admin": ANY},   # input: never readers
    f"/{SERVICE_NAME}/Info": {"reader": ANY, "writer": ANY, "admin": ANY},
    # the standard services operators' tools speak: any valid certificate, no role needed
    **{f"/grpc.health.v1.Health/{m}": AUTHENTICATED for m in ("Check", "Watch", "List")},
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": AUTHENTICATED,
}
# grpcio has no minimum-TLS-version setting. With an ECDSA server key and only RSA-authenticated
# TLS 1.2 suites allowed, no TLS 1.2 handshake can succeed; TLS 1.3 suites are not affected by
# this variable. It must be set before grpc is imported. The interceptor checks the version too.
TLS12_NO_SHARED_SUITES = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"

audit_log = _Logger("jobworker.audit")


def _grpc():
    """Import grpc (once), with the TLS 1.2 suites restricted as described above."""
    if "grpc" not in sys.modules:
        os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_NO_SHARED_SUITES
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")   # not a line per failed handshake
    elif os.environ.get("GRPC_SSL_CIPHER_SUITES") != TLS12_NO_SHARED_SUITES:
        # grpc reads the variable once, when it loads: too late now for TLS 1.2 to be refused
        raise JobworkerError("grpc was imported before jobworker could restrict its TLS 1.2 "
                             "cipher suites; import it through jobworker._grpc()")
    import grpc
    return grpc


def _messages():
    """The generated protobuf messages (jobworker_pb2: built from jobworker.proto by `make` or
    build_zipapp.py); grpc is not loaded."""
    try:
        import jobworker_pb2
    except ImportError as e:
        raise JobworkerError(f"generated gRPC modules missing ({e}); run `make stubs`") from None
    return jobworker_pb2


def _pb():
    """The generated protobuf modules: messages and gRPC stubs."""
    _grpc()   # the _grpc module imports grpc: the TLS 1.2 restriction must come first
    pb = _messages()
    try:
        import jobworker_pb2_grpc
    except ImportError as e:
        raise JobworkerError(f"generated gRPC modules missing ({e}); run `make stubs`") from None
    return pb, jobworker_pb2_grpc


def encode_roles(roles):
    """DER of SEQUENCE OF UTF8String."""
    def tlv(tag, body):
        n = len(body)
        size = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + \
            n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag]) + size + body
    return tlv(0x30, b"".join(tlv(0x0C, r.encode()) for r in roles))


def decode_roles(der):
    """Roles from the extension's DER; ValueError if malformed or naming an unknown role."""
    def read_tlv(buf, pos):
        if pos + 2 > len(buf):
            raise ValueError("truncated")
        tag, first = buf[pos], buf[pos + 1]
        pos += 2
        if first & 0x80:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + n > len(buf):
                raise ValueError("bad length")
            size = int.from_bytes(buf[pos:pos + n], "big")
            pos += n
        else:
            size = first
        if pos + size > len(buf):
            raise ValueError("truncated")
        return tag, buf[pos:pos + size], pos + size

    tag, body, end = read_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a SEQUENCE")
    roles, pos = [], 0
    while pos < len(body):
        tag, value, pos = read_tlv(body, pos)
        role = value.decode("utf-8") if tag == 0x0C else None
        if role not in ROLES:
            raise ValueError(f"unknown role {value!r}")
        roles.append(role)
    if not roles:
        raise ValueError("no role")
    return tuple(dict.fromkeys(roles))


@dataclasses.dataclass(frozen=True)
class Caller:
    """The authenticated peer of one call."""
    identity: str      # certificate subject CN
    roles: tuple
    role: str = ""     # the role that granted this call
    scope: str = OWN   # ANY: every job; OWN: jobs it started
    serial: int = 0    # the certificate's serial number

    @property
    def is_admin(self):
        return "admin" in self.roles

    @property
    def owner_filter(self):
        """What JobManager calls take as `owner`: None for every job, else this identity."""
        return None if self.scope == ANY else self.identity

    def listing_owner(self, requested=""):
        """Whose jobs a List asking for `requested` ("": anyone's) shows: None for every
        owner, an identity, or NOBODY (a writer asking for someone else's: nothing, and
        nothing said of whether they exist)."""
        mine = self.owner_filter
        if requested and mine is not None and requested != mine:
            return NOBODY
        return requested or mine


NOBODY = object()


class ClientCert(typing.NamedTuple):
    """What jobworker reads from a client certificate."""
    identity: str
    roles: tuple
    serial: int
    not_before: float
    not_after: float


_identity_cache = {}


def identity_from_pem(pem):
    """The ClientCert of a PEM client certificate; AccessDenied if it has no clientAuth EKU,
    not exactly one CN, a duplicated extension, or a missing or malformed role extension.
    Cached per certificate."""
    cached = _identity_cache.get(pem)
    if cached:
        return cached
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    cert = x509.load_pem_x509_certificate(pem)
    try:
        extensions = cert.extensions   # parsed here: a duplicate is refused, not an error
    except x509.DuplicateExtension as e:
        raise AccessDenied(f"client certificate has a duplicated extension ({e.oid.dotted_string})") \
            from None
    except ValueError as e:
        raise AccessDenied(f"client certificate's extensions cannot be read: {e}") from None
    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = ()
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise AccessDenied("client certificate lacks the clientAuth extended key usage")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not cns[0].value:
        raise AccessDenied(f"client certificate must have exactly one subject CN, the identity "
                           f"(it has {len(cns)}{' empty' if cns and not cns[0].value else ''})")
    try:
        ext = extensions.get_extension_for_oid(x509.ObjectIdentifier(ROLE_OID))
    except x509.ExtensionNotFound:
        ext = None   # no role: only the methods open to every certificate (health, reflection)
    try:
        roles = decode_roles(ext.value.value) if ext else ()
    except (ValueError, UnicodeDecodeError) as e:
        raise AccessDenied(f"client certificate's role extension is malformed: {e}") from None
    result = ClientCert(cns[0].value, roles, cert.serial_number,
                        cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())
    if len(_identity_cache) > 4096:
        _identity_cache.clear()
    _identity_cache[pem] = result
    return result


class RevocationList:
    """Serial numbers of revoked client certificates, one a line in hex (`certs revoke`
    appends to it). Read at start, on reload() (SIGHUP) and whenever the file changes (its
    mtime is looked at once a second at most); a missing file revokes nothing."""

    def __init__(self, path):
        self.path = path
        self.serials = frozenset()
        self._stamp = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.reload()

    def watch(self, on_change):
        """Call on_change(serials) whenever the revoked serials change (looked at once a
        second, and at reload()), until stop_watching()."""
        self._on_change = on_change
        self._watching = threading.Event()
        NamedThread(self._watch, "jobworker-revocation").start()

    def stop_watching(self):
        if getattr(self, "_watching", None):
            self._watching.set()

    def _watch(self):
        while not self._watching.wait(1.0):
            try:
                self.is_revoked(None)   # rereads the file if it changed
            except Exception:
                log.exception("revocation list")

    def reload(self):
        try:
            st = os.stat(self.path)
            with open(self.path) as f:
                serials = frozenset(parse_serial(line) for line in f
                                    if line.strip() and not line.lstrip().startswith("#"))
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            serials, stamp = frozenset(), None
        except (OSError, ValueError) as e:   # keep what was read before: never revoke less
            log.error("revocation list %s: %s", self.path, e)
            return
        with self._lock:
            changed = serials != self.serials
            if changed:
                log.info("revocation list %s: %d revoked", self.path, len(serials))
            self.serials, self._stamp = serials, stamp
        on_change = getattr(self, "_on_change", None)
        if changed and on_change:
            on_change(serials)

    def is_revoked(self, serial):
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                self.reload()
        return serial in self.serials


def parse_serial(text):
    """A certificate serial number written in hex ("1f:a0", "0x1FA0", "1fa0") -> int."""
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{1,64}", digits):
        raise ValueError(f"not a serial number in hex: {text.strip()!r}")
    return int(digits, 16)


def authorize(method, auth_context, policy=POLICY, revoked=None, now=None):
    """The Caller of one call; Unauthenticated or AccessDenied. Every access decision is made
    here and by the Caller it returns (which jobs a call may see: owner_filter, listing_owner)."""
    version = b"".join(auth_context.get("ssl_tls_version", []))
    if version != b"TLSv1.3":
        raise Unauthenticated(f"TLS 1.3 required (connection uses {version.decode() or 'unknown'})")
    pems = auth_context.get("x509_pem_cert")
    if not pems:
        raise AccessDenied("no client certificate")
    cert = identity_from_pem(pems[0])
    now = time.time() if now is None else now
    if not cert.not_before <= now <= cert.not_after:   # a connection may outlive its cert
        raise Unauthenticated(f"client certificate (serial {cert.serial:x}) is not valid now "
                              f"(valid until {_iso_utc(cert.not_after)})")
    if revoked is not None and revoked.is_revoked(cert.serial):
        raise Unauthenticated(f"client certificate (serial {cert.serial:x}) is revoked")
    rules = policy.get(method)
    if rules is None:
        raise AccessDenied(f"{method} is not allowed to anyone")
    if rules is AUTHENTICATED:
        return Caller(cert.identity, cert.roles, "", OWN, cert.serial)
    if not cert.roles:
        raise AccessDenied(f"client certificate has no jobworker role extension ({ROLE_OID})")
    granted = [(rules[r], r) for r in cert.roles if r in rules]
    if not granted:
        raise AccessDenied(f"role {'/'.join(cert.roles)} may not call {method.rsplit('/', 1)[-1]}")
    scope, role = min(granted, key=lambda g: g[0] != ANY)   # ANY beats OWN
    return Caller(cert.identity, cert.roles, role, scope, cert.serial)


def _iso_utc(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class _Undecodable:
    """Stands in for a request message that could not be decoded (grpc would say INTERNAL);
    the interceptor answers it with MalformedRequest."""

    def __init__(self, reason):
        self.reason = reason


def _tolerant(deserialize):
    def decode(data):
        try:
            return deserialize(data)
        except Exception as e:   # protobuf raises DecodeError and others on garbage
            return _Undecodable(str(e) or type(e).__name__)
    return decode


SERVER_ERROR_KEY = "jobworker-error"   # trailing metadata of an error the service raised


def abort_with(context, exc):
    """End the call with the status code ERROR_CODES gives `exc`; returns only if the context
    does not raise (grpc's does). Unexpected errors are logged, and the client learns nothing."""
    grpc = _grpc()
    code = status_code_for(exc)
    if code == "INTERNAL":
        log.error("internal error", exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    # Said by the server itself: a client tells an UNAVAILABLE of ours from an unreachable host.
    context.set_trailing_metadata(((SERVER_ERROR_KEY, code),))
    context.abort(getattr(grpc.StatusCode, code), str(exc))


class CallContext:
    """The grpc context of one call plus its Caller; remembers the status code it ended with
    and its request (for the audit line)."""

    def __init__(self, context, caller):
        self._context = context
        self.caller = caller
        self.code = None
        self.request = None
        self.counted = False   # holds a slot of the interceptor's calls quota
        self.connected = False   # counted as a call in flight of its connection (the guard)
        self.began = 0.0       # time.monotonic() when it arrived
        self.ending = None     # the error that ends it before its end (a revocation)
        self.input_bytes = None   # bytes an Attach wrote to its job (the audit line says)
        self._on_end = []
        self._lock = threading.Lock()

    def add_callback(self, fn):
        """Run fn when the call ends, and also when end() cuts it short (fn may run twice)."""
        with self._lock:
            ended = self.ending is not None
            if not ended:
                self._on_end.append(fn)
        if ended:
            fn()
            return True
        return self._context.add_callback(fn)

    def end(self, exc):
        """Cut the call short with `exc` (from any thread): what waits in it is woken, and it
        ends with exc's status code."""
        with self._lock:
            self.ending = exc
            waiting, self._on_end = self._on_end, []
        for fn in waiting:
            fn()

    def abort(self, code, details):
        self.code = code
        self._context.abort(code, details)

    def set_code(self, code):
        self.code = code
        self._context.set_code(code)

    def __getattr__(self, name):
        return getattr(self._context, name)


DEFAULT_REQUEST_TIMEOUT = 5.0   # seconds a call's request message may take to arrive
REFUSED_WAITING = 64            # refused calls waiting briefly for their request (audit lines)
REFUSED_WAIT = 0.5              # ... seconds each, at most


def _next_request(requests, timeout):
    """The next message of a call's request stream, waiting at most `timeout` seconds
    (RequestTimeout past it); StopIteration at its end. grpc's sync server has no read with
    a deadline: its iterator (grpc/_server.py, _RequestIterator._next) waits forever. This
    is that method with a bounded wait, on the same state; the pinned grpcio is checked to
    have it when the server starts (check_grpc_internals)."""
    from grpc._server import _RECEIVE_MESSAGE_TOKEN
    state = requests._state
    deadline = time.monotonic() + timeout
    with state.condition:
        # (a receive started by a wait that timed out is still due: its message is this one)
        if state.request is None and _RECEIVE_MESSAGE_TOKEN not in state.due:
            requests._raise_or_start_receive_message()
        while True:
            request = requests._look_for_request()
            if request is not None:
                return request
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(timeout)
            state.condition.wait(remaining)


def check_grpc_internals():
    """JobworkerError unless this grpcio has what _next_request uses."""
    from grpc import _server
    iterator = getattr(_server, "_RequestIterator", None)
    if not hasattr(_server, "_RECEIVE_MESSAGE_TOKEN") or not all(
            hasattr(iterator, n) for n in ("_raise_or_start_receive_message",
                                           "_look_for_request")):
        raise JobworkerError(f"grpcio {_grpc().__version__} lacks the request iterator this "
                             "server bounds its reads with; use the pinned grpcio")


class _BoundedRequests:
    """A request stream whose every message must come within `timeout` seconds (next(): a
    handler that waits longer on purpose, as Attach for the input of a quiet user, says how
    long at each wait)."""

    def __init__(self, requests, timeout):
        self._requests, self._timeout = requests, timeout

    def __iter__(self):
        return self

    def __next__(self):
        return _next_request(self._requests, self._timeout)

    def next(self, timeout):
        """The next message within `timeout` seconds: RequestTimeout, StopIteration."""
        return _next_request(self._requests, timeout)


class AuthInterceptor:
    """grpc server interceptor: authorizes every call of every kind and writes its audit line.

    Every method is served as if its request were a stream (the same bytes on the wire): the
    handler thread starts when the call arrives, not when its request message has come, so
    the caller is authorized, counted against its identity's share of the calls in flight
    and audited before anything waits, and a request that does not come within
    `request_timeout` seconds ends the call (DEADLINE_EXCEEDED). grpc's own unary path waits
    for the message in a pool thread, with no deadline, before any interceptor code runs."""

    def __init__(self, policy=POLICY, calls=None, revoked=None, metrics=None,
                 request_timeout=DEFAULT_REQUEST_TIMEOUT):
        self.policy = policy
        self.calls = calls   # a Quota of calls in flight, per identity and for admins
        self.revoked = revoked   # a RevocationList
        self.metrics = metrics   # a Metrics: every call is counted and timed
        self.request_timeout = request_timeout
        self.connections = None   # a ConnectionGuard, told of each authorized call's peer
        self._open = {}           # certificate serial -> CallContexts of its calls in flight
        self._open_lock = threading.Lock()
        # Refused calls wait a moment for their request, so that the audit line names the
        # job; only this many at once, so refused certificates cannot hold threads.
        self._refused = Quota("refused calls waiting", REFUSED_WAITING, REFUSED_WAITING // 4)
        self._handlers = {}   # method -> the wrapped handler (one per method, made once)
        self.grpc = _grpc()

    def intercept_service(self, continuation, details):
        method = details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = continuation(details)
            if handler is None:
                return None   # unknown method: grpc answers UNIMPLEMENTED
            wrapped = self._handlers[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler, method):
        grpc = self.grpc
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        decode = handler.request_deserializer
        if handler.response_streaming:
            wrap, make = self._wrap_stream, grpc.stream_stream_rpc_method_handler
        else:
            wrap, make = self._wrap_unary, grpc.stream_unary_rpc_method_handler
        return make(wrap(behavior, method, handler.request_streaming),
                    decode and _tolerant(decode), handler.response_serializer)

    def _enter(self, method, requests, context, request_streaming):
        """The CallContext of an admitted call and its request (the message, or the bounded
        stream of them); a refused call is audited and aborted here."""
        ctx = CallContext(context, None)
        ctx.began = time.monotonic()
        try:
            ctx.caller = authorize(method, context.auth_context(), self.policy, self.revoked)
            if self.connections is not None:
                self.connections.authenticated(context.peer(), ctx.caller)
                ctx.connected = True
            if self.calls is not None:   # no identity may hold every handler thread
                self.calls.take(ctx.caller.identity, ctx.caller.is_admin)
                ctx.counted = True
            with self._open_lock:
                self._open.setdefault(ctx.caller.serial, set()).add(ctx)
            if request_streaming:
                return ctx, _BoundedRequests(requests, self.request_timeout)
            ctx.request = self._request(requests, self.request_timeout)
            return ctx, ctx.request
        except Exception as e:
            self._leave(ctx)
            if ctx.request is None and not request_streaming and not isinstance(
                    e, (RequestTimeout, MalformedRequest)):
                self._peek_request(ctx, requests)
            code = getattr(self.grpc.StatusCode, status_code_for(e))
            self._ended(ctx, method, ctx.request, None, code)
            abort_with(ctx, e)

    @staticmethod
    def _request(requests, timeout):
        """The one request message of a unary-request call."""
        try:
            request = _next_request(requests, timeout)
        except StopIteration:
            raise MalformedRequest("the call ended without its request message") from None
        if isinstance(request, _Undecodable):
            raise MalformedRequest(request.reason)
        return request

    def _peek_request(self, ctx, requests):
        """A refused call's request, if it comes at once: its audit line then names the job."""
        key = ctx.caller.identity if ctx.caller else ctx.peer()
        try:
            self._refused.take(key)
        except CapReached:
            return
        try:
            ctx.request = self._request(requests, REFUSED_WAIT)
        except JobworkerError:
            pass
        finally:
            self._refused.give(key)

    def _ended(self, ctx, method, request, response, code):
        self._audit(ctx, method, request, response, code)
        if self.metrics:
            self.metrics.rpc(method, code.name, time.monotonic() - ctx.began)

    def _leave(self, ctx):
        if ctx.caller is not None:
            with self._open_lock:
                mine = self._open.get(ctx.caller.serial)
                if mine is not None:
                    mine.discard(ctx)
                    if not mine:
                        del self._open[ctx.caller.serial]
        if ctx.counted:
            ctx.counted = False
            self.calls.give(ctx.caller.identity)
        if ctx.connected:
            ctx.connected = False
            self.connections.left(ctx.peer())

    def revoked_now(self, serials):
        """End the calls in flight of certificates just revoked (UNAUTHENTICATED)."""
        with self._open_lock:
            ending = [c for serial in serials for c in self._open.get(serial, ())]
        for ctx in ending:
            ctx.end(Unauthenticated(f"client certificate (serial {ctx.caller.serial:x}) "
                                    "was revoked"))

    def _wrap_unary(self, behavior, method, request_streaming):
        def call(requests, context):
            ctx, request = self._enter(method, requests, context, request_streaming)
            response = None
            try:
                response = behavior(request, ctx)
                if ctx.ending is not None:
                    raise ctx.ending
                return response
            except Exception as e:
                if ctx.code is not None:   # the behavior ended the call itself
                    raise
                abort_with(ctx, ctx.ending or e)
            finally:
                self._leave(ctx)
                self._ended(ctx, method, ctx.request, response, self._code(ctx, sys.exc_info()))
        return call

    def _wrap_stream(self, behavior, method, request_streaming):
        def call(requests, context):
            ctx, request = self._enter(method, requests, context, request_streaming)
            try:
                for response in behavior(request, ctx):
                    if ctx.ending is not None:
                        break
                    yield response
                if ctx.ending is not None:
                    raise ctx.ending
            except Exception as e:
                if ctx.code is not None:
                    raise
                abort_with(ctx, ctx.ending or e)
            finally:
                self._leave(ctx)
                self._ended(ctx, method, ctx.request, None, self._code(ctx, sys.exc_info()))
        return call

    def _code(self, ctx, exc_info):
        if ctx.code is not None:
            return ctx.code
        if exc_info[0] is None:   # (a stream the client left ended the handler too)
            return self.grpc.StatusCode.OK if ctx.is_active() else self.grpc.StatusCode.CANCELLED
        if exc_info[0] is GeneratorExit or not ctx.is_active():
            return self.grpc.StatusCode.CANCELLED
        return self.grpc.StatusCode.UNKNOWN

    @staticmethod
    def _audit(ctx, method, request, response, code):
        """One line per call, denied ones included: who (identity, role, certificate serial,
        peer address), what (method, job) and how it ended."""
        caller = ctx.caller
        job_id = getattr(request, "job_id", "") or getattr(response, "job_id", "") or "-"
        if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
            job_id = "invalid" if job_id != "-" else "-"
        serial = "-"
        if caller:
            serial = f"{caller.serial:x}"
        else:   # refused before a Caller existed: the certificate may still say who it was
            with contextlib.suppress(ValueError, TypeError):
                pem = ctx.auth_context().get("x509_pem_cert")
                if pem:
                    from cryptography import x509
                    serial = f"{x509.load_pem_x509_certificate(pem[0]).serial_number:x}"
        extra = "" if ctx.input_bytes is None else f" input_bytes={ctx.input_bytes}"
        audit_log.info("identity=%s role=%s serial=%s peer=%s method=%s job=%s code=%s%s",
                       json.dumps(caller.identity) if caller else "-",
                       (caller.role or "-") if caller else "-", serial, ctx.peer() or "-",
                       method.rsplit("/", 1)[-1], job_id, code.name, extra)


# ================================================================================================
# Service
# ================================================================================================

DEFAULT_MAX_STREAMS = 1000
DEFAULT_MAX_STREAMS_PER_OWNER = 256
UNARY_CALLS_PER_OWNER = 16    # unary calls of one identity in flight at once (slow Stops)
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
UNARY_WORKERS = 64
QUEUED_CALLS_PER_WORKER = 4
MAX_STREAMS_PER_CONNECTION = 128   # HTTP/2 streams of one connection at once (calls)
STREAM_CHUNK = 1 << 20

# Output goes out already encoded (as StreamResponse bytes, the serializer passes them on): a
# message object would copy the data in and again out, the largest cost of a stream after TLS.
# Byte for byte what protobuf's SerializeToString gives: fields in order, zeros left out.

def _varint(n):
    if not 0 <= n < 1 << 64:   # as protobuf refuses it
        raise ValueError(f"{n} is not a uint64")
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag, value):
    """A varint field, left out when 0 (proto3)."""
    return tag + _varint(value) if value else b""


def _wrapped(tag, parts, size):
    """A length-delimited field holding `parts` (their total length: size)."""
    return b"".join([tag, _varint(size), *parts])


def encode_output_chunk(stream, offset, data):
    """StreamResponse{chunk: OutputChunk{stream, offset, data}} as bytes."""
    head = _field(b"\x08", stream) + _field(b"\x10", offset)
    if data:
        head += b"\x1a" + _varint(len(data))
    return _wrapped(b"\x0a", (head, data), len(head) + len(data))


def encode_output_batch(offset, data, first_stream, lengths):
    """StreamResponse{batch: OutputBatch{offset, data, first_stream, lengths}} as bytes."""
    head = _field(b"\x08", offset) + (b"\x12" + _varint(len(data)) if data else b"")
    tail = _field(b"\x18", first_stream)
    if lengths:
        packed = b"".join(_varint(n) for n in lengths)
        tail += b"\x22" + _varint(len(packed)) + packed
    return _wrapped(b"\x1a", (head, data, tail), len(head) + len(data) + len(tail))


class AttachInput(typing.NamedTuple):
    """An AttachRequest that holds only input, as decode_attach_request gives it: its bytes
    as a view of the message, never copied."""
    data: memoryview


def encode_attach_input(data):
    """AttachRequest{input: data} as bytes (what protobuf's SerializeToString gives)."""
    return b"\x12" + _varint(len(data)) + data


def decode_attach_request(parse):
    """A request deserializer for Attach: input alone (nearly every message) becomes an
    AttachInput without a copy; anything else is parsed by protobuf's `parse`."""
    def decode(raw):
        if raw[:1] == b"\x12":
            n, shift, i = 0, 0, 1
            while i < len(raw) and i <= 10:
                byte = raw[i]
                n |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    if i + n == len(raw):
                        return AttachInput(memoryview(raw)[i:])
                    break
                shift += 7
        return parse(raw)
    return decode


def _passing_bytes(serialize):
    """A response serializer that sends bytes as they are (already encoded)."""
    return lambda msg: msg if type(msg) is bytes else serialize(msg)


def add_job_service(service, server):
    """Register `service` for every method of JobService (as the generated
    add_JobServiceServicer_to_server does), with Stream's responses sent as encoded."""
    grpc = _grpc()
    pb = _messages()
    handlers = {}
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    for m in pb.DESCRIPTOR.services_by_name["JobService"].methods:
        make = kinds.get((m.client_streaming, m.server_streaming))
        if make is None:   # none is: the kind would have to be added here
            raise NotImplementedError(f"client-streaming method {m.name}")
        serialize = getattr(pb, m.output_type.name).SerializeToString
        parse = getattr(pb, m.input_type.name).FromString
        handlers[m.name] = make(
            getattr(service, m.name),
            request_deserializer=decode_attach_request(parse) if m.name == "Attach" else parse,
            response_serializer=_passing_bytes(serialize) if m.server_streaming else serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _timestamp(pb_ts, seconds):
    if seconds is not None:
        pb_ts.FromNanoseconds(int(seconds * 1e9))


# Library names -> proto names, spelled out: no reliance on equal enum numbers, and a usage key
# without a proto field is an error, not dropped.
STREAM_TO_PROTO = {STDOUT: "OUTPUT_STREAM_STDOUT", STDERR: "OUTPUT_STREAM_STDERR"}
STATE_TO_PROTO = {QUEUED: "JOB_STATE_QUEUED", RUNNING: "JOB_STATE_RUNNING",
                  EXITED: "JOB_STATE_EXITED",
                  STOPPED: "JOB_STATE_STOPPED", LOST: "JOB_STATE_LOST",
                  FAILED: "JOB_STATE_FAILED"}
STDIN_TO_PROTO = {STDIN_NULL: "STDIN_MODE_NULL", STDIN_PIPE: "STDIN_MODE_PIPE",
                  STDIN_TTY: "STDIN_MODE_TTY"}
assert set(STDIN_TO_PROTO) == set(STDIN_MODES)
USAGE_TO_PROTO = {"cpu_seconds": "cpu_seconds", "memory_bytes": "memory_bytes",
                  "memory_peak_bytes": "memory_peak_bytes", "io_read_bytes": "io_read_bytes",
                  "io_write_bytes": "io_write_bytes", "tasks": "tasks"}
assert set(USAGE_TO_PROTO) == set(USAGE_KEYS)


def usage_to_proto(pb, usage):
    """A usage dict (as Cgroup.usage() returns) -> jobworker.v1.Usage."""
    unknown = set(usage or ()) - set(USAGE_TO_PROTO)
    if unknown:
        raise ValueError(f"usage keys without a proto field: {sorted(unknown)}")
    return pb.Usage(**{USAGE_TO_PROTO[k]: v for k, v in (usage or {}).items()})


def output_pieces(pb, msg):
    """[(proto stream, offset, data)] of a StreamResponse's output, whether it came as one
    chunk or as a batch of runs that alternate between the streams."""
    kind = msg.WhichOneof("item")
    if kind == "chunk":
        return [(msg.chunk.stream, msg.chunk.offset, msg.chunk.data)]
    if kind != "batch":
        return []
    b, out, start = msg.batch, [], 0
    data, base = b.data, b.offset   # each access of a field makes a new object: once each
    stream, other = b.first_stream, {pb.OUTPUT_STREAM_STDOUT: pb.OUTPUT_STREAM_STDERR,
                                     pb.OUTPUT_STREAM_STDERR: pb.OUTPUT_STREAM_STDOUT}
    for n in b.lengths:
        out.append((stream, base + start, data[start:start + n]))
        stream, start = other[stream], start + n
    return out


def status_to_proto(pb, s):
    """JobStatus -> jobworker.v1.JobStatus."""
    msg = pb.JobStatus(
        job_id=s.id, owner=s.owner, command=s.command,
        limits=pb.Limits(cpu_percent=s.limits.cpu_percent or 0,
                         memory_bytes=s.limits.memory_bytes or 0,
                         io_bytes_per_second=s.limits.io_bytes_per_second or 0,
                         pids=s.limits.pids or 0),
        state=pb.JobState.Value(STATE_TO_PROTO[s.state]), oom_killed=s.oom_killed,
        usage=usage_to_proto(pb, s.usage),
        log_truncated=s.log_truncated, log_error=s.log_error, output_bytes=s.output_bytes,
        pid=s.pid or 0, lost_reason=s.lost_reason, name=s.name, env_keys=s.env_keys,
        workdir=s.workdir, timeout_seconds=s.timeout or 0, timed_out=s.timed_out,
        failure=s.failure, stdin=pb.StdinMode.Value(STDIN_TO_PROTO[s.stdin]),
        queue_position=s.queue_position, queue_timeout_seconds=s.queue_timeout or 0,
        queue_timed_out=s.queue_timed_out)
    if s.queued_at is not None:
        _timestamp(msg.queued_at, s.queued_at)
    if s.exit_code is not None:
        msg.exit_code = s.exit_code
    if s.signal is not None:
        msg.signal = s.signal
    _timestamp(msg.started_at, s.started_at or None)   # (0: it has not run)
    _timestamp(msg.ended_at, s.ended_at)
    return msg


LIST_PAGE_DEFAULT = 500
LIST_PAGE_MAX = 1000
LIST_PAGE_BYTES = 1 << 20   # well under the 4 MiB a default gRPC client accepts


def encode_page_token(key, newest_first):
    """An opaque token for the position after `key` (a JobStatus.order_key)."""
    import base64
    raw = json.dumps([key[0], key[1], bool(newest_first)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token, newest_first):
    """The order_key a token stands for; InvalidArgument unless it is a token of a listing in
    the same direction."""
    import base64
    accepted = "the next_page_token of a previous page of the same listing"
    try:
        started, job_id, direction = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if (not isinstance(started, (int, float)) or isinstance(started, bool)
                or not _JOB_ID_RE.fullmatch(job_id) or direction is not bool(newest_first)):
            raise ValueError(token)
    except (ValueError, TypeError):
        raise InvalidArgument("page_token", token, accepted) from None
    return (float(started), job_id)


class JobService:
    """The servicer: translates between proto messages and JobManager; decides nothing about
    access (the interceptor did, and passed the Caller on the context)."""

    def __init__(self, manager, max_streams=DEFAULT_MAX_STREAMS,
                 max_streams_per_owner=DEFAULT_MAX_STREAMS_PER_OWNER, metrics=None):
        self.manager = manager
        self.metrics = metrics
        self.pb, _ = _pb()
        self._streams_pb = {k: self.pb.OutputStream.Value(v) for k, v in STREAM_TO_PROTO.items()}
        self._states_from_pb = {v: k for k, v in STATE_TO_PROTO.items()}
        self._stdin_from_pb = {self.pb.StdinMode.Value(v): k for k, v in STDIN_TO_PROTO.items()}
        self.streams = Quota("concurrent streams", max_streams, max_streams_per_owner)

    def Start(self, request, context):
        r, t = request.resources, request.terminal
        if request.stdin not in self._stdin_from_pb:
            raise InvalidArgument("stdin", request.stdin, "STDIN_MODE_NULL, _PIPE or _TTY")
        size = (t.size.rows, t.size.columns) if t.HasField("size") else None
        status = self.manager.start(request.name, list(request.args),
                                    dict(cpu=r.cpu_quota, memory=r.memory_limit,
                                         disk_io=r.disk_io, pids=r.pids),
                                    owner=context.caller.identity,
                                    admin=context.caller.is_admin, env=dict(request.env),
                                    workdir=request.workdir, timeout=request.timeout_seconds,
                                    name=request.job_name,
                                    stdin=self._stdin_from_pb[request.stdin], term=t.term,
                                    window=size, queue=request.queue,
                                    queue_timeout=request.queue_timeout_seconds)
        return self.pb.StartResponse(job_id=status.id, status=status_to_proto(self.pb, status))

    def Stop(self, request, context):
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        status = self.manager.stop(request.job_id, grace, owner=context.caller.owner_filter,
                                   gone=lambda: context.ending is not None or
                                   not context.is_active())   # (revoked, or cancelled)
        return self.pb.StopResponse(status=status_to_proto(self.pb, status))

    def Query(self, request, context):
        status = self.manager.status(request.job_id, owner=context.caller.owner_filter)
        return self.pb.QueryResponse(status=status_to_proto(self.pb, status))

    def List(self, request, context):
        pb = self.pb
        owner = context.caller.listing_owner(request.owner)
        if owner is NOBODY:
            return pb.ListResponse()
        states = set()
        for value in request.states:
            name = pb.JobState.Name(value) if value in pb.JobState.values() else None
            state = self._states_from_pb.get(name)
            if state is None:
                raise InvalidArgument("states", value, "queued, running, exited, stopped, lost "
                                      "or failed")
            states.add(state)
        size = min(request.page_size or LIST_PAGE_DEFAULT, LIST_PAGE_MAX)
        after = (decode_page_token(request.page_token, request.newest_first)
                 if request.page_token else None)
        jobs, total, last, more = [], 0, None, False
        prefix = request.id_prefix.lower() or None
        if prefix is not None and not _JOB_ID_PREFIX_RE.fullmatch(prefix):
            raise InvalidArgument("id_prefix", request.id_prefix, "the start of a job id")
        for status in self.manager.table.walk(owner, states, after, request.newest_first,
                                        request.name or None, prefix, live_usage=True):
            msg = status_to_proto(pb, status)
            n = msg.ByteSize() + 8
            if jobs and (len(jobs) >= size or total + n > LIST_PAGE_BYTES):
                more = True
                break
            jobs.append(msg)
            total += n
            last = status
        token = encode_page_token(last.order_key, request.newest_first) if more else ""
        return pb.ListResponse(jobs=jobs, next_page_token=token)

    def Info(self, request, context):
        m = self.manager
        ncpu = os.cpu_count() or 1
        return self.pb.InfoResponse(
            version=__version__, cgroup_version=m.cgroups.version, cpus=ncpu,
            cpu_percent_min=MIN_CPU_QUOTA_US * 100 / CPU_PERIOD_US, cpu_percent_max=ncpu * 100,
            disks=list(m.devices), default_pids=m.default_pids or 0,
            default_grace_seconds=m.grace, max_jobs=m.caps()["max_jobs"],
            max_jobs_per_owner=m.caps()["max_jobs_per_owner"], max_streams=self.streams.cap,
            max_streams_per_owner=self.streams.per_owner, keep_finished=m.retention.keep,
            keep_for_seconds=m.retention.keep_for or 0, log_cap_bytes=m.log_cap,
            live_restore=m.live_restore, max_queued=m.queue.max_queued,
            max_queued_per_owner=m.queue.max_per_owner)

    def Remove(self, request, context):
        self.manager.remove(request.job_id, owner=context.caller.owner_filter)
        return self.pb.RemoveResponse()

    def Stream(self, request, context):
        caller = context.caller
        self.streams.take(caller.identity, caller.is_admin)
        follow = None
        try:
            follow = self.manager.follow(request.job_id, request.offset,
                                         owner=context.caller.owner_filter,
                                         max_chunk=STREAM_CHUNK)
            # A client that goes away ends the follow at once and gives the thread back.
            context.add_callback(follow.cancel)
            context.send_initial_metadata(())   # the client learns at once that it is admitted
            sent = self.metrics.streamed if self.metrics else (lambda n: None)
            if request.status_only:
                follow.wait_end()
            elif request.batch:   # one message per read of the log: at most STREAM_CHUNK bytes
                for offset, data, first, lengths in follow.runs():
                    yield encode_output_batch(offset, data, self._streams_pb[first], lengths)
                    sent(len(data))
            else:
                for c in follow:
                    yield encode_output_chunk(self._streams_pb[c.stream], c.offset, c.data)
                    sent(len(c.data))
            if not follow.cancelled:
                # from the follow's own job: the final status even if it was removed meanwhile
                yield self.pb.StreamResponse(
                    final_status=status_to_proto(self.pb, follow.final_status()))
        finally:
            if follow is not None:
                follow.close()
            self.streams.give(caller.identity)

    def Attach(self, requests, context):
        """Output down as Stream's batches, then the final status; input up, written by a
        thread of its own (`_feed`) as it comes. An error in the input ends the call."""
        first = next(requests, None)
        if first is None or isinstance(first, (_Undecodable, AttachInput)) or \
                first.WhichOneof("item") != "start":
            raise InvalidArgument("the first AttachRequest", "(not start)",
                                  "an AttachStart naming the job")
        context.request = first.start   # (the audit line names the job)
        caller = context.caller
        self.streams.take(caller.identity, caller.is_admin)
        attached, done, failed = None, threading.Event(), []
        try:
            offset = first.start.offset if first.start.HasField("offset") else None
            attached = self.manager.attach(first.start.job_id, offset,
                                           owner=caller.owner_filter, max_chunk=STREAM_CHUNK)
            follow = attached.follow
            context.add_callback(follow.cancel)
            context.input_bytes = 0
            context.send_initial_metadata(())
            NamedThread(self._feed, "jobworker-attach",
                        (attached, requests, done, failed)).start()
            sent = self.metrics.streamed if self.metrics else (lambda n: None)
            for at, data, first_stream, lengths in follow.runs():
                yield encode_output_batch(at, data, self._streams_pb[first_stream], lengths)
                sent(len(data))
            if failed:
                raise failed[0]
            if not follow.cancelled:
                yield self.pb.StreamResponse(
                    final_status=status_to_proto(self.pb, follow.final_status()))
        finally:
            done.set()
            try:
                if attached is not None:
                    attached.close()
                    context.input_bytes = attached.input_bytes
            finally:
                self.streams.give(caller.identity)

    def _feed(self, attached, requests, done, failed):
        """Attach's input thread: each message to the job, until the request stream or the
        call ends; an error is kept for the call to end with."""
        grpc = _grpc()
        try:
            while not done.is_set():
                try:
                    msg = requests.next(INPUT_POLL * 4)
                except RequestTimeout:
                    continue
                if isinstance(msg, AttachInput):   # (most messages)
                    attached.write(msg.data, done.is_set)
                    continue
                if isinstance(msg, _Undecodable):
                    raise MalformedRequest(msg.reason)
                kind = msg.WhichOneof("item")
                if kind == "input":
                    attached.write(msg.input, done.is_set)
                elif kind == "resize":
                    attached.resize(msg.resize.rows, msg.resize.columns, done.is_set)
                elif kind == "eof":
                    attached.end_input(done.is_set)
                else:
                    raise InvalidArgument("AttachRequest", kind or "(empty)",
                                          "input, resize or eof after the first message")
        except (StopIteration, grpc.RpcError):
            pass   # the client's input has ended, or the call has
        except Exception as e:
            failed.append(e)
            attached.follow.cancel()


# ================================================================================================
# Server
# ================================================================================================

DEFAULT_LISTEN = "[::]:50051"
MAX_CONNECTION_AGE_MS = 3600 * 1000
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 60_000, 20_000
REVOKED_FILE = "revoked.txt"
DEFAULT_SERVER = "localhost:50051"
SHUTDOWN_GRACE = 30.0


def _read_file(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise LocalFileError(f"cannot read {what} {path}: {e.strerror}") from None


def check_server_key(path):
    """The server key must be private and ECDSA (TLS 1.3-only enforcement relies on it)."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise LocalFileError(f"server key {path} is readable by group or others "
                             f"(mode {mode & 0o777:o}); run: chmod 600 {path}")
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key(_read_file(path, "server key"), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise LocalFileError(f"server key {path} must be an ECDSA key: with it, no TLS 1.2 "
                             "cipher suite can be agreed (make one with `certs init`)")


DEFAULT_HANDSHAKE_TIMEOUT = 5.0           # seconds from TCP connect to a finished TLS handshake
DEFAULT_MAX_CONNECTIONS = 8192            # connections of the gRPC port at once
DEFAULT_MAX_UNAUTHENTICATED = 512         # ... that have made no authorized call yet
DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE = 64   # ... from one address
DEFAULT_MAX_CONNECTIONS_PER_IDENTITY = 64     # idle ones of one identity (admins: no bound)
FDS_SERVER_PER_JOB = 4                    # a running job's fds in the server: pidfd, 2 pipes,
                                          # the write end of its stdin
FDS_PER_STREAM = 2                        # a Stream call's open output files
GUARD_INTERVAL = 0.25                     # seconds between looks at the port's connections


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one gRPC server admits: calls, messages, connections and how long each may take."""
    max_streams: int = DEFAULT_MAX_STREAMS
    max_streams_per_owner: int = DEFAULT_MAX_STREAMS_PER_OWNER
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_source: int = DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE
    max_connections_per_identity: int = DEFAULT_MAX_CONNECTIONS_PER_IDENTITY

    def connection_budget(self, open_files, max_jobs):
        """max_connections, lowered so that the connections leave the fds the jobs, their
        streams and the server's own files need (FD_RESERVE)."""
        spare = (open_files - FD_RESERVE - FDS_SERVER_PER_JOB * max_jobs
                 - FDS_PER_STREAM * self.max_streams)
        return max(16, min(self.max_connections, spare))


# sock_diag (linux/inet_diag.h, linux/netlink.h): the kernel's table of the port's TCP
# connections, with each one's counters (struct tcp_info).
_NLMSG = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBxI")
_DIAG_SOCKID = struct.Struct("!HH16s16sI8s")
_DIAG_MSG = struct.Struct("=BBBB")
_DIAG_TAIL = struct.Struct("=IIIII")     # expires, rqueue, wqueue, uid, inode
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, NLM_F_DUMP = 4, 20, 1, 0x300
NLMSG_ERROR, NLMSG_DONE, INET_DIAG_REQ_BYTECODE, INET_DIAG_INFO = 2, 3, 1, 2
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
TCPF_ESTABLISHED = 1 << 1
_TCPI_LAST_DATA_RECV, _TCPI_BYTES_RECEIVED = 52, 128   # offsets in struct tcp_info


class TcpConnection(typing.NamedTuple):
    address: str       # the peer's, IPv4-mapped IPv6 addresses as plain IPv4
    port: int
    inode: int
    idle_ms: int       # since the peer last sent data (since the connection began, if never)
    received: int      # bytes the peer has sent


def _address(family, raw):
    text = socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)
    return text.removeprefix("::ffff:") if "." in text else text


def tcp_connections(port):
    """Established TCP connections whose local port is `port` (IPv4 and IPv6), from the
    kernel (sock_diag, filtered by port in the kernel)."""
    # two port tests (>= and <=: both kernels old and new have them); reaching the end is a
    # match, a jump past it (len + 4) is none
    bytecode = (struct.pack("=BBH", INET_DIAG_BC_S_GE, 8, 20) + struct.pack("=BBH", 0, 0, port)
                + struct.pack("=BBH", INET_DIAG_BC_S_LE, 8, 12) + struct.pack("=BBH", 0, 0, port))
    attr = struct.pack("=HH", 4 + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    out = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            body = (_DIAG_REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1),
                                   TCPF_ESTABLISHED)
                    + _DIAG_SOCKID.pack(0, 0, b"", b"", 0, b"\xff" * 8) + attr)
            nl.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
            while _read_diag(nl.recv(1 << 20), out):
                pass
    return out


def _read_diag(data, out):
    """Parse one netlink read of a dump into `out`; False once the dump is done."""
    at = 0
    while at + _NLMSG.size <= len(data):
        length, kind = _NLMSG.unpack_from(data, at)[:2]
        if kind == NLMSG_DONE:
            return False
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", data, at + _NLMSG.size)[0]
            raise OSError(err, f"sock_diag: {os.strerror(err)}")
        msg = at + _NLMSG.size
        family = data[msg]
        _, dport, _, dst, _, _ = _DIAG_SOCKID.unpack_from(data, msg + 4)
        inode = _DIAG_TAIL.unpack_from(data, msg + 4 + _DIAG_SOCKID.size)[4]
        idle, received, a = 0, 0, msg + 4 + _DIAG_SOCKID.size + _DIAG_TAIL.size
        while a + 4 <= at + length:
            alen, atype = struct.unpack_from("=HH", data, a)
            if atype == INET_DIAG_INFO and alen >= 4 + _TCPI_BYTES_RECEIVED + 8:
                idle = struct.unpack_from("=I", data, a + 4 + _TCPI_LAST_DATA_RECV)[0]
                received = struct.unpack_from("=Q", data, a + 4 + _TCPI_BYTES_RECEIVED)[0]
            a += (alen + 3) & ~3
        out.append(TcpConnection(_address(family, dst), dport, inode, idle, received))
        at += (length + 3) & ~3
    return True


def peer_address(peer):
    """(address, port) of a grpc peer string ("ipv4:127.0.0.1:5", "ipv6:%5B::1%5D:5"), in
    tcp_connections' form; None for other kinds of peer."""
    import urllib.parse
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host, _, port = urllib.parse.unquote(rest).rpartition(":")
    host = host.strip("[]")
    return (host.removeprefix("::ffff:") if "." in host else host), int(port)


class ConnectionGuard:
    """Bounds the connections of the gRPC port that have not yet made an authorized call:
    `total` of them at once, `per_source` from one address. grpc accepts connections itself
    (and bounds them only all together, with grpc.max_allowed_incoming_connections), so a
    thread looks at the port's connections in the kernel every GUARD_INTERVAL and shuts down
    the ones past the bounds: first those that never sent a byte, then the idlest, so that a
    client in the middle of its handshake stays. The interceptor reports authorized calls
    (authenticated(peer, caller), left(peer)): a connection with a call in flight, or an
    admin's, is never touched; of an identity's idle ones, those past `per_identity` are shut
    down, the idlest first, and past `known_total` in all, those of whoever holds the most.
    After a flood, memory freed by the connections is handed back to the system
    (malloc_trim)."""

    def __init__(self, port, total, per_source, metrics=None,
                 per_identity=DEFAULT_MAX_CONNECTIONS_PER_IDENTITY, known_total=None):
        self.port, self.total, self.per_source = port, total, per_source
        self.metrics = metrics
        self.per_identity, self.known_total = per_identity, known_total
        self._known = {}   # (address, port) of a connection that made an authorized call ->
                           # [identity (None: an admin's), its calls in flight]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._peak = 0        # most connections seen since memory was last handed back
        self._shed = 0        # connections shut down since then
        self._settle = None   # monotonic time to hand memory back once more after a flood
        self._said = {}       # source -> monotonic time it was last named in the log
        self.closed = 0

    def authenticated(self, peer, caller):
        """A call of `caller` (a Caller) on the connection of `peer` began."""
        key = peer_address(peer)
        if key is not None:
            with self._lock:
                known = self._known.setdefault(key, [None, 0])
                known[0] = None if caller.is_admin else caller.identity
                known[1] += 1

    def left(self, peer):
        """... and ended."""
        key = peer_address(peer)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                known[1] -= 1

    def start(self):
        """Start watching; None (and a warning) where the kernel will not tell (no sock_diag)."""
        try:
            tcp_connections(self.port)
        except OSError as e:
            log.warning("connections that have not authenticated are bounded only in all "
                        "(--max-connections): this kernel does not list them (%s)", e)
            return None
        self._thread = NamedThread(self._run, "jobworker-guard")
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self):
        busy = False
        while not self._stop.wait(0 if busy else GUARD_INTERVAL):
            try:   # while connections come faster than they are shut down: at once again
                busy = self.sweep() > 0
            except Exception:
                log.exception("connection guard")
                busy = False

    def sweep(self):
        """One look at the port's connections: shut down what is past the bounds; returns
        how many."""
        connections = tcp_connections(self.port)
        here = {(c.address, c.port) for c in connections}
        with self._lock:
            for key in self._known.keys() - here:
                del self._known[key]
            known = {key: tuple(v) for key, v in self._known.items()}
        # kept first: those whose peer has said something (a TLS client does at once), the
        # most recently active first; those that never sent a byte go first
        waiting = sorted((c for c in connections if (c.address, c.port) not in known),
                         key=lambda c: (c.received == 0, c.idle_ms))
        kept, by_source, excess = 0, {}, []
        for c in waiting:
            n = by_source.get(c.address, 0)
            if n >= self.per_source or kept >= self.total:
                excess.append(c)
                continue
            by_source[c.address] = n + 1
            kept += 1
        for source in {c.address for c in excess}:
            self._say(source, "closing connections from %s that have not authenticated: past "
                      "the bound of %d from one address or %d in all", self.per_source,
                      self.total)
        excess += self._idle_past_bounds(connections, known)
        if excess:
            self._shut_down(excess)
            self._shed += len(excess)
        self._peak = max(self._peak, len(connections))
        # A flood (many at once, or any shut down) is over once few are left; one that ebbs
        # and comes back is handed back after each wave, however few it held at once.
        flood = self._peak >= 2 * self.per_source or self._shed
        if flood and len(connections) <= self._peak // 10:
            _hand_back_memory(self._peak)
            self._peak, self._shed = len(connections), 0
            self._settle = time.monotonic() + FLOOD_SETTLE
        elif self._settle is not None and time.monotonic() >= self._settle:
            self._settle = None   # what grpc still held of the flood's connections is freed
            _hand_back_memory(self._peak, settled=True)
        return len(excess)

    def _idle_past_bounds(self, connections, known):
        """Authorized connections with no call in flight past the bounds (per_identity, and
        known_total in all), the idlest of each identity first; admins' are never."""
        held, idle = collections.Counter(), {}
        for c in connections:
            identity, calls = known.get((c.address, c.port), (None, 0))
            if identity is not None:
                held[identity] += 1
                if not calls:
                    idle.setdefault(identity, []).append(c)
        for conns in idle.values():
            conns.sort(key=lambda c: c.idle_ms)   # the idlest last
        excess, total = [], sum(held.values())

        def shed(identity):
            nonlocal total
            excess.append(idle[identity].pop())
            held[identity] -= 1
            total -= 1
        for identity, conns in idle.items():
            while held[identity] > self.per_identity and conns:
                shed(identity)
                self._say(identity, "closing idle connections of %s: past the bound of %d of "
                          "one identity (--max-connections-per-identity)", self.per_identity)
        while self.known_total is not None and total > self.known_total:
            most = max((i for i, conns in idle.items() if conns), key=held.get, default=None)
            if most is None:
                break
            shed(most)
            self._say(most, "closing idle connections of %s: the connections of all who are "
                      "not admins are past %d", self.known_total)
        with self._lock:
            for c in excess:
                self._known.pop((c.address, c.port), None)
        return excess

    def _shut_down(self, excess):
        """Shut down these connections through this process's own fds of them (grpc then
        closes them; the fd is never closed under it). An fd reused meanwhile is left."""
        inodes = {c.inode: c for c in excess}
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            c = inodes.pop(int(target[8:-1]), None)
            if c is None:
                continue
            try:
                fd = os.dup(int(name))
            except OSError:
                continue
            try:
                same = os.fstat(fd).st_ino == c.inode
                sock = socket.socket(fileno=fd)   # our copy of the fd, closed with it
            except OSError:
                os.close(fd)
                continue
            with sock:
                if same:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                        self.closed += 1
            if not inodes:
                break
        if self.metrics:
            self.metrics.connections_closed(len(excess))

    def _say(self, who, message, *args):
        """A warning about `who` (an address, an identity), once a minute at most."""
        now = time.monotonic()
        if now - self._said.get(who, 0) >= 60:
            self._said[who] = now
            log.warning(message, who, *args)


FLOOD_SETTLE = 5.0   # seconds after a flood: its handshakes in grpc have ended by then


def _hand_back_memory(peak, settled=False):
    """After a flood: glibc keeps freed memory in its arenas; give it back to the system."""
    import ctypes
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:   # not glibc
        return
    trim(0)
    if settled:
        log.info("memory handed back again, %gs after the flood", FLOOD_SETTLE)
    else:
        log.info("memory handed back after a peak of %d connections", peak)


class ServerTLS(typing.NamedTuple):
    """The server's side of mutual TLS, read and checked once: the CA client certificates
    must chain to, the server's certificate and its key (private, ECDSA)."""
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def load(cls, ca, cert, key):
        """LocalFileError naming the file (and what to run) if one is missing or unsafe."""
        check_server_key(key)
        return cls(*(_read_file(p, w) for p, w in ((ca, "CA certificate"),
                                                   (cert, "server certificate"))),
                   _read_file(key, "server key"))

    def credentials(self):
        """Client certificates REQUIRED (grpc's default only requests them)."""
        return _grpc().ssl_server_credentials([(self.key_pem, self.cert_pem)],
                                              root_certificates=self.ca_pem,
                                              require_client_auth=True)


def _grpc_options(limits, connections):
    return [("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.so_reuseport", 0),
            # refused before the handshake past this; fds stay for jobs and records
            ("grpc.max_allowed_incoming_connections", connections),
            # a connection that has not finished its TLS handshake by then is closed
            ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout * 1000)),
            # one connection's calls wait at the client beyond this: a flood of calls from
            # one connection queues there, not ahead of everyone's in the server
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            # ... counted as HTTP/2 does (open streams), which clients respect; grpc's
            # default also counts streams not yet freed, and refuses calls past them
            ("grpc.http.overload_protection", 0),
            # clients re-handshake at least hourly (calls in flight go on): a certificate is
            # checked by TLS again, not only by the per-call checks
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            # a client that vanished (its host died) is noticed, its stream slot freed;
            # clients' own keepalive pings on quiet streams are welcome
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2)]


class RpcServer:
    """JobService, gRPC health and (unless not `reflection`) server reflection over mutual
    TLS 1.3 within `limits`, in steps: bind() -> port, start(), stop() -> an Event set once
    the calls in flight have ended. It never opens or closes the manager: serve does, between
    bind() and start() and between stop() and the wait. revoked: a RevocationList checked on
    every call (a revocation also ends the certificate's calls in flight). metrics: a Metrics
    that counts every call."""

    def __init__(self, manager, listen, tls, limits=ServerLimits(), revoked=None,
                 reflection=True, metrics=None):
        grpc = _grpc()
        check_grpc_internals()
        self.manager, self.listen, self.tls, self.limits = manager, listen, tls, limits
        self.revoked, self.metrics = revoked, metrics
        workers = limits.max_streams + UNARY_WORKERS
        self.pool = thread_pool(workers, "jobworker-rpc")
        calls = Quota("calls in flight", workers,
                      limits.max_streams_per_owner + UNARY_CALLS_PER_OWNER)
        connections = limits.connection_budget(raise_fd_limit(), manager.max_jobs)
        if connections < limits.max_connections:
            log.warning("the open-files limit leaves room for %d connections, fewer than "
                        "--max-connections %d", connections, limits.max_connections)
        self.interceptor = AuthInterceptor(calls=calls, revoked=revoked, metrics=metrics,
                                           request_timeout=limits.request_timeout)
        self.server = grpc.server(
            self.pool, interceptors=[self.interceptor],
            # A backstop on calls queued for a thread (their memory): each call takes its
            # thread only to be admitted or refused by the interceptor (at most `workers`).
            maximum_concurrent_rpcs=QUEUED_CALLS_PER_WORKER * workers,
            options=_grpc_options(limits, connections))
        self.service = JobService(manager, limits.max_streams, limits.max_streams_per_owner,
                                  metrics)
        add_job_service(self.service, self.server)
        self.health = HealthService()
        self.health.add_to(self.server)
        if reflection:
            from grpc_reflection.v1alpha import reflection as grpc_reflection
            grpc_reflection.enable_server_reflection(
                (SERVICE_NAME, HealthService.NAME, grpc_reflection.SERVICE_NAME), self.server)
        self.port, self.guard, self.started = None, None, False
        self.connections = connections

    def bind(self):
        """The port bound (a free one for port 0); AddressInUse if it is taken."""
        try:
            self.port = self.server.add_secure_port(self.listen, self.tls.credentials())
        except RuntimeError:
            self.port = 0
        if not self.port:
            self.pool.shutdown(wait=False)
            if _address_in_use(self.listen):
                raise AddressInUse(f"cannot listen on {self.listen}: the address is in use by "
                                   "another process")
            raise JobworkerError(f"cannot listen on {self.listen} (a HOST:PORT this host has?)")
        return self.port

    def start(self):
        """Take calls; health says SERVING."""
        if self.metrics:
            self.metrics.watch(self.manager, self.service.streams)
        if self.revoked is not None:
            self.revoked.watch(self.interceptor.revoked_now)
        _preload(self.tls.cert_pem)
        limits = self.limits
        self.guard = self.interceptor.connections = ConnectionGuard(
            self.port, limits.max_unauthenticated, limits.max_unauthenticated_per_source,
            self.metrics, limits.max_connections_per_identity,
            self.connections - admin_reserve(self.connections)).start()
        self.server.start()
        self.started = True
        self.health.serving()

    def stop(self):
        """Health says NOT_SERVING (watchers hear it first; their streams end), new calls are
        refused; returns an Event set once the calls in flight have ended (within
        SHUTDOWN_GRACE). Once only."""
        self.health.shut_down()
        if self.guard:
            self.guard.stop()
        if self.revoked is not None:
            self.revoked.stop_watching()
        stopped = self.server.stop(SHUTDOWN_GRACE if self.started else 0)
        done = threading.Event()

        def finish():
            stopped.wait()
            self.pool.shutdown(wait=False)
            done.set()
        NamedThread(finish, "jobworker-rpc-stop").start()
        return done


@contextlib.contextmanager
def serve_grpc(manager, listen="127.0.0.1:0", *, ca, cert, key, **kw):
    """An RpcServer (kw: its limits, revoked, reflection, metrics) for an opened manager,
    started; yields the bound port and stops it, waiting for the calls in flight, on exit."""
    server = RpcServer(manager, listen, ServerTLS.load(ca, cert, key), **kw)
    port = server.bind()
    try:
        server.start()
        yield port
    finally:
        server.stop().wait()


class HealthService:
    """grpc.health.v1.Health, grpc's own servicer: NOT_SERVING until serving() (for "" and
    jobworker.v1.JobService), NOT_SERVING again from shut_down(). Each Watch holds a handler
    thread (the interceptor wraps every method, so grpc's non-blocking mode is not used);
    shut_down() ends them all, so that no probe delays a stop."""

    NAME = "grpc.health.v1.Health"
    NAMES = ("", SERVICE_NAME)   # the services whose health it tells

    def __init__(self):
        import queue
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        self._pb, self._pb_grpc = health_pb2, health_pb2_grpc
        self._lock = threading.Lock()
        self._queues = set()
        self._ended = False
        outer = self

        class Servicer(health.HealthServicer):
            def Watch(self, request, context):
                if request.service not in outer.NAMES:
                    # grpc's servicer keeps every name ever watched: only ours are kept
                    yield health_pb2.HealthCheckResponse(
                        status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    return
                q = queue.SimpleQueue()
                with outer._lock:
                    outer._queues.add(q)
                context.add_callback(lambda: q.put(None))   # it ends: so does the wait
                try:
                    super().Watch(request, context, send_response_callback=q.put)
                    if outer._ended:
                        q.put(None)
                    while (response := q.get()) is not None:
                        yield response
                finally:
                    with outer._lock:
                        outer._queues.discard(q)

        self.servicer = Servicer(experimental_non_blocking=False)
        for name in self.NAMES:
            self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def add_to(self, server):
        self._pb_grpc.add_HealthServicer_to_server(self.servicer, server)

    def serving(self):
        for name in self.NAMES:
            self.servicer.set(name, self._pb.HealthCheckResponse.SERVING)

    def shut_down(self):
        self.servicer.enter_graceful_shutdown()
        with self._lock:
            self._ended = True
            for q in self._queues:
                q.put(None)


# -- metrics (Prometheus) ------------------------------------------------------------------

METRICS_MAX_OWNERS = 1000   # distinct owner label values; later owners are counted as "other"
METRICS_CONNECTIONS, METRICS_PER_SOURCE = 256, 32  # connections at once; from one address
METRICS_TIMEOUT = 10.0   # seconds a connection may take for its whole request and answer
RPC_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
QUEUED_BUCKETS = (.01, .1, 1, 10, 60, 300, 900, 3600, 4 * 3600, 86400)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own. Counters are kept as
    things happen and gauges read live counts, so a scrape costs the same with 10 jobs or
    20,000. It is the JobManager's observer."""

    def __init__(self, cgroup_version):
        import prometheus_client as pc
        from prometheus_client.core import GaugeMetricFamily
        self._gauge_family = GaugeMetricFamily
        r = self.registry = pc.CollectorRegistry()
        pc.ProcessCollector(registry=r)
        self._owners = set()
        self._owners_lock = threading.Lock()
        self.started = pc.Counter("jobworker_jobs_started", "Jobs started", ["owner"],
                                  registry=r)
        self.ended = pc.Counter("jobworker_jobs_ended", "Jobs ended, by final state",
                                ["owner", "state"], registry=r)
        self.oom = pc.Counter("jobworker_jobs_oom_killed", "Jobs in which the OOM killer "
                              "killed a process", ["owner"], registry=r)
        self.timed_out = pc.Counter("jobworker_jobs_timed_out", "Jobs stopped by their "
                                    "timeout", ["owner"], registry=r)
        self.start_failures = pc.Counter("jobworker_start_failures", "Start calls that failed "
                                         "in the job manager, by reason", ["reason"],
                                         registry=r)
        self.rpcs = pc.Counter("jobworker_rpcs", "RPCs handled, by method and status code",
                               ["method", "code"], registry=r)
        self.rpc_seconds = pc.Histogram("jobworker_rpc_duration_seconds", "Time from an RPC's "
                                        "arrival to its end (a stream: its whole life)",
                                        ["method"], buckets=RPC_BUCKETS, registry=r)
        self.queued_seconds = pc.Histogram(
            "jobworker_job_queued_seconds", "Time jobs spent queued before their turn came",
            buckets=QUEUED_BUCKETS, registry=r)
        self.stored = pc.Counter("jobworker_output_stored_bytes", "Bytes of job output "
                                 "written to disk", registry=r)
        self.sent = pc.Counter("jobworker_output_streamed_bytes", "Bytes of job output sent "
                               "to Stream clients", registry=r)
        self.unauthenticated = pc.Counter(
            "jobworker_connections_shut_down", "Connections of the gRPC port shut down "
            "before they authenticated, past --max-unauthenticated[-per-source]", registry=r)
        pc.Info("jobworker", "The server", registry=r).info(
            {"version": __version__, "cgroup_version": str(cgroup_version)})
        self._manager = self._streams = None

    def watch(self, manager, streams):
        """Export the live counts: running jobs per owner, open streams."""
        self._manager, self._streams = manager, streams
        self.registry.register(self)

    def collect(self):   # the registry's collector protocol: called per scrape
        yield self._by_owner("jobworker_jobs_running", "Jobs running now",
                             self._manager.running_by_owner())
        yield self._by_owner("jobworker_jobs_queued", "Jobs queued now, waiting for a slot",
                             self._manager.queued_by_owner())
        yield self._gauge_family("jobworker_streams_open", "Stream calls open now",
                                 value=self._streams.total)

    def describe(self):
        return []   # collect() is not called at registration

    def _by_owner(self, name, text, counts):
        """A gauge of {owner: count}, by owner label."""
        family, by_label = self._gauge_family(name, text, labels=["owner"]), {}
        for owner, n in counts.items():
            label = self.owner(owner)
            by_label[label] = by_label.get(label, 0) + n
        for label, n in by_label.items():
            family.add_metric([label], n)
        return family

    def owner(self, name):
        """An owner's label value: the first METRICS_MAX_OWNERS owners by name, then "other"."""
        if name in self._owners:
            return name
        with self._owners_lock:
            if len(self._owners) < METRICS_MAX_OWNERS:
                self._owners.add(name)
                return name
        return "other"

    # -- the JobManager's observer --

    def job_started(self, status):
        self.started.labels(self.owner(status.owner)).inc()

    def job_ended(self, status):
        owner = self.owner(status.owner)
        self.ended.labels(owner, status.state).inc()
        if status.oom_killed:
            self.oom.labels(owner).inc()
        if status.timed_out:
            self.timed_out.labels(owner).inc()

    def start_failed(self, exc):
        name = type(exc).__name__ if isinstance(exc, JobworkerError) else "internal"
        self.start_failures.labels(re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()).inc()

    def output_stored(self, nbytes):
        self.stored.inc(nbytes)

    def job_dequeued(self, status, seconds):
        self.queued_seconds.observe(max(0.0, seconds))

    # -- the interceptor's and the servicer's --

    def rpc(self, method, code, seconds):
        method = method.rsplit("/", 1)[-1] if method.startswith(f"/{SERVICE_NAME}/") else method
        self.rpcs.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def streamed(self, nbytes):
        self.sent.inc(nbytes)

    def connections_closed(self, n):
        self.unauthenticated.inc(n)


class MetricsServer:
    """Plain HTTP on its own port: GET /metrics in the Prometheus text format, and nothing
    else (404 for other paths, 405 for other methods). AddressInUse if the port is taken.

    One thread serves every connection (a selector): a connection holds only its socket and
    what it has sent, and each is given METRICS_TIMEOUT seconds for its whole request and
    answer. At most METRICS_CONNECTIONS are open, METRICS_PER_SOURCE from one address; past
    either, the oldest connection still sending its request is closed for the new one, so a
    scraper, which sends its request at once, is answered however many slow clients hold on."""

    def __init__(self, listen, registry):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        self._render = lambda: generate_latest(registry)
        self._content_type = CONTENT_TYPE_LATEST
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port)
        except ValueError:
            raise InvalidArgument("metrics listen address", listen, "HOST:PORT") from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
            self._listener.listen(128)
        except OSError as e:
            self._listener.close()
            if e.errno == errno.EADDRINUSE:
                raise AddressInUse(f"cannot listen on {listen} for metrics: the address is in "
                                   "use by another process") from None
            raise JobworkerError(f"cannot listen on {listen} for metrics: {e.strerror}") \
                from None
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._conns = {}   # socket -> _HttpConnection, oldest first
        self._stopping = False
        self.thread = NamedThread(self._serve, "jobworker-metrics")
        self.thread.start()

    def close(self):
        self._stopping = True
        os.write(self._wake_w, b"x")
        self.thread.join()
        for conn in list(self._conns):
            conn.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _serve(self):
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        while not self._stopping:
            now = time.monotonic()
            deadline = min((c.deadline for c in self._conns.values()), default=now + 60)
            for key, events in sel.select(max(0.0, deadline - now)):
                if key.fileobj is self._listener:
                    self._accept(sel)
                elif key.fileobj in self._conns:   # (not closed earlier in this round)
                    self._conns[key.fileobj].ready(sel, self, events)
            now = time.monotonic()
            for sock, conn in list(self._conns.items()):
                if conn.deadline <= now:
                    self._drop(sel, sock)
        sel.close()

    def _accept(self, sel):
        import selectors
        for _ in range(64):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # out of fds: the oldest waiting connections make room
                self._evict(sel, None)
                return
            sock.setblocking(False)
            source = addr[0]
            if sum(1 for c in self._conns.values() if c.source == source) >= METRICS_PER_SOURCE:
                self._evict(sel, source)
            if len(self._conns) >= METRICS_CONNECTIONS:
                self._evict(sel, None)
            self._conns[sock] = _HttpConnection(sock, source)
            sel.register(sock, selectors.EVENT_READ)

    def _evict(self, sel, source):
        """Close a connection still sending its request (of `source`, if given), for a new one:
        one its peer has closed (a closed one is seen only once read: under a churn of
        connections, most are), else the oldest that has sent nothing, else the oldest. A
        scraper, which sends its request at once, is not one of the first two."""
        waiting = [(sock, conn) for sock, conn in self._conns.items()
                   if conn.reply is None and (source is None or conn.source == source)]
        silent = None
        for sock, conn in waiting:
            try:
                said = sock.recv(1, socket.MSG_PEEK)   # (non-blocking)
            except BlockingIOError:
                said = None
            except OSError:
                said = b""
            if said == b"":
                self._drop(sel, sock)
                return
            if said is None and not conn.received and silent is None:
                silent = sock
        if silent is not None or waiting:
            self._drop(sel, silent if silent is not None else waiting[0][0])

    def _drop(self, sel, sock):
        sel.unregister(sock)
        self._conns.pop(sock).close()

    def answer(self, head):
        """The whole HTTP response to a request head (bytes up to the blank line)."""
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except ValueError:
            return self._response(400, b"bad request\n")
        if method != "GET":
            return self._response(405, b"", (("Allow", "GET"),))
        if target.split("?", 1)[0] != "/metrics":
            return self._response(404, b"only /metrics is served here\n")
        return self._response(200, self._render(), (("Content-Type", self._content_type),))

    @staticmethod
    def _response(status, body, headers=()):
        import http
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "Server: jobworker",
                 f"Content-Length: {len(body)}", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _HttpConnection:
    """One connection of MetricsServer: its request so far, then the answer being sent."""

    MAX_HEAD = 8192

    def __init__(self, sock, source):
        self.sock, self.source = sock, source
        self.deadline = time.monotonic() + METRICS_TIMEOUT
        self.received = b""
        self.reply = None   # bytes still to send, once the request is whole

    def ready(self, sel, server, events):
        import selectors
        try:
            if self.reply is None:
                data = self.sock.recv(4096)
                if not data:
                    server._drop(sel, self.sock)
                    return
                self.received += data
                end = self.received.find(b"\r\n\r\n")
                if end < 0 and len(self.received) < self.MAX_HEAD:
                    return
                self.reply = (server.answer(self.received[:end]) if end >= 0
                              else MetricsServer._response(431, b""))
                sel.modify(self.sock, selectors.EVENT_WRITE)
            sent = self.sock.send(self.reply)
            self.reply = self.reply[sent:]
            if not self.reply:
                server._drop(sel, self.sock)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            server._drop(sel, self.sock)

    def close(self):
        self.sock.close()


def _preload(cert_pem):
    """Import now every module a call may need later. The modules come from a cache dir that
    was checked when the process started; importing nothing after the first connection keeps
    that check true for the server's whole life (and the first calls fast)."""
    import importlib
    for name in ("base64", "grp", "pwd", "uuid", "cryptography.x509",
                 "cryptography.hazmat.primitives.serialization"):
        importlib.import_module(name)
    with contextlib.suppress(AccessDenied):   # a server certificate: parsed, then refused
        identity_from_pem(cert_pem)           # (what parsing a certificate loads, loaded)


def _address_in_use(listen):
    """True if binding HOST:PORT fails with EADDRINUSE (grpc does not say why it failed)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or None
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, ValueError):
        return False
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def _lock_holder(fd):
    """(pid, listen address) of the process holding a flock on the file open at fd, from
    /proc/locks and its command line; (None, None) if it cannot be told."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    pid = int(parts[4])
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        argv = c.read().decode(errors="replace").split("\0")
                    listen = argv[argv.index("--listen") + 1] if "--listen" in argv[:-1] \
                        else DEFAULT_LISTEN
                    return pid, listen
    except (OSError, ValueError):
        pass
    return None, None


class ServeLock:
    """What makes a server the only one for its state dir and its job cgroup parent: exclusive
    flocks on <state_dir>/server.lock and on each cgroup parent directory, held for the
    server's life and taken before anything else is touched. release() also removes the
    cgroup parents it created if they are empty (a server that failed to start)."""

    def __init__(self, state_dir, cgroup_dirs):
        self.state_dir = state_dir
        self.cgroup_dirs = list(cgroup_dirs)
        self._fds = []
        self._made = []

    def acquire(self):
        import fcntl
        new_state_dir = not os.path.isdir(self.state_dir)
        try:
            check_private_dir(self.state_dir, "state dir")
            lock_file = os.path.join(self.state_dir, "server.lock")
            targets = [(lock_file, "state dir", self.state_dir, "--state-dir DIR")]
            for d in self.cgroup_dirs:
                if not os.path.isdir(d):
                    os.makedirs(d)
                    self._made.append(d)
                targets.append((d, "job cgroup parent", d, "--cgroup-parent NAME"))
            for path, what, shown, flag in targets:
                flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if os.path.isdir(path)
                                                      else os.O_CREAT)
                fd = os.open(path, flags, 0o600)
                self._fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid, listen = _lock_holder(fd)
                    who = (f"another jobworker server (pid {pid}, listening on {listen})"
                           if pid else "another jobworker server")
                    raise AlreadyServing(f"{who} uses the {what} {shown}; this one touches "
                                         f"nothing and exits (give it its own with {flag})"
                                         ) from None
        except BaseException:
            if new_state_dir and len(self._fds) > 1:   # refused past the state dir's lock,
                with contextlib.suppress(OSError):     # still held: no trace of this server
                    os.unlink(lock_file)
                    os.rmdir(self.state_dir)
            self.release()
            raise
        return self

    def release(self):
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        for d in reversed(self._made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self._made = []


# ================================================================================================
# Certificates
# ================================================================================================

CA_DAYS = 3650
LEAF_DAYS = 825


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key):
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert):
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject_cn, issuer, public_key, not_before, not_after):
    """A certificate builder; issuer None means self-signed."""
    import datetime
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    nb = now - datetime.timedelta(minutes=5) if not_before is None else not_before
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(nb).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False))


def make_ca(common_name="jobworker CA", days=CA_DAYS):
    """(key, cert) of a new self-signed CA."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    key = _new_key()
    end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    b = _builder(common_name, None, key.public_key(), None, end)
    b = (b.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                        True))
    return key, b.sign(key, hashes.SHA256())


def make_leaf(ca_key, ca_cert, common_name, *, hosts=None, roles=None, days=LEAF_DAYS,
              not_before=None, not_after=None, client_auth=True, role_der=None):
    """(key, cert) signed by the CA. hosts: a server certificate with these SANs; else a client
    certificate carrying `roles` (or raw `role_der`) in the role extension."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID
    key = _new_key()
    if not_after is None:
        not_after = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    b = _builder(common_name, ca_cert.subject, key.public_key(), not_before, not_after)
    b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                        True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                        False))
    if hosts is not None:
        sans = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        b = (b.add_extension(x509.SubjectAlternativeName(sans), False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False))
    else:
        if client_auth:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        der = role_der if role_der is not None else (encode_roles(roles) if roles else None)
        if der is not None:
            b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(ROLE_OID), der),
                                False)
    return key, b.sign(ca_key, hashes.SHA256())


def _write_new(path, data, mode):
    """Write a file whole: a new temp file beside it (O_EXCL|O_NOFOLLOW: no existing file or
    planted symlink is written through), then renamed over the name (a symlink there is
    replaced, not followed)."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_secret(path, data):
    _write_new(path, data, 0o600)


def _write_public(path, data):
    _write_new(path, data, 0o644)


def _load_ca(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    return (load_pem_private_key(_read_file(f"{directory}/ca.key", "CA key"), None),
            x509.load_pem_x509_certificate(_read_file(f"{directory}/ca.crt", "CA certificate")))


def certs_init(directory, hosts=(), force=False):
    """Write DIR/ca.{crt,key} and DIR/server.{crt,key} (SANs localhost, 127.0.0.1, ::1 + hosts)."""
    check_private_dir(directory, "certificate directory")
    if os.path.exists(f"{directory}/ca.key") and not force:
        raise JobworkerError(f"{directory}/ca.key exists; a new CA would orphan every issued "
                             "certificate (use --force to replace it)")
    ca_key, ca_cert = make_ca()
    _write_secret(f"{directory}/ca.key", _pem_key(ca_key))
    _write_public(f"{directory}/ca.crt", _pem_cert(ca_cert))
    _issue_server(directory, ca_key, ca_cert, hosts)


def certs_server(directory, hosts=()):
    """Write a new DIR/server.{crt,key} from the CA in DIR (SANs localhost, 127.0.0.1, ::1 +
    hosts): the client certificates stay valid."""
    check_private_dir(directory, "certificate directory")
    ca_key, ca_cert = _load_ca(directory)
    _issue_server(directory, ca_key, ca_cert, hosts)


def _issue_server(directory, ca_key, ca_cert, hosts):
    all_hosts = list(dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]))
    key, cert = make_leaf(ca_key, ca_cert, hosts[0] if hosts else "localhost", hosts=all_hosts)
    _write_secret(f"{directory}/server.key", _pem_key(key))
    _write_public(f"{directory}/server.crt", _pem_cert(cert))


def certs_revoke(directory, which):
    """Append a client certificate's serial to DIR/revoked.txt: `which` is the NAME of a
    certificate in DIR, or a serial number in hex. Returns the serial."""
    check_private_dir(directory, "certificate directory")
    path = os.path.join(directory, f"{which}.crt")
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", which) and os.path.exists(path):
        from cryptography import x509
        serial = x509.load_pem_x509_certificate(_read_file(path, "certificate")).serial_number
    else:
        try:
            serial = parse_serial(which)
        except ValueError:
            raise InvalidArgument("certificate", which, f"the NAME of a certificate in "
                                  f"{directory}, or a serial number in hex") from None
    fd = os.open(os.path.join(directory, REVOKED_FILE),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, f"{serial:x}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return serial


def certs_issue(directory, name, roles, days=LEAF_DAYS, force=False):
    """Write DIR/NAME.{crt,key}: a client certificate for identity NAME with these roles
    (LocalFileError if NAME.crt exists, unless `force`)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name) or name in ("ca", "server"):
        raise InvalidArgument("name", name, "letters, digits, '.', '_', '@', '-' (not ca or server)")
    check_private_dir(directory, "certificate directory")
    if not force and os.path.exists(f"{directory}/{name}.crt"):
        raise LocalFileError(f"{directory}/{name}.crt exists: --force replaces it (the old "
                             "certificate stays valid until it expires or is revoked)")
    ca_key, ca_cert = _load_ca(directory)
    key, cert = make_leaf(ca_key, ca_cert, name, roles=roles, days=days)
    _write_secret(f"{directory}/{name}.key", _pem_key(key))
    _write_public(f"{directory}/{name}.crt", _pem_cert(cert))


# ================================================================================================
# CLI
# ================================================================================================

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONNECT, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
EXIT_DENIED, EXIT_REFUSED, EXIT_EXHAUSTED, EXIT_INTERNAL, EXIT_INTERRUPTED = 5, 6, 7, 8, 130
EXIT_ADDRESS_IN_USE, EXIT_ALREADY_SERVING, EXIT_LAUNCHER_MISMATCH = 9, 10, 11
EXIT_CODES = {   # what each means; `jobworker --help` says it from here
    EXIT_OK: "ok", EXIT_ERROR: "error", EXIT_USAGE: "usage",
    EXIT_CONNECT: "cannot reach server (or TLS failed)", EXIT_NOT_FOUND: "job not found",
    EXIT_DENIED: "permission denied",
    EXIT_REFUSED: "refused (invalid request, wrong state, cannot run)",
    EXIT_EXHAUSTED: "a server cap is reached", EXIT_INTERNAL: "server error",
    EXIT_ADDRESS_IN_USE: "serve: address in use",
    EXIT_ALREADY_SERVING: "serve: another server owns the state dir or cgroup parent",
    EXIT_LAUNCHER_MISMATCH: "serve: the running launcher speaks another protocol (its jobs "
                            "are left alone)",
    EXIT_INTERRUPTED: "interrupted"}
# Errors of `serve` itself (no RPC involved) that scripts and systemd tell apart.
_EXIT_FOR_ERROR = ((AddressInUse, EXIT_ADDRESS_IN_USE), (AlreadyServing, EXIT_ALREADY_SERVING),
                   (LauncherMismatch, EXIT_LAUNCHER_MISMATCH), (LocalFileError, EXIT_ERROR))
_EXIT_FOR_CODE = {
    "UNAVAILABLE": EXIT_CONNECT, "DEADLINE_EXCEEDED": EXIT_CONNECT, "NOT_FOUND": EXIT_NOT_FOUND,
    "PERMISSION_DENIED": EXIT_DENIED, "UNAUTHENTICATED": EXIT_DENIED,
    "INVALID_ARGUMENT": EXIT_REFUSED, "FAILED_PRECONDITION": EXIT_REFUSED,
    "RESOURCE_EXHAUSTED": EXIT_EXHAUSTED, "INTERNAL": EXIT_INTERNAL,
}
DEFAULT_CERTS_DIR = "certs"
CLIENT_DEFAULTS = {   # flag: (environment variable, default)
    "server": ("JOBWORKER_SERVER", DEFAULT_SERVER),
    "ca": ("JOBWORKER_CA", f"{DEFAULT_CERTS_DIR}/ca.crt"),
    "cert": ("JOBWORKER_CERT", f"{DEFAULT_CERTS_DIR}/client.crt"),
    "key": ("JOBWORKER_KEY", f"{DEFAULT_CERTS_DIR}/client.key"),
}
RPC_TIMEOUT = 30.0   # unary calls; Stop adds its grace period
MIN_ID_PREFIX = 4
DEFAULT_PORT = 50051


class CliError(Exception):
    """One line for stderr and an exit code."""

    def __init__(self, message, code=EXIT_ERROR, unreachable=False):
        super().__init__(message)
        self.code = code
        self.unreachable = unreachable   # no answer from the server (worth trying again)


def _say(line):
    """A line on stderr where there may be none: a terminal that hung up (SIGHUP) fails the
    write, and what the line is about (stopping the job) must happen all the same."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


# -- connection sharing: one process of the user holds the channels of later calls -------------
#
# A CLI call pays for the interpreter, `import grpc` and a TLS handshake before its own work.
# As ssh's ControlMaster and ControlPersist: a call that finds no mux does its work directly
# and starts one, a process of the same user that holds a channel per server and
# certificate; later calls reach it over a Unix socket in a directory only the user can
# enter, without importing grpc, and it relays each call's messages byte for byte. The server
# sees the same certificate and decides as it would; the mux ends once no call came for its
# persist time. JOBWORKER_MUX=off (or --no-mux) goes direct; JOBWORKER_MUX=10m persists
# longer.

MUX_PROTOCOL = 1                 # the socket's name carries it: another protocol, another mux
MUX_PERSIST = 60.0               # seconds a mux waits for a call before it exits
MUX_ANSWER_TIMEOUT = 2.0         # a mux that does not greet a call this fast is passed over
MUX_MAX_CALLS = 256              # calls in flight at once; more go direct
MUX_MAX_FRAME = 64 << 20
# Frames: a kind byte, a 4-byte length, the payload. A call: the mux greets (HELLO); the client
# sends HEAD (JSON), one REQUEST per request message and END when its requests are done; the
# mux sends one MESSAGE per response (and ALIVE while a call is quiet), then STATUS (JSON) and
# closes. Closing the socket before STATUS cancels the call.
MUX_HELLO, MUX_HEAD, MUX_REQUEST, MUX_END = b"J", b"H", b"R", b"E"
MUX_MESSAGE, MUX_STATUS, MUX_ALIVE = b"M", b"S", b"A"
MUX_ALIVE_EVERY = 5.0            # seconds: a call quiet this long is told the mux is alive
MUX_SILENT_FOR = 20.0            # ... and a mux silent this long is taken for gone
_MUX_FRAME = struct.Struct("!cI")


def mux_setting(args=None, env=os.environ):
    """How long a mux this call starts persists (seconds), or None when calls go direct
    (--no-mux, JOBWORKER_MUX=off)."""
    text = env.get("JOBWORKER_MUX", "").strip().lower()
    if getattr(args, "no_mux", False) or text in ("off", "no", "0", "false"):
        return None
    try:
        return parse_duration(text) if text else MUX_PERSIST
    except InvalidArgument:
        raise CliError(f"invalid JOBWORKER_MUX {text!r}: off, or how long the mux persists "
                       f"({DURATION_FORM})", EXIT_USAGE) from None


def mux_socket_path(env=os.environ):
    """This user's mux socket for calls made where this one is: in $XDG_RUNTIME_DIR/jobworker
    if that runtime dir is this user's alone, else in $TMPDIR/jobworker-UID (/tmp) if $TMPDIR
    is root's or this user's and no one else may rename in it (sticky); the directory made 0700
    if missing. None if neither is safe (made by another user first, open to others' writes,
    or in a directory another user may swap it in): then no mux is used. Its name says the
    network, mount namespaces and grpc's proxy variables of the call (a mux started in a
    sandbox serves no call outside it, and none inside one from outside)."""
    import zlib
    euid = os.geteuid()
    runtime = env.get("XDG_RUNTIME_DIR") or ""
    tmp = env.get("TMPDIR") or "/tmp"
    bases = [(runtime, os.path.join(runtime, "jobworker"), (euid,))] if runtime else []
    bases.append((tmp, os.path.join(tmp, f"jobworker-{euid}"), (0, euid)))
    where = []
    for ns in ("net", "mnt"):
        with contextlib.suppress(OSError):
            where.append(os.readlink(f"/proc/self/ns/{ns}"))
    where += [f"{k}={env.get(k, '')}" for k in _GRPC_PROXY_VARIABLES]
    context = f"{zlib.crc32(chr(0).join(where).encode()):08x}"
    for parent, base, owners in bases:
        if not os.path.isabs(parent) or not _safe_parent(parent, owners):
            continue
        try:
            check_private_dir(base, "mux directory")
        except (LocalFileError, OSError):
            continue
        return os.path.join(base, f"mux-{MUX_PROTOCOL}-{context}.sock")
    return None


# what grpc's core reads from the environment to choose a proxy or a resolver
_GRPC_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy",
                         "no_proxy", "GRPC_DNS_RESOLVER")


def _safe_parent(path, owners):
    """Whether `path` is a directory (not a symlink) of one of `owners` in which no one else
    may rename an entry (not writable by group or others, or sticky)."""
    import stat
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid in owners and
            (not st.st_mode & 0o022 or st.st_mode & stat.S_ISVTX))


def _mux_frame(kind, payload=b""):
    return _MUX_FRAME.pack(kind, len(payload)) + payload


def _mux_send(sock, kind, payload=b""):
    sock.sendall(_mux_frame(kind, payload))


def _mux_recv_exact(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("the mux connection closed")
        got += k
    return bytes(buf)


def _mux_recv(sock):
    """(kind, payload) of the next frame. EOFError if the peer has gone."""
    kind, size = _MUX_FRAME.unpack(_mux_recv_exact(sock, _MUX_FRAME.size))
    if size > MUX_MAX_FRAME:
        raise EOFError(f"a frame of {size} bytes from the mux connection")
    return kind, _mux_recv_exact(sock, size) if size else b""


def _peer_uid(sock):
    fmt = "3i"
    return struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              struct.calcsize(fmt)))[1]


def mux_connect(path, timeout=MUX_ANSWER_TIMEOUT):
    """A socket to this user's mux at `path` that has greeted it, or None: no mux there, one
    of another user, or one that does not answer in `timeout`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        if _peer_uid(sock) != os.geteuid() or _mux_recv(sock) != (MUX_HELLO, b"%d" % MUX_PROTOCOL):
            raise EOFError("not this user's mux of this protocol")
        sock.settimeout(None)
        return sock
    except (OSError, EOFError, struct.error):
        sock.close()
        return None


class StatusName(typing.NamedTuple):
    """A gRPC status code by its name, as grpc.StatusCode's `.name`."""
    name: str


class MuxRpcError(Exception):
    """A relayed call's failure, with what grpc.RpcError offers: code(), details(),
    trailing_metadata()."""

    def __init__(self, code, details, trailing=()):
        super().__init__(f"{code}: {details}")
        self._code, self._details, self._trailing = StatusName(code), details, tuple(trailing)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def status_name(e):
    """The name of an RPC error's status code (grpc's or a relayed one); "UNKNOWN" if none."""
    code = e.code()
    return code.name if code is not None else "UNKNOWN"


def rpc_errors():
    """The exceptions a failed call raises: a relayed one's, and grpc's once grpc is loaded
    (a call through the mux does not load it)."""
    grpc = sys.modules.get("grpc")
    return (MuxRpcError, grpc.RpcError) if grpc is not None else (MuxRpcError,)


class _MuxCall:
    """One call relayed by the mux, over a connection of its own: iterate it for the responses;
    cancel() ends it (and the mux's call with it)."""

    def __init__(self, sock, head, requests, serialize, deserialize, many_requests):
        self._sock, self._deserialize = sock, deserialize
        self._status = None
        self._cancelled = False
        frames = [_mux_frame(MUX_HEAD, json.dumps(head).encode())]
        if not many_requests:   # in one write: the mux may answer and close before a second
            frames += [_mux_frame(MUX_REQUEST, serialize(requests)), _mux_frame(MUX_END)]
        try:
            sock.sendall(b"".join(frames))
        except OSError:
            pass   # the mux went: reading its answer says so
        if many_requests:
            threading.Thread(target=self._send_all, args=(requests, serialize),
                             name="jobworker-mux-requests", daemon=True).start()

    def _send_all(self, requests, serialize):
        try:
            for request in requests:
                _mux_send(self._sock, MUX_REQUEST, serialize(request))
            _mux_send(self._sock, MUX_END)
        except OSError:
            pass   # the call ended (its responses say how)
        except Exception:   # as grpc does with a request iterator that raises: cancel
            self.cancel()

    def _fail(self, code, details, trailing=()):
        self._status = MuxRpcError(code, details, trailing)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __iter__(self):
        return self

    def __next__(self):
        if self._status is not None:
            if isinstance(self._status, MuxRpcError):
                raise self._status
            raise StopIteration
        try:
            kind, payload = _mux_recv(self._sock)
        except socket.timeout:
            self._fail("UNAVAILABLE", f"the mux said nothing for {self._sock.gettimeout():g}s "
                       "(stopped?)")
            raise self._status from None
        except (OSError, EOFError) as e:
            self._fail("CANCELLED" if self._cancelled else "UNAVAILABLE",
                       "Locally cancelled by application!" if self._cancelled else
                       f"the connection to the mux was lost ({e})")
            raise self._status from None
        if kind == MUX_MESSAGE:
            return self._deserialize(payload)
        if kind == MUX_ALIVE:
            return next(self)
        said = json.loads(payload) if kind == MUX_STATUS else {
            "code": "INTERNAL", "details": f"the mux sent a frame of kind {kind!r}"}
        if said.get("code") == "OK":
            self._status = True
            with contextlib.suppress(OSError):
                self._sock.close()
            raise StopIteration
        self._fail(said.get("code") or "UNKNOWN", said.get("details") or "",
                   [tuple(kv) for kv in said.get("trailing") or ()])
        raise self._status

    def cancel(self):
        """End the call (from any thread): its iteration ends CANCELLED, and the mux's call."""
        if self._status is None:
            self._cancelled = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def result(self):
        """The one response of a call with one (a unary call)."""
        response = next(self)
        for _ in self:   # its status
            pass
        return response


class _MuxMethod:
    """A method reached through a MuxChannel, called as grpc's multi-callables are: (request
    or request iterator, timeout=) -> the response (one) or an iterable call (many)."""

    def __init__(self, channel, method, serialize, deserialize, many_requests, many_responses):
        self.channel, self.method = channel, method
        self.serialize = serialize or (lambda b: b)
        self.deserialize = deserialize or (lambda b: b)
        self.many_requests, self.many_responses = many_requests, many_responses

    def __call__(self, request, timeout=None, metadata=None):
        sock = self.channel.connect()
        if sock is None:   # the mux went away: this call and the next ones go direct
            return self.direct()(request, timeout=timeout, metadata=metadata)
        head = dict(self.channel.target, method=self.method, kind=self.kind(), timeout=timeout,
                    metadata=[list(kv) for kv in metadata or ()])
        sock.settimeout(MUX_SILENT_FOR)   # (a mux that stopped: the call goes on directly)
        call = _MuxCall(sock, head, request, self.serialize, self.deserialize,
                        self.many_requests)
        return call if self.many_responses else call.result()

    def kind(self):
        return _kind_name(self.many_requests, self.many_responses)

    def direct(self):
        return getattr(self.channel.fallback(), self.kind())(
            self.method, request_serializer=self.serialize,
            response_deserializer=self.deserialize)


class MuxChannel:
    """A channel through this user's mux, with grpc.Channel's method factories; where the mux
    does not answer, through `direct()` (a grpc channel made then) instead."""

    def __init__(self, path, first, target, direct):
        self.path, self.target = path, target   # target: server and the PEMs, for the HEAD
        self._first, self._direct, self._channel = first, direct, None

    def connect(self):
        """A greeted connection to the mux for one call, or None (go direct from now on)."""
        if self._channel is not None:
            return None
        sock, self._first = self._first or mux_connect(self.path), None
        return sock

    def fallback(self):
        if self._channel is None:
            self._channel = self._direct()
        return self._channel

    def _method(self, many_requests, many_responses):
        def make(method, request_serializer=None, response_deserializer=None, **_):
            return _MuxMethod(self, method, request_serializer, response_deserializer,
                              many_requests, many_responses)
        return make

    def __getattr__(self, name):   # unary_unary, unary_stream, stream_unary, stream_stream
        kind = name.split("_")
        if len(kind) != 2 or not set(kind) <= {"unary", "stream"}:
            raise AttributeError(name)
        return self._method(kind[0] == "stream", kind[1] == "stream")

    def close(self):
        if self._first is not None:
            self._first.close()
        if self._channel is not None:
            self._channel.close()


def _kind_name(many_requests, many_responses):
    """grpc's name of a method's kind: unary_unary, unary_stream, stream_unary, stream_stream."""
    return (f"{'stream' if many_requests else 'unary'}_"
            f"{'stream' if many_responses else 'unary'}")


def service_stub(channel, pb, service="JobService"):
    """A stub of `service` on `channel` (a grpc channel or a MuxChannel), made from the
    proto's descriptor: a callable per method, as the generated stub's."""
    stub = types.SimpleNamespace()
    desc = pb.DESCRIPTOR.services_by_name[service]
    for m in desc.methods:
        kind = _kind_name(m.client_streaming, m.server_streaming)
        setattr(stub, m.name, getattr(channel, kind)(
            f"/{desc.full_name}/{m.name}",
            request_serializer=getattr(pb, m.input_type.name).SerializeToString,
            response_deserializer=getattr(pb, m.output_type.name).FromString))
    return stub


def start_mux(path, persist):
    """Start this user's mux in the background for later calls, unless one runs (or is
    starting): it holds the lock beside its socket for as long as it runs. The new process is
    this program in a session of its own, with no fd of this one but its build's lock."""
    import subprocess
    lock = path[:-len(".sock")] + ".lock"
    try:   # (O_NONBLOCK: a FIFO planted there is never waited on; the mux refuses it)
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW |
                     os.O_NONBLOCK, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None   # a mux runs, or is starting
    finally:
        os.close(fd)   # (and the lock with it: the mux takes it itself)
    here = os.path.dirname(os.path.abspath(__file__))
    build = build_lock(here)
    try:
        return subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "mux", "run", "--socket", path,
             "--persist", f"{persist:g}s"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", start_new_session=True, pass_fds=(build,) if build is not None else (),
            env=dict(os.environ, JOBWORKER_BUILD_FD=str(build) if build is not None else ""))
    except OSError:
        return None
    finally:
        if build is not None:
            os.close(build)


class _MuxTarget:
    """A channel of the mux: to one server with one certificate, and its calls in flight."""

    def __init__(self, channel, server):
        self.channel, self.server = channel, server
        self.calls, self.used = 0, time.monotonic()


class Mux:
    """The mux process's work: calls taken on its socket, each relayed on a thread of its own
    over the channel of its server and certificate (made at first use, closed once it has had
    no call in flight for `persist`); returns once no call came for `persist` seconds. A call
    quiet for MUX_ALIVE_EVERY is told the mux is alive (its client takes a silent mux for gone)."""

    def __init__(self, path, persist):
        self.path, self.persist = path, persist
        self.targets = {}           # digest of server and PEMs -> _MuxTarget
        self.relays = set()         # the MuxRelays of the calls in flight
        self.lock = threading.Lock()
        self.calls = 0
        self.last = time.monotonic()
        self.stopping = False

    def serve(self):
        """Take the lock, bind the socket, relay calls until idle; False if another mux holds
        the lock (or it is not a file: only a regular file is locked, a FIFO never waited on)."""
        import stat
        lock = os.open(self.path[:-len(".sock")] + ".lock", os.O_RDONLY | os.O_CREAT |
                       os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(lock).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)   # a mux that died left it: none other runs (the lock)
            old = os.umask(0o177)
            try:
                listener.bind(self.path)
            finally:
                os.umask(old)
            listener.listen(64)
            listener.settimeout(1.0)
            self._accept(listener)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            listener.close()
            os.close(lock)
        return True

    def _accept(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if self.stopping or self._tick():
                    return
                continue
            if self.stopping:
                conn.close()
                return
            with self.lock:
                full = self.calls >= MUX_MAX_CALLS
                if not full:
                    self.calls += 1
            if full or _peer_uid(conn) != os.geteuid():
                conn.close()   # (the client goes direct)
                if not full:
                    self._done()
                continue
            NamedThread(self._relay, "jobworker-mux-call", (conn,)).start()

    def _tick(self):
        """Each second: quiet calls told the mux is alive, channels unused for `persist`
        closed; True once the mux itself has had no call for `persist`."""
        now = time.monotonic()
        with self.lock:
            relays = list(self.relays)
            stale = [d for d, t in self.targets.items()
                     if t.calls == 0 and now - t.used >= self.persist]
            closing = [self.targets.pop(d).channel for d in stale]
            idle = self.calls == 0 and now - self.last >= self.persist
        for relay in relays:
            relay.alive(now)
        for channel in closing:
            channel.close()
        return idle

    def _done(self):
        with self.lock:
            self.calls -= 1
            self.last = time.monotonic()

    def _target(self, head):
        """The target of a call's head, its call counted (_release)."""
        import hashlib
        key = json.dumps([head["server"], head["ca"], head["cert"], head["key"]])
        digest = hashlib.sha256(key.encode()).hexdigest()
        with self.lock:
            target = self.targets.get(digest)
            if target is None:
                grpc = _grpc()
                creds = grpc.ssl_channel_credentials(head["ca"].encode(), head["key"].encode(),
                                                     head["cert"].encode())
                target = self.targets[digest] = _MuxTarget(
                    client_channel(grpc, head["server"], creds), head["server"])
            target.calls += 1
            return target

    def _release(self, target):
        with self.lock:
            target.calls -= 1
            target.used = time.monotonic()

    def _relay(self, conn):
        grpc = _grpc()
        try:
            conn.settimeout(MUX_ANSWER_TIMEOUT)
            _mux_send(conn, MUX_HELLO, b"%d" % MUX_PROTOCOL)
            kind, payload = _mux_recv(conn)
            if kind != MUX_HEAD:
                return
            head = json.loads(payload)
            conn.settimeout(None)
            if "op" in head:
                self._op(conn, head["op"])
                return
            target = self._target(head)
            relay = MuxRelay(conn, target.channel, head, grpc)
            with self.lock:
                self.relays.add(relay)
            try:
                relay.run()
            finally:
                with self.lock:
                    self.relays.discard(relay)
                self._release(target)
        except (OSError, EOFError, ValueError, KeyError, TypeError, struct.error):
            pass   # the client went, or is not one: it has nothing to be told
        finally:
            conn.close()
            self._done()

    def _op(self, conn, op):
        """`jobworker mux status|stop`: what the mux holds, or its end."""
        if op == "stop":
            self.stopping = True
            said = {"code": "OK", "details": "stopping"}
        elif op == "status":
            with self.lock:
                said = {"code": "OK", "details": json.dumps({
                    "pid": os.getpid(), "calls": self.calls - 1, "persist": self.persist,
                    "servers": sorted({t.server for t in self.targets.values()})})}
        else:
            said = {"code": "UNIMPLEMENTED", "details": f"no mux op {op!r}"}
        _mux_send(conn, MUX_STATUS, json.dumps(said).encode())


class MuxRelay:
    """One call relayed: the client's requests from `conn` to `channel`, the responses and the
    status back. The client closing its connection cancels the call."""

    def __init__(self, conn, channel, head, grpc):
        self.conn, self.grpc, self.head = conn, grpc, head
        self.method = head["method"]
        self.channel = channel
        self.call = None
        self.gone = threading.Event()
        self._send_lock = threading.Lock()   # a frame at a time: the relay's, or alive()'s
        self._sent = time.monotonic()

    def _send(self, kind, payload=b""):
        with self._send_lock:
            _mux_send(self.conn, kind, payload)
            self._sent = time.monotonic()

    def alive(self, now):
        """Tell a client whose call has been quiet for MUX_ALIVE_EVERY that the mux lives (a
        frame that does not fit now is not needed: the client is being sent its answer)."""
        if now - self._sent < MUX_ALIVE_EVERY or not self._send_lock.acquire(blocking=False):
            return
        try:
            frame = _mux_frame(MUX_ALIVE)
            sent = self.conn.send(frame, socket.MSG_DONTWAIT)
            if sent < len(frame):   # (all of it or none: the frames stay whole)
                self.conn.sendall(frame[sent:])
            self._sent = now
        except OSError:
            pass
        finally:
            self._send_lock.release()

    def run(self):
        grpc, head = self.grpc, self.head
        many = self._kind()
        requests = self._requests()
        timeout = head.get("timeout")
        metadata = [tuple(kv) for kv in head.get("metadata") or ()] or None
        try:
            request = requests if many[0] else next(requests)
            if many[1]:
                make = self.channel.stream_stream if many[0] else self.channel.unary_stream
                self.call = make(self.method)(request, timeout=timeout, metadata=metadata)
                if not many[0]:   # the client's leaving (its connection's end) is watched for
                    NamedThread(self._watch, "jobworker-mux-watch").start()
                elif self.gone.is_set():
                    self.call.cancel()
                for response in self.call:
                    self._send(MUX_MESSAGE, response)
            else:   # (a client that leaves a unary call leaves it to its deadline)
                make = self.channel.stream_unary if many[0] else self.channel.unary_unary
                response, self.call = make(self.method).with_call(
                    request, timeout=timeout, metadata=metadata)
                self._send(MUX_MESSAGE, response)
            trailing = self.call.trailing_metadata()
            status = {"code": "OK", "details": "", "trailing": trailing or ()}
        except grpc.RpcError as e:
            if self.gone.is_set():
                return
            status = {"code": status_name(e), "details": e.details() or "",
                      "trailing": e.trailing_metadata() or ()}
        except StopIteration:   # no request came
            return
        status["trailing"] = [[k, v] for k, v in status["trailing"] if isinstance(v, str)]
        self._send(MUX_STATUS, json.dumps(status).encode())

    def _kind(self):
        """(many requests, many responses) of the method, from the head."""
        value = self.head.get("kind")
        if value not in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            raise ValueError(f"kind {value!r}")
        return value.startswith("stream"), value.endswith("stream")

    def _requests(self):
        """The client's request messages, until END; the client leaving without END cancels
        the call."""
        while True:
            try:
                kind, payload = _mux_recv(self.conn)
            except (OSError, EOFError):
                kind = None
            if kind == MUX_REQUEST:
                yield payload
            elif kind == MUX_END:
                return
            else:
                self._cancel()
                return

    def _watch(self):
        """The client of a call of one request sends no more but END: its connection's end
        (it left, or took the status) cancels the call."""
        with contextlib.suppress(OSError):
            while self.conn.recv(1 << 12):
                pass
        self._cancel()

    def _cancel(self):
        self.gone.set()
        if self.call is not None:
            self.call.cancel()


def client_channel(grpc, server, creds):
    """A channel of the CLI's (or the mux's) to `server`: a server that vanished under a quiet
    stream (`run`, `wait`) is noticed in a minute."""
    return grpc.secure_channel(server, creds, options=[
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS)])


# -- contexts: saved connections, as docker's and kubectl's ------------------------------------

def config_dir(env=os.environ):
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "jobworker")


class Contexts:
    """~/.config/jobworker/contexts.json (mode 0600, in a 0700 dir): named connections
    {server, ca, cert, key} with absolute paths, and which one is current."""

    def __init__(self, path=None):
        self.path = path or os.path.join(config_dir(), "contexts.json")
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as e:
            raise CliError(f"cannot read {self.path}: {e}") from None
        self.current = data.get("current") or ""
        self.all = data.get("contexts") or {}

    def get(self, name):
        if name not in self.all:
            raise CliError(f"no context {name!r} (jobworker context ls shows them)", EXIT_USAGE)
        return self.all[name]

    def save(self):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        data = json.dumps({"current": self.current, "contexts": self.all}, indent=2,
                          sort_keys=True) + "\n"
        _write_new(self.path, data.encode(), 0o600)


def client_settings(args, env=os.environ):
    """server, ca, cert, key for a client command: each from its flag, else its environment
    variable, else the context (JOBWORKER_CONTEXT or the current one), else the default. A
    context named by --context is a flag: it wins over the environment (a named host is not
    swapped for another by a variable left set)."""
    contexts = Contexts(os.path.join(config_dir(env), "contexts.json"))
    named = getattr(args, "context", None)
    if named:
        context = contexts.get(named)
        order = lambda flag, var: (getattr(args, flag, None), context.get(flag), env.get(var))
    else:
        name = env.get("JOBWORKER_CONTEXT")
        context = contexts.get(name) if name else contexts.all.get(contexts.current, {})
        order = lambda flag, var: (getattr(args, flag, None), env.get(var), context.get(flag))
    out = {}
    for flag, (var, default) in CLIENT_DEFAULTS.items():
        out[flag] = next((v for v in order(flag, var) if v), default)
    return out


def _args_context(p):
    p.epilog = ("example: jobworker context add build1 --server build1:50051 "
                "--ca certs/ca.crt --cert certs/alice.crt --key certs/alice.key; "
                "jobworker context use build1")
    ctx = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = ctx.add_parser("add", help="save a connection (the first one saved becomes current)",
                       epilog="example: jobworker context add build1 --server build1 --ca "
                              "certs/ca.crt --cert certs/alice.crt --key certs/alice.key")
    c.add_argument("name", type=_cli_type(_context_name, CONTEXT_NAME_FORM),
                   help=f"a name for it ({CONTEXT_NAME_FORM})")
    c.add_argument("--server", required=True, help="HOST[:PORT] (port 50051 if none)")
    for what in ("ca", "cert", "key"):
        c.add_argument(f"--{what}", required=True, help=f"{what} file (saved as an absolute path)")
    c.add_argument("--force", action="store_true", help="replace a context of that name")
    c.add_argument("--label", action="append", metavar="KEY=VALUE", type=_label_item,
                   help="a label for --selector (repeatable): --label env=prod --label role=web")
    c = ctx.add_parser("use", help="make a context the current one",
                       epilog="example: jobworker context use build1")
    c.add_argument("name", help="a context's name")
    c = ctx.add_parser("rm", help="forget a context", epilog="example: jobworker context rm old")
    c.add_argument("name", help="a context's name")
    c = ctx.add_parser("ls", help="list the contexts; * marks the current one",
                       epilog="example: jobworker context ls --json")
    c.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_context(args):
    contexts = Contexts()
    if args.action == "add":
        if args.name in contexts.all and not args.force:
            raise CliError(f"context {args.name!r} exists: --force replaces it", EXIT_USAGE)
        entry = {"server": with_default_port(args.server), "labels": dict(args.label or ())}
        for what in ("ca", "cert", "key"):
            path = os.path.abspath(getattr(args, what))
            if not os.path.isfile(path):
                raise CliError(f"--{what} {path}: no such file", EXIT_USAGE)
            entry[what] = path
        contexts.all[args.name] = entry
        if not contexts.current:
            contexts.current = args.name
        contexts.save()
        print(f"context {args.name!r} saved in {contexts.path}"
              + (" (current)" if contexts.current == args.name else ""), file=sys.stderr)
    elif args.action == "use":
        contexts.get(args.name)
        contexts.current = args.name
        contexts.save()
        print(f"current context: {args.name}", file=sys.stderr)
    elif args.action == "rm":
        contexts.get(args.name)
        del contexts.all[args.name]
        if contexts.current == args.name:
            contexts.current = ""
        contexts.save()
    elif args.json:
        print(json.dumps([dict(c, name=name, labels=c.get("labels") or {},
                               current=name == contexts.current)
                          for name, c in sorted(contexts.all.items())], indent=1))
    else:
        print(f"{'':1} {'NAME':16} {'SERVER':32} {'LABELS':24} CERT")
        for name, c in sorted(contexts.all.items()):
            mark = "*" if name == contexts.current else " "
            labels = ",".join(f"{k}={v}" for k, v in sorted((c.get("labels") or {}).items()))
            print(f"{mark} {name:16} {c.get('server', ''):32} {labels or '-':24} "
                  f"{c.get('cert', '')}")
    return EXIT_OK


_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")


_CONTEXT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
CONTEXT_NAME_FORM = "letters, digits, '.', '_', '@', '-', first a letter or digit, at most 64"


def _context_name(text):
    """A context's name: it prefixes job ids (NAME:ID) and names --log-dir's files."""
    if not _CONTEXT_NAME_RE.fullmatch(text):
        raise ValueError(text)
    return text


def _label_item(text):
    """KEY=VALUE of a context's label (kubectl's characters)."""
    import argparse
    key, eq, value = text.partition("=")
    if not eq or not _LABEL_RE.fullmatch(key) or not re.fullmatch(r"[A-Za-z0-9._/-]{0,63}",
                                                                    value):
        raise argparse.ArgumentTypeError(f"invalid label {text!r}: KEY=VALUE, of letters, "
                                         "digits and . _ / -")
    return key, value


def select_contexts(contexts, hosts=None, selector=None):
    """The names of the saved contexts that --hosts (names or shell globs, comma-separated)
    and --selector (KEY=VALUE,..., all must match) choose, sorted; a usage error naming the
    known contexts if none is chosen."""
    import fnmatch
    names = sorted(contexts.all)
    if hosts:
        patterns = [h.strip() for h in hosts.split(",") if h.strip()]
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if selector is not None:
        import argparse
        try:
            wanted = [_label_item(item.strip()) for item in selector.split(",") if item.strip()]
        except argparse.ArgumentTypeError as e:
            raise CliError(f"--selector: {e}", EXIT_USAGE) from None
        names = [n for n in names
                 if all((contexts.all[n].get("labels") or {}).get(k) == v for k, v in wanted)]
    if not names:
        known = ", ".join(
            n + "".join(f" {k}={v}" for k, v in sorted((c.get("labels") or {}).items()))
            for n, c in sorted(contexts.all.items())) or "none: jobworker context add"
        said = " ".join(x for x in (hosts and f"--hosts {hosts}",
                                    selector is not None and f"--selector {selector}") if x)
        raise CliError(f"{said} matches no context (known: {known})", EXIT_USAGE)
    return names


# -- connection ------------------------------------------------------------------------------

def _key_matches(cert_path, key_path):
    """Whether a private key belongs to a certificate (True when either cannot be read: the
    mismatch is then not the problem)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        cert = x509.load_pem_x509_certificate(open(cert_path, "rb").read())
        key = serialization.load_pem_private_key(open(key_path, "rb").read(), None)
        der = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        return cert.public_key().public_bytes(enc, der) == key.public_key().public_bytes(enc, der)
    except Exception:
        return True


def with_default_port(server):
    """HOST:PORT as given, or HOST with jobworker's port (grpc would take 443)."""
    if server.startswith("["):                       # [v6] or [v6]:port
        return server if "]:" in server else f"{server}:{DEFAULT_PORT}"
    if server.count(":") > 1:                        # a bare IPv6 address
        return f"[{server}]:{DEFAULT_PORT}"
    return server if ":" in server else f"{server}:{DEFAULT_PORT}"


class Client:
    """A channel to one server with the CLI's certificates (through this user's mux where one
    runs: see connection sharing); turns RPC errors into CliErrors. main() closes every one
    made (a channel left to the interpreter's exit can hang it)."""

    made = []

    def __init__(self, args):
        Client.made.append(self)
        settings = client_settings(args)
        self.server = with_default_port(settings["server"])
        self.files = {k: settings[k] for k in ("ca", "cert", "key")}
        pems = {}
        for what, path in self.files.items():
            try:
                with open(path, "rb") as f:
                    pems[what] = f.read()
            except OSError as e:
                raise CliError(f"cannot read {what} file {path}: {e.strerror} (set --{what} or "
                               f"{CLIENT_DEFAULTS[what][0]})", EXIT_CONNECT) from None
        self.pb = _messages()
        persist = mux_setting(args)
        path = mux_socket_path() if persist is not None else None
        first = mux_connect(path) if path else None
        if first is not None:
            target = dict(server=self.server, **{k: v.decode() for k, v in pems.items()})
            self.channel = MuxChannel(path, first, target, lambda: self._direct(pems))
        else:
            if path:
                start_mux(path, persist)   # (before grpc is imported: nothing to fork)
            self.channel = self._direct(pems)
        self.stub = service_stub(self.channel, self.pb)

    def _direct(self, pems):
        grpc = _grpc()
        creds = grpc.ssl_channel_credentials(pems["ca"], pems["key"], pems["cert"])
        return client_channel(grpc, self.server, creds)

    def call(self, method, request, timeout=RPC_TIMEOUT):
        try:
            return getattr(self.stub, method)(request, timeout=timeout)
        except rpc_errors() as e:
            raise self.error(e) from None

    def job_id(self, text):
        """The job id `text` names: a whole id, or a unique prefix of at least
        MIN_ID_PREFIX characters (any case) of a job this identity can see."""
        text = text.strip().lower()
        if _JOB_ID_RE.fullmatch(text):
            return text
        if len(text) < MIN_ID_PREFIX or not _JOB_ID_PREFIX_RE.fullmatch(text):
            raise CliError(f"invalid job_id {text!r}: a job id, or its first {MIN_ID_PREFIX} or "
                           "more characters", EXIT_REFUSED)
        found = self.call("List", self.pb.ListRequest(id_prefix=text, page_size=11)).jobs
        if not found:
            raise CliError(f"no job id starts with {text!r}", EXIT_NOT_FOUND)
        if len(found) > 1:
            ids = ", ".join(j.job_id for j in found[:10]) + (", ..." if len(found) > 10 else "")
            raise CliError(f"{text!r} is the start of several job ids: {ids}; give more of it",
                           EXIT_REFUSED)
        return found[0].job_id

    def error(self, e):
        code = status_name(e)
        details = e.details() or code
        said = dict(e.trailing_metadata() or ()).get(SERVER_ERROR_KEY)
        if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and not said:
            return CliError(self.diagnose(details), EXIT_CONNECT, unreachable=True)
        return CliError(details, _EXIT_FOR_CODE.get(code, EXIT_ERROR))

    def diagnose(self, details):
        """One line saying why the server could not be reached and what to do about it."""
        files = ", ".join(f"{k}={v}" for k, v in self.files.items())
        host = self.server.rsplit(":", 1)[0].strip("[]")
        if "security handshaker" in details or "private key" in details.lower():
            if not _key_matches(self.files["cert"], self.files["key"]):
                return (f"the key {self.files['key']} does not belong to the certificate "
                        f"{self.files['cert']}: give the key issued with it (--key)")
            return f"cannot use the client certificate and key ({files}): {details}"
        if "Hostname Verification" in details:
            return (f"the server's certificate does not name {host!r}: connect by a name it "
                    f"has, or re-issue it: `jobworker certs server DIR --host {host}` "
                    f"({files})")
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return (f"the server {self.server} has a certificate the CA {self.files['ca']} did "
                    "not issue: is it the right server, and the right --ca?")
        if "Socket closed" in details:   # (at once: it refused the certificate)
            return (f"the server {self.server} closed the connection during the TLS "
                    f"handshake: it does not accept the client certificate {self.files['cert']}"
                    " (issued by a CA it does not trust?)")
        if "handshake" in details.lower():   # (after grpc's handshake timeout)
            return (f"the server {self.server} took the connection but did not complete a TLS "
                    "handshake: is `jobworker serve` listening on that port (or is it "
                    f"overloaded)? ({files})")
        if "Connection refused" in details:
            return (f"cannot reach server {self.server}: connection refused (is `jobworker "
                    f"serve` running there, on that port?) ({files})")
        if "DNS" in details or "resolv" in details.lower() or "lookup" in details:
            return f"cannot reach server {self.server}: the host name does not resolve ({files})"
        return f"cannot reach server {self.server} ({files}): {details}"

    def close(self):
        self.channel.close()


class Addressed:
    """The clients of the servers a command's job ids are on: ID or PREFIX on the server the
    options name, CONTEXT:ID or CONTEXT:PREFIX on a saved context's (a job id has no colon).
    One client per server, made when first needed."""

    def __init__(self, args):
        self.args, self.clients, self._lock, self._locks = args, {}, threading.Lock(), {}

    def client(self, context=None):
        """The client of `context` (None: the options'), made once; with --hosts (stop), its
        server checked within --connect-timeout as run's are (an unreachable one is said
        for each of its ids)."""
        import argparse
        with self._lock:
            lock = self._locks.setdefault(context, threading.Lock())
        with lock:   # (one per server: a silent one holds up only its own ids)
            if context not in self.clients:
                args = self.args if context is None else argparse.Namespace(
                    **dict(vars(self.args), context=context))
                try:
                    client = Client(args)
                    if context is not None and fans_out(self.args):
                        connect(client, self.args.connect_timeout)
                except CliError as e:
                    client = e
                self.clients[context] = client
            if isinstance(self.clients[context], CliError):
                raise self.clients[context]
            return self.clients[context]

    def resolve(self, text):
        """(client, job id) of what the user typed (a unique prefix is looked up)."""
        context, colon, rest = text.rpartition(":")
        if not colon:
            client = self.client()
            return client, client.job_id(text)
        Contexts().get(context)   # (an unknown one: a usage error saying how to list them)
        client = self.client(context)
        return client, client.job_id(rest)


# -- output formatting -----------------------------------------------------------------------

def _human_bytes(n, base=1024):
    """Sizes say their base: 256 MiB, 1.5 GiB (base 1024); 10 MB (base 1000, for rates)."""
    n = float(n)
    units = ["B", "KiB", "MiB", "GiB", "TiB"] if base == 1024 else ["B", "kB", "MB", "GB", "TB"]
    for unit in units:
        if n < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= base


def _local(ts):
    """A time for people: local, with its zone (--json says UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def _iso(ts):
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _signal_name(num):
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def status_to_dict(pb, msg):
    """jobworker.v1.JobStatus -> the CLI's JSON form (stable keys)."""
    ts = lambda t: t.ToNanoseconds() / 1e9 if t.seconds or t.nanos else None
    return {
        "id": msg.job_id, "owner": msg.owner, "command": list(msg.command),
        "state": pb.JobState.Name(msg.state).removeprefix("JOB_STATE_").lower(),
        "exit_code": msg.exit_code if msg.HasField("exit_code") else None,
        "signal": _signal_name(msg.signal) if msg.HasField("signal") else None,
        "oom_killed": msg.oom_killed,
        "started_at": _iso(ts(msg.started_at)), "ended_at": _iso(ts(msg.ended_at)),
        "pid": msg.pid or None,
        "limits": {"cpu_percent": msg.limits.cpu_percent or None,
                   "memory_bytes": msg.limits.memory_bytes or None,
                   "io_bytes_per_second": msg.limits.io_bytes_per_second or None,
                   "pids": msg.limits.pids or None},
        "usage": {"cpu_seconds": round(msg.usage.cpu_seconds, 6),
                  "memory_bytes": msg.usage.memory_bytes,
                  "memory_peak_bytes": msg.usage.memory_peak_bytes,
                  "io_read_bytes": msg.usage.io_read_bytes,
                  "io_write_bytes": msg.usage.io_write_bytes, "tasks": msg.usage.tasks},
        "output_bytes": msg.output_bytes, "log_truncated": msg.log_truncated,
        "log_error": msg.log_error or None, "lost_reason": msg.lost_reason or None,
        "name": msg.name, "env_keys": list(msg.env_keys), "workdir": msg.workdir or JOB_CWD,
        "timeout_seconds": msg.timeout_seconds or None, "timed_out": msg.timed_out,
        "failure": msg.failure or None, "queued_at": _iso(ts(msg.queued_at)),
        "queue_position": msg.queue_position or None,
        "queue_timeout_seconds": msg.queue_timeout_seconds or None,
        "queue_timed_out": msg.queue_timed_out,
    }


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text):
    """text with control characters (ESC, CR, ...) shown as \\xNN: what a job or a user
    named cannot move the cursor, rewrite a line or retitle a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _command_line(argv):
    import shlex
    return printable(" ".join(shlex.quote(a) for a in argv))


def _duration(seconds):
    seconds = max(0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d {h}h" if h else f"{d}d"
    return f"{h}h {m}min {s}s" if h else f"{m}min {s}s"


def _state_line(d, start, queued, end):
    """format_status's State: what the job is doing, or how it ended, and since when."""
    if d["state"] == "queued":
        state = (f"queued (position {d['queue_position'] or '?'}) since {_local(queued)}; "
                 f"{_duration(end - queued)}")
    elif d["state"] == "running":
        state = f"running (pid {d['pid']}) since {_local(start)}; {_duration(end - start)}"
    else:
        how = (f"exit code {d['exit_code']}" if d["exit_code"] is not None
               else f"killed by {d['signal']}" if d["signal"] else "ended")
        oom = ", OOM-killed" if d["oom_killed"] else ""
        if d["timed_out"]:
            how += f", timed out after {_duration(d['timeout_seconds'])}"
        if d["lost_reason"] or d["failure"]:
            how = d["lost_reason"] or f"never ran: {d['failure']}"
        elif not d["started_at"]:   # out of the queue before its turn came
            how = ("never ran: it waited past its queue timeout of "
                   f"{_duration(d['queue_timeout_seconds'])}" if d["queue_timed_out"]
                   else "never ran: stopped while queued")
        ran = (f"ran {_duration(end - start)}" if d["started_at"]
               else f"waited {_duration(end - queued)}")
        state = f"{d['state']} ({how}{oom}) at {_local(end)}; {ran}"
    return state


def format_status(pb, msg):
    """A `systemctl status`-like view of one job."""
    d = status_to_dict(pb, msg)
    start = msg.started_at.ToNanoseconds() / 1e9
    queued = msg.queued_at.ToNanoseconds() / 1e9
    end = msg.ended_at.ToNanoseconds() / 1e9 if d["ended_at"] else time.time()
    state = _state_line(d, start, queued, end)
    lim = d["limits"]
    limits = ", ".join(x for x in [
        f"cpu {lim['cpu_percent']:g}%" if lim["cpu_percent"] else "",
        f"memory {_human_bytes(lim['memory_bytes'])}" if lim["memory_bytes"] else "",
        f"disk-io {_human_bytes(lim['io_bytes_per_second'], 1000)}/s"
        if lim["io_bytes_per_second"] else "",
        f"pids {lim['pids']}" if lim["pids"] else ""] if x) or "none"
    u = d["usage"]
    output = f"{_human_bytes(d['output_bytes'])}"
    if d["log_truncated"]:
        output += " (truncated at the server's cap)"
    if d["log_error"]:
        output += f" ({d['log_error']})"
    rows = [("State", state)]
    if d["name"]:
        rows.append(("Name", printable(d["name"])))
    rows += [("Owner", printable(d["owner"])), ("Limits", limits)]
    if d["workdir"] != JOB_CWD:
        rows.append(("Workdir", printable(d["workdir"])))
    if d["env_keys"]:
        rows.append(("Env", " ".join(d["env_keys"]) + " (values not shown)"))
    if d["timeout_seconds"]:
        rows.append(("Timeout", _duration(d["timeout_seconds"])))
    if d["queued_at"] and d["started_at"]:
        rows.append(("Queued", f"{_local(queued)}; waited {_duration(start - queued)}"))
    if d["queue_timeout_seconds"]:
        rows.append(("Queue limit", _duration(d["queue_timeout_seconds"])))
    rows += [("CPU", f"{u['cpu_seconds']:.3f}s"),
             ("Memory", f"{_human_bytes(u['memory_bytes'])} (peak "
                        f"{_human_bytes(u['memory_peak_bytes'])})"),
             ("IO", f"read {_human_bytes(u['io_read_bytes'])}, "
                    f"written {_human_bytes(u['io_write_bytes'])}"),
             ("Tasks", str(u["tasks"])), ("Output", output)]
    dot = {"running": "●", "queued": "◌",
           "exited": "○" if d["exit_code"] == 0 else "×"}.get(d["state"], "×")
    lines = [f"{dot} {d['id']} - {_command_line(d['command'])}"]
    lines += [f"{k:>10}: {v}" for k, v in rows]
    return "\n".join(lines)


# -- subcommands ----------------------------------------------------------------------------

START_VALUE_OPTIONS = {"--cpu", "--memory", "--disk-io", "--pids", "--env", "--workdir",
                       "--timeout", "--name", "--server", "--ca", "--cert", "--key", "--context",
                       "--detach-keys", "--hosts", "--selector", "--parallel",
                       "--connect-timeout", "--log-dir", "--queue-timeout"}
START_FLAG_OPTIONS = {"--detach", "--queue", "--no-mux"}   # (--detach: of `run` only)
# Read only before the command: a command's own -i or -t (`sort -t ,`) is common, and so is
# a --rm (`docker run --rm`).
_LEADING_FLAG_RE = re.compile(r"-[it]+|--interactive|--tty|--json|--rm")


class UsageError(Exception):
    """A command line that cannot be what was meant: argparse's usage message and exit 2."""


def _option_at(tokens, i):
    """How many tokens jobworker's start option at tokens[i] takes (0: it is none)."""
    t = tokens[i]
    if t.split("=", 1)[0] in START_VALUE_OPTIONS:
        return 1 if "=" in t else (2 if i + 1 < len(tokens) else 0)
    return 1 if t in START_FLAG_OPTIONS else 0


TAKES_COMMAND = ("start", "run")   # subcommands whose options are split from a command
OPTION_RULE = ("Options of start and run go before the command; only a run of them at its very "
               "end is read too (start bash -c '...' --cpu 50%); after `--` everything is the "
               "command's (put it before a command that takes options of its own).")


def split_start_args(tokens):
    """(jobworker options, command, trailing options) of `start` and `run`. Options come before
    the command (`--` ends them); after the command, only a run of jobworker options that goes
    on to the very end is jobworker's (`start bash -c '...' --cpu 50%`): anything before that
    run is the command's own (`start xz --memory=1G -T0 f` runs all of it). UsageError for an
    unknown option before the command."""
    opts, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if t == "--":
            return opts, tokens[i + 1:], []
        n = _option_at(tokens, i) or (1 if t in ("-h", "--help")
                                      or _LEADING_FLAG_RE.fullmatch(t) else 0)
        if n:
            opts += tokens[i:i + n]
            i += n
        elif t.startswith("-") and t != "-":
            raise UsageError(f"unknown option {t} (if it is the command's, put -- before the "
                             f"command: -- {t} ...)")
        else:
            break
    command = tokens[i:]
    for k in range(1, len(command)):
        j = k
        while j < len(command) and (n := _option_at(command, j)):
            j += n
        if j == len(command) and j > k:
            return opts + command[k:], command[:k], command[k:]
    return opts, command, []


# Which start option sets which request field: errors about the field name the option (the
# server's messages name the field, for every client), and a value given after the command
# that is refused was perhaps meant for the command.
FIELD_OPTIONS = {"cpu_quota": "--cpu", "memory_limit": "--memory", "disk_io": "--disk-io",
                 "pids": "--pids", "job_name": "--name", "workdir": "--workdir",
                 "timeout_seconds": "--timeout", "env": "--env",
                 "queue_timeout_seconds": "--queue-timeout"}


def _as_the_user_said_it(message, trailing=()):
    """A message about a StartRequest field, naming the option instead (invalid memory_limit
    '10X': ... -> invalid --memory '10X': ...), with a hint to put -- before the command if
    that option came after it."""
    m = re.match(r"invalid (\S+) ", message)
    option = FIELD_OPTIONS.get(m.group(1)) if m else None
    if option is None:
        return message
    message = f"invalid {option} {message[m.end():]}"
    if option in {t.split("=", 1)[0] for t in trailing}:
        message += f" (if {option} is the command's own option, put -- before the command)"
    return message


def _env_item(text):
    """NAME=VALUE, or NAME: the value of NAME here (as docker's -e NAME). Errors name the
    variable, never its value."""
    import argparse
    name, eq, value = text.partition("=")
    if not _ENV_NAME_RE.fullmatch(name):
        raise argparse.ArgumentTypeError(f"invalid name {name!r}: NAME=VALUE or NAME, NAME as "
                                         "[A-Za-z_][A-Za-z0-9_]*")
    if not eq:
        if name not in os.environ:
            raise argparse.ArgumentTypeError(f"{name} is not set here (NAME alone takes its "
                                             "value from this environment)")
        value = os.environ[name]
    try:
        validate_env({name: value})
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, value


def start_job(args, client=None, say_queued=False):
    """Start the job `start` and `run` describe (on `client`'s server, else the one args
    name); returns (client, job id). say_queued: a job that is queued is said so on
    stderr."""
    limits = {"cpu_quota": args.cpu or "", "memory_limit": args.memory or "",
              "disk_io": args.disk_io or "", "pids": args.pids or ""}
    # Check locally too: a typo is reported without a round trip, with the same message.
    trailing = getattr(args, "trailing", ())
    try:
        parse_limits(limits["cpu_quota"], limits["memory_limit"], limits["disk_io"],
                     limits["pids"])
        validate_name(args.name or "")
    except InvalidArgument as e:
        if e.field != "cpu_quota":   # the server's CPU count decides the CPU range
            raise CliError(_as_the_user_said_it(str(e), trailing), EXIT_USAGE) from None
    client = client or Client(args)
    pb = client.pb
    req = pb.StartRequest(name=args.command[0], args=args.command[1:],
                          resources=pb.ResourceConfig(**limits), env=dict(args.env or ()),
                          workdir=args.workdir or "", timeout_seconds=args.timeout or 0,
                          job_name=args.name or "")
    if args.tty:   # TERM and the window size of this terminal (if there is one)
        req.stdin = pb.STDIN_MODE_TTY
        req.terminal.term = os.environ.get("TERM", "")
        size = local_window()
        if size:
            req.terminal.size.rows, req.terminal.size.columns = size
    elif args.interactive:
        req.stdin = pb.STDIN_MODE_PIPE
    if args.queue or args.queue_timeout:
        req.queue, req.queue_timeout_seconds = True, args.queue_timeout or 0
    try:
        reply = client.call("Start", req)
        if say_queued and reply.status.state == pb.JOB_STATE_QUEUED:
            print(f"jobworker: job {reply.job_id} is queued (position "
                  f"{reply.status.queue_position}): it starts when a slot frees",
                  file=sys.stderr, flush=True)
        return client, reply.job_id
    except CliError as e:
        if e.code == EXIT_REFUSED:
            raise CliError(_as_the_user_said_it(str(e), trailing), e.code) from None
        if e.code == EXIT_EXHAUSTED and "running jobs" in str(e) and not req.queue:
            raise CliError(f"{e} (--queue waits for a slot instead)", e.code) from None
        raise


def _args_start(p):
    p.usage = "jobworker start [START OPTIONS] [--] CMD [ARG...]"
    p.description = OPTION_RULE
    p.epilog = ("example: jobworker start --memory 1G --name nightly -- make "
                "-j8 test (prints only the id: ID=$(jobworker start ...)); with --hosts or "
                "--selector, `HOST ID` per line")
    _add_start_options(p)
    _add_fanout_options(p)


def cmd_start(args):
    if fans_out(args):
        return start_on_hosts(args)
    print(start_job(args)[1])
    return EXIT_OK


# `run` and `wait` exit as the job did, as a shell says it, and with these where it did not
# end by itself: timeout(1)'s 124 for a timeout, 125 (docker's "the daemon failed") for a job
# whose end is unknown (lost with a crashed server) or that never ran (failed), 128+N for
# run's own signal N.
EXIT_TIMED_OUT, EXIT_LOST = 124, 125
RECONNECT_PATIENCE = 60.0   # how long `run` and `wait` try again to reach a restarting server


def job_exit_code(pb, msg):
    """The exit code `run` and `wait` give a job's final status."""
    if msg.timed_out or msg.queue_timed_out:
        return EXIT_TIMED_OUT
    if msg.state in (pb.JOB_STATE_LOST, pb.JOB_STATE_FAILED):
        return EXIT_LOST
    if msg.HasField("exit_code"):
        return msg.exit_code
    if msg.HasField("signal"):
        return 128 + msg.signal
    return EXIT_ERROR


def job_end_notes(pb, msg):
    """jobworker's own lines about how a job ended, where its exit code does not say it."""
    d = status_to_dict(pb, msg)
    notes = []
    if d["timed_out"]:
        notes.append(f"job {d['id']} ran past its timeout of {_duration(d['timeout_seconds'])}"
                     f" and was stopped")
    if d["queue_timed_out"]:
        notes.append(f"job {d['id']} waited in the queue past its queue timeout of "
                     f"{_duration(d['queue_timeout_seconds'])}: it never ran")
    if d["state"] == "lost":
        notes.append(f"job {d['id']} was lost: {d['lost_reason'] or 'its end is not known'}")
    if d["state"] == "failed":
        notes.append(f"job {d['id']} never ran: {d['failure'] or 'its start failed'}")
    if d["oom_killed"]:
        limit = d["limits"]["memory_bytes"]
        notes.append(f"job {d['id']} was killed by the OOM killer: "
                     + (f"it reached its memory limit of {_human_bytes(limit)}" if limit
                        else "the host ran out of memory"))
    return notes


class ResumePoint:
    """Where a client that follows a job's output stands, to resume there after a lost call:
    the offset past the last output it received, and since when it tries to reach the server
    again (None while messages come)."""

    def __init__(self, offset):
        self.offset, self.trying_since = offset, None

    def read(self, pb, call, on_message):
        """Each output message of a Stream or Attach call to on_message, until its final
        status (returned; None if the call ended without one)."""
        for msg in call:
            self.trying_since = None
            if msg.HasField("final_status"):
                return msg.final_status
            for _, at, data in output_pieces(pb, msg):
                self.offset = at + len(data)
            on_message(msg)
        return None

    def try_again(self, err):
        """After a call lost to an unreachable server: raise `err` once RECONNECT_PATIENCE
        has passed since it was first lost, else wait a moment before the next try."""
        now = time.monotonic()
        self.trying_since = self.trying_since or now
        if now - self.trying_since > RECONNECT_PATIENCE:
            raise err
        time.sleep(0.5)


def follow_to_end(client, job_id, on_message=None, offset=0):
    """Stream a job until its final status, which is returned; each output message goes to
    on_message (None: status only, no output is sent). A server that cannot be reached (one
    being restarted) is tried again for RECONNECT_PATIENCE seconds, resuming where the
    output stopped."""
    pb, at = client.pb, ResumePoint(offset)
    while True:
        req = pb.StreamRequest(job_id=job_id, offset=at.offset, batch=True,
                               status_only=on_message is None)
        call = client.stub.Stream(req)
        try:
            final = at.read(pb, call, on_message)
            if final is not None:
                return final
            err = CliError("the server ended the stream early", EXIT_CONNECT, unreachable=True)
        except rpc_errors() as e:
            err = client.error(e)
            if not err.unreachable:
                raise err from None
        finally:
            call.cancel()
        at.try_again(err)


class OutputWriter:
    """Writes a stream's output to stdout and stderr, byte-exact; flushed at each switch when
    both go to one file (a terminal, 2>&1), so that it shows them in order."""

    def __init__(self, pb):
        self.pb = pb
        self.outs = {pb.OUTPUT_STREAM_STDOUT: sys.stdout.buffer,
                     pb.OUTPUT_STREAM_STDERR: sys.stderr.buffer}
        self.same = _same_file(sys.stdout, sys.stderr)

        self._last = None

    def __call__(self, msg):
        for stream, at, data in output_pieces(self.pb, msg):
            self.piece(stream, at, data)
        self.flush()

    def piece(self, stream, at, data):
        out = self.outs[stream]
        if self.same and self._last is not None and out is not self._last:
            self._last.flush()
        out.write(data)
        self._last = out
        if len(data) < 65536:   # live output is seen as it comes
            out.flush()

    def flush(self):
        for out in self.outs.values():
            out.flush()


def _quiet_stdout():
    """stdout went away (`| head`): nothing more to say, and nothing to flush at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _Signalled(BaseException):
    def __init__(self, signum):
        self.signum = signum


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


RUN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _args_run(p):
    p.usage = ("jobworker run [START OPTIONS] [-i] [-t[t]] [--detach-keys KEYS] [--detach] [--rm] "
               "[--] CMD [ARG...]")
    p.description = ("Starts a job as `start` does, writes its stdout to stdout and its stderr "
                     "to stderr from the first byte (with -i, this stdin goes to the job; with "
                     "-t the job runs on a terminal: Ctrl-C is a key for it, Ctrl-P Ctrl-Q "
                     "detaches), and exits as the job did: its exit code, "
                     "128+N if signal N killed it (137: also the OOM killer, said on stderr), "
                     f"{EXIT_TIMED_OUT} if it ran past --timeout (or waited past --queue-timeout), "
                     f"{EXIT_LOST} if its end is "
                     "unknown (lost in a server crash). Ctrl-C or SIGTERM stops the job and "
                     "exits 130 or 143; a second Ctrl-C leaves at once. A server restart is "
                     f"waited for ({RECONNECT_PATIENCE:g}s) and the output resumed.")
    _add_start_options(p)
    p.add_argument("--detach", action="store_true", help="only start it, as `start` does")
    p.add_argument("--rm", action="store_true",
                   help="remove the job (its record and output) once it has ended and its "
                        "output is here, as `docker run --rm`")
    _add_detach_keys(p)
    _add_fanout_options(p, output=True)
    p.epilog = ("example: jobworker run --timeout 2h --memory 1G -- make test && echo passed; "
                "jobworker run -it --memory 1G -- bash; tar -c . | jobworker run -i -- tar -C "
                "/srv/x -x")


def cmd_run(args):
    if args.detach:
        return cmd_start(args)
    if fans_out(args):
        return run_on_hosts(args)
    if args.tty == 1 and not os.isatty(0):
        raise CliError("-t needs a terminal on stdin (this one is not); -i sends a pipe or a "
                       "file, -tt makes the job a terminal anyway", EXIT_USAGE)
    old = {sig: signal.signal(sig, _raise_signalled) for sig in RUN_SIGNALS}
    try:
        client, job_id = None, None
        try:
            client, job_id = start_job(args, say_queued=True)
            if args.interactive or args.tty:
                final = AttachSession(client, job_id, bool(args.tty), args.detach_keys,
                                      started=True).run(0)
                if final is None:
                    return EXIT_OK   # detached: the job goes on
            else:
                final = follow_to_end(client, job_id, OutputWriter(client.pb))
        except _Signalled as e:
            if job_id is None:
                return 128 + e.signum   # nothing started (or its id never came back)
            code = _stop_for_signal(client, job_id, e.signum)
            if args.rm:
                _remove_ended(client, job_id)
            return code
        except BrokenPipeError:
            _quiet_stdout()
            _stop_quietly(client, job_id)   # the reader of its output left: so does the job
            return 141
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for note in job_end_notes(client.pb, final):
        print(f"jobworker: {note}", file=sys.stderr)
    if args.rm:
        _remove_ended(client, job_id)
    return job_exit_code(client.pb, final)


def _remove_ended(client, job_id):
    """run --rm: the ended job's record and output go (a failure is said, not fatal)."""
    try:
        client.call("Remove", client.pb.RemoveRequest(job_id=job_id))
    except CliError as e:
        _say(f"jobworker: job {job_id} was not removed: {e}")


# -- interactive jobs: run -i / -t, start -i / -t, attach --------------------------------------

DETACH_KEYS = "ctrl-p,ctrl-q"   # docker's
INPUT_CHUNK = 256 << 10         # bytes of stdin per AttachRequest (well under the request cap)
_INPUT_END = object()


def parse_detach_keys(text):
    """The bytes of a detach sequence written as docker's --detach-keys: comma-separated
    ctrl-X (X a letter or one of @[\\]^_) and single characters; "" for none."""
    import argparse
    out = bytearray()
    for key in (k.strip() for k in text.split(",") if k.strip()):
        if key.lower().startswith("ctrl-") and len(key) == 6 and 64 <= ord(key[5].upper()) <= 95:
            out.append(ord(key[5].upper()) - 64)
        elif len(key) == 1 and key.isprintable():
            out += key.encode()
        else:
            raise argparse.ArgumentTypeError(f"invalid key {key!r}: ctrl-X (X a letter or one "
                                             "of @[\\]^_) or one character, comma-separated")
    return bytes(out)


def read_available(fd, buf):
    """Read into `buf` (a memoryview) what `fd` has: waits for the first bytes, then takes
    what more is there at once, up to its size (one read of a pipe is 64 KiB at most; few large
    messages cost less than many small ones). Returns (bytes read, not at the end yet). Reads
    land in one buffer: a fresh bytes object per read of more than 128 KiB costs an mmap."""
    n = 0
    while n < len(buf):
        try:
            got = os.readv(fd, [buf[n:]])
        except OSError:   # (EIO: a terminal that hung up) as its end
            got = 0
        if not got:
            return n, False
        n += got
        if not select.select([fd], [], [], 0)[0]:
            break
    return n, True


def local_window():
    """(rows, columns) of this process's terminal, or None without one; a size past what a
    server takes (MAX_WINDOW) is sent as that (a window stretched mid-session must not end it)."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines and size.columns:
                return min(size.lines, MAX_WINDOW), min(size.columns, MAX_WINDOW)
    return None


class RawTerminal:
    """This terminal in raw mode while attached (every key is a byte for the job's terminal,
    Ctrl-C too), put back as it was on every way out: the end, an error, a signal."""

    def __init__(self, fd):
        self.fd, self.saved = fd, None

    def __enter__(self):
        import tty
        self.saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(termios.error):   # (a terminal hung up has nothing to restore)
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


class AttachSession:
    """This process attached to a job: stdin to the job (read by a thread of its own into a
    short queue, so a job that does not read holds this process back), the job's output to
    stdout, window sizes at start and on SIGWINCH, the detach keys. A server that cannot be
    reached is tried again for RECONNECT_PATIENCE seconds, as `run` does; input that was on
    its way to a pipe then may not have arrived, so the pipe is closed (a terminal goes on)."""

    def __init__(self, client, job_id, tty, detach_keys=DETACH_KEYS, started=False):
        self.client, self.pb, self.job_id, self.tty = client, client.pb, job_id, tty
        self.started = started             # this process started the job (`run`)
        self.raw = tty and os.isatty(0)
        # (only in raw mode: a terminal in its own mode holds keys back until Enter, and
        # takes Ctrl-Q for flow control)
        self.keys = parse_detach_keys(detach_keys) if self.raw else b""
        # A pipe's input from a pipe or a file is read by the call's own request stream (no
        # thread, no queue: the fastest way), keys and a terminal's input by a thread.
        self.direct = not tty and not os.isatty(0)
        self._attach = client.channel.stream_stream(
            f"/{SERVICE_NAME}/Attach", response_deserializer=self.pb.StreamResponse.FromString,
            request_serializer=_passing_bytes(self.pb.AttachRequest.SerializeToString))
        self._matched = 0                  # bytes of the detach keys read so far
        self.queue = queue.Queue(4)        # AttachRequests from stdin, then _INPUT_END
        self.detached = threading.Event()
        self.window_changed = threading.Event()
        self.input_ended = False           # stdin's end was read (and sent)
        self.cut = False                   # a pipe's input was cut by a lost connection
        self.finished = False
        self.call = None
        self._take = threading.Lock()      # one call's requests take from the queue at a time
        self._pushback = None              # taken by a call that had ended: the next one's
        self._size_lock = threading.Lock()
        self._sent_size = None             # the window size this call was last sent

    def run(self, offset):
        """Attach from `offset` (None: the current end of the output) until the job ends:
        its final status; None if detached. A job that has ended by the time it is reached
        is streamed to its end instead (`run -i -- true`)."""
        if not self.direct:
            threading.Thread(target=self._read_stdin, name="jobworker-stdin",
                             daemon=True).start()
        old = signal.signal(signal.SIGWINCH, lambda *_: self.window_changed.set())
        try:
            with RawTerminal(0) if self.raw else contextlib.nullcontext():
                final = self._attached(offset)
            if final is None:
                print(f"jobworker: detached from job {self.job_id}, which goes on; again: "
                      f"jobworker attach {self.job_id}", file=sys.stderr)
            return final
        finally:
            self.finished = True
            signal.signal(signal.SIGWINCH, old)

    def _attached(self, offset):
        pb, writer = self.pb, OutputWriter(self.pb)
        at = ResumePoint(offset)
        while True:
            start = pb.AttachStart(job_id=self.job_id)
            if at.offset is not None:
                start.offset = at.offset
            ended = threading.Event()
            if self.detached.is_set():   # (the keys came while it reconnected)
                return None
            self.call = call = self._attach(self._requests(start, ended))
            if self.detached.is_set():
                call.cancel()
            try:
                final = at.read(pb, call, writer)
                if final is not None:
                    return final
                err = CliError("the server ended the attachment early", EXIT_CONNECT,
                               unreachable=True)
            except rpc_errors() as e:
                if self.detached.is_set():
                    return None
                err = self.client.error(e)
                if (status_name(e) == "FAILED_PRECONDITION" and
                        (self.started or at.trying_since is not None) and self._has_ended()):
                    # it ended before (or while) this process could attach: the rest of its
                    # output and its end, as `run` without -i
                    return follow_to_end(self.client, self.job_id, writer, at.offset or 0)
                if not err.unreachable:
                    raise err from None
            finally:
                call.cancel()
                ended.set()
            if not self.tty and not self.input_ended and not self.cut:
                self.cut = True
                print(f"jobworker: the connection was lost while input was on its way; job "
                      f"{self.job_id}'s stdin is closed (what was in flight may be missing)",
                      file=sys.stderr)
            at.try_again(err)

    def _has_ended(self):
        status = self.client.call("Query", self.pb.QueryRequest(job_id=self.job_id)).status
        return status.state not in (self.pb.JOB_STATE_RUNNING, self.pb.JOB_STATE_QUEUED)

    def _requests(self, start, ended):
        """The request stream of one Attach call, until `ended`."""
        pb = self.pb
        yield pb.AttachRequest(start=start)
        if self.raw:   # the size now, whatever it was at start, on every call
            with self._size_lock:
                self._sent_size = None
            self.window_changed.set()
        if self.input_ended or self.cut:   # (again, after a reconnect: the end is idempotent)
            if not self.tty:
                yield pb.AttachRequest(eof=True)
            return
        if self.direct:
            yield from self._read_directly()
            return
        while not self.finished and not ended.is_set():
            if self.window_changed.is_set() and self.raw:
                self.window_changed.clear()
                resize = self._resize()
                if resize is not None:
                    yield resize
            item = self._next_input(ended)
            if item is None:
                continue
            if item is _INPUT_END:
                self.input_ended = True
                yield pb.AttachRequest(eof=True)
                return
            if self.cut:
                yield pb.AttachRequest(eof=True)
                return
            yield item

    def _resize(self):
        """An AttachRequest of this terminal's window size if it is not the one last sent,
        else None."""
        with self._size_lock:   # (the size is read under it: the last one sent is the latest)
            size = local_window()
            if size is None or size == self._sent_size:
                return None
            self._sent_size = size
        return self.pb.AttachRequest(resize=self.pb.WindowSize(rows=size[0], columns=size[1]))

    def _read_directly(self):
        buf = memoryview(bytearray(INPUT_CHUNK))
        while True:
            n, more = read_available(0, buf)
            if n:
                yield encode_attach_input(buf[:n])
            if not more or self.cut:
                self.input_ended = not more
                yield self.pb.AttachRequest(eof=True)
                return

    def _next_input(self, ended):
        """The next item of stdin's queue for the call that `ended` belongs to; None if none
        came in a moment. One its call no longer wants (it ended while this waited) is kept
        for the next call: keys typed while the server restarts reach it, in order."""
        with self._take:
            if ended.is_set():
                return None
            if self._pushback is not None:
                item, self._pushback = self._pushback, None
                return item
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                return None
            if ended.is_set():
                self._pushback, item = item, None
            return item

    def _read_stdin(self):
        """Thread: stdin into the queue, in reads of up to INPUT_CHUNK bytes, watching for the
        detach keys when stdin is a terminal."""
        buf = memoryview(bytearray(INPUT_CHUNK))
        while True:
            n, more = read_available(0, buf)
            data = bytes(buf[:n])
            if not data and not more:
                self.queue.put(_INPUT_END)
                return
            detach = False
            if self.keys:
                data, detach = self._scan(data)
            if data:
                # A key typed after the window changed reaches the job after its new size:
                # SIGWINCH alone may be handled after the keys are sent.
                resize = self._resize() if self.raw else None
                if resize is not None:
                    self.queue.put(resize)
                self.queue.put(encode_attach_input(data))
            if detach:
                self.detached.set()
                if self.call is not None:
                    self.call.cancel()
                return
            if not more:
                self.queue.put(_INPUT_END)
                return

    def _scan(self, data):
        """(what of `data` goes to the job, whether the detach keys were typed): a partial
        sequence is held back until the next key says what it was."""
        out = bytearray()
        for b in data:
            if b == self.keys[self._matched]:
                self._matched += 1
                if self._matched == len(self.keys):
                    self._matched = 0
                    return bytes(out), True
                continue
            out += self.keys[:self._matched]
            self._matched = 0
            if b == self.keys[0]:
                self._matched = 1
            else:
                out.append(b)
        return bytes(out), False


def _args_attach(p):
    p.usage = "jobworker attach [--tail N] [--detach-keys KEYS] ID"
    p.description = ("Attaches this terminal (or stdin) to a job started with -i or -t: what "
                     "you type goes to the job, its output from now on comes here (--tail N: "
                     "its last N lines first), and it exits as `run` does when the job ends. "
                     "Ctrl-P Ctrl-Q detaches and leaves the job running; several clients may be "
                     "attached at once. Ctrl-C goes to a terminal job as a key; a job on a pipe "
                     "gets this stdin's end when it ends.")
    p.epilog = "example: jobworker attach --tail 20 3f2a (after ID=$(jobworker start -it -- bash))"
    p.add_argument("job_id", metavar="ID", help="a job id or its first 4 or more characters")
    p.add_argument("--tail", type=_cli_type(_count, "a number of lines, 0 or more"),
                   metavar="N", help="start with the last N lines of the output so far")
    _add_detach_keys(p)
    _add_client_options(p)


def _add_detach_keys(p):
    p.add_argument("--detach-keys", metavar="KEYS", default=DETACH_KEYS,
                   type=_cli_type(lambda t: (parse_detach_keys(t), t)[1], "ctrl-X or a "
                                  "character, comma-separated"),
                   help=f"the keys that detach, leaving the job running (default "
                        f"{DETACH_KEYS}; \"\" for none)")


def cmd_attach(args):
    client, job_id = Addressed(args).resolve(args.job_id)
    pb = client.pb
    status = client.call("Query", pb.QueryRequest(job_id=job_id)).status
    offset = None
    if args.tail is not None:
        offset = tail_offset(client, job_id, args.tail, status.output_bytes)
    old = {sig: signal.signal(sig, _raise_signalled) for sig in RUN_SIGNALS}
    try:
        final = AttachSession(client, job_id, status.stdin == pb.STDIN_MODE_TTY,
                              args.detach_keys).run(offset)
    except _Signalled as e:
        print(f"jobworker: left job {job_id} running (jobworker attach {job_id})",
              file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if final is None:
        return EXIT_OK
    for note in job_end_notes(pb, final):
        print(f"jobworker: {note}", file=sys.stderr)
    return job_exit_code(pb, final)


# -- many hosts: --hosts, --selector ------------------------------------------------------------

DEFAULT_PARALLEL = 32
DEFAULT_CONNECT_TIMEOUT = 5.0
_HOST_COLOURS = (32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)


def _add_fanout_options(p, output=False):
    g = p.add_argument_group("many hosts (saved contexts)")
    g.add_argument("--hosts", metavar="PATTERN[,PATTERN...]",
                   help="the contexts to run on: names or shell globs (web*)")
    g.add_argument("--selector", metavar="KEY=VALUE[,...]",
                   help="the contexts whose labels match all of these (context add --label)")
    g.add_argument("--parallel", type=_cli_type(_positive, "a number, 1 or more"),
                   default=DEFAULT_PARALLEL, metavar="N",
                   help=f"hosts in flight at once (default {DEFAULT_PARALLEL})")
    g.add_argument("--connect-timeout", type=_cli_type(_positive_seconds, DURATION_FORM),
                   default=DEFAULT_CONNECT_TIMEOUT, metavar="DURATION",
                   help="how long an unreachable host may hold its slot (default "
                        f"{DEFAULT_CONNECT_TIMEOUT:g}s)")
    if output:
        g.add_argument("--log-dir", metavar="DIR",
                       help="also write each host's output to DIR/HOST.stdout and .stderr")
        g.add_argument("--json", action="store_true",
                       help="one object per host at the end, alone on stdout (the jobs' "
                            "output then goes to stderr; before the command only)")


def fans_out(args):
    return bool(getattr(args, "hosts", None) or getattr(args, "selector", None) is not None)


def fanout_contexts(args):
    """The names of the contexts --hosts and --selector choose (select_contexts); a usage
    error with flags that name one server (each host is its context: one server's flags
    would send every job there)."""
    given = [f"--{flag}" for flag in (*CLIENT_DEFAULTS, "context") if getattr(args, flag, None)]
    if given:
        raise CliError(f"{', '.join(given)} name one server; --hosts and --selector choose "
                       "saved contexts, each with its own: give one or the other", EXIT_USAGE)
    return select_contexts(Contexts(), args.hosts, args.selector)


def host_clients(args):
    """[(context name, a function making its Client)] of the hosts args choose."""
    names = fanout_contexts(args)

    def client_of(name):
        def make():
            client = Client(argparse_copy(args, context=name))
            connect(client, args.connect_timeout)
            return client
        return make
    return [(name, client_of(name)) for name in names]


def connect(client, timeout):
    """Make sure the client's server answers, within `timeout` seconds: a refused or failed
    connection is said at once, with why; a silent one after `timeout` (CliError, exit 3).
    (One Info call: waiting on the channel's state would cost its close a poll interval.)"""
    try:
        client.stub.Info(client.pb.InfoRequest(), timeout=timeout)
    except rpc_errors() as e:
        if status_name(e) == "DEADLINE_EXCEEDED":
            raise CliError(f"unreachable: {client.server} did not answer within {timeout:g}s",
                           EXIT_CONNECT, unreachable=True) from None
        err = client.error(e)
        if err.unreachable:
            raise CliError(f"unreachable: {err}", err.code, unreachable=True) from None
        if status_name(e) != "UNIMPLEMENTED":   # (a server without Info answers)
            raise err from None


def argparse_copy(args, **changes):
    import argparse
    return argparse.Namespace(**dict(vars(args), **changes))


class HostOutput:
    """The output of many hosts' jobs on one terminal: each line prefixed `HOST: ` (coloured
    per host on a terminal), stdout to stdout and stderr to stderr, whole lines only (a partial
    one waits for its end, or the job's); with a log dir, each host's streams byte-exact in
    DIR/HOST.stdout and DIR/HOST.stderr too."""

    def __init__(self, pb, hosts, log_dir=None, stdout_is_json=False):
        self.pb, self.log_dir = pb, log_dir
        out = sys.stderr if stdout_is_json else sys.stdout   # (--json: stdout is the JSON's)
        self.outs = {pb.OUTPUT_STREAM_STDOUT: out.buffer,
                     pb.OUTPUT_STREAM_STDERR: sys.stderr.buffer}
        width = max(len(h) for h in hosts)
        colour = self.outs[pb.OUTPUT_STREAM_STDOUT].isatty()
        self.prefix = {h: (f"\x1b[{_HOST_COLOURS[i % len(_HOST_COLOURS)]}m{h + ':':{width + 1}}"
                           f"\x1b[0m " if colour else f"{h + ':':{width + 1}} ").encode()
                       for i, h in enumerate(hosts)}
        self.partial = {}
        self.files = {}
        self.lock = threading.Lock()
        if log_dir:
            for h in hosts:   # (a name of contexts.json, which may have been written by hand)
                if not _CONTEXT_NAME_RE.fullmatch(h):
                    raise CliError(f"context {h!r} cannot name a file in --log-dir: rename it "
                                   f"({CONTEXT_NAME_FORM})", EXIT_USAGE)
            os.makedirs(log_dir, exist_ok=True)

    def writer(self, host):
        """on_message for follow_to_end of the job on `host`."""
        if self.log_dir:
            for stream, name in ((self.pb.OUTPUT_STREAM_STDOUT, "stdout"),
                                 (self.pb.OUTPUT_STREAM_STDERR, "stderr")):
                self.files[host, stream] = open(os.path.join(self.log_dir, f"{host}.{name}"), "wb")

        def on_message(msg):
            for stream, _, data in output_pieces(self.pb, msg):
                self.piece(host, stream, data)
        return on_message

    def piece(self, host, stream, data):
        if (host, stream) in self.files:
            self.files[host, stream].write(data)
        text = self.partial.pop((host, stream), b"") + data
        lines = text.split(b"\n")
        self.partial[host, stream] = lines.pop()
        if lines:
            prefix = self.prefix[host]
            with self.lock:
                self.outs[stream].write(b"".join(prefix + line + b"\n" for line in lines))
                self.outs[stream].flush()

    def end(self, host):
        """The host's job has ended: its partial lines out, its log files closed."""
        for stream in self.outs:
            rest = self.partial.pop((host, stream), b"")
            if rest:
                with self.lock:
                    self.outs[stream].write(self.prefix[host] + rest + b"\n")
                    self.outs[stream].flush()
            f = self.files.pop((host, stream), None)
            if f is not None:
                f.close()


@dataclasses.dataclass
class HostResult:
    host: str
    id: str = ""
    final: object = None     # the job's final JobStatus message
    error: str = ""          # why it did not run (or its end is not known)
    code: int = EXIT_OK      # the exit status it counts for

    def to_dict(self, pb):
        d = {"host": self.host, "id": self.id or None, "exit_code": None, "signal": None,
             "oom": False, "timed_out": False, "error": self.error or None}
        if self.final is not None:
            f = status_to_dict(pb, self.final)
            d.update(exit_code=f["exit_code"], signal=f["signal"], oom=f["oom_killed"],
                     timed_out=f["timed_out"])
        return d

    def said(self, pb):
        """How it failed, in a few words (the summary's)."""
        if self.error:
            return self.error
        d = status_to_dict(pb, self.final)
        if d["timed_out"]:
            return "timed out"
        if d["exit_code"] is not None:
            return f"exit {d['exit_code']}"
        return d["signal"] or d["state"]


def fan_out(args, hosts, work):
    """work(host, make_client, result) on every host, `--parallel` at a time; returns the
    HostResults in host order. A signal (Ctrl-C) raises _Signalled here, in the main thread,
    with the results so far on its `results`."""
    import concurrent.futures
    results = {host: HostResult(host) for host, _ in hosts}

    def one(host, make):
        r = results[host]
        try:
            work(host, make, r)
        except CliError as e:
            r.error, r.code = str(e), e.code
        except Exception as e:   # one host's trouble is its own line, never the others'
            r.error, r.code = f"{type(e).__name__}: {e}", EXIT_ERROR
    pool = thread_pool(min(args.parallel, len(hosts)), "jobworker-host")
    futures = [pool.submit(one, host, make) for host, make in hosts]
    try:
        while not all(f.done() for f in futures):
            concurrent.futures.wait(futures, timeout=0.2)   # (signals reach this thread)
    except _Signalled as e:
        e.results, e.futures = results, futures
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [results[host] for host, _ in hosts]


def run_on_hosts(args):
    """`run --hosts/--selector`: the job on every host, output prefixed by host, one summary
    line; exit 0 if every host succeeded, else the largest exit status (unreachable: 3)."""
    import concurrent.futures
    if args.interactive or args.tty:
        raise CliError("-i and -t attach to one job: give one server, not --hosts", EXIT_USAGE)
    hosts = host_clients(args)
    output = HostOutput(_messages(), [h for h, _ in hosts], args.log_dir, args.json)
    clients = {}
    stopping = threading.Event()   # a signal came: a Start in flight stops what it started

    def work(host, make, r):
        client = clients[host] = make()
        if stopping.is_set():
            return
        _, job_id = start_job(args, client)
        if stopping.is_set():
            _stop_quietly(client, job_id, timeout=None)
            return
        r.id = job_id
        try:
            r.final = follow_to_end(client, r.id, output.writer(host))
        finally:
            output.end(host)
        r.code = job_exit_code(client.pb, r.final)
        if args.rm:
            _remove_ended(client, r.id)
    old = {sig: signal.signal(sig, _raise_signalled) for sig in RUN_SIGNALS}
    try:
        results = fan_out(args, hosts, work)
    except _Signalled as e:
        stopping.set()
        started = [(clients[r.host], r.id) for r in e.results.values() if r.id]
        _say(f"jobworker: {signal.Signals(e.signum).name}: stopping the job on "
             f"{len(started)} host{'s' if len(started) != 1 else ''}")
        with thread_pool(max(1, min(len(started), 32))) as pool:
            list(pool.map(lambda cj: _stop_quietly(*cj, timeout=None), started))
        try:   # the hosts whose Start was in flight stop theirs (another signal: leave)
            while not all(f.done() for f in e.futures):
                concurrent.futures.wait(e.futures, timeout=0.2)
        except _Signalled:
            _say("jobworker: left; the jobs are being stopped")
        return 128 + e.signum
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    pb = _messages()
    if args.json:
        print(json.dumps([r.to_dict(pb) for r in results], indent=1))
    failed = [r for r in results if r.code != EXIT_OK]
    print(f"jobworker: {len(results)} host{'s' if len(results) != 1 else ''}: "
          f"{len(results) - len(failed)} succeeded, {len(failed)} failed"
          + (" (" + "; ".join(f"{r.host}: {r.said(pb)}" for r in failed) + ")" if failed else ""),
          file=sys.stderr)
    return max((r.code for r in results), default=EXIT_OK)


def start_on_hosts(args):
    """`start --hosts/--selector`: `HOST ID` per line, in host order."""
    hosts = host_clients(args)

    def work(host, make, r):
        _, r.id = start_job(args, make())
    results = fan_out(args, hosts, work)
    for r in results:
        if r.id:
            print(f"{r.host} {r.id}")
        else:
            print(f"jobworker: {r.host}: {r.error}", file=sys.stderr)
    return max((r.code for r in results), default=EXIT_OK)


def _stop_for_signal(client, job_id, signum):
    """run got SIGINT, SIGTERM or SIGHUP: stop the job (its default grace), say how it ended,
    exit 128+signum. Another signal meanwhile leaves at once (the server goes on stopping)."""
    name = signal.Signals(signum).name
    _say(f"jobworker: {name}: stopping job {job_id} (again to leave at once)")
    try:
        try:
            # (no deadline: the server's grace is not known here; a second signal leaves)
            status = client.call("Stop", client.pb.StopRequest(job_id=job_id),
                                 timeout=None).status
        except CliError as e:
            if e.code != EXIT_REFUSED:   # not "it had ended already"
                raise
            status = client.call("Query", client.pb.QueryRequest(job_id=job_id)).status
        _say(f"jobworker: job {job_id} {_how_it_ended(client.pb, status)}")
    except _Signalled:
        _say(f"jobworker: left; job {job_id} is being stopped")
    return 128 + signum



def _stop_quietly(client, job_id, timeout=2.0):
    with contextlib.suppress(CliError, _Signalled):
        client.call("Stop", client.pb.StopRequest(job_id=job_id), timeout=timeout)


def _how_it_ended(pb, msg):
    d = status_to_dict(pb, msg)
    how = (f"exit code {d['exit_code']}" if d["exit_code"] is not None
           else d["signal"] or d["lost_reason"] or d["failure"] or "")
    return f"{d['state']} ({how})" if how else d["state"]


def _args_version(p):
    p.epilog = "example: jobworker version --json"
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_fanout_options(p)
    _add_client_options(p)


def _info_dict(info):
    from google.protobuf import json_format
    return json_format.MessageToDict(info, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def cmd_version(args):
    if not args.json:   # said first: the client's version is known if the server is not
        print(f"client: jobworker {__version__} (Python {sys.version.split()[0]})", flush=True)
    if fans_out(args):
        return _version_of_hosts(args)
    client = Client(args)
    info = client.call("Info", client.pb.InfoRequest())
    if args.json:
        print(json.dumps({"client": __version__, "server": _info_dict(info)}, indent=2))
        return EXIT_OK
    keep = (f"{info.keep_finished} finished jobs, for "
            + (_duration(info.keep_for_seconds) if info.keep_for_seconds else "ever"))
    print(f"server: jobworker {info.version} at {client.server}, cgroup v{info.cgroup_version}, "
          f"{info.cpus} CPUs (--cpu {info.cpu_percent_min:g}% to {info.cpu_percent_max:g}%), "
          f"disks {' '.join(info.disks) or 'none'}\n"
          f"        default pids {info.default_pids}, grace {info.default_grace_seconds:g}s; "
          f"caps: {info.max_jobs} jobs ({info.max_jobs_per_owner} per owner), "
          f"{info.max_streams} streams ({info.max_streams_per_owner} per owner); keeps {keep}; "
          f"output {_human_bytes(info.log_cap_bytes)} per job; live restore "
          f"{'on' if info.live_restore else 'off'}")
    return EXIT_OK


def _version_of_hosts(args):
    """version --hosts/--selector: each host's server in a line (--json: by host)."""
    infos = {}

    def work(host, make, r):
        client = make()
        infos[host] = (client.server, client.call("Info", client.pb.InfoRequest()))
    results = fan_out(args, host_clients(args), work)
    if args.json:
        print(json.dumps({"client": __version__, "servers": {
            r.host: _info_dict(infos[r.host][1]) if r.host in infos else {"error": r.error}
            for r in results}}, indent=2))
    for r in results:
        if r.host in infos and not args.json:
            server, info = infos[r.host]
            print(f"{r.host}: jobworker {info.version} at {server}, cgroup "
                  f"v{info.cgroup_version}, {info.cpus} CPUs")
        elif r.error:
            print(f"jobworker: {r.host}: {r.error}", file=sys.stderr)
    return max(r.code for r in results)


def _args_top(p):
    p.epilog = "example: jobworker top --no-stream"
    p.add_argument("--no-stream", action="store_true", help="print one sample and exit")
    _add_client_options(p)


def cmd_top(args):
    """Live CPU, memory, IO and tasks of the running jobs, each second, as docker stats; the
    queued ones counted below them."""
    client = Client(args)
    pb = client.pb
    tty = sys.stdout.isatty()

    def sample():
        jobs = list_jobs(client, ["running", "queued"])
        return time.monotonic(), {j.job_id: j for j in jobs if j.state == pb.JOB_STATE_RUNNING}, \
            collections.Counter(j.owner for j in jobs if j.state == pb.JOB_STATE_QUEUED)

    before = sample()
    try:
        while True:
            time.sleep(1.0)
            now = sample()
            lines = format_top(pb, before, now)
            if tty:
                sys.stdout.write("\x1b[H\x1b[J")
            print("\n".join(lines) + ("" if tty or args.no_stream else "\n"), flush=True)
            if args.no_stream:
                return EXIT_OK
            before = now
    except BrokenPipeError:
        _quiet_stdout()
        return 141


def format_top(pb, before, now):
    """`top`'s lines from two samples (time, {id: JobStatus} of the running jobs, Counter of
    the queued ones by owner)."""
    import shutil
    width = shutil.get_terminal_size((120, 24)).columns
    (t0, old, _), (t1, jobs, queued) = before, now
    head = ("ID", "NAME", "CPU %", "MEM", "LIMIT", "MEM %", "IO READ", "IO WRITE", "TASKS",
            "COMMAND")
    rows = []
    for job_id, j in jobs.items():
        prev = old.get(job_id)
        cpu = ""
        if prev is not None and t1 > t0:
            cpu = f"{max(0.0, j.usage.cpu_seconds - prev.usage.cpu_seconds) / (t1 - t0) * 100:.1f}"
        mem, limit = j.usage.memory_bytes, j.limits.memory_bytes
        rows.append((job_id[:8], printable(j.name)[:16] or "-", cpu,
                     _human_bytes(mem), _human_bytes(limit) if limit else "-",
                     f"{mem / limit * 100:.1f}" if limit else "-",
                     _human_bytes(j.usage.io_read_bytes), _human_bytes(j.usage.io_write_bytes),
                     str(j.usage.tasks), _command_line(j.command)))
    sizes = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(len(head))]
    lines = ["  ".join(f"{v:{sizes[i]}}" for i, v in enumerate(r))[:width].rstrip()
             for r in [head, *rows]]
    if queued:
        lines.append(f"{sum(queued.values())} queued: " + ", ".join(
            f"{printable(owner)} {n}" for owner, n in queued.most_common())[:width])
    return lines


COMPLETION_SHELLS = ("bash", "zsh")


def _args_completion(p):
    p.epilog = ("example: jobworker completion bash > "
                "/etc/bash_completion.d/jobworker (zsh: jobworker completion zsh "
                "> ~/.zfunc/_jobworker)")
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="bash or zsh")


def cmd_completion(args):
    """The completion script made at build time (jobworker.pyz holds it); from the source tree
    it is made now, if shtab is installed."""
    path = os.path.join(os.path.dirname(__file__), "completions", f"jobworker.{args.shell}")
    try:   # the loader reads inside the pyz (a zipimporter) as well as from a directory
        script = __loader__.get_data(path)
    except OSError:
        try:
            import shtab
        except ImportError:
            raise CliError("completion scripts are made when jobworker.pyz is built; from the "
                           "source tree, install shtab (pip install shtab)") from None
        script = shtab.complete(build_parser(), shell=args.shell).encode()
    sys.stdout.buffer.write(script)
    return EXIT_OK


def _args_health(p):
    p.epilog = ("example: jobworker health "
                "--server host:50051")
    p.add_argument("--service", default="", metavar="NAME",
                   help=f"a service's health instead of the server's: {SERVICE_NAME}")
    _add_client_options(p)
    _add_fanout_options(p)


def cmd_health(args):
    if fans_out(args):   # HOST: STATUS per line; exit as the worst
        said = {}

        def work(host, make, r):
            said[host], r.code = _health(make(), args.service)
        results = fan_out(args, host_clients(args), work)
        for r in results:
            if r.host in said:
                print(f"{r.host}: {said[r.host]}")
            else:
                print(f"jobworker: {r.host}: {r.error}", file=sys.stderr)
        return max(r.code for r in results)
    status, code = _health(Client(args), args.service)
    print(status)
    return code


def _health(client, service):
    """(serving status, exit code) of the server's health service (CliError if it cannot
    answer)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    stub = health_pb2_grpc.HealthStub(client.channel)
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    except rpc_errors() as e:
        if status_name(e) == "NOT_FOUND":
            raise CliError(f"the server has no service {service!r} (it has "
                           f"{SERVICE_NAME!r} and '' for itself)", EXIT_NOT_FOUND) from None
        raise client.error(e) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return status, EXIT_OK if answer.status == health_pb2.HealthCheckResponse.SERVING \
        else EXIT_ERROR


def _args_wait(p):
    p.description = ("Waits until every given job has ended (without fetching output) and "
                     "exits as `run` would for the last one. Jobs that already ended return "
                     f"at once; a server restart is waited for ({RECONNECT_PATIENCE:g}s).")
    p.add_argument("job_ids", nargs="+", metavar="ID",
                   help="a job id or its first 4 or more characters")
    p.add_argument("--json", action="store_true",
                   help="print each final status as it comes, one JSON object a line")
    p.epilog = "example: jobworker wait $A $B || echo the last one failed"
    _add_client_options(p)


def cmd_wait(args):
    clients = Addressed(args)
    pb = _messages()
    job_ids = [clients.resolve(j) for j in args.job_ids]
    for client, job_id in job_ids:   # every id is checked before any wait: a typo fails at once
        client.call("Query", pb.QueryRequest(job_id=job_id))
    code = EXIT_OK
    for client, job_id in job_ids:
        final = follow_to_end(client, job_id)
        if args.json:
            print(json.dumps(status_to_dict(pb, final)), flush=True)
        elif sys.stdout.isatty():   # a person waits: say how each ended (scripts: exit code)
            print(f"{job_id} {_how_it_ended(pb, final)}", file=sys.stderr, flush=True)
        code = job_exit_code(pb, final)
    return code


def _args_stop(p):
    p.epilog = "example: jobworker stop $(jobworker list -q --state running)"
    p.add_argument("job_ids", nargs="+", metavar="ID",
                   help="a job id or its first 4 or more characters; one that already ended "
                        "is fine")
    p.add_argument("--grace", type=_cli_type(_seconds, DURATION_FORM), metavar="DURATION",
                   help="between SIGTERM and SIGKILL: 5, 5s, 2m (default: the server's --grace)")
    _add_client_options(p)
    _add_fanout_options(p)


def cmd_stop(args):
    """Stop each job (at once, then wait for all); one that had already ended is fine, as with
    systemctl stop. Exit code: the first failure's."""
    clients, graces, first = Addressed(args), {}, EXIT_OK

    def stop(text):
        client, job_id = clients.resolve(text)
        pb = client.pb
        # Stop answers once the job has ended: the deadline allows the server's own grace
        if args.grace is None and client not in graces:
            graces[client] = _server_grace(client)
        grace = args.grace if args.grace is not None else graces[client]
        req = pb.StopRequest(job_id=job_id)
        if args.grace is not None:
            req.grace_seconds = args.grace
        timeout = RPC_TIMEOUT + grace
        try:
            status = client.call("Stop", req, timeout=timeout).status
            return f"{job_id} {_how_it_ended(pb, status)}"
        except CliError as e:
            if e.code != EXIT_REFUSED:
                raise
            status = client.call("Query", pb.QueryRequest(job_id=job_id)).status
            if status.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED):
                raise
            return f"{job_id} had already ended: {_how_it_ended(pb, status)}"

    if fans_out(args):   # each id looked for on every host chosen: stopped where it is
        hosts = fanout_contexts(args)
        targets = [f"{h}:{t}" for t in args.job_ids for h in hosts]
        with thread_pool(min(args.parallel, len(targets))) as pool:
            done = dict(zip(targets, pool.map(_outcome(stop), targets)))
        for text in args.job_ids:
            outcomes = [(h, *done[f"{h}:{text}"]) for h in hosts]
            for host, said, error in outcomes:
                if error is None:
                    print(f"{host}: {said}", flush=True)
                elif error.code != EXIT_NOT_FOUND or all(e for _, _, e in outcomes):
                    print(f"jobworker: {host}: {text}: {error}", file=sys.stderr)
                    first = first or error.code
        return first
    with thread_pool(min(16, len(args.job_ids))) as pool:
        for text, done in zip(args.job_ids, pool.map(_outcome(stop), args.job_ids)):
            said, error = done
            if error is None:   # what happened is the result: stdout; errors: stderr
                print(said, flush=True)
                continue
            print(f"jobworker: {text}: {error}", file=sys.stderr)
            first = first or error.code
    return first


def _server_grace(client):
    """The server's default Stop grace (MAX_GRACE from a server that does not say)."""
    try:
        return client.call("Info", client.pb.InfoRequest()).default_grace_seconds
    except CliError as e:
        if e.unreachable or e.code != EXIT_ERROR:   # UNIMPLEMENTED: a server without Info
            raise
        return MAX_GRACE


def _outcome(fn):
    """fn made to return (result, None) or (None, the CliError it raised)."""
    def call(arg):
        try:
            return fn(arg), None
        except CliError as e:
            return None, e
    return call


def _args_query(p):
    p.epilog = "example: jobworker query 3f2a --json"
    p.add_argument("job_id", metavar="ID", help="a job id or its first 4 or more characters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_client_options(p)


def cmd_query(args):
    client, job_id = Addressed(args).resolve(args.job_id)
    status = client.call("Query", client.pb.QueryRequest(job_id=job_id)).status
    if args.json:
        print(json.dumps(status_to_dict(client.pb, status), indent=2))
    else:
        print(format_status(client.pb, status))
    return EXIT_OK


def list_jobs(client, states=(), owner="", last=None, name=""):
    """Every job the server lists for these filters, oldest first, walking all pages (the
    newest `last` only, if given)."""
    pb = client.pb
    req = pb.ListRequest(states=[pb.JobState.Value(STATE_TO_PROTO[s]) for s in states],
                         owner=owner or "", newest_first=last is not None, name=name or "")
    jobs = []
    while True:
        if last is not None:
            req.page_size = min(last - len(jobs), LIST_PAGE_MAX)
        page = client.call("List", req)
        jobs += page.jobs
        if not page.next_page_token or (last is not None and len(jobs) >= last):
            break
        req.page_token = page.next_page_token
    return jobs[::-1] if last is not None else jobs


def _args_list(p):
    p.epilog = "example: jobworker list --state running --last 20"
    p.add_argument("--json", action="store_true", help="machine-readable output (one array)")
    p.add_argument("--state", type=_cli_type(_state_list, "states separated by commas: "
                                             "queued, running, exited, stopped, lost, "
                                             "failed"),
                   metavar="STATE[,STATE...]", help="only jobs in these states")
    p.add_argument("--owner", default="", metavar="NAME",
                   help="only jobs of this identity (readers and admins)")
    p.add_argument("--last", type=_cli_type(_positive, "a number of jobs, 1 or more"),
                   metavar="N", help="only the newest N jobs")
    p.add_argument("--name", default="", metavar="NAME", help="only jobs of this --name")
    p.add_argument("-q", "--quiet", action="store_true", help="print job ids only, one a line "
                   "(with --hosts as HOST:ID, what stop and the others take)")
    _add_client_options(p)
    _add_fanout_options(p)


def cmd_list(args):
    pb, code = _messages(), EXIT_OK
    if fans_out(args):   # a HOST column, "host" in --json
        found = {}

        def work(host, make, r):
            found[host] = list_jobs(make(), args.state or (), args.owner, args.last, args.name)
        results = fan_out(args, host_clients(args), work)
        for r in results:
            if r.error:
                print(f"jobworker: {r.host}: {r.error}", file=sys.stderr)
        code = max(r.code for r in results)
        jobs = [(r.host, j) for r in results for j in found.get(r.host, ())]
    else:
        client = Client(args)
        jobs = [(None, j) for j in list_jobs(client, args.state or (), args.owner, args.last,
                                             args.name)]
    try:
        if args.json:
            print(json.dumps([dict(status_to_dict(pb, j), **({"host": h} if h else {}))
                              for h, j in jobs], indent=2))
        elif args.quiet:
            for h, j in jobs:
                print(f"{h}:{j.job_id}" if h else j.job_id)
        else:
            for line in format_table(pb, [j for _, j in jobs],
                                     hosts=[h for h, _ in jobs] if fans_out(args) else None):
                print(line)
        sys.stdout.flush()
    except BrokenPipeError:   # `| head`: quietly, as a shell's own commands
        _quiet_stdout()
        return 141
    return code


def format_table(pb, jobs, now=None, width=None, hosts=None):
    """`list`'s lines: one per job (on the host `hosts` says, if given: a HOST column first),
    cut to the terminal's width (the command gets what is left, ending in … when cut)."""
    import shutil
    now = time.time() if now is None else now
    width = width or shutil.get_terminal_size((120, 24)).columns
    short = 8   # ids as short as is unique among these (any prefix of 4 or more works)
    where = hosts or [None] * len(jobs)   # (on each host)
    while short < 36 and len({(h, j.job_id[:short]) for h, j in zip(where, jobs)}) < len(jobs):
        short += 4
    rows = []
    for j in jobs:
        d = status_to_dict(pb, j)
        if d["exit_code"] is not None:
            end = str(d["exit_code"])
        else:
            end = d["signal"] or ""
        if d["oom_killed"]:
            end = "oom-killed"
        elif d["timed_out"]:
            end = "timed-out"
        if d["queue_timed_out"]:
            end = "queue-timed-out"
        start = j.started_at.ToNanoseconds() / 1e9
        when = (_ago(now - start) if d["started_at"] else
                f"queued {_ago(now - j.queued_at.ToNanoseconds() / 1e9)}" if d["queued_at"]
                else "-")
        rows.append((d["id"][:short], d["state"], end, printable(d["owner"])[:16],
                     printable(d["name"])[:20], when,
                     _command_line(d["command"]).replace("\n", " ")))
    head = ("ID", "STATE", "EXIT", "OWNER", "NAME", "STARTED", "COMMAND")
    if hosts is not None:
        head, rows = ("HOST", *head), [(h, *r) for h, r in zip(hosts, rows)]
    fixed = len(head) - 1   # every column but the command
    sizes = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(fixed)]
    lines = []
    for r in [head, *rows]:
        line = "  ".join(f"{v:{sizes[i]}}" for i, v in enumerate(r[:fixed])) + "  "
        room = max(10, width - len(line))
        cmd = r[fixed] if len(r[fixed]) <= room else r[fixed][:room - 1] + "…"
        lines.append(line + cmd)
    return lines


def _ago(seconds):
    """How long ago, as a person says it: 12s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _args_rm(p):
    p.epilog = "example: jobworker rm $(jobworker list -q --state exited)"
    p.add_argument("job_ids", nargs="+", metavar="ID",
                   help="a finished job's id or its first 4 or more characters")
    _add_client_options(p)


def cmd_rm(args):
    clients, first = Addressed(args), EXIT_OK
    for text in args.job_ids:
        try:
            client, job_id = clients.resolve(text)
            client.call("Remove", client.pb.RemoveRequest(job_id=job_id))
        except CliError as e:
            print(f"jobworker: {e}", file=sys.stderr)
            if first == EXIT_OK:
                first = e.code
            if e.code == EXIT_CONNECT:
                break   # the next ones would say the same
    return first


def read_output(client, job_id, offset, on_piece, until=None):
    """Stream a job's output from `offset` to on_piece(stream, offset, data), up to `until`
    (exclusive; None: live until the job ends). Returns (final status or None, the offset
    reached). A stream the server ends early (it is going away) is a CliError saying where
    to resume."""
    pb = client.pb
    if until is not None and offset >= until:
        return None, offset
    call = client.stub.Stream(pb.StreamRequest(job_id=job_id, offset=offset, batch=True))
    try:
        for msg in call:
            if msg.HasField("final_status"):
                return msg.final_status, offset
            for stream, at, data in output_pieces(pb, msg):
                if until is not None and at + len(data) > until:
                    data = data[:max(0, until - at)]
                if data:
                    on_piece(stream, at, data)
                offset = at + len(data)
            if until is not None and offset >= until:
                return None, offset
        why = "the server ended it early"
    except rpc_errors() as e:
        err = client.error(e)
        if not err.unreachable:
            raise err from None
        why = e.details() or "the server went away"
    finally:
        call.cancel()
    raise CliError(f"the stream was cut ({why}); resume with: jobworker stream {job_id} "
                   f"--offset {offset}", EXIT_CONNECT)


def tail_offset(client, job_id, lines, size):
    """Where the last `lines` lines of a job's first `size` bytes of output begin."""
    if lines == 0:
        return size
    window = 64 << 10
    while True:
        start = max(0, size - window)
        data = bytearray()
        read_output(client, job_id, start, lambda _s, _o, d: data.extend(d), until=size)
        end = len(data) - 1 if data.endswith(b"\n") else len(data)   # the last line's end
        for _ in range(lines):
            end = data.rfind(b"\n", 0, end)
            if end < 0:
                break
        if end >= 0:
            return start + end + 1
        if start == 0:
            return 0
        window *= 4


def _args_stream(p):
    import argparse
    p.epilog = "example: jobworker stream 3f2a --tail 20"
    p.add_argument("job_id", metavar="ID", help="a job id or its first 4 or more characters")
    p.add_argument("--offset", type=_cli_type(_offset, "a byte offset, 0 or more"), default=0,
                   metavar="N", help="start at this byte of the output (as a cut stream says)")
    p.add_argument("--tail", type=_cli_type(_count, "a number of lines, 0 or more"),
                   metavar="N", help="start with the last N lines of the output so far")
    p.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True,
                   help="go on with live output until the job ends (default); --no-follow: "
                        "print what there is now and exit")
    _add_client_options(p)


def cmd_stream(args):
    client, job_id = Addressed(args).resolve(args.job_id)
    pb = client.pb
    offset, until = args.offset, None
    if args.tail is not None or not args.follow:
        size = client.call("Query", pb.QueryRequest(job_id=job_id)).status.output_bytes
        if offset > size:
            raise CliError(f"--offset {offset} is past the end of the output ({size} bytes)",
                           EXIT_REFUSED)
        if args.tail is not None:
            offset = max(offset, tail_offset(client, job_id, args.tail, size))
        if not args.follow:
            until = size
    writer = OutputWriter(pb)
    try:
        read_output(client, job_id, offset, writer.piece, until)
        writer.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    return EXIT_OK


def _same_file(a, b):
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _args_certs(p):
    p.epilog = ("example: jobworker certs init certs && jobworker certs issue "
                "certs alice --role writer")
    certs = p.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    c = certs.add_parser("init", help="write DIR/ca.{crt,key} and DIR/server.{crt,key}",
                         epilog="example: jobworker certs init certs --host build1.example.com")
    c.add_argument("dir", help="where to write them (made mode 0700)")
    c.add_argument("--host", action="append", help="extra server name or IP (repeatable)")
    c.add_argument("--force", action="store_true", help="replace an existing CA")
    c.set_defaults(func=cmd_certs_init)
    c = certs.add_parser("server", help="write a new DIR/server.{crt,key} from the CA in DIR "
                                        "(other host names; client certificates stay valid)",
                         epilog="example: jobworker certs server certs --host build1.example.com"
                                " --host 192.0.2.10")
    c.add_argument("dir", help="the directory of certs init")
    c.add_argument("--host", action="append", help="a server name or IP (repeatable)")
    c.set_defaults(func=cmd_certs_server)
    c = certs.add_parser("issue", help="write DIR/NAME.{crt,key}, a client certificate",
                         epilog="example: jobworker certs issue certs alice --role writer")
    c.add_argument("dir", help="the directory of certs init (its CA signs)")
    c.add_argument("name", help="the identity (certificate CN)")
    c.add_argument("--role", action="append", choices=ROLES, required=True,
                   help="reader, writer or admin (repeatable)")
    c.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity ({LEAF_DAYS})")
    c.add_argument("--force", action="store_true", help="replace an existing NAME.crt")
    c.set_defaults(func=cmd_certs_issue)
    c = certs.add_parser("revoke", help=f"append a client certificate's serial to "
                                        f"DIR/{REVOKED_FILE}: every server reading it refuses "
                                        "it from then on, on open connections too",
                         epilog="example: jobworker certs revoke certs alice")
    c.add_argument("dir", help="the directory of certs init")
    c.add_argument("which", metavar="NAME|SERIAL",
                   help="a certificate's name (DIR/NAME.crt) or its serial number in hex")
    c.set_defaults(func=cmd_certs_revoke)


def cmd_certs_init(args):
    certs_init(args.dir, args.host or (), force=args.force)
    print(f"wrote {args.dir}/ca.crt, ca.key, server.crt, server.key", file=sys.stderr)
    return EXIT_OK


def cmd_certs_server(args):
    certs_server(args.dir, args.host or ())
    print(f"wrote {args.dir}/server.crt, server.key (restart the server to use them)",
          file=sys.stderr)
    return EXIT_OK


def cmd_certs_issue(args):
    certs_issue(args.dir, args.name, args.role, days=args.days, force=args.force)
    print(f"wrote {args.dir}/{args.name}.crt, {args.name}.key (roles: {', '.join(args.role)})",
          file=sys.stderr)
    return EXIT_OK


def cmd_certs_revoke(args):
    serial = certs_revoke(args.dir, args.which)
    print(f"revoked serial {serial:x} in {args.dir}/{REVOKED_FILE} (servers reading it refuse "
          "it within a second)", file=sys.stderr)
    return EXIT_OK


def _serve_tls(args):
    """(ServerTLS, the CA's path, paths a job must not see): the certificates serve was
    given, checked before anything is created."""
    ca, cert, key = args.ca, args.cert, args.key
    from_dir = args.certs or not (ca or cert or key)
    d = args.certs or DEFAULT_CERTS_DIR
    if from_dir:
        ca, cert, key = (ca or f"{d}/ca.crt", cert or f"{d}/server.crt", key or f"{d}/server.key")
    elif not (ca and cert and key):
        raise CliError("give --ca, --cert and --key together, or --certs DIR", EXIT_USAGE)
    for path in (ca, cert, key):
        if not os.path.exists(path):
            raise LocalFileError(f"{path}: no such file; make the certificates with `jobworker "
                                 f"certs init {d}`, or pass --certs DIR (or --ca, --cert, --key)")
    hide = [os.path.abspath(d)] if from_dir else []   # neither the directory nor the key
    if not any(os.path.abspath(key).startswith(h + os.sep) for h in hide):
        hide.append(os.path.abspath(key))
    return ServerTLS.load(ca, cert, key), ca, hide


def _serve_signals(stop, revoked):
    """SIGTERM and SIGINT set `stop`, SIGHUP rereads the revocation list. What a wrapper may
    have left blocked or ignored is reset: SIGTERM blocked made the server unstoppable;
    SIGCHLD ignored would have the kernel reap the jobs' processes itself."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: revoked.reload())


def _serve_manager(args, cgroups, hide, observer):
    return JobManager(args.state_dir, cgroups, default_pids=args.default_pids,
                      log_cap=args.log_cap, max_jobs=args.max_jobs,
                      max_jobs_per_owner=args.max_jobs_per_owner, job_user=args.job_user,
                      grace=args.grace, keep_finished=args.keep_finished,
                      keep_for=args.keep_for, live_restore=args.live_restore,
                      uid_range=args.job_uid_range, hide_paths=hide, observer=observer,
                      job_nofile=(args.job_nofile,) * 2 if args.job_nofile else None,
                      max_queued=args.max_queued,
                      max_queued_per_owner=args.max_queued_per_owner)


def _serve_limits(args):
    return ServerLimits(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(ServerLimits)})


def _args_serve(p):
    import argparse
    p.epilog = ("example: jobworker serve --certs /etc/jobworker --metrics-listen "
                "127.0.0.1:9105")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"the address to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"job records and output (default {DEFAULT_STATE_DIR})")
    p.add_argument("--live-restore", action=argparse.BooleanOptionalAction, default=True,
                   help="jobs outlive the server: a server that dies (or stops with "
                        "--keep-jobs) leaves them running, and the next one on this state "
                        "dir adopts them (default: on)")
    p.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=True,
                   help="gRPC server reflection, for grpcurl and the like (default: on; any "
                        "valid client certificate may use it)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics "
                        "(off unless given; 127.0.0.1:9105 keeps them on this host)")
    p.add_argument("--keep-jobs", action="store_true",
                   help="on SIGTERM or SIGINT, leave the jobs running for the next server "
                        "(an upgrade) instead of stopping them; needs --live-restore")
    _args_serve_certs(p.add_argument_group("certificates"))
    _args_serve_jobs(p.add_argument_group("jobs"))
    _args_serve_caps(p.add_argument_group("caps and timeouts (what one client may hold)"))


def _args_serve_certs(g):
    g.add_argument("--certs", metavar="DIR",
                   help=f"the directory holding ca.crt, server.crt and server.key (default "
                        f"./{DEFAULT_CERTS_DIR})")
    g.add_argument("--ca", metavar="FILE",
                   help="CA certificate that client certificates must chain to")
    g.add_argument("--cert", metavar="FILE", help="server certificate")
    g.add_argument("--key", metavar="FILE", help="server private key (ECDSA, mode 0600)")
    g.add_argument("--revoked", metavar="FILE",
                   help=f"serials of revoked client certificates, one a line (default: "
                        f"{REVOKED_FILE} beside the CA certificate); reread on SIGHUP and "
                        "when it changes")


def _args_serve_jobs(g):
    g.add_argument("--job-user", metavar="USER|dynamic",
                   help="run jobs as this user instead of root; dynamic: each job owner gets "
                        "a uid and gid of its own (from --job-uid-range)")
    g.add_argument("--job-nofile", type=_cli_type(_positive, "a number of open files"),
                   metavar="N", help="the open-files limit (soft and hard) of jobs (default: "
                                     "the limits serve started with, not those it raised)")
    g.add_argument("--job-uid-range", type=_cli_type(parse_uid_range, "FIRST-LAST, such as "
                                                     "61184-65519"),
                   default=DEFAULT_UID_RANGE, metavar="FIRST-LAST",
                   help="uids (and gids) of --job-user dynamic (default 61184-65519, "
                        "systemd's DynamicUser range)")
    g.add_argument("--cgroup-parent", default=DEFAULT_CGROUP_PARENT, metavar="PATH",
                   help="job cgroups' parent, relative to the server's own cgroup "
                        f"(default {DEFAULT_CGROUP_PARENT})")
    g.add_argument("--grace", type=_cli_type(_grace, f"{DURATION_FORM}, at most "
                                             f"{MAX_GRACE:g}s"),
                   default=DEFAULT_GRACE_SECONDS, metavar="DURATION",
                   help=f"Stop's SIGTERM-to-SIGKILL time when the call sets none "
                        f"(default {DEFAULT_GRACE_SECONDS:g}s)")
    g.add_argument("--default-pids", type=_cli_type(_count, "a number, 0 (none) or more"),
                   default=DEFAULT_PIDS_LIMIT, metavar="N",
                   help=f"pids limit of jobs that set none (default {DEFAULT_PIDS_LIMIT})")
    g.add_argument("--log-cap", type=_cli_type(parse_memory, "a size: 512M, 2G"),
                   default=DEFAULT_LOG_CAP, metavar="SIZE",
                   help="output kept per job (default 2G)")
    g.add_argument("--keep-finished", type=_cli_type(_count, "a number of jobs, 0 or more"),
                   default=DEFAULT_KEEP_FINISHED, metavar="N",
                   help=f"finished jobs kept; the oldest beyond are removed "
                        f"(default {DEFAULT_KEEP_FINISHED})")
    g.add_argument("--keep-for", type=_cli_type(_keep_for, DURATION_FORM + ", or forever"),
                   default=DEFAULT_KEEP_FOR, metavar="DURATION",
                   help="finished jobs are removed this long after they ended: 30s, 15m, "
                        "12h, 7d, or forever (default 7d)")


def _args_serve_caps(g):
    number = _cli_type(_positive, "a number, 1 or more")
    g.add_argument("--max-jobs", type=number, default=DEFAULT_MAX_JOBS, metavar="N",
                   help=f"running jobs at once (default {DEFAULT_MAX_JOBS})")
    g.add_argument("--max-jobs-per-owner", type=number, default=DEFAULT_MAX_JOBS_PER_OWNER,
                   metavar="N",
                   help=f"running jobs of one owner (default {DEFAULT_MAX_JOBS_PER_OWNER})")
    g.add_argument("--max-queued", type=number, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help=f"jobs waiting for a slot (start --queue; default {DEFAULT_MAX_QUEUED})")
    g.add_argument("--max-queued-per-owner", type=number,
                   default=DEFAULT_MAX_QUEUED_PER_OWNER, metavar="N",
                   help=f"... of one owner (default {DEFAULT_MAX_QUEUED_PER_OWNER})")
    g.add_argument("--max-streams", type=number, default=DEFAULT_MAX_STREAMS, metavar="N",
                   help=f"concurrent Stream calls (default {DEFAULT_MAX_STREAMS})")
    g.add_argument("--max-streams-per-owner", type=number,
                   default=DEFAULT_MAX_STREAMS_PER_OWNER, metavar="N",
                   help=f"concurrent Stream calls of one owner "
                        f"(default {DEFAULT_MAX_STREAMS_PER_OWNER})")
    g.add_argument("--max-request-bytes", type=number, default=DEFAULT_MAX_REQUEST_BYTES,
                   metavar="N",
                   help=f"largest request message (default {DEFAULT_MAX_REQUEST_BYTES})")
    g.add_argument("--handshake-timeout", type=_cli_type(_request_timeout, "0.1s to 60s"),
                   default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="DURATION",
                   help="a connection that has not finished its TLS handshake this long after "
                        f"it was opened is closed (default {DEFAULT_HANDSHAKE_TIMEOUT:g}s)")
    g.add_argument("--max-connections", type=number,
                   default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="connections at once; more are refused before their handshake "
                        f"(default {DEFAULT_MAX_CONNECTIONS}, fewer if the open-files limit "
                        "leaves no room for them beside the jobs)")
    g.add_argument("--max-unauthenticated", type=number,
                   default=DEFAULT_MAX_UNAUTHENTICATED, metavar="N",
                   help="connections that have not yet made an authorized call; past it the "
                        f"idlest are closed (default {DEFAULT_MAX_UNAUTHENTICATED})")
    g.add_argument("--max-unauthenticated-per-source", type=number,
                   default=DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE, metavar="N",
                   help="... of those, from one address "
                        f"(default {DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE})")
    g.add_argument("--max-connections-per-identity", type=number,
                   default=DEFAULT_MAX_CONNECTIONS_PER_IDENTITY, metavar="N",
                   help="connections of one identity with no call in flight; past it the "
                        "idlest are closed, and past what is kept for admins in all, those of "
                        "whoever holds the most (admins: no bound; default "
                        f"{DEFAULT_MAX_CONNECTIONS_PER_IDENTITY})")
    g.add_argument("--request-timeout", type=_cli_type(_request_timeout, "0.1s to 60s"),
                   default=DEFAULT_REQUEST_TIMEOUT, metavar="DURATION",
                   help="a call whose request message has not arrived this long after the "
                        f"call is ended (default {DEFAULT_REQUEST_TIMEOUT:g}s)")


def cmd_serve(args):
    import logging
    logging.basicConfig(level=logging.INFO, handlers=[_log_handler()])
    if args.keep_jobs and not args.live_restore:
        raise CliError("--keep-jobs needs live restore (drop --no-live-restore)", EXIT_USAGE)
    tls, ca, hide = _serve_tls(args)
    stop = threading.Event()
    revoked = RevocationList(args.revoked or os.path.join(
        os.path.dirname(os.path.abspath(ca)), REVOKED_FILE))
    _serve_signals(stop, revoked)
    cgroups = detect_cgroups(args.cgroup_parent)
    # Order: the locks, then the ports, and only then the manager (which cleans up what
    # earlier runs left): a second server started by mistake touches nothing of the first.
    with contextlib.ExitStack() as undo:
        lock = ServeLock(args.state_dir, cgroups.parent_dirs()).acquire()
        undo.callback(lock.release)
        metrics = metrics_port = None
        if args.metrics_listen:
            metrics = Metrics(cgroups.version)
            metrics_port = undo.enter_context(contextlib.closing(
                MetricsServer(args.metrics_listen, metrics.registry))).port
        manager = _serve_manager(args, cgroups, hide, metrics)
        server = RpcServer(manager, args.listen, tls, _serve_limits(args), revoked,
                           args.reflection, metrics)
        port = server.bind()
        keep = lambda: args.keep_jobs and stop.is_set()   # a failed start keeps nothing
        try:
            manager.open()
            server.start()
            _said_serving(args, port, manager, metrics_port)
            while not stop.wait(3600):
                pass
            log.info("shutting down: %s", "leaving the jobs running (--keep-jobs)" if keep()
                     else "stopping jobs")
        finally:
            done = server.stop()
            manager.close(keep_jobs=keep())   # running jobs stop; streams end with them
            done.wait()
    log.info("stopped")
    return EXIT_OK


def _log_handler():
    """serve's log lines on stderr, their times in ISO 8601 with their UTC offset:
    2026-11-29T04:21:04.593+00:00."""
    import datetime
    import logging

    class IsoFormatter(logging.Formatter):
        def formatTime(self, record, datefmt=None):
            return datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _said_serving(args, port, manager, metrics_port):
    log.info("serving on %s (port %d), cgroup v%d, state in %s, live restore %s",
             args.listen, port, manager.cgroups.version, args.state_dir,
             "on" if args.live_restore else "off")
    if metrics_port:
        log.info("metrics on http://%s/metrics (port %d)", args.metrics_listen, metrics_port)


def doctor_checks(certs_dir, cgroup_parent):
    """[(ok, what, advice)] about this host and the server's certificates."""
    out = []

    def add(ok, what, advice=""):
        out.append((ok, what, advice))

    try:
        driver = detect_cgroups(cgroup_parent)
    except JobworkerError as e:
        add(False, f"cgroups: {e}", "mount cgroup2 at /sys/fs/cgroup, or the v1 controllers")
        driver = None
    if driver:
        out += driver.check()
    disks = block_devices()
    names = {open(f"/sys/block/{n}/dev").read().strip(): n for n in os.listdir("/sys/block")}
    add(bool(disks), "--disk-io applies to: " + (", ".join(f"{names.get(d, '?')} ({d})"
                                                          for d in disks) or "no disk"),
        "" if disks else "no whole disk found in /sys/block: I/O limits would have no effect")

    paths = {w: f"{certs_dir}/{w}" for w in ("ca.crt", "server.crt", "server.key")}
    readable = True
    for what, path in paths.items():
        if not os.path.exists(path):
            add(False, f"{path} is missing", f"make it: jobworker certs init {certs_dir}")
            readable = False
    if not readable:
        return out
    mode = os.stat(paths["server.key"]).st_mode & 0o777
    add(mode & 0o077 == 0, f"{paths['server.key']} mode {mode:o}",
        f"chmod 600 {paths['server.key']}" if mode & 0o077 else "")
    from cryptography import x509
    import datetime
    ca = x509.load_pem_x509_certificate(_read_file(paths["ca.crt"], "CA certificate"))
    cert = x509.load_pem_x509_certificate(_read_file(paths["server.crt"], "server certificate"))
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    add(valid, f"server certificate valid until {cert.not_valid_after_utc:%Y-%m-%d}",
        "" if valid else f"issue a new one: jobworker certs init {certs_dir} --force")
    try:
        cert.verify_directly_issued_by(ca)
        add(True, "server certificate is issued by ca.crt")
    except Exception as e:   # cryptography raises several types for a wrong issuer
        add(False, f"server certificate is not issued by ca.crt ({e})", "re-run certs init")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    add(True, "server names: " + ", ".join(str(n.value) for n in sans))
    try:
        check_server_key(paths["server.key"])
    except JobworkerError as e:
        add(False, str(e), "")
        return out
    add(*_probe_tls(paths))
    return out


def _probe_tls(paths):
    """Serve the certificates on a loopback port and try TLS 1.2 and 1.3 handshakes."""
    import ssl
    grpc = _grpc()
    server = grpc.server(thread_pool(1))
    pems = [_read_file(paths[w], w) for w in ("ca.crt", "server.crt", "server.key")]
    port = server.add_secure_port("127.0.0.1:0", ServerTLS(*pems).credentials())
    server.start()
    try:
        results = {}
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = ssl.create_default_context(cafile=paths["ca.crt"])
            ctx.check_hostname = False
            ctx.minimum_version = ctx.maximum_version = version
            ctx.set_alpn_protocols(["h2"])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    with ctx.wrap_socket(raw) as tls:
                        results[version] = tls.version()
            except (ssl.SSLError, OSError) as e:
                results[version] = None if isinstance(e, ssl.SSLError) else f"error: {e}"
    finally:
        server.stop(0)
    ok = results[ssl.TLSVersion.TLSv1_2] is None and results[ssl.TLSVersion.TLSv1_3] == "TLSv1.3"
    return (ok, f"TLS 1.2 handshake {'refused' if results[ssl.TLSVersion.TLSv1_2] is None else 'ACCEPTED'}"
                f", TLS 1.3 {'works' if results[ssl.TLSVersion.TLSv1_3] == 'TLSv1.3' else 'FAILS'}",
            "" if ok else "use an ECDSA server key (certs init) and do not set GRPC_SSL_CIPHER_SUITES")


def _args_doctor(p):
    p.epilog = "example: jobworker doctor --certs /etc/jobworker (as root)"
    p.add_argument("--certs", default=DEFAULT_CERTS_DIR,
                   help=f"DIR holding ca.crt, server.crt, server.key (default ./{DEFAULT_CERTS_DIR})")
    p.add_argument("--cgroup-parent", default=DEFAULT_CGROUP_PARENT,
                   help=f"as serve's (default {DEFAULT_CGROUP_PARENT})")


def cmd_doctor(args):
    problems = 0
    for ok, what, advice in doctor_checks(args.certs, args.cgroup_parent):
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            problems += 1
            if advice:
                print(f"     -> {advice}")
    print(f"{problems} problem{'s' if problems != 1 else ''} found")
    return EXIT_OK if problems == 0 else EXIT_ERROR


def _args_mux(p):
    p.description = (
        "The CLI's calls go through this user's mux, a process that holds the connections "
        "to servers, as ssh's ControlMaster: a call that finds none works directly and starts "
        "one; later calls skip loading grpc and the TLS handshake. It runs as you, listens "
        "on a socket only you can reach ($XDG_RUNTIME_DIR/jobworker, else /tmp/jobworker-UID), "
        "sends each call with the certificate the call named, and ends once no call came "
        f"for {MUX_PERSIST:g}s (JOBWORKER_MUX=DURATION: that long; JOBWORKER_MUX=off or "
        "--no-mux: no mux).")
    p.epilog = "example: jobworker mux status; JOBWORKER_MUX=off jobworker list"
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("status", help="say whether a mux runs: its pid, servers, calls (exit 1 "
                                  "if none)", epilog="example: jobworker mux status")
    sub.add_parser("stop", help="end this user's mux (calls in flight finish)",
                   epilog="example: jobworker mux stop")
    run = sub.add_parser("run", help="be the mux (what a call starts)",
                         epilog="example: jobworker mux run --socket "
                                "$XDG_RUNTIME_DIR/jobworker/mux-1-0123abcd.sock --persist 10m")
    run.add_argument("--socket", required=True, metavar="PATH",
                     help="the Unix socket to take calls on (in a directory of yours only)")
    run.add_argument("--persist", type=_cli_type(_seconds, DURATION_FORM), default=MUX_PERSIST,
                     metavar="DURATION",
                     help=f"end after this long without a call (default {MUX_PERSIST:g}s)")


def cmd_mux(args):
    if args.action == "run":
        build = os.environ.pop("JOBWORKER_BUILD_FD", "")
        if build.isdigit():   # kept open for as long as this runs (see build_lock)
            _held_build.append(int(build))
        Mux(args.socket, args.persist).serve()
        return EXIT_OK
    path = mux_socket_path()
    sock = mux_connect(path) if path else None
    if sock is None:
        print("no mux answers for this user here" + (f" ({path})" if path else ""))
        return EXIT_ERROR if args.action == "status" else EXIT_OK
    with sock:
        sock.settimeout(RPC_TIMEOUT)
        _mux_send(sock, MUX_HEAD, json.dumps({"op": args.action}).encode())
        kind, payload = _mux_recv(sock)
    said = json.loads(payload)
    if args.action == "stop":
        print(f"the mux at {path} stops")
        return EXIT_OK
    state = json.loads(said["details"])
    servers = ", ".join(state["servers"]) or "none yet"
    print(f"mux pid {state['pid']} at {path}: {state['calls']} calls in flight, channels to "
          f"{servers}; ends after {state['persist']:g}s without a call")
    return EXIT_OK


def _cli_type(parse, form):
    """An argparse type from a parser: a bad value is a usage error naming the accepted form."""
    import argparse

    def convert(text):
        try:
            return parse(text)
        except (InvalidArgument, ValueError):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {form}") from None
    return convert


def _keep_for(text):
    return None if text == "forever" else parse_duration(text)


def _seconds(text):
    seconds = parse_duration(text)
    if seconds < 0:
        raise ValueError(text)
    return seconds


def _positive_seconds(text):
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(text)
    return seconds


def _grace(text):
    return validate_grace(parse_duration(text))


def _request_timeout(text):
    seconds = parse_duration(text)
    if not 0.1 <= seconds <= 60:
        raise ValueError(text)
    return seconds


def _count(text, digits=9):
    """A whole number of at most `digits` ASCII digits (no sign: 0 or more)."""
    if not re.fullmatch(rf"[0-9]{{1,{digits}}}", text.strip()):
        raise ValueError(text)
    return int(text)


def _offset(text):
    return _count(text, 18)


def _positive(text):
    n = _count(text)
    if n < 1:
        raise ValueError(text)
    return n


def _state_list(text):
    states = [s.strip() for s in text.split(",") if s.strip()]
    if not states or any(s not in STATES for s in states):
        raise ValueError(text)
    return states


def _add_start_options(p):
    p.add_argument("--cpu", help="CPU quota, percent of one CPU: 50%%, 150%%")
    p.add_argument("--memory", help="memory limit: 256M, 1G (base 1024)")
    p.add_argument("--disk-io", help="read and write bandwidth per disk: 10MB/s (base 1000)")
    p.add_argument("--pids", help=f"most processes (server default {DEFAULT_PIDS_LIMIT})")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", type=_env_item,
                   help="an environment variable for the job, added to its defaults; NAME "
                        "alone passes this shell's value (repeatable; `query` shows the names, "
                        "never the values)")
    p.add_argument("--workdir", metavar="DIR", help=f"its working directory ({JOB_CWD})")
    p.add_argument("--timeout", metavar="DURATION", type=_cli_type(parse_duration, DURATION_FORM),
                   help="stop it (as `stop` does) once it has run this long: 30s, 15m, 2h")
    p.add_argument("--name", metavar="NAME",
                   help=f"a label for `list` and `query` (not unique; up to {MAX_NAME_CHARS} "
                        "printable characters)")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="give the job a stdin: `run` sends this stdin to it (its end closes "
                        "the job's); `start` keeps it open for `attach`")
    p.add_argument("-t", "--tty", action="count", default=0,
                   help="run the job on a pseudo-terminal (with -i's stdin; TERM and the window "
                        "size from here); `run -t` needs a terminal here, -tt makes one anyway")
    p.add_argument("--queue", action="store_true",
                   help="if the server's caps are full, wait in its queue for a slot instead "
                        "of failing (state queued; --timeout counts from its start)")
    p.add_argument("--queue-timeout", metavar="DURATION",
                   type=_cli_type(parse_duration, DURATION_FORM),
                   help="with --queue (implied): give up if it has not started after this "
                        "long (it ends stopped; `run` exits 124)")
    _add_client_options(p)


CLIENT_OPTIONS = {   # flag: (placeholder, what it is)
    "server": ("HOST[:PORT]", "the server"), "ca": ("FILE", "the CA the server's certificate "
                                                            "must chain to"),
    "cert": ("FILE", "your client certificate"), "key": ("FILE", "its private key")}


def _add_client_options(p):
    g = p.add_argument_group("connection")
    for flag, (env, default) in CLIENT_DEFAULTS.items():
        metavar, what = CLIENT_OPTIONS[flag]
        g.add_argument(f"--{flag}", metavar=metavar,
                       help=f"{what} (env {env}; else the context's; else {default})")
    g.add_argument("--context", metavar="NAME",
                   help="a saved connection, from `jobworker context add` (env "
                        "JOBWORKER_CONTEXT; else the current one)")
    g.add_argument("--no-mux", action="store_true",
                   help="connect directly, not through this user's mux (env JOBWORKER_MUX=off; "
                        "see `jobworker mux -h`)")


SUBCOMMANDS = (   # name, what runs it, its options; its help (argparse %-formats it)
    ("certs", None, _args_certs, "make a CA, server and client certificates"),
    ("serve", cmd_serve, _args_serve, "run the server (as root)"),
    ("run", cmd_run, _args_run,
     "start a job, print its output as it comes, exit with its exit code"),
    ("start", cmd_start, _args_start, "start a job; prints only its id"),
    ("attach", cmd_attach, _args_attach,
     "attach to a job started with -i or -t: your input to it, its output to you"),
    ("list", cmd_list, _args_list, "list the jobs you may see, oldest first"),
    ("stream", cmd_stream, _args_stream,
     "print a job's output from the start, live until it ends"),
    ("query", cmd_query, _args_query, "show a job's status"),
    ("wait", cmd_wait, _args_wait, "wait until jobs have ended; exit as the last one did"),
    ("stop", cmd_stop, _args_stop, "stop jobs (SIGTERM, then SIGKILL after the grace period)"),
    ("rm", cmd_rm, _args_rm, "remove finished jobs: their records and output"),
    ("top", cmd_top, _args_top, "live CPU, memory, IO and tasks of the running jobs"),
    ("context", cmd_context, _args_context, "saved connections to servers: add, ls, use, rm"),
    ("health", cmd_health, _args_health,
     "ask the server's gRPC health service; exit 0 only when it is SERVING"),
    ("version", cmd_version, _args_version,
     "print the client's version and the server's, with what it accepts"),
    ("doctor", cmd_doctor, _args_doctor, "check this host and the server's certificates"),
    ("mux", cmd_mux, _args_mux, "this user's shared connections to servers: status, stop"),
    ("completion", cmd_completion, _args_completion, "print a shell completion script"),
)


ALIASES = {"list": ("ps",), "stream": ("logs",)}   # docker's words for them


def _exit_codes_text():
    return "Exit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items())


def build_parser(parsers=None, only=None):
    """The command line: one parser per row of SUBCOMMANDS. `parsers`, if given, is filled
    with {name: that subcommand's parser} (main reports usage errors on them). With `only`
    (a subcommand's name or alias), the others get no options: what a call of that one
    needs (building every subcommand's options is a tenth of a short call's time)."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="jobworker", description="Run and watch commands on Linux hosts, each in its "
        "own cgroup, over mutual-TLS gRPC.",
        epilog=f"{_exit_codes_text()}. `run` and `wait` exit as the job did (see `run -h`). "
               f"{OPTION_RULE}")
    parser.add_argument("--version", action="version", version=f"jobworker {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, func, add_options, help_ in SUBCOMMANDS:
        aliases = ALIASES.get(name, ())
        p = sub.add_parser(name, help=help_, aliases=aliases)
        if only is None or only in (name, *aliases):
            add_options(p)
        if func:
            p.set_defaults(func=func)
        if parsers is not None:
            parsers.update(dict.fromkeys((name, *aliases), p))
    return parser


def _context_first(argv):
    """`jobworker --context NAME SUBCOMMAND ...` (as docker's) as the subcommand's option."""
    if argv[:1] == ["--context"] and len(argv) > 2 or argv[:1] and argv[0].startswith(
            "--context="):
        given = argv[0].split("=", 1)[1] if "=" in argv[0] else argv[1]
        rest = argv[1:] if "=" in argv[0] else argv[2:]
        return [rest[0], "--context", given, *rest[1:]] if rest else argv
    return argv


def main(argv=None):
    """Run one subcommand; returns the exit code."""
    argv = _context_first(list(sys.argv[1:] if argv is None else argv))
    known = {n for name, *_ in SUBCOMMANDS for n in (name, *ALIASES.get(name, ()))}
    parser = build_parser(parsers := {}, only=argv[0] if argv[:1] and argv[0] in known else None)
    command, trailing = None, []
    if not argv:   # as docker and kubectl: what there is to do
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if argv[:1] != ["serve"]:   # a client: its errors are its own lines, not the C core's
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if argv[0] in TAKES_COMMAND:
        try:
            opts, command, trailing = split_start_args(argv[1:])
        except UsageError as e:
            parsers[argv[0]].error(str(e))
        argv = [argv[0], *opts]
    elif not argv[0].startswith("-") and argv[0] not in parsers:
        import difflib
        close = difflib.get_close_matches(argv[0], parsers, n=1)
        parser.error(f"unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?"
                                                         if close else ""))
    args = parser.parse_args(argv)   # -h and bad options end here
    if args.subcommand in TAKES_COMMAND:
        if not command:
            parsers[args.subcommand].error(
                f"a command to run is required: jobworker {args.subcommand} -- sleep 9")
        args.command, args.trailing = command, trailing
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _Signalled as e:   # between run's handlers being set and its own try
        return 128 + e.signum
    except BrokenPipeError:   # stdout went away (`| head`): quietly, as a shell's commands
        _quiet_stdout()
        return 141
    except CliError as e:
        print(f"jobworker: {e}", file=sys.stderr)
        return e.code
    except JobworkerError as e:
        print(f"jobworker: {e}", file=sys.stderr)
        for cls, code in _EXIT_FOR_ERROR:   # (the server's errors come as CliError: this
            if isinstance(e, cls):           # one is this process's own, never "server error")
                return code
        return EXIT_USAGE if isinstance(e, InvalidArgument) else EXIT_ERROR
    except OSError as e:
        print(f"jobworker: {e.filename + ': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        if os.environ.get("JOBWORKER_DEBUG"):
            raise
        print(f"jobworker: unexpected error: {e!r} (JOBWORKER_DEBUG=1 shows where)",
              file=sys.stderr)
        return EXIT_ERROR
    finally:
        while Client.made:
            with contextlib.suppress(Exception):
                Client.made.pop().close()


def run_main():
    """The program's entry: main(), then exit at once. The interpreter's own exit would first
    wait for threads and collect objects, and a grpc call object collected then can wait
    forever for a lock of a thread that no longer runs."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if "logging" in sys.modules:   # (not loaded by a call that said nothing)
        sys.modules["logging"].shutdown()
    os._exit(code if isinstance(code, int) else EXIT_ERROR)


if __name__ == "__main__":
    run_main()
