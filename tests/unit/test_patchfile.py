"""Patch manifests: the schema, every mistake reported with its key path, host paths kept inside."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from vmshare_libvirt.cli import main
from vmshare_libvirt.patchfile import ManifestError, load


def _write(directory: Path, text: str) -> Path:
    path = directory / "m.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files/motd").write_text("hello\n")
    (tmp_path / "files/issue.diff").write_text("--- a\n+++ b\n@@ -1 +1 @@\n-a\n+b\n")
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs/libfoo1_1.2_amd64.deb").write_bytes(b"!<arch>\n")
    return tmp_path


FULL = """\
    name: libfoo-security-update
    requires:
      distro: debian
      major_version: 12
      arch: x86_64
    steps:
      - install: pkgs/libfoo1_1.2_amd64.deb
      - put: {src: files/motd, dest: /etc/motd, mode: "0644", owner: 0, group: 0}
      - delete: /etc/obsolete.conf
      - mkdir: {path: /etc/app.d, mode: "0755"}
      - symlink: {target: /etc/app.d, path: /etc/app}
      - chmod: {path: /usr/local/bin/tool, mode: "0755"}
      - chown: {path: /srv/data, owner: 1000, group: 1000}
      - diff: {path: /etc/issue, patch: files/issue.diff}
      - run: "update-alternatives --auto editor"
    """


def test_the_documented_shape_loads(tree):
    m = load(_write(tree, FULL))
    assert m.name == "libfoo-security-update"
    assert m.requires == {"distro": "debian", "major_version": 12, "arch": "x86_64"}
    assert [s.kind for s in m.steps] == ["install", "put", "delete", "mkdir", "symlink", "chmod", "chown", "diff",
                                        "run"]
    assert m.steps[0].args["packages"] == [str(tree / "pkgs/libfoo1_1.2_amd64.deb")]
    assert m.steps[1].args == {"src": str(tree / "files/motd"), "dest": "/etc/motd", "mode": 0o644, "owner": 0,
                               "group": 0}
    assert m.steps[5].args == {"path": "/usr/local/bin/tool", "mode": 0o755}
    assert len(m.digest) == 64


def test_the_digest_covers_the_files_the_manifest_names(tree):
    path = _write(tree, FULL)
    first = load(path).digest
    (tree / "files/motd").write_text("changed\n")
    assert load(path).digest != first


def test_every_mistake_is_reported_with_its_key_path(tree):
    path = _write(tree, """\
        requires: {distro: 12, flavour: x}
        surprise: 1
        steps:
          - put: {src: /etc/passwd, dest: etc/motd, mode: 644}
          - delete: /etc/../shadow
          - mkdir: {path: /, mode: "0755"}
          - chown: {path: /srv}
          - diff: {path: /etc/issue, patch: ../outside.diff}
          - install: pkgs/missing.deb
          - frobnicate: /x
          - run: ""
          - {put: {src: files/motd, dest: /a}, delete: /b}
        """)
    with pytest.raises(ManifestError) as err:
        load(path)
    assert err.value.problems == [
        "surprise: unknown key (known keys: name, requires, steps)",
        "name: required",
        "requires.distro: expected str, got int",
        "requires.flavour: unknown key (known keys: distro, major_version, arch)",
        "steps[0].put.src: must be relative to the manifest's directory, got '/etc/passwd'",
        "steps[0].put.dest: must be an absolute guest path, got 'etc/motd'",
        'steps[0].put.mode: expected octal digits in quotes, like "0644"',
        "steps[1].delete: must not contain '..', got '/etc/../shadow'",
        "steps[2].mkdir.path: must not be the guest's root directory",
        "steps[3].chown: expected owner, group or both",
        "steps[4].diff.patch: leaves the manifest's directory: '../outside.diff'",
        "steps[5].install: no such file: 'pkgs/missing.deb'",
        "steps[6].frobnicate: unknown step (known steps: install, put, delete, mkdir, symlink, chmod, chown, diff, run)",
        "steps[7].run: expected a non-empty shell command",
        "steps[8]: expected a mapping with exactly one of: install, put, delete, mkdir, symlink, chmod, chown, "
        "diff, run",
    ]


def test_a_symlink_out_of_the_manifest_directory_is_refused(tree, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret"
    outside.write_text("x")
    os.symlink(outside, tree / "files/link")
    path = _write(tree, """\
        name: x
        steps:
          - put: {src: files/link, dest: /etc/x}
        """)
    with pytest.raises(ManifestError) as err:
        load(path)
    assert err.value.problems == ["steps[0].put.src: leaves the manifest's directory: 'files/link'"]


def test_yaml_syntax_errors_give_line_and_column(tree):
    path = _write(tree, "name: x\nsteps:\n  - put: {src: a\n")
    with pytest.raises(ManifestError) as err:
        load(path)
    assert err.value.problems[0].startswith("not valid YAML: line 4, column 1: ")


def test_duplicate_keys_and_python_tags_are_refused(tree):
    with pytest.raises(ManifestError) as err:
        load(_write(tree, "name: x\nname: y\nsteps: [{delete: /a}]\n"))
    assert err.value.problems == ["name: duplicate key (line 2)"]
    with pytest.raises(ManifestError) as err:
        load(_write(tree, "name: !!python/object:os.system x\nsteps: [{delete: /a}]\n"))
    assert err.value.problems[0].startswith("not valid YAML: line 1, column 7: ")
    assert "python/object" in err.value.problems[0]


def test_guest_paths_are_normalised(tree):
    m = load(_write(tree, "name: x\nsteps:\n  - delete: //etc/./obsolete.conf/\n"))
    assert m.steps[0].args["path"] == "/etc/obsolete.conf"


def test_requirements_are_compared_with_the_guest(tree):
    m = load(_write(tree, FULL))
    assert m.unmet({"distro": "debian", "major": 12, "arch": "x86_64"}) == []
    assert m.unmet({"distro": "debian", "major": 11, "arch": "x86_64"}) == [
        "requires major_version 12, the guest has 11"]


def test_validate_command_lists_every_mistake_and_touches_nothing(tree, capsys):
    good = _write(tree, FULL)
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {good}: patch libfoo-security-update, 9 step(s)\n")
    bad = tree / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - put: {src: nope, dest: /a}\n  - chmod: {path: /a}\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"vmshare: {bad}: steps[0].put.src: no such file: 'nope'",
                   f"vmshare: {bad}: steps[1].chmod.mode: required"]
