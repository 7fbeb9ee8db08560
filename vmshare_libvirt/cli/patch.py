"""``vmshare patch MANIFEST TARGET...``: apply a patch manifest to groups and members while they are offline."""

from __future__ import annotations

from ._common import human_bytes, writing_session

PARTIAL_EXIT = 3  # some member was left unpatched (failed, refused, requirements not met)


def register(sub) -> None:
    p = sub.add_parser(
        "patch", help="apply a patch manifest to groups or domains while they are offline",
        description="Apply the steps of MANIFEST (see 'vmshare validate MANIFEST') to every offline member of "
                    "each group named (a new base generation holds the patched shared files once; each member "
                    "is rebuilt on it and verified) or to one member's own overlay when a domain is named.  "
                    "Running members keep their generation and get the patch queued for when they stop "
                    "(run 'vmshare watch'); paused, pmsuspended and managed-saved members are never written.  "
                    "A member whose step fails stays exactly as it was.")
    p.add_argument("manifest", metavar="MANIFEST", help="the patch manifest (YAML)")
    p.add_argument("targets", nargs="+", metavar="TARGET", help="a group name or a member domain")
    p.add_argument("--shutdown", action="store_true",
                   help="shut running members down cleanly, patch them and start them again")
    p.add_argument("--force-off", action="store_true",
                   help="with --shutdown: power off a member that did not shut down in time")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="with --shutdown: how long to wait for each clean shutdown "
                        "(default: patch.shutdown_timeout_s, 120)")
    p.add_argument("--dry-run", action="store_true",
                   help="show per member what would change (package versions, kept conffiles, private copies)")
    p.add_argument("--all-or-nothing", action="store_true",
                   help="if any offline member cannot be patched, patch none")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from ..engine.patch import patch
    from ..patchfile import load

    manifest = load(args.manifest)
    with writing_session(ctx, kind="patch") as s:
        report = patch(s.cfg, s.conn, s.store, manifest, args.targets, shutdown=args.shutdown,
                       force_off=args.force_off,
                       shutdown_timeout=args.timeout or s.cfg.patch.shutdown_timeout_s, dry_run=args.dry_run,
                       all_or_nothing=args.all_or_nothing, progress=ctx.progress)
    if args.json:
        ctx.emit_json(report.to_json())
    else:
        _print(ctx, report)
    return PARTIAL_EXIT if report.failed else 0


def _print(ctx, report) -> None:
    out = ctx.stdout
    verb = "would apply" if report.dry_run else "applied"
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in report.timings.items())
    out.write(f"patch {report.name} ({report.digest[:12]}): {verb} in {report.seconds:.0f} s"
              + (f" ({phases})" if phases else "") + "\n")
    for m in report.members:
        line = f"  {m.domain}: {m.result}"
        if m.generation is not None and m.result == "patched":
            line += f" (generation {m.generation})"
        if m.detail:
            line += f": {m.detail}"
        out.write(line + "\n")
        for name, old, new in m.packages:
            out.write(f"    {name}: {old or 'not installed'} -> {new}\n")
        for path in m.kept_conffiles:
            out.write(f"    {path}: modified by this guest, kept (the package's version is installed "
                      f"next to it as {path}.dpkg-dist)\n")
    for group, gen in report.generations.items():
        out.write(f"group {group}: new base generation {gen}\n")
    if not report.dry_run:
        grown = report.store_bytes_after - report.store_bytes_before
        out.write(f"store bases: {human_bytes(report.store_bytes_before)} -> {human_bytes(report.store_bytes_after)} "
                  f"({'+' if grown >= 0 else '-'}{human_bytes(abs(grown))})\n")
