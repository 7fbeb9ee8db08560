"""vmshare commit: delete the kept originals of consolidated members."""

from __future__ import annotations

from ._common import connector, open_store_for_writing, recover_first


def register(sub) -> None:
    p = sub.add_parser("commit", help="delete the kept original disks (after this, rollback is impossible)")
    p.add_argument("domain", nargs="?", metavar="DOMAIN")
    p.add_argument("--group", metavar="NAME")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from ..engine.members import commit, select_members
    from ..errors import TargetError

    if bool(args.domain) == bool(args.group):
        raise TargetError("name one domain or --group NAME", target="commit")
    cfg = ctx.load_config()
    conn = connector(ctx, cfg)()
    store = open_store_for_writing(ctx, cfg)
    try:
        with store.lock(wait=False, kind="commit"):
            recover_first(ctx, store, conn)
            done = commit(store, select_members(store, args.domain, args.group))
    finally:
        store.close()
    for d in done:
        ctx.stdout.write(f"{d}: original deleted; the overlay is now the only copy\n")
    return 0
