"""One exception tree for the whole project.

::

    NdpmoeError                 anything ndpmoe raises on purpose
    ├── ConfigError             bad config, preset, override or model file (before any work)
    ├── RoutingError            a routing source that cannot serve the run (bad trace file, too short)
    ├── ProtocolError           a malformed, oversized or unknown wire message
    └── EmulationError          the emulation cluster failed (dead actor, deadline, overrun limit)

Library errors (``tomllib``, ``json``, ``zmq``, ``ray``) are translated at the boundary with
``raise ... from exc`` so that the CLI prints one paragraph and no traceback.
"""

from __future__ import annotations


class NdpmoeError(Exception):
    """Base class of every error ndpmoe raises on purpose."""


class ConfigError(NdpmoeError, ValueError):
    """A configuration value is unknown, out of range or inconsistent.

    The message names the field, the value and what is allowed.
    """


class RoutingError(NdpmoeError):
    """A routing source cannot provide the routing the workload asks for."""


class ProtocolError(NdpmoeError):
    """A wire message is malformed, oversized, of the wrong version or of an unknown type."""


class EmulationError(NdpmoeError):
    """The emulation cluster could not finish a run."""
