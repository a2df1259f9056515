#!/usr/bin/env python3
"""jobworker benchmarks: every figure beside a floor measured in the same run (`make bench`).

Runs a real `jobworker.py serve` over mutual TLS on loopback, and a bare grpc server with the
same credentials for the floors; prints one table (figure, value, floor, ratio, target) and
writes bench/results.json. Asserts nothing. Needs root (jobs run in cgroups).
"""

import asyncio
import concurrent.futures
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))   # the floors' scripts are here
HERE = os.path.dirname(BENCH)
sys.path.insert(0, HERE)
import jobworker as jw  # noqa: E402

# The CLI's calls go direct (a figure that measures the mux gives it a runtime dir of its own)
os.environ["JOBWORKER_MUX"] = "off"

GiB, MiB = 1 << 30, 1 << 20
PARENT = f"jobworker-bench-{os.getpid()}"
rows = []


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def row(n, figure, value, floor, ratio, target, unit=""):
    rows.append({"n": n, "figure": figure, "value": value, "floor": floor, "ratio": ratio,
                 "target": target, "unit": unit})
    fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else str(v)
    print(f"{n:>2}  {figure:<46} {fmt(value):>12} {fmt(floor):>12} "
          f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>7}  {target}", flush=True)


# -- processes under test -----------------------------------------------------------------------

class Serve:
    """`jobworker.py serve` on a free loopback port."""

    def __init__(self, certs, state, extra=()):
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "jobworker.py"), "serve", "--listen",
             "127.0.0.1:0", "--certs", certs, "--state-dir", state, "--cgroup-parent",
             f"{PARENT}/{os.path.basename(state)}",
             # one identity drives every figure: the per-owner caps are the global ones
             "--max-jobs-per-owner", "20000", "--max-streams-per-owner", "1000", *extra,
             *os.environ.get("BENCH_SERVE_ARGS", "").split()],   # e.g. "--max-jobs 5000"
            stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if "serving on" in line:
                self.port = int(line.split("(port ")[1].split(")")[0])
                self.ready_s = time.perf_counter() - t   # exec to port accepting
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stats(self):
        """(threads, RSS bytes, CPU seconds) of the server process."""
        status = dict(l.split(":", 1) for l in open(f"/proc/{self.proc.pid}/status"))
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return int(status["Threads"]), int(status["VmRSS"].split()[0]) * 1024, cpu

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(600)


class Bare:
    """A grpc server with the same TLS setup and nothing else: the transport's floor."""

    def __init__(self, certs):
        self.proc = subprocess.Popen([sys.executable, os.path.join(BENCH, "bare_server.py"),
                                      certs], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.port = int(self.proc.stdout.readline())

    def stop(self):
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def creds(certs, name="bench"):
    read = lambda n: open(os.path.join(certs, n), "rb").read()
    return jw._grpc().ssl_channel_credentials(read("ca.crt"), read(f"{name}.key"),
                                              read(f"{name}.crt"))


def stub(certs, port):
    channel = jw._grpc().secure_channel(f"127.0.0.1:{port}", creds(certs))
    return channel, jw._pb()[1].JobServiceStub(channel)


# -- figures ------------------------------------------------------------------------------------

def unary_latencies(call, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def cpu_now(pids=()):
    """CPU seconds so far: the machine's busy time (all CPUs, /proc/stat: not idle, not
    iowait), this process's own, and for each pid its own and what it reaped of its children."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    out = {"machine": (sum(ticks) - ticks[3] - ticks[4]) / tick, "self": time.process_time()}
    for name, pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
        out[f"{name} children"] = (int(fields[13]) + int(fields[14])) / tick
    return out


def cpu_spent(before, pids=()):
    """{name: CPU seconds since `before` (a cpu_now())}."""
    after = cpu_now(pids)
    return {k: after[k] - before[k] for k in before}


def launcher_of(pid):
    """The launcher process a server started (its child running launcher_main)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = f.read().split()
    for k in kids:
        with open(f"/proc/{k}/cmdline", "rb") as f:
            if b"launcher_main" in f.read():
                return int(k)
    raise RuntimeError(f"server {pid} has no launcher")


def throughput(make_call, threads, seconds):
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def worker(i):
        call = make_call()
        while time.monotonic() < stop:
            call()
            counts[i] += 1
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def fork_floor(name, rounds, mode, parallel=1):
    """bench/fork_floor.py in `parallel` processes at once -> their JSON results."""
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(BENCH, "fork_floor.py"), f"{PARENT}/{name}{i}",
         str(rounds), mode], stdout=subprocess.PIPE, text=True) for i in range(parallel)]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"fork_floor.py {mode} failed")
    return [json.loads(o) for o in out]


