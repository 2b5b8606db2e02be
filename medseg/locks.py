"""One lock-file rule for every writer that must not run twice at once: ``flock`` on a small file
holding "pid N on HOST" (NFS emulates flock with fcntl locks), taken at once or waited for.

Used by ``medseg infer`` (an output being written), its cohort summary and ``medseg compare`` (a
report folder). A lock file removed on release is re-taken if another process removed it between
our open and our lock (the inode check), so a waiter never holds a lock on a deleted file.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path


class LockHeld(Exception):
    """The lock is held by another process; ``holder`` is what it wrote ("pid N on HOST")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def held(lock: Path, *, wait: bool = False, remove: bool = True) -> Iterator[None]:
    """Hold ``lock`` (created if missing). ``wait=False``: raise :class:`LockHeld` at once when
    another process holds it. ``remove``: delete the file on release. OSError (a folder one cannot
    write) reaches the caller, which knows what to call it."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(holder) from None
        try:  # the previous holder may have removed the file between our open and our lock: retry
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(lock)
        os.close(fd)
