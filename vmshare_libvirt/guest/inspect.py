"""OS identity and disk layout of guest disks, read through the appliance."""

from __future__ import annotations

import logging
import re
import uuid as uuid_mod
from dataclasses import asdict, dataclass, field, replace

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


SECTOR = 512
# MBR partition types of extended partitions (logical partitions need parted).
_EXTENDED = (0x05, 0x0F, 0x85)
GPT_HEAD_SECTORS = 34  # protective MBR, GPT header, 128 entries of 128 bytes


def _guid(raw: bytes) -> str:
    """A GPT GUID (mixed-endian on disk) as libguestfs prints it (upper case)."""
    return str(uuid_mod.UUID(bytes_le=raw)).upper()


def parse_partition_table(head: bytes, disk_size: int) -> tuple[str | None, str | None, list[Partition]] | None:
    """Table type, disk id and partitions from the first sectors of a disk.

    Reads what ``parted``/``sfdisk`` would report for the common cases (an
    MBR with primary partitions only, a GPT whose entries follow its header)
    without starting a program in the appliance.  Returns ``(None, None, [])``
    when the disk has no partition table, and None for anything unusual
    (logical partitions, a damaged or odd GPT): the caller then asks parted.
    """
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return None if any(head[446:510]) and len(head) >= SECTOR else (None, None, [])
    slots = [head[446 + 16 * i: 462 + 16 * i] for i in range(4)]
    types = [s[4] for s in slots]
    if 0xEE in types:
        return _parse_gpt(head, disk_size)
    if any(t in _EXTENDED for t in types):
        return None
    if head[0:3] == b"\xeb\x3c\x90" or head[0:3] == b"\xeb\x58\x90":
        return None  # a FAT boot sector, not an MBR: let parted decide
    partitions = []
    for i, s in enumerate(slots, 1):
        if s[4] == 0:
            continue
        start, count = int.from_bytes(s[8:12], "little"), int.from_bytes(s[12:16], "little")
        if s[0] not in (0, 0x80) or not start or not count or (start + count) * SECTOR > disk_size:
            return None
        partitions.append(Partition(i, start * SECTOR, count * SECTOR, s[4], None, None, s[0] == 0x80))
    if not partitions:
        return None
    return "msdos", head[440:444][::-1].hex(), partitions


def _parse_gpt(head: bytes, disk_size: int):
    hdr = head[SECTOR: 2 * SECTOR]
    if hdr[0:8] != b"EFI PART" or len(head) < GPT_HEAD_SECTORS * SECTOR:
        return None
    entries_lba = int.from_bytes(hdr[72:80], "little")
    count = int.from_bytes(hdr[80:84], "little")
    size = int.from_bytes(hdr[84:88], "little")
    if size < 128 or entries_lba < 2 or (entries_lba * SECTOR + count * size) > len(head):
        return None
    partitions = []
    for i in range(count):
        e = head[entries_lba * SECTOR + i * size: entries_lba * SECTOR + (i + 1) * size]
        if not any(e[0:16]):
            continue
        first, last = int.from_bytes(e[32:40], "little"), int.from_bytes(e[40:48], "little")
        if not first or last < first or (last + 1) * SECTOR > disk_size:
            return None
        partitions.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR, None,
                                    _guid(e[0:16]), _guid(e[16:32]), False))
    return "gpt", _guid(hdr[56:72]), partitions


def _partitions_by_parted(g, dev: str) -> tuple[str | None, str | None, list[Partition]]:
    try:
        table = g.part_get_parttype(dev)
    except RuntimeError:
        return None, None, []
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
    return table, disk_id, partitions


def _fs_types(g, dev: str, partitions: list[Partition]) -> dict[str, str]:
    """Filesystem type of each partition (or of the whole disk without a table), by device."""
    devices = [f"{dev}{p.number}" for p in partitions] if partitions else [dev]
    out = {}
    for fsdev in devices:
        try:
            fstype = g.vfs_type(fsdev)
        except RuntimeError:
            fstype = ""
        out[fsdev] = fstype or "unknown"
    return out


def _layout(session: GuestSession, disk: AttachedDisk, mountpoints: dict[str, str]) -> DiskLayout:
    g = session.g
    dev = disk.device
    virtual_size = g.blockdev_getsize64(dev)
    head = g.pread_device(dev, GPT_HEAD_SECTORS * SECTOR, 0)
    parsed = parse_partition_table(head, virtual_size)
    table, disk_id, partitions = parsed if parsed is not None else _partitions_by_parted(g, dev)
    fs_types = _fs_types(g, dev, partitions)
    filesystems: list[Filesystem] = []
    for fsdev, fstype in sorted(fs_types.items()):
        if fstype == "unknown" and fsdev == dev:
            continue  # a blank disk
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


