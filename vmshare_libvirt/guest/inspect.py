"""OS identity and disk layout of guest disks, read through the appliance."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field

from .session import AttachedDisk, GuestSession, guestfs_error

log = logging.getLogger(__name__)

# Filesystems vmshare can rebuild at the file level today.
SUPPORTED_FS = ("ext2", "ext3", "ext4")
# Areas a guest can carry that are copied raw into each member's overlay.
RAW_COPY_FS = ("swap", "unknown", "")
# Hibernation signatures at the end of the first page of a swap area.
HIBERNATION_SIGNATURES = (b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001")
PAGE_SIZE = 4096


@dataclass(frozen=True)
class OsIdentity:
    type: str
    distro: str
    product_name: str
    major: int
    minor: int
    arch: str
    package_format: str

    @property
    def group_key(self) -> tuple[str, str, int, str]:
        """What members of one group share; point releases belong together."""
        return (self.type, self.distro, self.major, self.arch)

    def label(self) -> str:
        return f"{self.distro} {self.major} ({self.arch})"


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes
    mbr_id: int | None
    gpt_type: str | None
    gpt_guid: str | None
    bootable: bool


@dataclass(frozen=True)
class Filesystem:
    partition: int  # partition number; 0 for a filesystem on the whole disk
    fstype: str
    uuid: str
    label: str
    size: int  # bytes the filesystem spans (ext*: block count x block size)
    mountpoint: str | None  # where the guest mounts it, from inspection
    features: tuple[str, ...] = ()
    block_size: int = 0
    inode_size: int = 0


@dataclass(frozen=True)
class DiskLayout:
    virtual_size: int
    table: str | None  # "msdos", "gpt" or None
    disk_id: str | None  # MBR signature (hex) or GPT disk GUID
    partitions: tuple[Partition, ...]
    filesystems: tuple[Filesystem, ...]

    def first_partition_start(self) -> int:
        return min((p.start for p in self.partitions), default=0)

    def filesystem(self, partition: int) -> Filesystem | None:
        return next((f for f in self.filesystems if f.partition == partition), None)


@dataclass(frozen=True)
class Finding:
    """Something inside the disk that stops vmshare from sharing it."""

    code: str
    message: str


@dataclass(frozen=True)
class DiskInspection:
    path: str
    fmt: str
    device: str
    os: OsIdentity | None
    layout: DiskLayout
    findings: tuple[Finding, ...] = field(default=())

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("device")
        return data


def _partnum(device: str, disk_device: str) -> int:
    """'/dev/sda1' -> 1, '/dev/sda' -> 0."""
    rest = device[len(disk_device):]
    return int(rest) if rest.isdigit() else 0


def _ext_details(g, dev: str) -> tuple[int, tuple[str, ...], int, int]:
    info = g.tune2fs_l(dev)
    block_size = int(info.get("Block size", "0"))
    size = int(info.get("Block count", "0")) * block_size
    features = tuple(sorted(info.get("Filesystem features", "").split()))
    inode_size = int(info.get("Inode size", "0"))
    return size, features, block_size, inode_size


def _layout(session: GuestSession, disk: AttachedDisk, fs_types: dict[str, str], mountpoints: dict[str, str]) -> DiskLayout:
    g = session.g
    dev = disk.device
    virtual_size = g.blockdev_getsize64(dev)
    try:
        table = g.part_get_parttype(dev)
    except RuntimeError:
        table = None
    partitions: list[Partition] = []
    disk_id = None
    if table:
        for p in g.part_list(dev):
            num = p["part_num"]
            mbr_id = gpt_type = gpt_guid = None
            if table == "msdos":
                mbr_id = g.part_get_mbr_id(dev, num)
                bootable = g.part_get_bootable(dev, num)
            else:
                gpt_type = g.part_get_gpt_type(dev, num)
                gpt_guid = g.part_get_gpt_guid(dev, num)
                bootable = False
            partitions.append(Partition(num, p["part_start"], p["part_size"], mbr_id, gpt_type, gpt_guid, bootable))
        if table == "msdos":
            disk_id = g.pread_device(dev, 4, 440)[::-1].hex()
        elif table == "gpt":
            disk_id = g.part_get_disk_guid(dev)
    filesystems: list[Filesystem] = []
    for fsdev, fstype in sorted(fs_types.items()):
        if not (fsdev == dev or re.fullmatch(re.escape(dev) + r"\d+", fsdev)):
            continue
        num = _partnum(fsdev, dev)
        uuid = label = ""
        try:
            uuid = g.vfs_uuid(fsdev)
            label = g.vfs_label(fsdev)
        except RuntimeError:
            pass
        size = g.blockdev_getsize64(fsdev)
        features: tuple[str, ...] = ()
        block_size = inode_size = 0
        if fstype in SUPPORTED_FS:
            size, features, block_size, inode_size = _ext_details(g, fsdev)
        mp = mountpoints.get(fsdev)
        filesystems.append(Filesystem(num, fstype, uuid, label, size, mp, features, block_size, inode_size))
    return DiskLayout(virtual_size, table, disk_id, tuple(partitions), tuple(filesystems))


def _os_identity(g, root: str) -> OsIdentity:
    return OsIdentity(
        type=g.inspect_get_type(root),
        distro=g.inspect_get_distro(root),
        product_name=g.inspect_get_product_name(root),
        major=g.inspect_get_major_version(root),
        minor=g.inspect_get_minor_version(root),
        arch=g.inspect_get_arch(root),
        package_format=g.inspect_get_package_format(root),
    )


def _findings(session: GuestSession, disk: AttachedDisk, layout: DiskLayout, os_id: OsIdentity | None,
              fs_types: dict[str, str]) -> list[Finding]:
    g = session.g
    found: list[Finding] = []
    if os_id is None:
        found.append(Finding("no-os", "no operating system found on this disk"))
    for fs in layout.filesystems:
        fsdev = disk.device + (str(fs.partition) if fs.partition else "")
        if fs.fstype == "swap":
            tail = g.pread_device(fsdev, 10, PAGE_SIZE - 10)
            if any(tail.startswith(sig) for sig in HIBERNATION_SIGNATURES):
                found.append(Finding("hibernated", f"the swap area on partition {fs.partition} holds a hibernation image"))
        elif fs.fstype == "ntfs":
            found.append(Finding("unsupported-filesystem", f"partition {fs.partition}: ntfs is not supported yet"))
        elif fs.fstype == "crypto_LUKS":
            found.append(Finding("encrypted", f"partition {fs.partition} is LUKS-encrypted"))
        elif fs.fstype == "LVM2_member":
            found.append(Finding("lvm", f"partition {fs.partition} is an LVM physical volume (LVM is not supported yet)"))
        elif fs.fstype not in SUPPORTED_FS and fs.fstype not in RAW_COPY_FS:
            found.append(Finding("unsupported-filesystem", f"partition {fs.partition}: {fs.fstype} is not supported yet"))
    if layout.table not in ("msdos", "gpt") and not any(f.partition == 0 for f in layout.filesystems):
        found.append(Finding("unsupported-layout", "no partition table vmshare understands"))
    if any(f.partition == 0 for f in layout.filesystems):
        found.append(Finding("unsupported-layout", "a filesystem on the whole disk without a partition table is not supported yet"))
    return found


def inspect_disks(session: GuestSession) -> list[DiskInspection]:
    """Inspect every disk attached to a launched session (one ``inspect_os`` for all)."""
    g = session.g
    try:
        fs_types = g.list_filesystems()
        roots = g.inspect_os()
    except RuntimeError as exc:
        raise guestfs_error(exc, "inspection failed") from exc
    try:
        pvs = list(g.pvs())
    except RuntimeError:
        pvs = []
    results = []
    for disk in session.disks:
        root = next((r for r in roots if r == disk.device or (r.startswith(disk.device) and r[len(disk.device):].isdigit())), None)
        os_id = _os_identity(g, root) if root else None
        mountpoints: dict[str, str] = {}
        if root:
            for mp, fsdev in g.inspect_get_mountpoints(root).items():
                mountpoints[fsdev] = mp
        layout = _layout(session, disk, fs_types, mountpoints)
        findings = _findings(session, disk, layout, os_id, fs_types)
        if any(pv.startswith(disk.device) for pv in pvs):
            findings.append(Finding("lvm", "the disk holds LVM physical volumes (LVM is not supported yet)"))
        results.append(DiskInspection(str(disk.path), disk.fmt, disk.device, os_id, layout, tuple(findings)))
    return results
