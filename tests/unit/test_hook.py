"""The libvirt hook's main() with in-memory streams: exit codes, refusals, nothing on stdout."""

from __future__ import annotations

import ast
import io
import sqlite3
import subprocess
from pathlib import Path

import pytest

from vmshare_libvirt import fingerprint, hook
from vmshare_libvirt.cli.hook import render_shim
from vmshare_libvirt.store import Store

# Every (operation, sub-operation) libvirt passes to a qemu hook.
PAIRS = [
    ("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"),
    ("release", "end"), ("migrate", "begin"), ("restore", "begin"), ("reconnect", "begin"),
    ("attach", "begin"),
]
GARBAGE = [b"", b"\x00\xff\xfe garbage \x80", b"<domain><devices><disk", "\u2603 not xml <<<>>>".encode()]


def domain_xml(name: str, *disks: str, base: str | None = None) -> str:
    parts = []
    for i, disk in enumerate(disks):
        backing = (f"<backingStore type='file'><format type='qcow2'/><source file='{base}'/>"
                   "<backingStore/></backingStore>") if base else ""
        parts.append(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                     f"<source file='{disk}'/>{backing}<target dev='vd{chr(97 + i)}' bus='virtio'/></disk>")
    return (f"<domain type='kvm'><name>{name}</name><memory unit='KiB'>524288</memory>"
            f"<os><type arch='x86_64'>hvm</type></os><devices>"
            f"<emulator>/usr/bin/qemu-system-x86_64</emulator>{''.join(parts)}"
            f"<interface type='network'><source network='default'/></interface></devices></domain>")


class Host:
    """A temporary store with one group, one published base and member web1."""

    def __init__(self, root: Path):
        self.root = root
        self.store_dir = root / "store"
        self.images = root / "images"
        self.images.mkdir()
        self.base = root / "bases" / "gen1.qcow2"
        self.base.parent.mkdir()
        self.base.write_bytes(b"QFI\xfb" + bytes(4092))
        self.base.chmod(fingerprint.BASE_MODE)
        self.disk = str(self.images / "web1.qcow2")
        with Store.open(self.store_dir) as store:
            store.add_group("debian12", {"distro": "debian"})
            gen = store.add_generation("debian12", str(self.base))
            store.publish_generation(gen.id, fingerprint.quick(self.base), fingerprint.full(self.base))
            store.add_member("web1", self.disk, "debian12", gen.id, self.disk + ".orig", 1 << 30)
            self.gen_id = gen.id

    def store(self) -> Store:
        return Store.open(self.store_dir)

    def xml(self, name: str = "web1", *disks: str) -> str:
        return domain_xml(name, *(disks or (self.disk,)), base=str(self.base))

    def run(self, domain: str, operation: str, sub: str, stdin=None, store_dir=None):
        if stdin is None:
            stdin = self.xml(domain)
        stream = io.BytesIO(stdin) if isinstance(stdin, bytes) else io.StringIO(stdin)
        out, err = io.StringIO(), io.StringIO()
        rc = hook.main([domain, operation, sub, "-"], stream, out, err,
                       store_dir=self.store_dir if store_dir is None else store_dir)
        assert out.getvalue() == "", "the hook wrote to stdout"
        return rc, err.getvalue()

    def busy(self, kind: str, stage: str, domain: str = "web1", disk: str | None = None) -> int:
        with self.store() as store:
            op = store.begin_operation(kind, {"domain": domain})
            store.mark_busy(domain, disk or self.disk, op, "building")
            if stage == "switching":
                assert store.begin_switch(op, disk or self.disk)
        return op


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


# ---- every event, healthy and hostile inputs ---------------------------------------

@pytest.mark.parametrize("operation, sub", PAIRS)
def test_every_event_with_valid_xml_exits_0(host, operation, sub):
    assert host.run("web1", operation, sub) == (0, "")


@pytest.mark.parametrize("operation, sub", PAIRS)
@pytest.mark.parametrize("stdin", GARBAGE)
def test_garbage_stdin_exits_0(host, operation, sub, stdin):
    assert host.run("web1", operation, sub, stdin=stdin)[0] == 0