def fig1_2(certs, server, bare):
    grpc = jw._grpc()
    pb = jw._pb()[0]
    ch, s = stub(certs, server.port)
    # Jobs that keep running: the figure is Start alone, not the cleanup of earlier jobs.
    sleeper = pb.StartRequest(name="sleep", args=["600"], resources=pb.ResourceConfig(
        cpu_quota="50%", memory_limit="256M", disk_io="10MB/s"))
    unary_latencies(lambda: s.Start(sleeper), 30)     # warm up
    starts = unary_latencies(lambda: s.Start(sleeper), 300)
    for job in s.List(pb.ListRequest(states=[pb.JOB_STATE_RUNNING], page_size=1000)).jobs:
        s.Stop(pb.StopRequest(job_id=job.job_id, grace_seconds=0))
    limited = pb.StartRequest(name="true", resources=sleeper.resources)
    floor_fork = fork_floor("floor", 300, "joined")[0]["times"]
    floor_fresh = fork_floor("floor", 300, "fresh")[0]["times"]
    bch = grpc.secure_channel(f"127.0.0.1:{bare.port}", creds(certs))
    empty = bch.unary_unary("/bench.Bare/Empty")
    unary_latencies(lambda: empty(b""), 100)
    floor_unary = unary_latencies(lambda: empty(b""), 1000)
    floor = pct(floor_fork, 50) + pct(floor_unary, 50)
    ms = lambda v: v * 1000
    row(1, "Start -> running, p50 (ms)", ms(pct(starts, 50)), ms(floor),
        pct(starts, 50) / floor, "<= 1.5x")
    row(1, "Start -> running, p99 (ms)", ms(pct(starts, 99)),
        ms(pct(floor_fork, 99) + pct(floor_unary, 99)),
        pct(starts, 99) / (pct(floor_fork, 99) + pct(floor_unary, 99)), "<= 2.0x")
    print(f"    floor parts: fork+join cgroups+exec+wait p50 {ms(pct(floor_fork, 50)):.2f} ms, "
          f"empty mTLS unary p50 {ms(pct(floor_unary, 50)):.2f} ms")
    fresh = pct(floor_fresh, 50) + pct(floor_unary, 50)
    row(1, "  same, floor also creates cgroups + limits", ms(pct(starts, 50)), ms(fresh),
        pct(starts, 50) / fresh, "(information)")

    def make_start():
        c, st = stub(certs, server.port)
        return lambda: st.Start(limited)

    def make_empty():
        c = grpc.secure_channel(f"127.0.0.1:{bare.port}", creds(certs))
        e = c.unary_unary("/bench.Bare/Empty")
        return lambda: e(b"")
    # CPU per job, by process: the machine is the limit here, so where its time goes is the
    # figure's explanation (jobs: what the launcher reaped of its children, the jobs)
    pids = (("server", server.proc.pid), ("launcher", launcher_of(server.proc.pid)))
    before = cpu_now(pids)
    jobs_s = throughput(make_start, 8, 5)
    time.sleep(2)   # let the last jobs finish
    start_cpu = {k: v / (jobs_s * 5) for k, v in cpu_spent(before, pids).items()}
    before = cpu_now()
    calls_s = throughput(make_empty, 8, 5)
    call_cpu = cpu_spent(before)["machine"] / (calls_s * 5)
    # the parallel floor: the fresh loop (make cgroups, write limits, fork, join, exec, wait,
    # remove) in one process per CPU this process may use, at once, for about as long
    cpus = len(os.sched_getaffinity(0))
    before = cpu_now()
    runs = fork_floor("pfloor", max(50, int(5 / pct(floor_fresh, 50))), "fresh", parallel=cpus)
    floor_jobs = sum(len(r["times"]) for r in runs)
    floor_cpu = cpu_spent(before)["machine"] / floor_jobs
    floor_loop, floor_kids = (sum(r["cpu"][i] for r in runs) / floor_jobs for i in (0, 1))
    span = max(r["span"][1] for r in runs) - min(r["span"][0] for r in runs)
    floor_s = floor_jobs / span
    row(2, "Start throughput, 8 clients (jobs/s)", jobs_s, floor_s, jobs_s / floor_s, ">= 0.7x")
    print(f"    parallel floor: the fresh loop in {cpus} processes at once; "
          f"empty mTLS unary calls, 8 clients: {calls_s:,.0f}/s")
    fmt = lambda v: f"{v * 1000:.2f}"
    parts = ("server", "launcher", "launcher children", "self")
    rest = start_cpu["machine"] - sum(start_cpu[k] for k in parts)
    c = start_cpu
    print(f"    CPU per job (ms): Start {fmt(c['machine'])} = server {fmt(c['server'])}, "
          f"launcher {fmt(c['launcher'])}, jobs {fmt(c['launcher children'])}, "
          f"benchmark's clients {fmt(c['self'])}, kernel and rest {fmt(rest)}")
    print(f"    CPU per job (ms): floor {fmt(floor_cpu)} = its loop {fmt(floor_loop)}, "
          f"its children {fmt(floor_kids)}, kernel and rest (its start-up too) "
          f"{fmt(floor_cpu - floor_loop - floor_kids)}; an empty mTLS unary call (server and "
          f"client) {fmt(call_cpu)}")
    row(2, "  ceiling: floor's CPU + one unary call's, per job", floor_s * floor_cpu /
        (floor_cpu + call_cpu), floor_s, floor_cpu / (floor_cpu + call_cpu), "(information)")
    ch.close()
    bch.close()


def finished_job(s, pb, argv):
    job = s.Start(pb.StartRequest(name=argv[0], args=argv[1:])).job_id
    while s.Query(pb.QueryRequest(job_id=job)).status.state == pb.JOB_STATE_RUNNING:
        time.sleep(0.1)
    return job


def drain(call):
    n = 0
    for msg in call:
        n += len(msg.chunk.data) if hasattr(msg, "chunk") else len(msg)
    return n


def fig3_4(certs, server, bare, state):
    pb = jw._pb()[0]
    ch, s = stub(certs, server.port)
    job = finished_job(s, pb, ["head", "-c", str(GiB), "/dev/zero"])
    ours, floors = [], []
    bch = jw._grpc().secure_channel(f"127.0.0.1:{bare.port}", creds(certs),
                                    options=[("grpc.max_receive_message_length", 8 * MiB)])
    bare_stream = bch.unary_stream("/bench.Bare/Stream")
    for _ in range(3):
        t = time.perf_counter()
        assert drain(s.Stream(pb.StreamRequest(job_id=job))) == GiB
        ours.append(GiB / MiB / (time.perf_counter() - t))
        t = time.perf_counter()
        assert drain(bare_stream(struct.pack("!II", MiB, 1024))) == GiB
        floors.append(GiB / MiB / (time.perf_counter() - t))
    o, f = statistics.median(ours), statistics.median(floors)
    row(3, "Stream a finished 1 GiB log (MiB/s)", o, f, o / f, ">= 0.9x")

    # live writer: the job's output reaches the client as fast as the writer alone fills a file
    live, alone = [], []
    for _ in range(3):
        t = time.perf_counter()
        job = s.Start(pb.StartRequest(name="head", args=["-c", str(GiB), "/dev/zero"])).job_id
        assert drain(s.Stream(pb.StreamRequest(job_id=job))) == GiB
        live.append(GiB / MiB / (time.perf_counter() - t))
        target = os.path.join(state, "alone.bin")
        t = time.perf_counter()
        with open(target, "wb") as out:
            subprocess.run(["head", "-c", str(GiB), "/dev/zero"], stdout=out, check=True)
        alone.append(GiB / MiB / (time.perf_counter() - t))
        os.unlink(target)
    o, f = statistics.median(live), statistics.median(alone)
    row(4, "Follow a live 1 GiB writer (MiB/s)", o, f, o / f, ">= 0.8x")

    code = ("import sys, time\n"
            "for i in range(300):\n"
            "    sys.stdout.write(f'{time.time_ns()}\\n'); sys.stdout.flush(); time.sleep(0.01)\n")
    job = s.Start(pb.StartRequest(name="python3", args=["-c", code])).job_id
    lat, buf = [], b""
    for msg in s.Stream(pb.StreamRequest(job_id=job)):
        now = time.time_ns()
        buf += msg.chunk.data
        *lines, buf = buf.split(b"\n")
        lat += [(now - int(x)) / 1e6 for x in lines if x]
    row(4, "  write -> client latency p50 (ms)", pct(lat, 50), None, None, "p50 <= 5 ms")
    row(4, "  write -> client latency p99 (ms)", pct(lat, 99), None, None, "")
    ch.close()
    bch.close()


async def many_streams(certs, port, n, method, request, channels=10):
    grpc = jw._grpc()
    chans = [grpc.aio.secure_channel(f"127.0.0.1:{port}", creds(certs),
                                     options=[("grpc.max_receive_message_length", 8 * MiB)])
             for _ in range(channels)]

    async def one(i):
        h = hashlib.sha256()
        call = chans[i % channels].unary_stream(method)(request) if isinstance(method, str) \
            else method(chans[i % channels])
        async for msg in call:
            h.update(msg.chunk.data if hasattr(msg, "chunk") else msg)
        return h.hexdigest()
    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in chans:
            await c.close()


