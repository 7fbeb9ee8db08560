"""Helpers shared by subcommands."""

from __future__ import annotations

from typing import Callable


def human_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def connector(ctx, cfg) -> Callable[[], object]:
    """A function that opens the libvirt connection when first needed."""
    cache: list[object] = []

    def connect():
        if not cache:
            from ..libvirt_conn import open_connection

            cache.append(open_connection(ctx.uri(cfg)))
        return cache[0]

    return connect


def add_targets_argument(parser, *, allow_all: bool = True) -> None:
    parser.add_argument("targets", nargs="*", metavar="TARGET", help="libvirt domain name or disk image path")
    if allow_all:
        parser.add_argument("--all", action="store_true", help="every domain on the connection")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def target_names(args, ctx, cfg) -> list[str]:
    from ..errors import TargetError
    from ..targets import all_domain_names

    names = list(args.targets)
    if getattr(args, "all", False):
        names.extend(all_domain_names(connector(ctx, cfg)()))
    if not names:
        raise TargetError("no targets given", hint="name domains or disk images, or use --all")
    return names


def open_store_for_writing(ctx, cfg):
    """The store, with the operation lock held by the caller; interrupted operations recovered first."""
    from ..store import open_store

    return open_store(cfg.store_dir, create=True)


def recover_first(ctx, store, conn) -> None:
    """Every command that writes starts by finishing or undoing an interrupted operation."""
    from ..engine.recover import recover

    for op_id, kind, state in recover(store, conn):
        ctx.stderr.write(f"vmshare: recovered interrupted {kind} operation {op_id}: {state}\n")
