"""vmshare rollback: put the kept original disks back."""

from __future__ import annotations

from ._common import connector, open_store_for_writing, recover_first


def register(sub) -> None:
    p = sub.add_parser("rollback", help="restore the kept original disk of a member (or of a whole group)")
    p.add_argument("domain", nargs="?", metavar="DOMAIN")
    p.add_argument("--group", metavar="NAME")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from ..engine.members import rollback, select_members
    from ..errors import TargetError

    if bool(args.domain) == bool(args.group):
        raise TargetError("name one domain or --group NAME", target="rollback")
    cfg = ctx.load_config()
    conn = connector(ctx, cfg)()
    store = open_store_for_writing(ctx, cfg)
    try:
        with store.lock(wait=False, kind="rollback"):
            recover_first(ctx, store, conn)
            done = rollback(store, conn, select_members(store, args.domain, args.group), ctx.progress)
    finally:
        store.close()
    for d in done:
        ctx.stdout.write(f"{d}: original disk restored\n")
    return 0
