"""The manifest beside each backup: what it holds and how to prove the file is still that.

``bot-db-2026-01-31_03-00-00.db.gz.manifest.json`` records the checksum and size of the file and
of the database inside it, when and why it was taken, the schema version and the rows per
table. A backup is listed only with its manifest; restore and verify compare against it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .compression import create_private, fsync_file

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    name: str
    created_at: datetime  # UTC, when the snapshot was taken
    reason: str  # scheduled | manual | pre-migration | pre-downgrade | pre-restore | shutdown
    engine: str  # sqlite | postgresql
    compression: str  # gzip | zstd | none | custom (pg_dump's own)
    size_bytes: int
    sha256: str
    content_bytes: int  # the database copy inside (equal to the file when not compressed)
    content_sha256: str
    schema_revision: str | None
    schema_version: int
    tables: dict[str, int]
    duration_seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    pending_compression: str | None = None  # kept raw at shutdown; compressed at the next start
    source: str = ""  # the database it came from, never with a password
    tool: str = ""  # what made the copy (SQLite version, pg_dump version)

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; ``ValueError`` when it is not one this code understands."""
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError("not a dbkeeper backup manifest (format 1)")
        try:
            created = datetime.fromisoformat(data.pop("created_at"))
            if created.tzinfo is None:
                raise ValueError("created_at has no time zone")
            known = set(cls.__dataclass_fields__)
            manifest = cls(created_at=created, **{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as error:
            raise ValueError(f"incomplete manifest ({error})") from None
        if not isinstance(manifest.tables, dict) or not isinstance(manifest.size_bytes, int):
            raise ValueError("malformed manifest")
        return manifest


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + MANIFEST_SUFFIX)


def read_manifest(backup: Path) -> Manifest | None:
    """The manifest of ``backup``; None when it is missing or unreadable."""
    try:
        return Manifest.from_json(manifest_path(backup).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_manifest(manifest: Manifest, target: Path, scratch: Path) -> None:
    """Write ``target`` atomically through ``scratch`` (same directory): whole or not at all."""
    with create_private(scratch) as out:
        out.write(manifest.to_json().encode())
        fsync_file(out)
    os.replace(scratch, target)
