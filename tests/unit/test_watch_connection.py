"""The watcher's connection layer against libvirt's built-in test driver (``test:///default``:
in this process, no daemon): error translation, events, subscriptions, close, reconnect with
backoff, the keepalive check, and the whole daemon loop in a thread.

The default test driver's state is shared by every connection of the process, so each test
defines its own uniquely named domains and removes them again.  What the test driver cannot
show (keepalive, a daemon that goes away) is tested against the real libvirtd in
tests/integration/test_watch_daemon.py.
"""

from __future__ import annotations

import re
import threading
import time
import types
import uuid

import libvirt
import pytest

from vmshare_libvirt import config, libvirt_conn
from vmshare_libvirt.errors import ConnectionError_, TargetError
from vmshare_libvirt.libvirt_conn import NoSuchDomain
from vmshare_libvirt.store import Store
from vmshare_libvirt.watch import Action, ConnectionClosed, LifecycleEvent, Link, Watcher, classify, connection
from vmshare_libvirt.watch import ensure_event_loop

URI = "test:///default"
E = libvirt
#: What setting up keepalive on a closed connection says (exactly).
CLOSED_KEEPALIVE = "^" + re.escape(f"{URI}: cannot set up keepalive: invalid connection pointer in "
                                   "virConnectSetKeepAlive (is libvirtd running?)") + r"\Z"


