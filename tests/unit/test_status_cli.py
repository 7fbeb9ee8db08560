"""'vmshare status': operations under way, domain states, real use on the host, backing chains.

The store, the base, the overlays (made with qemu-img) and the kept originals are real files in tmp_path;
libvirt is faked (domain states only), or unreachable.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from vmshare_libvirt import sizes
from vmshare_libvirt.cli import _common
from vmshare_libvirt.cli import main as cli_main
from vmshare_libvirt.errors import ConnectionError_
from vmshare_libvirt.store import Store

from test_cli_commit import FakeConn

pytestmark = pytest.mark.requires("qemu-img")
MiB = 1024 * 1024


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def fill(path: Path, n: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(n))


class Host:
    """Group g: base gens 1 and 2 (2 MiB of data each), members web1 (running, kept original 3 MiB) and
    web2 (shut off, committed) on gen 2; web1 also keeps its overlay on gen 1 from before a patch."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.store_dir = root / "store"
        self.config = root / "vmshare.yaml"
        self.config.write_text(f"store_dir: {self.store_dir}\n")
        bases = root / "bases"
        bases.mkdir()
        self.gen1, self.gen2 = bases / "gen-1.qcow2", bases / "gen-2.qcow2"
        raw = root / "data.raw"
        fill(raw, 2 * MiB)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(self.gen1))
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(self.gen2))
        raw.unlink()
        self.disk = {d: root / f"{d}.qcow2" for d in ("web1", "web2")}
        qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(self.gen2), str(self.disk["web1"]))
        qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(self.gen2), str(self.disk["web2"]))
        self.kept_overlay = root / "web1.qcow2.vmshare-prev"
        qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(self.gen1), str(self.kept_overlay))
        self.orig = root / "web1.qcow2.vmshare-orig"
        fill(self.orig, 3 * MiB)
        with Store.open(self.store_dir) as store:
            store.add_group("g", {"distro": "debian", "major": 12})
            g1 = store.add_generation("g", str(self.gen1))
            store.publish_generation(g1.id, {"size": 1}, "ab" * 32)
            g2 = store.add_generation("g", str(self.gen2))
            store.publish_generation(g2.id, {"size": 1}, "cd" * 32)
            store.add_member("web1", str(self.disk["web1"]), "g", g2.id, str(self.orig), 3 * MiB)
            store.add_member("web2", str(self.disk["web2"]), "g", g2.id, None, 4 * MiB)
            store.commit_member(str(self.disk["web2"]))
            store.add_kept_overlay(str(self.kept_overlay), str(self.disk["web1"]), g1.id, None)
        self.conn = FakeConn({"web1": libvirt.VIR_DOMAIN_RUNNING, "web2": libvirt.VIR_DOMAIN_SHUTOFF})
        self.reachable = True

        def connector(ctx, cfg):
            def connect():
                if not self.reachable:
                    raise ConnectionError_("cannot connect to libvirt: no socket", target="qemu:///system")
                return self.conn
            return connect

        monkeypatch.setattr(_common, "connector", connector)
        monkeypatch.setattr("vmshare_libvirt.cli.status.connector", connector)

    def run(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = cli_main(["--config", str(self.config), "status", *argv], out, err)
        return rc, out.getvalue(), err.getvalue()

    def json(self) -> dict:
        rc, out, err = self.run("--json")
        assert rc == 0, err
        return json.loads(out)


@pytest.fixture
def host(tmp_path, monkeypatch):
    return Host(tmp_path, monkeypatch)


def test_each_member_shows_its_domain_state(host):
    members = {m["domain"]: m for m in host.json()["groups"][0]["members"]}
    assert (members["web1"]["domain_state"], members["web2"]["domain_state"]) == ("running", "shutoff")
    rc, out, _ = host.run()
    assert "  member web1 [running]: gen 2, enrolled" in out
    assert "  member web2 [shutoff]: gen 2, committed" in out


def test_without_libvirt_the_states_are_unknown_and_status_still_works(host):
    host.reachable = False
    data = host.json()
    assert {m["domain_state"] for m in data["groups"][0]["members"]} == {"unknown"}
    rc, out, err = host.run()
    assert rc == 0 and "member web1 [unknown]" in out


def test_each_member_shows_its_backing_chain_with_private_and_shared_bytes(host):
    members = {m["domain"]: m for m in host.json()["groups"][0]["members"]}
    web1 = members["web1"]
    assert web1["chain_source"] == "image"
    assert [(c["path"], c["generation"]) for c in web1["chain"]] == [(str(host.disk["web1"]), None),
                                                                      (str(host.gen2), 2)]
    assert web1["private_bytes"] == sizes.allocated(str(host.disk["web1"]))
    assert web1["shared_bytes"] == sizes.allocated(str(host.gen2)) >= 2 * MiB
    assert web1["shared_with"] == 1  # web2 is on gen 2 too
    assert [(c["path"], c["generation"]) for c in members["web2"]["chain"]] == [(str(host.disk["web2"]), None),
                                                                                (str(host.gen2), 2)]
    _, out, _ = host.run()
    lines = out.splitlines()
    i = lines.index("  member web2 [shutoff]: gen 2, committed, was 4.0 MiB")
    assert lines[i + 1:i + 5] == [f"    {host.disk['web2']}",
                                  f"      overlay, private {_common.human_bytes(members['web2']['private_bytes'])}",
                                  f"    -> {host.gen2}",
                                  f"      base gen 2, shared with 1 other member, "
                                  f"{_common.human_bytes(sizes.allocated(str(host.gen2)))}"]


def test_an_unreadable_overlay_falls_back_to_the_chain_the_store_records(host):
    host.disk["web2"].write_bytes(b"not a qcow2 any more")
    web2 = {m["domain"]: m for m in host.json()["groups"][0]["members"]}["web2"]
    assert web2["chain_source"] == "store"
    assert [c["path"] for c in web2["chain"]] == [str(host.disk["web2"]), str(host.gen2)]


def test_real_use_on_the_host_counts_kept_files_and_commit_frees_the_originals(host):
    [g] = host.json()["groups"]
    alloc = {k: sizes.allocated(str(p)) for k, p in (("gen1", host.gen1), ("gen2", host.gen2),
                                                     ("web1", host.disk["web1"]), ("web2", host.disk["web2"]),
                                                     ("orig", host.orig), ("prev", host.kept_overlay))}
    assert g["original_bytes"] == 7 * MiB
    assert g["base_bytes"] == alloc["gen1"] + alloc["gen2"]
    assert g["overlay_bytes"] == alloc["web1"] + alloc["web2"]
    assert g["kept_original_bytes"] == alloc["orig"] >= 3 * MiB
    assert g["kept_overlay_bytes"] == alloc["prev"] > 0
    assert g["host_bytes"] == sum(alloc.values())
    assert g["host_saved_bytes"] == 7 * MiB - g["host_bytes"]
    assert g["commit_frees_bytes"] == alloc["orig"]
    assert g["after_commit_bytes"] == g["host_bytes"] - alloc["orig"]
    assert g["saved_bytes"] == g["original_bytes"] - g["allocated_bytes"]  # the logical figure, as before
    _, out, _ = host.run()
    hb = _common.human_bytes
    assert out.splitlines()[0] == (f"Group g: 7.0 MiB before, {hb(g['host_bytes'])} on the host now "
                                   f"(of which {hb(alloc['orig'] + alloc['prev'])} kept)")
    assert f"  'vmshare commit' would free {hb(alloc['orig'])}: then {hb(g['after_commit_bytes'])}" in out
    assert f"    kept overlay {host.kept_overlay}" in out
    assert f"  base gen 1 [published]: {host.gen1} {hb(alloc['gen1'])} used by nobody (kept overlays of web1)" in out


def test_a_file_named_twice_is_counted_once(tmp_path):
    a = tmp_path / "a"
    fill(a, MiB)
    (tmp_path / "b").hardlink_to(a)
    assert sizes.allocated_once([str(a), str(tmp_path / "b"), str(a), str(tmp_path / "gone")]) == \
        sizes.allocated(str(a)) > 0


def test_an_operation_in_progress_is_shown_before_any_group(tmp_path, monkeypatch):
    config = tmp_path / "vmshare.yaml"
    config.write_text(f"store_dir: {tmp_path / 'store'}\n")
    with Store.open(tmp_path / "store") as store:
        op = store.begin_operation("consolidate", {"domains": ["web1", "web2"], "group": None})
        store.mark_busy("web1", "/img/web1.qcow2", op)
        out, err = io.StringIO(), io.StringIO()
        assert cli_main(["--config", str(config), "status"], out, err) == 0, err.getvalue()
        lines = out.getvalue().splitlines()
        assert lines[0].startswith(f"operation {op} (consolidate) in progress since ")
        assert lines[0].endswith(f", pid {os.getpid()}: web1, web2")
        assert lines[1:] == ["  web1: building /img/web1.qcow2", "No groups yet."]
        out = io.StringIO()
        assert cli_main(["--config", str(config), "status", "--json"], out, err) == 0
        [got] = json.loads(out.getvalue())["operations"]
        assert {k: got[k] for k in ("id", "kind", "state", "pid", "domains")} == \
            {"id": op, "kind": "consolidate", "state": "in progress", "pid": os.getpid(), "domains": ["web1", "web2"]}
        assert got["disks"] == [{"domain": "web1", "disk": "/img/web1.qcow2", "stage": "building"}]


def test_an_operation_whose_process_died_is_shown_as_interrupted(tmp_path):
    config = tmp_path / "vmshare.yaml"
    config.write_text(f"store_dir: {tmp_path / 'store'}\n")
    Store.open(tmp_path / "store").close()
    code = ("import sys; from vmshare_libvirt.store import Store; s = Store.open(sys.argv[1]);"
            " print(s.begin_operation('enroll', {'domains': ['web3']}), flush=True); import os; os._exit(0)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True,
                           check=True)
    op = int(child.stdout)
    out, err = io.StringIO(), io.StringIO()
    assert cli_main(["--config", str(config), "status"], out, err) == 0, err.getvalue()
    first = out.getvalue().splitlines()[0]
    assert first.startswith(f"operation {op} (enroll) interrupted: started ") and "'vmshare recover'" in first


def test_a_generation_stored_as_changes_to_another_says_so(host):
    """Generation 2 holding only its changes to generation 1 (its backing file): the older one is not
    'used by nobody' alone, status says what is stored on it."""
    host.gen2.unlink()
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(host.gen1), str(host.gen2))
    gens = {g["id"]: g for g in host.json()["groups"][0]["generations"]}
    assert (gens[1]["stored_on"], gens[1]["base_of"]) == (None, [2])
    assert (gens[2]["stored_on"], gens[2]["base_of"]) == (1, [])
    _, out, _ = host.run()
    assert "used by nobody (kept overlays of web1); gen 2 stored on it\n" in out
    assert "used by web1, web2; its changes to gen 1\n" in out


