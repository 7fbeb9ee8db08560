"""Automatic enrollment and the queue of enroll and patch jobs: the one place the watcher calls the engine.

Two ways lead to the engine: :meth:`Enroller.consider` (a domain was defined
or changed, or reconciliation found it) and :meth:`Enroller.run_due_jobs` (a
queued job may run: its domain stopped, or it never waited).  Both go through
:meth:`Enroller._enroll`, which maps the engine's outcome and errors to a
:class:`~vmshare_libvirt.watch.outcome.Done`; only the bookkeeping differs (an
event path remembers skips and busy retries by domain, a job is finished in
the store or put back in the queue).

The engine is imported like any other module: if it cannot be imported, the
watcher does not start.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import libvirt

from ..config import Config
from ..engine.enroll import EnrollOutcome
from ..engine.enroll import enroll as engine_enroll
from ..errors import BusyError, VmshareError
from ..libvirt_conn import find, libvirt_errors
from ..store.records import (JOB_DONE, JOB_ENROLL, JOB_FAILED, JOB_KINDS, JOB_PATCH, JOB_QUEUED, WAIT_DOMAIN_STOPPED,
                             Job)
from .outcome import BUSY, FAILED, QUEUED, SKIPPED, Done, DoneLog
from .policy import policy_refusal

log = logging.getLogger(__name__)

#: ``enroll(cfg, conn, store, domain, group=None, progress=None) -> EnrollOutcome``
EnrollFn = Callable[..., EnrollOutcome]

_GONE = "the domain is no longer defined"
PATCHED_DONE = "patched"


@dataclass(frozen=True)
class _Attempt:
    """One call of the engine: the :class:`Done` noted for it and the engine's own reason (or the error)."""

    done: Done
    reason: str


