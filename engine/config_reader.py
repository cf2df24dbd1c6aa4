"""Typed reading of one TOML table of a run configuration: every error names the file, the
``[section]`` and the key (with a close match for a mistyped key), so a typo never silently
falls back to a default.  Used by :mod:`engine.config`.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, NoReturn

from engine.data import label_key
from engine.device_spec import device_problem


class ConfigError(ValueError):
    """The run configuration is missing, malformed or has an invalid value."""


class TableReader:
    """Reads typed values out of one TOML table; every error names file, section and key."""

    def __init__(self, file: str, section: str | None, table: dict[str, Any]) -> None:
        self.file = file
        self.section = section
        self.table = table

    def where(self, key: str) -> str:
        return f"[{self.section}] {key}" if self.section else key

    def fail(self, key: str, value: Any, problem: str) -> NoReturn:
        raise ConfigError(f"{self.file}: {self.where(key)} = {value!r} {problem}")

    def allow_only(self, allowed: list[str]) -> None:
        for key in self.table:
            if key not in allowed:
                raise ConfigError(
                    f"{self.file}: unknown key {self.where(key)}{suggest_key(key, allowed)} "
                    f"(allowed in [{self.section}]: {', '.join(allowed)})"
                )

    # Each getter returns the default when the key is absent, else the checked value.

    def get_choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        return self.check_choice(key, self.table.get(key, default), choices)

    def check_choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            self.fail(key, value, f"is not one of {', '.join(choices)}")
        return value

    def check_device(self, key: str, value: Any) -> str:
        # The form only: whether the GPU exists is checked when a run starts
        # (engine.devices.resolve_device), so a config stays valid on another machine.
        problem = device_problem(value)
        if problem:
            self.fail(key, value, problem)
        return value

    def get_str(self, key: str, default: str, *, nonempty: bool = False) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str):
            self.fail(key, value, "must be a string (in quotes)")
        if nonempty and not value.strip():
            self.fail(key, value, "must not be empty")
        return value

    def get_int(self, key: str, default: int, *, low: int) -> int:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, value, "must be an integer")
        if value < low:
            self.fail(key, value, f"must be >= {low}")
        return value

    def get_float(
        self, key: str, default: float, *, low: float, high: float | None = None,
        strict: bool = False,
    ) -> float:
        value = self.table.get(key, default)
        return self.check_float(key, value, low=low, high=high, strict=strict)

    def check_float(
        self, key: str, value: Any, *, low: float, high: float | None = None,
        strict: bool = False,
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, value, "must be a number")
        if not math.isfinite(value):
            self.fail(key, value, "must be a finite number")
        if value < low or (strict and value == low):
            self.fail(key, value, f"must be {'>' if strict else '>='} {low:g}")
        if high is not None and value > high:
            self.fail(key, value, f"must be <= {high:g}")
        return float(value)

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "must be true or false")
        return value

    def get_int_list(self, key: str, default: tuple[int, ...]) -> list[int]:
        value = self.table.get(key, list(default))
        if (not isinstance(value, list) or not value
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
            self.fail(key, value, "must be a non-empty list of positive integers")
        return value

    def get_str_list(
        self, key: str, default: tuple[str, ...], *, nonempty: bool = False
    ) -> list[str]:
        value = self.table.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(key, value, "must be a list of column names (strings)")
        if nonempty and not value:
            self.fail(key, value, "must list at least one column")
        self._unique(key, value, value)
        return value

    def get_classes(self, key: str, default: tuple[int | str, ...]) -> tuple[int | str, ...]:
        value = self.table.get(key, list(default))
        if (not isinstance(value, list)
                or any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in value)):
            self.fail(key, value, "must be a list of class values (integers or strings)")
        if len(value) < 2:
            self.fail(key, value, "must declare at least two classes")
        # 3 and "3" would both match a label 3 in the file (see data.label_key).
        self._unique(key, value, [label_key(v) for v in value])
        return tuple(value)

    def get_mode_or_list(
        self, key: str, modes: tuple[str, ...], what: str, *, ids: bool = False
    ) -> str | tuple[str, ...]:
        value = self.table.get(key, modes[0])
        if isinstance(value, str):
            return self.check_choice(key, value, modes)
        allowed = (int, str) if ids else (str,)  # integer ids are fine: ids are read as text
        if (not isinstance(value, list) or not value
                or any(isinstance(v, bool) or not isinstance(v, allowed) for v in value)):
            self.fail(key, value, f"must be one of {', '.join(modes)} or a non-empty list of "
                                  f"{what} (strings)")
        items = [str(v) for v in value]
        self._unique(key, value, items)
        return tuple(items)

    def _unique(self, key: str, value: list, keys: list) -> None:
        seen: set = set()
        for v, k in zip(value, keys, strict=True):
            if k in seen:
                self.fail(key, value, f"lists {v!r} more than once")
            seen.add(k)


def suggest_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
