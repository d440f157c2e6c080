"""Data-plane latency against raw pyzmq, across processes: the dispatch round trip, the link
hop, and what CURVE costs on each.

    .venv/bin/python bench/bench_wire.py [--iters 2000 300] [--out bench/results/bench_wire.json]

Everything runs over tcp on 127.0.0.1, one spawned process per server, this process the client.

Round trip, scheduler -> device -> scheduler:

- ``raw``          DEALER sends one bytes frame, ROUTER echoes it back (pyzmq defaults: copies);
- ``raw-nocopy``   the same with ``copy=False`` on both ends;
- ``raw-msgpack``  the protocol's floor without the project's code: a msgpack header and a raw
                   frame, ``copy=False``, ``unpackb`` + ``np.frombuffer`` on both ends, no
                   validation;
- ``ndpmoe``       the project's dispatch path, in its real topology: the scheduler's
                   :class:`actors.dispatcher.Dispatcher` on a bound ``ZmqRouter`` calls a device
                   actor's :class:`actors.device_server.DeviceServer` loop on a ``ZmqDealer`` (an echo
                   device): ``wire.encode`` task + array frame, send, recv, ``wire.decode``,
                   handle, ``wire.encode`` the result with the array, back, ``wire.decode``;
- ``ndpmoe-curve`` the same with CURVE on the socket pair (``emulate.curve``, the default).

Link hop, device -> link -> device, and back (two hops per sample):

- ``fwd-raw``      a DEALER (this process) sends a msgpack header + raw frame to a ROUTER whose
                   minimal forwarder (another process: recv, swap the identity, send) hands it
                   to a second DEALER (a third process), which sends it back the same way;
- ``fwd-wire``     the same forwarder with the project's codec at both ends (``wire.encode`` /
                   ``decode``, as below): what the link actor's own work adds is ``link`` over
                   this;
- ``link``         the same path with the project's code at every step: the "GPU" here sends a
                   ``data`` activation (``wire.encode``) to the link actor's ROUTER served by the
                   real :class:`actors.link.LinkServer` / ``HostLink`` loop (checks, the
                   preemptive schedule at zero modelled time, restamp, deliver), the "unit"
                   decodes it and sends a ``data`` partial back through the link, which the GPU
                   decodes;
- ``link-curve``   the same with CURVE on every socket.

Modes alternate iteration by iteration, so that noise from a shared machine hits all alike.
Payloads are 4 KiB and 1 MiB of float32. Targets: ``ndpmoe`` median <= 1.5x the faster raw
round trip; ``link`` median <= 1.5x ``fwd-raw``.

At small payloads the Python on both ends dominates: a process woken by a message runs its
first microseconds with cold caches (~3-4x slower than a hot loop on the development machine),
so each encode/decode costs ~10-20 us in place against ~4 us in a micro-benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq
from rich.console import Console
from rich.table import Table

from actors.clock import wall_now
from actors.curve import CurveKeys
from actors.dispatcher import Dispatcher
from actors.wire import decode, encode
from actors.zmq_transport import ZmqDealer, ZmqRouter
from cluster.core.errors import EmulationError

PAYLOADS = {"4KiB": 4 * 1024, "1MiB": 1024 * 1024}
MODES = ("raw", "raw-nocopy", "raw-msgpack", "ndpmoe", "ndpmoe-curve")
RAW_MODES = ("raw", "raw-nocopy")
LINK_MODES = ("fwd-raw", "fwd-wire", "link", "link-curve")
TARGET_RATIO = 1.5
STOP = b"stop"
HI = b"hi"
RECV_TIMEOUT_S = 30.0


def _bound_router(conn) -> tuple[zmq.Context, zmq.Socket]:
    """A raw ROUTER on a free loopback port, its endpoint sent back over ``conn``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT_S * 1000))
    sock.bind("tcp://127.0.0.1:*")
    conn.send(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    return ctx, sock


def _raw_server(conn, copy: bool) -> None:
    ctx, sock = _bound_router(conn)
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
    ctx, sock = _bound_router(conn)
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
    """A device whose work is nothing: replies with the array it was sent (and has no
    program: nothing to hold for, nothing queued to send)."""

    name = "ndp0"

    def __init__(self) -> None:
        self.out: list = []

    def next_wake_s(self) -> float:
        return float("inf")

    def now(self) -> float:
        return wall_now()

    def advance(self) -> None:
        pass

    def handle(self, msg):
        return encode("result", {"task_id": msg.fields["task_id"], "done_s": 0.0}, msg.arrays)


def _own_server(conn, endpoint: str, keys: tuple | None = None) -> None:
    """A device actor's side: a DEALER served by the project's DeviceServer loop."""
    from actors.device_server import DeviceServer

    curve = {} if keys is None else {"curve": CurveKeys(*keys[0]), "server_key": keys[1]}
    with ZmqDealer(b"ndp0", router_id=b"sched", **curve) as dealer:
        dealer.connect(endpoint)
        conn.send(endpoint)
        DeviceServer(_EchoDevice(), dealer).serve()


# --- the link hop -------------------------------------------------------------------------------


def _raw_forwarder(conn) -> None:
    """The minimal forwarder: whatever ``gpu`` sends goes to ``ndp0`` and back."""
    ctx, sock = _bound_router(conn)
    other = {b"gpu": b"ndp0", b"ndp0": b"gpu"}
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 2 and frames[1].bytes in (STOP, HI):
                if frames[1].bytes == HI:  # a unit saying it is there: nothing to forward
                    continue
                sock.send_multipart([b"ndp0", STOP])
                break
            frames[0] = other[frames[0].bytes]
            sock.send_multipart(frames, copy=False)
    except zmq.Again:
        pass
    finally:
        sock.close(linger=0)
        ctx.term()


def _raw_unit(conn, endpoint: str) -> None:
    """The far end of ``fwd-raw``: a DEALER that sends back what it gets (header + frame)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"ndp0")
    sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT_S * 1000))
    sock.connect(endpoint)
    sock.send(HI)  # the forwarder learns this identity
    conn.send(endpoint)
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            if frames[0].bytes == STOP:
                break
            sock.send_multipart(frames, copy=False)
    except zmq.Again:
        pass
    finally:
        sock.close(linger=0)
        ctx.term()


def _link_server(conn, keys: dict | None) -> None:
    """The link actor's side: a ROUTER served by the real LinkServer loop."""
    from actors.link import LinkServer

    curve = {}
    if keys is not None:
        curve = {"curve": CurveKeys(*keys["link"]),
                 "clients": {keys["gpu"][0]: [b"gpu"], keys["ndp0"][0]: [b"ndp0"],
                             keys["sched"][0]: [b"sched"]}}
    with ZmqRouter(**curve) as router:
        conn.send(router.bind())
        LinkServer(router, devices=[b"gpu", b"ndp0"]).serve()


def _curve_of(keys: dict | None, who: str) -> dict:
    if keys is None:
        return {}
    return {"curve": CurveKeys(*keys[who]), "server_key": keys["link"][0]}


def _link_unit(conn, endpoint: str, keys: dict | None, link: bool = True) -> None:
    """The far end of ``link`` (and of ``fwd-wire``, behind the raw forwarder): an NDP unit's
    link socket that decodes each activation and sends a partial of the same array back to
    the GPU through the link."""
    from actors.clock import wall_now as now

    with ZmqDealer(b"ndp0", router_id=b"link", **_curve_of(keys, "ndp0")) as d:
        d.connect(endpoint)
        if link:  # the router learns this identity
            d.send(None, encode("ping", {"seq": 0}))
            d.recv(RECV_TIMEOUT_S)
        else:
            d.send(None, [HI])
            time.sleep(0.2)
        conn.send(endpoint)
        while True:
            got = d.recv(RECV_TIMEOUT_S)
            if got is None:
                break
            msg = decode(got[1])
            if msg.type != "data" or msg.fields["seq"] < 0:
                break
            d.send(None, encode("data", {"kind": "partial", "dst": "gpu", "at_s": now(),
                                         "seq": msg.fields["seq"], "unit": 0,
                                         "true_bytes": msg.arrays[0].nbytes}, msg.arrays))


class _RawLinkClient:
    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"gpu")
        self.sock.setsockopt(zmq.RCVTIMEO, int(RECV_TIMEOUT_S * 1000))
        self.sock.connect(endpoint)

    def round_trip(self, _payload: bytes, arr: np.ndarray, i: int) -> None:
        head = {"v": 1, "t": "data", "arrays": [["float32", [arr.size]]], "seq": i}
        self.sock.send_multipart([msgpack.packb(head), arr], copy=False)
        rhead, data = self.sock.recv_multipart(copy=False)
        if msgpack.unpackb(rhead.buffer)["seq"] != i or len(data.buffer) != arr.nbytes:
            raise RuntimeError(f"forward {i} came back wrong")

    def stop(self) -> None:
        self.sock.send_multipart([STOP])  # the unit's stop goes through the forwarder first
        self.sock.close(linger=100)


