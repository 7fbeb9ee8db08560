"""Storage pools of the bases: one dir pool per group directory, stale ones dropped, problems only warnings.

libvirt is faked (pools only); the store's bases directories are real directories in tmp_path.
"""

from __future__ import annotations

import io

import libvirt
import pytest

from vmshare_libvirt import config, pool
from vmshare_libvirt.cli import Context
from vmshare_libvirt.cli._common import sync_pools


class FakePool:
    def __init__(self, conn, xml: str):
        self.conn, self.xml = conn, xml
        self.active = self.auto = False
        self.refreshed = 0

    def name(self):
        return self.xml.split("<name>")[1].split("</name>")[0]

    def XMLDesc(self, _flags):
        return self.xml

    def isActive(self):
        return self.active

    def autostart(self):
        return self.auto

    def setAutostart(self, value):
        self.auto = bool(value)

    def create(self, _flags):
        self.active = True

    def refresh(self, _flags):
        self.refreshed += 1

    def destroy(self):
        self.active = False

    def undefine(self):
        del self.conn.pools[self.name()]


class FakeConn:
    def __init__(self, fail: bool = False):
        self.pools: dict[str, FakePool] = {}
        self.fail = fail

    def listAllStoragePools(self, _flags):
        return list(self.pools.values())

    def storagePoolDefineXML(self, xml, _flags):
        if self.fail:
            raise libvirt.libvirtError("storage driver down")
        p = FakePool(self, xml)
        self.pools[p.name()] = p
        return p

    def storagePoolLookupByName(self, name):
        if name not in self.pools:
            raise libvirt.libvirtError("no pool")
        return self.pools[name]


@pytest.fixture
def cfg(tmp_path):
    for group in ("web", "db"):
        (tmp_path / "store" / "bases" / group).mkdir(parents=True)
    (tmp_path / "store" / "bases" / ".build-op1.qcow2").write_text("")
    return config.parse(f"store_dir: {tmp_path / 'store'}\n")


def test_xml_names_the_directory():
    xml = pool.pool_xml("vmshare-bases-web", "/var/lib/libvirt/vmshare/bases/web")
    assert pool.target_path(xml) == "/var/lib/libvirt/vmshare/bases/web"
    assert xml.startswith('<pool type="dir"><name>vmshare-bases-web</name>')


def test_each_group_directory_gets_an_active_autostarted_pool(cfg, tmp_path):
    conn = FakeConn()
    assert pool.sync(conn, cfg) == []
    assert sorted(conn.pools) == ["vmshare-bases-db", "vmshare-bases-web"]
    web = conn.pools["vmshare-bases-web"]
    assert web.active and web.auto and pool.target_path(web.xml) == str(tmp_path / "store" / "bases" / "web")
    assert pool.sync(conn, cfg) == [] and web.refreshed == 1  # the second time: refreshed, not redefined
    assert pool.diagnose(conn, cfg) == ("ok", "vmshare-bases-db, vmshare-bases-web active", None)


def test_pools_whose_directory_vanished_are_undefined_others_are_left_alone(cfg, tmp_path):
    conn = FakeConn()
    pool.sync(conn, cfg)
    conn.storagePoolDefineXML(pool.pool_xml("vmshare-bases-gone", "/nonexistent/store/bases/gone"), 0)
    conn.storagePoolDefineXML(pool.pool_xml("vmshare-bases-x", "/nonexistent/elsewhere"), 0)  # not a bases dir
    conn.storagePoolDefineXML(pool.pool_xml("default", "/nonexistent/store/bases/default"), 0)  # not our prefix
    (tmp_path / "store" / "bases" / "db").rmdir()
    assert pool.sync(conn, cfg) == []
    assert sorted(conn.pools) == ["default", "vmshare-bases-web", "vmshare-bases-x"]


