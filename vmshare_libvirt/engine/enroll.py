"""Enroll one domain: its disk becomes an overlay on its group's current base.

What happens depends on what the domain is (issue 4):

- already a member                          -> ``already``
- not offline (running, paused, locked...)  -> a job waits for it to stop: ``queued``
- matches a group (OS identity and layout) and holds every entry of the base
                                            -> rebuilt on the base, verified, switched: ``enrolled``
- matches a group but lacks base entries    -> a base may only hold what every member has
                                               (DESIGN.md 3.4): queued for the group's resync
- matches another standalone domain remembered in the inventory, which is offline
                                            -> the two are consolidated into a new group
- matches nothing                           -> its inventory is remembered: ``remembered``
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable

from .. import qemu_img
from ..config import Config
from ..errors import BlockedError, VmshareError
from ..plan import GroupPlan, Target, layout_problem, member_delta
from ..survey import Survey
from . import basemanifest
from . import overlay
from .consolidate import FIXABLE, NEW_SUFFIX, Consolidation, MemberSpec
from .files import file_identity
from .members import verify_bases

log = logging.getLogger(__name__)

# Blockers that only mean "not now": the domain is enrolled after it stops.
WAIT_CODES = ("running", "paused", "pmsuspended", "shutting-down", "crashed", "qemu-lock", "unknown-state")


@dataclass
class EnrollOutcome:
    domain: str
    state: str  # enrolled | queued | consolidated | remembered | already | skipped
    group: str | None = None
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _os_json(t: Target) -> dict:
    o = t.inspection.os
    return {"type": o.type, "distro": o.distro, "major": o.major, "minor": o.minor, "arch": o.arch,
            "product_name": o.product_name}


def _same_os(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("type", "distro", "major", "arch"))


def _queue_once(store, kind: str, domain: str, params: dict, wait_for: str | None) -> None:
    for job in store.jobs(state="queued", domain=domain):
        if job.kind == kind:
            return
    store.enqueue(kind, domain, params, wait_for=wait_for)


def enroll(cfg: Config, conn, store, domain: str, group: str | None = None,
           progress: Callable[[str], None] | None = None) -> EnrollOutcome:
    """Enroll ``domain`` (see the module doc).  Takes the store lock itself."""
    from .recover import recover

    progress = progress or (lambda _t: None)
    with store.lock(wait=False, kind="enroll"):
        recover(store, conn)
        return _enroll_locked(cfg, conn, store, domain, group, progress)


def _enroll_locked(cfg, conn, store, domain, group, progress) -> EnrollOutcome:
    from ..targets import resolve

    if store.members(domain=domain):
        m = store.members(domain=domain)[0]
        return EnrollOutcome(domain, "already", m.group_name, "already a member")
    resolved = resolve([domain], lambda: conn)
    t = resolved.targets[0]
    fmt = resolved.formats[domain]
    waiting = [m for c, m in t.blockers if c in WAIT_CODES]
    hard = [m for c, m in t.blockers if c not in WAIT_CODES and c not in FIXABLE]
    if hard:
        return EnrollOutcome(domain, "skipped", group, "; ".join(hard))
    if waiting:
        _queue_once(store, "enroll", domain, {"group": group}, "domain-stopped")
        return EnrollOutcome(domain, "queued", group, "; ".join(waiting) + "; enrollment waits until it stops")

    survey = Survey(cfg.appliance, progress)
    try:
        survey.open([t], {domain: fmt})
        survey.inspect([t])
        if t.inspection is None or t.inspection.os is None or [c for c, _ in t.blockers if c not in FIXABLE]:
            survey.close()
            reason = "; ".join(m for _, m in t.blockers) or "no operating system found"
            return EnrollOutcome(domain, "skipped", group, reason)
        os_info = _os_json(t)
        match = _find_group(store, t, os_info, group)
        if match is None:
            survey.close()
            if group:
                return EnrollOutcome(domain, "skipped", group, f"group {group} does not match this domain's OS or layout")
            return _pair_or_remember(cfg, conn, store, t, os_info, progress)
        gname, gen, common, base_layout, uuids = match
        survey.scan(t)
        missing = 0
        for part, fc in common.items():
            man = t.manifests.get(part)
            if man is None:
                missing += len(fc.paths)
                continue
            base_files = [fc.base_entries[p] for p in fc.paths]
            needed = {e.path for e in base_files if e.kind == "f"
                      and (o := man.entries.get(e.path)) is not None and o.kind == "f" and o.size == e.size}
            survey.reader(t, part).digest(man, needed)
            for p, be in fc.base_entries.items():
                o = man.entries.get(p)
                if o is None or o.content_key() != be.content_key():
                    missing += 1
        survey.close()
    except BaseException:
        survey.abort()
        raise
    if missing:
        return _regroup_or_queue(cfg, conn, store, domain, gname, missing, progress)
    gp = GroupPlan([t], t.inspection.os, common, {t.name: member_delta(t.manifests, common)}, t.name)
    minimum = cfg.auto_enroll.min_saving_bytes
    if minimum:
        saving = t.allocated_bytes - gp.predicted_overlay_bytes(t)
        if saving < minimum:
            return EnrollOutcome(domain, "skipped", gname,
                                 f"predicted saving {saving} bytes is below auto_enroll.min_saving_bytes ({minimum})")
    verify_bases(store, gname)
    return _build_and_switch(cfg, conn, store, t, fmt, gname, gen, gp, base_layout, uuids, progress)


def _regroup_or_queue(cfg, conn, store, domain: str, gname: str, missing: int, progress) -> EnrollOutcome:
    """A base may only hold what every member has: build a new generation for the whole group
    now if every member is offline, else wait for the first running member to stop."""
    from .. import domains as dommod
    from ..libvirt_conn import lookup

    busy_member = None
    for m in store.members(group_name=gname):
        blockers = dommod.offline_blockers(conn, lookup(conn, m.domain), [m.disk_path])
        if [b for b in blockers if b.code not in FIXABLE + ("has-backing",)]:
            busy_member = m.domain
            break
    if busy_member is not None:
        _queue_once(store, "enroll", busy_member, {"group": gname, "enroll": domain}, "domain-stopped")
        return EnrollOutcome(domain, "queued", gname,
                             f"lacks {missing} entries of the group's base; a new generation is built for the "
                             f"group once {busy_member} (running) stops")
    progress(f"{domain} lacks {missing} entries of the base of {gname}: building a new generation for the group")
    outcome = Consolidation(cfg, conn, store, progress).run([domain], gname, False, regroup=True)
    if domain not in outcome.switched:
        reason = "; ".join(f"{d}: {r}" for d, r in outcome.skipped) or "not switched"
        return EnrollOutcome(domain, "skipped", gname, reason)
    return EnrollOutcome(domain, "enrolled", gname, f"new base generation {outcome.generation_id} built for the group")


def _find_group(store, t: Target, os_info: dict, wanted: str | None):
    for grp in store.groups():
        if wanted and grp.name != wanted:
            continue
        if not _same_os(grp.os, os_info):
            continue
        gens = [g for g in store.generations(group_name=grp.name, state="published")]
        if not gens:
            continue
        gen = max(gens, key=lambda g: g.id)
        path = basemanifest.manifest_path(gen.path)
        if not os.path.exists(path):
            continue
        common, base_layout, uuids = basemanifest.load(path)
        if layout_problem(t.inspection.layout, base_layout) is None:
            return grp.name, gen, common, base_layout, uuids
    return None


def _pair_or_remember(cfg, conn, store, t: Target, os_info: dict, progress) -> EnrollOutcome:
    from ..plan import layout_key

    layout = asdict(t.inspection.layout)
    key = repr(layout_key(t.inspection.layout))
    for inv in store.inventory():
        if inv.domain == t.name or store.members(domain=inv.domain):
            continue
        if _same_os(inv.os, os_info) and inv.summary.get("layout_key") == key:
            try:
                outcome = Consolidation(cfg, conn, store, progress).run([inv.domain, t.name], None, False)
            except VmshareError as exc:
                log.info("could not consolidate %s with %s: %s", t.name, inv.domain, exc)
                continue
            if t.name in outcome.switched:
                store.forget_inventory(inv.domain)
                store.forget_inventory(t.name)
                return EnrollOutcome(t.name, "consolidated", outcome.group, f"new group with {inv.domain}")
    store.remember_inventory(t.name, t.disk_path, os_info, layout, {"layout_key": key})
    return EnrollOutcome(t.name, "remembered", None, "no group or other domain matches yet")


def _build_and_switch(cfg, conn, store, t: Target, fmt: str, gname: str, gen, gp: GroupPlan, base_layout, uuids,
                      progress) -> EnrollOutcome:
    from .recover import rollback_operation

    c = Consolidation(cfg, conn, store, progress)
    c.op_id = store.begin_operation("enroll", {"domains": [t.name], "disks": [t.disk_path], "group": gname})
    store.mark_busy(t.name, t.disk_path, c.op_id, "building")
    try:
        spec = MemberSpec(t.name, t.disk_path, fmt, file_identity(t.disk_path), t.allocated_bytes)
        vsize = qemu_img.info(t.disk_path, fmt, force_share=True).virtual_size
        new = t.disk_path + NEW_SUFFIX
        seq = c._intent("create-overlay", {"path": new, "disk": t.disk_path})
        qemu_img.create(new, "qcow2", vsize, backing=gen.path, backing_fmt="qcow2", cluster_size=overlay.CLUSTER_SIZE)
        c._done(seq, "create-overlay")
        _check_cancel(store, c.op_id, t.name)
        seq = c._intent("build-overlays", {"paths": [new]})
        overlay.build_all(cfg.appliance, progress, str(cfg.store_dir), gp, {t.name: fmt}, {t.name: new},
                          base_layout, uuids)
        overlay.finish(new, gen.path)
        c._done(seq, "build-overlays")
        _check_cancel(store, c.op_id, t.name)
        reason = c._switch(t, spec, new, gname, gen.id)
        if reason:
            raise BlockedError(reason, target=t.name)
        store.finish_operation(c.op_id, "done")
        store.clear_busy(c.op_id)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            raise
        rollback_operation(store, c.op_id, conn, reason=str(exc))
        if isinstance(exc, BlockedError) and "started" in exc.message:
            _queue_once(store, "enroll", t.name, {"group": gname}, "domain-stopped")
            return EnrollOutcome(t.name, "queued", gname, "the domain was started; enrollment waits until it stops")
        raise
    return EnrollOutcome(t.name, "enrolled", gname, f"overlay on base generation {gen.id}")


def _check_cancel(store, op_id: int, domain: str) -> None:
    if store.cancel_requested(op_id):
        raise BlockedError("the domain was started meanwhile; enrollment cancelled", target=domain)