def fig5(certs, server, bare):
    pb, pb_grpc = jw._pb()
    ch, s = stub(certs, server.port)
    size = 64 * MiB
    job = finished_job(s, pb, ["head", "-c", str(size), "/dev/zero"])
    req = pb.StreamRequest(job_id=job)
    t = time.perf_counter()
    digests = asyncio.run(many_streams(certs, server.port, 100,
                                       lambda c: pb_grpc.JobServiceStub(c).Stream(req), None))
    ours = 100 * size / MiB / (time.perf_counter() - t)
    t = time.perf_counter()
    bare_digests = asyncio.run(many_streams(certs, bare.port, 100, "/bench.Bare/Stream",
                                            struct.pack("!II", MiB, 64)))
    floor = 100 * size / MiB / (time.perf_counter() - t)
    same = len(set(digests)) == 1 and digests[0] == hashlib.sha256(b"\0" * size).hexdigest()
    if len(set(bare_digests)) != 1:
        print("    warning: the floor's 100 streams did not all carry the same bytes")
    row(5, f"100 followers, aggregate MiB/s (sha256 {'equal' if same else 'DIFFER'})", ours,
        floor, ours / floor, ">= 0.8x")
    ch.close()


def fig6_8(certs, state_root):
    pb, pb_grpc = jw._pb()
    server = Serve(certs, os.path.join(state_root, "many"), ["--max-jobs", "2000"])
    try:
        ch, s = stub(certs, server.port)
        idle_job = s.Start(pb.StartRequest(name="sleep", args=["600"])).job_id
        q = lambda: s.Query(pb.QueryRequest(job_id=idle_job))
        unary_latencies(q, 50)
        idle_q = pct(unary_latencies(q, 500), 50)
        idle_threads, rss0, _ = server.stats()
        start = lambda _: s.Start(pb.StartRequest(name="sleep", args=["600"]))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(start, range(100)))
            time.sleep(1)
            threads0 = server.stats()[0]      # same client concurrency, 100 jobs
            list(pool.map(start, range(900)))
        time.sleep(2)
        threads1, rss1, _ = server.stats()
        busy_q = pct(unary_latencies(q, 500), 50)
        row(6, "1000 running jobs: server RSS (MB)", rss1 / 1e6, rss0 / 1e6, rss1 / rss0,
            "<= 150 MB")
        row(6, "1000 running jobs: server threads (floor: 100 jobs)", float(threads1),
            float(threads0), threads1 / threads0, "not growing")
        print(f"    idle server: {idle_threads} threads; RSS floor is the idle server")
        row(6, "1000 running jobs: Query p50 (ms)", busy_q * 1000, idle_q * 1000, busy_q / idle_q,
            "<= 1.2x")
        ch.close()
    finally:
        server.stop()

    server = Serve(certs, os.path.join(state_root, "idle"))
    try:
        ch, s = stub(certs, server.port)
        job = s.Start(pb.StartRequest(name="sleep", args=["600"])).job_id
        req = pb.StreamRequest(job_id=job)

        async def idle_followers():
            grpc = jw._grpc()
            chans = [grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds(certs))
                     for _ in range(10)]
            calls = [pb_grpc.JobServiceStub(chans[i % 10]).Stream(req) for i in range(100)]
            for c in calls:
                await c.initial_metadata()
            await asyncio.sleep(1)
            cpu0 = server.stats()[2]
            await asyncio.sleep(10)
            cpu1 = server.stats()[2]
            for c in calls:
                c.cancel()
            for c in chans:
                await c.close()
            return (cpu1 - cpu0) / 10 * 100
        share = asyncio.run(idle_followers())
        row(8, "100 idle followers: server CPU (% of a core)", share, None, None, "<= 1 %")
        s.Stop(pb.StopRequest(job_id=job, grace_seconds=0))
        ch.close()
    finally:
        server.stop()