@pytest.mark.parametrize("operation, sub", PAIRS)
def test_missing_store_exits_0_and_creates_nothing(tmp_path, host, operation, sub):
    absent = tmp_path / "nowhere"
    assert host.run("web1", operation, sub, store_dir=absent) == (0, "")
    assert not absent.exists()


@pytest.mark.parametrize("argv", [[], ["web1"], ["web1", "prepare"], ["web1", "frobnicate", "now", "-"]])
def test_odd_arguments_exit_0(host, argv):
    assert hook.main(argv, io.StringIO(""), io.StringIO(), io.StringIO(), store_dir=host.store_dir) == 0


def test_damaged_store_lets_guests_start(host):
    db = host.store_dir / "state.db"
    for leftover in ("state.db-wal", "state.db-shm"):
        (host.store_dir / leftover).unlink(missing_ok=True)
    with open(db, "r+b") as f:
        f.write(b"\x00" * 100)
    for operation, sub in PAIRS:
        assert host.run("web1", operation, sub) == (0, "")


def test_newer_schema_is_not_interpreted(host):
    host.busy("consolidate", "switching")
    conn = sqlite3.connect(host.store_dir / "state.db", isolation_level=None)
    conn.execute("UPDATE schema_version SET version = version + 1")
    conn.close()
    # A newer vmshare wrote this store: this hook cannot read it, so it stays out of the way.
    assert host.run("web1", "prepare", "begin") == (0, "")


