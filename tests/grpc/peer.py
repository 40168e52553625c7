"""A real gRPC peer (grpcio, not ours) for the router's interop test.

    peer.py serve NAME PORT [MODE]   # generic service answering with its pod name
        MODE: broken (every unary call fails at once with UNAVAILABLE, as a pod
        with a dead database), broken-for=SECONDS (broken, then well),
        slow=MS (every unary call takes MS milliseconds more)
    peer.py client ADDR RPCS         # one channel: unary, server-, client-streaming, bidi
    peer.py load ADDR SECONDS INFLIGHT  # one channel, INFLIGHT unary RPCs at all times
    peer.py streams ADDR N SECONDS KEEPALIVE_MS  # one channel with client keepalive
                                     # (time = timeout = KEEPALIVE_MS), N bidi streams each
                                     # sending a message every 0.3 s: per stream its pod,
                                     # how it ended and when (s from the start)
    peer.py metadata ADDR KIB...     # one channel, one unary RPC per size with one
                                     # metadata field of KIB KiB; then one small RPC

Servers accept header lists up to 16 MiB, grpc-go's default (grpcio's own is 8 KiB).

No .proto needed: methods use raw bytes. The client prints one JSON line:
per-pod counts per RPC kind, errors, and whether streamed data came back intact.
"""
import json
import sys
from concurrent import futures

import grpc

SERVICE = "lbt.Echo"