def wait_for(predicate, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def test_conn():
    """A plain connection for defining domains (events go to whoever subscribed)."""
    ensure_event_loop()  # before any connection that should deliver events
    conn = libvirt_conn.open_connection(URI)
    created: list[str] = []

    def define(label: str, start: bool = False):
        name = f"vmshare-unit-{label}-{uuid.uuid4().hex[:8]}"
        xml = conn.lookupByName("test").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        xml = re.sub(r"<uuid>.*?</uuid>", "", xml.replace("<name>test</name>", f"<name>{name}</name>"))
        dom = conn.defineXML(xml)
        created.append(name)
        if start:
            dom.create()
        return dom

    conn.define = define  # type: ignore[attr-defined]
    yield conn
    for name in created:
        dom = libvirt_conn.find(conn, name)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    conn.close()


def settings(**kw) -> config.WatchSettings:
    return config.WatchSettings(**kw)


def next_for(link: Link, name: str, timeout: float = 10.0) -> LifecycleEvent:
    """The next lifecycle event of ``name`` on the link's queue (others are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = link.next_event()
        if isinstance(item, LifecycleEvent) and item.domain == name:
            return item
    raise AssertionError(f"no event for {name}")


# ---------------------------------------------------------------- libvirt_conn helpers the watcher uses

def test_find_lookup_and_translation(test_conn):
    assert libvirt_conn.find(test_conn, "test").name() == "test"
    assert libvirt_conn.find(test_conn, "vmshare-unit-nosuch") is None
    with pytest.raises(NoSuchDomain, match="no such domain") as info:
        libvirt_conn.lookup(test_conn, "vmshare-unit-nosuch")
    assert isinstance(info.value, TargetError) and info.value.target == "vmshare-unit-nosuch"


def test_keepalive_alive_and_best_effort(test_conn):
    other = libvirt_conn.open_connection(URI)
    # The test driver lives in this process: it has no keepalive, and says so.
    assert libvirt_conn.set_keepalive(other, 5, 3, URI) is False
    assert libvirt_conn.is_alive(other) is True
    other.close()
    assert libvirt_conn.is_alive(other) is False  # a closed connection is dead, not an exception
    libvirt_conn.best_effort("closing again", other.close)  # the libvirt error is dropped
    with pytest.raises(ConnectionError_, match=CLOSED_KEEPALIVE):
        libvirt_conn.set_keepalive(other, 5, 3, URI)  # not "unsupported": a real failure


def test_open_fails_as_a_connection_error():
    with pytest.raises(ConnectionError_, match="cannot connect to libvirt"):
        libvirt_conn.open_connection("test:///nonexistent/vmshare-unit.xml")


# ---------------------------------------------------------------- the link

def test_link_delivers_lifecycle_events(test_conn):
    link = Link(URI, settings())
    link.open()
    try:
        assert link.serial == 1 and link.alive()
        dom = test_conn.define("events")
        name = dom.name()
        event = next_for(link, name)
        assert event == LifecycleEvent(1, name, E.VIR_DOMAIN_EVENT_DEFINED, E.VIR_DOMAIN_EVENT_DEFINED_ADDED)
        assert classify(event.event, event.detail) is Action.ADDED
        dom.create()
        dom.destroy()
        kinds = [next_for(link, name).event for _ in range(2)]
        assert kinds == [E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STOPPED]
        dom.undefine()
        event = next_for(link, name)
        assert classify(event.event, event.detail) is Action.UNDEFINED
    finally:
        link.close()
    assert link.conn is None


def test_link_without_events_subscribes_to_nothing(test_conn):
    link = Link(URI, settings())
    link.open(events=False)
    sentinel = f"vmshare-unit-sentinel-{uuid.uuid4().hex[:8]}"

    def mark(conn, dom, event, detail, opaque):
        # The test driver delivers its events in order: a DEFINED of "quiet" for the link would be
        # queued before this mark.
        if dom.name() == sentinel and event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
            link.events.put("sentinel")
    callback = test_conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, mark, None)
    try:
        assert link.serial == 0
        test_conn.define("quiet")
        xml = test_conn.lookupByName("test").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        xml = re.sub(r"<uuid>.*?</uuid>", "", xml.replace("<name>test</name>", f"<name>{sentinel}</name>"))
        test_conn.defineXML(xml).undefine()
        wait_for(lambda: not link.events.empty(), what="the sentinel event")
        assert list(link.events.queue) == ["sentinel"]  # nothing from the link itself, before or after it
    finally:
        test_conn.domainEventDeregisterAny(callback)
        link.close()


def test_a_closed_link_hears_nothing_and_a_new_one_has_a_new_serial(test_conn, clock):
    link = Link(URI, settings())
    link.open()
    link.close()
    link.close()  # twice is harmless
    name = test_conn.define("after-close").name()  # the closed link must not hear this DEFINED ...
    link.open()
    try:
        test_conn.lookupByName(name).undefine()  # ... but the new one hears this, later in the same order
        # The first event of the domain on the queue: the new connection's UNDEFINED, no DEFINED before it.
        assert next_for(link, name) == LifecycleEvent(2, name, E.VIR_DOMAIN_EVENT_UNDEFINED,
                                                      E.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED)
        link.closed(ConnectionClosed(1, libvirt.VIR_CONNECT_CLOSE_REASON_EOF))  # the old connection: ignored
        assert link.conn is not None
        link.closed(ConnectionClosed(2, libvirt.VIR_CONNECT_CLOSE_REASON_EOF))
        assert link.conn is None and link.reconnect_at == clock.now  # reconnect at once
    finally:
        link.close()


def test_a_failed_subscription_is_a_connection_error_and_closes(test_conn):
    opened = []

    def connect(uri):
        conn = libvirt_conn.open_connection(uri)
        opened.append(conn)
        conn.close()  # every call on it fails from now on
        return conn

    link = Link(URI, settings(), connect)
    refusal = f"{URI}: cannot set up keepalive: invalid connection pointer in virConnectSetKeepAlive"
    with pytest.raises(ConnectionError_, match="^" + re.escape(refusal) + r"\Z"):
        link.open()
    assert link.conn is None and len(opened) == 1


class FakeClock:
    """``time.monotonic``/``time.sleep`` for the connection module: sleeping advances the clock."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(connection, "time", types.SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep))
    return fake


def test_reconnect_backs_off_then_resets(test_conn, clock):
    failures = {"left": 4}

    def connect(uri):
        if failures["left"]:
            failures["left"] -= 1
            return libvirt_conn.open_connection("test:///nonexistent/vmshare-unit.xml")
        return libvirt_conn.open_connection(uri)

    link = Link(URI, settings(reconnect_max_s=4), connect)
    delays = []
    while not link.reconnect():
        if failures["left"] < 4 and link.reconnect_at > clock.now:
            delays.append(link.reconnect_at - clock.now)
            clock.now = link.reconnect_at  # skip the wait
    try:
        assert delays == [1, 2, 4, 4]  # doubling, capped at watch.reconnect_max_s
        assert link.conn is not None and link.serial == 1
        link.lost("test")
        assert link.conn is None and link.reconnect_at == clock.now  # at once after a loss
        failures["left"] = 1
        assert link.reconnect() is False
        assert link.reconnect_at - clock.now == 1  # the backoff started over after the success
    finally:
        link.close()


def test_reconnect_waits_at_most_a_tick(clock):
    def connect(uri):
        raise ConnectionError_("down", target=uri)

    link = Link(URI, settings(), connect)
    assert link.reconnect() is False  # fails: the next try is one second away
    started = clock.now
    assert link.reconnect() is False  # not due: sleeps one tick, does not try
    assert clock.now == started + connection.TICK_S


def test_check_alive_drops_a_dead_connection(test_conn, clock):
    link = Link(URI, settings())
    link.open()
    assert link.check_alive() is True  # just opened: not asked again yet
    link.conn.close()  # dies under the link
    assert link.check_alive() is True  # the next check is not due yet
    clock.now += connection.ALIVE_CHECK_S
    assert link.check_alive() is False
    assert link.conn is None


# ---------------------------------------------------------------- the daemon loop, in a thread

class Outcome:
    def __init__(self, domain, state):
        self.domain, self.state, self.group, self.reason = domain, state, "g", ""


def test_the_daemon_loop_follows_the_test_driver(tmp_path, test_conn):
    """run() in a thread: connect, reconcile, then events lead to the engine, the queue and the store."""
    calls = []

    def engine(cfg, conn, store, domain, group=None, progress=None):
        calls.append(domain)
        return Outcome(domain, "remembered")

    prefix = "vmshare-unit-"
    cfg = config.parse(f"store_dir: {tmp_path / 'store'}\nauto_enroll:\n  include: ['{prefix}*']\n"
                       "watch:\n  enroll_existing: true\n")
    Store.open(tmp_path / "store").close()
    running = test_conn.define("running", start=True)  # there before the watcher: reconciliation queues it
    watcher = Watcher(cfg, URI, enroll_fn=engine)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", watcher.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: any(d.domain == running.name() for d in watcher.done), what="reconciliation")
        [queued] = [d for d in watcher.done if d.domain == running.name()]
        assert queued.what == "queued" and calls == []
        fresh = test_conn.define("fresh")  # an event: the engine gets it at once (it is offline)
        wait_for(lambda: fresh.name() in calls, what="the DEFINED event")
        running.destroy()  # STOPPED: the job that waited for it runs
        wait_for(lambda: running.name() in calls, what="the STOPPED event")
        with Store.open(tmp_path / "store") as store:
            wait_for(lambda: store.get_job(queued.job).state == "done", what="the job")
            assert [e.event for e in store.domain_events(running.name())] == ["stopped"]
        assert "test" not in calls  # not admitted by the policy
    finally:
        watcher.stop()
        thread.join(10)
    assert not thread.is_alive() and result == {"rc": 0}
    assert watcher.conn is None


def _define_and_deliver(conn, label: str):
    """Define a domain and wait until libvirt's event loop has delivered its DEFINED event: a watcher
    that subscribes afterwards must not get it (on a loaded machine the delivery can lag behind the
    watcher's start, and the event would make the domain look newly defined)."""
    defined: list[str] = []  # names whose DEFINED event was delivered (the callback may run before define returns)

    def seen(_conn, dom, event, _detail, _opaque):
        if event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
            defined.append(dom.name())

    callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, seen, None)
    try:
        dom = conn.define(label)
        wait_for(lambda: dom.name() in defined, what=f"the DEFINED event of {dom.name()}")
    finally:
        conn.domainEventDeregisterAny(callback)
    return dom


