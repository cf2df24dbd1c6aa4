r"""The ids file format: lists of example ids exchanged between the dashboard and the engine.

``python -m engine run --exclude IDS_FILE`` reads it; the dashboard's exports (``ids.txt``,
``excluded_ids.txt``) write it.  Every id the tool accepts round-trips:

* UTF-8 text, one id per line, each line ended by ``\n``; a reader strips one trailing ``\r``
  of each line (Windows editors) and ignores a leading UTF-8 byte order mark and empty lines;
* a line that starts with ``#`` is a comment;
* an id that itself starts with ``#`` or ``\`` is written with one leading backslash ``\``,
  which the reader strips (``#a`` is written ``\#a``, ``\b`` is written ``\\b``);
* ids that cannot be written this way are refused with :class:`IdsFormatError`: the empty id,
  ids containing a line break (``\n``, ``\r`` or any other character ``str.splitlines``
  splits on) and ids starting with a byte order mark (U+FEFF).  Data tables with such ids are
  refused when they are loaded (:func:`check_id`), so the dashboard can never flag one.

Spaces are part of an id: lines are not stripped beyond the one ``\r``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class IdsFormatError(ValueError):
    """An id cannot be written to, or an ids file cannot be read as, the ids file format."""


# Every character str.splitlines() splits on: none may appear inside an id.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
BOM = "\ufeff"


def id_problem(i: object) -> str | None:
    """Why ``i`` cannot be an example id (``None`` when it can)."""
    if not isinstance(i, str):
        return f"ids must be strings, got {i!r}"
    if not i:
        return "an id is empty"
    if not LINE_BREAKS.isdisjoint(i):
        return f"id {i!r} contains a line break"
    if i.startswith(BOM):
        return f"id {i!r} starts with a byte order mark (U+FEFF)"
    try:
        i.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"id {i!r} is not valid Unicode text ({exc.reason})"
    return None


def check_id(i: object) -> str:
    """``i`` if it can be an id; raises :class:`IdsFormatError` saying why not."""
    problem = id_problem(i)
    if problem is not None:
        raise IdsFormatError(f"{problem}; ids must be one line of text so that ids files "
                             "(one id per line) can hold them")
    return i  # type: ignore[return-value]


def ids_text(ids: Iterable[str]) -> str:
    """The ids file of ``ids`` (empty string for no ids); raises :class:`IdsFormatError` for an
    id the format cannot hold."""
    lines = []
    for i in ids:
        check_id(i)
        lines.append(("\\" + i if i[0] in "#\\" else i) + "\n")
    return "".join(lines)


def parse_ids_text(text: str) -> list[str]:
    """The ids of an ids file's text: ``parse_ids_text(ids_text(x)) == list(x)``."""
    if text.startswith(BOM):
        text = text[1:]
    ids = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line or line.startswith("#"):
            continue
        ids.append(line[1:] if line.startswith("\\") else line)
    return ids


def read_ids_file(path: str | Path) -> list[str]:
    """Read an ids file; a clear :class:`IdsFormatError` for anything that is not one."""
    p = Path(path)
    if p.is_dir():
        raise IdsFormatError(f"ids file {p} is a directory; pass a text file with one example "
                             "id per line")
    if not p.is_file():
        raise IdsFormatError(f"ids file {p} does not exist; pass a text file with one example "
                             "id per line")
    data = p.read_bytes()
    if b"\x00" in data:
        raise IdsFormatError(f"ids file {p} is a binary file, not UTF-8 text with one id per "
                             "line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IdsFormatError(f"ids file {p} is not UTF-8 text (byte {exc.start}); save it as "
                             "UTF-8 with one id per line") from None
    return parse_ids_text(text)