def fig13(certs, state_root):
    """BENCH_MANY (10,000) jobs running at once: all start, the server stays small and quick."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fits = (hard - jw.FD_RESERVE) // jw.FDS_PER_JOB - 100   # what the server will allow here
    many = int(os.environ.get("BENCH_MANY", min(10000, fits)))
    if many < 10000:
        print(f"    (the open-files hard limit here, {hard}, allows {fits + 100} running jobs: "
              f"{many} are run; 10,000 need {10100 * jw.FDS_PER_JOB + jw.FD_RESERVE})")
    pb, _ = jw._pb()
    server = Serve(certs, os.path.join(state_root, "tenk"), ["--max-jobs", str(many + 100)])
    try:
        ch, s = stub(certs, server.port)
        idle_job = s.Start(pb.StartRequest(name="sleep", args=["3600"])).job_id
        q = lambda: s.Query(pb.QueryRequest(job_id=idle_job))
        unary_latencies(q, 50)
        idle_q = pct(unary_latencies(q, 500), 50)
        _, rss0, _ = server.stats()
        start = lambda _: s.Start(pb.StartRequest(name="sleep", args=["3600"]), timeout=120)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(start, range(99)))
            time.sleep(1)
            threads0 = server.stats()[0]
            t = time.perf_counter()
            list(pool.map(start, range(many - 100)))
            took = time.perf_counter() - t
        time.sleep(2)
        threads1, rss1, _ = server.stats()
        running = len(s.List(pb.ListRequest(states=[pb.JOB_STATE_RUNNING], page_size=1)).jobs)
        busy_q = pct(unary_latencies(q, 500), 50)
        launcher = max(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_launcher(p))
        lrss = int(dict(l.split(":", 1) for l in open(f"/proc/{launcher}/status"))
                   ["VmRSS"].split()[0]) * 1024
        row(13, f"{many} running jobs: started (jobs/s)", (many - 100) / took, None, None, "-")
        row(13, f"{many} running jobs: Query p50 (ms)", busy_q * 1000, idle_q * 1000,
            busy_q / idle_q, "<= 1.2x")
        row(13, f"{many} running jobs: server RSS (MB)", rss1 / 1e6, rss0 / 1e6, rss1 / rss0,
            "<= 300 MB")
        row(13, f"{many} running jobs: launcher RSS (MB)", lrss / 1e6, None, None, "-")
        row(13, f"{many} running jobs: server threads (floor: 100 jobs)", float(threads1),
            float(threads0), threads1 / threads0, "not growing")
        assert running == 1   # (a page of one: the call works with them all there)
        ch.close()
        t = time.perf_counter()
    finally:
        server.stop()
    row(13, f"{many} running jobs: server stop, all stopped (s)", time.perf_counter() - t, None,
        None, "-")


def _attack(*args):
    """bench/attackers.py running: (process, its report as a thunk), once it is ready."""
    proc = subprocess.Popen([sys.executable, os.path.join(BENCH, "attackers.py"),
                             *map(str, args)], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"attackers.py {args[0]} did not start")
    return proc, lambda: json.loads(proc.communicate(timeout=600)[0].splitlines()[-1])


def fig15(certs, state_root):
    """Hostile clients: 20,000 connections that never start TLS (memory while and after, a
    fresh admin connection's List while they come), and 2,000 calls that never send their
    request (an admin's Query on an open channel while they are held)."""
    import resource
    pb, _ = jw._pb()
    server = Serve(certs, os.path.join(state_root, "flood"))
    try:
        ch, s = stub(certs, server.port)
        lst = lambda: s.List(pb.ListRequest())
        unary_latencies(lst, 50)
        idle = pct(unary_latencies(lst, 300), 50)

        def fresh_list():
            fch, fs = stub(certs, server.port)
            try:
                t = time.perf_counter()
                fs.List(pb.ListRequest(), timeout=30)
                return time.perf_counter() - t
            finally:
                fch.close()
        fresh_idle = pct([fresh_list() for _ in range(30)], 50)
        time.sleep(2)
        _, rss0, _ = server.stats()
        n = min(20000, resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200)
        proc, report = _attack("connect", server.port, n, 60, "127.0.0.2")
        during, peak, held = [], rss0, 0
        while proc.poll() is None:
            during.append(fresh_list())
            peak = max(peak, server.stats()[1])
            held = max(held, sum(1 for c in jw.tcp_connections(server.port)
                                 if c.address == "127.0.0.2"))
        flood = report()
        time.sleep(30)
        _, rss1, _ = server.stats()
        row(15, f"{flood['opened']:,} bare connections: fresh admin List p50 (ms)",
            pct(during, 50) * 1000, fresh_idle * 1000, pct(during, 50) / fresh_idle, "-")
        row(15, "... fresh admin List, slowest (s)", max(during), None, None, "<= 2 s")
        row(15, "... of them at the server at once, at most", float(held), None, None,
            "bounded (64 per address)")
        row(15, "... server RSS at the peak (MB)", peak / 1e6, rss0 / 1e6, peak / rss0, "-")
        row(15, "... server RSS 30 s after they closed (MB)", rss1 / 1e6, rss0 / 1e6,
            rss1 / rss0, "<= +50 MB")
        proc, report = _attack("never-send", server.port, certs, "bench", 2000, 120)
        held = unary_latencies(lst, 100)
        calls = report()
        row(15, "2,000 calls that never send: admin List p50 (ms)", pct(held, 50) * 1000,
            idle * 1000, pct(held, 50) / idle, "-")
        row(15, "... admin List, slowest (s)", max(held), None, None, "<= 1 s")
        print(f"    the never-sending calls ended: {calls['codes']}, the last after "
              f"{calls['last_ended']:.1f} s")
        ch.close()
    finally:
        server.stop()


def _is_launcher(pid):
    try:
        return b"launcher_main" in open(f"/proc/{pid}/cmdline", "rb").read() and \
            b"tenk" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False


GUEST_MIB_PER_JOB = 1.2   # measured: 10,000 jobs took 8 GB of the guest's (0.8 MB each)


def fig14(pyz, state_root):
    """10,000 running jobs where they can be run: the cgroup v2 guest under QEMU
    (bench/tenk_guest.py inside it), whose root may raise the open-files limit. About 15
    minutes under emulation; BENCH_GUEST_JOBS picks another number of jobs."""
    n = int(os.environ.get("BENCH_GUEST_JOBS", "10000"))
    memory = 2048 + int(n * GUEST_MIB_PER_JOB)
    with open("/proc/meminfo") as f:
        avail = int(next(line for line in f if line.startswith("MemAvailable")).split()[1])
    if avail < (memory + 1024) * 1024:
        print(f"    figure 14 not run: {n:,} jobs need a guest of {memory:,} MiB, and this "
              f"machine has {avail // 1024:,} MiB available (BENCH_GUEST_JOBS=N runs fewer)")
        return
    out = os.path.join(state_root, "tenk-guest.json")
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "v2_guest.py"), "--pyz", pyz, "--program",
         os.path.join(BENCH, "tenk_guest.py"), "--memory", str(memory), "--timeout", "3600",
         "--env", f"JOBWORKER_BENCH_JOBS={n}", "--json", out], capture_output=True, text=True)
    if not os.path.exists(out):
        print(f"    figure 14 not run: the guest gave no results ({r.stderr.strip()[-300:]})")
        return
    with open(out) as f:
        result = json.load(f)
    fig, checks = result["figures"], result["checks"]
    if not fig:
        print(f"    figure 14: the guest failed: {json.dumps(checks)[-600:]}")
        return
    what = f"{fig['running']} running jobs, v2 guest"
    row(14, f"{what}: started (jobs/s)", (n - 100) / fig["start_seconds"], None, None, "-")
    row(14, f"{what}: Query p50 (ms)", fig["query_busy_ms"], fig["query_idle_ms"],
        fig["query_busy_ms"] / fig["query_idle_ms"], "<= 1.2x")
    row(14, f"{what}: server RSS (MB)", fig["server_rss"] / 1e6, fig["server_rss_100"] / 1e6,
        fig["server_rss"] / fig["server_rss_100"], "<= 300 MB")
    row(14, f"{what}: server threads (floor: 100 jobs)", float(fig["server_threads"]),
        float(fig["server_threads_100"]), fig["server_threads"] / fig["server_threads_100"],
        "not growing")
    row(14, f"{what}: server stop, all stopped (s)", fig["stop_seconds"], None, None, "-")
    print(f"    open files: server {fig['server_fds']:,}, launcher {fig['launcher_fds']:,}; "
          f"launcher RSS {fig['launcher_rss'] / 1e6:.0f} MB; guest under TCG emulation, "
          f"{result['wall_seconds']:.0f} s; checks: "
          + ", ".join(f"{k} {'ok' if c['ok'] else 'FAILED'}" for k, c in checks.items()))