def test_write_locked_store_answers_within_the_deadline(host, monkeypatch):
    """A writer holding the store for longer than the hook waits: the hook gives up, says so, writes nothing.

    The time bound is the one the hook hands to SQLite (every connection it opens waits at most
    ``DB_TIMEOUT``); the writer never lets go while the hook runs, so an answer at all is a give-up.
    """
    op = host.busy("consolidate", "switching")
    timeouts, logged = [], []
    connect = hook.statedb.connect_existing

    def spy(store_dir, *, readonly, timeout):
        timeouts.append((readonly, timeout))
        return connect(store_dir, readonly=readonly, timeout=timeout)

    monkeypatch.setattr(hook.statedb, "connect_existing", spy)
    monkeypatch.setattr(hook, "_log", logged.append)
    blocker = sqlite3.connect(host.store_dir / "state.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("INSERT INTO domain_events (domain, event, at) VALUES ('x', 'stopped', 0)")
    try:
        rc, err = host.run("web1", "prepare", "begin")  # readers are not blocked in WAL mode
        assert (rc, err) == (hook.REFUSED, f"vmshare: domain web1: disk {host.disk} is being consolidated "
                                           f"(operation {op}); wait for it or run 'vmshare recover'\n")
        assert host.run("web1", "release", "end") == (0, "")  # the write gives up: the stop goes unrecorded
        assert host.run("web1", "reconnect", "begin") == (0, "")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert timeouts == [(True, hook.DB_TIMEOUT), (False, hook.DB_TIMEOUT)]  # prepare reads, release writes
    assert logged == [f"domain web1: disk {host.disk} is being consolidated (operation {op});"
                      " wait for it or run 'vmshare recover'",
                      "domain web1: stop not recorded: database is locked"]
    with host.store() as store:
        assert store.domain_events("web1") == []  # nothing was written


def test_unreadable_config_means_default_store(tmp_path, monkeypatch):
    config = tmp_path / "vmshare.yaml"
    config.write_text("store_dir: [unterminated\n")
    monkeypatch.setenv("VMSHARE_CONFIG", str(config))
    assert hook.store_dir_from_config() == hook.DEFAULT_STORE_DIR
    monkeypatch.setenv("VMSHARE_CONFIG", str(tmp_path))  # a directory: unreadable as a file
    assert hook.store_dir_from_config() == hook.DEFAULT_STORE_DIR
    out, err = io.StringIO(), io.StringIO()
    rc = hook.main(["vmshare-test-absent-domain", "prepare", "begin", "-"], io.StringIO("<domain/>"), out, err)
    assert rc == 0 and out.getvalue() == ""


# ---- refusals at prepare ---------------------------------------------------------------------

@pytest.mark.parametrize("kind, stage, verb", [
    ("consolidate", "switching", "being consolidated"),
    ("consolidate", "building", "being consolidated"),
    ("enroll", "switching", "being enrolled"),
    ("regroup", "switching", "being moved to a new base generation"),
    ("mystery", "switching", "being changed by a 'mystery' operation"),
])
def test_prepare_refuses_a_disk_mid_operation(host, kind, stage, verb):
    op = host.busy(kind, stage)
    rc, err = host.run("web1", "prepare", "begin")
    assert rc == hook.REFUSED
    assert err == (f"vmshare: domain web1: disk {host.disk} is {verb} (operation {op}); "
                   "wait for it or run 'vmshare recover'\n")


def test_prepare_cancels_an_enrollment_still_building(host):
    disk = str(host.images / "new1.qcow2")
    op = host.busy("enroll", "building", domain="new1", disk=disk)
    assert host.run("new1", "prepare", "begin", stdin=host.xml("new1", disk)) == (0, "")
    with host.store() as store:
        assert store.cancel_requested(op)
        assert store.begin_switch(op, disk) is False  # the engine can no longer switch this disk


def test_only_prepare_refuses(host):
    host.busy("consolidate", "switching")
    for operation, sub in PAIRS:
        if (operation, sub) != ("prepare", "begin"):
            assert host.run("web1", operation, sub) == (0, "")


def test_busy_disk_is_found_by_path_under_another_domain_name(host):
    op = host.busy("consolidate", "switching", domain="web1")
    rc, err = host.run("web1-renamed", "prepare", "begin", stdin=host.xml("web1-renamed", host.disk))
    assert rc == 1 and f"operation {op}" in err


def test_busy_disk_is_found_by_domain_name_when_stdin_is_garbage(host):
    host.busy("consolidate", "switching")
    assert host.run("web1", "prepare", "begin", stdin=b"\x00garbage")[0] == 1


def test_other_domains_start_while_one_is_busy(host):
    host.busy("consolidate", "switching")
    other = str(host.images / "db1.qcow2")
    assert host.run("db1", "prepare", "begin", stdin=host.xml("db1", other)) == (0, "")


@pytest.mark.parametrize("policy", ["report", "refuse"])
def test_locked_drift_is_refused_or_reported_as_the_recorded_policy_says(host, policy, monkeypatch):
    logged = []
    monkeypatch.setattr(hook, "_log", logged.append)
    with host.store() as store:
        store.record_locked_drift(host.disk, "web1", "debian12", host.gen_id, 2, "/usr/bin/ls (content)", policy)
    rc, err = host.run("web1", "prepare", "begin")
    found = (f"domain web1: disk {host.disk}: 2 entries under the locked paths of group debian12 differ from its "
             "base (first /usr/bin/ls (content); 'vmshare drift debian12 --locked' at ")
    if policy == "refuse":
        assert rc == 1 and err.startswith("vmshare: " + found) and err.count("\n") == 1
        assert err.endswith("lockdown.on_drift is 'refuse': put them back (e.g. 'vmshare patch MANIFEST web1'), "
                            "or set it to 'report', then run 'vmshare drift debian12 --locked' again\n")
        assert logged == [err[len("vmshare: "):-1]]  # a refusal goes to syslog too
    else:
        assert (rc, err) == (0, "")
        assert len(logged) == 1 and logged[0].startswith(found)
        assert logged[0].endswith("; started anyway (lockdown.on_drift: report)")


def test_a_check_that_finds_no_locked_drift_clears_the_record(host):
    with host.store() as store:
        store.record_locked_drift(host.disk, "web1", "debian12", host.gen_id, 1, "/etc/ssh/sshd_config (metadata)",
                                  "refuse")
        assert set(store.locked_drift("debian12")) == {host.disk}
        store.record_locked_drift(host.disk, "web1", "debian12", host.gen_id, 0, "", "refuse")
        assert store.locked_drift("debian12") == {}
    assert host.run("web1", "prepare", "begin") == (0, "")


def test_locked_drift_of_another_disk_does_not_block_the_start(host):
    other = str(host.images / "db1.qcow2")
    with host.store() as store:
        store.record_locked_drift(other, "db1", "debian12", host.gen_id, 1, "/usr/bin/ls (content)", "refuse")
    assert host.run("web1", "prepare", "begin") == (0, "")


def test_a_schema_4_store_has_no_locked_drift_to_read(host):
    import sqlite3

    raw = sqlite3.connect(host.store_dir / "state.db")
    raw.executescript("DROP TABLE locked_drift; UPDATE schema_version SET version = 4;")
    raw.close()
    assert host.run("web1", "prepare", "begin") == (0, "")


def test_prepare_refuses_when_the_base_is_missing(host):
    host.base.unlink()
    rc, err = host.run("web1", "prepare", "begin")
    assert rc == 1
    assert err == (f"vmshare: domain web1: disk {host.disk}: base generation {host.gen_id} ({host.base}): "
                   "base is missing; the guest would see a broken disk, run 'vmshare status'\n")


def test_prepare_refuses_a_modified_base(host):
    host.base.chmod(0o644)
    with open(host.base, "ab") as f:
        f.write(b"planted")
    host.base.chmod(fingerprint.BASE_MODE)
    rc, err = host.run("web1", "prepare", "begin")
    assert rc == 1 and "base fingerprint mismatch: size changed" in err and err.count("\n") == 1


def test_prepare_refuses_a_writable_base(host):
    host.base.chmod(0o664)
    rc, err = host.run("web1", "prepare", "begin")
    assert rc == 1 and "mode 0664" in err


@pytest.mark.parametrize("mode, refused", [(0o440, False), (0o444, False), (0o640, True), (0o460, True),
                                           (0o400, True)])
def test_prepare_checks_the_base_mode(host, mode, refused):
    """0440 is what bases get now; 0444 bases published before stay startable; anything else is refused."""
    host.base.chmod(mode)
    rc, err = host.run("web1", "prepare", "begin")
    assert (rc == 1) == refused
    assert (f"base has mode {mode:04o}, expected 0440 (read-only)" in err) == refused


def test_prepare_refuses_a_base_that_is_not_qcow2(host):
    with host.store() as store:
        store.add_group("other", {})
        bogus = host.root / "bases" / "bogus.qcow2"
        bogus.write_bytes(b"not an image")
        bogus.chmod(fingerprint.BASE_MODE)
        gen = store.add_generation("other", str(bogus))
        store.publish_generation(gen.id, fingerprint.quick(bogus), fingerprint.full(bogus))
        disk = str(host.images / "web2.qcow2")
        store.add_member("web2", disk, "other", gen.id, None, None)
    rc, err = host.run("web2", "prepare", "begin", stdin=host.xml("web2", disk))
    assert rc == 1 and "base is not a qcow2 image" in err


def test_prepare_refuses_when_the_generation_record_is_gone(host):
    conn = sqlite3.connect(host.store_dir / "state.db", isolation_level=None)
    conn.execute("DELETE FROM generations")  # foreign keys are off on this raw connection
    conn.close()
    rc, err = host.run("web1", "prepare", "begin")
    assert rc == 1 and f"base generation {host.gen_id}: missing from the state store" in err


def test_a_detached_member_disk_does_not_block_the_start(host):
    host.base.unlink()
    other = str(host.images / "web1-new.qcow2")
    assert host.run("web1", "prepare", "begin", stdin=host.xml("web1", other)) == (0, "")


def test_reconnect_is_always_0(host):
    host.busy("consolidate", "switching")
    host.base.unlink()
    for stdin in [host.xml(), *GARBAGE]:
        assert host.run("web1", "reconnect", "begin", stdin=stdin)[0] == 0


# ---- release ------------------------------------------------------------------------------------

def test_release_records_the_stop_that_a_job_waits_for(host):
    with host.store() as store:
        job = store.enqueue("patch", "web1", {}, wait_for="domain-stopped")
        assert store.claim() is None
    assert host.run("web1", "release", "end") == (0, "")
    with host.store() as store:
        assert [e.domain for e in store.domain_events()] == ["web1"]
        assert store.claim().id == job


def test_other_events_write_nothing(host):
    for operation, sub in PAIRS:
        if (operation, sub) != ("release", "end"):
            host.run("web1", operation, sub)
    with host.store() as store:
        assert store.domain_events() == []


# ---- the XML scan and the config line reader -------------------------------------------------------

def test_disk_paths_skip_backing_files_and_unescape():
    xml = domain_xml("x", "/img/a&amp;b.qcow2", "/img/c&#39;d.qcow2", base="/bases/gen1.qcow2")
    xml = xml.replace("</devices>", "<disk type='file' device='cdrom'><target dev='sda'/></disk></devices>")
    assert hook.disk_paths(xml) == ["/img/a&b.qcow2", "/img/c'd.qcow2"]
    assert hook.disk_paths('<disk type="file"><source file="/img/q.qcow2" index="1"/></disk>') == ["/img/q.qcow2"]
    assert hook.disk_paths("\x00garbage<disk") == []


@pytest.mark.parametrize("text, expected", [
    ("store_dir: /srv/folded\n  continued\n", "/srv/folded continued"),  # as the command line reads it
    ("store_dir: /srv/a\nstore_dir: /srv/b\n", hook.DEFAULT_STORE_DIR),  # a duplicate key: invalid config
    ("store_dir: relative/dir\n", hook.DEFAULT_STORE_DIR),  # invalid config: default
    ("store_dir: ''\n", hook.DEFAULT_STORE_DIR),
    ("store_dir: /srv/vmshare\n", "/srv/vmshare"),
    ("# comment\nstore_dir: /srv/vm share   # where state lives\n", "/srv/vm share"),
    ("store_dir: '/srv/quoted'\n", "/srv/quoted"),
    ('store_dir: "/srv/double"  # c\n', "/srv/double"),
    ("libvirt_uri: qemu:///system\n", hook.DEFAULT_STORE_DIR),
    ("appliance:\n  store_dir: /nested\n", hook.DEFAULT_STORE_DIR),  # invalid config: default
    ('store_dir: "/srv/esc\\u0061ped"\n', "/srv/escaped"),  # not simple: the YAML loader reads it
])
def test_store_dir_from_config(tmp_path, text, expected):
    path = tmp_path / "vmshare.yaml"
    path.write_text(text)
    assert hook.store_dir_from_config(str(path)) == expected


# ---- hygiene ----------------------------------------------------------------------------------------------

LIGHT_MODULES = ["hook.py", "fingerprint.py", "statedb.py", "errors.py"]
ALLOWED_IMPORTS = {"__future__", "os", "sys", "stat", "sqlite3", "time", "hashlib", "json", "re", "signal",
                   "syslog", "fingerprint", "statedb", "errors", "config"}


@pytest.mark.parametrize("name", LIGHT_MODULES)
def test_hook_modules_import_only_the_standard_library(name):
    source = (Path(hook.__file__).parent / name).read_text()
    tree = ast.parse(source)
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or node.names[0].name).split(".")[0])
    assert top_level <= {"__future__", "os", "sys", "stat", "sqlite3", "time", "errors", "fingerprint", "statedb"}, \
        top_level
    every = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    every |= {(node.module or node.names[0].name).split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert every <= ALLOWED_IMPORTS, every - ALLOWED_IMPORTS


def test_hook_source_never_writes_stdout():
    tree = ast.parse(Path(hook.__file__).read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "print" not in names
    assert "stdout" not in attributes  # no sys.stdout, no stdout.write


def test_checked_in_shim_is_what_install_writes():
    shim = Path(__file__).resolve().parents[2] / "hooks" / "qemu"
    assert shim.read_text() == render_shim("/usr/bin/python3")


# ---- the store directory written into the shim -------------------------------------------------------

@pytest.fixture
def elsewhere_config(tmp_path, monkeypatch):
    """VMSHARE_CONFIG names a config whose store is empty: only the shim's store has anything to refuse."""
    other = tmp_path / "other-store"
    path = tmp_path / "other.yaml"
    path.write_text(f"store_dir: {other}\n")
    monkeypatch.setenv("VMSHARE_CONFIG", str(path))
    return other


def _prepare(host, domain="web1"):
    out, err = io.StringIO(), io.StringIO()
    rc = hook.main([domain, "prepare", "begin", "-"], io.StringIO(host.xml(domain)), out, err)
    assert out.getvalue() == ""
    return rc, err.getvalue()


def test_the_shims_store_dir_wins_over_the_config(host, elsewhere_config, monkeypatch):
    op = host.busy("consolidate", "switching")
    assert _prepare(host) == (0, "")  # by the config alone the hook looks in the wrong store
    monkeypatch.setenv(hook.STORE_DIR_ENV, str(host.store_dir))
    assert hook.hook_store_dir() == str(host.store_dir)
    rc, err = _prepare(host)
    assert rc == hook.REFUSED and f"operation {op}" in err
    assert not elsewhere_config.exists()


def test_release_records_the_stop_in_the_shims_store(host, elsewhere_config, monkeypatch):
    monkeypatch.setenv(hook.STORE_DIR_ENV, str(host.store_dir))
    out, err = io.StringIO(), io.StringIO()
    assert hook.main(["web1", "release", "end", "-"], io.StringIO(host.xml()), out, err) == 0
    with host.store() as store:
        assert [e.domain for e in store.domain_events()] == ["web1"]
    assert not elsewhere_config.exists()


@pytest.mark.parametrize("value", ["", "relative/store"])
def test_without_a_usable_shim_store_dir_the_config_is_read(tmp_path, monkeypatch, value):
    path = tmp_path / "vmshare.yaml"
    path.write_text("store_dir: /srv/from-config\n")
    monkeypatch.setenv("VMSHARE_CONFIG", str(path))
    monkeypatch.setenv(hook.STORE_DIR_ENV, value)
    assert hook.hook_store_dir() == "/srv/from-config"
    monkeypatch.delenv(hook.STORE_DIR_ENV)
    assert hook.hook_store_dir() == "/srv/from-config"


def test_install_writes_the_resolved_store_dir_into_the_shim(tmp_path):
    import sys

    from vmshare_libvirt.cli import main as cli_main
    from vmshare_libvirt.cli.hook import HOOK_NAME, installed_store_dir

    cfg = tmp_path / "vmshare.yaml"
    cfg.write_text("store_dir: >-\n  /srv/folded\n  name\n")  # the YAML loader reads '/srv/folded name'
    out, err = io.StringIO(), io.StringIO()
    argv = ["--config", str(cfg), "hook", "install", "--dir", str(tmp_path / "d"), "--python", sys.executable,
            "--no-check"]
    assert cli_main(argv, out, err) == 0, err.getvalue()
    text = (tmp_path / "d" / HOOK_NAME).read_text()
    assert installed_store_dir(text) == "/srv/folded name"
    assert "VMSHARE_STORE_DIR='/srv/folded name'; export VMSHARE_STORE_DIR\n" in text
    assert "store /srv/folded name" in out.getvalue()
    status_out = io.StringIO()
    assert cli_main(["--config", str(cfg), "hook", "status", "--dir", str(tmp_path / "d")], status_out, err) == 0
    assert "store: /srv/folded name" in status_out.getvalue() and "warning" not in status_out.getvalue()
    cfg.write_text("store_dir: /srv/moved\n")
    status_out = io.StringIO()
    cli_main(["--config", str(cfg), "hook", "status", "--dir", str(tmp_path / "d")], status_out, err)
    assert "the hook uses store /srv/folded name but the configuration names /srv/moved" in status_out.getvalue()


def test_install_refuses_an_invalid_config_and_writes_nothing(tmp_path):
    import sys

    from vmshare_libvirt.cli import main as cli_main

    cfg = tmp_path / "vmshare.yaml"
    cfg.write_text("store_dir: relative/store\n")
    out, err = io.StringIO(), io.StringIO()
    argv = ["--config", str(cfg), "hook", "install", "--dir", str(tmp_path / "d"), "--python", sys.executable,
            "--no-check"]
    assert cli_main(argv, out, err) == 4  # ConfigError
    assert "store_dir: must be an absolute path" in err.getvalue()
    assert not (tmp_path / "d").exists()



def test_install_and_uninstall_with_json(tmp_path):
    import json
    import sys

    from vmshare_libvirt.cli import main as cli_main
    from vmshare_libvirt.cli.hook import HOOK_NAME, RESTART_NOTE

    cfg = tmp_path / "vmshare.yaml"
    cfg.write_text(f"store_dir: {tmp_path / 'store'}\n")
    path = tmp_path / "d" / HOOK_NAME

    def run(*argv: str) -> tuple[int, dict]:
        out, err = io.StringIO(), io.StringIO()
        rc = cli_main(["--config", str(cfg), "hook", *argv, "--dir", str(tmp_path / "d"), "--json"], out, err)
        return rc, json.loads(out.getvalue())

    install = ("install", "--python", sys.executable, "--no-check")
    assert run(*install) == (0, {"path": str(path), "installed": True, "action": "installed",
                                 "python": sys.executable, "config": str(cfg), "store_dir": str(tmp_path / "store"),
                                 "restart_needed": True, "note": RESTART_NOTE})
    rc, data = run(*install)
    assert rc == 0 and (data["action"], data["restart_needed"], data["note"]) == ("updated", False, None)
    assert run("uninstall") == (0, {"path": str(path), "installed": False, "removed": True})
    assert not path.exists()
    assert run("uninstall") == (0, {"path": str(path), "installed": False, "removed": False})
    path.write_text("#!/bin/sh\nexit 0\n")  # someone else's hook of that name
    rc, data = run("uninstall")
    assert rc == 5 and data["error"]["type"] == "TargetError" and path.exists()
    rc, data = run("install", "--python", "relative/python3", "--no-check")
    assert rc == 5 and data["error"]["target"] == "relative/python3"


# ---- a base stored as its changes to an earlier generation --------------------------------------

def _chained_member(host, make_gen1_bad=None):
    """web2 on generation 2, a qcow2 whose backing file is host.base (generation 1)."""
    gen2 = host.root / "bases" / "gen2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", str(host.base), "-F", "qcow2", str(gen2), "1G"],
                   check=True)
    gen2.chmod(fingerprint.BASE_MODE)
    disk = str(host.images / "web2.qcow2")
    with host.store() as store:
        gen = store.add_generation("debian12", str(gen2))
        store.publish_generation(gen.id, fingerprint.quick(gen2), fingerprint.full(gen2))
        store.add_member("web2", disk, "debian12", gen.id, None, None)
    return disk, gen2


