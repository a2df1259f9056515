"""The tools people run instead of jobworker, set up for bench/run.py's figure 21. The work for
each: run `true` in a fresh cgroup with CPU 50 %, memory 256M and a pids limit, wait for its
exit, collect its exit code and output, remove the cgroup. Each peer's run(i) does it once and
returns the job's stdout; cpu() is the CPU its long-lived processes spent so far (seconds).
Debian's packages: runc, cgroup-tools, openssh-server, bubblewrap (`make bench` installs them).
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import time

QUOTA_US, PERIOD_US, MEMORY, PIDS = 50_000, 100_000, 256 << 20, 1024


def _ticks(pid, children=True):
    """CPU seconds of a process (and of its reaped children)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    n = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return n / os.sysconf("SC_CLK_TCK")


def remove_cgroups(parent):
    """Remove the (empty) cgroups at and under `parent` in every hierarchy: runc and
    libcgroup make a run's parents in each one they use, from the hierarchy's root, and remove
    only the leaf."""
    for root in glob.glob("/sys/fs/cgroup/*/"):
        top = os.path.join(root, parent)
        for d, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _check(r, what):
    if r.returncode != 0:
        raise RuntimeError(f"{what}: exit {r.returncode}: {r.stderr.decode(errors='replace')[-300:]}")
    return r.stdout


class Runc:
    """`runc run` of a bundle whose root binds /usr read-only (/bin, /lib* link into it), with
    pid and mount namespaces and the limits; runc makes the cgroup and removes it."""

    name = "runc run"

    def __init__(self, tmp, parent):
        self.bundle, self.state = os.path.join(tmp, "runc"), os.path.join(tmp, "runc-state")
        rootfs = os.path.join(self.bundle, "rootfs")
        os.makedirs(os.path.join(rootfs, "usr"))
        for link in ("bin", "lib", "lib64", "sbin"):
            if os.path.exists(f"/usr/{link}"):
                os.symlink(f"usr/{link}", os.path.join(rootfs, link))
        _check(subprocess.run(["runc", "spec"], cwd=self.bundle, capture_output=True), "runc spec")
        path = os.path.join(self.bundle, "config.json")
        with open(path) as f:
            spec = json.load(f)
        spec["process"].update(terminal=False, args=["true"])
        spec["root"] = {"path": "rootfs", "readonly": True}
        spec["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr",
                               "options": ["rbind", "ro"]})
        linux = spec["linux"]
        linux["namespaces"] = [{"type": "pid"}, {"type": "mount"}]
        spec.pop("hostname", None)   # (needs a UTS namespace of its own)
        linux["resources"] = {"cpu": {"quota": QUOTA_US, "period": PERIOD_US},
                              "memory": {"limit": MEMORY}, "pids": {"limit": PIDS}}
        self.parent = parent
        with open(path, "w") as f:
            json.dump(spec, f)
        self.spec = spec

    def run(self, i):
        self.spec["linux"]["cgroupsPath"] = f"/{self.parent}/runc{i}"
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(self.spec, f)
        return _check(subprocess.run(["runc", "--root", self.state, "run", "--bundle",
                                      self.bundle, f"jwbench-{os.getpid()}-{i}"],
                                     capture_output=True, stdin=subprocess.DEVNULL), "runc run")

    def cpu(self):
        return 0.0

    def close(self):
        shutil.rmtree(self.bundle, ignore_errors=True)
        remove_cgroups(self.parent)


