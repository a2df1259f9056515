"""Checks that run inside the cgroup v2 guest (v2_guest.py copies this file into its initramfs
as /checks.py; the guest's init runs it with CPython 3.11 under busybox).

Starts `jobworker.pyz serve` inside a non-root cgroup and drives it with the CLI; prints one
JWCHECK line per check, then the results as JSON between JWGUEST-RESULT-BEGIN and -END on the
serial console, where v2_guest.py reads them.
"""

import json
import os
import signal
import subprocess
import time

ENV = dict(os.environ, JOBWORKER_CACHE_DIR="/tmp/jwcache", JOBWORKER_SERVER="127.0.0.1:50051",
           JOBWORKER_CA="/tmp/certs/ca.crt", JOBWORKER_CERT="/tmp/certs/client.crt",
           JOBWORKER_KEY="/tmp/certs/client.key")
PYZ = ["python3.11", "/jobworker.pyz"]
SERVICE = "/sys/fs/cgroup/jobworker.service"
results = {}
t_begin = time.monotonic()


def check(name, ok, detail):
    results[name] = {"ok": bool(ok), "detail": detail}
    print(f"JWCHECK {name} {'ok' if ok else 'FAIL'} {detail}", flush=True)


def jw(*args, timeout=300):
    r = subprocess.run(PYZ + list(args), capture_output=True, timeout=timeout, env=ENV)
    if r.returncode != 0:
        print(f"JWCLI {args[0]} rc={r.returncode} {r.stderr.decode()[-500:]}", flush=True)
    return r


def start(*argv, **limits):
    flags = []
    for key, value in limits.items():
        flags += [f"--{key.replace('_', '-')}", value]
    return jw("start", *flags, "--", *argv).stdout.decode().strip()


def query(job_id):
    return json.loads(jw("query", job_id, "--json").stdout)


