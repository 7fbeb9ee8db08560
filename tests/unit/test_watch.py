"""The work the watcher decides on, without libvirtd: enrollment and jobs (:mod:`.watch.jobs`),
undefine/rename/reconcile (:mod:`.watch.reconcile`), the daemon's dispatch and instance lock
(:mod:`.watch.daemon`), with a fake connection and engine and a real store in a temporary
directory.  The pure decisions are in test_watch_policy, the connection layer against libvirt's
test driver in test_watch_connection."""

from __future__ import annotations

import importlib
import io
import json
import logging
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

import vmshare_libvirt
from vmshare_libvirt import config
from vmshare_libvirt.cli import main as cli_main
from vmshare_libvirt.engine import enroll as engine_enroll
from vmshare_libvirt.errors import BusyError, OperationError
from vmshare_libvirt.store import Store
from vmshare_libvirt.watch import Action, ConnectionClosed, Done, InstanceLock, LifecycleEvent, Watcher


def xml_with(metadata: str = "", name: str = "web1", disk: str = "/images/web1.qcow2") -> str:
    return (f"<domain type='qemu'><name>{name}</name>{metadata}<devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
            f"<target dev='vda' bus='virtio'/></disk></devices></domain>")


ENROLL_EL = '<vmshare:enroll xmlns:vmshare="https://vmshare.invalid/1"/>'


# ---------------------------------------------------------------- the daemon's decisions (fakes)

class LibvirtFailure(libvirt.libvirtError):
    """A libvirtError with a chosen code (the real class reads libvirt's last error)."""

    def __init__(self, code=libvirt.VIR_ERR_INTERNAL_ERROR, message="internal error"):
        Exception.__init__(self, message)
        self.code, self.message = code, message

    def get_error_code(self):
        return self.code

    def get_error_domain(self):
        return libvirt.VIR_FROM_DOMAIN

    def get_error_message(self):
        return self.message


class NoDomain(LibvirtFailure):
    def __init__(self):
        super().__init__(libvirt.VIR_ERR_NO_DOMAIN, "Domain not found")


class FakeDomain:
    def __init__(self, name: str, *, active=False, persistent=True, saved=False, metadata="", disk=None,
                 error: libvirt.libvirtError | None = None, uuid_: str | None = None):
        self._name, self.active, self.persistent, self.saved = name, active, persistent, saved
        self.uuid = uuid_ or str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmshare-test:{name}"))
        self.xml = xml_with(metadata, name, disk or f"/images/{name}.qcow2")
        self.error = error  # raised by isPersistent (the first question the watcher asks)

    def name(self):
        return self._name

    def UUIDString(self):
        return self.uuid

    def isActive(self):
        return self.active

    def isPersistent(self):
        if self.error is not None:
            raise self.error
        return self.persistent

    def hasManagedSaveImage(self, flags=0):
        return self.saved

    def XMLDesc(self, flags=0):
        return self.xml


class FakeConn:
    def __init__(self, *domains: FakeDomain):
        self.domains = {d.name(): d for d in domains}
        self.alive = True

    def listAllDomains(self, flags=0):
        return list(self.domains.values())

    def lookupByName(self, name):
        if name not in self.domains:
            raise NoDomain()
        return self.domains[name]

    def isAlive(self):
        return self.alive

    def close(self):
        return 0


@dataclass
class Outcome:
    domain: str
    state: str
    group: str | None = None
    reason: str | None = None


class FakeEngine:
    """Records calls; answers ``state`` (or raises ``error``)."""

    def __init__(self, state="enrolled", error: Exception | None = None):
        self.state, self.error, self.calls = state, error, []

    def __call__(self, cfg, conn, store, domain, group=None, progress=None):
        self.calls.append((domain, group))
        if self.error is not None:
            raise self.error
        return Outcome(domain, self.state, "debian12", "no match" if self.state == "skipped" else None)


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "store") as s:
        yield s


def make(tmp_path, store, conn, engine=None, policy="", enroll_existing=False) -> Watcher:
    cfg = config.parse(f"store_dir: {tmp_path / 'store'}\nwatch:\n  retry_busy_s: 30\n"
                       f"  enroll_existing: {str(enroll_existing).lower()}\n{policy}")
    w = Watcher(cfg, "test:///", enroll_fn=engine, connect=lambda uri: conn, store=store)
    w.link.conn = conn
    return w


