"""Named points where a test can hold the engine to interrupt it there (and only a test).

``INFLUENCE_PAUSE_AT=NAME`` makes :func:`pause_point` print ``paused at NAME`` on stderr and
sleep ``INFLUENCE_PAUSE_SECONDS`` (default 30) when the run reaches NAME: ``training``,
``scoring``, ``writing`` (staged files complete) or ``swap`` (inside the swap, where SIGINT and
SIGTERM are deferred).  Unset, it costs one dictionary look-up.
"""

from __future__ import annotations

import os
import sys
import time

POINTS = ("training", "scoring", "writing", "swap")


def pause_point(name: str) -> None:
    """Hold here if ``INFLUENCE_PAUSE_AT`` names this point (interrupt tests)."""
    if os.environ.get("INFLUENCE_PAUSE_AT") != name:
        return
    print(f"paused at {name}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("INFLUENCE_PAUSE_SECONDS", "30")))
