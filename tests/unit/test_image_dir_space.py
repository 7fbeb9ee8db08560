"""The image directories filling up: the up-front check of the room the new overlays need, and the
watch that ends an appliance QEMU paused because a write found its filesystem full (a fake QEMU
monitor here; tests/integration/test_consolidate.py fills a real tmpfs under a real appliance)."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmshare_libvirt.engine import files
from vmshare_libvirt.engine.consolidate import check_overlay_space
from vmshare_libvirt.errors import GuestError, NoSpaceError
from vmshare_libvirt.guest.session import AttachedDisk, SpaceWatch, space_stops_since

MiB = 1024 * 1024
Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def free_space(monkeypatch):
    """Pretend every filesystem has ``free_space.bytes`` free; records the directories asked about."""
    state = SimpleNamespace(bytes=0, asked=[])

    def disk_usage(path):
        state.asked.append(str(path))
        return Usage(1 << 40, 0, state.bytes)

    monkeypatch.setattr(files.shutil, "disk_usage", disk_usage)
    return state


class _Plan:
    """A group plan that predicts a fixed overlay size per member."""

    def __init__(self, predicted: dict[str, int]):
        self.predicted = predicted

    def predicted_overlay_bytes(self, target) -> int:
        return self.predicted[target.name]


def _members(tmp_path: Path, layout: dict[str, str]) -> list[SimpleNamespace]:
    out = []
    for name, directory in layout.items():
        (tmp_path / directory).mkdir(exist_ok=True)
        out.append(SimpleNamespace(name=name, disk_path=str(tmp_path / directory / f"{name}.qcow2")))
    return out


def test_overlays_of_members_sharing_a_directory_are_added_up(tmp_path, free_space):
    """Two members in one directory, one in another directory of the same filesystem: together they
    need every predicted overlay plus the largest once more (its compacted copy sits beside it)."""
    members = _members(tmp_path, {"a": "images", "b": "images", "c": "other"})
    gp = _Plan({"a": 3 * MiB, "b": 5 * MiB, "c": 4 * MiB})
    needed = 3 * MiB + 5 * MiB + 4 * MiB + 5 * MiB  # one filesystem: one compacted copy at a time
    free_space.bytes = needed - 1
    with pytest.raises(NoSpaceError) as info:
        check_overlay_space(gp, members)
    assert str(info.value) == (
        f"not enough free space in {tmp_path / 'images'}, {tmp_path / 'other'} for the new overlays: "
        f"16 MiB free, about 17 MiB needed (free some space and run the command again; nothing was changed)")
    free_space.bytes = needed
    check_overlay_space(gp, members)


def test_directories_on_different_filesystems_are_checked_apart(tmp_path, free_space, monkeypatch):
    members = _members(tmp_path, {"a": "one", "b": "two"})
    real_stat = os.stat
    devices = {str(tmp_path / "one"): 101, str(tmp_path / "two"): 202}

    def fake_stat(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return SimpleNamespace(st_dev=devices[str(path)]) if str(path) in devices else st

    monkeypatch.setattr(files.os, "stat", fake_stat)
    free_space.bytes = 6 * MiB  # enough for each directory alone (2 x 3 MiB), not for both together
    check_overlay_space(_Plan({"a": 3 * MiB, "b": 3 * MiB}), members)
    assert sorted(free_space.asked) == sorted(devices)


def test_the_refusal_rounds_what_is_needed_up(tmp_path, free_space):
    """A need below 1 MiB is not shown as "about 0 MiB needed"."""
    free_space.bytes = 0
    with pytest.raises(NoSpaceError, match=r": 0 MiB free, about 1 MiB needed \("):
        files.check_free_space(str(tmp_path), 65536, "the base")


# ------------------------------------------------------------------ the watch on QEMU's monitor


class FakeMonitor:
    """A QMP server on a unix socket: greets, answers the watch's commands, sends events on demand."""

    def __init__(self, path: str, blocks: list[dict], early: dict | None = None):
        self.early = early or {"event": "RESUME", "timestamp": {}}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.blocks = blocks
        self.commands: list[str] = []
        self.quit = threading.Event()
        self.ready = threading.Event()
        self.conn = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, msg: dict) -> None:
        self.conn.sendall(json.dumps(msg).encode() + b"\r\n")

    def _serve(self) -> None:
        self.conn, _ = self.server.accept()
        self._send({"QMP": {"version": {}, "capabilities": ["oob"]}})
        for line in self.conn.makefile("rb"):
            command = json.loads(line)["execute"]
            self.commands.append(command)
            if command == "query-block":
                self._send(self.early)  # an event before the answer
                self._send({"return": self.blocks})
                self.ready.set()
            elif command == "quit":
                self._send({"return": {}})
                self.quit.set()
                self.conn.close()
                return
            else:
                self._send({"return": {}})

    def event(self, name: str, data: dict) -> None:
        self._send({"event": name, "data": data, "timestamp": {}})