@pytest.mark.requires("qemu-io")
def test_reclaim_estimates_what_every_members_overlay_holds_alike(host):
    """--reclaim hashes the members' overlays on the host: 8 KiB both hold alike (at different offsets)
    would be stored once, in a new base."""
    for disk, offset in ((host.disk["web1"], "0"), (host.disk["web2"], "1M")):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {offset} 8k", str(disk)], check=True,
                       capture_output=True)
    rc, out, err = host.run("--reclaim", "--json")
    assert rc == 0, err
    est = json.loads(out)["groups"][0]["reclaim_estimate"]
    assert (est["bytes"], est["blocks"], est["members_read"], est["members_unread"]) == (8192, 1, 2, 0)
    rc, out, err = host.run("--reclaim")
    assert rc == 0, err
    assert ("  a resync would reclaim about 8.0 KiB: 1 block contents held by every member's overlay (2 overlays"
            in out), out
    assert "reclaim_estimate" not in host.json()["groups"][0]  # only when asked: it reads every overlay


def test_a_members_recorded_locked_drift_is_shown_with_what_the_hook_does(host):
    with Store.open(host.store_dir) as store:
        store.record_locked_drift(str(host.disk["web2"]), "web2", "g", 2, 3, "/usr/bin/ls (content)", "refuse")
    data = host.json()
    drift = {m["domain"]: m["locked_drift"] for m in data["groups"][0]["members"]}
    assert drift["web1"] is None and drift["web2"]["entries"] == 3 and drift["web2"]["policy"] == "refuse"
    rc, out, _ = host.run()
    assert "    locked paths: 3 changed (first /usr/bin/ls (content)), checked " in out
    assert "; the hook refuses its start (lockdown.on_drift: refuse)\n" in out
