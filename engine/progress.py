"""Progress lines with an ETA for long steps (stderr, throttled, one line per step)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable


class Progress:
    """Call with ``(done, total)``; prints ``label: done/total (pct) ETA`` at most every 0.5 s."""

    def __init__(self, label: str, stream=None, interval: float = 0.5) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = interval
        self.start = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (total - done) if done else float("nan")
        end = "\n" if done >= total else ""
        self.stream.write(f"\r  {self.label}: {done}/{total} ({100 * done / max(total, 1):.0f}%)"
                          f" elapsed {elapsed:.1f}s ETA {eta:.1f}s   {end}")
        self.stream.flush()


class TrainingProgress:
    """Training progress on stderr: phase, step and gradient norm at most every ``interval``
    seconds (and whenever the phase changes); notes (stalls, saddles, switches) always."""

    def __init__(self, stream=None, interval: float = 2.0,
                 sink: ProgressFile | None = None) -> None:
        self.stream = stream or sys.stderr
        self.sink = sink
        self.interval = interval
        self.start = time.perf_counter()
        self.last = 0.0
        self.phase = ("", "")

    def _write(self, line: str) -> None:
        if self.sink is not None:
            self.sink.stage(line.split(":", 1)[0], line)
        self.stream.write(f"  {line}, elapsed {time.perf_counter() - self.start:.0f}s\n")
        self.stream.flush()

    def step(self, stage: str, phase: str, done: int, limit: int, grad_norm: float,
             detail: str = "") -> None:
        now = time.perf_counter()
        if (stage, phase) == self.phase and now - self.last < self.interval:
            return
        self.last, self.phase = now, (stage, phase)
        extra = f" ({detail})" if detail else ""
        # A minibatch epoch ("adam epoch 2/5") has exactly `limit` steps; other phases at most.
        bound = "" if " epoch " in f" {phase} " else " (at most)"
        self._write(f"{stage}: {phase} step {done}/{limit}{bound}, gradient norm "
                    f"{grad_norm:.2e}{extra}")

    def note(self, stage: str, message: str) -> None:
        self._write(f"{stage}: {message}")


# TrainingProgress stage names -> the phase names of the run's `timings`.
_STAGE_PHASES = {"pretraining": "pretrain", "finetuning": "finetune"}


class ProgressFile:
    """Machine-readable progress for a supervising process (``run --progress-file PATH``).

    Appends one JSON line per event: ``{"t": unix time, "phase", "done", "total", "message",
    "event"}`` where ``event`` is ``start`` / ``end`` (of a phase: the names of the run's
    ``timings``), ``progress`` (at most every ``interval`` seconds) or ``done`` (phase
    ``done``: the run directory is in place).  ``ProgressFile(None)`` writes nothing.
    """

    def __init__(self, path: str | None, interval: float = 0.5) -> None:
        self.interval = interval
        self.phase: str | None = None
        self.last = 0.0
        try:
            self._fh = open(path, "a", encoding="utf-8", buffering=1) if path else None
        except OSError as exc:
            raise OSError(f"cannot write the progress file {path}: {exc.strerror or exc}"
                          ) from None

    def _write(self, phase: str, event: str, message: str = "", done: int | None = None,
               total: int | None = None) -> None:
        if self._fh is None:
            return
        line = {"t": round(time.time(), 3), "phase": phase, "done": done, "total": total,
                "message": message, "event": event}
        try:
            self._fh.write(json.dumps(line) + "\n")
        except OSError:   # progress is advisory: never fail a run over it
            self._fh = None

    def start(self, phase: str, message: str = "") -> None:
        """End the current phase (if any) and start ``phase``."""
        if phase == self.phase:
            return
        if self.phase is not None:
            self._write(self.phase, "end")
        self.phase, self.last = phase, 0.0
        self._write(phase, "start", message)

    def step(self, done: int | None, total: int | None, message: str = "") -> None:
        """Progress within the current phase (throttled; the last step always written)."""
        now = time.monotonic()
        if self.phase is None or (now - self.last < self.interval
                                  and (done is None or total is None or done < total)):
            return
        self.last = now
        self._write(self.phase, "progress", message, done, total)

    def tee(self, inner: Callable[[int, int], None] | None, message: str
            ) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback that feeds ``inner`` and this file."""
        if self._fh is None:
            return inner

        def both(done: int, total: int) -> None:
            if inner is not None:
                inner(done, total)
            self.step(done, total, message)
        return both

    def stage(self, stage: str, message: str) -> None:
        """A :class:`TrainingProgress` line: starts the stage's phase, then throttled steps."""
        phase = _STAGE_PHASES.get(stage)
        if phase is not None and phase != self.phase:
            self.start(phase, message)
        else:
            self.step(None, None, message)

    def finish(self, message: str) -> None:
        """The run is in place: end the current phase, write phase ``done`` and close."""
        if self.phase is not None:
            self._write(self.phase, "end")
        self.phase = "done"
        self._write("done", "done", message)
        self.close()

    def close(self) -> None:
        """Stop writing (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