def test_a_name_taken_by_another_live_directory_is_left_to_it_and_reported_by_doctor(cfg, tmp_path, caplog):
    other = tmp_path / "other" / "bases" / "web"
    other.mkdir(parents=True)
    conn = FakeConn()
    conn.storagePoolDefineXML(pool.pool_xml("vmshare-bases-web", str(other)), 0)
    with caplog.at_level("INFO", logger="vmshare_libvirt.pool"):
        assert pool.sync(conn, cfg) == []  # not a warning on every command: another store owns the name
    assert f"the pool name is taken by {other}" in caplog.text
    assert pool.target_path(conn.pools["vmshare-bases-web"].xml) == str(other)
    status, detail, fix = pool.diagnose(conn, cfg)
    assert status == "warn" and f"vmshare-bases-web points at {other}" in detail and fix


def test_a_definition_left_by_a_deleted_store_is_replaced(cfg, tmp_path):
    conn = FakeConn()
    conn.storagePoolDefineXML(pool.pool_xml("vmshare-bases-web", "/nonexistent/old/bases/web"), 0)
    assert pool.sync(conn, cfg) == []
    assert pool.target_path(conn.pools["vmshare-bases-web"].xml) == str(tmp_path / "store" / "bases" / "web")


def test_disabled_or_no_pool_api_does_nothing(tmp_path):
    (tmp_path / "s" / "bases" / "web").mkdir(parents=True)
    off = config.parse(f"store_dir: {tmp_path / 's'}\nstorage_pool: {{enabled: false}}\n")
    conn = FakeConn()
    assert pool.sync(conn, off) == [] and conn.pools == {}
    assert pool.diagnose(conn, off)[0] == "ok"
    assert pool.sync(object(), config.parse(f"store_dir: {tmp_path / 's'}\n")) == []


def test_the_prefix_comes_from_the_configuration(tmp_path):
    (tmp_path / "s" / "bases" / "web").mkdir(parents=True)
    cfg = config.parse(f"store_dir: {tmp_path / 's'}\nstorage_pool: {{name: host1}}\n")
    conn = FakeConn()
    pool.sync(conn, cfg)
    assert list(conn.pools) == ["host1-web"]


def test_libvirt_failures_are_warnings_on_stderr_never_errors(cfg):
    err = io.StringIO()
    ctx = Context(config_path=None, connect=None, debug=False, stdout=io.StringIO(), stderr=err)
    sync_pools(ctx, cfg, FakeConn(fail=True))
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("vmshare: warning: storage pool vmshare-bases-") for line in lines)
    assert "storage driver down" in lines[0]


def test_bases_pools_are_no_image_directories(cfg, tmp_path, monkeypatch):
    from vmshare_libvirt import domains

    (tmp_path / "store" / "state.db").write_text("")
    images = tmp_path / "images"
    images.mkdir()
    assert pool.is_bases_pool_dir(str(tmp_path / "store" / "bases" / "web"))
    assert not pool.is_bases_pool_dir(str(images)) and not pool.is_bases_pool_dir("/")
    conn = FakeConn()
    pool.sync(conn, cfg)
    conn.storagePoolDefineXML(pool.pool_xml("images", str(images)), 0)
    monkeypatch.setattr(domains, "DEFAULT_IMAGE_DIR", "/var/lib/libvirt/images")
    assert domains.allowed_image_dirs(conn) == ["/var/lib/libvirt/images", str(images)]


def test_the_watcher_refreshes_the_pools_after_the_engine(cfg, tmp_path):
    from vmshare_libvirt.engine.enroll import EnrollOutcome
    from vmshare_libvirt.watch.jobs import Enroller
    from vmshare_libvirt.watch.outcome import DoneLog

    def engine(cfg_, conn_, store_, name, group, progress):
        (tmp_path / "store" / "bases" / "new").mkdir()  # the engine made a group
        return EnrollOutcome(name, "consolidated", "new")

    conn = FakeConn()
    Enroller(cfg, store=None, done=DoneLog(), enroll_fn=engine)._enroll(conn, "web3", None)
    assert sorted(conn.pools) == ["vmshare-bases-db", "vmshare-bases-new", "vmshare-bases-web"]
