"""Show user-provided and run-provided values inside Streamlit Markdown (no Streamlit here).

Every value that did not come from this code (URL parameters, typed ids, flag notes and user
names, run directory names, ids and texts from a run's tables, manifest values, exception
messages with paths) goes through one of these two functions before it is put into a Markdown
string (``st.markdown``, ``st.error``, ``st.title``, captions, subheaders, help texts):

* :func:`md_code` shows it as inline code (ids, run names, paths): a code span whose backtick
  fence is longer than any backtick run in the value, so a backtick cannot close it early;
* :func:`md_escape` shows it as plain text: the characters that start inline Markdown
  (emphasis ``*`` ``_`` ``~``, code spans (backticks), links and Streamlit's ``:red[...]``
  directives ``[`` ``]``, HTML and autolinks ``<`` ``>``, entities ``&``, LaTeX ``$``, tables
  ``|``, escapes ``\\``, attributes ``{`` ``}``) are backslash-escaped, and so are a colon
  before a letter and both colons (and a ``/``) of a ``:word:`` shortcode: ``:red[...]``,
  bare ``:name``, ``:smile:`` and ``:material/flag:`` are Streamlit directives, emoji and icons
  even with the brackets or only the first colon escaped (checked in Chromium); and a block
  marker at the very start (``#``, ``-``, ``+``, ``>``, ``=``, ``1.``), in case the value
  starts the Markdown.  Bare URLs (``https://...``, ``www....``) stay GitHub-style autolinks
  whose text is the URL itself.

Streamlit rewrites ``:material/`` to ``:material_`` before parsing, even inside code spans, so
such a value shows with ``_`` for ``/`` in :func:`md_code`; nothing else changes its text.

Both replace line breaks and other control characters by visible symbols (a newline would end
the paragraph, or start a heading or a list) and cut very long values (a 100 kB URL parameter
must not become a 100 kB error message).
"""

from __future__ import annotations

import re
import unicodedata

#: Longest value shown; longer ones are cut and end with "…".
MAX_CHARS = 200

_ESCAPE = {c: "\\" + c for c in "\\`*_~[]<>&$|{}"}
_BLOCK_START = re.compile(r"^(\s*)([#+\-=>]|\d+[.)])")
_SHORTCODE = re.compile(r":([A-Za-z0-9_+\-/]+):")
_DIRECTIVE = re.compile(r"(?<!\\):(?=[A-Za-z])")
_LINE_BREAKS = {"\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def _printable(value: object, limit: int) -> str:
    """``str(value)`` with line breaks as ``⏎``, other control characters as ``�``, cut to
    ``limit`` characters."""
    text = str(value)
    cut = len(text) > limit
    text = text[:limit]
    out = []
    for ch in text:
        if ch in _LINE_BREAKS:
            out.append("⏎")
        elif ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            out.append("�")
        else:
            out.append(ch)
    return "".join(out) + ("…" if cut else "")


def md_escape(value: object, limit: int = MAX_CHARS) -> str:
    """``value`` as literal Markdown text (no formatting, links, HTML or directives)."""
    text = "".join(_ESCAPE.get(ch, ch) for ch in _printable(value, limit))
    text = _SHORTCODE.sub(lambda m: "\\:" + m.group(1).replace("/", "\\/") + "\\:", text)
    text = _DIRECTIVE.sub(r"\\:", text)
    return _BLOCK_START.sub(lambda m: m.group(1) + m.group(2)[:-1] + "\\" + m.group(2)[-1],
                            text, count=1)


def md_code(value: object, limit: int = MAX_CHARS) -> str:
    """``value`` as a literal inline code span; ``*(empty)*`` for an empty string."""
    text = _printable(value, limit)
    if not text:
        return "*(empty)*"
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    # CommonMark strips one space on each side when both are present: pad when the value
    # starts or ends with a backtick (it would merge with the fence) or with a space.
    if text[0] in "` " or text[-1] in "` ":
        text = f" {text} "
    return f"{fence}{text}{fence}"
