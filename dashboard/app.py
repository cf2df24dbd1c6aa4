"""Streamlit entry point of the influence dashboard.

    python -m streamlit run dashboard/app.py -- --runs-dir runs

Started from the repository root, Streamlit reads ``.streamlit/config.toml`` there, which binds
the server to 127.0.0.1 (not Streamlit's default of every interface), headless, without usage
statistics; ``--server.address`` on the command line overrides it (the Docker image does).

Runs are read from ``--runs-dir`` (after ``--``), else ``$INFLUENCE_RUNS_DIR``, else ``runs/``.
The dashboard only reads runs (never trains or fits anything); flags go to
``<runs dir>/flags.sqlite``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from dashboard import legend, session  # noqa: E402

st.set_page_config(page_title="Influence dashboard", page_icon=":material/troubleshoot:",
                   layout="wide")

PAGES = [
    st.Page("views/overview.py", title="Overview", url_path="overview", default=True,
            icon=":material/dashboard:"),
    st.Page("views/test_point.py", title="Test point", url_path="test-point",
            icon=":material/target:"),
    st.Page("views/example.py", title="Pretraining example", url_path="example",
            icon=":material/image:"),
    st.Page("views/flag_list.py", title="Flags", url_path="flags", icon=":material/flag:"),
    st.Page("views/compare.py", title="Compare runs", url_path="compare",
            icon=":material/compare_arrows:"),
]

page = st.navigation(PAGES)
session.follow_page_request()
legend.show()
run_dir = session.run_picker()
session.sidebar_identity()
if run_dir is None:
    st.stop()
try:
    page.run()
except session.PAGE_ERRORS as exc:  # run files changed / unreadable, flag store, bad data
    session.show_page_error(exc)
    st.stop()
