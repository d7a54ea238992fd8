"""A run owns its output folder: one writer at a time, named when another one tries.

``OUTPUT_DIR/.mvmr.lock`` is held with an OS file lock (``filelock``: ``flock`` on POSIX), which
the kernel releases when the holder dies, even by ``kill -9``: a killed run never blocks its
``--resume``. Beside it ``.mvmr.lock.json`` names the holder (host, process id, command, start
time) for the one-line refusal a second writer gets. Training takes the lock on its main process
only; ``mvmr-export``, ``mvmr-evaluate --update-card`` and ``mvmr-align`` take the lock of the
run folder they write into.

Example::

    with hold_folder("runs/kd"):
        ...  # write into runs/kd
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

from filelock import FileLock, Timeout

from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import atomic_write

__all__ = ["LOCK_FILE", "FolderLock", "check_folder_free", "hold_folder"]

LOCK_FILE = ".mvmr.lock"
HOLDER_FILE = ".mvmr.lock.json"


def _holder(folder: Path) -> str:
    try:
        holder = json.loads((folder / HOLDER_FILE).read_text())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}: `{holder['command']}`"
    except (OSError, ValueError, KeyError):
        return "a process that did not say who it is"


def _refusal(folder: Path) -> ConfigError:
    return ConfigError(
        f"{folder} is in use by another run ({_holder(folder)}): wait for it to end, stop it, or "
        "choose another folder"
    )


class FolderLock:
    """The lock of ``folder``; :meth:`acquire` creates the folder, takes the lock or raises ConfigError."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._lock = FileLock(str(self.folder / LOCK_FILE))

    def acquire(self) -> None:
        """Take the lock now (never wait) and record this process as its holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise _refusal(self.folder) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        atomic_write(self.folder / HOLDER_FILE, lambda partial: partial.write_text(json.dumps(holder)))

    def release(self) -> None:
        self._lock.release()


def check_folder_free(folder: str | os.PathLike) -> None:
    """Raise ConfigError naming the holder when another process holds ``folder``'s lock; create nothing."""
    folder = Path(folder)
    if not (folder / LOCK_FILE).exists():
        return
    probe = FileLock(str(folder / LOCK_FILE))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        raise _refusal(folder) from None
    probe.release()


@contextmanager
def hold_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s lock for the block (an export or a card update into a run's folder)."""
    lock = FolderLock(folder)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
