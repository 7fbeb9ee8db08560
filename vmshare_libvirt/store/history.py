"""Patch history and the overlays a member left behind on older generations."""

from __future__ import annotations

import time
from typing import Any

from .base import StoreBase, dumps
from .records import DriftSample, KeptOverlay, PatchRecord

_PATCH_COLUMNS = "id, name, digest, manifest_path, group_name, op_id, generation_id, at, results_json"
_KEPT_COLUMNS = "path, disk_path, generation_id, op_id, kept_at"
_DRIFT_COLUMNS = "group_name, domain, generation_id, at, source, entries, bytes"


class HistoryMixin(StoreBase):
    # ---- patches ----------------------------------------------------------

    def add_patch(self, name: str, digest: str, manifest_path: str, group_name: str | None, op_id: int | None,
                  generation_id: int | None, results: dict[str, Any]) -> PatchRecord:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                f"INSERT INTO patches ({_PATCH_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, digest, str(manifest_path), group_name, op_id, generation_id, now, dumps(results)))
            pid = int(cur.lastrowid)
        return PatchRecord(pid, name, digest, str(manifest_path), group_name, op_id, generation_id, now, dict(results))

    def patches(self, group_name: str | None = None) -> list[PatchRecord]:
        sql, args = f"SELECT {_PATCH_COLUMNS} FROM patches", ()
        if group_name is not None:
            sql, args = sql + " WHERE group_name = ?", (group_name,)
        return [self._patch(r) for r in self._rows(sql + " ORDER BY id", args)]

    def _patch(self, row) -> PatchRecord:
        return PatchRecord(*row[:8], self._loads(row[8], "patch results"))

    # ---- kept overlays ----------------------------------------------------

    def add_kept_overlay(self, path: str, disk_path: str, generation_id: int, op_id: int | None) -> KeptOverlay:
        now = time.time()
        with self._write() as conn:
            conn.execute(f"INSERT OR REPLACE INTO kept_overlays ({_KEPT_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                         (str(path), str(disk_path), generation_id, op_id, now))
        return KeptOverlay(str(path), str(disk_path), generation_id, op_id, now)

    def kept_overlays(self, disk_path: str | None = None, generation_id: int | None = None) -> list[KeptOverlay]:
        sql = f"SELECT {_KEPT_COLUMNS} FROM kept_overlays WHERE 1"
        args: list[Any] = []
        for column, value in (("disk_path", disk_path), ("generation_id", generation_id)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(str(value) if column == "disk_path" else value)
        return [KeptOverlay(*r) for r in self._rows(sql + " ORDER BY kept_at, path", args)]

    def forget_kept_overlay(self, path: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM kept_overlays WHERE path = ?", (str(path),))

    # ---- drift samples ----------------------------------------------------

    def add_drift_sample(self, group_name: str, domain: str, generation_id: int | None, source: str,
                         entries: int, nbytes: int) -> DriftSample:
        """Record how far ``domain`` had drifted from its base when ``source`` (drift, resync) read it."""
        now = time.time()
        with self._write() as conn:
            conn.execute(f"INSERT INTO drift_samples ({_DRIFT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (group_name, domain, generation_id, now, source, entries, nbytes))
        return DriftSample(group_name, domain, generation_id, now, source, entries, nbytes)

    def drift_samples(self, group_name: str, domain: str | None = None) -> list[DriftSample]:
        """The samples of ``group_name`` (one member's with ``domain``), oldest first; none in a store
        older than schema 4 (read-only openers do not migrate)."""
        if self._rows("SELECT version FROM schema_version")[0][0] < 4:
            return []
        sql, args = f"SELECT {_DRIFT_COLUMNS} FROM drift_samples WHERE group_name = ?", [group_name]
        if domain is not None:
            sql, args = sql + " AND domain = ?", args + [domain]
        return [DriftSample(*r) for r in self._rows(sql + " ORDER BY at, id", args)]

    # ---- locked-path drift --------------------------------------------------

    def record_locked_drift(self, disk_path: str, domain: str, group_name: str, generation_id: int | None,
                            entries: int, first_path: str, policy: str) -> None:
        """What a check of ``disk_path``'s locked paths found: ``entries`` changed (none: the record goes)."""
        with self._write() as conn:
            if entries:
                conn.execute("INSERT OR REPLACE INTO locked_drift (disk_path, domain, group_name, generation_id,"
                             " entries, first_path, policy, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (str(disk_path), domain, group_name, generation_id, entries, first_path, policy,
                              time.time()))
            else:
                conn.execute("DELETE FROM locked_drift WHERE disk_path = ?", (str(disk_path),))

    def locked_drift(self, group_name: str) -> dict[str, tuple[int, str, str, float]]:
        """Disk -> (entries, first path, policy, time) of the members of ``group_name`` whose last check
        found changes on their locked paths."""
        if self._rows("SELECT version FROM schema_version")[0][0] < 5:
            return {}
        return {r[0]: tuple(r[1:]) for r in self._rows(
            "SELECT disk_path, entries, first_path, policy, at FROM locked_drift WHERE group_name = ?", [group_name])}
