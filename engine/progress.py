"""Progress lines with an ETA for long steps (stderr, throttled, one line per step)."""

from __future__ import annotations

import sys
import time


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

    def __init__(self, stream=None, interval: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.start = time.perf_counter()
        self.last = 0.0
        self.phase = ("", "")

    def _write(self, line: str) -> None:
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
