"""The form of a ``device`` setting (``cpu``, ``cuda``, ``cuda:N``, ``auto``), without torch.

:mod:`engine.config` checks a config's ``device`` with :func:`device_problem` (the config
parser does not import torch); :func:`engine.devices.resolve_device` then finds the device on
the machine the run starts on.
"""

from __future__ import annotations

import re
from typing import Any

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def device_problem(spec: Any) -> str | None:
    """Why ``spec`` is not a ``device`` setting (``None`` when it is one); no hardware is
    checked (see :func:`engine.devices.resolve_device`)."""
    if not isinstance(spec, str):
        return "must be a string (in quotes)"
    if spec in ("cpu", "cuda", "auto") or _CUDA_INDEX.fullmatch(spec):
        return None
    return f"is not one of {', '.join(DEVICE_CHOICES)} (e.g. \"cuda:0\")"


def cuda_index(spec: str) -> int | None:
    """``N`` of a ``cuda:N`` setting, else ``None``."""
    match = _CUDA_INDEX.fullmatch(spec)
    return None if match is None else int(match.group(1))
