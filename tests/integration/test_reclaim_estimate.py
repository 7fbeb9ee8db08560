"""The host-side estimate of what a resync would reclaim (engine/reclaim.py), on real qcow2 overlays
written with qemu-io: block contents every member's overlay holds count, wherever they sit; zeros,
blocks only some members hold, and what lies in the base do not."""

from __future__ import annotations

import subprocess

import pytest

from vmshare_libvirt.engine import reclaim

pytestmark = [pytest.mark.requires("qemu-img"), pytest.mark.requires("qemu-io")]


def _overlay(path, base, *commands: str) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", str(base), "-F",
                    "qcow2", str(path)], check=True)
    for c in commands:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, str(path)], check=True, capture_output=True)
    return str(path)


def test_blocks_every_member_holds_are_counted_once_per_extra_member(tmp_path):
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(base)], check=True, capture_output=True)
    same = "write -P 0xab 4M 64k"  # 16 blocks of one content, at the same place in every member
    a = _overlay(tmp_path / "a.qcow2", base, same, "write -P 0xcd 8M 8k", "write -P 0xee 12M 4k", "write -z 16M 64k")
    b = _overlay(tmp_path / "b.qcow2", base, same, "write -P 0xcd 9M 8k", "write -z 16M 64k")
    c = _overlay(tmp_path / "c.qcow2", base, same, "write -P 0xcd 10M 8k", "write -P 0xee 13M 4k")
    est = reclaim.estimate([a, b, c])
    # 0xab: 16 copies in each of 3 members, 0xcd: 2 in each (at different offsets): 18 x 2 spared blocks;
    # 0xee is in two members only, the zeros and the base's 0x11 count for nothing
    assert (est.members, est.unread, est.blocks, est.bytes) == (3, 0, 2, 36 * 4096)
    assert est.overlay_bytes >= (16 + 2 + 1) * 4096 * 2
    assert reclaim.estimate([a]).bytes == 0  # one member: nothing to share with


def test_an_unreadable_overlay_is_left_out_and_said(tmp_path):
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    a = _overlay(tmp_path / "a.qcow2", base, "write -P 0xab 0 8k")
    b = _overlay(tmp_path / "b.qcow2", base, "write -P 0xab 0 8k")
    est = reclaim.estimate([a, b, str(tmp_path / "gone.qcow2")])
    assert (est.members, est.unread, est.bytes) == (2, 1, 2 * 4096)
