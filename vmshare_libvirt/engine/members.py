"""Rollback and commit of consolidated members, and garbage collection of unused bases."""

from __future__ import annotations

import logging
import os

from .. import fingerprint
from ..errors import BlockedError, TargetError
from .basemanifest import manifest_path
from .files import durable_rename, remove_quietly

log = logging.getLogger(__name__)


def select_members(store, domain: str | None, group: str | None):
    if group:
        found = store.members(group_name=group)
        if not found:
            raise TargetError("no such group, or it has no members", target=group, hint="see 'vmshare status'")
        return found
    found = store.members(domain=domain)
    if not found:
        raise TargetError("not a member of any group", target=domain, hint="see 'vmshare status'")
    return found


def rollback(store, conn, members, progress=lambda _t: None) -> list[str]:
    """Put each member's kept original back over its disk path (guest content as before consolidation)."""
    from .. import domains as dommod
    from ..libvirt_conn import lookup

    for m in members:
        if not m.original_path or not os.path.exists(m.original_path):
            raise BlockedError("its original disk is no longer kept (committed)", target=m.domain,
                               hint="nothing was changed; a committed member cannot be rolled back")
        dom = lookup(conn, m.domain)
        blockers = [b for b in dommod.offline_blockers(conn, dom, [m.disk_path])
                    if b.code not in ("empty-backingstore",)]
        # the overlay's backing file is a base: that is expected here
        if blockers:
            raise BlockedError("; ".join(b.message for b in blockers), target=m.domain,
                               hint="shut the domain down and run again; nothing was changed")
    done = []
    for m in members:
        progress(f"restoring the original disk of {m.domain}")
        durable_rename(m.original_path, m.disk_path)
        store.remove_member(m.disk_path)
        done.append(m.domain)
    collect_unused_bases(store, conn)
    return done


def commit(store, members) -> list[str]:
    done = []
    for m in members:
        if m.original_path:
            remove_quietly(m.original_path)
        store.commit_member(m.disk_path)
        done.append(m.domain)
    return done


def base_in_use(conn, path: str) -> list[str]:
    """Domains whose disk chains use ``path`` (scanning real qcow2 chains, not only the store)."""
    from .. import domains as dommod

    return dommod.domains_using_path(conn, path, follow_chains=True)


def collect_unused_bases(store, conn) -> list[str]:
    """Delete base generations that no member and no domain's qcow2 chain uses."""
    removed = []
    for gen in store.generations():
        if store.members(generation_id=gen.id):
            continue
        if os.path.exists(gen.path) and base_in_use(conn, gen.path):
            continue
        if os.path.exists(gen.path):
            os.chmod(gen.path, 0o644)
            remove_quietly(gen.path)
        remove_quietly(manifest_path(gen.path))
        store.remove_generation(gen.id)
        removed.append(gen.path)
    for grp in store.groups():
        if not store.members(group_name=grp.name) and not store.generations(group_name=grp.name):
            store.remove_group(grp.name)
    return removed


def verify_bases(store, group: str | None = None) -> None:
    """Every published base of the group must match its recorded fingerprint (DESIGN.md 3.2)."""
    from ..errors import VerificationError

    for gen in store.generations(group_name=group, state="published"):
        problem = fingerprint.verify_quick(gen.path, gen.fingerprint)
        if problem is None and gen.full_digest and fingerprint.full(gen.path) != gen.full_digest:
            problem = "base fingerprint mismatch: content changed"
        if problem:
            raise VerificationError(problem, target=gen.path,
                                    hint="the base was modified outside vmshare; its members may be damaged")