def wait_final(job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = query(job_id)
        if q["state"] != "running":
            return q
        time.sleep(0.5)
    raise TimeoutError(job_id)


def job_dir(job_id):
    return f"{SERVICE}/jobworker/{job_id}"


def output(job_id):
    with open(f"/tmp/state/jobs/{job_id}/output.log", "rb") as f:
        return f.read()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_server(log_path, cgroup=SERVICE, options=""):
    """`serve` inside the service's cgroup, as systemd with Delegate=yes would start it; None
    if it did not come up. Once the first server has handed controllers to its jobs, the
    service's cgroup can take no process: a restart goes into the leaf the first one made (as
    systemd's DelegateSubgroup=server does). `options` are added to serve's."""
    log = open(log_path, "w")
    server = subprocess.Popen(
        ["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec python3.11 /jobworker.pyz "
         f"serve --listen 127.0.0.1:50051 --certs /tmp/certs --state-dir /tmp/state {options}"],
        env=ENV, stderr=log)
    deadline = time.monotonic() + 300
    while "serving on" not in open(log_path).read():
        if time.monotonic() > deadline or server.poll() is not None:
            return None
        time.sleep(0.5)
    return server


def run_checks():
    jw("certs", "init", "/tmp/certs")
    jw("certs", "issue", "/tmp/certs", "client", "--role", "admin")
    os.mkdir(SERVICE)
    server = start_server("/tmp/serve.log")
    if server is None:
        check("server_starts", False, open("/tmp/serve.log").read()[-800:])
        return
    check("server_starts", True, f"cgroup v{2 if 'cgroup v2' in open('/tmp/serve.log').read() else '?'}"
          f" after {time.monotonic() - t_begin:.0f}s")
    own = open(f"{SERVICE}/cgroup.procs").read().split()
    leaf = open(f"{SERVICE}/server/cgroup.procs").read().split()
    subtree = open(f"{SERVICE}/cgroup.subtree_control").read().split()
    check("no_internal_process", not own and str(server.pid) in leaf
          and {"cpu", "memory", "io", "pids"} <= set(subtree),
          f"service procs {own}, server leaf {leaf}, subtree_control {subtree}")

    # CPU: 50% of one CPU holds a busy loop near half a CPU.
    j = start("sh", "-c", "while :; do :; done", cpu="50%")
    cpu_max = open(f"{job_dir(j)}/cpu.max").read().strip()
    time.sleep(1)
    q1, t1 = query(j), time.monotonic()
    time.sleep(5)
    q2, t2 = query(j), time.monotonic()
    share = (q2["usage"]["cpu_seconds"] - q1["usage"]["cpu_seconds"]) / (t2 - t1)
    jw("stop", j, "--grace", "0")
    check("cpu_50_percent", 0.35 <= share <= 0.65 and cpu_max == "50000 100000",
          f"{share:.2f} of a CPU, cpu.max {cpu_max!r}")
    check("usage_cpu", q2["usage"]["cpu_seconds"] > 0 and q2["usage"]["memory_bytes"] > 0
          and q2["usage"]["tasks"] >= 1, json.dumps(q2["usage"]))

    # Memory: 64M and 200 MB touched -> the kernel's OOM killer, read from memory.events.
    j = start("python3.11", "-c", "b = bytearray(200 << 20)\n"
              "for i in range(0, len(b), 4096): b[i] = 1\n", memory="64M")
    q = wait_final(j)
    check("memory_oom", q["oom_killed"] and q["signal"] == "SIGKILL",
          f"oom_killed={q['oom_killed']} signal={q['signal']} peak={q['usage']['memory_peak_bytes']}")

    # Disk I/O: 4 MiB of O_DIRECT writes to the scratch disk, free and at 1MiB/s.
    writer = ("import mmap, os, sys, time\n"
              "buf = mmap.mmap(-1, 1 << 20); buf.write(b'x' * (1 << 20))\n"
              "flags = os.O_WRONLY | (os.O_DIRECT if sys.argv[1] == 'direct' else 0)\n"
              "fd = os.open('/dev/vda', flags)\n"
              "t = time.monotonic()\n"
              "for _ in range(4): os.write(fd, buf)\n"
              "os.fsync(fd)\n"
              "print(f'{time.monotonic() - t:.3f}')\n")
    times = {}
    for label, mode, limit in [("free", "direct", None), ("direct", "direct", "1MiB/s"),
                               ("buffered_fsync", "buffered", "1MiB/s")]:
        j = start("python3.11", "-c", writer, mode, **({"disk_io": limit} if limit else {}))
        q = wait_final(j)
        times[label] = float(output(j).split()[0]) if q["exit_code"] == 0 else None
        if label == "direct":
            io_usage = q["usage"]
    free, direct, buffered = times["free"], times["direct"], times["buffered_fsync"]
    check("io_direct", direct is not None and direct >= 2.5 and direct >= 3 * free,
          f"4 MiB O_DIRECT: {direct}s at 1MiB/s vs {free}s unthrottled")
    check("io_buffered_fsync", buffered is not None and buffered >= 2.5,
          f"4 MiB buffered + fsync: {buffered}s at 1MiB/s (v2 charges writeback to the job)")
    check("usage_io", io_usage["io_write_bytes"] >= 4 << 20, json.dumps(io_usage))

    # pids: a fork loop stops at the limit.
    # (a shell gives up at its first failed fork; this loop keeps trying)
    bomb = ("import os, time\n"
            "made = refused = 0\n"
            "for _ in range(60):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(600); os._exit(0)\n"
            "        made += 1\n"
            "    except BlockingIOError:\n"
            "        refused += 1\n"
            "print(made, refused, flush=True)\n"
            "time.sleep(600)\n")
    j = start("python3.11", "-c", bomb, pids="20")
    deadline = time.monotonic() + 120
    while not output(j).strip() and time.monotonic() < deadline:
        time.sleep(0.3)
    made, refused = (int(x) for x in output(j).split()[:2])
    current = int(open(f"{job_dir(j)}/pids.current").read())
    events = open(f"{job_dir(j)}/pids.events").read().split()
    denied = int(events[events.index("max") + 1])
    jw("stop", j, "--grace", "0")
    check("pids_fork_bomb", current <= 20 and made <= 19 and refused > 0 and denied > 0,
          f"forks made {made}, refused {refused}; pids.current {current}, pids.events max {denied}")

    # Stop kills a double-forked setsid daemon that ignores SIGTERM (through cgroup.kill).
    j = start("sh", "-c", "trap '' TERM; setsid sh -c 'trap \"\" TERM; sleep 600 & echo $!'; "
              "sleep 600")
    deadline = time.monotonic() + 120
    while not output(j).strip() and time.monotonic() < deadline:
        time.sleep(0.3)
    daemon = int(output(j).split()[0])
    was_alive = alive(daemon)
    t = time.monotonic()
    stop = jw("stop", j, "--grace", "1")
    q = query(j)
    check("stop_kills_daemon", was_alive and not alive(daemon) and q["state"] == "stopped"
          and q["signal"] == "SIGKILL" and stop.returncode == 0,
          f"daemon {daemon} alive before {was_alive}, after {alive(daemon)}, state {q['state']}, "
          f"signal {q['signal']}, stop took {time.monotonic() - t:.1f}s")

    # Live restore: the server is killed; the launcher keeps the job running and writes its
    # output; a new server adopts it, and the stream has every line once.
    j = start("sh", "-c", "i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done")
    deadline = time.monotonic() + 120
    while len(output(j)) < 20 and time.monotonic() < deadline:
        time.sleep(0.3)
    server.kill()
    server.wait(60)
    time.sleep(2)
    server = start_server("/tmp/serve2.log", f"{SERVICE}/server")
    if server is None:
        check("live_restore", False, open("/tmp/serve2.log").read()[-800:])
        return
    state = query(j)["state"]
    stopped = jw("stop", j, "--grace", "0", timeout=60).returncode
    lines = [int(x) for x in jw("stream", j, timeout=60).stdout.split()]
    check("live_restore", state == "running" and stopped == 0
          and lines == list(range(len(lines))) and len(lines) > 100,
          f"adopted job {state}, stop exit {stopped}, {len(lines)} lines, in order and once: "
          f"{lines == list(range(len(lines)))}")

    time.sleep(1)
    left = [d for d in os.listdir(f"{SERVICE}/jobworker") if len(d) == 36]
    check("cgroups_removed", not left, f"left under the job parent: {left}")

    server.send_signal(signal.SIGTERM)
    code = server.wait(120)
    check("server_sigterm_exit_0", code == 0, f"exit {code}")


def main():
    try:
        run_checks()
    except Exception:
        import traceback
        check("harness", False, traceback.format_exc()[-1500:])
    print("JWGUEST-RESULT-BEGIN")
    print(json.dumps({"checks": results, "seconds": round(time.monotonic() - t_begin, 1)}))
    print("JWGUEST-RESULT-END", flush=True)


if __name__ == "__main__":
    main()
