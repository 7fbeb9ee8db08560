"""Durable file operations on the host: fsync, rename, hard links, crash points."""

from __future__ import annotations

import logging
import os
import shutil
import stat

from ..errors import NoSpaceError, OperationError

log = logging.getLogger(__name__)


class CrashPoint(BaseException):
    """Raised only in tests (via VMSHARE_CRASHPOINT) when the process is not killed outright."""


def crashpoint(name: str) -> None:
    """Die here if ``VMSHARE_CRASHPOINT`` names this step (tests of crash recovery).

    ``VMSHARE_CRASHPOINT=step`` kills the process with SIGKILL at that step,
    exactly like a power cut from the journal's point of view.
    """
    want = os.environ.get("VMSHARE_CRASHPOINT")
    if want and want == name:
        log.warning("crash point %s reached: killing the process", name)
        os.kill(os.getpid(), 9)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_rename(src: str, dst: str) -> None:
    """fsync(src), rename(src, dst), fsync(directory)."""
    fsync_file(src)
    os.rename(src, dst)
    fsync_dir(os.path.dirname(dst))


def durable_link(src: str, dst: str) -> None:
    """Give ``src`` a second name (a hard link) durably."""
    os.link(src, dst)
    fsync_dir(os.path.dirname(dst))


def remove_quietly(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def same_inode(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _open_nofollow(path: str) -> int:
    """A descriptor on ``path`` itself; a symlink in its place is refused (ELOOP), never followed."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise OperationError(f"cannot open {path} without following links: {exc.strerror}", target=path,
                             hint="disk images must be regular files, not symbolic links; nothing was changed") from exc


def copy_ownership(src: str, dst: str) -> None:
    """Owner, mode and SELinux label of ``src`` onto ``dst`` (owner before mode: chown clears set-id bits).

    Both files are opened with ``O_NOFOLLOW`` and changed through their descriptors, so a
    symlink swapped into either place cannot redirect the change to another file.
    """
    sfd = _open_nofollow(src)
    try:
        dfd = _open_nofollow(dst)
        try:
            st = os.fstat(sfd)
            os.fchown(dfd, st.st_uid, st.st_gid)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
            try:
                label = os.getxattr(sfd, "security.selinux")
            except OSError:
                label = None
            if label is not None:
                try:
                    os.setxattr(dfd, "security.selinux", label)
                except OSError as exc:
                    log.warning("could not copy the SELinux label to %s: %s", dst, exc)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


# Store directories: root lists them; the QEMU user may only pass through them to open a base by name.
PRIVATE_DIR_MODE = 0o711


def private_dir(path: str) -> str:
    """Create ``path`` (if needed) with mode 0711 whatever the umask, and return it."""
    os.makedirs(path, mode=PRIVATE_DIR_MODE, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def file_identity(path: str) -> dict[str, int]:
    """What must not change between plan and switch: size, mtime and inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def check_free_space(directory: str, needed: int, what: str) -> None:
    """Refuse (:class:`NoSpaceError`) unless ``directory``'s filesystem has ``needed`` bytes free."""
    check_free_space_on([directory], needed, what)


def check_free_space_on(directories: list[str], needed: int, what: str) -> None:
    """:func:`check_free_space` for directories of one filesystem (see :func:`by_filesystem`),
    all named in the refusal."""
    free = shutil.disk_usage(directories[0]).free
    if free < needed:
        raise NoSpaceError(
            f"not enough free space in {', '.join(directories)} for {what}: {free // 2**20} MiB free, "
            f"about {-(-needed // 2**20)} MiB needed",
            hint="free some space and run the command again; nothing was changed",
        )


def by_filesystem(directories) -> list[list[str]]:
    """``directories`` grouped by the filesystem that holds them (they share its free space), sorted."""
    groups: dict[int, list[str]] = {}
    for directory in sorted(set(directories)):
        groups.setdefault(os.stat(directory).st_dev, []).append(directory)
    return list(groups.values())
