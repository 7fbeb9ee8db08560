"""The Debian package: built with dpkg-buildpackage, installed with dpkg, used, purged: nothing left but the store.

The rest of the suite runs from the virtualenv, and the package's hook lands in the real
/etc/libvirt/hooks/qemu.d/: everything the package touches that existed before (the hook, the
configuration, the hook directories libvirtd looks at) is saved first and put back in a ``finally``, the package is purged there whatever
happened, and a store the package created is removed if it is still empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.requires("dpkg-buildpackage", "dh", "dpkg", "dpkg-query")]

ROOT = Path(__file__).resolve().parents[2]
HOOK = Path("/etc/libvirt/hooks/qemu.d/50-vmshare")
CONFIG = Path("/etc/vmshare/vmshare.yaml")
STORE = Path("/var/lib/libvirt/vmshare")
#: What the package installs and purge must remove.
INSTALLED = [Path("/usr/bin/vmshare"), Path("/usr/lib/python3/dist-packages/vmshare_libvirt"), HOOK, CONFIG,
             Path("/lib/systemd/system/vmshare-watch.service"), Path("/usr/share/man/man1/vmshare-doctor.1.gz"),
             Path("/usr/share/bash-completion/completions/vmshare")]
ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def run(*argv: str, check: bool = True, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def installed() -> bool:
    proc = run("dpkg-query", "-W", "-f=${Status}", "vmshare", check=False)
    return proc.returncode == 0 and "installed" in proc.stdout.split()


def saved(path: Path) -> tuple[bytes, int] | None:
    return (path.read_bytes(), path.stat().st_mode) if path.exists() else None


def put_back(path: Path, copy: tuple[bytes, int] | None) -> None:
    if copy is None:
        if path.exists() or path.is_symlink():
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(copy[0])
    os.chmod(path, copy[1] & 0o7777)


def test_package_builds_installs_runs_and_purges_to_nothing_but_the_store(tmp_path):
    assert not installed(), "a vmshare package is installed on this host: the test would remove it"
    hook_before, config_before = saved(HOOK), saved(CONFIG)
    config_dir_existed, store_existed = CONFIG.parent.exists(), STORE.exists()
    hook_dirs = [d for d in (HOOK.parent.parent, HOOK.parent) if d.is_dir()]  # purge drops them when empty
    try:
        out = tmp_path / "deb"
        run("bash", str(ROOT / "packaging" / "build-deb.sh"), str(out))
        (deb,) = out.glob("vmshare_*_all.deb")
        run("dpkg", "-i", "--force-confnew", str(deb))
        assert installed()

        version = run("/usr/bin/vmshare", "--version", cwd=tmp_path).stdout.strip()
        from vmshare_libvirt import __version__
        assert version == f"vmshare {__version__}"
        where = run("/usr/bin/python3", "-c", "import vmshare_libvirt; print(vmshare_libvirt.__file__)",
                    cwd=tmp_path).stdout
        assert where.startswith("/usr/lib/python3/dist-packages/vmshare_libvirt/")
        assert STORE.is_dir() and (STORE.stat().st_mode & 0o7777 == 0o711 or store_existed)
        assert HOOK.stat().st_mode & 0o111 and CONFIG.is_file()

        doctor = run("/usr/bin/vmshare", "doctor", "--no-appliance", "--json", check=False, cwd=tmp_path)
        report = json.loads(doctor.stdout)
        checks = {c["name"]: c for c in report["checks"]}
        assert doctor.returncode == report["exit_code"] in (0, 1, 2), doctor.stderr
        assert checks["config"]["status"] == "ok" and str(CONFIG) in checks["config"]["detail"]
        assert checks["hook"]["status"] == "ok" and "/usr/bin/python3" in checks["hook"]["detail"]
        assert checks["qemu-img"]["status"] == "ok"
        hook = run("/usr/bin/vmshare", "hook", "status", "--json", cwd=tmp_path)
        assert json.loads(hook.stdout)["installed"] is True

        run("dpkg", "--purge", "vmshare")
        assert not installed()
        gone = INSTALLED + ([] if config_dir_existed else [CONFIG.parent])
        left = [str(p) for p in gone if p.exists() or p.is_symlink()]
        assert left == [], f"left behind by purge: {left}"
        assert STORE.is_dir(), "purge must keep the store"
    finally:
        if installed():
            run("dpkg", "--purge", "vmshare", check=False)
        for directory in hook_dirs:
            directory.mkdir(mode=0o755, exist_ok=True)
        put_back(HOOK, hook_before)
        if config_before is not None or config_dir_existed:
            put_back(CONFIG, config_before)
        elif CONFIG.parent.exists():
            shutil.rmtree(CONFIG.parent)
        if not store_existed and STORE.is_dir() and not any(STORE.iterdir()):
            STORE.rmdir()
    assert not Path("/usr/bin/vmshare").exists()