class CgroupTools:
    """cgcreate + cgset + cgexec + cgdelete (libcgroup's tools), four processes a run."""

    name = "cgcreate+cgset+cgexec+cgdelete"

    def __init__(self, tmp, parent):
        self.parent = parent

    def run(self, i):
        cg, ctl = f"/{self.parent}/cgtools{i}", "cpu,memory,pids"
        _check(subprocess.run(["cgcreate", "-g", f"{ctl}:{cg}"], capture_output=True), "cgcreate")
        try:
            _check(subprocess.run(["cgset", "-r", f"cpu.cfs_period_us={PERIOD_US}", "-r",
                                   f"cpu.cfs_quota_us={QUOTA_US}", "-r",
                                   f"memory.limit_in_bytes={MEMORY}", "-r", f"pids.max={PIDS}",
                                   cg], capture_output=True), "cgset")
            return _check(subprocess.run(["cgexec", "-g", f"{ctl}:{cg}", "true"],
                                         capture_output=True, stdin=subprocess.DEVNULL),
                          "cgexec")
        finally:
            _check(subprocess.run(["cgdelete", "-g", f"{ctl}:{cg}"], capture_output=True),
                   "cgdelete")

    def cpu(self):
        return 0.0

    def close(self):
        remove_cgroups(self.parent)


class Ssh:
    """`ssh root@127.0.0.1 true` to Debian's sshd on a loopback port of its own, with its own
    config and keys (key auth, no limits: the remote-execution peer)."""

    name = "ssh 127.0.0.1 true"

    def __init__(self, tmp, parent):
        d = self.dir = os.path.join(tmp, "ssh")
        os.makedirs(d)
        for key in ("host", "client"):
            _check(subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                   f"{d}/{key}"], capture_output=True), "ssh-keygen")
        shutil.copy(f"{d}/client.pub", f"{d}/authorized_keys")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        with open(f"{d}/sshd_config", "w") as f:
            f.write(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/host\n"
                    f"PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    "PrintMotd no\nPrintLastLog no\n")
        self.made_privsep = not os.path.isdir("/run/sshd")   # sshd needs it; ours if we make it
        if self.made_privsep:
            os.makedirs("/run/sshd", mode=0o755)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", f"{d}/sshd_config"],
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("sshd did not start")
                time.sleep(0.05)
        self.argv = ["ssh", "-F", "/dev/null", "-i", f"{d}/client", "-o", "IdentitiesOnly=yes",
                     "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", str(self.port),
                     "root@127.0.0.1", "true"]

    def run(self, i):
        return _check(subprocess.run(self.argv, capture_output=True, stdin=subprocess.DEVNULL),
                      "ssh")

    def cpu(self):   # the master and the session processes it reaped
        return _ticks(self.proc.pid)

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.made_privsep:
            os.rmdir("/run/sshd")


class Bwrap:
    """bubblewrap: namespaces, /usr read-only, no cgroups (information only)."""

    name = "bwrap (no cgroups)"

    def __init__(self, tmp, parent):
        self.argv = ["bwrap", "--ro-bind", "/usr", "/usr"]
        for link in ("bin", "lib", "lib64", "sbin"):
            if os.path.exists(f"/usr/{link}"):
                self.argv += ["--symlink", f"usr/{link}", f"/{link}"]
        self.argv += ["--proc", "/proc", "--dev", "/dev", "--unshare-pid", "true"]

    def run(self, i):
        return _check(subprocess.run(self.argv, capture_output=True, stdin=subprocess.DEVNULL),
                      "bwrap")

    def cpu(self):
        return 0.0

    def close(self):
        pass


def unavailable():
    """[(peer, why it is not measured here)] of the peers this host cannot run."""
    out = []
    with open("/proc/1/comm") as f:
        init = f.read().strip()
    if init != "systemd":
        out.append(("systemd-run --wait --pipe -p CPUQuota=50% -p MemoryMax=256M true",
                    f"PID 1 is {init!r}, not systemd"))
    if shutil.which("docker") is None:
        out.append(("docker run --rm", "no docker client"))
    else:
        r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or ["no answer"])[-1]
            out.append(("docker run --rm", f"no daemon answers ({why[:80]})"))
    if shutil.which("crun") is None:
        out.append(("crun run", "not installed (it refuses cgroup v1 hybrid hosts like this one)"))
    return out


PEERS = (Runc, CgroupTools, Ssh, Bwrap)
