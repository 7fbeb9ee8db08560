"""The ``switch`` step: a verified overlay takes the place of a member's disk.

Per member, under the store lock and after re-checking that the domain is
offline and the disk unchanged since it was read:

1. the busy mark moves to ``switching`` (refused if a start of the domain asked
   to cancel first, so the hook and the switch cannot both win);
2. owner, mode and label of the disk are copied onto the overlay;
3. the disk gets a second name, ``<disk>.vmshare-orig`` (a regroup's replaced
   overlay: ``<disk>.vmshare-prev``; a patch's, kept for ``rollback --generation``:
   ``<disk>.vmshare-keep-op<N>``), durably;
4. the overlay is renamed over the disk path (fsync file, rename, fsync directory);
5. the member is recorded in the store.

Undo: before step 4 the disk path still holds the original, so the step is
reversed by dropping the second name and the overlay.  From step 4 on, the disk
path holds the verified overlay and a guest may already be using it: the switch
is rolled forward (the member is recorded), never renamed back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .. import qemu_img
from ..errors import ConnectionError_, OperationError
from ..libvirt_conn import lookup, open_connection
from ..plan import Target
from .files import (copy_ownership, crashpoint, durable_link, durable_rename, file_identity, fsync_dir,
                    remove_quietly, same_inode)
from .operation import Operation, StepRecord, step_type

log = logging.getLogger(__name__)

PREV_SUFFIX = ".vmshare-prev"
ORIG_SUFFIX = ".vmshare-orig"
KEEP_SUFFIX = ".vmshare-keep-op"
# Host-side blockers that the switch fixes itself instead of refusing.
FIXABLE = ("empty-backingstore",)
STARTED_MEANWHILE = "the domain was started meanwhile"


@dataclass
class MemberSpec:
    """A member's disk as it was read: what must not have changed when it is switched."""
    domain: str
    disk: str
    fmt: str
    identity: dict[str, int]
    allocated: int

    @classmethod
    def of(cls, t: Target, fmt: str) -> "MemberSpec":
        return cls(t.name, t.disk_path, fmt, file_identity(t.disk_path), t.allocated_bytes)


class Libvirt:
    """The libvirt connection of a long operation, reopened once if libvirtd restarted meanwhile."""

    def __init__(self, conn):
        self.conn = conn
        self.uri = conn.getURI()

    def domain(self, name: str):
        try:
            return lookup(self.conn, name)
        except ConnectionError_:
            self.conn = open_connection(self.uri)
            return lookup(self.conn, name)


def _record_member(store, data: dict[str, Any]) -> None:
    """The store learns that ``data['disk']`` now is an overlay on generation ``data['generation']``."""
    disk = data["disk"]
    if "previous_generation" in data:
        # a regroup or a patch: the member's original (if not committed) stays its way back
        store.move_member(disk, data["generation"], data.get("original"))
        if data.get("keep"):
            store.add_kept_overlay(data["orig"], disk, data["previous_generation"], data.get("op"))
    elif store.get_member(disk) is None:
        store.add_member(data["domain"], disk, data["group"], data["generation"], data["orig"], data["allocated"])


def _drop_replaced_overlay(data: dict[str, Any]) -> None:
    """After a regroup's switch, the member's previous overlay (linked aside) is not needed any more
    (a patch keeps it)."""
    if "previous_generation" in data and not data.get("keep") and not same_inode(data["disk"], data["orig"]):
        remove_quietly(data["orig"])


def _overlay_in_place(data: dict[str, Any]) -> bool:
    """True when the disk path already holds this switch's overlay (the rename happened)."""
    disk, orig = data["disk"], data["orig"]
    if not os.path.exists(orig) or not os.path.exists(disk) or same_inode(disk, orig):
        return False
    backing = qemu_img.info(disk, "qcow2", force_share=True).full_backing_filename
    if backing != data["base"]:
        raise OperationError(
            f"{disk} is neither its original nor the overlay this switch put there (it is backed by {backing})",
            target=disk, hint=f"nothing was changed; compare it with {orig} and put the right one in place by hand")
    return True


@step_type("switch")
def SWITCH(store, record: StepRecord) -> bool:
    data = record.data
    if record.state == "done":
        _drop_replaced_overlay(data)
        return True
    if _overlay_in_place(data):
        log.info("switch of %s had renamed the verified overlay into place: completing it", data["disk"])
        _record_member(store, data)
        _drop_replaced_overlay(data)
        return True
    if os.path.exists(data["orig"]) and same_inode(data["disk"], data["orig"]):
        remove_quietly(data["orig"])  # the original never left the disk path: drop its second name
        fsync_dir(os.path.dirname(data["orig"]))
    remove_quietly(data["new"])
    return False


def switch_member(op: Operation, lv: Libvirt, t: Target, spec: MemberSpec, new: str, group: str, generation,
                  previous=None, keep_previous: bool = False) -> str | None:
    """Put overlay ``new`` (on ``generation``) in place of ``t``'s disk.  ``previous`` is the member
    record when ``t`` already is a member (a regroup, a patch); with ``keep_previous`` its replaced
    overlay is kept and recorded.  Returns why the member was left as it was, or None when it was
    switched."""
    from .. import domains as dommod

    dom = lv.domain(t.name)
    blockers = [b for b in dommod.offline_blockers(lv.conn, dom, [t.disk_path]) if b.code not in FIXABLE]
    reason = "; ".join(b.message for b in blockers)
    if not reason and file_identity(t.disk_path) != spec.identity:
        reason = f"{t.disk_path} changed since it was read"
    if not reason and not op.begin_switch(t.disk_path):
        reason = STARTED_MEANWHILE
    if reason:
        remove_quietly(new)
        return reason
    orig = t.disk_path + (PREV_SUFFIX if previous else ORIG_SUFFIX)
    if previous and keep_previous:
        orig = f"{t.disk_path}{KEEP_SUFFIX}{op.id}"
    data = {"disk": t.disk_path, "new": new, "orig": orig, "domain": t.name, "group": group,
            "generation": generation.id, "base": generation.path, "allocated": spec.allocated}
    if previous:
        data.update(previous_generation=previous.generation_id, original=previous.original_path)
        if keep_previous:
            data.update(keep=True, op=op.id)
    with op.step(SWITCH, data):
        # An explicit empty <backingStore/> would hide the base from the guest: drop it first
        # (harmless for the original, which has no backing file either).
        if any(c == "empty-backingstore" for c, _ in t.blockers):
            for d in dommod.os_disks(dom):
                if d.source == t.disk_path and d.empty_backing_store:
                    dommod.remove_empty_backing_store(lv.conn, dom, d.target_dev)
        copy_ownership(t.disk_path, new)
        remove_quietly(orig)
        durable_link(t.disk_path, orig)
        crashpoint("switch:linked")
        durable_rename(new, t.disk_path)
        crashpoint("switch:renamed")
        _record_member(op.store, data)
    _drop_replaced_overlay(data)
    op.release(t.disk_path)
    return None
