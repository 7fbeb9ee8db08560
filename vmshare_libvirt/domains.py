"""libvirt domains: state, disks, the offline check, shutdown and start.

The offline check (docs/operations.md, rule 1) is a list of :class:`Blocker` values:
an empty list means vmshare may write the disks it asked about.  The
connection is always an argument.  Hibernation signatures inside the guest
are checked by the guest module, not here.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import libvirt

from . import qemu_img
from .disks_xml import DiskSpec, parse_disks, target_sort_key, without_empty_backing_store
from .errors import BlockedError, ImageError, OperationError, TargetError
from .libvirt_conn import libvirt_errors, list_domains, lookup, open_connection, pool_target_paths

__all__ = [
    "Blocker",
    "DomainState",
    "DEFAULT_IMAGE_DIR",
    "allowed_image_dirs",
    "disk_blockers",
    "domain_state",
    "domains_using_path",
    "list_domains",
    "lookup",
    "offline_blockers",
    "open_connection",
    "os_disks",
    "qemu_lock_held",
    "remove_empty_backing_store",
    "shutdown_and_wait",
    "start",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_DIR = "/var/lib/libvirt/images"

# QEMU's file-posix driver takes OFD read locks on byte 100 + i for each
# permission bit i it holds, and on byte 200 + i for each one it refuses to
# share (block/file-posix.c, RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE).  Any
# lock in that window means a QEMU process has the image open; a paused guest
# keeps them.  64 bytes per window covers every permission bit.
_QEMU_LOCK_START = 100
_QEMU_LOCK_LEN = 200 + 64 - 100


class DomainState(enum.Enum):
    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    def __str__(self) -> str:
        return self.value


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}

# Blocker code for every state other than shut off.
_STATE_CODES = {
    DomainState.NOSTATE: "unknown-state",
    DomainState.RUNNING: "running",
    DomainState.BLOCKED: "running",
    DomainState.PAUSED: "paused",
    DomainState.SHUTTING_DOWN: "shutting-down",
    DomainState.CRASHED: "crashed",
    DomainState.PMSUSPENDED: "pmsuspended",
}


@dataclass(frozen=True)
class Blocker:
    """One reason why vmshare must not write a domain's disk now."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# ------------------------------------------------------------------ reading


def domain_state(dom: libvirt.virDomain) -> DomainState:
    with libvirt_errors(dom.name(), "cannot read the domain state"):
        code = dom.state(0)[0]
    return _STATES.get(code, DomainState.NOSTATE)


def _config_xml(dom: libvirt.virDomain, *, secure: bool = False) -> str:
    """The persistent definition (the XML vmshare would change), or the live
    XML of a transient domain.  A running domain's live XML shows an empty
    ``<backingStore/>`` on every unbacked disk, so it cannot be used to find
    the explicit ones an administrator wrote."""
    name = dom.name()
    flags = libvirt.VIR_DOMAIN_XML_SECURE if secure else 0
    with libvirt_errors(name, "cannot read the domain XML"):
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        return dom.XMLDesc(flags)


def _disks_of(dom: libvirt.virDomain) -> list[DiskSpec]:
    name = dom.name()
    try:
        return parse_disks(_config_xml(dom))
    except TargetError as exc:
        raise TargetError(exc.message, target=name) from exc


def os_disks(dom: libvirt.virDomain) -> list[DiskSpec]:
    """The file-backed ``device="disk"`` disks of ``dom``, in target order."""
    disks = [d for d in _disks_of(dom) if d.device == "disk" and d.is_file]
    return sorted(disks, key=lambda d: target_sort_key(d.target_dev))


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _paths_in_xml(dom: libvirt.virDomain) -> set[str]:
    """Every host path a domain's XML names (disk sources and declared backing
    layers), from the persistent and, when running, the live definition."""
    name = dom.name()
    documents = []
    with libvirt_errors(name, "cannot read the domain XML"):
        if dom.isPersistent():
            documents.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if dom.isActive():
            documents.append(dom.XMLDesc(0))
    paths: set[str] = set()
    for xml in documents:
        for disk in parse_disks(xml):
            if disk.type in ("file", "block") and disk.source:
                paths.add(os.path.realpath(disk.source))
            for layer in disk.backing_chain:
                if layer.type in ("file", "block") and layer.source:
                    paths.add(os.path.realpath(layer.source))
    return paths


