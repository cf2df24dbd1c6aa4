"""How much a rank communicates: :class:`CommunicationLog` counts collective calls and bytes.

::

    with CommunicationLog() as log:
        solver.solve(h, rhs)
    log.calls["all_reduce"], log.bytes["all_reduce"]

Every collective of this package reports itself through :func:`record` (kind, bytes of this
rank's payload): ``all_reduce`` (the buffer reduced, float64 in transit), ``gather`` (the padded
rows this rank sends), ``broadcast`` (the pickled object), ``all_gather_object`` (this rank's
pickled object) and ``barrier`` (no payload).  Bytes are the payload, not the wire traffic: a
ring all-reduce of B bytes over N ranks moves about 2 (N - 1) / N x B through each rank's
links.  A world of one makes no collective and records nothing.  Logs may nest (each active
log counts every call); with none active, :func:`record` is one test of an empty list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_ACTIVE: list[CommunicationLog] = []


@dataclass(eq=False)   # identity, so that leaving a nested log removes that very log
class CommunicationLog:
    """Collective calls and payload bytes per kind, counted while the log is active."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> CommunicationLog:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)

    def add(self, kind: str, nbytes: int) -> None:
        """Count one collective call of ``kind`` with ``nbytes`` of payload."""
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    @property
    def total_calls(self) -> int:
        """Collective calls of every kind."""
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        """Payload bytes of every kind."""
        return sum(self.bytes.values())

    def summary(self) -> dict[str, Any]:
        """``{kind: {"calls": n, "bytes": b}}`` plus the totals (JSON-serialisable)."""
        return {**{k: {"calls": self.calls[k], "bytes": self.bytes[k]} for k in sorted(self.calls)},
                "total": {"calls": self.total_calls, "bytes": self.total_bytes}}


def logging_active() -> bool:
    """Whether some :class:`CommunicationLog` is counting (sizes worth measuring)."""
    return bool(_ACTIVE)


def record(kind: str, nbytes: int) -> None:
    """Report one collective call to every active log (nothing to do when none is)."""
    for log in _ACTIVE:
        log.add(kind, nbytes)
