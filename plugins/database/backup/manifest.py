"""One record per backup: :class:`Backup`, written beside its file as the manifest.

``bot-db-2026-01-31_03-00-00.db.gz.manifest.json`` records the checksum and size of the file and
of the database inside it, when and why it was taken, the schema version and the rows per
table. A backup is listed only with its manifest; restore and verify compare against it.

It also records which checks the copy passed, and when. A SQLite backup is listed once
``quick_check`` passed (``quick_check_at``); ``integrity_check`` runs after, in the background
(``full_check``: pending -> passed | failed, ``full_check_at``, ``full_check_problem``). A
backup whose full check failed is damaged: listed apart, never counted, restored or rotated.
A manifest written before these fields existed reads as fully checked (``full_check``
"passed", no time): every backup then ran ``integrity_check`` before it was listed.
PostgreSQL backups are checked in full before they are listed (``pg_restore`` reads every
byte): "passed" at once.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..locks import open_private
from ..migrate.bookkeeping import BOOKKEEPING_TABLES

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = 1
FULL_CHECK_STATES = ("pending", "passed", "failed")
MAX_MANIFEST_BYTES = 1 << 20
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
    quick_check_at: str | None = None  # ISO time quick_check passed (SQLite; None: older)
    full_check: str = "passed"  # pending | passed | failed; absent (older manifests): passed
    full_check_at: str | None = None  # ISO time it passed or failed (None: pending, or older)
    full_check_problem: str | None = None  # what integrity_check found (failed)
    path: Path = field(default=Path(), compare=False)  # not saved: where the file is now

    @property
    def fully_checked(self) -> bool:
        """Whether ``integrity_check`` (or the engine's full check) passed on this copy."""
        return self.full_check == "passed"

    @property
    def full_check_text(self) -> str:
        """ "passed 2026-01-31 03:00 UTC", "pending", "FAILED ...", "passed (inline)"."""
        if self.full_check == "pending":
            return "pending"
        moment = _short_time(self.full_check_at) if self.full_check_at else None
        if self.full_check == "failed":
            return "FAILED" + (f" {moment}" if moment else "")
        return f"passed {moment}" if moment else "passed (inline)"

    @property
    def bot_tables(self) -> dict[str, int]:
        """The bot's tables and their rows, as the health check and /dbstats count them:
        dbkeeper's bookkeeping tables (migration history, version, size samples, ...) are
        backed up and verified like any table, but not counted."""
        return {t: n for t, n in self.tables.items() if t not in BOOKKEEPING_TABLES}

    @property
    def rows(self) -> int:
        """The rows of the bot's tables (``bot_tables``)."""
        return sum(self.bot_tables.values())

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
        """Parse a manifest; ``ValueError`` when it is not one this code understands.

        Every field is checked for its type: a manifest that parses is safe to list, sort,
        count and print (a damaged or hand-edited one never crashes a listing).
        """
        try:
            data: Any = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"not JSON ({getattr(error, 'msg', error)})") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError("not a dbkeeper backup manifest (format 1)")
        try:
            created = datetime.fromisoformat(data.pop("created_at"))
            if created.tzinfo is None:
                raise ValueError("created_at has no time zone")
            created = created.astimezone(UTC)
        except KeyError:
            raise ValueError("incomplete manifest (no created_at)") from None
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"created_at is not a time ({error})") from None
        known = {f.name for f in fields(cls)} - _NOT_SAVED - {"created_at"}
        values = {k: v for k, v in data.items() if k in known}
        missing = sorted(
            f.name
            for f in fields(cls)
            if f.name in known
            and f.name not in values
            and f.default is MISSING
            and f.default_factory is MISSING
        )
        if missing:
            raise ValueError(f"incomplete manifest (no {', '.join(missing)})")
        for key, value in values.items():
            if not _FIELD_CHECKS[key](value):
                raise ValueError(f"malformed manifest ({key} = {str(value)[:40]!r})")
        return cls(created_at=created, path=path, **values)


def _short_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso[:40]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _optional_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _mapping(check: Any) -> Any:
    return lambda value: (
        isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())
    )


_FIELD_CHECKS: dict[str, Any] = {
    "name": _text,
    "reason": _text,
    "compression": _text,
    "size_bytes": _count,
    "sha256": _text,
    "schema_version": _count,
    "tables": _mapping(_count),
    "duration_seconds": _number,
    "engine": _text,
    "content_bytes": _count,
    "content_sha256": _text,
    "schema_revision": _optional_text,
    "phases": _mapping(_number),
    "pending_compression": _optional_text,
    "source": _text,
    "tool": _text,
    "quick_check_at": _optional_text,
    "full_check": lambda value: value in FULL_CHECK_STATES,
    "full_check_at": _optional_text,
    "full_check_problem": _optional_text,
}


class BadManifest(ValueError):
    """A manifest is there but does not parse: its backup is not to be trusted."""

    def __init__(self, backup: Path, problem: str) -> None:
        super().__init__(f"its manifest {manifest_path(backup).name} cannot be read ({problem})")
        self.problem = problem


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.name + MANIFEST_SUFFIX)


def read_manifest(backup: Path) -> Backup | None:
    """The record of the backup file ``backup``; None when it has no manifest.

    A manifest that is there but does not parse raises :class:`BadManifest`: it is never
    taken for a missing one (that would skip the checksum of a backup copied in by hand).
    """
    path = manifest_path(backup)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        why = "a symbolic link" if error.errno == errno.ELOOP else error.strerror or str(error)
        raise BadManifest(backup, why) from None
    try:
        raw = os.read(fd, MAX_MANIFEST_BYTES + 1)  # a manifest is small; a huge file is not one
    except OSError as error:
        raise BadManifest(backup, error.strerror or str(error)) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadManifest(backup, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return Backup.from_json(raw.decode("utf-8"), backup)
    except UnicodeDecodeError:
        raise BadManifest(backup, "not UTF-8 text") from None
    except ValueError as error:
        raise BadManifest(backup, str(error)) from None


def write_manifest(backup: Backup, target: Path, scratch: Path) -> None:
    """Write ``target`` atomically through ``scratch`` (same directory): whole or not at all."""
    fd = open_private(scratch, new=True)
    try:
        os.write(fd, backup.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(scratch, target)
