"""Build tar archives on the host that recreate manifest entries exactly.

The archives are PAX with numeric owners, nanosecond mtimes and binary-safe
xattrs, which GNU tar inside the appliance (``tar_in`` with xattrs) restores
exactly.  Content comes from the guest through ``tar_out`` of whole
directories or ``pread`` of single files, whichever is cheaper
(:mod:`..guest.digests`), and is digested on the host while it passes.
(``download`` costs about 0.1 s per call under TCG, ``pread`` about 1 ms.)
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import threading
from typing import Callable, Iterable

from ..guest import digests
from ..guest.entries import Entry, Manifest
from ..guest.manifest import FilesystemReader, is_api_path, join
from ..errors import VerificationError

TAR_TYPES = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE, "c": tarfile.CHRTYPE,
             "b": tarfile.BLKTYPE, "p": tarfile.FIFOTYPE}


def tar_name(path: bytes) -> str:
    return "." if not path else "./" + path.decode("utf-8", "surrogateescape")


def tarinfo_for(entry: Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(tar_name(entry.path))
    ti.type = TAR_TYPES[entry.kind]
    ti.mode = entry.mode
    ti.uid, ti.gid = entry.uid, entry.gid
    ti.uname = ti.gname = ""
    sec, ns = divmod(entry.mtime_ns, 1_000_000_000)
    ti.mtime = sec
    pax = {"mtime": f"{sec}.{ns:09d}"}
    for name, value in entry.xattrs:
        if name.startswith("tar."):
            continue  # ACL text from a tar read: restored through the system.posix_acl xattrs instead
        pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    if entry.kind == "l":
        ti.linkname = (entry.target or b"").decode("utf-8", "surrogateescape")
    if entry.kind in "cb":
        ti.devmajor, ti.devminor = os.major(entry.rdev), os.minor(entry.rdev)
    return ti


PREAD_CHUNK = 2 << 20  # well below the 4 MiB protocol message limit


class GuestFileReader(io.RawIOBase):
    """A file object reading one guest file through ``pread`` calls of at most PREAD_CHUNK bytes."""

    def __init__(self, g, path: str):
        self.g, self.path, self.offset = g, path, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = PREAD_CHUNK if size is None or size < 0 else min(size, PREAD_CHUNK)
        data = bytes(self.g.pread(self.path, n, self.offset)) if n else b""
        self.offset += len(data)
        return data


class ContentSource:
    """Fetches regular-file content from one guest filesystem, in bulk where it pays."""

    def __init__(self, reader: FilesystemReader, manifest: Manifest, workdir: str):
        self.reader = reader
        self.manifest = manifest
        self.workdir = workdir

    def fetch(self, wanted: set[bytes], sink: Callable[[bytes, io.BufferedReader | tarfile.ExFileObject], None]) -> None:
        """Call ``sink(path, fileobj)`` once for every wanted regular file."""
        files = {e.path: e.size for e in self.manifest if e.kind == "f" and is_api_path(e.path)}
        api = {p for p in wanted if p in files}
        odd = wanted - api
        plan = digests.choose(files, api, digests.FETCH_COSTS)
        bulk = set(plan.bulk_dirs)
        for p in odd:  # names the API cannot carry come through a tar of their nearest API-safe ancestor
            parts = p.split(b"/")
            i = next(i for i, part in enumerate(parts) if not is_api_path(part))
            bulk.add(b"/".join(parts[:i]))
        seen: set[bytes] = set()
        g = self.reader.g
        for d in sorted(bulk):
            tar_path = os.path.join(self.workdir, "bulk.tar")
            g.tar_out(self.reader.guest_path(d), tar_path, numericowner=True)
            with tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
                for ti in tf:
                    rel = ti.name.encode("utf-8", "surrogateescape")
                    rel = rel[2:] if rel.startswith(b"./") else rel
                    path = join(d, rel)
                    if path in wanted and path not in seen and (ti.isreg() or ti.islnk()):
                        seen.add(path)
                        sink(path, tf.extractfile(ti))
            os.unlink(tar_path)
        for p in plan.single_files:
            if p in seen:
                continue
            sink(p, GuestFileReader(g, self.reader.guest_path(p)))
            seen.add(p)
        missing = wanted - seen
        if missing:
            example = sorted(missing)[0].decode("utf-8", "backslashreplace")
            raise VerificationError(f"{len(missing)} file(s) could not be read from the guest, e.g. /{example}",
                                    target=self.reader.name)


class Spool:
    """Regular-file content copied out of one guest filesystem ahead of time, digested on the host.

    :meth:`fill` takes the place of digesting candidate files in the appliance
    (one read serves both the plan and the base build).  An :class:`Archive`
    then uses the spooled files directly; anything not spooled comes from the
    fallback source.
    """

    def __init__(self, workdir: str):
        self.dir = tempfile.mkdtemp(prefix="spool-", dir=workdir)
        self.workdir = workdir
        self.stored: dict[bytes, str] = {}
        self.digests: dict[bytes, str] = {}
        self.fallback: ContentSource | None = None

    def fill(self, reader: FilesystemReader, manifest: Manifest, needed: set[bytes]) -> None:
        """Copy out the ``needed`` undigested regular files and set their digests in ``manifest``."""
        wanted = {p for p in needed if (e := manifest.entries.get(p)) is not None and e.kind == "f"
                  and e.digest is None and is_api_path(p)}
        self.fallback = ContentSource(reader, manifest, self.workdir)

        def sink(path: bytes, fobj) -> None:
            local = os.path.join(self.dir, str(len(self.stored)))
            self.digests[path] = _copy_digesting(fobj, local)
            self.stored[path] = local
            manifest.entries[path].digest = self.digests[path]

        if wanted:
            self.fallback.fetch(wanted, sink)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.stored.clear()


def _copy_digesting(fobj, local: str) -> str:
    h = hashlib.sha256()
    with open(local, "wb") as out:
        for chunk in iter(lambda: fobj.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


class Archive:
    """A tar recreating manifest entries (parents first), in two phases.

    :meth:`fetch` gets the regular files' content from the guest (it uses the
    appliance); :meth:`write` then only reads host files, so it can stream
    into a ``tar_in`` of the same appliance (:func:`extract`).  Every regular
    file's sha256 goes to ``digests`` and must equal the entry's digest when it
    has one.  Hard-linked files (same inode) become one file plus hard links.
    """

    def __init__(self, entries: Iterable[Entry], source: ContentSource | Spool | None, workdir: str):
        self.entries = sorted(entries, key=lambda e: e.path.split(b"/"))
        self.source = source
        self.workdir = workdir
        self.digests: dict[bytes, str] = {}
        first_of_inode: dict[int, bytes] = {}
        self.link_to: dict[bytes, bytes] = {}
        for e in self.entries:
            if e.kind == "f" and e.nlink > 1 and e.ino:
                if e.ino in first_of_inode:
                    self.link_to[e.path] = first_of_inode[e.ino]
                else:
                    first_of_inode[e.ino] = e.path
        self.stored: dict[bytes, str] = {}
        self.content_dir: str | None = None

    def fetch(self) -> None:
        wanted = {e.path for e in self.entries if e.kind == "f"} - set(self.link_to)
        if self.source is None or not wanted:
            return
        source = self.source
        if isinstance(source, Spool):
            for path in wanted & source.stored.keys():
                self.stored[path] = source.stored[path]
                self.digests[path] = source.digests[path]
            wanted = wanted - source.stored.keys()
            source = source.fallback
            if wanted and source is None:
                raise VerificationError(f"{len(wanted)} file(s) were never copied out")
        if not wanted:
            return
        self.content_dir = tempfile.mkdtemp(prefix="content-", dir=self.workdir)

        def sink(path: bytes, fobj) -> None:
            local = os.path.join(self.content_dir, str(len(self.stored)))
            self.digests[path] = _copy_digesting(fobj, local)
            self.stored[path] = local

        source.fetch(wanted, sink)

    def write(self, out_path: str) -> int:
        """Write the tar to ``out_path`` (a file or a FIFO); returns the number of members."""
        count = 0
        # stream mode ("w|"): a FIFO cannot seek
        with open(out_path, "wb") as raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT,
                                                      encoding="utf-8", errors="surrogateescape",
                                                      bufsize=1 << 20, copybufsize=1 << 20) as tf:
            for e in self.entries:
                if e.kind in "s?":
                    continue
                ti = tarinfo_for(e)
                if e.path in self.link_to:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = tar_name(self.link_to[e.path])
                    tf.addfile(ti)
                    self.digests[e.path] = self.digests[self.link_to[e.path]]
                elif e.kind == "f":
                    name = e.path.decode("utf-8", "backslashreplace")
                    got = self.digests[e.path]
                    if e.digest is not None and got != e.digest:
                        raise VerificationError(f"/{name} changed while it was read")
                    with open(self.stored[e.path], "rb") as f:
                        ti.size = os.fstat(f.fileno()).st_size
                        if ti.size != e.size:
                            raise VerificationError(f"/{name} changed size while it was read")
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
                count += 1
        return count

    def close(self) -> None:
        if self.content_dir:
            shutil.rmtree(self.content_dir, ignore_errors=True)
            self.content_dir = None


def copy_in(g, entries: Iterable[Entry], source: ContentSource | Spool | None, directory: str,
            workdir: str) -> dict[bytes, str]:
    """Recreate ``entries`` under ``directory`` in the appliance; returns path -> sha256 of the files.

    The content is fetched first (it may be read through the same appliance),
    then the archive streams into ``tar_in``.
    """
    archive = Archive(entries, source, workdir)
    try:
        archive.fetch()
        extract(g, archive, directory, workdir)
    finally:
        archive.close()
    return archive.digests


def extract(g, archive: Archive, directory: str, workdir: str) -> None:
    """``tar_in`` the archive into ``directory`` while a thread writes it into a FIFO.

    The appliance unpacks while the host is still writing, and no tar file is
    stored.  An error on the writing side (a file that changed while it was
    read) wins over the truncated-tar error the appliance then reports.
    """
    fifo = os.path.join(workdir, f"stream-{threading.get_ident()}.tar")
    os.mkfifo(fifo, 0o600)
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            archive.write(fifo)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failure.append(exc)

    th = threading.Thread(target=writer, name="tar-writer")
    th.start()
    try:
        g.tar_in(fifo, directory, xattrs=True, selinux=True, acls=True)
    except RuntimeError:
        _unblock(fifo, th)
        # the writer's own error is the cause, unless it only saw the appliance stop reading
        if failure and not isinstance(failure[0], BrokenPipeError):
            raise failure[0] from None
        raise
    finally:
        _unblock(fifo, th)
        os.unlink(fifo)
    if failure:
        raise failure[0]


def _unblock(fifo: str, th: threading.Thread) -> None:
    """Let a writer still waiting for (or writing to) the FIFO finish: open and close the read end."""
    while th.is_alive():
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return
        os.close(fd)
        th.join(0.05)
    th.join()
