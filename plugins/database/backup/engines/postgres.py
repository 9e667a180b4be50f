"""PostgreSQL backups: ``pg_dump`` in custom format, proven by reading it all with ``pg_restore``.

The dump runs in a snapshot exported by a REPEATABLE READ transaction of our own
(``pg_export_snapshot`` and ``pg_dump --snapshot``), so the rows counted for the manifest are
exactly the rows in the dump. ``pg_restore --list`` only reads the table of contents (our
research: truncated and bit-flipped archives passed it), so a dump counts only after
``pg_restore -f /dev/null`` has read and decompressed every byte.

The tools get the connection through libpq's environment (PGHOST, PGUSER, PGPASSWORD, ...):
the password never appears on a command line, where ``ps`` would show it. ``pg_dump`` must be
at least the server's major version; a missing or older one is refused with both versions
named.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import zstandard
from sqlalchemy import Connection, Engine, text

from dbkeeper.logs import redact

from ...children import dies_with as _dies_with
from ...children import kill_group as _kill_group
from ...engines import create_database_engine, database_url, safe_url
from ...errors import BackupError, InvalidBackup
from ...settings import DatabaseSettings
from ..compression import (
    CHUNK,
    SUFFIXES,
    ZSTD_LEVEL,
    ZSTD_THREADS,
    Digest,
    create_private,
    fsync_file,
)
from ..store import remove
from .base import ContentFacts, Interrupted, Limits, Progress

POLL_SECONDS = 0.2
ZSTD_PG_DUMP = 16  # the first pg_dump with --compress=zstd
STAGING_PREFIX = ".dbkeeper-restore-"  # a compressed dump, decompressed for pg_restore
RESTORE_LOCK_TIMEOUT = "60s"  # pg_restore gives up (and rolls back) rather than wait forever
_VERSION = re.compile(r"\(PostgreSQL\)\s+((\d+)[\d.]*)")
_TOC_TABLE = re.compile(r"^\d+; \d+ \d+ TABLE (?!DATA )(\S+) (\S+) ")
# libpq query parameters that have an environment variable of their own
_PARAMETERS = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "options": "PGOPTIONS",
    "host": "PGHOST",
    "port": "PGPORT",
}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresBackupEngine:
    """``compression = "zstd"``: pg_dump 16 and later compress with zstd themselves (a
    ``.dump``); older ones write an uncompressed archive (``-Z0``) that the pipeline
    compresses like a SQLite copy (a ``.dump.zst``). Otherwise pg_dump's own zlib (``.dump``).
    """

    kind = "postgresql"
    raw_suffix = ".dump"
    can_set_aside = False  # a damaged server is PostgreSQL's to repair, not ours to rename
    reads_in_place = True  # an uncompressed dump is restored from the backup file: no staging copy

    def __init__(
        self,
        database: DatabaseSettings,
        *,
        bin_dir: str = "",
        compression: str = "gzip",
        compress_min_bytes: int = 0,
        staging_dir: Path | None = None,
    ) -> None:
        self.database = database
        self.url = database_url(database)
        self.bin_dir = bin_dir
        self.connect_timeout = database.connect_timeout_seconds
        self.staging_dir = staging_dir  # where a compressed dump is decompressed to restore it
        self.compress_min_bytes = compress_min_bytes
        # What ``_stream`` made of a raw copy it wrote: its check, and its zstd copy.
        self._checked: dict[Path, tuple[int, ContentFacts]] = {}
        self._streamed: dict[Path, tuple[Digest, Digest, Path]] = {}
        self.zstd = compression == "zstd"
        # Until pg_dump's version is known: an uncompressed archive for the pipeline's zstd.
        self.compressible = self.zstd
        self.raw_compression = "none" if self.zstd else "custom"
        self._tool = "pg_dump"

    # -- the live database --------------------------------------------------------------------

    def unavailable(self) -> str | None:
        return None

    def source(self) -> str:
        return safe_url(self.url)

    def live_exists(self) -> bool:
        return True

    def live_bytes(self) -> int:
        try:
            with self._connected() as connection:
                query = text("SELECT pg_database_size(current_database())")
                return int(connection.execute(query).scalar_one())
        except Exception:
            return 0

    def tool(self) -> str:
        return self._tool

    # -- the tools ----------------------------------------------------------------------------

    def program(self, name: str) -> str:
        """The path of ``pg_dump``/``pg_restore``; a clear error when it is not installed."""
        if self.bin_dir:
            path = Path(self.bin_dir) / name
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
            raise BackupError(
                f"{name} was not found in [backup] pg_bin_dir = {self.bin_dir}: install the "
                "PostgreSQL client tools there or point pg_bin_dir at their bin directory"
            )
        found = shutil.which(name)
        if found is None:
            raise BackupError(
                f"{name} was not found on PATH: install the PostgreSQL client tools (e.g. the "
                "postgresql-client package of your server's major version) or set "
                "[backup] pg_bin_dir"
            )
        return found

    @staticmethod
    def version(program: str) -> tuple[str, int]:
        """(``15.20``, 15) from ``pg_dump --version``."""
        try:
            result = subprocess.run(
                [program, "--version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError as error:
            raise BackupError(f"cannot run {program}: {error.strerror}") from error
        match = _VERSION.search(result.stdout)
        if result.returncode != 0 or match is None:
            output = (result.stdout + result.stderr).strip()[:200]
            raise BackupError(f"{program} --version did not report a version ({output!r})")
        return match.group(1), int(match.group(2))

    def _environment(self) -> dict[str, str]:
        url = self.url
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        values = {
            "PGHOST": url.host or "",
            "PGPORT": str(url.port or ""),
            "PGUSER": url.username or "",
            "PGPASSWORD": str(url.password or ""),
            "PGDATABASE": url.database or "",
            "PGCONNECT_TIMEOUT": str(max(1, round(self.connect_timeout))),
            "PGAPPNAME": "dbkeeper-backup",
        }
        for key, variable in _PARAMETERS.items():
            value = url.query.get(key)
            if value:
                values[variable] = value if isinstance(value, str) else value[0]
        environment.update({k: v for k, v in values.items() if v})
        return environment

    def _run(
        self,
        args: list[str],
        limits: Limits,
        *,
        failure: Callable[[str], Exception],
        watch: Callable[[], None] | None = None,
        environment: dict[str, str] | None = None,
    ) -> str:
        """Run a tool to completion (or until ``limits`` stop it); return its stdout.

        The tool dies with this process: it runs in a process group of its own, killed
        whole on any failure here, and the kernel kills it when we die (a killed
        ``backup restore`` never leaves a ``pg_restore`` replacing the database behind it).
        """
        process = subprocess.Popen(
            args,
            env=environment or self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
            preexec_fn=_dies_with(os.getpid()),
        )
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    if watch is not None:
                        watch()
                    why = limits.stopped()
                    if why:
                        raise Interrupted(why) from None
        except BaseException:
            _kill_group(process)
            raise
        if process.returncode != 0:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            raise failure(redact("; ".join(lines[-3:]) or f"exit status {process.returncode}"))
        return stdout

    @contextlib.contextmanager
    def _connected(self, limits: Limits | None = None) -> Iterator[Connection]:
        """A connection whose connect wait also ends with the backup's deadline (shutdown)."""
        timeout = self.connect_timeout
        remaining = limits.remaining() if limits is not None else None
        if remaining is not None:
            timeout = min(timeout, remaining)
        engine: Engine = create_database_engine(self.database, "tool", timeout=timeout)
        try:
            with engine.connect() as connection:
                yield connection
        finally:
            engine.dispose()

    # -- taking a copy ------------------------------------------------------------------------

    def snapshot(self, target: Path, progress: Progress, limits: Limits) -> ContentFacts:
        pg_dump = self.program("pg_dump")
        dump_version, dump_major = self.version(pg_dump)
        self._tool = f"pg_dump {dump_version}"
        compress = self._compress_option(dump_major)
        with self._connected(limits) as connection:
            server = connection.execute(text("SHOW server_version")).scalar_one()
            server_major = int(connection.execute(text("SHOW server_version_num")).scalar_one())
            server_major //= 10000
            if dump_major < server_major:
                raise BackupError(
                    f"pg_dump {dump_version} ({pg_dump}) cannot back up this PostgreSQL "
                    f"{server} server: pg_dump must be of the server's major version "
                    f"({server_major}) or newer. Install postgresql-client-{server_major} and "
                    "point [backup] pg_bin_dir at its bin directory"
                )
            connection.rollback()  # end the implicit transaction: the snapshot needs its own
            snapshot = connection.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            with snapshot.begin():
                exported = snapshot.execute(text("SELECT pg_export_snapshot()")).scalar_one()
                command = [pg_dump, "--format=custom", *compress, f"--snapshot={exported}"]
                command.append("--no-password")
                if self.compressible and limits.deadline is None:
                    facts = self._stream(command, snapshot, target, progress, limits)
                    progress("snapshot", _size_of(target), _size_of(target))
                    return facts
                facts = self._facts(snapshot)
                self._run(
                    [*command, f"--file={target}"],
                    limits,
                    failure=lambda why: BackupError(f"pg_dump failed: {why}"),
                    watch=lambda: progress("snapshot", _size_of(target), None),
                )
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
        progress("snapshot", _size_of(target), _size_of(target))
        return facts

    def _stream(
        self,
        command: list[str],
        snapshot: Connection,
        target: Path,
        progress: Progress,
        limits: Limits,
    ) -> ContentFacts:
        """pg_dump's archive, as it comes, into ``target``, into zstd and into ``pg_restore -f
        /dev/null`` at once, while the rows are counted in the same snapshot: the dump, its
        compression and its check overlap as in ``pg_dump | tee >(pg_restore) | zstd``.

        The compressed copy waits beside ``target`` for the pipeline (``packed_copy``), and
        ``check`` answers for this very file without reading it again. ``target`` is fsynced
        only when the pipeline keeps it raw (smaller than ``compress_min_bytes``).
        """
        packed = target.with_name(target.name + SUFFIXES["zstd"])
        check = [self.program("pg_restore"), "--file=/dev/null"]  # reads its stdin
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with contextlib.ExitStack() as stack:
            errors = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(2)]
            dump = self._spawn(command, self._environment(), stdout=subprocess.PIPE, err=errors[0])
            stack.callback(_end, dump)
            reader = self._spawn(check, clean, stdin=subprocess.PIPE, err=errors[1])
            stack.callback(_end, reader)
            try:
                with ThreadPoolExecutor(1, thread_name_prefix="dbkeeper-backup-rows") as pool:
                    counting = pool.submit(self._facts, snapshot)
                    content, file = _tee(dump, reader, target, packed, progress, limits)
                    facts = counting.result()
                dump.wait()
                reader.wait()
            except BaseException:
                remove(packed)
                raise
            if dump.returncode != 0:
                remove(packed)
                raise BackupError(f"pg_dump failed: {_last_lines(errors[0], dump.returncode)}")
            if reader.returncode != 0:
                remove(packed)
                why = _last_lines(errors[1], reader.returncode)
                raise InvalidBackup(f"is damaged: pg_restore cannot read it all ({why})")
        if content.bytes < self.compress_min_bytes:  # it stays raw: the backup is this file
            remove(packed)
            with open(target, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            self._streamed[target] = (content, file, packed)
        self._checked[target] = (content.bytes, facts)
        return facts

    def _spawn(
        self,
        command: list[str],
        environment: dict[str, str],
        *,
        err: IO[bytes],
        stdin: int = subprocess.DEVNULL,
        stdout: int = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """A tool in a process group of its own that dies with this process (see ``_run``)."""
        return subprocess.Popen(
            command,
            env=environment,
            stdin=stdin,
            stdout=stdout,
            stderr=err,
            process_group=0,
            preexec_fn=_dies_with(os.getpid()),
        )

    def packed_copy(self, raw: Path, packed: Path, codec: str) -> tuple[Digest, Digest] | None:
        """The zstd copy ``snapshot`` made of ``raw`` while it was taken, moved to ``packed``;
        (content, file) digests. None: there is none, the pipeline compresses ``raw``."""
        made = self._streamed.pop(raw, None)
        if made is None or codec != "zstd":
            return None
        content, file, source = made
        os.replace(source, packed)
        return content, file

    def _compress_option(self, dump_major: int) -> list[str]:
        """pg_dump's ``--compress``; sets what the pipeline does with the archive it writes."""
        if not self.zstd:
            self.compressible, self.raw_compression = False, "custom"
            return []  # pg_dump's own zlib
        if dump_major >= ZSTD_PG_DUMP:
            self.compressible, self.raw_compression = False, "custom-zstd"
            return ["--compress=zstd"]
        self.compressible, self.raw_compression = True, "none"
        return ["--compress=0"]

    @staticmethod
    def _facts(connection: Connection) -> ContentFacts:
        """The revision and the rows of every table, in the dump's snapshot."""
        current = connection.execute(text("SELECT current_schema()")).scalar_one()
        rows = connection.execute(
            text(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN "
                "('pg_catalog', 'information_schema') ORDER BY schemaname, tablename"
            )
        ).all()
        tables: dict[str, int | None] = {}
        for schema, table in rows:
            name = table if schema == current else f"{schema}.{table}"
            query = f"SELECT count(*) FROM {_quoted(schema)}.{_quoted(table)}"
            tables[name] = int(connection.execute(text(query)).scalar_one())
        revision = None
        if "alembic_version" in tables:
            revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return ContentFacts(revision, tables)

    # -- proving a copy sound -----------------------------------------------------------------

    def check(self, raw: Path, progress: Progress, limits: Limits) -> ContentFacts:
        """The table of contents, every byte through ``pg_restore -f /dev/null``, the revision."""
        if raw.stat().st_size == 0:
            raise InvalidBackup("is empty (0 bytes)")
        checked = self._checked.pop(raw, None)
        if checked is not None and checked[0] == raw.stat().st_size:
            return checked[1]  # read in full by pg_restore as it was written (``_stream``)
        pg_restore = self.program("pg_restore")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        size = raw.stat().st_size
        progress("check", 0, size)
        toc = self._run(
            [pg_restore, "--list", str(raw)],
            limits,
            failure=lambda why: InvalidBackup(f"is not a readable pg_dump archive ({why})"),
            environment=environment,
        )
        self._run(
            [pg_restore, "--file=/dev/null", str(raw)],
            limits,
            failure=lambda why: InvalidBackup(f"is damaged: pg_restore cannot read it all ({why})"),
            environment=environment,
        )
        tables: dict[str, int | None] = {}
        for line in toc.splitlines():
            match = _TOC_TABLE.match(line)
            if match:
                schema, table = match.groups()
                tables[table if schema == "public" else f"{schema}.{table}"] = None
        revision = None
        if "alembic_version" in tables:
            data = self._run(
                [pg_restore, "--data-only", "--table=alembic_version", "--file=-", str(raw)],
                limits,
                failure=lambda why: InvalidBackup(f"is damaged ({why})"),
                environment=environment,
            )
            revision = _copy_first_value(data)
        progress("check", size, size)
        return ContentFacts(revision, tables)

    # -- restoring ----------------------------------------------------------------------------

    def staging(self) -> Path | None:
        """Where a compressed dump is decompressed for pg_restore (an uncompressed one is read
        where it is: ``reads_in_place``): a private file of the backup directory, removed after
        the restore; ``leftovers`` names what a crash left. Not the store's temporary prefix:
        the safety backup would remove it while the restore holds it. None: no backup
        directory is known (pg_restore reads the backup file itself)."""
        if self.staging_dir is None:
            return None
        name = f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{self.raw_suffix}"
        return self.staging_dir / name

    def replace_live(self, raw: Path) -> None:
        """One transaction: every object of the dump dropped and recreated, or nothing.

        A staging copy (``staging``) is removed once pg_restore is done with it, whatever it
        did: unlike SQLite's, it never becomes the live database."""
        try:
            self._restore(raw)
        finally:
            if raw.name.startswith(STAGING_PREFIX):
                remove(raw)

    def _restore(self, raw: Path) -> None:
        pg_restore = self.program("pg_restore")
        environment = self._environment()
        options = environment.get("PGOPTIONS", "")
        environment["PGOPTIONS"] = f"{options} -c lock_timeout={RESTORE_LOCK_TIMEOUT}".strip()
        self._run(
            [
                pg_restore,
                "--clean",
                "--if-exists",
                "--single-transaction",
                "--no-owner",
                "--no-password",
                f"--dbname={self.url.database}",
                str(raw),
            ],
            Limits(),
            failure=lambda why: BackupError(f"pg_restore failed and rolled back: {why}"),
            environment=environment,
        )

    def set_aside(self, label: str) -> list[Path]:
        raise NotImplementedError

    def put_back(self, paths: list[Path]) -> None:
        pass

    def in_use_elsewhere(self) -> str | None:
        return None  # a server serves every instance; pg_restore runs in one transaction

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def leftovers(self) -> list[Path]:
        if self.staging_dir is None or not self.staging_dir.is_dir():
            return []
        return sorted(self.staging_dir.glob(f"{STAGING_PREFIX}*"))

    def side_file(self, suffix: str) -> None:
        return None


def _tee(
    dump: subprocess.Popen[bytes],
    reader: subprocess.Popen[bytes],
    target: Path,
    packed: Path,
    progress: Progress,
    limits: Limits,
) -> tuple[Digest, Digest]:
    """pg_dump's stdout into ``target``, pg_restore's stdin and zstd (``packed``, fsynced);
    (content, file) digests. A pg_restore that stops reading early is left to its exit status."""
    assert dump.stdout is not None and reader.stdin is not None
    content, written = hashlib.sha256(), hashlib.sha256()
    sizes = [0, 0]
    compressor = zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, write_checksum=True, threads=ZSTD_THREADS
    )
    stream = compressor.compressobj()
    feeding = True
    with open(target, "wb") as raw, create_private(packed) as out:

        def emit(data: bytes) -> None:
            if data:
                written.update(data)
                sizes[1] += len(data)
                out.write(data)

        while chunk := dump.stdout.read(CHUNK):
            limits.check()
            raw.write(chunk)
            if feeding:
                try:
                    reader.stdin.write(chunk)
                except BrokenPipeError:  # it failed; its exit status says why
                    feeding = False
            content.update(chunk)
            sizes[0] += len(chunk)
            emit(stream.compress(chunk))
            progress("snapshot", sizes[0], None)
        emit(stream.flush())
        with contextlib.suppress(BrokenPipeError):
            reader.stdin.close()
        fsync_file(out)
    return Digest(sizes[0], content.hexdigest()), Digest(sizes[1], written.hexdigest())


def _end(process: subprocess.Popen[bytes]) -> None:
    """A tool still running when we leave (a failure, an interruption) is killed; pipes closed."""
    if process.poll() is None:
        _kill_group(process)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _last_lines(errors: IO[bytes], status: int | None) -> str:
    errors.seek(0)
    text = errors.read()[-4000:].decode(errors="replace")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return redact("; ".join(lines[-3:]) or f"exit status {status}")


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _copy_first_value(data: str) -> str | None:
    """The first value of the first ``COPY ... FROM stdin`` block of a data-only script."""
    lines = iter(data.splitlines())
    for line in lines:
        if line.startswith("COPY "):
            value = next(lines, "\\.")
            return None if value == "\\." else value.split("\t")[0]
    return None
