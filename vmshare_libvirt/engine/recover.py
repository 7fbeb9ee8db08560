"""Finish or undo interrupted operations from the journal (DESIGN.md 3.6).

Recovery undoes every step of an unfinished operation in reverse order,
except member switches that completed: those members are fully consolidated
(their overlay was verified before the switch), so they stay, and so does the
base they use.  A switch that was under way is rolled back: the original,
still linked at ``<disk>.vmshare-orig``, is renamed back over the disk path.
"""

from __future__ import annotations

import logging
import os

from ..store.base import _pid_alive
from .basemanifest import manifest_path
from .overlay import COMPACT_SUFFIX
from .files import durable_rename, fsync_dir, remove_quietly, same_inode

log = logging.getLogger(__name__)


def _undo_switch(store, data: dict) -> None:
    disk, orig, new = data["disk"], data["orig"], data["new"]
    if os.path.exists(orig):
        if same_inode(disk, orig):
            remove_quietly(orig)  # the rename never happened: the original is still in place
            fsync_dir(os.path.dirname(orig))
        else:
            durable_rename(orig, disk)  # put the original back over the half-switched overlay
    if "previous_generation" in data:
        # a regroup: the member stays, on its previous overlay and generation
        if store.get_member(disk) is not None:
            store.move_member(disk, data["previous_generation"], data.get("original"))
    elif store.get_member(disk) is not None:
        store.remove_member(disk)
    remove_quietly(new)


def _undo_publish(store, data: dict, op_id: int) -> None:
    gen_id = data["generation"]
    remove_quietly(data["tmp"])
    remove_quietly(data.get("build", ""))
    if store.members(generation_id=gen_id):
        return  # members switched onto it: the base stays
    remove_quietly(data["path"])
    remove_quietly(manifest_path(data["path"]))
    if store.get_generation(gen_id) is not None:
        store.remove_generation(gen_id)


def rollback_operation(store, op_id: int, conn=None, reason: str = "") -> str:
    """Undo what an operation left unfinished; returns the final state recorded."""
    steps = store.operation_steps(op_id)
    kept_switches = 0
    for step in reversed(steps):
        if step.state == "undone":
            continue
        data = step.data
        if step.name == "switch":
            if step.state == "done":
                kept_switches += 1
                if "previous_generation" in data and not same_inode(data["disk"], data["orig"]):
                    remove_quietly(data["orig"])  # the regroup's replaced overlay
                continue
            _undo_switch(store, data)
        elif step.name == "publish-base":
            _undo_publish(store, data, op_id)
        elif step.name in ("create-base-file", "build-base"):
            # build-base's "done" record replaces its data with the group name: the build
            # file it worked on is then removed by the create-base-file step before it
            if data.get("path"):
                remove_quietly(data["path"])
        elif step.name == "create-overlay":
            remove_quietly(data["path"])
            remove_quietly(data["path"] + COMPACT_SUFFIX)
        elif step.name == "build-overlays":
            for p in data.get("paths", []):
                remove_quietly(p)
                remove_quietly(p + COMPACT_SUFFIX)
        store.step_undone(op_id, step.seq)
    # A group left with no member and no generation is removed.
    op = store.get_operation(op_id)
    group = (op.params or {}).get("group") if op else None
    for step in steps:
        if step.name == "build-base" and step.data.get("group"):
            group = step.data["group"]
    if group:
        for gen in store.generations(group_name=group, state="building"):
            remove_quietly(gen.path)
            store.remove_generation(gen.id)
    if group and store.get_group(group) is not None and not store.members(group_name=group) \
            and not store.generations(group_name=group):
        store.remove_group(group)
    store.clear_busy(op_id)
    state = "done" if kept_switches else "rolled_back"
    store.finish_operation(op_id, state)
    log.info("operation %s %s%s", op_id, state, f" ({reason})" if reason else "")
    return state


def recover(store, conn=None) -> list[tuple[int, str, str]]:
    """Roll back every unfinished operation of a dead process; returns (op id, kind, final state)."""
    done = []
    for op in store.unfinished_operations():
        if op.pid and op.pid != os.getpid() and _pid_alive(op.pid):
            continue  # still running in another process (which holds the lock)
        state = rollback_operation(store, op.id, conn, reason="recovered after an interruption")
        done.append((op.id, op.kind, state))
    return done
