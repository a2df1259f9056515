#!/usr/bin/env python3
"""The transport's floor for bench/run.py: a grpc server with jobworker's mutual TLS setup and
nothing else. Prints its port, then serves until its stdin closes.

    python3 bench/bare_server.py CERTS_DIR

bench.Bare/Empty answers b""; bench.Bare/Stream takes struct "!II" (size, count) and sends
count messages of size bytes; bench.Bare/Sink (client streaming) reads every message and answers
their total size as struct "!Q"; bench.Bare/Echo (bidirectional) sends back each message.
"""

import concurrent.futures
import os
import struct
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import jobworker as jw  # noqa: E402


def empty(request, context):
    return b""


def stream(request, context):
    size, count = struct.unpack("!II", request)
    msg = b"x" * size
    for _ in range(count):
        yield msg


def sink(requests, context):
    return struct.pack("!Q", sum(len(m) for m in requests))


def echo(requests, context):
    for m in requests:
        yield m


def main(certs):
    grpc = jw._grpc()
    pems = [open(os.path.join(certs, n), "rb").read()
            for n in ("ca.crt", "server.crt", "server.key")]
    handler = grpc.method_handlers_generic_handler("bench.Bare", {
        "Empty": grpc.unary_unary_rpc_method_handler(empty),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
        "Echo": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(300))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", jw.ServerTLS(*pems).credentials())
    server.start()
    print(port, flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main(sys.argv[1])
