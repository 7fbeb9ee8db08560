"""vmshare status: operations under way, groups, base generations, members and the space they use."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

from .. import fingerprint
from ..names import validate_group_name
from ..sizes import allocated, allocated_once
from ._common import connector, human_bytes

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("status", help="show groups, their bases and members, and the space saved",
                       description="Show any vmshare operation in progress, then each group with its base "
                                   "generations (path, state, size, members) and its members (domain state, "
                                   "backing chain, private and shared bytes, size before, generation, state), "
                                   "and the space used on the host now (bases, overlays, kept originals and "
                                   "kept overlays) against the size before; kept originals count until "
                                   "'vmshare commit', which frees them.  Reads the store only; without libvirt "
                                   "a domain's state is 'unknown'.")
    p.add_argument("group", nargs="?", metavar="GROUP", help="show only this group")
    p.add_argument("--history", action="store_true",
                   help="also each member's drift over time: entries and bytes of its own at every "
                        "'vmshare drift' and 'vmshare resync' that read it")
    p.add_argument("--reclaim", action="store_true",
                   help="also estimate, per group, what 'vmshare resync' would reclaim now: the 4 KiB blocks "
                        "every member's overlay holds with the same content (hashed on the host, no appliance; "
                        "'vmshare resync GROUP --dry-run' gives the exact figure)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (root's, seen by an unprivileged reader)
    return True


def operations(store) -> list[dict]:
    """Operations the journal records as unfinished: under way, or left by a process that died."""
    busy = store.busy_disks()
    out = []
    for op in store.unfinished_operations():
        out.append({"id": op.id, "kind": op.kind, "started_at": op.started_at, "pid": op.pid,
                    "state": "in progress" if _pid_alive(op.pid) else "interrupted",
                    "group": op.params.get("group"), "domains": list(op.params.get("domains") or []),
                    "disks": [{"domain": b.domain, "disk": b.disk_path, "stage": b.stage}
                              for b in busy if b.op_id == op.id]})
    return out


def _chain(disk: str, base: str | None, generation_of: dict[str, int]) -> tuple[list[dict], str]:
    """(the overlay's backing chain, top first, each file with its size and generation; where it was read:
    "image" from the qcow2 files, "store" from the member's record when the files cannot be read)."""
    from .. import qemu_img
    from ..errors import VmshareError

    try:
        paths = [i.filename for i in qemu_img.chain(disk, "qcow2", force_share=True)]
        source = "image"
    except VmshareError as exc:
        log.debug("%s: backing chain not read: %s", disk, exc)
        paths, source = [disk] + ([base] if base else []), "store"
    return [{"path": p, "allocated_bytes": allocated(p), "generation": generation_of.get(p)} for p in paths], source


def collect(store, group: str | None, conn=None) -> dict:
    """The status as JSON data.  ``conn`` (libvirt) gives the domains' states; None: "unknown"."""
    from ..engine.members import plan_commit

    generation_of = {g.path: g.id for g in store.generations()}
    groups = []
    for grp in store.groups():
        if group and grp.name != group:
            continue
        gens = store.generations(group_name=grp.name)
        members = store.members(group_name=grp.name)
        paths = {g.id: g.path for g in gens}
        users = Counter(m.generation_id for m in members)
        commit = {i.disk_path: i for i in plan_commit(store, conn, members)}
        kept_of = {m.disk_path: _kept(store, m.disk_path) for m in members}
        below = {g.id: _stored_on(g.path, generation_of) for g in gens}
        gen_json = [{"id": g.id, "path": g.path, "state": g.state, "allocated_bytes": allocated(g.path),
                     "fingerprint": g.full_digest,
                     "members": [m.domain for m in members if m.generation_id == g.id],
                     "kept_overlays_of": [m.domain for m in members
                                          if any(k.generation_id == g.id for k in kept_of[m.disk_path])],
                     "stored_on": below[g.id],
                     "base_of": sorted(i for i, b in below.items() if b == g.id)}
                    for g in gens]
        mem_json = []
        locked = store.locked_drift(grp.name)
        for m in members:
            kept = kept_of[m.disk_path]
            chain, source = _chain(m.disk_path, paths.get(m.generation_id), generation_of)
            mem_json.append({
                "domain": m.domain, "disk": m.disk_path, "overlay_path": m.disk_path,
                "allocated_bytes": allocated(m.disk_path), "generation": m.generation_id,
                "original_path": m.original_path, "original_bytes": m.original_allocated_bytes or 0,
                "state": m.state, "domain_state": commit[m.disk_path].domain_state,
                "chain": chain, "chain_source": source,
                "private_bytes": chain[0]["allocated_bytes"],
                "shared_bytes": sum(c["allocated_bytes"] for c in chain[1:]),
                "shared_with": users[m.generation_id] - 1,
                "kept_original_bytes": allocated(m.original_path) if m.original_path else 0,
                "commit_frees_bytes": commit[m.disk_path].freed_bytes,
                "kept_overlays": [{"path": k.path, "generation": k.generation_id, "allocated_bytes": allocated(k.path)}
                                  for k in kept],
                "kept_generations": sorted({k.generation_id for k in kept}),
                "locked_drift": _locked_json(locked.get(m.disk_path))})
        bases = sum(g["allocated_bytes"] for g in gen_json)
        overlays = sum(m["allocated_bytes"] for m in mem_json)
        now = bases + overlays
        before = sum(m["original_bytes"] for m in mem_json)
        originals = [m.original_path for m in members if m.original_path]
        kept_overlays = [k["path"] for m in mem_json for k in m["kept_overlays"]]
        host = allocated_once([g.path for g in gens] + [m.disk_path for m in members] + originals + kept_overlays)
        frees = sum(m["commit_frees_bytes"] for m in mem_json)
        groups.append({"name": grp.name, "os": grp.os, "generations": gen_json, "members": mem_json,
                       "allocated_bytes": now, "original_bytes": before, "saved_bytes": before - now,
                       "base_bytes": bases, "overlay_bytes": overlays,
                       "kept_original_bytes": sum(allocated(p) for p in originals),
                       "kept_overlay_bytes": sum(allocated(p) for p in kept_overlays),
                       "host_bytes": host, "host_saved_bytes": before - host,
                       "commit_frees_bytes": frees, "after_commit_bytes": host - frees,
                       "patches": [{"name": p.name, "digest": p.digest, "at": p.at, "generation": p.generation_id,
                                    "results": {d: r["result"] for d, r in p.results.items()},
                                    "details": {d: r.get("detail", "") for d, r in p.results.items()}}
                                   for p in _patches(store, grp.name)]})
    jobs = [_job_json(j) for j in store.jobs(state="queued")]
    return {"operations": operations(store), "groups": groups, "jobs": jobs}


def _job_json(j) -> dict:
    """A queued job; ``target``: the domain it works on, ``waits_for``: the domain whose stop it waits for
    (they differ for an enroll that waits for a running member to stop to regroup the member's group)."""
    from ..store.queue import enroll_target

    target = enroll_target(j.domain, j.params) if j.kind == "enroll" else j.domain
    return {"id": j.id, "kind": j.kind, "domain": j.domain, "state": j.state, "params": j.params,
            "target": target, "waits_for": j.domain if j.wait_for == "domain-stopped" else None}


def _patches(store, group: str) -> list:
    from ..errors import StoreError

    try:
        return store.patches(group)
    except StoreError:
        return []  # a store of schema 1 (no patch history yet) opened read-only


def _kept(store, disk: str) -> list:
    from ..errors import StoreError

    try:
        return store.kept_overlays(disk_path=disk)
    except StoreError:
        return []


def _connect(ctx, cfg):
    """A libvirt connection for the domains' states, or None (status works without libvirt)."""
    from ..errors import VmshareError

    try:
        return connector(ctx, cfg)()
    except VmshareError as exc:
        log.info("domain states unknown: %s", exc)
        return None


def run(args, ctx) -> int:
    from ..errors import TargetError
    from ..store import open_store

    if args.group is not None:
        validate_group_name(args.group, what="GROUP")
    cfg = ctx.load_config()
    if not (cfg.store_dir / "state.db").exists():
        data = {"operations": [], "groups": [], "jobs": []}
    else:
        store = open_store(cfg.store_dir, create=False, readonly=True)
        conn = None
        try:
            if store.members():
                conn = _connect(ctx, cfg)
            data = collect(store, args.group, conn)
            if args.reclaim:
                add_reclaim_estimates(data, ctx.progress)
            if args.history:
                for g in data["groups"]:
                    g["drift_history"] = {m["domain"]: [
                        {"at": d.at, "source": d.source, "generation": d.generation_id, "entries": d.entries,
                         "bytes": d.bytes} for d in store.drift_samples(g["name"], m["domain"])]
                        for m in g["members"]}
        finally:
            store.close()
            if conn is not None:
                _close(conn)
    if args.group and not data["groups"]:
        raise TargetError("no such group", target=args.group, hint="see 'vmshare status'")
    if args.json:
        ctx.emit_json(data)
        return 0
    write_text(data, ctx.stdout)
    return 0


def _locked_json(row) -> dict | None:
    """What the last check of a member's locked paths found (None: no change found, or never checked)."""
    if row is None:
        return None
    entries, first, policy, at = row
    return {"entries": entries, "first": first, "policy": policy, "at": at}


def add_reclaim_estimates(data: dict, progress) -> None:
    """Each group's ``reclaim_estimate`` (see :mod:`..engine.reclaim`), from the member disks ``collect`` listed."""
    from ..engine.reclaim import estimate

    for g in data["groups"]:
        progress(f"hashing the overlays of group {g['name']}")
        est = estimate([m["disk"] for m in g["members"]])
        g["reclaim_estimate"] = {"bytes": est.bytes, "blocks": est.blocks, "overlay_bytes": est.overlay_bytes,
                                 "members_read": est.members, "members_unread": est.unread}


def _close(conn) -> None:
    try:
        conn.close()
    except Exception as exc:  # noqa: BLE001 - closing never fails a report
        log.debug("closing the libvirt connection failed: %s", exc)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def write_text(data: dict, out) -> None:
    """The status's JSON data as text for people."""
    for op in data.get("operations", []):
        what = f"operation {op['id']} ({op['kind']})"
        if op["state"] == "in progress":
            out.write(f"{what} in progress since {_when(op['started_at'])}, pid {op['pid']}")
        else:
            out.write(f"{what} interrupted: started {_when(op['started_at'])} by pid {op['pid']}, which is gone;"
                      " the next vmshare command that changes the store undoes or finishes it"
                      " ('vmshare recover' does it now)")
        if op["domains"]:
            out.write(f": {', '.join(op['domains'])}" + (f" (group {op['group']})" if op["group"] else ""))
        out.write("\n")
        for d in op["disks"]:
            out.write(f"  {d['domain']}: {d['stage']} {d['disk']}\n")
    if not data["groups"]:
        if data.get("operations"):
            out.write("No groups yet.\n")
        else:
            out.write("No groups yet. Try 'vmshare plan --all', then 'vmshare consolidate DOMAIN...'.\n")
    for g in data["groups"]:
        _write_group(g, out)
        _write_history(g, out)
    for j in data["jobs"]:
        out.write(_job_line(j) + "\n")


def _job_line(j: dict) -> str:
    """``pending: WHAT of DOMAIN (job N), WHEN``: the domain the job works on and what it waits for."""
    if j["kind"] == "resync":
        return (f"pending: resync of group {j['params'].get('group')} (job {j['id']}), "
                f"when the watcher next runs the queue: {j['params'].get('why', '')}")
    what = f"patch {j['params'].get('name', '')}" if j["kind"] == "patch" else j["kind"]
    target = j.get("target") or j["domain"]
    waits_for = j.get("waits_for", j["domain"])
    group = j["params"].get("group")
    if j["kind"] == "enroll" and target != j["domain"]:
        # a regroup: the newcomer lacks base entries, so the whole group gets a new generation
        when = (f"a new base generation for group {group} is built once its member {waits_for} (running) stops"
                if waits_for else f"a new base generation for group {group} is built")
        return f"pending: enroll of {target} into group {group} (job {j['id']}), {when}"
    into = f" into group {group}" if j["kind"] == "enroll" and group else ""
    when = "when the domain stops" if waits_for else "when the watcher next runs the queue"
    return f"pending: {what} of {target}{into} (job {j['id']}), {when}"


def _write_history(g: dict, out) -> None:
    """Each member's drift samples, oldest first, with the change since the previous one."""
    for domain, samples in g.get("drift_history", {}).items():
        if not samples:
            out.write(f"  drift of {domain}: not measured yet ('vmshare drift {g['name']}')\n")
            continue
        out.write(f"  drift of {domain}:\n")
        previous = None
        for d in samples:
            change = "" if previous is None else f" ({d['bytes'] - previous:+,d} bytes)"
            out.write(f"    {_when(d['at'])}  gen {d['generation']}  {d['entries']:6d} entries  "
                      f"{human_bytes(d['bytes']):>10}{change}  [{d['source']}]\n")
            previous = d["bytes"]


def _shared(others: int) -> str:
    if others == 0:
        return ", no other member on it"
    return f", shared with {others} other member{'s' if others != 1 else ''}"


def _stored_on(path: str, generation_of: dict[str, int]) -> int | None:
    """The generation whose changes the base at ``path`` holds (its qcow2 backing file), or None."""
    try:
        below = fingerprint.backing_file(path)
    except (OSError, ValueError):
        return None
    return generation_of.get(below) if below else None


def _write_group(g: dict, out) -> None:
    hb = human_bytes
    kept = g["kept_original_bytes"] + g["kept_overlay_bytes"]
    out.write(f"Group {g['name']}: {hb(g['original_bytes'])} before, {hb(g['host_bytes'])} on the host now")
    if kept:
        out.write(f" (of which {hb(kept)} kept)\n")
    else:
        out.write(f", saved {hb(g['host_saved_bytes'])}\n")
    out.write(f"  now: bases {hb(g['base_bytes'])}, overlays {hb(g['overlay_bytes'])}, kept originals "
              f"{hb(g['kept_original_bytes'])}, kept overlays {hb(g['kept_overlay_bytes'])}\n")
    if g["commit_frees_bytes"]:
        out.write(f"  'vmshare commit' would free {hb(g['commit_frees_bytes'])}: then "
                  f"{hb(g['after_commit_bytes'])}, saved {hb(g['original_bytes'] - g['after_commit_bytes'])}\n")
    for gen in g["generations"]:
        kept = f" (kept overlays of {', '.join(gen['kept_overlays_of'])})" if gen.get("kept_overlays_of") else ""
        if gen.get("stored_on") is not None:
            kept += f"; its changes to gen {gen['stored_on']}"
        if gen.get("base_of"):
            kept += f"; gen {', '.join(str(i) for i in gen['base_of'])} stored on it"
        out.write(f"  base gen {gen['id']} [{gen['state']}]: {gen['path']} {hb(gen['allocated_bytes'])}"
                  f" used by {', '.join(gen['members']) or 'nobody'}{kept}\n")
    for m in g["members"]:
        out.write(f"  member {m['domain']} [{m['domain_state']}]: gen {m['generation']}, {m['state']},"
                  f" was {hb(m['original_bytes'])}\n")
        top, *below = m["chain"]
        out.write(f"    {top['path']}\n      overlay, private {hb(m['private_bytes'])}\n")
        for c in below:
            gen = f"base gen {c['generation']}" if c["generation"] is not None else "backing file"
            share = _shared(m["shared_with"]) if c["generation"] == m["generation"] else ""
            out.write(f"    -> {c['path']}\n      {gen}{share}, {hb(c['allocated_bytes'])}\n")
        if m["original_path"]:
            frees = "" if m["commit_frees_bytes"] == m["kept_original_bytes"] else \
                f", commit frees {hb(m['commit_frees_bytes'])} (other links keep the rest)"
            out.write(f"    kept original {m['original_path']}\n      {hb(m['kept_original_bytes'])} until "
                      f"'vmshare commit'{frees}\n")
        for k in m["kept_overlays"]:
            out.write(f"    kept overlay {k['path']}\n      {hb(k['allocated_bytes'])}, on gen {k['generation']}"
                      f" ('vmshare rollback {m['domain']} --generation {k['generation']}')\n")
        if m.get("locked_drift"):
            d = m["locked_drift"]
            verdict = "refuses its start" if d["policy"] == "refuse" else "logs its start"
            out.write(f"    locked paths: {d['entries']} changed (first {d['first']}), checked {_when(d['at'])};"
                      f" the hook {verdict} (lockdown.on_drift: {d['policy']})\n")
    if "reclaim_estimate" in g:
        r = g["reclaim_estimate"]
        unread = f", {r['members_unread']} overlay(s) unreadable" if r["members_unread"] else ""
        out.write(f"  a resync would reclaim about {hb(r['bytes'])}: {r['blocks']} block contents held by every"
                  f" member's overlay ({r['members_read']} overlays, {hb(r['overlay_bytes'])} of data{unread};"
                  f" 'vmshare resync {g['name']} --dry-run' gives the exact figure)\n")
    for p in g["patches"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["at"]))
        made = f", built gen {p['generation']}" if p["generation"] else ""
        results = ", ".join(f"{d} {r}" for d, r in p["results"].items())
        out.write(f"  patch {p['name']} ({p['digest'][:12]}) {when}{made}: {results}\n")