class _LinkClient:
    """The GPU's link socket: activations to ndp0 through the link, partials back."""

    def __init__(self, endpoint: str, keys: dict | None, link: bool = True) -> None:
        self.d = ZmqDealer(b"gpu", router_id=b"link", **_curve_of(keys, "gpu"))
        self.d.connect(endpoint)
        self.ctl = None
        if not link:  # fwd-wire: the raw forwarder needs no reset
            return
        self.ctl = ZmqDealer(b"sched", router_id=b"link", **_curve_of(keys, "sched"))
        self.ctl.connect(endpoint)
        net = Dispatcher(self.ctl, RECV_TIMEOUT_S)
        # zero modelled time: every transfer is due when it arrives; what is left is the hop
        net.call(b"link", {"kind": "reset", "dilation": 1.0, "latency_s": 0.0,
                           "bw_bytes_per_s": 1e18, "prefetch_class": 2, "base_s": wall_now()})
        self.net = net

    def round_trip(self, _payload: bytes, arr: np.ndarray, i: int) -> None:
        self.d.send(None, encode("data", {"kind": "activation", "dst": "ndp0", "at_s": wall_now(),
                                          "seq": i, "true_bytes": arr.nbytes}, [arr]))
        got = self.d.recv(RECV_TIMEOUT_S)
        msg = decode(got[1]) if got is not None else None
        if msg is None or msg.fields["seq"] != i or msg.arrays[0].nbytes != arr.nbytes:
            raise RuntimeError(f"link round trip {i} came back wrong")

    def stop(self) -> None:
        self.d.send(None, encode("data", {"kind": "activation", "dst": "ndp0", "at_s": wall_now(),
                                          "seq": -1, "true_bytes": 0}, []))  # the unit then stops
        if self.ctl is None:
            self.d.send(None, [STOP])
        else:
            self.ctl.send(None, encode("shutdown"))
            self.ctl.close()
        self.d.close()


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

    def __init__(self, curve: bool = False) -> None:
        self.keys = None
        kw: dict = {}
        if curve:
            server, dev = CurveKeys.generate(), CurveKeys.generate()
            kw = {"curve": server, "clients": {dev.public: [b"ndp0"]}}
            self.keys = ((dev.public, dev.secret), server.public)
        self.router = ZmqRouter(**kw)
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