def add_member(store, domain, disk):
    if store.get_group("debian12") is None:
        store.add_group("debian12", {"distro": "debian"})
    gen = store.add_generation("debian12", f"/bases/{domain}.qcow2")
    store.add_member(domain, disk, "debian12", gen.id, None, None)


def test_offline_candidate_goes_to_the_engine(tmp_path, store):
    engine = FakeEngine("enrolled")
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")), engine)
    assert w.consider("web1") == "enrolled"
    assert engine.calls == [("web1", None)]
    assert w.done[-1].what == "enrolled"


def test_running_candidate_is_queued_not_touched(tmp_path, store):
    engine = FakeEngine()
    w = make(tmp_path, store, FakeConn(FakeDomain("web1", active=True)), engine)
    assert w.consider("web1") == "queued"
    assert w.consider("web1") is None  # one job is enough
    assert engine.calls == []
    [job] = store.jobs(state="queued")
    assert (job.kind, job.domain, job.wait_for) == ("enroll", "web1", "domain-stopped")


@pytest.mark.parametrize("domain, policy", [
    (FakeDomain("tmp1"), "auto_enroll:\n  exclude: ['tmp*']\n"),
    (FakeDomain("web1"), "auto_enroll:\n  enabled: false\n"),
    (FakeDomain("web1"), "auto_enroll:\n  require_metadata: true\n"),
    (FakeDomain("web1", persistent=False), ""),  # transient: never offline
])
def test_not_candidates(tmp_path, store, domain, policy):
    engine = FakeEngine()
    w = make(tmp_path, store, FakeConn(domain), engine, policy)
    assert w.consider(domain.name()) is None
    assert engine.calls == [] and store.jobs() == []


def test_metadata_admits_when_required(tmp_path, store):
    engine = FakeEngine()
    w = make(tmp_path, store, FakeConn(FakeDomain("web1", metadata=f"<metadata>{ENROLL_EL}</metadata>")), engine,
             "auto_enroll:\n  require_metadata: true\n")
    assert w.consider("web1") == "enrolled"


def test_members_are_left_alone(tmp_path, store):
    engine = FakeEngine()
    add_member(store, "web1", "/images/web1.qcow2")
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")), engine)
    assert w.consider("web1") is None and engine.calls == []


def test_busy_store_is_retried_later(tmp_path, store):
    engine = FakeEngine(error=BusyError("another vmshare operation (pid 1, kind consolidate) is running"))
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")), engine)
    assert w.consider("web1") == "busy"
    assert "web1" in w.enroller.retry_at
    engine.error = None
    w.enroller.retry_at["web1"] = 0  # due now
    w.run_timers()
    assert [c[0] for c in engine.calls] == ["web1", "web1"] and w.done[-1].what == "enrolled"


def test_the_engine_is_the_real_one_by_default(tmp_path, store):
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")))
    assert w.enroller.enroll_fn is engine_enroll.enroll


