"""vmshare status: groups, base generations, members and the space they save."""

from __future__ import annotations

import os
import time

from ..names import validate_group_name
from ._common import human_bytes


def register(sub) -> None:
    p = sub.add_parser("status", help="show groups, their bases and members, and the space saved",
                       description="Show each group with its base generations (path, state, size, members) and "
                                   "its members (disk, size before and now, generation, state), and the space "
                                   "saved; kept originals count until 'vmshare commit'.  Reads the store only.")
    p.add_argument("group", nargs="?", metavar="GROUP", help="show only this group")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def collect(store, group: str | None) -> dict:
    groups = []
    for grp in store.groups():
        if group and grp.name != group:
            continue
        gens = store.generations(group_name=grp.name)
        members = store.members(group_name=grp.name)
        gen_json = [{"id": g.id, "path": g.path, "state": g.state, "allocated_bytes": allocated(g.path),
                     "fingerprint": g.full_digest,
                     "members": [m.domain for m in members if m.generation_id == g.id]} for g in gens]
        mem_json = [{"domain": m.domain, "disk": m.disk_path, "overlay_path": m.disk_path,
                     "allocated_bytes": allocated(m.disk_path), "generation": m.generation_id,
                     "original_path": m.original_path, "original_bytes": m.original_allocated_bytes or 0,
                     "state": m.state,
                     "kept_generations": sorted({k.generation_id for k in _kept(store, m.disk_path)})}
                    for m in members]
        now = sum(g["allocated_bytes"] for g in gen_json) + sum(m["allocated_bytes"] for m in mem_json)
        before = sum(m["original_bytes"] for m in mem_json)
        groups.append({"name": grp.name, "os": grp.os, "generations": gen_json, "members": mem_json,
                       "allocated_bytes": now, "original_bytes": before, "saved_bytes": before - now,
                       "kept_original_bytes": sum(allocated(m.original_path) for m in members if m.original_path),
                       "patches": [{"name": p.name, "digest": p.digest, "at": p.at, "generation": p.generation_id,
                                    "results": {d: r["result"] for d, r in p.results.items()},
                                    "details": {d: r.get("detail", "") for d, r in p.results.items()}}
                                   for p in _patches(store, grp.name)]})
    jobs = [{"id": j.id, "kind": j.kind, "domain": j.domain, "state": j.state, "params": j.params}
            for j in store.jobs(state="queued")]
    return {"groups": groups, "jobs": jobs}


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


def run(args, ctx) -> int:
    from ..errors import TargetError
    from ..store import open_store

    if args.group is not None:
        validate_group_name(args.group, what="GROUP")
    cfg = ctx.load_config()
    if not (cfg.store_dir / "state.db").exists():
        data = {"groups": [], "jobs": []}
    else:
        store = open_store(cfg.store_dir, create=False, readonly=True)
        try:
            data = collect(store, args.group)
        finally:
            store.close()
    if args.group and not data["groups"]:
        raise TargetError("no such group", target=args.group, hint="see 'vmshare status'")
    if args.json:
        ctx.emit_json(data)
        return 0
    out = ctx.stdout
    if not data["groups"]:
        out.write("No groups yet. Try 'vmshare plan --all', then 'vmshare consolidate DOMAIN...'.\n")
    for g in data["groups"]:
        out.write(f"Group {g['name']}: {human_bytes(g['allocated_bytes'])} now, {human_bytes(g['original_bytes'])} before,"
                  f" saved {human_bytes(g['saved_bytes'])}\n")
        if g["kept_original_bytes"]:
            out.write(f"  (kept originals use {human_bytes(g['kept_original_bytes'])} until 'vmshare commit')\n")
        for gen in g["generations"]:
            out.write(f"  base gen {gen['id']} [{gen['state']}]: {gen['path']} {human_bytes(gen['allocated_bytes'])}"
                      f" used by {', '.join(gen['members']) or 'nobody'}\n")
        for m in g["members"]:
            kept = f", can go back to gen {', '.join(map(str, m['kept_generations']))}" if m["kept_generations"] else ""
            out.write(f"  member {m['domain']}: {m['disk']} {human_bytes(m['allocated_bytes'])}"
                      f" (was {human_bytes(m['original_bytes'])}), gen {m['generation']}, {m['state']}{kept}\n")
        for p in g["patches"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["at"]))
            made = f", built gen {p['generation']}" if p["generation"] else ""
            results = ", ".join(f"{d} {r}" for d, r in p["results"].items())
            out.write(f"  patch {p['name']} ({p['digest'][:12]}) {when}{made}: {results}\n")
    for j in data["jobs"]:
        what = f"patch {j['params'].get('name', '')}" if j["kind"] == "patch" else j["kind"]
        out.write(f"pending: {what} of {j['domain']} (job {j['id']}), when the domain stops\n")
    return 0