def _findings(session: GuestSession, disk: AttachedDisk, layout: DiskLayout, os_id: OsIdentity | None) -> list[Finding]:
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


LINUX_ROOT_FS = SUPPORTED_FS + ("xfs", "btrfs")


def _mountpoint_of(fs: Filesystem, layout: DiskLayout, fstab: list[tuple[str, str]]) -> str | None:
    for spec, mp in fstab:
        key, _, value = spec.partition("=")
        if key == "UUID" and fs.uuid and value.lower() == fs.uuid.lower():
            return mp
        if key == "LABEL" and fs.label and value == fs.label:
            return mp
        if key == "PARTUUID":
            part = next((p for p in layout.partitions if p.number == fs.partition), None)
            if part is not None and part.gpt_guid and value.upper() == part.gpt_guid.upper():
                return mp
        if spec.startswith("/dev/") and fs.partition and re.fullmatch(r"/dev/\w*?\D" + str(fs.partition), spec):
            return mp
    return None


def _identify_disk(session: GuestSession, disk: AttachedDisk, layout: DiskLayout):
    """(root partition, OsIdentity, fstab) found by :mod:`.osid`, None, or ``osid.UNKNOWN``."""
    from . import osid

    g = session.g
    unknown = False
    for fs in layout.filesystems:
        if fs.fstype not in LINUX_ROOT_FS:
            continue
        fsdev = disk.device + (str(fs.partition) if fs.partition else "")
        mp = session.new_mountpoint("id")
        try:
            g.mount_ro(fsdev, mp)
        except RuntimeError:
            continue
        try:
            found = osid.identify(g, mp)
        finally:
            g.umount(mp)
        if found == osid.UNKNOWN:
            unknown = True
        elif found is not None:
            return fs.partition, found[0], found[1]
    return osid.UNKNOWN if unknown else None


def inspect_disks(session: GuestSession) -> list[DiskInspection]:
    """Inspect every disk attached to a launched session.

    Linux roots are identified with a few reads (:mod:`.osid`); libguestfs'
    ``inspect_os`` (slow: seconds per disk under TCG) runs only when some
    filesystem looks like a root that reader does not understand.
    """
    from . import osid

    g = session.g
    try:
        pvs = list(g.pvs())
    except RuntimeError:
        pvs = []
    layouts = {disk.device: _layout(session, disk, {}) for disk in session.disks}
    found = {disk.device: _identify_disk(session, disk, layouts[disk.device]) for disk in session.disks}
    roots: list[str] | None = None
    if any(f == osid.UNKNOWN for f in found.values()):
        try:
            roots = g.inspect_os()
        except RuntimeError as exc:
            raise guestfs_error(exc, "inspection failed") from exc
    results = []
    for disk in session.disks:
        layout = layouts[disk.device]
        os_id = None
        mountpoints: dict[int, str] = {}
        f = found[disk.device]
        if f == osid.UNKNOWN:
            root = next((r for r in roots if r == disk.device or (r.startswith(disk.device) and r[len(disk.device):].isdigit())), None)
            os_id = _os_identity(g, root) if root else None
            if root:
                for mp, fsdev in g.inspect_get_mountpoints(root).items():
                    if fsdev == disk.device or fsdev[len(disk.device):].isdigit():
                        mountpoints[_partnum(fsdev, disk.device)] = mp
        elif f is not None:
            root_part, os_id, fstab = f
            for fs in layout.filesystems:
                mp = "/" if fs.partition == root_part else _mountpoint_of(fs, layout, fstab)
                if mp is not None:
                    mountpoints[fs.partition] = mp
        if mountpoints:
            layout = replace(layout, filesystems=tuple(replace(fs, mountpoint=mountpoints.get(fs.partition))
                                                       for fs in layout.filesystems))
        findings = _findings(session, disk, layout, os_id)
        if any(pv.startswith(disk.device) for pv in pvs):
            findings.append(Finding("lvm", "the disk holds LVM physical volumes (LVM is not supported yet)"))
        results.append(DiskInspection(str(disk.path), disk.fmt, disk.device, os_id, layout, tuple(findings)))
    return results