def test_an_engine_that_cannot_be_imported_stops_the_watcher(monkeypatch):
    """A broken engine is a bug to see at once, not "engine not available" with jobs waiting forever."""
    for name in [n for n in sys.modules if n == "vmshare_libvirt.watch" or n.startswith("vmshare_libvirt.watch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vmshare_libvirt.engine.enroll", None)  # importing it raises ImportError
    monkeypatch.setattr(vmshare_libvirt, "watch", None, raising=False)
    with pytest.raises(ImportError, match="vmshare_libvirt.engine.enroll"):
        importlib.import_module("vmshare_libvirt.watch")


def test_engine_failure_after_a_start_requeues_for_the_stop(tmp_path, store):
    dom = FakeDomain("web1")

    def engine(cfg, conn, store_, domain, group=None, progress=None):
        dom.active = True  # the guest started while the engine worked; the hook cancelled it
        raise OperationError("enrollment cancelled: the domain started")

    w = make(tmp_path, store, FakeConn(dom), engine)
    assert w.consider("web1") == "failed"
    [job] = store.jobs(state="queued")
    assert job.wait_for == "domain-stopped"


def test_stop_runs_the_waiting_job(tmp_path, store):
    engine = FakeEngine("enrolled")
    dom = FakeDomain("web1", active=True)
    w = make(tmp_path, store, FakeConn(dom), engine)
    w.consider("web1")
    assert w.run_due_jobs() == []  # still waiting for the stop
    dom.active = False
    w.apply(Action.STOPPED, "web1")
    assert engine.calls == [("web1", None)]
    [job] = store.jobs()
    assert job.state == "done"


def test_busy_job_goes_back_to_the_queue(tmp_path, store):
    engine = FakeEngine(error=BusyError("busy"))
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")), engine)
    job_id = store.enqueue("enroll", "web1", {"group": "g"})
    [done] = w.run_due_jobs()
    assert done.what == "busy" and store.get_job(job_id).state == "queued" and w.enroller.jobs_at is not None
    assert engine.calls == [("web1", "g")]


def test_job_outcomes(tmp_path, store):
    engine = FakeEngine("skipped")
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")), engine)
    skipped = store.enqueue("enroll", "web1")
    gone = store.enqueue("enroll", "nosuch")
    store.enqueue("defrag", "web1")  # not a kind this watcher runs
    w.run_due_jobs()
    assert store.get_job(skipped).state == "done" and store.get_job(skipped).error == "skipped: no match"
    assert store.get_job(gone).state == "failed" and "no longer defined" in store.get_job(gone).error
    assert [j.kind for j in store.jobs(state="queued")] == ["defrag"]


def test_undefine_drops_member_and_inventory(tmp_path, store):
    add_member(store, "web1", "/images/web1.qcow2")
    store.remember_inventory("web1", "/images/web1.qcow2", {}, {}, {})
    w = make(tmp_path, store, FakeConn(), FakeEngine())
    w.apply(Action.UNDEFINED, "web1")
    assert store.members() == [] and store.inventory() == []
    assert w.done[-1].what == "dropped"


def test_undefine_drops_the_domains_queued_jobs(tmp_path, store):
    waiting = store.enqueue("enroll", "web1", {}, wait_for="domain-stopped")
    other = store.enqueue("enroll", "web2", {}, wait_for="domain-stopped")
    w = make(tmp_path, store, FakeConn(), FakeEngine())
    w.apply(Action.UNDEFINED, "web1")
    assert store.get_job(waiting).state == "failed" and "undefined" in store.get_job(waiting).error
    assert store.get_job(other).state == "queued"
    assert w.done[-1].what == "dropped" and "1 queued job" in w.done[-1].detail


def test_rename_moves_the_member(tmp_path, store):
    add_member(store, "old", "/images/disk.qcow2")
    engine = FakeEngine()
    w = make(tmp_path, store, FakeConn(FakeDomain("new", disk="/images/disk.qcow2")), engine)
    w.apply(Action.RENAMED, "new")
    assert [m.domain for m in store.members()] == ["new"]
    assert engine.calls == []  # a member: nothing to enroll


def test_reconcile_catches_up(tmp_path, store):
    add_member(store, "gone", "/images/gone.qcow2")
    add_member(store, "old-name", "/images/renamed.qcow2")
    store.remember_inventory("vanished", "/images/vanished.qcow2", {}, {}, {})
    store.remember_inventory("known", "/images/known.qcow2", {}, {}, {})
    waiting = store.enqueue("enroll", "stopped-away", wait_for="domain-stopped")
    saved = store.enqueue("enroll", "saved", wait_for="domain-stopped")
    conn = FakeConn(FakeDomain("renamed", disk="/images/renamed.qcow2"), FakeDomain("known"),
                    FakeDomain("stopped-away"), FakeDomain("saved", saved=True), FakeDomain("fresh"),
                    FakeDomain("running", active=True))
    engine = FakeEngine("remembered")
    w = make(tmp_path, store, conn, engine, enroll_existing=True)
    w.reconcile()
    assert {m.domain for m in store.members()} == {"renamed"}
    assert [e.domain for e in store.inventory()] == ["known"]
    assert store.get_job(waiting).state == "done"  # its stop happened while nobody listened
    assert store.get_job(saved).state == "queued"  # a managed-saved domain is not free
    assert sorted(c[0] for c in engine.calls) == ["fresh", "stopped-away"]  # not known, not saved, not running
    assert [j.domain for j in store.jobs(state="queued")] == ["saved", "running"]


def test_reconcile_passes_over_a_domain_that_vanishes(tmp_path, store):
    conn = FakeConn(FakeDomain("gone-meanwhile", error=NoDomain()), FakeDomain("web1"))
    engine = FakeEngine("remembered")
    orphan_job = store.enqueue("enroll", "never-defined")
    w = make(tmp_path, store, conn, engine, enroll_existing=True)
    w.reconcile()
    assert engine.calls == [("web1", None)]  # the rest of the reconcile still ran: web1, then the jobs
    assert store.get_job(orphan_job).state == "failed"


def test_reconcile_ends_on_other_libvirt_errors_translated(tmp_path, store):
    conn = FakeConn(FakeDomain("broken", error=LibvirtFailure()), FakeDomain("web1"))
    engine = FakeEngine("remembered")
    w = make(tmp_path, store, conn, engine, enroll_existing=True)
    with pytest.raises(OperationError, match="broken: cannot read the domain: internal error"):
        w.reconcile()  # a project error, never a raw libvirtError
    assert engine.calls == []


def test_a_skipped_domain_waits_for_its_next_event(tmp_path, store):
    engine = FakeEngine("skipped")
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")), engine, enroll_existing=True)
    w.reconcile()
    w.reconcile()
    assert engine.calls == [("web1", None)]  # not inspected again at every reconcile
    w.apply(Action.CONSIDER, "web1")  # a new definition
    assert engine.calls == [("web1", None)] * 2


def test_a_bug_in_one_job_fails_that_job_only(tmp_path, store):
    calls = []

    def engine(cfg, conn, store_, domain, group=None, progress=None):
        calls.append(domain)
        if domain == "web1":
            raise KeyError("bug")
        return Outcome(domain, "enrolled")

    w = make(tmp_path, store, FakeConn(FakeDomain("web1"), FakeDomain("web2")), engine)
    first, second = store.enqueue("enroll", "web1"), store.enqueue("enroll", "web2")
    ran = w.run_due_jobs()
    assert calls == ["web1", "web2"] and [d.what for d in ran] == ["failed", "enrolled"]
    assert store.get_job(first).state == "failed" and store.get_job(first).error == "KeyError: 'bug'"
    assert store.get_job(second).state == "done"


def test_events_are_dispatched(tmp_path, store):
    engine = FakeEngine("enrolled")
    w = make(tmp_path, store, FakeConn(FakeDomain("web1")), engine)
    w.handle(LifecycleEvent(1, "web1", libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED))
    assert engine.calls == []
    w.handle(LifecycleEvent(1, "web1", libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED))
    assert engine.calls == [("web1", None)]


@pytest.mark.parametrize("alive", [True, False])
def test_a_failed_piece_of_work_reconnects_only_when_the_connection_died(tmp_path, store, alive, caplog):
    conn = FakeConn(FakeDomain("web1", error=LibvirtFailure(message="lost it")))
    conn.alive = alive
    w = make(tmp_path, store, conn, FakeEngine())
    w.link.events.put(LifecycleEvent(0, "web1", libvirt.VIR_DOMAIN_EVENT_DEFINED,
                                     libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED))
    w.step()  # the loop goes on either way
    assert (w.conn is not None) is alive
    expected = "web1: cannot read the domain: lost it" if alive else "libvirt connection lost"
    assert expected in caplog.text


def test_close_event_of_the_current_connection_reconnects(tmp_path, store):
    w = make(tmp_path, store, FakeConn(), FakeEngine())
    w.link.serial = 3
    w.handle(ConnectionClosed(2, 1))  # an older connection: ignored
    assert w.conn is not None
    w.handle(ConnectionClosed(3, 1))
    assert w.conn is None


def test_once_and_single_instance(tmp_path, store):
    conn = FakeConn(FakeDomain("web1"))
    first = InstanceLock(tmp_path / "store")
    first.acquire()
    try:
        second = make(tmp_path, store, conn, FakeEngine())
        with pytest.raises(BusyError, match="another vmshare watcher"):
            second.run(once=True)
    finally:
        first.release()
    engine = FakeEngine("remembered")
    third = make(tmp_path, store, conn, engine, enroll_existing=True)
    third.link.conn = None
    assert third.run(once=True) == 0
    assert engine.calls == [("web1", None)] and third.conn is None  # disconnected again


def test_cli_once_reports(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store_dir: {tmp_path / 'store'}\nwatch:\n  enroll_existing: true\n")
    conn = FakeConn(FakeDomain("web1", active=True))
    original = Watcher.__init__

    def init(self, cfg_, uri=None, **kw):
        original(self, cfg_, uri, enroll_fn=FakeEngine(), connect=lambda u: conn)

    monkeypatch.setattr(Watcher, "__init__", init)
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--config", str(cfg), "watch", "--once", "--log", "stderr", "--json"], out, err) == 0
    assert '"what": "queued"' in out.getvalue()
    assert Path(tmp_path / "store" / "watch.lock").exists()


# ---------------------------------------------------------------- vmshare enroll (engine faked)

@pytest.mark.parametrize("state, rc", [("enrolled", 0), ("already", 0), ("queued", 0), ("remembered", 0),
                                       ("consolidated", 0), ("skipped", 3)])
def test_cli_enroll_exit_codes(tmp_path, monkeypatch, state, rc):
    import json

    from vmshare_libvirt.cli import _common
    from vmshare_libvirt.engine import enroll as engine

    calls = []

    def fake(cfg, conn, store, domain, group=None, progress=None):
        calls.append((domain, group, store.lock_held))
        return Outcome(domain, state, "debian12", "no OS found" if state == "skipped" else "")

    monkeypatch.setattr(engine, "enroll", fake)
    monkeypatch.setattr(_common, "connector", lambda ctx, cfg: lambda: FakeConn(FakeDomain("web1")))
    monkeypatch.setattr("vmshare_libvirt.engine.recover.recover", lambda store, conn: [])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store_dir: {tmp_path / 'store'}\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--config", str(cfg), "enroll", "web1", "--group", "g", "--json"], out, err) == rc
    data = json.loads(out.getvalue())
    assert isinstance(data.pop("seconds"), float)
    assert data == {"domain": "web1", "state": state, "group": "debian12",
                    "reason": "no OS found" if state == "skipped" else "",
                    "overlay_bytes": None, "original_bytes": None}  # the fake engine recorded no member
    assert calls == [("web1", "g", True)]
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--config", str(cfg), "enroll", "web1"], out, err) == rc
    assert out.getvalue().startswith("web1: ")
    assert ("not enrolled: no OS found" in err.getvalue()) == (state == "skipped")
    if state == "remembered":
        assert re.fullmatch(r"Done in 0:\d\d", out.getvalue().splitlines()[-1])
    elif state in ("already", "queued", "skipped"):  # nothing was done: no summary (the reason is on stderr)
        assert len(out.getvalue().splitlines()) == 1


# ---------------------------------------------------------------- existing domains and opt-outs

def test_existing_domains_are_left_alone_by_default(tmp_path, store, caplog):
    """Only domains defined after the watcher started are enrolled by themselves (watch.enroll_existing off)."""
    caplog.set_level(logging.INFO, logger="vmshare_libvirt.watch")
    conn = FakeConn(FakeDomain("old1"), FakeDomain("old2", active=True))
    engine = FakeEngine("enrolled")
    w = make(tmp_path, store, conn, engine)
    w.reconcile()
    assert engine.calls == [] and store.jobs() == [] and w.done == []
    assert "2 domain(s) existed before the watcher started; watch.enroll_existing is off" in caplog.text
    w.apply(Action.CONSIDER, "old1")  # its definition changed: still the domain that was there before
    assert engine.calls == []
    # The connection was down meanwhile: a domain that appears in a later listing was defined after the start.
    conn.domains["gap"] = FakeDomain("gap")
    w.reconcile()
    assert engine.calls == [("gap", None)]
    assert w.done[-1].detail == "group debian12 (defined after the watcher started)"
    assert "gap: considered for enrollment: defined after the watcher started" in caplog.text


def test_a_new_definition_of_a_listed_domain_is_new(tmp_path, store):
    """Defined between the watcher's connect and its first listing: the DEFINED_ADDED event that follows
    makes it a new domain (a DEFINED_UPDATED would not)."""
    conn = FakeConn(FakeDomain("racer"))
    engine = FakeEngine("enrolled")
    w = make(tmp_path, store, conn, engine)
    w.reconcile()
    w.handle(LifecycleEvent(1, "racer", libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_UPDATED))
    assert engine.calls == []
    w.handle(LifecycleEvent(1, "racer", libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED))
    assert engine.calls == [("racer", None)]


def test_enroll_existing_says_why(tmp_path, store, caplog):
    caplog.set_level(logging.INFO, logger="vmshare_libvirt.watch")
    conn = FakeConn(FakeDomain("old1"), FakeDomain("old2", active=True))
    w = make(tmp_path, store, conn, FakeEngine("enrolled"), enroll_existing=True)
    w.reconcile()
    assert [(d.domain, d.what, d.detail) for d in w.done] == [
        ("old1", "enrolled", "group debian12 (existing domain, watch.enroll_existing is on)"),
        ("old2", "queued", "running: enrollment waits for it to stop (existing domain, watch.enroll_existing is on)"),
    ]
    [job] = store.jobs(state="queued")
    assert job.params == {"why": "existing domain, watch.enroll_existing is on"}
    conn.domains["old2"].active = False
    w.apply(Action.STOPPED, "old2")
    assert w.done[-1] == Done("old2", "enrolled", "group debian12 (existing domain, watch.enroll_existing is on)",
                              job.id)


def test_a_rolled_back_domain_is_not_enrolled_again(tmp_path, store, caplog):
    caplog.set_level(logging.INFO, logger="vmshare_libvirt.watch")
    dom = FakeDomain("web1")
    conn = FakeConn(dom)
    engine = FakeEngine("enrolled")
    w = make(tmp_path, store, conn, engine, enroll_existing=True)
    store.opt_out("web1", dom.uuid, "rolled back with 'vmshare rollback'")
    w.reconcile()
    w.handle(LifecycleEvent(1, "web1", libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED))
    assert engine.calls == []
    assert "web1: not a candidate: rolled back with 'vmshare rollback'" in caplog.text
    assert "'vmshare enroll web1' enrolls it again" in caplog.text
    # renamed: the mark follows its UUID
    del conn.domains["web1"]
    conn.domains["web1-renamed"] = FakeDomain("web1-renamed", uuid_=dom.uuid)
    w.apply(Action.RENAMED, "web1-renamed")
    w.reconcile()
    assert engine.calls == [] and store.opted_out("web1") is not None
    # a member again on request ('vmshare enroll' makes it one): the mark is gone
    add_member(store, "web1-renamed", "/images/web1.qcow2")
    add_member(store, "web1", "/images/web1-other.qcow2")
    assert store.opt_outs() == []


def test_opt_out_marks_go_with_their_domain(tmp_path, store):
    conn = FakeConn(FakeDomain("kept"))
    w = make(tmp_path, store, conn, FakeEngine())
    store.opt_out("kept", conn.domains["kept"].uuid, "rolled back")
    store.opt_out("vanished", "0c4ea3a4-0000-4000-8000-000000000001", "rolled back")
    store.opt_out("undefined", None, "rolled back")
    conn.domains["undefined"] = FakeDomain("undefined")
    w.reconcile()  # libvirt does not know "vanished" any more
    assert [o.domain for o in store.opt_outs()] == ["kept", "undefined"]
    del conn.domains["undefined"]
    w.apply(Action.UNDEFINED, "undefined")
    assert [o.domain for o in store.opt_outs()] == ["kept"]


def test_a_version_2_store_gets_the_opt_out_table(tmp_path):
    import sqlite3

    from vmshare_libvirt import statedb

    directory = tmp_path / "store"
    Store.open(directory).close()
    raw = sqlite3.connect(directory / "state.db")
    raw.executescript("DROP TABLE opt_outs; UPDATE schema_version SET version = 2;")
    raw.close()
    with Store.open(directory, readonly=True) as ro:  # readers accept the older version as it is
        assert ro.groups() == []
    with Store.open(directory) as rw:
        assert rw.opt_outs() == []
        rw.opt_out("web1", None, "rolled back")
        assert rw.opted_out("web1").reason == "rolled back"
    raw = sqlite3.connect(directory / "state.db")
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(statedb.SCHEMA_VERSION,)] == [(5,)]
    raw.close()


def _member(root: Path, generation: int = 2):
    """web1 as a member record: an overlay of 4 KiB, its kept original of 8 KiB."""
    from vmshare_libvirt.store.records import Member

    disk, orig = root / "web1.qcow2", root / "web1.qcow2.vmshare-orig"
    disk.write_bytes(b"o" * 4096)
    orig.write_bytes(b"x" * 8192)
    fields = {f: None for f in Member.__dataclass_fields__}
    fields.update(domain="web1", disk_path=str(disk), original_path=str(orig), generation_id=generation)
    return Member(**fields)


def test_cli_rollback_json(tmp_path, monkeypatch):
    from vmshare_libvirt.cli import _common
    from vmshare_libvirt.engine import members

    member = _member(tmp_path)
    monkeypatch.setattr(members, "select_members", lambda store, domain, group: [member])
    monkeypatch.setattr(members, "rollback", lambda store, conn, selected, progress=None: ["web1"])
    monkeypatch.setattr(members, "rollback_to_generation",
                        lambda store, conn, selected, gen, progress=None: ["web1"])
    monkeypatch.setattr(_common, "connector", lambda ctx, cfg: lambda: FakeConn(FakeDomain("web1")))
    monkeypatch.setattr("vmshare_libvirt.engine.recover.recover", lambda store, conn: [])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store_dir: {tmp_path / 'store'}\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--config", str(cfg), "rollback", "web1", "--json"], out, err) == 0, err.getvalue()
    data = json.loads(out.getvalue())
    assert isinstance(data.pop("seconds"), float)
    assert data == {"to": "original", "generation": None, "members": [
        {"domain": "web1", "disk": member.disk_path, "from_generation": 2, "to_generation": None,
         "restored": member.original_path, "opted_out": True, "overlay_bytes": 4096, "original_bytes": 8192}]}
    out = io.StringIO()
    assert cli_main(["--config", str(cfg), "rollback", "web1", "--generation", "1", "--json"], out, err) == 0
    [m] = json.loads(out.getvalue())["members"]
    assert (m["from_generation"], m["to_generation"], m["restored"], m["opted_out"]) == (2, 1, None, False)


def test_cli_rollback_marks_the_domain(tmp_path, monkeypatch):
    from vmshare_libvirt.cli import _common
    from vmshare_libvirt.engine import members

    dom = FakeDomain("web1")
    member = _member(tmp_path)
    monkeypatch.setattr(members, "select_members", lambda store, domain, group: [member])
    monkeypatch.setattr(members, "rollback", lambda store, conn, selected, progress=None: ["web1"])
    monkeypatch.setattr(_common, "connector", lambda ctx, cfg: lambda: FakeConn(dom))
    monkeypatch.setattr("vmshare_libvirt.engine.recover.recover", lambda store, conn: [])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store_dir: {tmp_path / 'store'}\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--config", str(cfg), "rollback", "web1"], out, err) == 0, err.getvalue()
    first, last = out.getvalue().splitlines()
    assert first == "web1: original disk restored; the watcher leaves it alone until 'vmshare enroll web1'"
    assert re.fullmatch(r"Rolled back 1 member\(s\) in 0:\d\d: 8\.0 KiB of original disks back in place, "
                        r"4\.0 KiB of overlays replaced", last)
    with Store.open(tmp_path / "store") as s:
        [mark] = s.opt_outs()
    assert (mark.domain, mark.uuid, mark.reason) == ("web1", dom.uuid, "rolled back with 'vmshare rollback'")


def test_cli_rollback_to_a_generation_leaves_no_mark(tmp_path, monkeypatch):
    from vmshare_libvirt.cli import _common
    from vmshare_libvirt.engine import members

    member = _member(tmp_path)
    monkeypatch.setattr(members, "select_members", lambda store, domain, group: [member])
    monkeypatch.setattr(members, "rollback_to_generation",
                        lambda store, conn, selected, gen, progress=None: ["web1"])
    monkeypatch.setattr(_common, "connector", lambda ctx, cfg: lambda: FakeConn(FakeDomain("web1")))
    monkeypatch.setattr("vmshare_libvirt.engine.recover.recover", lambda store, conn: [])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store_dir: {tmp_path / 'store'}\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--config", str(cfg), "rollback", "web1", "--generation", "1"], out, err) == 0
    first, last = out.getvalue().splitlines()
    assert first == "web1: back on base generation 1"  # still a member: nothing to opt out of
    assert re.fullmatch(r"Moved 1 member\(s\) back to base generation 1 in 0:\d\d", last)
    with Store.open(tmp_path / "store") as s:
        assert s.opt_outs() == []