def _backing_paths(disk: DiskSpec) -> set[str]:
    """Backing files of a qcow2 disk as qemu-img sees them (read with -U)."""
    if disk.format != "qcow2" or not disk.source or not os.path.isfile(disk.source):
        return set()
    try:
        layers = qemu_img.chain(disk.source, "qcow2", force_share=True)
    except ImageError as exc:
        log.warning("cannot read the backing chain of %s: %s", disk.source, exc)
        return set()
    return {os.path.realpath(layer.filename) for layer in layers[1:]}


def domains_using_path(
    conn: libvirt.virConnect,
    path: str,
    *,
    exclude: str | None = None,
    follow_chains: bool = True,
) -> list[str]:
    """Names of the defined domains (other than ``exclude``) whose disks are
    ``path`` or have it in their backing chain (declared in the XML or, with
    ``follow_chains``, recorded in their qcow2 images)."""
    wanted = os.path.realpath(path)
    users = []
    for dom in list_domains(conn):
        name = dom.name()
        if name == exclude:
            continue
        try:
            if wanted in _paths_in_xml(dom):
                users.append(name)
                continue
            if follow_chains and any(wanted in _backing_paths(d) for d in _disks_of(dom) if d.is_file):
                users.append(name)
        except TargetError as exc:
            if exc.message == "no such domain":  # undefined while we looked
                continue
            raise
    return users


# ------------------------------------------------------------------ blockers


def allowed_image_dirs(conn: libvirt.virConnect) -> list[str]:
    """Directories vmshare may touch: the default image directory and every
    storage pool's target path (never ``/`` itself, never the pool of a
    vmshare store's bases: bases are no guest disks)."""
    from .pool import is_bases_pool_dir

    dirs = [DEFAULT_IMAGE_DIR]
    for path in pool_target_paths(conn):
        if (os.path.isabs(path) and os.path.realpath(path) != "/" and path not in dirs
                and not is_bases_pool_dir(path)):
            dirs.append(path)
    return dirs


def _under(path: str, directory: str) -> bool:
    real_dir = os.path.realpath(directory)
    return os.path.commonpath([path, real_dir]) == real_dir and path != real_dir


