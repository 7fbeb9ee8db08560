"""The event daemon behind ``vmshare watch``.

It keeps the store in step with libvirt and runs the work that waits for a
guest to stop:

- a domain is defined (or its definition changes, or it is renamed) → consider
  it for automatic enrollment: the ``auto_enroll`` policy (on/off, name
  patterns, optional ``<vmshare:enroll/>`` metadata element) decides whether
  it is a candidate; a running candidate gets an ``enroll`` job that waits for
  it to stop (enrollment never delays or breaks a start); an offline one is
  handed to the enrollment engine, which enrolls it, consolidates it with a
  matching standalone domain, remembers its inventory or says why it skipped;
- a domain stops → record the stop (the hook records it too, at ``release
  end``) and run the jobs that were waiting for it;
- a domain is undefined → drop its disks from their group (the overlay stays a
  valid image; the bases stay while anything uses them) and forget its
  inventory.

Events are not replayed, so at start-up and after every reconnect the watcher
reconciles with ``listAllDomains()``: members and inventory of domains that
vanished are dropped (or follow a rename), stops that happened while it was
away are recorded, domains it has never seen are considered, and due jobs run.

Threads: libvirt's default event loop runs in a daemon thread; the callbacks
there only put items on a queue.  The main thread does everything else (libvirt
calls, the store, the engine), so the store is used from one thread only.  All
disk work goes through the engine, which takes the store lock; when another
vmshare command holds it (:class:`~vmshare_libvirt.errors.BusyError`) the work
is retried after ``watch.retry_busy_s``.  Keepalive plus a close callback notice
a libvirtd restart; the watcher reconnects with an exponential backoff.  One
watcher per store (``<store_dir>/watch.lock``).  SIGTERM/SIGINT end it between
two pieces of work; a second signal interrupts the work itself (the journal
makes that safe: ``vmshare recover``).
"""

from __future__ import annotations

import enum
import fcntl
import logging
import logging.handlers
import os
import queue
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import libvirt

from .config import AutoEnrollPolicy, Config
from .errors import BusyError, ConnectionError_, VmshareError

log = logging.getLogger(__name__)

ENROLL_NS = "https://vmshare.invalid/1"
ENROLL_TAG = f"{{{ENROLL_NS}}}enroll"
WATCH_LOCK_NAME = "watch.lock"
#: Job kinds this watcher runs; other kinds stay queued for whoever handles them.
JOB_KINDS = ("enroll",)
#: Stop records older than this that no queued job waits for are pruned at each reconcile.
EVENT_RETENTION_S = 7 * 24 * 3600
#: How long the main loop blocks on the event queue before looking at timers and flags.
TICK_S = 0.5
#: How often the main loop asks libvirt whether the connection is still alive.
ALIVE_CHECK_S = 5.0


# ---- pure logic: events, policy, backoff ----------------------------------------

class Action(str, enum.Enum):
    CONSIDER = "consider"  # a domain appeared or changed: maybe enroll it
    RENAMED = "renamed"  # a domain's new name: its members follow, then consider it
    STOPPED = "stopped"  # run the jobs waiting for it
    UNDEFINED = "undefined"  # drop it from its group


_DEFINED_ACTIONS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED: Action.CONSIDER,
    libvirt.VIR_DOMAIN_EVENT_DEFINED_UPDATED: Action.CONSIDER,
    libvirt.VIR_DOMAIN_EVENT_DEFINED_RENAMED: Action.RENAMED,
    # DEFINED_FROM_SNAPSHOT: a snapshot revert; a domain with snapshots is never enrolled.
}

# Stops after which the disk is really free.  Not SAVED (saved RAM belongs to
# that disk), not MIGRATED (the guest runs on elsewhere, maybe on this very
# disk over shared storage), not FROM_SNAPSHOT (it has snapshots).
_FREEING_STOPS = frozenset({
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED,
})


