"""Progress and ETA of a retrain job, from the engine's ``--progress-file`` (no Streamlit).

The engine appends JSON lines ``{"t", "phase", "done", "total", "message", "event"}``
(:class:`engine.progress.ProgressFile`).  The ETA comes from the parent run's recorded phase
times (``manifest["timings"]``, copied into the job when it started): the expected time of the
current phase minus the time spent in it, plus the expected times of the phases after it,
scaled by how much slower than the parent this job has been so far (a loaded machine); while
per-example gradients report ``done/total``, the current phase's rest is extrapolated from its
own rate instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashboard.jobs import Job

#: The engine's phases in order (the keys of a run's ``timings``; ``write`` is the remainder).
PHASES = ("load", "pretrain", "finetune", "evaluate", "influence", "map", "finetune_influence",
          "write")
PHASE_LABELS = {"starting": "starting", "load": "loading data", "pretrain": "pretraining",
                "finetune": "finetuning", "evaluate": "evaluating", "influence": "scoring",
                "map": "computing the map",
                "finetune_influence": "scoring the finetuning examples",
                "write": "writing the run", "done": "done"}


@dataclass(frozen=True)
class JobProgress:
    """Where a job is: ``phase`` (a :data:`PHASES` name, ``starting``, ``done``, or the final
    status of a finished job), ``fraction`` of the expected work (0..1), seconds since it
    started, seconds left (``None`` when unknown or finished) and the last message."""

    phase: str
    fraction: float
    elapsed_s: float
    eta_s: float | None
    message: str
    done: int | None = None
    total: int | None = None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a progress file (a missing file, a half-written last line
    and lines that are not events are skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    events = []
    for line in text.split("\n")[:-1]:   # the part after the last newline may be unfinished
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("phase"), str) \
                and isinstance(ev.get("t"), (int, float)):
            events.append(ev)
    return events


def expected_times(timings: dict[str, float]) -> dict[str, float] | None:
    """Seconds per phase of the parent run (``write`` = total minus the others), or
    ``None`` when it recorded none."""
    if not timings or not any(timings.get(p) for p in PHASES[:-1]):
        return None
    out = {p: max(float(timings.get(p, 0.0)), 0.0) for p in PHASES[:-1]}
    out["write"] = max(float(timings.get("total", 0.0)) - sum(out.values()), 0.0)
    return out


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def job_progress(job: Job, now: float | None = None) -> JobProgress:
    """Progress of ``job`` from its progress file and its parent's phase times."""
    events = read_events(job.progress_path)
    start = job.started_at or job.created_at
    now = job.finished_at or (time.time() if now is None else now)
    elapsed = max(now - start, 0.0)
    message = next((e["message"] for e in reversed(events) if e.get("message")), "")
    if not job.active:
        frac = 1.0 if job.status == "succeeded" else _fraction(job, events, now)[0]
        return JobProgress(job.status, frac, elapsed, None, job.message or message)
    if not events:
        exp = expected_times(job.parent_timings)
        return JobProgress("starting", 0.0, elapsed, sum(exp.values()) if exp else None,
                           message)
    frac, eta, phase, done, total = _fraction(job, events, now)
    return JobProgress(phase, frac, elapsed, eta, message, done, total)


def _fraction(job: Job, events: list[dict[str, Any]], now: float
              ) -> tuple[float, float | None, str, int | None, int | None]:
    """(fraction, eta, phase, done, total) of a job from its events."""
    if not events:
        return 0.0, None, "starting", None, None
    last = events[-1]
    phase, since = last["phase"], float(last["t"])
    if phase == "done":
        return 1.0, 0.0, "done", None, None
    if last.get("event") == "end" and phase in PHASES[:-1]:
        phase = PHASES[PHASES.index(phase) + 1]   # between two phases: the next one started
    else:
        since = next((float(e["t"]) for e in reversed(events)
                      if e["phase"] == phase and e.get("event") == "start"), since)
    done = total = None
    for e in reversed(events):
        if e["phase"] != phase:
            break
        if _int(e.get("done")) is not None and _int(e.get("total")):
            done, total = int(e["done"]), int(e["total"])
            break
    if phase not in PHASES:
        return 0.0, None, phase, done, total
    i = PHASES.index(phase)
    exp = expected_times(job.parent_timings)
    if exp is None:
        return i / len(PHASES), None, phase, done, total
    spent = max(now - since, 0.0)
    before, here = sum(exp[p] for p in PHASES[:i]), exp[phase]
    after = sum(exp[p] for p in PHASES[i + 1:]) * _slowdown(events, exp, phase, spent)
    if done and total:   # extrapolate this phase from its own rate
        f = min(done / total, 1.0)
        rest, part = spent * (1.0 - f) / f, here * f
    else:
        rest, part = max(here - spent, 0.0), min(spent, here)
    whole = before + here + sum(exp[p] for p in PHASES[i + 1:])
    frac = min((before + part) / whole, 0.99) if whole > 0 else i / len(PHASES)
    return frac, rest + after, phase, done, total


def _slowdown(events: list[dict[str, Any]], exp: dict[str, float], phase: str,
              spent: float) -> float:
    """How much slower than the parent this job runs (at least 1): its finished phases'
    times over the parent's, or the current phase's overrun, when they are long enough
    (>= 0.5 s in the parent) to say so."""
    starts: dict[str, float] = {}
    took: dict[str, float] = {}
    for e in events:
        if e.get("event") == "start":
            starts[e["phase"]] = float(e["t"])
        elif e.get("event") == "end" and e["phase"] in starts and e["phase"] in exp:
            took[e["phase"]] = float(e["t"]) - starts[e["phase"]]
    factor = 1.0
    if sum(exp[p] for p in took) >= 0.5:
        factor = sum(took.values()) / sum(exp[p] for p in took)
    if exp.get(phase, 0.0) >= 0.5:
        factor = max(factor, spent / exp[phase])
    return max(factor, 1.0)
