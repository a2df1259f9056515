#!/usr/bin/env python3
"""Hostile clients of a shared server, for the tests and bench/run.py: what one user of a host
can do to every other user of the same jobworker server.

    python3 bench/attackers.py never-send PORT CERTS NAME COUNT HOLD
        COUNT calls of Query, each with a request stream that never sends its message, held
        for at most HOLD seconds (grpc's unary handlers wait for the message in a thread).
    python3 bench/attackers.py connect PORT COUNT HOLD [SOURCE]
        COUNT TCP connections from SOURCE (default 127.0.0.1) that send no byte, held for
        HOLD seconds unless the server closes them first.
    python3 bench/attackers.py slow-http PORT COUNT HOLD [EVERY]
        COUNT connections to an HTTP port that send "GET /metrics HTTP/1.1" and then one byte
        of a header every EVERY seconds (default 5), for HOLD seconds.
    python3 bench/attackers.py churn PORT SECONDS
        TCP connections opened and closed at once, without a byte, as fast as they go, for
        SECONDS.

Each prints "ready" once its connections or calls are open, then, when it is done, one JSON
object: what the server did to them (how many it ended or closed, and when).
"""

import asyncio
import json
import os
import resource
import selectors
import socket
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def never_send(port, certs, name, count, hold):
    """{code name: count} of how the calls ended, and when the last one did (seconds)."""
    sys.path.insert(0, REPO)
    import jobworker as jw
    grpc = jw._grpc()
    pb, _ = jw._pb()

    async def attack():
        read = lambda n: open(os.path.join(certs, n), "rb").read()
        creds = grpc.ssl_channel_credentials(read("ca.crt"), read(f"{name}.key"),
                                             read(f"{name}.crt"))
        never = asyncio.Event()

        async def nothing():
            await never.wait()
            yield pb.QueryRequest()

        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            query = channel.stream_unary(f"/{jw.SERVICE_NAME}/Query",
                                         request_serializer=pb.QueryRequest.SerializeToString,
                                         response_deserializer=pb.QueryResponse.FromString)
            began = time.monotonic()
            calls = [query(nothing()) for _ in range(count)]
            # the first calls have reached the server (the rest may wait for the server's
            # HTTP/2 stream limit of the connection)
            await asyncio.gather(*(c.wait_for_connection() for c in calls[:100]),
                                 return_exceptions=True)
            print("ready", flush=True)
            ended = await asyncio.wait_for(asyncio.gather(*(_code(c) for c in calls)), hold)
            codes = {}
            for code, _ in ended:
                codes[code] = codes.get(code, 0) + 1
            return {"codes": codes, "last_ended": max(t for _, t in ended) - began}

    async def _code(call):
        try:
            await call
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        return code, time.monotonic()

    return asyncio.run(attack())


def connect(port, count, hold, source="127.0.0.1"):
    """How many connections could be opened, how many the server closed within `hold`
    seconds, and when it closed them (seconds after they were opened: median and last)."""
    _raise_nofile()
    sel = selectors.DefaultSelector()
    opened = failed = 0
    began = time.monotonic()
    for _ in range(count):
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            failed += 1
            break
        s.setblocking(False)
        s.bind((source, 0))
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            failed += 1
            s.close()
            continue
        sel.register(s, selectors.EVENT_READ, time.monotonic())
        opened += 1
    print("ready", flush=True)
    closed = []
    deadline = time.monotonic() + hold
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            try:
                gone = key.fileobj.recv(1) == b""
            except BlockingIOError:
                continue
            except OSError:
                gone = True
            if gone:
                closed.append(time.monotonic() - key.data)
                sel.unregister(key.fileobj)
                key.fileobj.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    closed.sort()
    return {"opened": opened, "failed": failed, "closed": len(closed),
            "open_for_median": closed[len(closed) // 2] if closed else None,
            "open_for_max": closed[-1] if closed else None,
            "opening_took": time.monotonic() - began - hold}


def slow_http(port, count, hold, every=5.0):
    """How many of the slow connections the server closed, and after how long at most (a
    close is looked for twice a second)."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        s.setblocking(False)
        socks.append([s, time.monotonic(), None])
    print("ready", flush=True)
    began = last_byte = time.monotonic()
    while time.monotonic() - began < hold and any(e[2] is None for e in socks):
        time.sleep(min(0.5, every))
        send = time.monotonic() - last_byte >= every
        for entry in socks:
            if entry[2] is not None:
                continue
            try:
                gone = entry[0].recv(1) == b""
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if not gone and send:
                try:
                    entry[0].send(b"X")
                except OSError:
                    gone = True
            if gone:
                entry[2] = time.monotonic() - entry[1]
        if send:
            last_byte = time.monotonic()
    for entry in socks:
        entry[0].close()
    ended = [e[2] for e in socks if e[2] is not None]
    return {"closed": len(ended), "open_for_max": max(ended) if ended else None}


def churn(port, seconds):
    """How many connections were opened (and closed) in `seconds`."""
    print("ready", flush=True)
    opened, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            opened += 1
        except OSError:
            pass
    return {"opened": opened}


def main(argv):
    kind, args = argv[0], argv[1:]
    if kind == "never-send":
        port, certs, name, count, hold = args
        result = never_send(int(port), certs, name, int(count), float(hold))
    elif kind == "connect":
        result = connect(int(args[0]), int(args[1]), float(args[2]), *args[3:4])
    elif kind == "slow-http":
        result = slow_http(int(args[0]), int(args[1]), float(args[2]), *map(float, args[3:4]))
    elif kind == "churn":
        result = churn(int(args[0]), float(args[1]))
    else:
        raise SystemExit(f"unknown attack {kind!r}: never-send, connect, slow-http or churn")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
