"""Opening, creating and checking the state database; the shared helpers of the store."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from .. import statedb
from ..errors import StoreError

DEFAULT_TIMEOUT = 10.0
DAMAGE_HINT = "restore it from a backup; vmshare will not act on a damaged journal"


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_creations(final: str) -> None:
    """Remove half-created databases left by creators that died."""
    for leftover in glob.glob(glob.escape(final) + ".new-*"):
        pid_text = leftover[len(final) + len(".new-"):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def create_database(store_dir: Path) -> None:
    """Create an initialised ``state.db`` unless one exists.

    The database is built under a temporary name and linked into place only
    once its schema is committed, so an existing ``state.db`` is always an
    initialised store: an empty or truncated one is damage, never "new".
    """
    final = statedb.db_path(store_dir)
    _remove_stale_creations(final)
    tmp = f"{final}.new-{os.getpid()}"
    for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(
                "BEGIN;" + statedb.SCHEMA_SQL + "".join(sql for _, sql in statedb.MIGRATIONS)
                + f"INSERT INTO schema_version (version) VALUES ({int(statedb.SCHEMA_VERSION)}); COMMIT;"
            )
        finally:
            conn.close()  # the last close checkpoints and removes the -wal file
        os.chmod(tmp, 0o600)
        _fsync_path(tmp)
        try:
            os.link(tmp, final)  # fails if another process created the store first
        except FileExistsError:
            pass
        _fsync_path(str(store_dir), directory=True)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot create the state store: {exc}", target=final) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class StoreBase:
    """A connection to the state database with error mapping and JSON helpers."""

    def __init__(self, store_dir: Path, conn: sqlite3.Connection, readonly: bool):
        self.store_dir = store_dir
        self.db_path = Path(statedb.db_path(store_dir))
        self.readonly = readonly
        self._conn = conn
        # Operations begun through this object and not finished yet: the only running
        # operations that recovery must leave alone (every other one belongs to a dead process).
        self._active_ops: set[int] = set()

    @classmethod
    def open(cls, store_dir: str | os.PathLike[str], *, create: bool = True, readonly: bool = False,
             timeout: float = DEFAULT_TIMEOUT):
        """Open (and with ``create``, first create) the store in ``store_dir``.

        Raises :class:`StoreError` for a missing store (without ``create``), a
        file that is not a vmshare store, a newer or older schema, or damage
        found by SQLite's ``quick_check``.
        """
        store_dir = Path(store_dir)
        if create and not readonly:
            try:
                store_dir.mkdir(parents=True, exist_ok=True, mode=0o711)  # like libvirt's image directory
            except OSError as exc:
                raise StoreError(f"cannot create the store directory: {exc.strerror}", target=str(store_dir)) from exc
            if not os.path.exists(statedb.db_path(store_dir)):
                create_database(store_dir)
        conn = statedb.connect_existing(store_dir, readonly=readonly, timeout=timeout)
        try:
            if not readonly:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"state store is in journal mode {mode}, not WAL",
                                     target=statedb.db_path(store_dir))
            result = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            if result != ["ok"]:
                detail = "; ".join(" ".join(str(r).split()) for r in result[:3])  # one line
                raise StoreError(f"state store is damaged: {detail}", target=statedb.db_path(store_dir),
                                 hint=DAMAGE_HINT)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"state store is corrupt: {exc}", target=statedb.db_path(store_dir),
                             hint=DAMAGE_HINT) from exc
        except BaseException:
            conn.close()
            raise
        return cls(store_dir, conn, readonly)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- helpers for the table mixins ------------------------------------

    def _error(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if isinstance(exc, sqlite3.IntegrityError):
            return StoreError(f"state store refused the change: {text}", target=str(self.db_path))
        if "locked" in text or "busy" in text:
            return StoreError(f"state store is busy: {text}", target=str(self.db_path), hint="retry")
        return StoreError(f"state store error: {text}", target=str(self.db_path),
                          hint="if this persists the store may be damaged; restore it from a backup")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One committed write transaction; every public write method uses exactly one."""
        if self.readonly:
            raise StoreError("state store was opened read-only", target=str(self.db_path))
        try:
            with statedb.write_transaction(self._conn) as conn:
                yield conn
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _rows(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row | tuple]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _loads(self, text: str | None, what: str) -> Any:
        if text is None:
            return None
        try:
            return json.loads(text)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"state store holds an unreadable {what} record", target=str(self.db_path),
                             hint="restore it from a backup") from exc


def dumps(value: Any) -> str:
    """JSON for a column: compact, keys sorted, so equal values store equal text."""
    return json.dumps(value if value is not None else {}, sort_keys=True, separators=(",", ":"))


def check_choice(value: Any, choices: tuple, what: str) -> None:
    if value not in choices:
        raise StoreError(f"invalid {what} {value!r}; expected one of {', '.join(map(str, choices))}")