def _start_round_trip(spawn, zctx: zmq.Context) -> tuple[dict, list]:
    clients, procs = {}, []
    for mode in MODES:
        if mode.startswith("ndpmoe"):
            client = _OwnClient(curve=mode.endswith("curve"))
            proc, _ = _start(spawn, _own_server, client.endpoint, client.keys)
            client.connected()
            clients[mode] = client
        elif mode == "raw-msgpack":
            proc, endpoint = _start(spawn, _msgpack_server)
            clients[mode] = _MsgpackClient(zctx, endpoint, copy=False)
        else:
            proc, endpoint = _start(spawn, _raw_server, mode == "raw")
            clients[mode] = _RawClient(zctx, endpoint, copy=mode == "raw")
        procs.append(proc)
    return clients, procs


def _start_link(spawn, zctx: zmq.Context) -> tuple[dict, list]:
    clients, procs = {}, []
    proc, endpoint = _start(spawn, _raw_forwarder)
    procs.append(proc)
    procs.append(_start(spawn, _raw_unit, endpoint)[0])
    clients["fwd-raw"] = _RawLinkClient(zctx, endpoint)
    proc, endpoint = _start(spawn, _raw_forwarder)
    procs.append(proc)
    procs.append(_start(spawn, _link_unit, endpoint, None, False)[0])
    clients["fwd-wire"] = _LinkClient(endpoint, None, link=False)
    for mode in ("link", "link-curve"):
        keys = None
        if mode == "link-curve":
            keys = {who: (k.public, k.secret) for who in ("link", "gpu", "ndp0", "sched")
                    for k in [CurveKeys.generate()]}
        proc, endpoint = _start(spawn, _link_server, keys)
        procs.append(proc)
        clients[mode] = _LinkClient(endpoint, keys)  # resets the link before the unit joins
        procs.append(_start(spawn, _link_unit, endpoint, keys)[0])
    return clients, procs