def fig7(certs, server, bare, pyz):
    pb = jw._pb()[0]
    ch, s = stub(certs, server.port)
    job = s.Start(pb.StartRequest(name="true")).job_id
    env = dict(os.environ, JOBWORKER_SERVER=f"127.0.0.1:{server.port}",
               PYTHONDONTWRITEBYTECODE="",   # as on a host: bytecode of jobworker.py is cached
               JOBWORKER_CA=f"{certs}/ca.crt", JOBWORKER_CERT=f"{certs}/bench.crt",
               JOBWORKER_KEY=f"{certs}/bench.key")

    def wall(argv, n, fresh_cache=False):
        out = []
        for _ in range(n):
            e = dict(env)
            if fresh_cache:
                e["JOBWORKER_CACHE_DIR"] = tempfile.mkdtemp(prefix="jwbench-cache-")
            t = time.perf_counter()
            subprocess.run(argv, env=e, check=True, capture_output=True)
            out.append(time.perf_counter() - t)
            if fresh_cache:
                shutil.rmtree(e["JOBWORKER_CACHE_DIR"])
        return statistics.median(out)

    floor_code = ("import grpc, google.protobuf, sys; "
                  "c = grpc.ssl_channel_credentials(*(open(f, 'rb').read() for f in sys.argv[2:5])); "
                  "ch = grpc.secure_channel(sys.argv[1], c); "
                  "ch.unary_unary('/bench.Bare/Empty')(b''); ch.close()")
    floor = wall([sys.executable, "-c", floor_code, f"127.0.0.1:{bare.port}", f"{certs}/ca.crt",
                  f"{certs}/bench.key", f"{certs}/bench.crt"], 10)
    # `python -m jobworker` (a script run as `python jobworker.py` is compiled every time)
    env["PYTHONPATH"] = HERE
    wall([sys.executable, "-m", "jobworker", "query", job], 1)   # writes the .pyc
    src = wall([sys.executable, "-m", "jobworker", "query", job], 10)
    del env["PYTHONPATH"]
    row(7, "CLI query from source, -m jobworker (s)", src, floor, src / floor, "<= 1.3x")
    if pyz and os.path.exists(pyz):
        cache = tempfile.mkdtemp(prefix="jwbench-cache-")
        env["JOBWORKER_CACHE_DIR"] = cache
        first = wall([sys.executable, pyz, "query", job], 3, fresh_cache=True)
        env["JOBWORKER_CACHE_DIR"] = cache
        subprocess.run([sys.executable, pyz, "--version"], env=env, check=True, capture_output=True)
        cached = wall([sys.executable, pyz, "query", job], 10)
        runtime = tempfile.mkdtemp(prefix="jwbench-run-")   # a mux of this figure's own
        env.update(XDG_RUNTIME_DIR=runtime, JOBWORKER_MUX="10m")
        wall([sys.executable, pyz, "query", job], 2)   # (the first starts the mux)
        muxed = wall([sys.executable, pyz, "query", job], 10)
        subprocess.run([sys.executable, pyz, "mux", "stop"], env=env, capture_output=True)
        shutil.rmtree(runtime)
        shutil.rmtree(cache)
        row(7, "CLI query, pyz cached (s)", cached, floor, cached / floor, "<= 1.3x")
        row(7, "CLI query, pyz cached, through the mux (s)", muxed, floor, muxed / floor,
            "<= 1.3x")
        row(7, "CLI query, pyz first run, extracting (s)", first, floor, first / floor, "-")
    ch.close()