def test_the_daemon_leaves_existing_domains_alone_by_default(tmp_path, test_conn):
    """watch.enroll_existing off (the default): a domain defined before the watcher started is not
    enrolled, one defined while it runs is, and one the administrator rolled back is not either."""
    calls = []

    def engine(cfg, conn, store, domain, group=None, progress=None):
        calls.append(domain)
        return Outcome(domain, "remembered")

    prefix = "vmshare-unit-"
    cfg = config.parse(f"store_dir: {tmp_path / 'store'}\nauto_enroll:\n  include: ['{prefix}*']\n")
    Store.open(tmp_path / "store").close()
    before = _define_and_deliver(test_conn, "before")
    watcher = Watcher(cfg, URI, enroll_fn=engine)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: watcher.enroller is not None and watcher.enroller.existing is not None,
                 what="the first listing")
        assert before.UUIDString() in watcher.enroller.existing
        fresh = test_conn.define("fresh")
        wait_for(lambda: any(d.domain == fresh.name() for d in watcher.done), what="the DEFINED event")
        [done] = [d for d in watcher.done if d.domain == fresh.name()]
        assert (done.what, done.detail) == ("remembered", "group g (defined after the watcher started)")
        # an administrator rolled back a domain that is about to be (re)defined: it stays out
        with Store.open(tmp_path / "store") as store:
            store.opt_out(f"{prefix}optout", None, "rolled back with 'vmshare rollback'")
        xml = before.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        xml = re.sub(r"<uuid>.*?</uuid>", "", xml.replace(f"<name>{before.name()}</name>",
                                                           f"<name>{prefix}optout</name>"))
        opted = test_conn.defineXML(xml)
        try:
            last = test_conn.define("last")  # events are served in order: when it is done, so is the one before
            wait_for(lambda: last.name() in calls, what="the last DEFINED event")
        finally:
            opted.undefine()
        # (late events of other tests' domains on the shared test driver may reach the engine too: only ours count)
        ours = {before.name(), fresh.name(), f"{prefix}optout", last.name()}
        assert [name for name in calls if name in ours] == [fresh.name(), last.name()]
    finally:
        watcher.stop()
        thread.join(10)
    assert not thread.is_alive()
