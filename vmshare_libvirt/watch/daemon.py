"""The daemon behind ``vmshare watch``: the main loop, signals and the one-watcher-per-store lock.

The main thread does all the work (libvirt calls, the store, the engine), so
the store is used from one thread only; libvirt's event thread only queues
items (:mod:`.connection`).  One turn of the loop either (re)connects and
reconciles, or serves one queued event and the timers.  A piece of work that
fails is logged and the loop goes on; a failure with a dead connection leads
to a reconnect.  SIGTERM/SIGINT end the loop between two pieces of work; a
second signal interrupts the work itself (the journal makes that safe:
``vmshare recover``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..errors import BusyError, VmshareError
from ..store import open_store
from ..store.lock import LockFile
from ..store.records import JOB_QUEUED
from .connection import ConnectionClosed, Item, Link, ensure_event_loop
from .jobs import EnrollFn, Enroller
from .outcome import Done, DoneLog
from .policy import Action, classify
from .reconcile import Reconciler
from .resyncs import ResyncTrigger

log = logging.getLogger(__name__)

WATCH_LOCK_NAME = "watch.lock"


class InstanceLock:
    """One watcher per store: an flock on ``<store_dir>/watch.lock`` (see :class:`~vmshare_libvirt.store.lock.LockFile`)."""

    def __init__(self, store_dir: Path | str):
        self._file = LockFile(Path(store_dir) / WATCH_LOCK_NAME, "the watcher lock")

    def acquire(self) -> None:
        """Take the lock; :class:`BusyError` naming the other watcher's pid when it is held."""
        if not self._file.acquire(wait=False, kind="watch"):
            holder = self._file.holder()
            pid = holder.pid if holder is not None and holder.pid is not None else "unknown"
            raise BusyError(f"another vmshare watcher (pid {pid}) serves this store", target=str(self._file.path))

    def release(self) -> None:
        self._file.release()


class Watcher:
    """The daemon.  ``run()`` serves until stopped; ``run(once=True)`` reconciles, runs due jobs and returns.

    ``enroll_fn`` replaces the enrollment engine (tests); ``connect`` replaces
    :func:`~vmshare_libvirt.libvirt_conn.open_connection` (tests); ``store`` is
    an open store to use instead of opening (and closing) one.
    """

    def __init__(self, cfg: Config, uri: str | None = None, *, enroll_fn: EnrollFn | None = None,
                 connect: Callable[[str], Any] | None = None, store: Any = None):
        self.cfg = cfg
        self.uri = uri or cfg.libvirt_uri
        self.link = Link(self.uri, cfg.watch, connect)
        self.done_log = DoneLog()
        self.store = store
        self._owns_store = store is None
        self._enroll_fn = enroll_fn
        self._stopping = False
        self._instance_lock = InstanceLock(cfg.store_dir)
        self.enroller: Enroller | None = None
        self.resyncs: ResyncTrigger | None = None
        self.reconciler: Reconciler | None = None
        if store is not None:
            self._attach(store)

    def _attach(self, store: Any) -> None:
        self.store = store
        self.enroller = Enroller(self.cfg, store, self.done_log, self._enroll_fn, self.stopping)
        self.resyncs = ResyncTrigger(self.cfg.resync, store, self.done_log)
        self.reconciler = Reconciler(store, self.enroller, self.done_log, self.stopping)

    @property
    def conn(self) -> Any:
        """The current libvirt connection, None while disconnected."""
        return self.link.conn

    @property
    def done(self) -> list[Done]:
        """Everything done so far, in order."""
        return self.done_log.entries

    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Ask the main loop to end (safe from a signal handler: only sets a flag)."""
        self._stopping = True

    # ---- life cycle ----------------------------------------------------------

    def run(self, once: bool = False) -> int:
        if self.store is None:
            self._attach(open_store(self.cfg.store_dir, create=True))
        try:
            self._instance_lock.acquire()
            requeued = self.store.requeue_running_jobs()
            if requeued:
                log.info("put %d job(s) left running by an earlier watcher back in the queue", requeued)
            if once:
                self.link.open(events=False)
                self.reconcile()
                return 0
            self._serve()
            return 0
        finally:
            self.link.close()
            self._instance_lock.release()
            if self._owns_store and self.store is not None:
                self.store.close()
                self.store = None

    def _serve(self) -> None:
        ensure_event_loop()
        old_handlers = self._install_signal_handlers()
        try:
            log.info("watching %s (store %s)", self.uri, self.cfg.store_dir)
            while not self._stopping:
                self.step()
        finally:
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
        log.info("stopped")

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stopping:
                raise KeyboardInterrupt  # second signal: interrupt the work itself
            self._stopping = True

        return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    # ---- the main loop -------------------------------------------------------------

    def step(self) -> None:
        """One turn of the main loop: (re)connect and reconcile, or serve one queued item and the timers."""
        if self.link.conn is None:
            if self.link.reconnect():
                log.info("connected to %s; reconciling", self.uri)
                self._guarded(self.reconcile)
            return
        item = self.link.next_event()
        if item is not None:
            self._guarded(self.handle, item)
        if self.link.conn is not None:
            self._guarded(self.run_timers)

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run one piece of work; a failure with a dead connection leads to a reconnect, a bug to a log line."""
        try:
            fn(*args)
        except VmshareError as exc:
            if self.link.conn is not None and not self.link.alive():
                self.link.lost(str(exc))
            else:
                log.warning("%s", exc)
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - the daemon outlives its own bugs
            log.exception("unexpected error")

    def run_timers(self) -> None:
        """What is due besides events: the keepalive check, retries after a busy store."""
        if not self.link.check_alive():
            return
        self.enroller.run_timers(self.conn, time.monotonic())
        if self.resyncs.tick():
            self.enroller.run_due_jobs(self.conn)

    def handle(self, item: Item) -> None:
        """Serve one item from the event queue."""
        if isinstance(item, ConnectionClosed):
            self.link.closed(item)
            return
        action = classify(item.event, item.detail)
        log.debug("event %s/%s for %s -> %s", item.event, item.detail, item.domain,
                  action.value if action else "nothing")
        if action is not None:
            self.apply(action, item.domain)

    # ---- the work -----------------------------------------------------------------

    def apply(self, action: Action, name: str) -> None:
        """Do what ``action`` asks for domain ``name`` (what an event leads to)."""
        if action in (Action.ADDED, Action.CONSIDER, Action.RENAMED):
            self.enroller.renewed(name)  # a new definition deserves a new look
            if action is Action.ADDED:
                self.enroller.defined(self.conn, name)
            elif action is Action.RENAMED:
                self.reconciler.follow_rename(self.conn, name)
            self.enroller.consider(self.conn, name)
        elif action is Action.STOPPED:
            if any(job.wait_for for job in self.store.jobs(state=JOB_QUEUED, domain=name)):
                self.store.record_stop(name)
            self.enroller.stopped(name)
            self.enroller.run_due_jobs(self.conn)
        elif action is Action.UNDEFINED:
            self.reconciler.forget(name)

    def reconcile(self) -> None:
        """Catch up with libvirt (events are not replayed); see :mod:`.reconcile`."""
        self.reconciler.reconcile(self.conn)

    def consider(self, name: str, dom: Any = None) -> str | None:
        """Automatic enrollment of one domain; see :meth:`.jobs.Enroller.consider`."""
        return self.enroller.consider(self.conn, name, dom)

    def run_due_jobs(self) -> list[Done]:
        """Claim and run every job that may run now; returns what was done."""
        return self.enroller.run_due_jobs(self.conn)