def serve(name, port, mode=""):
    import time

    # broken-for counts from the first call, not from the start.
    started = []
    broken_for = None
    slow = 0.0
    if mode == "broken":
        broken_for = float("inf")
    elif mode.startswith("broken-for="):
        broken_for = float(mode.split("=", 1)[1])
    elif mode.startswith("slow="):
        slow = float(mode.split("=", 1)[1]) / 1000.0

    def unary(req, ctx):
        if not started:
            started.append(time.monotonic())
        if broken_for is not None and time.monotonic() - started[0] < broken_for:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is broken")
        if slow:
            time.sleep(slow)
        ctx.set_trailing_metadata((("x-pod", name),))
        return name.encode()

    def server_stream(req, ctx):
        n = int(req.decode() or "0")
        for i in range(n):
            yield f"{name}:{i}".encode()

    def client_stream(it, ctx):
        total = sum(len(m) for m in it)
        return f"{name}:{total}".encode()

    def bidi(it, ctx):
        for m in it:
            yield name.encode() + b":" + m

    def fail(req, ctx):
        ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{name} refuses")

    def meta(req, ctx):
        size = sum(len(v) for k, v in ctx.invocation_metadata() if k == "x-big")
        return str(size).encode()

    ident = lambda b: b  # noqa: E731
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, ident, ident),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, ident, ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
        "Meta": grpc.unary_unary_rpc_method_handler(meta, ident, ident),
    }
    limit = 16 << 20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_metadata_size", limit), ("grpc.absolute_max_metadata_size", limit)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def client(addr, rpcs):
    out = {"unary": {}, "server_stream": {}, "client_stream": {}, "bidi": {}, "errors": [], "intact": True}
    # One channel = one HTTP/2 connection; no client-side balancing.
    with grpc.insecure_channel(addr) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Unary")
        sstream = ch.unary_stream(f"/{SERVICE}/ServerStream")
        cstream = ch.stream_unary(f"/{SERVICE}/ClientStream")
        bidi = ch.stream_stream(f"/{SERVICE}/Bidi")
        fail = ch.unary_unary(f"/{SERVICE}/Fail")

        def bump(kind, pod):
            out[kind][pod] = out[kind].get(pod, 0) + 1

        for _ in range(rpcs):
            try:
                bump("unary", unary(b"hi", timeout=10).decode())
            except grpc.RpcError as e:
                out["errors"].append(f"unary {e.code()}")
        for _ in range(max(1, rpcs // 25)):
            try:
                msgs = [m.decode() for m in sstream(b"50", timeout=10)]
                pod = msgs[0].split(":")[0]
                out["intact"] &= msgs == [f"{pod}:{i}" for i in range(50)]
                bump("server_stream", pod)
            except grpc.RpcError as e:
                out["errors"].append(f"server_stream {e.code()}")
            try:
                chunks = [bytes([i % 251]) * 65536 for i in range(16)]
                pod, total = cstream(iter(chunks), timeout=10).decode().split(":")
                out["intact"] &= int(total) == 16 * 65536
                bump("client_stream", pod)
            except grpc.RpcError as e:
                out["errors"].append(f"client_stream {e.code()}")
            try:
                sent = [f"m{i}".encode() for i in range(20)]
                got = [m.decode() for m in bidi(iter(sent), timeout=10)]
                pod = got[0].split(":")[0]
                out["intact"] &= got == [f"{pod}:m{i}" for i in range(20)]
                bump("bidi", pod)
            except grpc.RpcError as e:
                out["errors"].append(f"bidi {e.code()}")
        try:
            fail(b"x", timeout=10)
            out["errors"].append("Fail did not fail")
        except grpc.RpcError as e:
            out["fail_status"] = str(e.code())
            out["fail_details"] = e.details()
    print(json.dumps(out), flush=True)


def metadata(addr, sizes):
    """One channel; per size, one unary RPC with a metadata field of that
    many KiB: its status and the size the pod saw. Then a small RPC on the
    same channel (was the connection kept?)."""
    limit = 16 << 20
    opts = [("grpc.max_metadata_size", limit), ("grpc.absolute_max_metadata_size", limit)]
    out = {"calls": [], "after": None}
    with grpc.insecure_channel(addr, options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        call = ch.unary_unary(f"/{SERVICE}/Meta")
        for kib in sizes:
            value = "v" * (kib * 1024)
            try:
                seen = int(call(b"", metadata=(("x-big", value),), timeout=10).decode())
                out["calls"].append({"kib": kib, "code": "OK", "seen": seen})
            except grpc.RpcError as e:
                out["calls"].append({"kib": kib, "code": e.code().name, "seen": 0})
        try:
            call(b"", timeout=10)
            out["after"] = "OK"
        except grpc.RpcError as e:
            out["after"] = e.code().name
    print(json.dumps(out), flush=True)


def streams(addr, n, seconds, keepalive_ms):
    import threading
    import time

    opts = [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    start = time.monotonic()
    out = [{"pod": None, "code": None, "at": None, "messages": 0} for _ in range(n)]
    with grpc.insecure_channel(addr, options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        bidi = ch.stream_stream(f"/{SERVICE}/Bidi")

        def one(i):
            stop = start + seconds

            def requests():
                while time.monotonic() < stop:
                    yield b"m"
                    time.sleep(0.3)

            try:
                for reply in bidi(requests(), timeout=seconds + 30):
                    out[i]["pod"] = reply.split(b":")[0].decode()
                    out[i]["messages"] += 1
                out[i]["code"] = "OK"
            except grpc.RpcError as e:
                out[i]["code"] = e.code().name
            out[i]["at"] = round(time.monotonic() - start, 3)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        print(json.dumps({"started": True}), flush=True)
        for t in threads:
            t.join()
    print(json.dumps({"streams": out}), flush=True)


def load(addr, seconds, inflight):
    """Unary RPCs on one channel, `inflight` at all times, for `seconds`.

    Prints one JSON line: per 100 ms bucket, the RPCs each pod answered and
    the failures; every failure with its time and code; the total.
    """
    import threading
    import time

    lock = threading.Lock()
    buckets = {}
    failures = []
    start = time.monotonic()
    # Started (so timed) only once the channel is ready.
    with grpc.insecure_channel(addr) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        unary = ch.unary_unary(f"/{SERVICE}/Unary")
        start = time.monotonic()
        print("started", flush=True)

        def worker():
            while True:
                t = time.monotonic() - start
                if t >= seconds:
                    return
                try:
                    pod = unary(b"hi", timeout=10).decode()
                    err = None
                except grpc.RpcError as e:
                    pod, err = None, str(e.code())
                done = time.monotonic() - start
                b = str(int(done * 10))
                with lock:
                    row = buckets.setdefault(b, {})
                    key = pod if err is None else "failed"
                    row[key] = row.get(key, 0) + 1
                    if err is not None:
                        failures.append([round(done * 1000), err])

        threads = [threading.Thread(target=worker) for _ in range(inflight)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    ok = sum(n for row in buckets.values() for k, n in row.items() if k != "failed")
    print(json.dumps({"buckets": buckets, "failures": failures, "ok": ok}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "streams":
        streams(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "metadata":
        metadata(sys.argv[2], [int(k) for k in sys.argv[3:]])
    elif sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    elif sys.argv[1] == "load":
        load(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    else:
        client(sys.argv[2], int(sys.argv[3]))
