"""vmshare recover: finish or undo an interrupted operation."""

from __future__ import annotations

from ._common import writing_session


def register(sub) -> None:
    p = sub.add_parser("recover", help="finish or undo an operation that was interrupted (crash, kill, power loss)",
                       description="Finish or undo every operation whose process is gone (killed, crashed, power "
                                   "loss), step by step from its journal: a switch that already put the verified "
                                   "overlay at the disk path is completed, everything before it is undone.  Every "
                                   "writing command does this first; 'recover' does only this.  Waits up to 30 s "
                                   "for a running operation.")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    with writing_session(ctx, kind="recover", wait_s=30, report=False) as s:
        done = s.recovered
    if not done:
        ctx.stdout.write("Nothing to recover.\n")
    for op_id, kind, state in done:
        ctx.stdout.write(f"operation {op_id} ({kind}): {state}\n")
    return 0
