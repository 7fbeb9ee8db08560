"""Pure parts of patching: dpkg status parsing, dpkg's failure reasons, target selection, the store's history."""

from __future__ import annotations

import sqlite3

import pytest

from vmshare_libvirt import statedb
from vmshare_libvirt.engine.patch import select
from vmshare_libvirt.errors import TargetError
from vmshare_libvirt.guest.patcher import _dpkg_reason, conffile_digests, parse_dpkg_status
from vmshare_libvirt.store import SCHEMA_VERSION, Store

STATUS = """\
Package: base-files
Status: install ok installed
Version: 12.4+deb12u5
Conffiles:
 /etc/debian_version 1b3e5b9e8d0c8b1f1e0e9f0d1c2b3a49
 /etc/issue 3c3a8c9fb5ba2a3e4c7a1b1f0a2e6e36
 /etc/old obsolete

Package: removed-pkg
Status: deinstall ok config-files
Version: 1.0

Package: vmshare-testpkg
Status: install ok installed
Version: 1.0
"""


def test_installed_packages_and_their_conffiles():
    found = parse_dpkg_status(STATUS)
    assert sorted(found) == ["base-files", "vmshare-testpkg"]
    assert found["base-files"]["Version"] == "12.4+deb12u5"
    assert conffile_digests(found["base-files"]) == {
        "/etc/debian_version": "1b3e5b9e8d0c8b1f1e0e9f0d1c2b3a49",
        "/etc/issue": "3c3a8c9fb5ba2a3e4c7a1b1f0a2e6e36", "/etc/old": "obsolete"}
    assert conffile_digests(found["vmshare-testpkg"]) == {}


def test_dpkg_failures_say_which_dependency_is_missing():
    output = """\
Selecting previously unselected package vmshare-brokenpkg.
(Reading database ... 6481 files and directories currently installed.)
Preparing to unpack .../vmshare-brokenpkg_1.0_all.deb ...
Unpacking vmshare-brokenpkg (1.0) ...
dpkg: dependency problems prevent configuration of vmshare-brokenpkg:
 vmshare-brokenpkg depends on vmshare-nonexistent; however:
  Package vmshare-nonexistent is not installed.

dpkg: error processing package vmshare-brokenpkg (--install):
 dependency problems - leaving unconfigured
Errors were encountered while processing:
 vmshare-brokenpkg
"""
    assert _dpkg_reason(output) == ("dpkg failed: vmshare-brokenpkg depends on vmshare-nonexistent; however: / "
                                    "Package vmshare-nonexistent is not installed.")


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "store") as s:
        yield s


def test_targets_are_groups_or_members(store):
    store.add_group("web", {"distro": "debian"})
    gen = store.add_generation("web", "/b/gen-1.qcow2")
    for name in ("web1", "web2"):
        store.add_member(name, f"/img/{name}.qcow2", "web", gen.id, None, None)
    chosen = select(store, ["web", "web1"])
    assert list(chosen) == ["web"]  # web1 is already part of the group target
    method, members = chosen["web"]
    assert method == "group" and [m.domain for m in members] == ["web1", "web2"]
    chosen = select(store, ["web2"])
    assert list(chosen) == ["domain:web2"] and chosen["domain:web2"][0] == "domain"
    with pytest.raises(TargetError) as err:
        select(store, ["db1"])
    assert err.value.message == "neither a group nor a member of one"


def test_patch_history_and_kept_overlays_are_recorded(store):
    store.add_group("web", {})
    gen = store.add_generation("web", "/b/gen-1.qcow2")
    rec = store.add_patch("fix", "ab" * 32, "/p/fix.yaml", "web", 3, gen.id,
                          {"web1": {"result": "patched", "detail": ""}})
    assert store.patches("web") == [rec]
    store.add_kept_overlay("/img/web1.qcow2.vmshare-keep-op3", "/img/web1.qcow2", gen.id, 3)
    kept = store.kept_overlays(disk_path="/img/web1.qcow2")
    assert [(k.path, k.generation_id, k.op_id) for k in kept] == [("/img/web1.qcow2.vmshare-keep-op3", gen.id, 3)]
    store.forget_kept_overlay(kept[0].path)
    assert store.kept_overlays() == []


def test_a_version_1_store_is_migrated_when_opened_for_writing(tmp_path):
    directory = tmp_path / "store"
    Store.open(directory).close()
    raw = sqlite3.connect(directory / "state.db")
    raw.executescript("DROP TABLE patches; DROP TABLE kept_overlays; UPDATE schema_version SET version = 1;")
    raw.close()
    with Store.open(directory, readonly=True) as ro:  # readers accept the old version as it is
        assert ro.groups() == []
    with Store.open(directory) as rw:
        assert rw.patches() == [] and rw.kept_overlays() == []
    raw = sqlite3.connect(directory / "state.db")
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == statedb.MIGRATIONS[-1][0]


def test_boot_entries_name_kernels_and_initramfs_images():
    from vmshare_libvirt.guest.patcher import boot_paths

    grub = """\
menuentry 'Debian GNU/Linux' {
	linux	/boot/vmlinuz-6.1.0-27-amd64 root=UUID=1234 ro quiet
	initrd	/boot/initrd.img-6.1.0-27-amd64
}
	linux ${prefix}/vmlinuz
"""
    assert boot_paths(grub) == ["/boot/vmlinuz-6.1.0-27-amd64", "/boot/initrd.img-6.1.0-27-amd64"]
    extlinux = "LABEL linux\n  KERNEL /vmlinuz\n  APPEND root=/dev/vda1 initrd=/initrd.img ro\n"
    assert boot_paths(extlinux) == ["/vmlinuz", "/initrd.img"]