def fig16_17(certs, server, bare):
    """Interactive jobs: stdin throughput of `run -i` (a whole CLI process) against a bare
    client-streaming call of the same message size; keystroke echo through `run -tt` on a local
    pseudo-terminal against a bare bidirectional echo."""
    import pty
    grpc = jw._grpc()
    env = dict(os.environ, JOBWORKER_SERVER=f"127.0.0.1:{server.port}",
               JOBWORKER_CA=f"{certs}/ca.crt", JOBWORKER_CERT=f"{certs}/bench.crt",
               JOBWORKER_KEY=f"{certs}/bench.key")
    cli = [sys.executable, os.path.join(HERE, "jobworker.py")]
    size, chunk = GiB, jw.INPUT_CHUNK
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        r = subprocess.run(f"head -c {size} /dev/zero | {' '.join(cli)} run -i -- sha256sum",
                           shell=True, env=env, capture_output=True, check=True)
        walls.append(time.perf_counter() - t)
    assert r.stdout.split()[0].decode() == hashlib.sha256(bytes(size)).hexdigest()
    ch = grpc.secure_channel(f"127.0.0.1:{bare.port}", creds(certs))
    sink = ch.stream_unary("/bench.Bare/Sink")
    block = bytes(chunk)
    floors = []
    for _ in range(3):
        t = time.perf_counter()
        total = struct.unpack("!Q", sink(iter([block] * (size // chunk))))[0]
        floors.append(time.perf_counter() - t)
    assert total == size
    t = time.perf_counter()
    subprocess.run(f"head -c {size} /dev/zero | sha256sum", shell=True, check=True,
                   capture_output=True)
    alone = time.perf_counter() - t
    mibs = lambda seconds: size / MiB / seconds
    value, floor = mibs(statistics.median(walls)), mibs(statistics.median(floors))
    row(16, "stdin 1 GiB, run -i -- sha256sum (MiB/s)", value, floor, value / floor, ">= 0.7x")
    row(16, "(head | sha256sum alone, MiB/s)", mibs(alone), None, None, "information")
    t = time.perf_counter()
    r = subprocess.run(f"head -c {size} /dev/zero | {' '.join(cli)} run -i -- wc -c", shell=True,
                       env=env, capture_output=True, check=True)
    value = mibs(time.perf_counter() - t)
    assert int(r.stdout) == size
    row(16, "stdin 1 GiB, run -i -- wc -c (MiB/s)", value, floor, value / floor, "information")

    # keystroke echo: the CLI's stdin and stdout a pty of ours (raw mode, as a user's terminal)
    master, slave = pty.openpty()
    proc = subprocess.Popen([*cli, "run", "-t", "--", "sh", "-c", "echo ready; exec cat"],
                            stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    os.close(slave)

    def echoed(byte):
        t = time.perf_counter()
        os.write(master, byte)
        seen = b""
        while byte not in seen:
            seen += os.read(master, 4096)
        return time.perf_counter() - t
    seen = b""
    while b"ready" not in seen:   # the job's first line: this terminal is raw, attached
        seen += os.read(master, 4096)
    for _ in range(20):
        echoed(b"w")
    samples = [echoed(b"k") for _ in range(300)]
    os.write(master, b"\r\x04")   # a line, then ^D at its start: cat ends, run exits
    proc.wait(30)
    os.close(master)
    q = __import__("queue").Queue()
    reqs = iter(q.get, None)
    echo = ch.stream_stream("/bench.Bare/Echo")(reqs)

    def bare_echo():
        t = time.perf_counter()
        q.put(b"k")
        next(echo)
        return time.perf_counter() - t
    for _ in range(20):
        bare_echo()
    floor_samples = [bare_echo() for _ in range(300)]
    q.put(None)
    ch.close()
    for p in (50, 99):
        v, f = pct(samples, p) * 1e3, pct(floor_samples, p) * 1e3
        row(17, f"keystroke echo through run -t, p{p} (ms)", v, f, v / f,
            "<= 2x" if p == 50 else "-")


def fig18(certs, state_root):
    """Fan-out: `run --hosts h1,h2,h3 -- true` (one CLI process, three servers) against the
    three single-host `run -- true` one after another, medians of 7 each."""
    servers = [Serve(certs, os.path.join(state_root, f"fan{i}")) for i in range(3)]
    cfg = tempfile.mkdtemp(prefix="jwbench-cfg-")
    env = dict(os.environ, XDG_CONFIG_HOME=cfg)
    cli = [sys.executable, os.path.join(HERE, "jobworker.py")]
    try:
        for i, server in enumerate(servers):
            subprocess.run([*cli, "context", "add", f"h{i}", "--server",
                            f"127.0.0.1:{server.port}", "--ca", f"{certs}/ca.crt", "--cert",
                            f"{certs}/bench.crt", "--key", f"{certs}/bench.key"], env=env,
                           check=True, capture_output=True)

        def wall(argvs):
            t = time.perf_counter()
            for argv in argvs:
                subprocess.run(argv, env=env, check=True, capture_output=True)
            return time.perf_counter() - t
        fan, seq = [], []
        for _ in range(7):
            fan.append(wall([[*cli, "run", "--hosts", "h0,h1,h2", "--", "true"]]))
            seq.append(wall([[*cli, "run", "--context", f"h{i}", "--", "true"]
                             for i in range(3)]))
        value, floor = statistics.median(fan), statistics.median(seq)
        row(18, "run true on 3 hosts, fan-out (s)", value, floor, value / floor, "<= 0.5x")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(cfg, ignore_errors=True)


def fig19(certs, state_root):
    """The queue's hand-off, in-process on real cgroups: from a slot freeing (the running
    jobs' Quota given back) to the next queued job running (exec'd: the observer's
    job_started), against Start -> running on an idle manager; 150 rounds of each,
    interleaved. One job runs at a time (--max-jobs 2: 1 kept for admins)."""
    started, freed, hand_off, direct = {}, [], [], []

    class Seen(jw._NoObserver):
        def job_started(self, status):
            started[status.id] = time.perf_counter()
    m = jw.JobManager(os.path.join(state_root, "queue"), jw.detect_cgroups(f"{PARENT}/queue"),
                      max_jobs=2, observer=Seen(), grace=0).open()
    give = m._running.give

    def timed_give(owner):
        freed.append(time.perf_counter())
        give(owner)
    m._running.give = timed_give
    try:
        holder = m.start("sleep", ["600"], owner="o")
        for i in range(160):
            queued = m.start("sleep", ["600"], owner="o", queue=True)
            assert queued.state == jw.QUEUED, queued
            m.stop(holder.id, grace=0)
            m.table.get(queued.id).wait_started()
            hand_off.append(started[queued.id] - freed[-1])
            m.stop(queued.id, grace=0)   # idle now: a direct Start
            t = time.perf_counter()
            holder = m.start("sleep", ["600"], owner="o")
            direct.append(started[holder.id] - t)
        m.stop(holder.id, grace=0)
    finally:
        m.close(grace=0)
    hand_off, direct = hand_off[10:], direct[10:]   # (the first rounds warm up)
    for p in (50, 99):
        value, floor = pct(hand_off, p) * 1000, pct(direct, p) * 1000
        row(19, f"queue: slot freed -> next job running p{p} (ms)", value, floor,
            value / floor, "<= 1.2x")


def fig20(certs, state_root):
    """10,000 queued jobs (`true`) on a full server: its RSS growth per queued job, over
    the RSS after 1,000 queued (the allocator's and grpc's warm-up)."""
    pb = jw._pb()[0]
    server = Serve(certs, os.path.join(state_root, "queued"),
                   ["--max-jobs", "2", "--max-queued", "20000", "--max-queued-per-owner",
                    "20000"])
    try:
        ch, s = stub(certs, server.port)
        for _ in range(2):   # the share and what is kept for admins (this identity is one)
            s.Start(pb.StartRequest(name="sleep", args=["600"]))
        queue = lambda _: s.Start(pb.StartRequest(name="true", queue=True)).status.state
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert set(pool.map(queue, range(1000))) == {pb.JOB_STATE_QUEUED}
            rss0 = server.stats()[1]
            assert set(pool.map(queue, range(10_000))) == {pb.JOB_STATE_QUEUED}
        rss1 = server.stats()[1]
        per_job = (rss1 - rss0) / 10_000
        row(20, "10,000 queued jobs: RSS per queued job (KB)", per_job / 1000, None, None,
            "<= 2 KB")
        ch.close()
    finally:
        server.stop()


def fig21(certs, state_root, pyz):
    """Peers (bench/peers.py): the same work done by jobworker, over the API with its channel
    open and by its CLI (a whole process), and by runc, cgroup-tools, ssh and bwrap; 30
    sequential runs of each after 2 to warm up, interleaved run by run in a shuffled order
    (the host's noise falls on all alike; so does the kernel's: the first cgroup.procs write
    after a quiet spell waits for an RCU grace period, and whoever follows ssh pays it). Wall time p50 and p99, and CPU per run of every process involved
    that can be read: the client's (this process, or the peer's processes, reaped) and the
    long-lived ones' (jobworker's server and launcher, sshd)."""
    import resource
    import peers
    pb = jw._pb()[0]
    server, bare = Serve(certs, os.path.join(state_root, "peers")), Bare(certs)
    launcher = launcher_of(server.proc.pid)
    ch, s = stub(certs, server.port)
    cache = tempfile.mkdtemp(prefix="jwbench-cache-")
    env = dict(os.environ, JOBWORKER_SERVER=f"127.0.0.1:{server.port}", JOBWORKER_CACHE_DIR=cache,
               JOBWORKER_CA=f"{certs}/ca.crt", JOBWORKER_CERT=f"{certs}/bench.crt",
               JOBWORKER_KEY=f"{certs}/bench.key", PYTHONDONTWRITEBYTECODE="")
    limits = pb.ResourceConfig(cpu_quota="50%", memory_limit="256M", pids="1024")

    def api(i):
        job, out = s.Start(pb.StartRequest(name="true", resources=limits)).job_id, b""
        for msg in s.Stream(pb.StreamRequest(job_id=job, batch=True)):
            if msg.HasField("final_status"):
                assert msg.final_status.exit_code == 0, msg
            else:
                out += msg.batch.data
        return out

    def process(argv):
        return lambda i: subprocess.run(argv, env=env, check=True, capture_output=True).stdout

    run_true = [sys.executable, pyz, "run", "--cpu", "50%", "--memory", "256M", "--pids", "1024",
                "--", "true"]
    runtime = tempfile.mkdtemp(prefix="jwbench-run-")   # the mux's socket: this figure's own
    muxed = dict(env, XDG_RUNTIME_DIR=runtime, JOBWORKER_MUX="10m")
    env["JOBWORKER_MUX"] = "off"

    def mux_cpu():   # (the mux is started by the first run: its pid is learned then)
        sock = jw.mux_connect(jw.mux_socket_path(muxed))
        if sock is None:
            return 0.0
        with sock:
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      12))[0]
        return peers._ticks(pid, False)

    floor_code = ("import grpc, google.protobuf, sys; "
                  "c = grpc.ssl_channel_credentials(*(open(f, 'rb').read() for f in sys.argv[2:5])); "
                  "ch = grpc.secure_channel(sys.argv[1], c); "
                  "ch.unary_unary('/bench.Bare/Empty')(b''); ch.close()")
    jobworker_cpu = lambda: peers._ticks(server.proc.pid, False) + peers._ticks(launcher)
    none = lambda: 0.0
    candidates = [   # name, one run, CPU of its long-lived processes, runs in this process
        ("jobworker API, channel open", api, jobworker_cpu, True),
        ("jobworker.pyz run --cpu 50% --memory 256M", process(run_true), jobworker_cpu, False),
        ("... the same through the mux", lambda i: subprocess.run(
            run_true, env=muxed, check=True, capture_output=True).stdout,
         lambda: jobworker_cpu() + mux_cpu(), False),
        ("Python floor: import grpc + one mTLS call", process(
            [sys.executable, "-c", floor_code, f"127.0.0.1:{bare.port}", f"{certs}/ca.crt",
             f"{certs}/bench.key", f"{certs}/bench.crt"]), none, False)]
    made = []
    try:
        for cls in peers.PEERS:
            try:
                made.append(cls(state_root, f"{PARENT}/tools"))   # (not the server's)
                candidates.append((made[-1].name, made[-1].run, made[-1].cpu, False))
            except Exception as e:   # (not installed: `make bench` installs them)
                print(f"    figure 21: {cls.name} not measured: {e}")
        walls = {c[0]: [] for c in candidates}
        cpus = {c[0]: 0.0 for c in candidates}
        usage = lambda who: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(who))
        import random
        shuffled = random.Random(21)
        for i in range(32):   # in an order of its own each round: each follows each alike
            for name, fn, served, here in shuffled.sample(candidates, len(candidates)):
                who = resource.RUSAGE_SELF if here else resource.RUSAGE_CHILDREN
                c0, t = usage(who) + served(), time.perf_counter()
                assert fn(i) == b"", name   # `true` writes nothing: all of its output came
                wall, spent = time.perf_counter() - t, usage(who) + served() - c0
                if i >= 2:
                    walls[name].append(wall)
                    cpus[name] += spent
    finally:
        for peer in made:
            peer.close()
        subprocess.run([sys.executable, pyz, "mux", "stop"], env=muxed, capture_output=True)
        ch.close()
        server.stop()
        bare.stop()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    runc = pct(walls["runc run"], 50) if "runc run" in walls else None
    targets = {"jobworker API, channel open": "<= 0.25x runc",
               "jobworker.pyz run --cpu 50% --memory 256M": "<= 2x runc",
               "... the same through the mux": "<= 2x runc"}
    for name, times in walls.items():
        p50, p99, cpu = pct(times, 50), pct(times, 99), cpus[name] / len(times) * 1000
        row(21, f"{name} (ms)", p50 * 1000, runc and runc * 1000, runc and p50 / runc,
            targets.get(name, "(vs runc)"))
        print(f"    p99 {p99 * 1000:.1f} ms, CPU {cpu:.1f} ms a run")
    floor = pct(walls["Python floor: import grpc + one mTLS call"], 50)
    ssh = pct(walls["ssh 127.0.0.1 true"], 50) if "ssh 127.0.0.1 true" in walls else None
    for how, key in (("", "jobworker.pyz run --cpu 50% --memory 256M"),
                     (" through the mux", "... the same through the mux")):
        cli = pct(walls[key], 50)
        row(21, f"CLI run{how}, vs the Python floor (ms)", cli * 1000, floor * 1000,
            cli / floor, "<= 1.2x")
        if ssh:
            row(21, f"CLI run{how}, vs ssh 127.0.0.1 true (ms)", cli * 1000, ssh * 1000,
                cli / ssh, "<= 0.3x")
    for name, why in peers.unavailable():
        print(f"    figure 21: {name}: not measured: {why}")


def finished_records(state, n):
    """n finished job records with empty output, as a server that ran n jobs leaves them."""
    import uuid
    store = jw.JobStore(state)
    store.open()
    for i in range(n):
        job_id = str(uuid.uuid4())
        store.create(job_id)
        for name in (jw.LOG_FILE, jw.INDEX_FILE):
            open(os.path.join(store.job_dir(job_id), name), "wb").close()
        store.save(jw.JobStatus(id=job_id, owner="bench", command=["true"], limits=jw.Limits(),
                                state=jw.EXITED, exit_code=0, started_at=1e9 + i,
                                ended_at=1e9 + i + 0.01))


def fig9(certs, state_root):
    """A server that has run for months: 20,000 finished jobs."""
    keep = ["--keep-finished", "100000", "--keep-for", "forever"]
    env = dict(os.environ, PYTHONPATH=HERE, JOBWORKER_CA=f"{certs}/ca.crt",
               JOBWORKER_CERT=f"{certs}/bench.crt", JOBWORKER_KEY=f"{certs}/bench.key")

    def list_walk(port):
        e = dict(env, JOBWORKER_SERVER=f"127.0.0.1:{port}")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "jobworker", "list"], env=e,
                           capture_output=True, check=True)
        return time.perf_counter() - t, r.stdout.count(b"\n") - 1

    empty = Serve(certs, os.path.join(state_root, "empty"), keep)
    try:
        list_walk(empty.port)
        floor_list = list_walk(empty.port)[0]
        time.sleep(1)
        rss0 = empty.stats()[1]
        floor_start = empty.ready_s
    finally:
        empty.stop()
    full_dir = os.path.join(state_root, "full")
    finished_records(full_dir, 20_000)
    full = Serve(certs, full_dir, keep)
    try:
        walk, n = list_walk(full.port)
        walk = min(walk, list_walk(full.port)[0])
        time.sleep(1)
        rss1 = full.stats()[1]
    finally:
        full.stop()
    row(9, "20,000 finished jobs: restart, exec to port (s)", full.ready_s, floor_start,
        full.ready_s / floor_start, "<= 3 s")
    row(9, "20,000 finished jobs: server RSS per job (B)", (rss1 - rss0) / 20_000, None, None,
        "<= 2 KB")
    row(9, f"20,000 finished jobs: CLI list walk, {n} rows (s)", walk, floor_list,
        walk / floor_list, "<= 2 s")

    # jobs that ran in this server: memory and disk per finished job with empty output
    runs = Serve(certs, os.path.join(state_root, "runs"), keep)
    try:
        pb = jw._pb()[0]
        ch, s = stub(certs, runs.port)
        true = pb.StartRequest(name="true")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: s.Start(true), range(200)))
            time.sleep(2)
            rss_a = runs.stats()[1]
            list(pool.map(lambda _: s.Start(true), range(2000)))
        while s.List(pb.ListRequest(states=[pb.JOB_STATE_RUNNING])).jobs:
            time.sleep(0.5)
        time.sleep(2)
        rss_b = runs.stats()[1]
        du = subprocess.run(["du", "-sk", os.path.join(state_root, "runs", "jobs")],
                            capture_output=True, text=True, check=True).stdout.split()[0]
        ch.close()
    finally:
        runs.stop()
    row(10, "2,000 jobs run: server RSS per finished job (B)", (rss_b - rss_a) / 2000, None,
        None, "<= 2 KB")
    row(10, "state dir per finished job, empty output (KB)", int(du) / 2200, None, None,
        "<= 8 KB")


