"""One record per backup: :class:`Backup`, written beside its file as the manifest.

``bot-db-2026-01-31_03-00-00.db.gz.manifest.json`` records the checksum and size of the file and
of the database inside it, when and why it was taken, the schema version and the rows per
table. A backup is listed only with its manifest; restore and verify compare against it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from ..locks import open_private
from ..migrate.bookkeeping import UNCOUNTED_TABLES

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = 1
_NOT_SAVED = {"path"}


@dataclass(frozen=True)
class Backup:
    """A complete backup: what its manifest says, and where its file is."""

    name: str
    created_at: datetime  # UTC, when the snapshot was taken
    reason: str  # scheduled | manual | pre-migration | pre-downgrade | pre-restore | shutdown
    compression: str  # gzip | zstd | none | custom (pg_dump's own)
    size_bytes: int
    sha256: str
    schema_version: int
    tables: dict[str, int]
    duration_seconds: float
    engine: str = ""  # sqlite | postgresql
    content_bytes: int = 0  # the database copy inside (equal to the file when not compressed)
    content_sha256: str = ""
    schema_revision: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    pending_compression: str | None = None  # kept raw at shutdown; compressed at the next start
    source: str = ""  # the database it came from, never with a password
    tool: str = ""  # what made the copy (SQLite version, pg_dump version)
    path: Path = field(default=Path(), compare=False)  # not saved: where the file is now

    @property
    def rows(self) -> int:
        """The database's rows (dbkeeper's size history left out: ``UNCOUNTED_TABLES``)."""
        return sum(n for table, n in self.tables.items() if table not in UNCOUNTED_TABLES)

    def at(self, path: Path) -> Backup:
        """The same record, for the file at ``path``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["path"] = path
        return Backup(**values)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in _NOT_SAVED}
        data["created_at"] = self.created_at.isoformat()
        return json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path = Path()) -> Backup:
        """Parse a manifest; ``ValueError`` when it is not one this code understands."""
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error.msg})") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError("not a dbkeeper backup manifest (format 1)")
        try:
            created = datetime.fromisoformat(data.pop("created_at"))
            if created.tzinfo is None:
                raise ValueError("created_at has no time zone")
            known = {f.name for f in fields(cls)} - _NOT_SAVED
            backup = cls(
                created_at=created, path=path, **{k: v for k, v in data.items() if k in known}
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"incomplete manifest ({error})") from None
        if (
            not isinstance(backup.tables, dict)
            or not isinstance(backup.size_bytes, int)
            or not isinstance(backup.name, str)
            or not isinstance(backup.sha256, str)
            or not all(isinstance(v, int) for v in backup.tables.values())
        ):
            raise ValueError("malformed manifest")
        return backup


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + MANIFEST_SUFFIX)


def read_manifest(backup: Path) -> Backup | None:
    """The record of the backup file ``backup``; None when its manifest is missing or unreadable."""
    try:
        return Backup.from_json(manifest_path(backup).read_text(encoding="utf-8"), backup)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def write_manifest(backup: Backup, target: Path, scratch: Path) -> None:
    """Write ``target`` atomically through ``scratch`` (same directory): whole or not at all."""
    fd = open_private(scratch)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, backup.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(scratch, target)
