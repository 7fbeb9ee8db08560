"""``vmshare validate [FILE]``: check a configuration file without doing anything else."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import config
from ..errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser("validate", help="check the configuration file",
                                   description="Check a configuration file against the schema. "
                                               "Errors name the key path, e.g. auto_enroll.include.")
    parser.add_argument("file", nargs="?", type=Path, metavar="FILE",
                        help="file to check (default: --config, $VMSHARE_CONFIG or /etc/vmshare/vmshare.yaml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_validate)


def _validate(args: argparse.Namespace, ctx) -> int:
    path = args.file or ctx.config_path or config.config_path()
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        if args.json:
            ctx.emit_json({"file": str(path), "valid": False, "error": str(exc)})
        else:
            ctx.stderr.write(f"vmshare: invalid configuration: {exc}\n")
        return 1
    if args.json:
        ctx.emit_json({"file": str(path), "valid": True, "store_dir": str(cfg.store_dir),
                       "libvirt_uri": cfg.libvirt_uri})
    else:
        source = path if cfg.source is not None else f"{path} (absent: all defaults)"
        ctx.stdout.write(f"OK: {source}\n")
    return 0
