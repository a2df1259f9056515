#!/usr/bin/env python3
"""The spawn floor for bench/run.py: fork, join a job's cgroups, exec /bin/true and wait, with
nothing of jobworker's around it. It joins them as the launcher does, the fastest way the
kernel offers: created in the cgroup2 dir by clone3 where it can, "0" into v1 tasks files. Prints {"times": seconds of each round, "span": [first round's
start, last round's end] (perf_counter: one clock for every process, so runs side by side
give their joint rate), "cpu": [CPU seconds of the loop itself, of its children]} as JSON.

    python3 bench/fork_floor.py CGROUP_PARENT ROUNDS joined|fresh

joined: every round joins one cgroup made with limits beforehand; fresh: every round first
makes a new cgroup with limits, as Start does.
"""

import ctypes
import json
import os
import resource
import sys
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import jobworker as jw  # noqa: E402


def main(parent, rounds, mode):
    driver = jw.detect_cgroups(parent)
    driver.setup()
    fresh = mode == "fresh"
    limits, disks = jw.parse_limits("50%", "256M", "10MB/s", "1024"), jw.block_devices()
    cg = driver.job(str(uuid.uuid4()))
    cg.create()
    cg.set_limits(limits, disks)
    times = []
    own, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    libc = ctypes.CDLL(None, use_errno=True)
    began = time.perf_counter()
    for _ in range(rounds):
        t = time.perf_counter()
        if fresh:
            cg.remove()
            cg = driver.job(str(uuid.uuid4()))
            cg.create()
            cg.set_limits(limits, disks)
        into = os.open(cg.clone_into, os.O_RDONLY | os.O_DIRECTORY) if cg.clone_into else None
        pid = jw._clone_into(libc, into) if into is not None else os.fork()
        if pid == 0:
            try:
                me = str(os.getpid()).encode()
                for path in cg.procs_files:
                    if into is None or path != f"{cg.clone_into}/cgroup.procs":
                        fd = os.open(path, os.O_WRONLY)
                        os.write(fd, b"0" if path.endswith("/tasks") else me)
                        os.close(fd)
                os.execv("/bin/true", ["true"])
            finally:
                os._exit(127)   # the child never returns into the loop, even on error
        if into is not None:
            os.close(into)
        os.waitpid(pid, 0)
        times.append(time.perf_counter() - t)
    ended = time.perf_counter()
    cpu = [sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
           for before, after in ((own, resource.getrusage(resource.RUSAGE_SELF)),
                                 (kids, resource.getrusage(resource.RUSAGE_CHILDREN)))]
    cg.remove()
    print(json.dumps({"times": times, "span": [began, ended], "cpu": cpu}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
