"""vmshare plan: which targets could share a base, and what it would save.  Writes nothing."""

from __future__ import annotations

from ._common import add_targets_argument, connector, human_bytes, target_names


def register(sub) -> None:
    p = sub.add_parser("plan", help="group targets by OS and predict the space a shared base saves (read-only)")
    add_targets_argument(p)
    p.add_argument("--details", action="store_true",
                   help="with --json: list each member's private and metadata-only paths")
    p.set_defaults(func=run)


def run(args, ctx) -> int:
    from ..survey import survey
    from ..targets import resolve

    cfg = ctx.load_config()
    names = target_names(args, ctx, cfg)
    resolved = resolve(names, connector(ctx, cfg), may_vanish=names[len(args.targets):])
    result = survey(resolved.targets, resolved.formats, cfg.appliance, ctx.progress)
    if not result.groups:
        _refuse_bad_input(result, set(args.targets))
    data = result.to_json(details=args.details)
    if args.json:
        ctx.emit_json(data)
        return 0
    out = ctx.stdout
    if not data["groups"]:
        out.write("No group: no two targets can share a base.\n")
    for i, g in enumerate(data["groups"], 1):
        os_ = g["os"]
        out.write(f"Group {i}: {os_['product_name']} ({os_['distro']} {os_['major']}, {os_['arch']})\n")
        out.write(f"  common: {g['common_files']} files, {human_bytes(g['common_bytes'])}"
                  f"  -> predicted base {human_bytes(g['predicted_base_bytes'])}\n")
        out.write(f"  {'member':<24} {'private files':>13} {'private':>11} {'now':>11} {'overlay':>11}\n")
        for m in g["members_detail"]:
            out.write(f"  {m['target']:<24} {m['private_files']:>13} {human_bytes(m['private_bytes']):>11}"
                      f" {human_bytes(m['allocated_bytes']):>11} {human_bytes(m['predicted_overlay_bytes']):>11}\n")
        out.write(f"  now {human_bytes(g['current_bytes'])}, predicted {human_bytes(g['predicted_bytes'])}\n")
    if data["groups"]:
        out.write(f"Total: now {human_bytes(data['current_total_bytes'])}, predicted "
                  f"{human_bytes(data['predicted_total_bytes'])}, saving {human_bytes(data['predicted_saving_bytes'])}\n")
    for e in data["excluded"]:
        out.write(f"Excluded {e['target']}: {e['reason']}\n")
    return 0


def _refuse_bad_input(result, named: set[str]) -> None:
    """No group: a named target that holds no OS is a user error, not just an exclusion."""
    from ..errors import TargetError

    for e in result.excluded:
        if e.code == "no-os" and e.target in named:
            raise TargetError(e.reason, target=e.target, hint="name a disk or domain that holds an installed guest")
