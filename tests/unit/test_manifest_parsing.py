"""Parsing what the appliance returns, and the manifest's JSON form (no appliance)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest

from vmshare_libvirt.guest import manifest as mf
from vmshare_libvirt.guest.entries import Entry, Manifest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def coreutils_line(name: bytes, digest: str) -> bytes:
    """A line as GNU sha256sum prints it: names with backslash, newline or CR escaped."""
    if any(c in name for c in b"\\\n\r"):
        esc = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\" + digest.encode() + b"  " + esc
    return digest.encode() + b"  " + name


# ------------------------------------------------------------------ checksums_out


@pytest.mark.parametrize("name", [
    b"plain",
    b"new\nline",
    b"back\\slash",
    b"both\\n-not-a-newline\nreal",
    b"carriage\rreturn",
    b"\xff\xfe-latin1-\xe9",
    b"-leading-dash",
    b"two  spaces",
    b"trailing-backslash\\",
])
def test_checksum_names_round_trip(name):
    digest = sha(name)
    data = coreutils_line(b"./" + name, digest) + b"\n"
    assert mf.parse_checksums(data, b"") == {name: digest}
    assert mf.parse_checksums(data, b"usr/share") == {b"usr/share/" + name: digest}


def test_checksum_output_with_many_lines_and_subdirectories():
    names = [b"a", b"sub/b", b"sub/deeper/new\nline", b"sub/\\x"]
    data = b"".join(coreutils_line(b"./" + n, sha(n)) + b"\n" for n in names)
    assert mf.parse_checksums(data, b"etc") == {b"etc/" + n: sha(n) for n in names}
    assert mf.parse_checksums(b"", b"") == {}


def test_unescape_leaves_unknown_escapes_alone():
    assert mf.unescape_checksum_name(b"a\\\\b\\nc\\rd") == b"a\\b\nc\rd"
    assert mf.unescape_checksum_name(b"x\\") == b"x\\"


def test_api_safe_names():
    assert mf.is_api_safe(b"ordinary.txt")
    assert mf.is_api_safe("caf\u00e9".encode())
    assert mf.is_api_safe(b"-leading-dash")
    assert not mf.is_api_safe(b"new\nline")
    assert not mf.is_api_safe(b"tab\there")
    assert not mf.is_api_safe(b"latin1-\xe9")
    assert mf.is_api_path(b"")
    assert mf.is_api_path(b"usr/share/x")
    assert not mf.is_api_path(b"usr/\xff/x")


# ------------------------------------------------------------------ lxattrlist


def xrec(name: str, value: bytes) -> dict:
    return {"attrname": name, "attrval": value}


def test_xattr_list_is_split_per_name():
    raw = [
        xrec("", b"2"), xrec("user.b", b"2"), xrec("security.capability", b"\x01\x00\x00\x02"),
        xrec("", b"0"),
        xrec("", b"1"), xrec("system.posix_acl_access", b"\x02\x00\x00\x00"),
        xrec("", b"0\0"),
    ]
    out = mf._split_xattrlist(raw, 4)
    assert out == [
        (("security.capability", b"\x01\x00\x00\x02"), ("user.b", b"2")),
        (),
        (("system.posix_acl_access", b"\x02\x00\x00\x00"),),
        (),
    ]


def test_xattr_values_with_nul_and_binary_bytes_survive():
    raw = [xrec("", b"1"), xrec("security.selinux", b"system_u:object_r:etc_t:s0\0")]
    assert mf._split_xattrlist(raw, 1) == [(("security.selinux", b"system_u:object_r:etc_t:s0\0"),)]


# ------------------------------------------------------------------ tar headers


def tar_with(*infos: tuple[tarfile.TarInfo, bytes | None]) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti, data in infos:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:", encoding="utf-8", errors="surrogateescape")


def info(name: str, type_=tarfile.REGTYPE, *, size=0, mode=0o644, uid=0, gid=0, mtime=1_700_000_000,
         pax=None, linkname="", devmajor=0, devminor=0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = type_, size, mode, uid, gid, mtime
    ti.linkname, ti.devmajor, ti.devminor = linkname, devmajor, devminor
    ti.pax_headers = dict(pax or {})
    return ti


def test_tar_header_entries():
    odd = b"odd-\xff\nname".decode("utf-8", "surrogateescape")
    tf = tar_with(
        (info("./" + odd, size=5, mode=0o4755, uid=1000, gid=100,
              pax={"mtime": "1700000000.123456789", "SCHILY.xattr.user.x": "v",
                   "SCHILY.acl.access": "user::rw-"}), b"hello"),
        (info("./dir", tarfile.DIRTYPE, mode=0o1777), None),
        (info("./link", tarfile.SYMTYPE, linkname=odd), None),
        (info("./null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3), None),
        (info("./sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
        (info("./fifo", tarfile.FIFOTYPE, mode=0o600), None),
        (info("./hard", tarfile.LNKTYPE, linkname="./" + odd), None),
    )
    entries = {ti.name: mf.entry_from_tarinfo(ti.name.encode("utf-8", "surrogateescape"), ti) for ti in tf}
    f = entries["./" + odd]
    assert (f.kind, f.mode, f.uid, f.gid, f.size) == ("f", 0o4755, 1000, 100, 5)
    assert f.mtime_ns == 1_700_000_000_123_456_789
    assert f.xattrs == (("tar.acl.access", b"user::rw-"), ("user.x", b"v"))
    assert f.path == b"./odd-\xff\nname"
    assert entries["./dir"].kind == "d" and entries["./dir"].mode == 0o1777
    assert entries["./link"].kind == "l" and entries["./link"].target == b"odd-\xff\nname"
    assert entries["./null"].kind == "c" and entries["./null"].rdev == os.makedev(1, 3)
    assert entries["./sda"].kind == "b" and entries["./sda"].rdev == os.makedev(8, 0)
    assert entries["./fifo"].kind == "p"
    assert entries["./hard"].kind == "f"


def test_tar_mtime_without_fraction_and_short_fraction():
    tf = tar_with((info("./a", mtime=1234), b""), (info("./b", pax={"mtime": "5.5"}), b""))
    a, b = (mf.entry_from_tarinfo(b"x", ti) for ti in tf)
    assert a.mtime_ns == 1234 * 10**9
    assert b.mtime_ns == 5 * 10**9 + 500_000_000


# ------------------------------------------------------------------ Entry JSON


@pytest.mark.parametrize("entry", [
    Entry(b"usr/bin/\xff\xfe\nodd", "f", 0o4755, 0, 0, 12, 4096, 1_700_000_000_123_456_789,
          xattrs=(("security.capability", b"\x01\x00\x00\x02\x00"), ("user.\xe9", b"\xff")), ino=42, nlink=2,
          digest="ab" * 32),
    Entry(b"-dash", "f", 0o600, 1000, 1000, 0, 0, 0, digest=None),
    Entry(b"bin", "l", 0o777, 0, 0, 7, 0, 5, target=b"usr/\xffbin"),
    Entry(b"dev/null", "c", 0o666, 0, 0, 0, 0, 5, rdev=os.makedev(1, 3)),
    Entry(b"dev/sda", "b", 0o660, 0, 6, 0, 0, 5, rdev=os.makedev(8, 0)),
    Entry(b"run/fifo", "p", 0o600, 0, 0, 0, 0, 5),
    Entry(b"", "d", 0o755, 0, 0, 4096, 4096, 5, xattrs=(("system.posix_acl_default", b"\x02\x00"),)),
], ids=lambda e: e.kind + ":" + repr(e.path))
def test_entry_json_round_trip(entry):
    text = json.dumps(entry.to_json())  # must be valid JSON text (surrogates escaped)
    back = Entry.from_json(json.loads(text))
    assert back.identity() == entry.identity()
    assert back.path == entry.path
    if entry.kind == "f":
        assert (back.ino, back.nlink, back.digest) == (entry.ino, entry.nlink, entry.digest)


def test_manifest_differences_and_hard_link_groups():
    a, b = Manifest(), Manifest()
    for m in (a, b):
        m.entries[b"x"] = Entry(b"x", "f", 0o644, 0, 0, 1, 4096, 1, ino=7, nlink=2, digest="d")
        m.entries[b"y"] = Entry(b"y", "f", 0o644, 0, 0, 1, 4096, 1, ino=7, nlink=2, digest="d")
    assert a.differences(b) == []
    b.entries[b"y"].ino = 8  # a rebuild renumbers inodes: still the same only if grouped alike
    assert a.differences(b) == ["hard-link groups differ"]
    b.entries[b"y"].ino = 7
    b.entries[b"x"].mode = 0o600
    assert a.differences(b) == ["x: differs in mode"]
    del b.entries[b"y"]
    assert "y: missing" in a.differences(b)
