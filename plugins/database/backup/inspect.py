"""Proving a backup file is what it claims to be, and fit to replace the live database.

Checks run cheapest first, so the message names the first thing wrong: a bad name or an empty
file, then the file's size, then the whole content through the decompressor (whose own checks
catch truncation and flipped bits) with the sha256 of the file and of the content taken on the
way and compared with the manifest (a damaged file is named as not the manifest's), then the
engine's check of the database inside (SQLite's integrity check, every byte through
``pg_restore``), then the rows and revision against the manifest, then whether this code may
run on that schema. Backups without a manifest (copied in by hand) get every check but the
checksums. A restore (``trust``) skips the engine's check of a backup whose manifest says it
passed it: the two sha256 prove the staged copy holds exactly the bytes that were checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidBackup
from ..migrate.bookkeeping import HISTORY_TABLE, VERSION_TABLE
from .compression import (
    SUFFIXES,
    CorruptData,
    Digest,
    codec_for_suffix,
    create_private,
    decompress,
    hash_file,
)
from .engines.base import BackupEngine, ContentFacts, Limits, Progress
from .manifest import Backup

# The phase a restore records for the database it replaced, kept as it was (``restore.py``):
# that copy was never checked.
SET_ASIDE_PHASE = "set aside"


def trusted(manifest: Backup) -> bool:
    """Whether ``manifest`` says its content passed the full check, so that matching file and
    content sha256 prove a copy holds those very bytes (no need to check it again).

    The manifest's own record of its checks (issue 14, part A) decides once it is there;
    until then, every backup dbkeeper took passed the full check before it was listed,
    except the replaced database a restore set aside.
    """
    checked = getattr(manifest, "fully_checked", None)
    if isinstance(checked, bool):
        return checked
    return SET_ASIDE_PHASE not in manifest.phases


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
        *,
        trust: bool = False,
    ) -> tuple[Path, ContentFacts]:
        """Every check; returns the raw copy (``target`` or ``path`` itself) and what it holds.

        ``trust``: a backup whose manifest says its content passed the full check is not
        checked again once its file and content sha256 match the manifest (``trusted``).
        """
        raw = self.unpack(path, manifest, target, progress, limits)
        if trust and manifest is not None and trusted(manifest):
            facts = ContentFacts(manifest.schema_revision, dict(manifest.tables))
        else:
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
        if manifest is not None and manifest.size_bytes != size:
            raise InvalidBackup(
                f"{name} is {size} bytes but its manifest says {manifest.size_bytes}: the "
                "file was truncated or replaced since it was made"
            )
        if codec == "none" and (target is None or self.engine.reads_in_place):
            if manifest is not None:
                self._same_file(path, manifest, self._hash(path, size, progress, limits))
            return path
        if target is None:
            raise ValueError("a compressed backup needs a target to decompress into")
        # One pass: the file's sha256 is taken while it is decompressed.
        try:
            with create_private(target) as sink:
                file, content = decompress(
                    path,
                    codec,
                    sink,
                    progress=lambda done: progress("decompress", done, size),
                    check=limits.check,
                )
                sink.flush()
        except CorruptData as error:
            if manifest is not None:  # a damaged file: say that it is not the manifest's
                self._same_file(path, manifest, self._hash(path, size, progress, limits))
            raise InvalidBackup(f"{name} is damaged: {error}") from None
        if manifest is not None:
            self._same_file(path, manifest, file)
            if content.sha256 != manifest.content_sha256:
                raise InvalidBackup(
                    f"{name} decompresses to data whose sha256 differs from the manifest's: "
                    "the backup is damaged"
                )
        return target

    @staticmethod
    def _hash(path: Path, size: int, progress: Progress, limits: Limits) -> Digest:
        return hash_file(path, lambda done: progress("checksum", done, size), limits.check)

    @staticmethod
    def _same_file(path: Path, manifest: Backup, digest: Digest) -> None:
        if digest.sha256 != manifest.sha256:
            raise InvalidBackup(
                f"{path.name} does not match its manifest: its sha256 is {digest.sha256[:16]}…, "
                f"the manifest says {manifest.sha256[:16]}…; the file is damaged"
            )

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
