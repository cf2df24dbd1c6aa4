"""``python -m engine``: see :mod:`engine.cli`."""

import sys

try:
    from engine.cli import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load
    print("interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
