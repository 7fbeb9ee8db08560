"""``vmshare watch [--once]``: the event daemon (see :mod:`vmshare_libvirt.watch`)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("watch", help="follow libvirt events: enroll new domains, run work waiting for a stop",
                       description="Follow libvirt's domain events: consider newly defined domains for automatic "
                                   "enrollment (policy: auto_enroll in the configuration), run the jobs that wait "
                                   "for a domain to stop, drop undefined domains from their groups.  Reconnects "
                                   "when libvirtd restarts.  Logs to syslog when /dev/log exists, else stderr.")
    p.add_argument("--once", action="store_true",
                   help="reconcile with the current domains, run the due jobs, print what was done and exit")
    p.add_argument("--log", choices=("auto", "syslog", "stderr"), default="auto",
                   help="where log lines go (default: syslog when /dev/log exists, else stderr)")
    p.add_argument("--json", action="store_true", help="with --once: machine-readable output")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from ..watch import Watcher, remove_logging, setup_logging

    cfg = ctx.load_config()
    handler = setup_logging(args.log, debug=ctx.debug)
    try:
        watcher = Watcher(cfg, ctx.uri(cfg))
        rc = watcher.run(once=args.once)
    finally:
        remove_logging(handler)
    if args.once:
        if args.json:
            ctx.emit_json({"done": [d.as_dict() for d in watcher.done]})
        elif not watcher.done:
            ctx.stdout.write("Nothing to do.\n")
        else:
            for d in watcher.done:
                job = f" (job {d.job})" if d.job is not None else ""
                ctx.stdout.write(f"{d.domain}: {d.what}{job}{': ' + d.detail if d.detail else ''}\n")
    return rc
