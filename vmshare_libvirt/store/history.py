"""Patch history and the overlays a member left behind on older generations."""

from __future__ import annotations

import time
from typing import Any

from .base import StoreBase, dumps
from .records import KeptOverlay, PatchRecord

_PATCH_COLUMNS = "id, name, digest, manifest_path, group_name, op_id, generation_id, at, results_json"
_KEPT_COLUMNS = "path, disk_path, generation_id, op_id, kept_at"


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
