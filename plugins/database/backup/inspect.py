"""Proving a backup file is what it claims to be, and fit to replace the live database.

Checks run cheapest first, so the message names the first thing wrong: a bad name or an empty
file, then the file's size and sha256 against its manifest, then the whole content through the
decompressor (whose own checks catch truncation and flipped bits), then the engine's check of
the database inside (SQLite's integrity check, every byte through ``pg_restore``), then the
rows and revision against the manifest, then whether this code may run on that schema.
Backups without a manifest (copied in by hand) get every check but the checksums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidBackup
from ..migrate.bookkeeping import HISTORY_TABLE, VERSION_TABLE
from .compression import (
    SUFFIXES,
    CorruptData,
    codec_for_suffix,
    create_private,
    decompress,
    hash_file,
)
from .engines.base import BackupEngine, ContentFacts, Limits, Progress
from .manifest import Backup


class RevisionSource(Protocol):
    """The revisions this code knows (``migrate.Revisions``)."""

    def all(self) -> list[Any]: ...  # objects with .id and .version

    def version_of(self, revision_id: str | None) -> int: ...


class BackupInspector:
    def __init__(self, engine: BackupEngine, schema: RevisionSource) -> None:
        self.engine = engine
        self.schema = schema

    def inspect(
        self,
        path: Path,
        manifest: Backup | None,
        target: Path | None,
        progress: Progress,
        limits: Limits,
    ) -> tuple[Path, ContentFacts]:
        """Every check; returns the raw copy (``target`` or ``path`` itself) and what it holds."""
        raw = self.unpack(path, manifest, target, progress, limits)
        facts = self.engine.check(raw, progress, limits)
        self.compare(path.name, manifest, facts)
        self.admissible(path.name, facts)
        return raw, facts

    def unpack(
        self,
        path: Path,
        manifest: Backup | None,
        target: Path | None,
        progress: Progress,
        limits: Limits,
    ) -> Path:
        """Prove ``path`` is what its manifest says, and give its raw content as a file.

        The raw content is written to ``target`` when the backup is compressed (or when a
        target is given for an uncompressed one); else the backup file itself is the raw copy.
        """
        name = path.name
        size = path.stat().st_size
        if size == 0:
            raise InvalidBackup(f"{name} is empty (0 bytes)")
        codec = codec_for_suffix(name)
        dump = name.removesuffix(SUFFIXES[codec]).endswith(".dump")
        if dump != (self.engine.raw_suffix == ".dump"):
            theirs = "PostgreSQL" if dump else "SQLite"
            raise InvalidBackup(
                f"{name} is a {theirs} backup, and this database is {self.engine.kind}"
            )
        if manifest is not None:
            if manifest.size_bytes != size:
                raise InvalidBackup(
                    f"{name} is {size} bytes but its manifest says {manifest.size_bytes}: the "
                    "file was truncated or replaced since it was made"
                )
            digest = hash_file(path, lambda done: progress("checksum", done, size), limits.check)
            if digest.sha256 != manifest.sha256:
                raise InvalidBackup(
                    f"{name} does not match its manifest: its sha256 is {digest.sha256[:16]}…, "
                    f"the manifest says {manifest.sha256[:16]}…; the file is damaged"
                )
        in_place = getattr(self.engine, "reads_in_place", False)  # pg_restore reads a .dump
        if codec == "none" and (target is None or in_place):
            return path
        if target is None:
            raise ValueError("a compressed backup needs a target to decompress into")
        try:
            with create_private(target) as sink:
                _, content = decompress(
                    path,
                    codec,
                    sink,
                    progress=lambda done: progress("decompress", done, size),
                    check=limits.check,
                )
                sink.flush()
        except CorruptData as error:
            raise InvalidBackup(f"{name} is damaged: {error}") from None
        if manifest is not None and content.sha256 != manifest.content_sha256:
            raise InvalidBackup(
                f"{name} decompresses to data whose sha256 differs from the manifest's: the "
                "backup is damaged"
            )
        return target

    def compare(self, name: str, manifest: Backup | None, facts: ContentFacts) -> None:
        if manifest is None:
            return
        differences = [
            f"{table}: {manifest.tables.get(table)} rows in the manifest, {count} found"
            for table, count in facts.tables.items()
            if count is not None and manifest.tables.get(table) != count
        ]
        if manifest.schema_revision != facts.revision:
            differences.append(
                f"revision {facts.revision!r}, the manifest says {manifest.schema_revision!r}"
            )
        if differences:
            raise InvalidBackup(
                f"{name} does not hold what its manifest says: " + "; ".join(differences)
            )

    def admissible(self, name: str, facts: ContentFacts) -> None:
        """Only a database of this bot, at a schema this code knows, may replace the live one."""
        missing = [t for t in (HISTORY_TABLE, VERSION_TABLE) if t not in facts.tables]
        if missing or facts.revision is None:
            tables = ", ".join(sorted(facts.tables)[:8]) or "none"
            raise InvalidBackup(
                f"{name} is not a backup of this bot's database: it has no "
                f"{' and no '.join(missing) or 'schema version'} (its tables: {tables})"
            )
        revisions = self.schema.all()
        known = {revision.id for revision in revisions}
        if facts.revision in known:
            return
        head = revisions[-1] if revisions else None
        head_text = f"v{head.version} ({head.id})" if head else "no revisions"
        if facts.revision.isdigit() and (head is None or int(facts.revision) > head.version):
            raise InvalidBackup(
                f"{name} is at schema v{int(facts.revision)} ({facts.revision}), newer than this "
                f"code knows (its head is {head_text}): restore it with the newer code, or pick "
                "an older backup"
            )
        raise InvalidBackup(
            f"{name} is at revision {facts.revision!r}, which is not among this code's "
            f"revisions (head {head_text})"
        )
