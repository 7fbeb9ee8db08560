"""libvirt storage pools for the base generations: one ``dir`` pool per group.

Bases live in ``<store_dir>/bases/<group>/gen-N.qcow2``.  A ``dir`` pool lists
one directory level only, so a single pool on ``bases/`` would show the group
directories, not the generations.  Each group's directory is therefore a pool
of its own, named ``<storage_pool.name>-<group>`` (``vmshare-bases-web``), so
``virsh vol-list vmshare-bases-web``, virt-manager and cockpit show every
generation with its capacity and allocation.  The pools are persistent,
autostarted and only ever *refreshed*: vmshare never builds, deletes or
creates volumes through libvirt (the store and the engine own the files).

:func:`sync` runs after every writing command (``cli._common.writing_session``)
and after each enrollment of the watcher.  It defines and starts the pool of
each group directory, refreshes it, and undefines the pools of this prefix
whose directory has vanished (a group whose last base was collected, a
deleted store): undefining a pool never touches files.  A name already
defined on another directory that still exists (a second store with the same
prefix) is left to that store and only logged; ``vmshare doctor`` reports it.
It never raises for libvirt problems: it returns them as warnings, and a
command's outcome never depends on its pools.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from typing import Any

log = logging.getLogger(__name__)


def pool_name(prefix: str, group: str) -> str:
    return f"{prefix}-{group}"


def pool_xml(name: str, path: str) -> str:
    root = ET.Element("pool", type="dir")
    ET.SubElement(root, "name").text = name
    ET.SubElement(ET.SubElement(root, "target"), "path").text = path
    return ET.tostring(root, encoding="unicode")


def target_path(xml: str) -> str | None:
    node = ET.fromstring(xml).find("./target/path")
    return node.text if node is not None else None


def bases_dir(cfg) -> str:
    return os.path.join(str(cfg.store_dir), "bases")


def group_dirs(cfg) -> dict[str, str]:
    """``group -> directory`` for each group directory in the store (hidden entries are temporaries)."""
    root = bases_dir(cfg)
    try:
        names = os.listdir(root)
    except OSError:  # no store yet, or not readable: no pool to want
        return {}
    return {n: os.path.join(root, n) for n in sorted(names)
            if not n.startswith(".") and os.path.isdir(os.path.join(root, n))}


def wanted_pools(cfg) -> dict[str, str]:
    """``pool name -> directory`` of the pools the store should have."""
    prefix = cfg.storage_pool.name
    return {pool_name(prefix, g): path for g, path in group_dirs(cfg).items()}


def is_stale(name: str, path: str | None, prefix: str) -> bool:
    """A pool of ours whose directory is gone: ``<prefix>-<group>`` on a missing ``.../bases/<group>``."""
    if not name.startswith(f"{prefix}-") or not path:
        return False
    group = name[len(prefix) + 1:]
    parent, last = os.path.split(os.path.normpath(path))
    return last == group and os.path.basename(parent) == "bases" and not os.path.isdir(path)


def is_bases_pool_dir(path: str) -> bool:
    """Whether ``path`` is a group directory of a vmshare store (``<store>/bases/<group>``, ``<store>/state.db``).

    Such a pool lists bases; it is no image directory: no disk vmshare changes may live there
    (:func:`vmshare_libvirt.domains.allowed_image_dirs` leaves these pools out, as before they existed).
    """
    from .statedb import DB_NAME

    bases = os.path.dirname(os.path.normpath(path))
    return os.path.basename(bases) == "bases" and os.path.isfile(os.path.join(os.path.dirname(bases), DB_NAME))


def has_pool_api(conn: Any) -> bool:
    return callable(getattr(conn, "listAllStoragePools", None))


def sync(conn: Any, cfg) -> list[str]:
    """Define, start and refresh each group's pool, drop our pools whose directory vanished; the warnings."""
    if not cfg.storage_pool.enabled or not has_pool_api(conn):
        return []
    import libvirt

    warnings: list[str] = []
    try:
        existing = {p.name(): p for p in conn.listAllStoragePools(0)}
    except libvirt.libvirtError as exc:
        return [f"cannot list the storage pools: {_message(exc)}"]
    wanted = wanted_pools(cfg)
    for name, path in wanted.items():
        try:
            _ensure(conn, existing.get(name), name, path)
        except NameTaken as exc:
            log.info("storage pool %s: %s", name, exc)  # another store's; 'vmshare doctor' reports it
        except libvirt.libvirtError as exc:
            warnings.append(f"{name} ({path}): {_message(exc)}")
    for name, pool in existing.items():
        if name in wanted:
            continue  # handled above (a stale definition of a wanted name was replaced)
        try:
            if is_stale(name, target_path(pool.XMLDesc(0)), cfg.storage_pool.name):
                _drop(pool)
                log.info("undefined storage pool %s: its directory is gone", name)
        except libvirt.libvirtError as exc:  # housekeeping only (another vmshare may be dropping it too)
            log.debug("storage pool %s: %s", name, _message(exc))
    return warnings


class NameTaken(Exception):
    """The pool name is defined on another directory that still exists (another store with the same prefix)."""


def _ensure(conn: Any, pool: Any, name: str, path: str) -> None:
    if pool is not None:
        current = target_path(pool.XMLDesc(0))
        if current != path:
            if current and os.path.isdir(current):
                raise NameTaken(f"the pool name is taken by {current}; set storage_pool.name to another prefix")
            _drop(pool)  # a definition left by a store that is gone
            pool = None
    if pool is None:
        pool = conn.storagePoolDefineXML(pool_xml(name, path), 0)
        log.info("defined storage pool %s on %s", name, path)
    if not pool.autostart():
        pool.setAutostart(1)
    if pool.isActive():
        pool.refresh(0)
    else:
        pool.create(0)  # starting a dir pool reads its volumes


def _drop(pool: Any) -> None:
    if pool.isActive():
        pool.destroy()
    pool.undefine()


def _message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    return " ".join(str((get() if get else None) or exc).split())


def diagnose(conn: Any, cfg) -> tuple[str, str, str | None]:
    """``(status, detail, fix)`` for ``vmshare doctor``: every group directory has its active pool."""
    if not cfg.storage_pool.enabled:
        return "ok", "disabled (storage_pool.enabled: false)", None
    import libvirt

    wanted = wanted_pools(cfg)
    problems = []
    for name, path in wanted.items():
        try:
            pool = conn.storagePoolLookupByName(name)
            current = target_path(pool.XMLDesc(0))
            if current != path:
                problems.append(f"{name} points at {current}")
            elif not pool.isActive():
                problems.append(f"{name} is not active")
        except libvirt.libvirtError:
            problems.append(f"{name} is not defined")
    if problems:
        return "warn", "; ".join(problems), "run 'vmshare recover' (every writing command registers the pools)"
    if not wanted:
        return "ok", "no group yet: no pool needed", None
    return "ok", f"{', '.join(wanted)} active", None
