"""A libguestfs appliance that does not come up in time is ended, and the caller gets an error."""

from __future__ import annotations

import subprocess

import pytest

from vmshare_libvirt.errors import GuestError
from vmshare_libvirt.guest import session as session_mod

pytestmark = pytest.mark.requires("qemu-img")


def test_an_appliance_that_does_not_start_in_time_is_ended(tmp_path, monkeypatch):
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    monkeypatch.setattr(session_mod, "LAUNCH_TIMEOUT_S", 3.0)  # no TCG appliance boots this fast
    s = session_mod.GuestSession()
    assert s.space_watch is not None, "the tests run the direct backend, where QEMU's monitor is ours"
    s.add_disk(disk, "qcow2", readonly=True)
    with pytest.raises(GuestError) as err:
        s.launch()
    s.abort()
    assert err.value.message == "the libguestfs appliance did not start within 3 s and was stopped"
