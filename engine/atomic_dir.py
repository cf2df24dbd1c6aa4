"""Crash-safe directory writes: stage in a hidden sibling, then swap into place atomically.

Every directory the engine writes (a run, a run's ``validation/``) is built in a staging
directory ``.<name>.partial-XXXXXXXX`` beside its destination, which holds a marker file
(:data:`STAGING_MARKER`) locked with ``flock`` while its writer lives.  Once complete it is put in
place by one atomic step:

* destination absent: ``rename(2)``;
* destination present (``--overwrite``): Linux ``renameat2(RENAME_EXCHANGE)`` swaps the two
  directories in one system call, so at every instant the path holds the complete old or the
  complete new directory; the old one, now at the staging path, is then deleted.  Where the
  exchange is not available (another OS or file system) two renames are used with the old
  directory parked in ``.<name>.old-XXXXXXXX``; a crash between them is repaired by
  :func:`recover` on the next start.

SIGINT and SIGTERM are deferred during the swap (:func:`signals_deferred`).  :func:`recover`
deletes only what this module created: hidden staging/parking directories of this destination
whose writer is gone and that carry the marker or a run manifest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.pause_points import pause_point

STAGING_MARKER = ".influence-staging"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; ``False`` where the OS or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then act on the first one as usual.

    Python-level handlers, not a signal mask: a process-directed signal may be delivered to
    any thread (torch's workers), and Python runs handlers in the main thread anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending:
            handler = old[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


class Staging:
    """A staging directory for ``dest``; its marker stays locked until :meth:`close`."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp's 0700 would hide finished results from other users of a shared directory.
        os.chmod(self.path, 0o777 & ~umask)
        self._lock = os.open(self.path / STAGING_MARKER, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def swap_into_place(self, check_replaceable: Callable[[Path], None] | None = None) -> None:
        """Put the staged directory at ``dest`` (see the module docstring).

        ``check_replaceable(dest)`` runs right before an existing ``dest`` is replaced and may
        raise to refuse; an existing ``dest`` without it is refused.
        """
        dest = self.dest
        old: Path | None = None
        try:
            with signals_deferred():
                pause_point("swap")
                if not dest.exists() and not dest.is_symlink():
                    os.rename(self.path, dest)
                else:
                    if check_replaceable is None:
                        raise FileExistsError(f"{dest} already exists")
                    check_replaceable(dest)
                    if exchange(self.path, dest):
                        old = self.path      # now holds the previous directory
                    else:
                        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-",
                                                    dir=dest.parent))
                        os.replace(dest, old / dest.name)
                        os.rename(self.path, dest)
                self.path = dest
                (dest / STAGING_MARKER).unlink(missing_ok=True)
        finally:
            # Also when a deferred signal is raised as the block ends.
            if old is not None and self.path == dest:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Release the lock; remove the staging directory if it was not swapped into place."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
        if self.path != self.dest:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _writer_alive(marker: Path) -> bool:
    try:
        fd = os.open(marker, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def recover(dest: Path, is_ours: Callable[[Path], bool]) -> list[str]:
    """Repair what an interrupted write of ``dest`` left; returns what was done, one line each.

    A parked previous directory (``.<name>.old-*/<name>``) goes back to ``dest`` when ``dest``
    is missing.  Leftover staging or parking directories are deleted only when no writer holds
    them and ``is_ours`` (e.g. "has a valid run manifest") or the staging marker says they were
    made here.
    """
    done: list[str] = []
    parent = dest.parent
    if not parent.is_dir():
        return done
    for park in sorted(parent.glob(f".{dest.name}.old-*")):
        inner = park / dest.name
        if inner.is_dir() and not dest.exists() and is_ours(inner):
            os.rename(inner, dest)
            done.append(f"restored {dest} from an interrupted replacement")
        if inner.exists() and not is_ours(inner):
            continue
        shutil.rmtree(park, ignore_errors=True)
        done.append(f"removed leftover {park.name}")
    for staged in sorted(parent.glob(f".{dest.name}.partial-*")):
        marker = staged / STAGING_MARKER
        if not staged.is_dir() or (marker.exists() and _writer_alive(marker)):
            continue
        if marker.exists() or is_ours(staged):
            shutil.rmtree(staged, ignore_errors=True)
            done.append(f"removed leftover {staged.name} of an interrupted write")
    return done