def _path_blocker(path: str, image_dirs: Sequence[str]) -> Blocker | None:
    """Where the disk file lives: a regular file, no symlink, in an image dir."""
    if not os.path.isabs(path):
        return Blocker("outside-image-dirs", f"{path} is not an absolute path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Blocker("missing-disk", f"{path} does not exist")
    except OSError as exc:
        return Blocker("missing-disk", f"{path} cannot be read: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        return Blocker("outside-image-dirs", f"{path} is a symbolic link")
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return Blocker("outside-image-dirs", f"{path} is a device")
    if not stat.S_ISREG(st.st_mode):
        return Blocker("outside-image-dirs", f"{path} is not a regular file")
    real = os.path.realpath(path)
    if not any(_under(real, d) for d in image_dirs):
        return Blocker(
            "outside-image-dirs",
            f"{path} is not under a libvirt image directory ({', '.join(image_dirs)})",
        )
    return None


def qemu_lock_held(path: str) -> bool:
    """True when some process holds QEMU's image lock bytes on ``path``.

    Uses an open-file-description lock test (``F_OFD_GETLK``), as QEMU does
    itself; it takes no lock.  Where the filesystem does not support OFD
    locks, falls back to ``qemu-img info`` without ``-U``, which fails on an
    image a QEMU process has open for writing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageError(f"cannot open to test QEMU's lock: {exc.strerror}", target=path) from None
    try:
        request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _QEMU_LOCK_START, _QEMU_LOCK_LEN, 0)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
                raise ImageError(f"cannot test QEMU's lock: {exc.strerror}", target=path) from None
            return _locked_by_qemu_img(path)
    finally:
        os.close(fd)
    lock_type = struct.unpack("hhqqi4x", answer)[0]
    return lock_type != fcntl.F_UNLCK


def _locked_by_qemu_img(path: str) -> bool:
    try:
        qemu_img.info(path, qemu_img.detect_format(path))
    except qemu_img.ImageLockedError:
        return True
    return False


def _image_blockers(path: str, declared_format: str | None) -> list[Blocker]:
    """What the image itself carries: format, snapshots, bitmaps, LUKS, data-file."""
    try:
        actual = qemu_img.detect_format(path)
    except (ImageError, TargetError) as exc:
        return [Blocker("unreadable-image", exc.message)]
    fmt = declared_format or actual
    if fmt == "raw" or actual == "raw":
        return [Blocker("raw-disk", f"{path} is a raw image; only qcow2 disks can become overlays")]
    if fmt != actual:
        return [Blocker("format-mismatch", f"{path} is {actual} but the domain XML says {fmt}")]
    if fmt != "qcow2":
        return [Blocker("unsupported-format", f"{path} is a {fmt} image; only qcow2 is supported")]
    try:
        info = qemu_img.info(path, "qcow2", force_share=True)
    except ImageError as exc:
        return [Blocker("unreadable-image", exc.message)]
    found = []
    if info.snapshots:
        names = ", ".join(s.name for s in info.snapshots)
        found.append(Blocker("internal-snapshots", f"{path} holds qcow2 internal snapshots ({names})"))
    if info.bitmaps:
        names = ", ".join(b.name for b in info.bitmaps)
        found.append(Blocker("bitmaps", f"{path} holds persistent dirty bitmaps ({names})"))
    if info.encrypted:
        found.append(Blocker("encrypted", f"{path} is encrypted"))
    if info.data_file:
        found.append(Blocker("data-file", f"{path} keeps its data in an external file {info.data_file}"))
    if info.corrupt:
        found.append(Blocker("corrupt", f"{path} is marked corrupt"))
    return found


def disk_blockers(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    disk: DiskSpec,
    *,
    image_dirs: Sequence[str] | None = None,
) -> list[Blocker]:
    """Reasons why vmshare must not rebuild this one disk of ``dom``."""
    name = dom.name()
    if disk.type != "file":
        return [Blocker("not-file-disk", f"{disk.target_dev}: a {disk.type} disk, not a file")]
    if not disk.source:
        return [Blocker("not-file-disk", f"{disk.target_dev}: no source file")]
    path = disk.source
    if image_dirs is None:
        image_dirs = allowed_image_dirs(conn)
    where = _path_blocker(path, image_dirs)
    if where is not None:
        return [where]
    found = []
    if disk.empty_backing_store:
        found.append(Blocker(
            "empty-backingstore",
            f"{disk.target_dev}: the domain XML declares an empty <backingStore/> "
            "(an overlay would lose its base)",
        ))
    if disk.shareable:
        found.append(Blocker("shared-disk", f"{disk.target_dev}: {path} is marked <shareable/>"))
    others = domains_using_path(conn, path, exclude=name)
    if others:
        found.append(Blocker("shared-disk", f"{path} is also used by {', '.join(others)}"))
    if qemu_lock_held(path):
        found.append(Blocker("qemu-lock", f"a process holds QEMU's lock on {path}"))
    found.extend(_image_blockers(path, disk.format))
    return found


def offline_blockers(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    disk_paths: Iterable[str] | None = None,
) -> list[Blocker]:
    """Everything that keeps ``dom`` from being offline for vmshare.

    Domain-level: not shut off, managed-save image, transient, libvirt
    snapshots or checkpoints.  Disk-level (see :func:`disk_blockers`) for each
    disk in ``disk_paths``, or for every OS disk when ``disk_paths`` is None.
    An empty list means vmshare may write those disks now.
    """
    name = dom.name()
    found = []
    state = domain_state(dom)
    if state is not DomainState.SHUTOFF:
        found.append(Blocker(_STATE_CODES[state], f"domain {name} is {state}"))
    with libvirt_errors(name, "cannot read the domain's saved state and snapshots"):
        if dom.hasManagedSaveImage(0):
            found.append(Blocker(
                "managed-save",
                f"domain {name} has a managed-save image (its saved RAM expects the current disk)",
            ))
        if not dom.isPersistent():
            found.append(Blocker("transient", f"domain {name} is transient (no persistent definition)"))
        snapshots = dom.snapshotNum(0)
        if snapshots:
            found.append(Blocker("libvirt-snapshots", f"domain {name} has {snapshots} libvirt snapshot(s)"))
        checkpoints = dom.listAllCheckpoints(0) if hasattr(dom, "listAllCheckpoints") else []
        if checkpoints:
            found.append(Blocker(
                "libvirt-checkpoints", f"domain {name} has {len(checkpoints)} libvirt checkpoint(s)"
            ))
    disks = _disks_of(dom)
    if disk_paths is None:
        selected = os_disks(dom)
    else:
        selected = []
        for path in disk_paths:
            match = [d for d in disks if d.source and _same_file(d.source, path)]
            if not match:
                found.append(Blocker("unknown-disk", f"{path} is not a disk of domain {name}"))
            selected.extend(match)
    image_dirs = allowed_image_dirs(conn)
    for disk in selected:
        found.extend(disk_blockers(conn, dom, disk, image_dirs=image_dirs))
    return found


# ------------------------------------------------------------------ changing


def shutdown_and_wait(dom: libvirt.virDomain, timeout: float, *, poll: float = 0.5) -> None:
    """Ask the guest to shut down cleanly and wait until it is shut off.

    Returns at once for a shut-off domain.  A paused or pmsuspended guest
    cannot act on the request and is refused; a guest still running after
    ``timeout`` seconds raises :class:`BlockedError` (it is left running).
    """
    name = dom.name()
    state = domain_state(dom)
    if state is DomainState.SHUTOFF:
        return
    if state in (DomainState.PAUSED, DomainState.PMSUSPENDED, DomainState.CRASHED):
        raise BlockedError(f"domain is {state} and cannot shut down cleanly", target=name,
                           hint="resume it first, or shut it down yourself")
    log.info("asking domain %s to shut down", name)
    with libvirt_errors(name, "cannot shut the domain down"):
        dom.shutdown()
    deadline = time.monotonic() + timeout
    while True:
        if domain_state(dom) is DomainState.SHUTOFF:
            return
        if time.monotonic() >= deadline:
            raise BlockedError(
                f"domain did not shut down within {timeout:g} s",
                target=name,
                hint="check that the guest handles ACPI shutdown, or shut it down yourself",
            )
        time.sleep(poll)


def start(dom: libvirt.virDomain) -> None:
    """Start a defined domain (a managed-save image, if any, is restored)."""
    name = dom.name()
    log.info("starting domain %s", name)
    with libvirt_errors(name, "cannot start the domain"):
        dom.create()


def remove_empty_backing_store(conn: libvirt.virConnect, dom: libvirt.virDomain, target_dev: str) -> bool:
    """Redefine ``dom`` without the explicit empty ``<backingStore/>`` of the
    disk ``target_dev``, so libvirt reads the backing chain from the image.

    Returns False when that disk had none (nothing is redefined).
    """
    name = dom.name()
    with libvirt_errors(name, "cannot read the domain definition"):
        if not dom.isPersistent():
            raise BlockedError("a transient domain has no definition to change", target=name)
    xml = _config_xml(dom, secure=True)
    disk = [d for d in parse_disks(xml) if d.target_dev == target_dev]
    if not disk:
        raise TargetError(f"the domain has no disk with target {target_dev!r}", target=name)
    if not disk[0].empty_backing_store:
        return False
    new_xml = without_empty_backing_store(xml, target_dev)
    log.info("removing the empty <backingStore/> of %s from domain %s", target_dev, name)
    with libvirt_errors(name, "cannot redefine the domain"):
        conn.defineXML(new_xml)
    after = [d for d in _disks_of(lookup(conn, name)) if d.target_dev == target_dev]
    if not after or after[0].empty_backing_store:
        raise OperationError(f"libvirt kept the empty <backingStore/> of {target_dev}", target=name)
    return True
