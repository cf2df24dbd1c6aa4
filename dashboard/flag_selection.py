"""Selecting flagged examples by id on the Flags page, never by row position.

A selectable ``st.dataframe`` reports row *positions* in the frame it was given.  When another
tab or user (un)flags examples between two reruns, the frame of this rerun differs from the one
the browser showed, so a position can name another example.  Here:

* the table's key carries a digest of the ids it shows, and the ids of every rendered key are
  kept in the session, so a selection is always mapped through the ids that table showed;
* when the flagged set changed, the table gets a new key (its selection is empty) and the ids
  selected in the old one move to the "selected by id" multiselect, which is the durable
  selection; ids unflagged meanwhile drop out of it, and nothing is ever mapped by position
  onto a different list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import streamlit as st

PICK_KEY = "flags_pick_ids"
_SHOWN_KEY = "_flags_table_shown"  # {table key: ids it showed}


def table_key(ids: Sequence[str]) -> str:
    """Widget key of the flags table for this exact list of ids."""
    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
    return f"flags_table_{digest}"


def _rows(event: Any) -> list[int]:
    try:
        rows = event["selection"]["rows"]
    except (KeyError, TypeError):
        return []
    return [r for r in rows if isinstance(r, int)]


def selected_in_tables() -> dict[str, list[str]]:
    """Ids selected in each flags table rendered in this session, mapped through the ids that
    table showed (positions past its end are dropped)."""
    shown: dict[str, tuple[str, ...]] = st.session_state.get(_SHOWN_KEY) or {}
    out = {}
    for key, ids in shown.items():
        out[key] = [ids[r] for r in _rows(st.session_state.get(key)) if 0 <= r < len(ids)]
    return out


def prepare(ids: Sequence[str]) -> str:
    """Before rendering the table of ``ids`` (the currently flagged examples): carry the ids
    selected in tables of earlier lists into the multiselect, drop ids no longer flagged from
    it, and return the key to render the table with."""
    key = table_key(ids)
    flagged = set(ids)
    picked = [i for i in st.session_state.get(PICK_KEY) or [] if i in flagged]
    for old_key, chosen in selected_in_tables().items():
        if old_key != key:
            picked += [i for i in chosen if i in flagged and i not in picked]
    st.session_state[PICK_KEY] = picked
    st.session_state[_SHOWN_KEY] = {key: tuple(ids)}
    return key


def selected(ids: Sequence[str], key: str) -> list[str]:
    """Every id selected now: rows ticked in the current table plus the multiselect, in the
    order of ``ids``, each at most once."""
    chosen = set(st.session_state.get(PICK_KEY) or [])
    chosen |= set(selected_in_tables().get(key, []))
    return [i for i in ids if i in chosen]