def test_prepare_checks_the_generations_a_base_is_stored_on(host):
    disk, gen2 = _chained_member(host)
    assert fingerprint.backing_file(gen2) == str(host.base)
    assert host.run("web2", "prepare", "begin", stdin=host.xml("web2", disk)) == (0, "")
    host.base.chmod(0o644)
    with open(host.base, "ab") as f:
        f.write(b"planted")
    host.base.chmod(fingerprint.BASE_MODE)
    rc, err = host.run("web2", "prepare", "begin", stdin=host.xml("web2", disk))
    assert rc == 1
    assert f"base generation {host.gen_id} ({host.base}): base fingerprint mismatch: size changed" in err


def test_prepare_refuses_a_base_stored_on_a_file_vmshare_does_not_know(host):
    disk, gen2 = _chained_member(host)
    conn = sqlite3.connect(host.store_dir / "state.db", isolation_level=None)
    conn.execute("DELETE FROM generations WHERE path = ?", (str(host.base),))
    conn.close()
    rc, err = host.run("web2", "prepare", "begin", stdin=host.xml("web2", disk))
    assert rc == 1
    assert f"it is stored on {host.base}, which is not a base generation vmshare knows" in err


def test_backing_file_of_a_standalone_image_and_of_garbage(tmp_path):
    alone = tmp_path / "alone.qcow2"
    alone.write_bytes(b"QFI\xfb" + bytes(4092))
    assert fingerprint.backing_file(alone) is None
    bad = tmp_path / "bad"
    bad.write_bytes(b"QFI\xfb" + bytes(4) + (1 << 40).to_bytes(8, "big") + (10).to_bytes(4, "big"))
    with pytest.raises(ValueError):
        fingerprint.backing_file(bad)
    plain = tmp_path / "plain"
    plain.write_bytes(b"not an image at all")
    with pytest.raises(ValueError):
        fingerprint.backing_file(plain)
