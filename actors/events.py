"""What the devices may tell the scheduler: the message types, and each ``event`` kind with the
fields it must carry (the GPU's events; ``failed`` and ``ack`` from any device)."""

from __future__ import annotations

from typing import Any

from actors.peers import GPU_PEER
from cluster.core.errors import ProtocolError

FROM_PEERS = frozenset({"result", "hello", "pong", "event", "error"})
# event kind -> required fields and their types (the GPU's events; ``failed`` and ``ack`` from
# any device)
_EVENTS: dict[str, dict[str, Any]] = {
    "routed": {"seq": int, "layer": int, "at_s": (int, float), "landed": list},
    "token": {"step": int, "at_s": (int, float), "wall_s": (int, float)},
    "done": {},
    "failed": {"message": str},
    "ack": {"cseq": int},
}
_FROM_ANY_DEVICE = frozenset({"failed", "ack"})


def check_event(peer: bytes, f: dict[str, Any]) -> None:
    """Raises ProtocolError unless an ``event`` from ``peer`` has its kind's fields."""
    kind = f["kind"]
    need = _EVENTS.get(kind)
    if need is None or (kind not in _FROM_ANY_DEVICE and peer != GPU_PEER):
        raise ProtocolError(f"event {kind!r} is not one {peer.decode(errors='replace')} sends")
    for name, typ in need.items():
        v = f.get(name)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ProtocolError(f"event {kind!r} needs {name!r} of type {typ}, got {v!r}"[:200])
    if kind == "routed" and not all(
            isinstance(x, list) and len(x) == 3 and all(type(v) is int for v in x)
            for x in f["landed"]):
        raise ProtocolError("event 'routed' needs landed as [[layer, expert, transfer id], ...]")
