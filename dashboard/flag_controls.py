"""Flagging widgets: reason / note inputs, the checkbox table (``st.data_editor``) and
"flag all shown" with a confirmation step.

Edits are written to the SQLite store in ``on_change`` callbacks keyed by example id (the editor
reports row positions, so positions are mapped through the ids of the frame it was given).  The
checkbox column is rebuilt from the store on every run, and the editor key changes whenever the
rows or their flags change, so the editor never shows stale state.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import pandas as pd
import streamlit as st

from dashboard import session
from dashboard.flags import REASONS, FlagStore, FlagStoreError
from engine.artifacts import Run

REASON_KEY = "flag_reason"
NOTE_KEY = "flag_note"
CONFIRM_KEY = "flag_all_pending"
ERROR_KEY = "flag_store_error"
TOAST_KEY = "flag_all_done"
T = TypeVar("T")


def guarded_write(write: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Run a flag-store write; on failure (read-only directory, locked, damaged or non-SQLite
    database) keep a one-line message for :func:`show_store_error` instead of raising.
    Returns success."""
    try:
        write(*args, **kwargs)
        return True
    except FlagStoreError as exc:
        st.session_state[ERROR_KEY] = f"Could not save flags: {exc}"
        return False
    except (sqlite3.Error, OSError) as exc:
        st.session_state[ERROR_KEY] = (
            f"Could not save flags: {exc}. The flag store is `flags.sqlite` beside the run "
            "directory; check that this directory is writable.")
        return False


def guarded_read(read: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a flag-store read (``store.flags``, ``store.flagged_ids``, ``store.history``); when
    the store cannot be read (damaged or non-SQLite file, unreadable) show its one-line
    :class:`~dashboard.flags.FlagStoreError` message and stop the page instead of a traceback:
    showing the page as if nothing were flagged would be wrong."""
    try:
        return read(*args, **kwargs)
    except FlagStoreError as exc:
        st.error(f"Cannot read flags: {exc}", icon=":material/error:")
        st.stop()
        raise  # unreachable; keeps type checkers happy


def show_store_error() -> None:
    """Show (once) the error of the last failed flag-store write, if any."""
    message = st.session_state.pop(ERROR_KEY, None)
    if message:
        st.error(message, icon=":material/error:")


def reason_inputs(container: st.delta_generator.DeltaGenerator | None = None) -> None:
    """Reason (select) and optional note used for every new flag in this session."""
    where = container or st
    show_store_error()
    c1, c2 = where.columns([1, 2])
    c1.selectbox("Reason for new flags", REASONS, key=REASON_KEY, persist_state="session")
    c2.text_input("Note for new flags (optional)", key=NOTE_KEY, persist_state="session")


def _reason() -> tuple[str, str]:
    return (st.session_state.get(REASON_KEY) or REASONS[0],
            st.session_state.get(NOTE_KEY) or "")


def _persist_edits(editor_key: str, ids: Sequence[str], store: FlagStore, run_id: str,
                   test_id: str | None) -> None:
    """``on_change`` of the editor: write checked / unchecked boxes to the store."""
    edits = (st.session_state.get(editor_key) or {}).get("edited_rows", {})
    to_flag, to_unflag = [], []
    for pos, change in edits.items():
        if "flagged" not in change:
            continue
        (to_flag if change["flagged"] else to_unflag).append(ids[int(pos)])
    reason, note = _reason()
    user = session.user_name()
    if guarded_write(store.flag, run_id, to_flag, reason, note, user, test_id):
        guarded_write(store.unflag, run_id, to_unflag, user)


def flag_editor(run: Run, frame: pd.DataFrame, display: pd.DataFrame, config: dict,
                key: str, test_id: str | None, height: int | str = "auto",
                style: Callable[[pd.DataFrame], Any] | None = None,
                stage: str = "pretrain") -> None:
    """Editable table: ``display`` plus a leading ``flagged`` checkbox column taken from
    ``frame["flagged"]`` (same row order as ``display``).  ``style`` (optional) turns the
    table into a pandas Styler; its colours apply to the read-only columns only.  ``stage``:
    which flag store the boxes write to (pretraining or finetuning examples)."""
    ids = tuple(frame["example_id"])
    flagged = frame["flagged"].to_numpy(dtype=bool)
    signature = hashlib.sha1(repr((run.run_id, ids, flagged.tobytes())).encode()).hexdigest()
    editor_key = f"{key}_{signature[:12]}"
    table = display.copy()
    table.insert(0, "flagged", flagged)
    config = dict(config, flagged=st.column_config.CheckboxColumn(
        "flag", width=70, help="Tick to flag, untick to unflag (saved at once)"))
    st.data_editor(
        style(table) if style is not None else table, key=editor_key, hide_index=True,
        column_config=config, height=height,
        disabled=[c for c in table.columns if c != "flagged"], row_height=40,
        on_change=_persist_edits,
        args=(editor_key, ids, session.flag_store(run, stage), run.run_id, test_id))


def _flag_all(store: FlagStore, run_id: str, ids: Sequence[str], test_id: str | None) -> None:
    reason, note = _reason()
    st.session_state.pop(CONFIRM_KEY, None)
    if guarded_write(store.flag, run_id, ids, reason, note, session.user_name(), test_id,
                     overwrite=False):
        # Shown by flag_all_shown on the rerun: a callback of a widget inside a fragment must
        # not display elements itself.
        st.session_state[TOAST_KEY] = f"Flagged {len(ids)} examples as {reason!r}"


def flag_all_shown(run: Run, ids: Sequence[str], test_id: str | None,
                   helpful_ids: Collection[str] = ()) -> None:
    """"Flag all N shown" button; flags only after an explicit confirmation.  Examples that are
    already flagged keep their reason.

    When some of the shown examples are helpful (``helpful_ids``: total > 0, removing them is
    predicted to raise this test point's loss), the confirmation says how many and offers to
    flag only the harmful ones (key ``flag_all_harmful``)."""
    ids = tuple(ids)
    helpful = set(helpful_ids)
    done = st.session_state.pop(TOAST_KEY, None)
    if done:
        st.toast(done, icon=":material/flag:")
    if st.button(f"Flag all {len(ids)} shown…", key="flag_all", disabled=not ids):
        st.session_state[CONFIRM_KEY] = ids
    if st.session_state.get(CONFIRM_KEY) == ids and ids:
        reason, _ = _reason()
        n_helpful = sum(1 for e in ids if e in helpful)
        others = tuple(e for e in ids if e not in helpful)
        store = session.flag_store(run)
        if n_helpful:
            st.warning(
                f"Flag all {len(ids)} examples shown as **{reason}**? **{n_helpful} of them are "
                f"helpful** (total > 0): removing them is predicted to *raise* this test "
                f"point's loss. Flag only the {len(others)} harmful ones instead?",
                icon=":material/warning:")
        else:
            st.warning(f"Flag all {len(ids)} examples shown as **{reason}**?")
        c1, c2, c3, _ = st.columns([1.3, 1.6, 1, 2.5])
        c1.button(f"Confirm: flag all {len(ids)}", key="flag_all_confirm",
                  type="secondary" if n_helpful else "primary", on_click=_flag_all,
                  args=(store, run.run_id, ids, test_id))
        if n_helpful:
            c2.button(f"Flag only the {len(others)} harmful", key="flag_all_harmful",
                      type="primary", disabled=not others, on_click=_flag_all,
                      args=(store, run.run_id, others, test_id))
        c3.button("Cancel", key="flag_all_cancel",
                  on_click=lambda: st.session_state.pop(CONFIRM_KEY, None))
