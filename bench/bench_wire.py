"""Round-trip latency of the data plane against raw pyzmq, across two processes.

    .venv/bin/python bench/bench_wire.py [--iters 2000 300] [--out bench/results/bench_wire.json]

A client process (this one) talks to echo servers in spawned processes over tcp on 127.0.0.1:

- ``raw``          DEALER sends one bytes frame, ROUTER echoes it back (pyzmq defaults: copies);
- ``raw-nocopy``   the same with ``copy=False`` on both ends;
- ``raw-msgpack``  the protocol's floor without the project's code: a msgpack header and a raw
                   frame, ``copy=False``, ``unpackb`` + ``np.frombuffer`` on both ends, no
                   validation;
- ``ndpmoe``       the project's dispatch path, in its real topology: the scheduler's
                   :class:`actors.scheduler.Dispatcher` on a bound ``ZmqRouter`` calls a device
                   actor's :class:`actors.devices.DeviceServer` loop on a ``ZmqDealer`` (an echo
                   device): ``wire.encode`` task + array frame, send, recv, ``wire.decode``,
                   handle, ``wire.encode`` the result with the array, back, ``wire.decode``;

Modes alternate iteration by iteration, so that noise from a shared machine hits all alike.
Payloads are 4 KiB and 1 MiB of float32. Target: ``ndpmoe`` median <= 1.5x the faster raw one.

At small payloads the Python on both ends dominates: a process woken by a message runs its
first microseconds with cold caches (~3-4x slower than a hot loop on the development machine),
so each encode/decode costs ~10-20 us in place against ~4 us in a micro-benchmark.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
from pathlib import Path

import msgpack
import numpy as np
import zmq
from rich.console import Console
from rich.table import Table

from actors.clock import wall_now
from actors.scheduler import Dispatcher
from actors.transport import ZmqDealer, ZmqRouter
from actors.wire import encode
from cluster.errors import EmulationError

PAYLOADS = {"4KiB": 4 * 1024, "1MiB": 1024 * 1024}
MODES = ("raw", "raw-nocopy", "raw-msgpack", "ndpmoe")
RAW_MODES = ("raw", "raw-nocopy")
TARGET_RATIO = 1.5
STOP = b"stop"
RECV_TIMEOUT_S = 30.0


def _raw_server(conn, copy: bool) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT_S * 1000))
    sock.bind("tcp://127.0.0.1:*")
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        while True:
            frames = sock.recv_multipart(copy=copy)
            if (frames[1] if copy else frames[1].bytes) == STOP:
                break
            sock.send_multipart(frames, copy=copy)
    except zmq.Again:
        pass
    finally:
        sock.close(linger=0)
        ctx.term()


def _msgpack_server(conn) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT_S * 1000))
    sock.bind("tcp://127.0.0.1:*")
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        while True:
            peer, head, *rest = sock.recv_multipart(copy=False)
            h = msgpack.unpackb(head.buffer)
            if h["t"] == "shutdown":
                break
            arr = np.frombuffer(rest[0].buffer, dtype=h["arrays"][0][0])
            reply = {"v": 1, "t": "result", "arrays": h["arrays"], "task_id": h["task_id"]}
            sock.send_multipart([peer, msgpack.packb(reply), arr], copy=False)
    except zmq.Again:
        pass
    finally:
        sock.close(linger=0)
        ctx.term()


class _EchoDevice:
    """A device whose work is nothing: replies with the array it was sent."""

    def handle(self, msg):
        return encode("result", {"task_id": msg.fields["task_id"], "done_s": 0.0}, msg.arrays)


def _own_server(conn, endpoint: str) -> None:
    """A device actor's side: a DEALER served by the project's DeviceServer loop."""
    from actors.devices import DeviceServer

    with ZmqDealer(b"ndp0", router_id=b"sched") as dealer:
        dealer.connect(endpoint)
        conn.send(endpoint)
        DeviceServer(_EchoDevice(), dealer).serve()


def _start(ctx: mp.context.BaseContext, target, *args):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    if not parent.poll(60):
        proc.kill()
        raise RuntimeError(f"{target.__name__} did not report its endpoint")
    return proc, parent.recv()


class _RawClient:
    def __init__(self, ctx: zmq.Context, endpoint: str, copy: bool) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT_S * 1000))
        self.sock.connect(endpoint)
        self.copy = copy

    def round_trip(self, payload: bytes, _arr: np.ndarray, _i: int) -> None:
        self.sock.send(payload, copy=self.copy)
        self.sock.recv(copy=self.copy)

    def stop(self) -> None:
        self.sock.send(STOP)
        self.sock.close(linger=100)


class _MsgpackClient(_RawClient):
    def round_trip(self, _payload: bytes, arr: np.ndarray, i: int) -> None:
        head = {"v": 1, "t": "task", "arrays": [["float32", [arr.size]]], "task_id": i}
        self.sock.send_multipart([msgpack.packb(head), arr], copy=False)
        rhead, data = self.sock.recv_multipart(copy=False)
        h = msgpack.unpackb(rhead.buffer)
        if h["task_id"] != i or np.frombuffer(data.buffer, dtype=np.float32).size != arr.size:
            raise RuntimeError(f"echo {i} came back wrong: {h}")

    def stop(self) -> None:
        self.sock.send_multipart([msgpack.packb({"t": "shutdown"})])
        self.sock.close(linger=100)


class _OwnClient:
    """The scheduler's side: a bound ROUTER and the scheduler's own :class:`Dispatcher`."""

    def __init__(self) -> None:
        self.router = ZmqRouter()
        self.endpoint = self.router.bind()
        self.net = Dispatcher(self.router, RECV_TIMEOUT_S)

    def connected(self) -> None:
        deadline = wall_now() + 30
        while True:
            try:
                self.net.ping(b"ndp0", 3)
                return
            except EmulationError:
                if wall_now() > deadline:
                    raise

    def round_trip(self, _payload: bytes, arr: np.ndarray, i: int) -> None:
        msg = self.net.call(b"ndp0", {"kind": "echo", "start_s": 0.0}, [arr], "echo")
        if msg.arrays[0].nbytes != arr.nbytes:
            raise RuntimeError(f"echo {i} came back wrong: {msg.fields}")

    def stop(self) -> None:
        self.router.send(b"ndp0", encode("shutdown", {}))
        self.router.close()


def run(iters: dict[str, int]) -> list[dict]:
    spawn = mp.get_context("spawn")
    procs, clients = [], {}
    zctx = zmq.Context()
    try:
        for mode in MODES:
            if mode.startswith("ndpmoe"):
                client = _OwnClient()
                proc, _ = _start(spawn, _own_server, client.endpoint)
                client.connected()
                clients[mode] = client
            elif mode == "raw-msgpack":
                proc, endpoint = _start(spawn, _msgpack_server)
                clients[mode] = _MsgpackClient(zctx, endpoint, copy=False)
            else:
                proc, endpoint = _start(spawn, _raw_server, mode == "raw")
                clients[mode] = _RawClient(zctx, endpoint, copy=mode == "raw")
            procs.append(proc)

        rows = []
        for label, nbytes in PAYLOADS.items():
            arr = np.arange(nbytes // 4, dtype=np.float32)
            payload = arr.tobytes()
            n = iters[label]
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for i in range(n + max(20, n // 10)):  # the first n // 10 are warm-up
                for mode in MODES:
                    t0 = wall_now()
                    clients[mode].round_trip(payload, arr, i)
                    if i >= max(20, n // 10):
                        times[mode].append(wall_now() - t0)
            best_raw = min(statistics.median(times[m]) for m in RAW_MODES)
            floor = statistics.median(times["raw-msgpack"])
            for mode in MODES:
                ts = sorted(times[mode])
                med = statistics.median(ts)
                rows.append(
                    {
                        "payload": label,
                        "payload_bytes": nbytes,
                        "mode": mode,
                        "iterations": len(ts),
                        "median_us": med * 1e6,
                        "p90_us": ts[int(0.9 * (len(ts) - 1))] * 1e6,
                        "p99_us": ts[int(0.99 * (len(ts) - 1))] * 1e6,
                        "ratio_to_best_raw": med / best_raw,
                        "ratio_to_raw_msgpack": med / floor,
                    }
                )
        return rows
    finally:
        for client in clients.values():
            client.stop()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        zctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", nargs=2, type=int, default=[2000, 300], metavar=("N_4KIB", "N_1MIB"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/bench_wire.json"))
    args = ap.parse_args()

    rows = run(dict(zip(PAYLOADS, args.iters)))

    table = Table(title="wire round trip, two processes, tcp 127.0.0.1 (medians)")
    # "x raw": against the faster raw pyzmq mode; "x floor": against raw-msgpack
    for col in ("payload", "mode", "n", "median us", "p90 us", "p99 us", "x raw", "x floor"):
        table.add_column(
            col, justify="left" if col in ("payload", "mode") else "right", no_wrap=True
        )
    for r in rows:
        ratio = f"{r['ratio_to_best_raw']:.2f}"
        if r["mode"] == "ndpmoe":
            ok = r["ratio_to_best_raw"] <= TARGET_RATIO
            ratio = f"[{'green' if ok else 'red'}]{ratio}[/]"
        table.add_row(
            r["payload"],
            r["mode"],
            str(r["iterations"]),
            f"{r['median_us']:.0f}",
            f"{r['p90_us']:.0f}",
            f"{r['p99_us']:.0f}",
            ratio,
            f"{r['ratio_to_raw_msgpack']:.2f}",
        )
    console = Console(width=max(100, Console().width))
    console.print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "wire round trip",
        "target_ratio_to_best_raw": TARGET_RATIO,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pyzmq": zmq.pyzmq_version(),
            "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)),
            "numpy": np.__version__,
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
