"""Download buttons for exports.  Files are built only when clicked
(``st.download_button(data=callable, on_click="ignore")``), and the callables never call st.*.
Download names come from :func:`dashboard.export.export_file_name` (made safe)."""

from __future__ import annotations

import streamlit as st

from dashboard.export import FORMATS, MIME_TYPES, ExportBundle, build_export, export_file_name
from dashboard.filters import FilterSpec
from dashboard.flags import FlagStore, FlagStoreError
from engine.artifacts import Run


def export_buttons(run: Run, what: str, key: str, spec: FilterSpec | None = None,
                   test_id: str | None = None, n_rows: int | None = None) -> None:
    """Format choice plus two buttons: the zip bundle (data + manifest.json + ids.txt) and
    the data file alone.  When the flag store cannot be read, one error line instead."""
    store = FlagStore.beside_run(run.path)
    try:
        store.check()
    except FlagStoreError as exc:
        st.error(f"Cannot export: {exc}", icon=":material/error:")
        return
    c1, c2, c3 = st.columns([1, 2, 2], vertical_alignment="bottom")
    fmt = c1.selectbox("Format", FORMATS, key=f"{key}_format")

    def bundle() -> ExportBundle:
        return build_export(run, what, fmt, store, spec, test_id)

    rows = f" ({n_rows:,} rows)" if n_rows is not None else ""
    c2.download_button(f"Download zip{rows}", data=lambda: bundle().zip_bytes(),
                       file_name=export_file_name(run.run_id, what, test_id, "zip"),
                       mime=MIME_TYPES["zip"], on_click="ignore",
                       key=f"{key}_zip", icon=":material/download:")
    c3.download_button(f"Download {fmt} only", data=lambda: bundle().data_bytes(),
                       file_name=export_file_name(run.run_id, what, test_id, fmt),
                       mime=MIME_TYPES[fmt], on_click="ignore", key=f"{key}_data")