class Enroller:
    """Decides on automatic enrollment and runs the enroll jobs.

    ``retry_at``: domain → when to consider it again (the store was busy);
    ``skipped``: domain → why the engine skipped it or failed (it is not looked at
    again until its next event); ``jobs_at``: when to try the queue again (the
    store was busy), or None.  ``stopping`` tells long loops to end early.
    """

    def __init__(self, cfg: Config, store: Any, done: DoneLog, enroll_fn: EnrollFn | None = None,
                 stopping: Callable[[], bool] = lambda: False):
        self.cfg = cfg
        self.store = store
        self.done = done
        self.enroll_fn: EnrollFn = enroll_fn if enroll_fn is not None else engine_enroll
        self.stopping = stopping
        self.retry_at: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.jobs_at: float | None = None

    # ---- the event path ----------------------------------------------------------

    def consider(self, conn: Any, name: str, dom: Any = None) -> str | None:
        """Automatic enrollment of one domain; returns what happened (a :class:`Done` ``what``) or None.

        A running candidate gets a job that waits for its stop (enrollment never
        delays a start); an offline one goes to the engine now.
        """
        dom = dom if dom is not None else find(conn, name)
        if dom is None or not self._is_candidate(name, dom):
            return None
        if self._queued_job(name) is not None:
            return None
        with libvirt_errors(name, "cannot read the domain state"):
            active = dom.isActive()
        if active:
            job = self.store.enqueue(JOB_ENROLL, name, {}, wait_for=WAIT_DOMAIN_STOPPED)
            self.done.note(Done(name, QUEUED, "running: enrollment waits for it to stop", job))
            return QUEUED
        done = self._enroll(conn, name, None).done
        if done.what == BUSY:
            self.retry_at[name] = time.monotonic() + self.cfg.watch.retry_busy_s
        elif done.what in (FAILED, SKIPPED):
            self.skipped[name] = done.detail
        return done.what

    def _is_candidate(self, name: str, dom: Any) -> bool:
        with libvirt_errors(name, "cannot read the domain"):
            persistent = dom.isPersistent()
        if not persistent:
            return False  # transient: it vanishes when it stops, so it is never offline
        if self.store.members(domain=name):
            return False
        with libvirt_errors(name, "cannot read the domain XML"):
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        refusal = policy_refusal(self.cfg.auto_enroll, name, xml)
        if refusal:
            log.debug("%s: not a candidate: %s", name, refusal)
            return False
        return True

    def renewed(self, name: str) -> None:
        """``name`` has a new definition: it deserves a new look even if the engine skipped it."""
        self.skipped.pop(name, None)

    def forget(self, name: str) -> None:
        """``name`` was undefined: no retry, no memory of a skip."""
        self.retry_at.pop(name, None)
        self.skipped.pop(name, None)

    # ---- the queue ------------------------------------------------------------------

    def run_due_jobs(self, conn: Any) -> list[Done]:
        """Claim and run every job that may run now; returns what was done."""
        ran: list[Done] = []
        while not self.stopping():
            job = self.store.claim(JOB_KINDS)
            if job is None:
                break
            result = self._run_job(conn, job)
            ran.append(result)
            if result.what == BUSY:
                break
        return ran

    def run_timers(self, conn: Any, now: float) -> None:
        """Retry what found the store busy once its time has come."""
        for name, due in list(self.retry_at.items()):
            if due <= now and not self.stopping():
                del self.retry_at[name]
                self.consider(conn, name)
        if self.jobs_at is not None and self.jobs_at <= now:
            self.jobs_at = None
            self.run_due_jobs(conn)

    def _run_job(self, conn: Any, job: Job) -> Done:
        # a job may wait for one domain (a running group member) to enroll another
        name = job.params.get("enroll") or job.domain
        if name is None or find(conn, name) is None:
            self.store.finish_job(job.id, JOB_FAILED, _GONE)
            return self.done.note(Done(name or "-", FAILED, _GONE, job.id))
        try:
            if job.kind == JOB_PATCH:
                attempt = self._patch(conn, name, job)
            else:
                attempt = self._enroll(conn, name, job.params.get("group"), job.id)
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not wedge the queue
            self.store.finish_job(job.id, JOB_FAILED, f"{type(exc).__name__}: {exc}")
            log.exception("job %d (%s %s) failed", job.id, job.kind, name)
            return Done(name, FAILED, f"{type(exc).__name__}: {exc}", job.id)
        what = attempt.done.what
        if what == BUSY:
            self.store.requeue_running_jobs()
            self.jobs_at = time.monotonic() + self.cfg.watch.retry_busy_s
        elif what == FAILED:
            self.store.finish_job(job.id, JOB_FAILED, attempt.reason)
        else:
            self.store.finish_job(job.id, JOB_DONE, f"skipped: {attempt.reason}" if what == SKIPPED else None)
        return attempt.done

    # ---- the engine -----------------------------------------------------------------

    def _enroll(self, conn: Any, name: str, group: str | None, job: int | None = None) -> _Attempt:
        """Hand ``name`` to the engine and note what became of it.

        A busy store is ``busy``; a project error is ``failed`` (and when a start
        cancelled the work, a job now waits for the stop); anything else
        propagates.
        """
        try:
            outcome = self.enroll_fn(self.cfg, conn, self.store, name, group, _progress(name))
            _sync_pools(conn, self.cfg)
        except BusyError as exc:
            detail = f"{exc.message}; retry in {self.cfg.watch.retry_busy_s} s"
            return _Attempt(self.done.note(Done(name, BUSY, detail, job)), exc.message)
        except VmshareError as exc:
            done = self.done.note(Done(name, FAILED, str(exc), job), logging.WARNING)
            self._requeue_if_started(conn, name)
            return _Attempt(done, str(exc))
        state, reason = str(outcome.state), outcome.reason or ""
        detail = reason or (f"group {outcome.group}" if outcome.group else "")
        return _Attempt(self.done.note(Done(name, state, detail, job)), reason)

    def _patch(self, conn: Any, name: str, job: Job) -> _Attempt:
        """A patch queued while ``name`` was running: it goes into the member's own overlay now.

        The manifest is read again and must be the one that was queued (same digest)."""
        from ..engine.patch import PATCHED, QUEUED as PATCH_QUEUED
        from ..engine.patch import patch as engine_patch
        from ..engine.recover import recover
        from ..patchfile import load

        try:
            manifest = load(job.params["manifest"])
            if manifest.digest != job.params.get("digest"):
                raise VmshareError("the manifest or a file it names changed since the patch was queued",
                                   target=job.params["manifest"], hint="run 'vmshare patch' again")
            with self.store.lock(wait=False, kind="patch"):
                recover(self.store, conn)
                report = engine_patch(self.cfg, conn, self.store, manifest, [name], queue=False,
                                      progress=_progress(name))
            _sync_pools(conn, self.cfg)
        except BusyError as exc:
            detail = f"{exc.message}; retry in {self.cfg.watch.retry_busy_s} s"
            return _Attempt(self.done.note(Done(name, BUSY, detail, job.id)), exc.message)
        except VmshareError as exc:
            return _Attempt(self.done.note(Done(name, FAILED, str(exc), job.id), logging.WARNING), str(exc))
        res = report.members[0]
        if res.result == PATCH_QUEUED or (res.result != PATCHED and "running" in res.detail):
            # started again before the patch could run: wait for the next stop
            self.store.enqueue(JOB_PATCH, name, dict(job.params), wait_for=WAIT_DOMAIN_STOPPED)
        what = PATCHED_DONE if res.result == PATCHED else FAILED
        detail = f"patch {manifest.name}: {res.result}" + (f": {res.detail}" if res.detail else "")
        return _Attempt(self.done.note(Done(name, what, detail, job.id)), detail)

    def _requeue_if_started(self, conn: Any, name: str) -> None:
        """The engine failed on a domain that is running now (a start cancelled it): try after its stop."""
        dom = find(conn, name)
        if dom is None:
            return
        with libvirt_errors(name, "cannot read the domain state"):
            active = dom.isActive()
        if active and self._queued_job(name) is None:
            job = self.store.enqueue(JOB_ENROLL, name, {}, wait_for=WAIT_DOMAIN_STOPPED)
            self.done.note(Done(name, QUEUED, "started meanwhile: enrollment waits for it to stop", job))

    def _queued_job(self, name: str) -> Job | None:
        for job in self.store.jobs(state=JOB_QUEUED, domain=name):
            if job.kind == JOB_ENROLL:
                return job
        return None


def _sync_pools(conn: Any, cfg: Config) -> None:
    """Refresh the bases' storage pools after the engine ran; a pool problem is only logged."""
    from ..pool import sync

    for text in sync(conn, cfg):
        log.warning("storage pool %s", text)


def _progress(name: str) -> Callable[[str], None]:
    return lambda text: log.info("%s: %s", name, text)