INTERLEAVED = """
import os, sys, time
end, n = time.monotonic() + float(sys.argv[1]), 0
while True:
    for _ in range(1000):
        os.write(1, b"o"); os.write(2, b"e")
    n += 1000
    if time.monotonic() > end:
        break
"""


def proc_cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fig11(certs, state_root):
    """Output that switches between stdout and stderr at every byte, for 10 s."""
    pb = jw._pb()[0]
    server = Serve(certs, os.path.join(state_root, "interleaved"))
    try:
        ch, s = stub(certs, server.port)
        s.Start(pb.StartRequest(name="true"))            # warm up
        time.sleep(1)
        rss0 = server.stats()[1]
        fd = os.open(os.path.join(state_root, "interleaved", "launcher.lock"), os.O_RDONLY)
        launcher = jw._lock_holder(fd)[0]   # the process holding the launcher's lock
        os.close(fd)
        cpu0 = proc_cpu(launcher)
        job = s.Start(pb.StartRequest(name=sys.executable, args=["-c", INTERLEAVED, "10"])).job_id
        while s.Query(pb.QueryRequest(job_id=job)).status.state == pb.JOB_STATE_RUNNING:
            time.sleep(0.2)
        status = s.Query(pb.QueryRequest(job_id=job)).status
        launcher_cpu, writer_cpu = proc_cpu(launcher) - cpu0, status.usage.cpu_seconds
        rss1 = server.stats()[1]
        idx = os.path.getsize(os.path.join(state_root, "interleaved", "jobs", job, "output.idx"))
        switches = idx // 8
        rates = {}
        for batch in (True, False):
            t = time.perf_counter()
            n = 0
            for msg in s.Stream(pb.StreamRequest(job_id=job, batch=batch)):
                n += sum(len(d) for _, _, d in jw.output_pieces(pb, msg))
            rates[batch] = n / 1e6 / (time.perf_counter() - t)
        ch.close()
    finally:
        server.stop()
    row(11, f"interleaved output: {switches:,} switches, index on disk (MiB per 1M)",
        idx / switches * 1e6 / MiB, None, None, "<= 8 MiB")
    row(11, "  server RSS growth (MiB per 1M switches)", (rss1 - rss0) / switches * 1e6 / MiB,
        None, None, "<= 8 MiB")
    row(11, "  launcher CPU / writer CPU", launcher_cpu / writer_cpu, None, None, "<= 2x")
    row(11, "  follower, batched (MB/s)", rates[True], rates[False], rates[True] / rates[False],
        ">= 20 MB/s")


