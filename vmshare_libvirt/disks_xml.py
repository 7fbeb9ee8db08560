"""Pure reading and editing of the ``<disk>`` elements of libvirt domain XML.

Nothing here talks to libvirt or starts a program: these functions map XML
text to :class:`DiskSpec` values and back, so they are unit-tested on strings.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .errors import TargetError

FILE_TYPES = ("file",)


@dataclass(frozen=True)
class BackingElement:
    """One ``<backingStore>`` layer declared in the XML (index 1 is the first)."""

    type: str
    source: str | None
    format: str | None
    index: int | None


@dataclass(frozen=True)
class DiskSpec:
    """One ``<disk>`` element of a domain.

    ``source`` is the path for ``file``/``block``/``dir`` disks,
    ``"<pool>/<volume>"`` for ``volume`` disks, ``"<protocol>:<name>"`` for
    ``network`` disks, and ``None`` for an empty drive (a cdrom without media).
    """

    device: str
    type: str
    source: str | None
    format: str | None
    target_dev: str | None
    target_bus: str | None
    readonly: bool
    shareable: bool
    empty_backing_store: bool
    backing_chain: tuple[BackingElement, ...]

    @property
    def is_file(self) -> bool:
        return self.type in FILE_TYPES and self.source is not None


def _source_of(disk_type: str, element: ET.Element) -> str | None:
    source = element.find("source")
    if source is None:
        return None
    if disk_type == "file":
        return source.get("file")
    if disk_type == "block":
        return source.get("dev")
    if disk_type == "dir":
        return source.get("dir")
    if disk_type == "volume":
        pool, volume = source.get("pool"), source.get("volume")
        return f"{pool}/{volume}" if pool and volume else None
    if disk_type == "network":
        protocol, name = source.get("protocol"), source.get("name")
        return f"{protocol}:{name}" if protocol else None
    return source.get("file") or source.get("dev") or source.get("path")


def _is_empty_backing_store(element: ET.Element) -> bool:
    return element.tag == "backingStore" and not element.attrib and len(element) == 0


def _backing_chain(disk: ET.Element) -> tuple[BackingElement, ...]:
    layers = []
    current = disk.find("backingStore")
    while current is not None and not _is_empty_backing_store(current):
        layer_type = current.get("type", "file")
        fmt = current.find("format")
        index = current.get("index")
        layers.append(
            BackingElement(
                type=layer_type,
                source=_source_of(layer_type, current),
                format=fmt.get("type") if fmt is not None else None,
                index=int(index) if index and index.isdigit() else None,
            )
        )
        current = current.find("backingStore")
    return tuple(layers)


def _disk_spec(disk: ET.Element) -> DiskSpec:
    disk_type = disk.get("type", "file")
    driver = disk.find("driver")
    target = disk.find("target")
    top_backing = disk.find("backingStore")
    return DiskSpec(
        device=disk.get("device", "disk"),
        type=disk_type,
        source=_source_of(disk_type, disk),
        format=driver.get("type") if driver is not None else None,
        target_dev=target.get("dev") if target is not None else None,
        target_bus=target.get("bus") if target is not None else None,
        readonly=disk.find("readonly") is not None,
        shareable=disk.find("shareable") is not None,
        empty_backing_store=top_backing is not None and _is_empty_backing_store(top_backing),
        backing_chain=_backing_chain(disk),
    )


def _root(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise TargetError(f"domain XML does not parse: {exc}") from None
    if root.tag != "domain":
        raise TargetError(f"not a domain XML document (root element <{root.tag}>)")
    return root


def parse_disks(xml: str) -> list[DiskSpec]:
    """Every ``<disk>`` of a domain XML document, in document order."""
    root = _root(xml)
    return [_disk_spec(disk) for disk in root.findall("./devices/disk")]


def domain_name(xml: str) -> str | None:
    name = _root(xml).find("name")
    return name.text if name is not None else None


_TARGET_RE = re.compile(r"^([a-z]*?d)([a-z]+)$")


def target_sort_key(dev: str | None) -> tuple[str, int, str]:
    """Order targets the way guests number them: vda < vdb < ... < vdz < vdaa."""
    if not dev:
        return ("~", 0, "")
    match = _TARGET_RE.match(dev)
    if not match:
        return (dev, 0, "")
    prefix, letters = match.groups()
    return (prefix, len(letters), letters)


def _namespaces(xml: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for _event, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
        if prefix:
            found.setdefault(prefix, uri)
    return found


def without_empty_backing_store(xml: str, target_dev: str) -> str:
    """The domain XML with the explicit empty ``<backingStore/>`` removed from
    the disk whose target is ``target_dev``.  Other disks are untouched.

    Raises :class:`TargetError` when no disk has that target.  When the disk
    has no empty ``<backingStore/>`` the document is returned re-serialised
    but equivalent.
    """
    root = _root(xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") != target_dev:
            continue
        for child in list(disk):
            if _is_empty_backing_store(child):
                disk.remove(child)
        break
    else:
        raise TargetError(f"the domain has no disk with target {target_dev!r}")
    # Keep the document's own namespace prefixes (e.g. in <metadata>) instead
    # of ElementTree's ns0, ns1, ...
    for prefix, uri in _namespaces(xml).items():
        try:
            ET.register_namespace(prefix, uri)
        except ValueError:
            pass
    return ET.tostring(root, encoding="unicode")
