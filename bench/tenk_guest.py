"""Figure 14 of bench/run.py, run inside the cgroup v2 guest (`v2_guest.py --program
bench/tenk_guest.py`): JOBWORKER_BENCH_JOBS (10,000) `sleep` jobs running at once, on a kernel
where root may raise its open-files limit (the benchmark's host may not let it).

Starts `jobworker.pyz serve` as the checks do, starts the jobs from 8 threads over mutual TLS
(grpc and jobworker imported from the pyz's cache), and measures Query p50 with one job and
with all of them, and the server's RSS, threads and open files at 100 jobs and with all of them
(the launcher's too). Prints the figures as JSON between JWGUEST-RESULT-BEGIN and -END, as the
checks do; asserts nothing.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import v2_guest_checks as g   # beside this file in the guest: its helpers and settings

JOBS = int(os.environ.get("JOBWORKER_BENCH_JOBS", "10000"))   # from the kernel command line
figures = {}
progress = []   # one entry per job started


def proc_status(pid):
    """(RSS bytes, threads, open files) of a process."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return (int(status["VmRSS"].split()[0]) * 1024, int(status["Threads"]),
            len(os.listdir(f"/proc/{pid}/fd")))


def launcher_pid():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"launcher_main" in f.read():
                    return int(pid)
        except OSError:
            continue
    return None


def mem_available():
    """MemAvailable of the guest, kB."""
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1])


def why(tail=1200):
    """What the guest says after a failure: the server's log and the kernel's, their ends."""
    kernel = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return (f"{len(progress)} jobs started; {mem_available()} kB available; server log: "
            f"{open('/tmp/serve.log').read()[-tail:]} kernel: {kernel[-tail:]}")


def p50(call, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def client():
    """(jobworker module, grpc stub) from the pyz's extracted packages."""
    (build,) = [d for d in os.listdir(g.ENV["JOBWORKER_CACHE_DIR"]) if not d.startswith(".")]
    sys.path.insert(0, os.path.join(g.ENV["JOBWORKER_CACHE_DIR"], build))
    import jobworker
    grpc = jobworker._grpc()
    read = lambda name: open(f"/tmp/certs/{name}", "rb").read()
    creds = grpc.ssl_channel_credentials(read("ca.crt"), read("client.key"), read("client.crt"))
    channel = grpc.secure_channel(g.ENV["JOBWORKER_SERVER"], creds)
    return jobworker, jobworker._pb()[1].JobServiceStub(channel)


def run():
    g.jw("certs", "init", "/tmp/certs")
    g.jw("certs", "issue", "/tmp/certs", "client", "--role", "admin")
    os.mkdir(g.SERVICE)
    server = g.start_server("/tmp/serve.log", options=f"--max-jobs {JOBS + 100} "
                            f"--max-jobs-per-owner {JOBS + 100}")
    if server is None:
        g.check("server_starts", False, open("/tmp/serve.log").read()[-800:])
        return
    jw, stub = client()
    pb = jw._pb()[0]
    sleeper = pb.StartRequest(name="sleep", args=["3600"])

    def start_one(i):
        stub.Start(sleeper, timeout=600)
        progress.append(i)
        if len(progress) % 1000 == 0:
            print(f"JWPROGRESS {len(progress)} started, {mem_available()} kB available",
                  flush=True)
    first = stub.Start(sleeper).job_id
    query = lambda: stub.Query(pb.QueryRequest(job_id=first))
    p50(query, 50)
    idle_q = p50(query, 300)
    start = lambda n: sum(1 for _ in pool.map(start_one, range(n)))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = start(99)   # the floor: 100 jobs, and the server's threads for 8 clients
        time.sleep(1)
        rss0, threads0, fds0 = proc_status(server.pid)
        t = time.monotonic()
        started += start(JOBS - 100)
        took = time.monotonic() - t
    time.sleep(5)
    running, token = 0, ""
    while True:
        page = stub.List(pb.ListRequest(states=[pb.JOB_STATE_RUNNING], page_size=1000,
                                        page_token=token))
        running += len(page.jobs)
        token = page.next_page_token
        if not token:
            break
    busy_q = p50(query, 300)
    rss1, threads1, fds1 = proc_status(server.pid)
    launcher = launcher_pid()
    lrss, _, lfds = proc_status(launcher) if launcher else (0, 0, 0)
    avail = mem_available()
    figures.update({
        "jobs": JOBS, "running": running, "start_seconds": round(took, 1),
        "query_idle_ms": idle_q * 1000, "query_busy_ms": busy_q * 1000,
        "server_rss_100": rss0, "server_rss": rss1, "server_threads_100": threads0,
        "server_threads": threads1, "server_fds_100": fds0, "server_fds": fds1,
        "launcher_rss": lrss, "launcher_fds": lfds, "guest_mem_available_kb": avail})
    g.check("all_running", running == JOBS and started == JOBS - 1,
            f"{running} of {JOBS} running after {took:.0f} s")
    t = time.monotonic()
    server.send_signal(signal.SIGTERM)
    code = server.wait(1200)
    figures["stop_seconds"] = round(time.monotonic() - t, 1)
    g.check("server_sigterm_exit_0", code == 0, f"exit {code} after {figures['stop_seconds']} s")


def main():
    try:
        run()
    except Exception:
        import traceback
        g.check("harness", False, f"{traceback.format_exc()[-800:]} {why()}")
    print("JWGUEST-RESULT-BEGIN")
    print(json.dumps({"checks": g.results, "figures": figures,
                      "seconds": round(time.monotonic() - g.t_begin, 1)}))
    print("JWGUEST-RESULT-END", flush=True)


if __name__ == "__main__":
    main()