def _disks(*paths: str) -> list[AttachedDisk]:
    return [AttachedDisk(Path(p), "qcow2", i == 0, f"/dev/sd{chr(97 + i)}") for i, p in enumerate(paths)]


def test_an_appliance_stopped_by_a_full_filesystem_is_ended(tmp_path):
    """QEMU paused the appliance on ENOSPC: the watch records the image's directory and makes QEMU quit,
    so that the libguestfs call waiting for the appliance fails instead of waiting for ever."""
    started = time.monotonic()
    watch = SpaceWatch()
    monitor = FakeMonitor(watch.socket_path, [
        {"device": "hd0", "inserted": {"file": "/var/tmp/libguestfsXYZ/overlay1.qcow2"}},
        {"device": "hd1", "inserted": {"file": "/images/full/f1.qcow2.vmshare-new"}},
    ])
    try:
        watch.start(_disks("/images/full/f1.qcow2", "/images/full/f1.qcow2.vmshare-new"))
        assert monitor.ready.wait(5)
        monitor.event("BLOCK_IO_ERROR", {"device": "hd0", "operation": "read", "action": "report",
                                         "nospace": False, "reason": "Input/output error"})
        monitor.event("BLOCK_IO_ERROR", {"device": "hd1", "operation": "write", "action": "stop",
                                         "nospace": True, "reason": "No space left on device"})
        assert monitor.quit.wait(5), "the watch did not end the stopped appliance"
        assert monitor.commands == ["qmp_capabilities", "query-block", "quit"]
        assert watch.stopped_dir == "/images/full"
        assert "/images/full" in space_stops_since(started)
        assert "/images/full" not in space_stops_since(time.monotonic())
    finally:
        watch.close()
    assert not os.path.exists(os.path.dirname(watch.socket_path))


def test_a_stop_reported_while_the_watch_starts_is_not_missed():
    stop = {"event": "BLOCK_IO_ERROR", "timestamp": {},
            "data": {"device": "hd0", "operation": "write", "action": "stop", "nospace": True}}
    watch = SpaceWatch()
    monitor = FakeMonitor(watch.socket_path, [], early=stop)
    try:
        watch.start(_disks("/images/early/a.qcow2"))
        assert monitor.quit.wait(5), "the stop that came before the watch ran was missed"
        assert watch.stopped_dir == "/images/early"
    finally:
        watch.close()


def test_an_error_the_guest_is_told_about_leaves_the_appliance_running(tmp_path):
    watch = SpaceWatch()
    monitor = FakeMonitor(watch.socket_path, [])
    try:
        watch.start(_disks("/images/a.qcow2"))
        assert monitor.ready.wait(5)
        monitor.event("BLOCK_IO_ERROR", {"device": "hd0", "operation": "read", "action": "report",
                                         "nospace": False, "reason": "Input/output error"})
        assert not monitor.quit.wait(0.5)
        assert watch.stopped_dir is None
    finally:
        watch.close()


def test_an_appliance_that_cannot_be_watched_is_refused():
    """Without the monitor a full filesystem would pause the appliance for ever: refuse to go on."""
    watch = SpaceWatch()
    try:
        with pytest.raises(GuestError, match=re.escape("cannot watch the appliance through QEMU's monitor")):
            watch.start(_disks("/images/a.qcow2"))
    finally:
        watch.close()


def test_the_monitor_path_is_quoted_for_qemu():
    watch = SpaceWatch()
    try:
        watch.socket_path = "/tmp/a,b/qmp.sock"
        assert watch.qemu_option() == "unix:/tmp/a,,b/qmp.sock,server=on,wait=off"
    finally:
        watch.close()
