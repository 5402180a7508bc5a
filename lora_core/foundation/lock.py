"""One process at a time per subject folder: a lock file naming its holder.

Two runs on one subject (the same command twice, or the command line while a
deployment trains it) would train the same epoch into the same files. The
lock is an OS lock (`flock`) on `.pipeline/lock`, so it dies with its process
however that ends (SIGKILL included) and a stale lock is simply taken over;
the file's text names the holder (pid, host, command, start time) for the
message the second process shows. On Windows, `msvcrt.locking` plays the part
of `flock`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_core.foundation.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = ["SubjectBusyError", "holder", "subject_lock"]


class SubjectBusyError(UserError):
    """Another process is working on this subject folder."""


def holder(path: Path) -> dict:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def subject_lock(path: Path, folder: Path) -> Iterator[dict]:
    """Hold the lock at `path` for work on `folder`; yields the stale holder taken over ({} if none).

    Raises `SubjectBusyError` at once, naming the other process, when it is held.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, path, folder)
        stale = holder(path)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        mine["command"] = " ".join(sys.argv)[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)  # released: an empty file is nobody's
    finally:
        os.close(fd)  # closing drops the flock


def _acquire(fd: int, path: Path, folder: Path) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError on POSIX, PermissionError on Windows: someone holds it
        raise _busy(path, folder) from None


def _busy(path: Path, folder: Path) -> SubjectBusyError:
    other = holder(path)
    who = (
        f"pid {other.get('pid')} on {other.get('host')}, since {other.get('started')} ({other.get('command')})"
        if other
        else "another process"
    )
    return SubjectBusyError(
        f"{folder} is in use by {who}: wait for it to finish or stop it, then run again "
        f"(the lock is {path}; it goes when that process ends)"
    )
