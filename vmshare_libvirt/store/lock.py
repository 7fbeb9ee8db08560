"""The store lock: one vmshare operation at a time.

``fcntl.flock`` on ``<store_dir>/lock``: the kernel releases it when the holder
dies, even by kill -9, so a stale lock cannot exist.  The holder writes its pid
and operation kind into the file so a refused caller can say who holds it.
Readers (status, the hook) never take the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .. import statedb
from ..errors import BusyError, StoreError
from .records import LockHolder

_POLL = 0.05


def read_holder(lock_path: Path) -> LockHolder | None:
    """Who the lock file says holds (or last held) the lock."""
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if not text:
        return None
    pid_text, _, kind = text.partition(" ")
    return LockHolder(int(pid_text) if pid_text.isdigit() else None, kind or "unknown")


class StoreLock:
    """Re-entrant (within one Store object) exclusive lock on the store directory."""

    def __init__(self, store_dir: Path):
        self.path = Path(store_dir) / statedb.LOCK_NAME
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def hold(self, wait: bool = True, timeout: float | None = None, kind: str = "operation") -> Iterator[None]:
        """Hold the lock for the ``with`` body.

        ``wait=False`` tries once; ``wait=True`` waits, at most ``timeout``
        seconds when given.  Raises :class:`BusyError` naming the holder when
        the lock is not obtained.
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._acquire(wait, timeout, kind)
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            self._release()

    def _acquire(self, wait: bool, timeout: float | None, kind: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the store lock: {exc.strerror}", target=str(self.path)) from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait or (deadline is not None and time.monotonic() >= deadline):
                        raise self._busy() from None
                    if deadline is None:
                        fcntl.flock(fd, fcntl.LOCK_EX)  # block until the holder ends or dies
                        break
                    time.sleep(_POLL)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {kind}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the holder line is informational only
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def _busy(self) -> BusyError:
        holder = read_holder(self.path)
        if holder is None:
            who = "another vmshare operation is running"
        else:
            pid = holder.pid if holder.pid is not None else "unknown"
            who = f"another vmshare operation (pid {pid}, kind {holder.kind}) is running"
        return BusyError(who, target=str(self.path.parent), hint="wait for it to finish, or retry with a wait")