def classify(event: int, detail: int) -> Action | None:
    """What a lifecycle event (``event``, ``detail``) asks of the watcher; None: nothing."""
    if event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
        return _DEFINED_ACTIONS.get(detail)
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        return Action.STOPPED if detail in _FREEING_STOPS else None
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        # UNDEFINED_RENAMED is the old name of a rename: DEFINED_RENAMED follows.
        return Action.UNDEFINED if detail == libvirt.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED else None
    return None


def has_enroll_metadata(xml: str) -> bool:
    """True when the domain XML carries ``<metadata><vmshare:enroll xmlns:vmshare="https://vmshare.invalid/1"/>``.

    The namespace decides, not the prefix; anything unparsable counts as absent.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return False
    metadata = root.find("metadata")
    return metadata is not None and any(child.tag == ENROLL_TAG for child in metadata)


def policy_refusal(policy: AutoEnrollPolicy, name: str, xml: str) -> str | None:
    """Why the ``auto_enroll`` policy keeps ``name`` out of automatic enrollment; None: it is a candidate.

    ``min_saving_bytes`` needs a plan, so the engine applies it.
    """
    if not policy.enabled:
        return "automatic enrollment is off (auto_enroll.enabled)"
    if not policy.admits_name(name):
        return "name not admitted by auto_enroll.include/exclude"
    if policy.require_metadata and not has_enroll_metadata(xml):
        return f"no <vmshare:enroll xmlns:vmshare=\"{ENROLL_NS}\"/> in its <metadata> (auto_enroll.require_metadata)"
    return None


class Backoff:
    """Exponential delays: ``initial``, ``initial*factor``, ... capped at ``maximum``; :meth:`reset` restarts."""

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, factor: float = 2.0):
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial, self.maximum, self.factor = float(initial), float(maximum), float(factor)
        self._next = self.initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


# ---- logging ------------------------------------------------------------------

def setup_logging(target: str = "auto", debug: bool = False) -> logging.Handler:
    """Send the package's log records to syslog (``/dev/log``) or stderr.

    ``auto`` means syslog when ``/dev/log`` exists, else stderr.  Returns the
    handler (tests remove it again).
    """
    if target not in ("auto", "syslog", "stderr"):
        raise ValueError(f"unknown log target {target!r}")
    handler: logging.Handler
    if target == "syslog" or (target == "auto" and os.path.exists("/dev/log")):
        handler = logging.handlers.SysLogHandler(address="/dev/log",
                                                 facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"vmshare-watch[{os.getpid()}]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s vmshare-watch %(levelname)s %(message)s"))
    package = logging.getLogger("vmshare_libvirt")
    package.addHandler(handler)
    package.setLevel(logging.DEBUG if debug else logging.INFO)
    package.propagate = False  # the CLI's stderr handler on the root logger would repeat everything
    return handler


def remove_logging(handler: logging.Handler) -> None:
    """Undo :func:`setup_logging` (the CLI runs in-process in tests)."""
    package = logging.getLogger("vmshare_libvirt")
    package.removeHandler(handler)
    package.propagate = True
    package.setLevel(logging.NOTSET)
    handler.close()


# ---- libvirt's event loop -----------------------------------------------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process).

    Must run before the connection that should deliver events is opened.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _loop_thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        _loop_thread.start()


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # noqa: BLE001 - the loop must outlive one bad iteration
            log.exception("libvirt event loop iteration failed")
            time.sleep(1)


# ---- the daemon ---------------------------------------------------------------------

EnrollFn = Callable[..., Any]  # enroll(cfg, conn, store, domain, group=None, progress=None) -> EnrollOutcome


@dataclass(frozen=True)
class Done:
    """One thing the watcher did (``vmshare watch --once`` prints these)."""

    domain: str
    what: str  # enrolled, queued, consolidated, remembered, already, skipped, dropped, renamed, busy, failed, ...
    detail: str = ""
    job: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "what": self.what, "detail": self.detail, "job": self.job}


def _load_engine() -> EnrollFn | None:
    try:
        from .engine.enroll import enroll
    except ImportError as exc:
        log.warning("enrollment engine not available (%s); enrollment work stays queued", exc)
        return None
    return enroll


class Watcher:
    """The daemon.  ``run()`` serves until stopped; ``run(once=True)`` reconciles, runs due jobs and returns.

    ``enroll_fn`` replaces the enrollment engine (tests); ``connect`` replaces
    :func:`~vmshare_libvirt.libvirt_conn.open_connection` (tests).
    """

    def __init__(self, cfg: Config, uri: str | None = None, *, enroll_fn: EnrollFn | None = None,
                 connect: Callable[[str], Any] | None = None, store=None):
        self.cfg = cfg
        self.uri = uri or cfg.libvirt_uri
        self.conn: Any = None
        self.store = store
        self.done: list[Done] = []
        self._owns_store = store is None
        self._enroll_fn = enroll_fn
        self._engine_loaded = enroll_fn is not None
        self._connect_fn = connect
        self._queue: queue.Queue = queue.Queue()
        self._stopping = False
        self._conn_serial = 0
        self._event_cb_id: int | None = None
        self._backoff = Backoff(1.0, float(cfg.watch.reconnect_max_s))
        self._reconnect_at = 0.0
        self._alive_checked = 0.0
        self._retry_at: dict[str, float] = {}  # domain -> when to consider it again (store was busy)
        self._jobs_at: float | None = None  # when to try queued jobs again (store busy, engine missing)
        self._skipped: dict[str, str] = {}  # domain -> why the engine skipped it (until its next event)
        self._lock_fd: int | None = None

    # ---- life cycle ----------------------------------------------------------

    def run(self, once: bool = False) -> int:
        if self.store is None:
            from .store import open_store

            self.store = open_store(self.cfg.store_dir, create=True)
        try:
            self._take_instance_lock()
            requeued = self.store.requeue_running_jobs()
            if requeued:
                log.info("put %d job(s) left running by an earlier watcher back in the queue", requeued)
            if once:
                self._connect(events=False)
                self.reconcile()
                return 0
            ensure_event_loop()
            old_handlers = self._install_signal_handlers()
            try:
                log.info("watching %s (store %s)", self.uri, self.cfg.store_dir)
                while not self._stopping:
                    self._step()
            finally:
                for signum, handler in old_handlers.items():
                    signal.signal(signum, handler)
            log.info("stopped")
            return 0
        finally:
            self._disconnect()
            self._release_instance_lock()
            if self._owns_store and self.store is not None:
                self.store.close()
                self.store = None

    def stop(self) -> None:
        """Ask the main loop to end (safe from a signal handler: only sets a flag)."""
        self._stopping = True

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stopping:
                raise KeyboardInterrupt  # second signal: interrupt the work itself
            self._stopping = True

        return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _take_instance_lock(self) -> None:
        path = Path(self.cfg.store_dir) / WATCH_LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(f"another vmshare watcher (pid {holder}) serves this store", target=str(path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_instance_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- the connection ------------------------------------------------------

    def _connect(self, events: bool = True) -> None:
        if self._connect_fn is not None:
            conn = self._connect_fn(self.uri)
        else:
            from .libvirt_conn import open_connection

            conn = open_connection(self.uri)
        if events:
            self._conn_serial += 1
            serial = self._conn_serial
            try:
                conn.setKeepAlive(self.cfg.watch.keepalive_interval_s, self.cfg.watch.keepalive_count)
                conn.registerCloseCallback(self._on_close, serial)
                self._event_cb_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, serial)
            except libvirt.libvirtError as exc:
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass
                raise ConnectionError_(f"cannot subscribe to domain events: {exc.get_error_message()}",
                                       target=self.uri) from exc
        self.conn = conn
        self._alive_checked = time.monotonic()

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self._event_cb_id is not None:
            try:
                conn.domainEventDeregisterAny(self._event_cb_id)
            except libvirt.libvirtError:
                pass
            self._event_cb_id = None
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def _lost(self, why: str) -> None:
        log.warning("libvirt connection lost (%s); reconnecting", why)
        self._disconnect()
        self._reconnect_at = time.monotonic()

    # Callbacks run in the event-loop thread: queue, nothing else.
    def _on_lifecycle(self, conn, dom, event, detail, serial) -> None:
        try:
            self._queue.put(("lifecycle", serial, dom.name(), event, detail))
        except Exception:  # noqa: BLE001 - never raise into libvirt's loop
            pass

    def _on_close(self, conn, reason, serial) -> None:
        self._queue.put(("closed", serial, reason))

    # ---- the main loop -------------------------------------------------------------

    def _step(self) -> None:
        """One turn of the main loop: (re)connect, or serve one queued item and the timers."""
        now = time.monotonic()
        if self.conn is None:
            if now < self._reconnect_at:
                time.sleep(min(TICK_S, self._reconnect_at - now))
                return
            try:
                self._connect()
            except VmshareError as exc:
                delay = self._backoff.next_delay()
                self._reconnect_at = time.monotonic() + delay
                log.warning("cannot connect to %s: %s; next try in %.0f s", self.uri, exc.message, delay)
                return
            self._backoff.reset()
            log.info("connected to %s; reconciling", self.uri)
            self._guarded(self.reconcile)
            return
        try:
            item = self._queue.get(timeout=TICK_S)
        except queue.Empty:
            item = None
        if item is not None:
            self._guarded(self._handle, item)
        if self.conn is not None:
            self._guarded(self._timers)

    def _guarded(self, fn, *args) -> None:
        """Run one piece of work; a lost connection leads to a reconnect, a bug to a log line."""
        try:
            fn(*args)
        except (libvirt.libvirtError, ConnectionError_) as exc:
            if self.conn is not None and not self._alive():
                self._lost(str(exc))
            else:
                log.warning("libvirt call failed: %s", exc)
        except VmshareError as exc:
            log.warning("%s", exc)
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - the daemon outlives its own bugs
            log.exception("unexpected error")

    def _alive(self) -> bool:
        try:
            return bool(self.conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _timers(self) -> None:
        now = time.monotonic()
        if now - self._alive_checked >= ALIVE_CHECK_S:
            self._alive_checked = now
            if not self._alive():
                self._lost("keepalive")
                return
        for name, due in list(self._retry_at.items()):
            if due <= now and not self._stopping:
                del self._retry_at[name]
                self.consider(name)
        if self._jobs_at is not None and self._jobs_at <= now:
            self._jobs_at = None
            self.run_due_jobs()

    def _handle(self, item: tuple) -> None:
        if item[0] == "closed":
            _, serial, reason = item
            if serial == self._conn_serial and self.conn is not None:
                self._lost(f"closed by libvirt, reason {reason}")
            return
        _, _serial, name, event, detail = item
        action = classify(event, detail)
        log.debug("event %s/%s for %s -> %s", event, detail, name, action.value if action else "nothing")
        if action is None:
            return
        self.apply(action, name)

    def apply(self, action: Action, name: str) -> None:
        """Do what ``action`` asks for domain ``name`` (what an event leads to)."""
        if action in (Action.CONSIDER, Action.RENAMED):
            self._skipped.pop(name, None)  # a new definition deserves a new look
            if action is Action.RENAMED:
                self.follow_rename(name)
            self.consider(name)
        elif action is Action.STOPPED:
            if any(job.wait_for for job in self.store.jobs(state="queued", domain=name)):
                self.store.record_stop(name)
            self.run_due_jobs()
        elif action is Action.UNDEFINED:
            self.forget(name)

    # ---- the work -----------------------------------------------------------------

    def reconcile(self) -> None:
        """Catch up with libvirt (events are not replayed): see the module docstring."""
        domains = {dom.name(): dom for dom in self.conn.listAllDomains(0)}
        for member in self.store.members():
            if member.domain not in domains:
                self._orphan_member(member, domains)
        for entry in self.store.inventory():
            if entry.domain not in domains:
                self.store.forget_inventory(entry.domain)
        stopped: set[str] = set()
        for job in self.store.jobs(state="queued"):
            name = job.domain
            if not job.wait_for or name in stopped or name not in domains:
                continue
            dom = domains[name]
            try:
                free = not dom.isActive() and not dom.hasManagedSaveImage(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                continue
            if free:
                self.store.record_stop(name)  # it stopped while nobody was listening
                stopped.add(name)
        self.store.prune_domain_events(EVENT_RETENTION_S)
        known = {m.domain for m in self.store.members()} | {e.domain for e in self.store.inventory()}
        for name in sorted(domains):
            if self._stopping:
                return
            if name not in known and name not in self._skipped:
                try:
                    self.consider(name, domains[name])
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # gone meanwhile is fine; anything else ends this reconcile
        self.run_due_jobs()

    def _orphan_member(self, member, domains: dict[str, Any]) -> None:
        """A member whose domain libvirt no longer knows: renamed (its disk is still used) or undefined."""
        from .domains import os_disks

        for name, dom in domains.items():
            try:
                paths = {d.source for d in os_disks(dom)}
            except VmshareError:
                continue
            if member.disk_path in paths:
                self.store.rename_member_domain(member.disk_path, name)
                self._note(Done(name, "renamed", f"{member.disk_path} was enrolled as {member.domain}"))
                return
        self.store.remove_member(member.disk_path)
        self._note(Done(member.domain, "dropped",
                        f"undefined; {member.disk_path} left group {member.group_name} (the overlay stays valid)"))

    def follow_rename(self, name: str) -> None:
        """``name`` is a domain's new name: members whose disk it uses now carry it."""
        from .domains import os_disks

        dom = self._lookup(name)
        if dom is None:
            return
        for disk in os_disks(dom):
            member = self.store.get_member(disk.source) if disk.source else None
            if member is not None and member.domain != name:
                self.store.rename_member_domain(member.disk_path, name)
                self._note(Done(name, "renamed", f"{member.disk_path} was enrolled as {member.domain}"))

    def forget(self, name: str) -> None:
        """``name`` was undefined: drop its disks from their groups and forget its inventory."""
        self._retry_at.pop(name, None)
        self._skipped.pop(name, None)
        for member in self.store.members(domain=name):
            self.store.remove_member(member.disk_path)
            self._note(Done(name, "dropped",
                            f"undefined; {member.disk_path} left group {member.group_name} (the overlay stays valid)"))
        self.store.forget_inventory(name)
        dropped = self.store.drop_queued_jobs(name, "the domain was undefined")
        if dropped:
            self._note(Done(name, "dropped", f"undefined; {dropped} queued job(s) dropped"))

    def consider(self, name: str, dom=None) -> str | None:
        """Automatic enrollment of one domain; returns what happened (a :class:`Done` ``what``) or None."""
        dom = dom if dom is not None else self._lookup(name)
        if dom is None or not dom.isPersistent():
            return None  # gone, or transient (it vanishes when it stops: never offline)
        if self.store.members(domain=name):
            return None
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE
        refusal = policy_refusal(self.cfg.auto_enroll, name, dom.XMLDesc(flags))
        if refusal:
            log.debug("%s: not a candidate: %s", name, refusal)
            return None
        if self._queued_job(name, "enroll") is not None:
            return None
        if dom.isActive():
            job = self.store.enqueue("enroll", name, {}, wait_for="domain-stopped")
            self._note(Done(name, "queued", "running: enrollment waits for it to stop", job))
            return "queued"
        enroll = self._engine()
        if enroll is None:
            job = self.store.enqueue("enroll", name, {})
            self._note(Done(name, "queued", "enrollment engine not available: the job waits for it", job))
            return "queued"
        try:
            outcome = enroll(self.cfg, self.conn, self.store, name, None, self._progress(name))
        except BusyError as exc:
            self._retry_at[name] = time.monotonic() + self.cfg.watch.retry_busy_s
            self._note(Done(name, "busy", f"{exc.message}; retry in {self.cfg.watch.retry_busy_s} s"))
            return "busy"
        except VmshareError as exc:
            self._skipped[name] = str(exc)
            self._note(Done(name, "failed", str(exc)), logging.WARNING)
            self._requeue_if_started(name)
            return "failed"
        state = str(getattr(outcome, "state", "unknown"))
        reason = getattr(outcome, "reason", None) or ""
        group = getattr(outcome, "group", None)
        if state == "skipped":
            self._skipped[name] = reason
        self._note(Done(name, state, reason or (f"group {group}" if group else "")))
        return state

    def run_due_jobs(self) -> list[Done]:
        """Claim and run every job that may run now; returns what was done."""
        ran: list[Done] = []
        while not self._stopping:
            job = self.store.claim(JOB_KINDS)
            if job is None:
                break
            result = self._run_job(job)
            ran.append(result)
            if result.what in ("busy", "waiting"):
                break
        return ran

    def _run_job(self, job) -> Done:
        # a job may wait for one domain (a running group member) to enroll another
        name = job.params.get("enroll") or job.domain
        if name is None or self._lookup(name) is None:
            self.store.finish_job(job.id, "failed", "the domain is no longer defined")
            return self._note(Done(name or "-", "failed", "the domain is no longer defined", job.id))
        enroll = self._engine()
        if enroll is None:
            self.store.requeue_running_jobs()
            self._jobs_at = time.monotonic() + self.cfg.watch.retry_busy_s
            return self._note(Done(name, "waiting", "enrollment engine not available", job.id))
        try:
            outcome = enroll(self.cfg, self.conn, self.store, name, job.params.get("group"), self._progress(name))
        except BusyError as exc:
            self.store.requeue_running_jobs()
            self._jobs_at = time.monotonic() + self.cfg.watch.retry_busy_s
            return self._note(Done(name, "busy", f"{exc.message}; retry in {self.cfg.watch.retry_busy_s} s", job.id))
        except VmshareError as exc:
            self.store.finish_job(job.id, "failed", str(exc))
            self._requeue_if_started(name)
            return self._note(Done(name, "failed", str(exc), job.id), logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not wedge the queue
            self.store.finish_job(job.id, "failed", f"{type(exc).__name__}: {exc}")
            log.exception("job %d (%s %s) failed", job.id, job.kind, name)
            return Done(name, "failed", f"{type(exc).__name__}: {exc}", job.id)
        state = str(getattr(outcome, "state", "unknown"))
        reason = getattr(outcome, "reason", None) or ""
        self.store.finish_job(job.id, "done", f"skipped: {reason}" if state == "skipped" else None)
        return self._note(Done(name, state, reason, job.id))

    # ---- helpers --------------------------------------------------------------------

    def _engine(self) -> EnrollFn | None:
        if not self._engine_loaded:
            self._enroll_fn = _load_engine()
            self._engine_loaded = True
        return self._enroll_fn

    def _lookup(self, name: str):
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _queued_job(self, name: str, kind: str):
        for job in self.store.jobs(state="queued", domain=name):
            if job.kind == kind:
                return job
        return None

    def _requeue_if_started(self, name: str) -> None:
        """The engine failed on a domain that is running now (a start cancelled it): try after its stop."""
        dom = self._lookup(name)
        if dom is not None and dom.isActive() and self._queued_job(name, "enroll") is None:
            job = self.store.enqueue("enroll", name, {}, wait_for="domain-stopped")
            self._note(Done(name, "queued", "started meanwhile: enrollment waits for it to stop", job))

    def _progress(self, name: str) -> Callable[[str], None]:
        return lambda text: log.info("%s: %s", name, text)

    def _note(self, done: Done, level: int = logging.INFO) -> Done:
        self.done.append(done)
        job = f" (job {done.job})" if done.job is not None else ""
        log.log(level, "%s: %s%s%s", done.domain, done.what, job, f": {done.detail}" if done.detail else "")
        return done
