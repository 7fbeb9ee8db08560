"""vmshare recover: finish or undo an interrupted operation."""

from __future__ import annotations

from ._common import connector, open_store_for_writing


def register(sub) -> None:
    p = sub.add_parser("recover", help="finish or undo an operation that was interrupted (crash, kill, power loss)")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from ..engine.recover import recover

    cfg = ctx.load_config()
    conn = connector(ctx, cfg)()
    store = open_store_for_writing(ctx, cfg)
    try:
        with store.lock(wait=True, timeout=30, kind="recover"):
            done = recover(store, conn)
    finally:
        store.close()
    if not done:
        ctx.stdout.write("Nothing to recover.\n")
    for op_id, kind, state in done:
        ctx.stdout.write(f"operation {op_id} ({kind}): {state}\n")
    return 0