TICKER = "import time\nwhile True:\n    print(time.time_ns(), flush=True)\n    time.sleep(0.01)\n"


def fig12(certs, state_root):
    """A follower across a server restart (SIGKILL, then a new server on the same state dir):
    how long no output reaches it, and whether any is lost."""
    pb = jw._pb()[0]
    state = os.path.join(state_root, "restart")
    server = Serve(certs, state)
    ch, s = stub(certs, server.port)
    job = s.Start(pb.StartRequest(name=sys.executable, args=["-c", TICKER])).job_id
    got, offset = b"", 0
    call = s.Stream(pb.StreamRequest(job_id=job, batch=True))
    t_last = None
    try:
        for msg in call:
            for _, off, data in jw.output_pieces(pb, msg):
                got += data
                offset = off + len(data)
            t_last = time.monotonic()
            if len(got) > 2000:
                break
        server.proc.kill()
        server.proc.wait()
        for msg in call:     # the rest until the stream is cut
            for _, off, data in jw.output_pieces(pb, msg):
                got += data
                offset = off + len(data)
            t_last = time.monotonic()
    except jw._grpc().RpcError:
        pass
    ch.close()
    t_kill = time.monotonic()
    server = Serve(certs, state)
    restart = server.ready_s
    try:
        ch, s = stub(certs, server.port)
        call = s.Stream(pb.StreamRequest(job_id=job, offset=offset, batch=True))
        first = next(m for m in call if m.HasField("batch"))
        gap = time.monotonic() - t_last
        got += b"".join(d for _, _, d in jw.output_pieces(pb, first))
        call.cancel()
        s.Stop(pb.StopRequest(job_id=job, grace_seconds=0))
        whole = b"".join(d for m in s.Stream(pb.StreamRequest(job_id=job, batch=True))
                         for _, _, d in jw.output_pieces(pb, m))
        ch.close()
    finally:
        server.stop()
    intact = whole.startswith(got) and all(
        int(a) < int(b) for a, b in zip(whole.split()[:-1], whole.split()[1:]))
    row(12, f"follower across a server restart: no output for (s){' (lost bytes!)' if not intact else ''}",
        gap, restart, gap / restart, "(information)")
    print(f"    kill to new server accepting {time.monotonic() - t_kill:.2f} s; "
          f"every line kept, in order: {intact}")


def main():
    if os.geteuid() != 0:
        sys.exit("bench: run as root (jobs run in cgroups)")
    pyz = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "jobworker.pyz")
    print(f"jobworker benchmarks on {platform.node()}: {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, Linux {platform.release()}, "
          f"Python {platform.python_version()}, grpcio {jw._grpc().__version__}")
    print(f"{'#':>2}  {'figure':<46} {'value':>12} {'floor':>12} {'ratio':>7}  target")
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="jwbench-")
    certs = os.path.join(tmp, "certs")
    jw.certs_init(certs)
    jw.certs_issue(certs, "bench", ["admin"])
    # BENCH_FIGS=1,3,7 runs only those figures (each function's first number decides)
    only = {int(f) for f in os.environ.get("BENCH_FIGS", "").split(",") if f.strip()}
    want = lambda fn: not only or int(fn.__name__[3:].split("_")[0]) in only
    try:   # the state and the cgroup parent go, whichever figure fails
        server = Serve(certs, os.path.join(tmp, "main"))
        bare = Bare(certs)
        try:
            for fn, args in ((fig1_2, (certs, server, bare)),
                             (fig3_4, (certs, server, bare, tmp)), (fig5, (certs, server, bare)),
                             (fig7, (certs, server, bare, pyz)),
                             (fig16_17, (certs, server, bare))):
                if want(fn):
                    fn(*args)
        finally:
            server.stop()
            bare.stop()
        for fn in (fig6_8, fig9, fig11, fig12, fig13, fig15, fig18, fig19, fig20):
            if want(fn):
                fn(certs, tmp)
        if want(fig21):
            fig21(certs, tmp, pyz)
        if want(fig14):
            fig14(pyz, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        jw.detect_cgroups(PARENT).remove_parent()
        import peers
        peers.remove_cgroups(PARENT)   # (what runc and libcgroup made in the other hierarchies)
    print(f"done in {time.monotonic() - t0:.0f} s")
    with open(os.path.join(HERE, "bench", "results.json"), "w") as f:
        json.dump({"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                               "python": platform.python_version()}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