def _measure(clients: dict, modes: tuple[str, ...], iters: dict[str, int]) -> dict:
    """payload -> mode -> sorted wall seconds per round trip, modes alternating."""
    out = {}
    for label, nbytes in PAYLOADS.items():
        arr = np.arange(nbytes // 4, dtype=np.float32)
        payload = arr.tobytes()
        n = iters[label]
        warm = max(20, n // 10)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(n + warm):  # the first ones are warm-up
            for mode in modes:
                t0 = wall_now()
                clients[mode].round_trip(payload, arr, i)
                if i >= warm:
                    times[mode].append(wall_now() - t0)
        out[label] = {m: sorted(ts) for m, ts in times.items()}
    return out


def _row(section: str, label: str, mode: str, ts: list[float], ratios: dict[str, float]) -> dict:
    med = statistics.median(ts)
    return {"section": section, "payload": label, "payload_bytes": PAYLOADS[label], "mode": mode,
            "iterations": len(ts), "median_us": med * 1e6,
            "p90_us": ts[int(0.9 * (len(ts) - 1))] * 1e6,
            "p99_us": ts[int(0.99 * (len(ts) - 1))] * 1e6,
            **{k: med / v for k, v in ratios.items()}}


def run(iters: dict[str, int]) -> list[dict]:
    spawn = mp.get_context("spawn")
    procs, clients = [], {}
    zctx = zmq.Context()
    try:
        for start in (_start_round_trip, _start_link):
            c, p = start(spawn, zctx)
            clients.update(c)
            procs += p
        rt = _measure(clients, MODES, iters)
        hop = _measure(clients, LINK_MODES, iters)
        rows = []
        for label in PAYLOADS:
            t = rt[label]
            best_raw = min(statistics.median(t[m]) for m in RAW_MODES)
            ratios = {"ratio_to_best_raw": best_raw,
                      "ratio_to_raw_msgpack": statistics.median(t["raw-msgpack"]),
                      "ratio_to_ndpmoe": statistics.median(t["ndpmoe"])}
            rows += [_row("round trip", label, m, t[m], ratios) for m in MODES]
        for label in PAYLOADS:
            t = hop[label]
            ratios = {"ratio_to_fwd_raw": statistics.median(t["fwd-raw"]),
                      "ratio_to_fwd_wire": statistics.median(t["fwd-wire"]),
                      "ratio_to_link": statistics.median(t["link"])}
            rows += [_row("link hop", label, m, t[m], ratios) for m in LINK_MODES]
        return rows
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.stop()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        zctx.term()


def _table(rows: list[dict], section: str, title: str, cols: list[tuple[str, str]],
           target: tuple[str, str]) -> Table:
    table = Table(title=title)
    for col in ("payload", "mode", "n", "median us", "p90 us", "p99 us", *(c for c, _ in cols)):
        table.add_column(col, justify="left" if col in ("payload", "mode") else "right",
                         no_wrap=True)
    for r in rows:
        if r["section"] != section:
            continue
        cells = []
        for _col, key in cols:
            cell = f"{r[key]:.2f}"
            if (r["mode"], key) == target:
                cell = f"[{'green' if r[key] <= TARGET_RATIO else 'red'}]{cell}[/]"
            cells.append(cell)
        table.add_row(r["payload"], r["mode"], str(r["iterations"]), f"{r['median_us']:.0f}",
                      f"{r['p90_us']:.0f}", f"{r['p99_us']:.0f}", *cells)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", nargs=2, type=int, default=[2000, 300], metavar=("N_4KIB", "N_1MIB"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/bench_wire.json"))
    args = ap.parse_args()

    rows = run(dict(zip(PAYLOADS, args.iters)))

    console = Console(width=max(100, Console().width))
    # "x raw": against the faster raw pyzmq mode; "x floor": against raw-msgpack
    console.print(_table(rows, "round trip", "scheduler -> device round trip, two processes, "
                         "tcp 127.0.0.1 (medians)",
                         [("x raw", "ratio_to_best_raw"), ("x floor", "ratio_to_raw_msgpack"),
                          ("x ndpmoe", "ratio_to_ndpmoe")], ("ndpmoe", "ratio_to_best_raw")))
    console.print(_table(rows, "link hop", "device -> link -> device and back, three processes, "
                         "tcp 127.0.0.1 (medians)",
                         [("x fwd-raw", "ratio_to_fwd_raw"), ("x fwd-wire", "ratio_to_fwd_wire"),
                          ("x link", "ratio_to_link")],
                         ("link", "ratio_to_fwd_raw")))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "wire round trip and link hop",
        "target_ratio": TARGET_RATIO,
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
