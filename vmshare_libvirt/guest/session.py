"""One libguestfs appliance holding many disks.

The session is the only owner of a ``guestfs.GuestFS`` handle.  Disks are
always added with an explicit format.  ``close()`` calls ``shutdown()`` first
and raises if the appliance reports a write-back error: a handle that only
read never fails there, one that wrote must not hide a lost write.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import ApplianceSettings
from ..errors import GuestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttachedDisk:
    path: Path
    fmt: str
    readonly: bool
    device: str  # /dev/sda, /dev/sdb, ...


def _device_name(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return f"/dev/sd{letters}"


class GuestSession:
    """A libguestfs appliance with a list of disks.

    Use as a context manager::

        with GuestSession(settings) as s:
            dev = s.add_disk(path, "qcow2", readonly=True)
            s.launch()
            ...
    """

    def __init__(self, settings: ApplianceSettings | None = None, progress: Callable[[str], None] | None = None):
        import guestfs  # Debian's python3-guestfs; imported lazily (the hook never needs it)

        self._settings = settings or ApplianceSettings()
        self._progress = progress or (lambda _text: None)
        self.g = guestfs.GuestFS(python_return_dict=True)
        if self._settings.backend:
            self.g.set_backend(self._settings.backend)
        if self._settings.backend_settings:
            self.g.set_backend_settings(list(self._settings.backend_settings))
        if self._settings.memsize_mb:
            self.g.set_memsize(self._settings.memsize_mb)
        if self._settings.smp > 1:
            self.g.set_smp(self._settings.smp)
        self.disks: list[AttachedDisk] = []
        self.launched = False
        self._closed = False
        self._wrote = False

    def __enter__(self) -> "GuestSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add_disk(self, path: Path | str, fmt: str, *, readonly: bool) -> str:
        """Add a disk (before launch) and return its appliance device name."""
        if self.launched:
            raise GuestError("internal: disks must be added before the appliance starts")
        if fmt not in ("qcow2", "raw"):
            raise GuestError(f"unsupported image format {fmt!r}", target=str(path))
        path = Path(path)
        opts = dict(format=fmt, readonly=readonly)
        if not readonly:
            opts["cachemode"] = "writeback"  # libguestfs flushes on shutdown; safe, unlike 'unsafe'
            self._wrote = True
        try:
            self.g.add_drive_opts(str(path), **opts)
        except RuntimeError as exc:
            raise GuestError(f"cannot add disk: {exc}", target=str(path)) from exc
        dev = _device_name(len(self.disks))
        self.disks.append(AttachedDisk(path, fmt, readonly, dev))
        return dev

    def launch(self) -> None:
        self._progress(f"starting the libguestfs appliance for {len(self.disks)} disk(s)")
        start = time.monotonic()
        try:
            self.g.launch()
        except RuntimeError as exc:
            raise GuestError(
                f"the libguestfs appliance did not start: {exc}",
                hint="run 'libguestfs-test-tool'; where nested KVM is broken set appliance.backend_settings: [force_tcg]",
            ) from exc
        self.launched = True
        log.debug("appliance launched in %.1f s", time.monotonic() - start)

    def close(self) -> None:
        """Shut the appliance down, raising if it reports an error (lost writes)."""
        self._shutdown(raise_errors=True)

    def abort(self) -> None:
        """Close after a failure: errors at shutdown are logged, the first error stays the one reported."""
        self._shutdown(raise_errors=False)

    def _shutdown(self, *, raise_errors: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.launched:
                self.g.shutdown()
        except RuntimeError as exc:
            if raise_errors:
                raise GuestError(f"the appliance reported an error at shutdown: {exc}") from exc
            log.warning("appliance shutdown after a failure: %s", exc)
        finally:
            self.g.close()

    # Small helpers shared by the readers and writers -------------------------------------

    _mount_counter = 0

    def new_mountpoint(self, prefix: str = "m") -> str:
        GuestSession._mount_counter += 1
        mp = f"/vmshare-{prefix}{GuestSession._mount_counter}"
        self.g.mkmountpoint(mp)
        return mp


def guestfs_error(exc: RuntimeError, what: str, target: str | os.PathLike | None = None) -> GuestError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
    return GuestError(f"{what}: {text}", target=str(target) if target is not None else None)
