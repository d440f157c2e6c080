"""The names the emulated system's parties go by on the wire, built and parsed only here.

Every party has one zmq identity (bytes) and reports under the same name as text:

- the GPU: ``gpu``;
- NDP unit ``u``: ``ndp<u>`` (``u`` a non-negative decimal integer);
- the host link: ``link``;
- the scheduler: ``sched``;
- a device's heartbeat socket: its name plus ``.hb`` (``ndp0.hb``); only devices beat.

:func:`parse` turns a name back into ``(kind, unit)``; a name that is none of these is not a
peer of the system (:class:`ValueError`).
"""

from __future__ import annotations

GPU = "gpu"
LINK = "link"
SCHED = "sched"
NDP = "ndp"
GPU_PEER = GPU.encode()
LINK_PEER = LINK.encode()
SCHED_PEER = SCHED.encode()
HEARTBEAT_SUFFIX = b".hb"  # a device's heartbeat socket is its name plus this


def unit_name(u: int) -> str:
    """NDP unit ``u``'s name as text (report keys, labels, link destinations)."""
    return f"{NDP}{int(u)}"


def unit_peer(u: int) -> bytes:
    """NDP unit ``u``'s zmq identity."""
    return unit_name(u).encode()


def device_name(kind: str, unit: int = -1) -> str:
    """A device's name from its kind (``gpu`` or ``ndp``) and, for a unit, its number."""
    if kind == GPU:
        return GPU
    if kind == NDP:
        return unit_name(unit)
    raise ValueError(f"no device kind {kind!r}")


def device_names(num_units: int) -> list[str]:
    """The GPU's and every unit's name, in that order."""
    return [GPU, *(unit_name(u) for u in range(num_units))]


def device_peers(num_units: int) -> list[bytes]:
    """The GPU's and every unit's identity, in that order."""
    return [n.encode() for n in device_names(num_units)]


def heartbeat_peer(peer: bytes) -> bytes:
    """The identity of device ``peer``'s heartbeat socket."""
    return peer + HEARTBEAT_SUFFIX


def base_peer(peer: bytes) -> bytes:
    """The device a (heartbeat or main) identity belongs to: ``ndp0.hb`` -> ``ndp0``."""
    return peer[:-len(HEARTBEAT_SUFFIX)] if peer.endswith(HEARTBEAT_SUFFIX) else peer


def parse(name: bytes | str) -> tuple[str, int]:
    """``(kind, unit)`` of a party's name: ``("gpu", -1)``, ``("ndp", u)``, ``("link", -1)``,
    ``("sched", -1)``; a heartbeat identity parses as its device. Anything else raises
    :class:`ValueError`."""
    text = name.decode("ascii", errors="replace") if isinstance(name, bytes) else name
    hb = HEARTBEAT_SUFFIX.decode()
    base = text[:-len(hb)] if text.endswith(hb) else text
    if base == GPU or (base in (LINK, SCHED) and base == text):  # only devices beat
        return base, -1
    digits = base[len(NDP):]
    if base.startswith(NDP) and digits.isascii() and digits.isdecimal() and str(int(digits)) == digits:
        return NDP, int(digits)
    raise ValueError(f"{text[:100]!r} is not the name of a peer")


def is_device(name: bytes | str) -> bool:
    """Whether ``name`` is a device's main identity (the GPU or a unit; not a heartbeat)."""
    try:
        kind, _ = parse(name)
    except ValueError:
        return False
    hb = HEARTBEAT_SUFFIX if isinstance(name, bytes) else HEARTBEAT_SUFFIX.decode()
    return kind in (GPU, NDP) and not name.endswith(hb)  # type: ignore[arg-type]


def unit_of(name: bytes | str) -> int:
    """The unit number of a unit's name (``ndp3`` -> 3); ValueError for any other name."""
    kind, u = parse(name)
    if kind != NDP:
        raise ValueError(f"{name!r} is not an NDP unit")
    return u
