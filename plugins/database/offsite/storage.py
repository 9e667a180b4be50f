"""Where off-site copies live: one small interface, two implementations.

``ObjectStorage`` stores named objects under one place (``<[offsite] url>/backups/``): ``put``
(streamed from a file), ``open`` (a stream to read), ``head``, ``list``, ``delete``. Keys are
plain names (``bot-db-2026-01-31_03-00-00.db.gz.age``), never paths.

* ``DirectoryStorage`` (``file:///mnt/other-disk/bot``): another disk of this machine. The
  configured directory must exist (an unmounted disk must not silently become a directory on
  the root disk); ``backups/`` is created in it, owner-only. An object is written under a
  temporary name, fsynced and renamed: whole or absent.
* ``S3Storage`` (``s3://bucket/prefix``): any S3-compatible service through boto3, with
  ``[offsite] endpoint`` (path-style addressing then, as most S3-compatible servers want),
  the region, server-side encryption passed through (SSE-KMS key id, or an SSE-C key), every
  request bounded (``timeout_seconds``, 3 attempts; fewer under a deadline). Credentials come
  from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN`` too) and are
  handed to the client directly: no credential files, no instance metadata service. They
  join the log redaction; botocore's own loggers stay at WARNING (at DEBUG they would print
  request headers).

Every failure is a ``StorageError`` whose message says what failed where, without secrets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from dbkeeper.logs import SECRETS, redact

from ..errors import BackupError
from ..locks import check_directory, open_private
from ..settings import OffsiteLocation, OffsiteSettings, read_sse_customer_key

log = logging.getLogger("dbkeeper.offsite")
CHUNK = 1 << 20
PLACE = "backups"
MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNK = 8 << 20
MULTIPART_BUFFERED = 4  # parts read ahead of the upload: memory stays near 32 MiB
CONNECT_TIMEOUT_SECONDS = 10.0
Check = Callable[[], None]  # raises to give up (a deadline, a stop request)

for _name in ("botocore", "boto3", "s3transfer", "urllib3"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class StorageError(BackupError):
    """The off-site storage refused or failed; the message says what and where."""


class ObjectMissing(StorageError):
    """The object is not there."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: datetime


class ObjectStorage(Protocol):
    where: str  # the place as people see it: s3://bucket/prefix/backups, file:///...

    def put(self, key: str, source: BinaryIO, *, check: Check | None = None) -> None:
        """Store what ``source`` (a file, from its start) holds as ``key``, streamed; an
        older object of that name is replaced."""

    def open(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A stream of ``key``'s bytes (``ObjectMissing`` when it is not there)."""

    def head(self, key: str) -> StoredObject | None:
        """The object's size and time; None when it is not there."""

    def list(self) -> list[StoredObject]:
        """Every object of the place (temporary ones excluded)."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing when it is not there)."""


def _plain(key: str) -> str:
    if not key or "/" in key or key.startswith(".") or "\\" in key:
        raise ValueError(f"not an object name: {key!r}")
    return key


def open_storage(
    settings: OffsiteSettings,
    *,
    environ: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> ObjectStorage:
    """The storage ``[offsite] url`` names (``StorageError`` when it cannot be used at all).

    ``timeout``: an upper bound for each request (what is left of a deadline): one attempt.
    """
    location = settings.location
    if location is None:
        raise StorageError("off-site copies are off ([offsite] url is empty)")
    if location.scheme == "file":
        return DirectoryStorage(location)
    return S3Storage(settings, location, os.environ if environ is None else environ, timeout)


# -- a directory ----------------------------------------------------------------------------------


class DirectoryStorage:
    """Objects as files in ``<directory>/backups/``."""

    def __init__(self, location: OffsiteLocation) -> None:
        self.base = location.directory()
        self.directory = location.directory(PLACE)
        self.where = location.url_for(PLACE)

    def _ready(self) -> None:
        if not self.base.is_dir():
            raise StorageError(
                f"the off-site directory {self.base} does not exist (is its disk mounted?); "
                "dbkeeper creates only backups/ inside it"
            )
        check_directory(self.directory, "the off-site directory")
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create {self.directory}: {error.strerror}") from None

    def put(self, key: str, source: BinaryIO, *, check: Check | None = None) -> None:
        target = self.directory / _plain(key)
        try:
            self._ready()
            temporary = self.directory / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            fd = open_private(temporary, new=True)
            try:
                with os.fdopen(fd, "wb", closefd=False) as sink:
                    while chunk := source.read(CHUNK):
                        if check is not None:
                            check()
                        sink.write(chunk)
                    sink.flush()
                    os.fsync(fd)
                os.replace(temporary, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    temporary.unlink()
                raise
            finally:
                os.close(fd)
            _fsync_directory(self.directory)
        except OSError as error:
            raise StorageError(f"cannot write {target}: {_os_reason(error)}") from None

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        path = self.directory / _plain(key)
        if not self.base.is_dir():
            raise StorageError(
                f"the off-site directory {self.base} does not exist (is its disk mounted?)"
            )
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.where}/{key} does not exist") from None
        except OSError as error:
            raise StorageError(f"cannot read {path}: {_os_reason(error)}") from None
        with os.fdopen(fd, "rb") as stream:
            yield stream

    def head(self, key: str) -> StoredObject | None:
        try:
            info = os.lstat(self.directory / _plain(key))
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StorageError(f"cannot read {self.directory}: {_os_reason(error)}") from None
        if not stat.S_ISREG(info.st_mode):
            return None
        return StoredObject(key, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))

    def list(self) -> list[StoredObject]:
        if not self.base.is_dir():
            self._ready()  # says why
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as error:
            raise StorageError(f"cannot list {self.directory}: {_os_reason(error)}") from None
        found = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
            found.append(
                StoredObject(entry.name, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))
            )
        return found

    def delete(self, key: str) -> None:
        try:
            (self.directory / _plain(key)).unlink()
            _fsync_directory(self.directory)
        except FileNotFoundError:
            return
        except OSError as error:
            raise StorageError(f"cannot delete {self.where}/{key}: {_os_reason(error)}") from None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_reason(error: OSError) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the off-site disk"
    return error.strerror or str(error)


# -- S3 -------------------------------------------------------------------------------------------


class S3Storage:
    """Objects under ``s3://bucket/prefix/backups/`` through boto3."""

    def __init__(
        self,
        settings: OffsiteSettings,
        location: OffsiteLocation,
        environ: Mapping[str, str],
        timeout: float | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        access_key = environ.get("AWS_ACCESS_KEY_ID", "")
        secret_key = environ.get("AWS_SECRET_ACCESS_KEY", "")
        token = environ.get("AWS_SESSION_TOKEN") or None
        if not access_key or not secret_key:
            raise StorageError(
                f"[offsite] url is {location.url_for()}, but the credentials are not set: "
                "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for dbkeeper (they are "
                "read from the environment only, never from a file)"
            )
        SECRETS.add(access_key, secret_key, token)
        self.bucket = location.bucket
        self.prefix = location.key(PLACE) + "/"
        self.where = location.url_for(PLACE)
        self.endpoint = settings.endpoint
        bounded = timeout is not None and timeout < settings.timeout_seconds
        read_timeout = max(1.0, min(settings.timeout_seconds, timeout or settings.timeout_seconds))
        config = Config(
            region_name=settings.region,
            connect_timeout=min(CONNECT_TIMEOUT_SECONDS, read_timeout),
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1 if bounded else 3, "mode": "standard"},
            s3={"addressing_style": "path" if settings.endpoint else "auto"},
            user_agent_extra="dbkeeper",
        )
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint or None,
            region_name=settings.region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=token,
            config=config,
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=2,
        )
        self.transfer.max_in_memory_upload_chunks = MULTIPART_BUFFERED
        self.write_args: dict[str, Any] = {}
        self.read_args: dict[str, Any] = {}
        if settings.sse_kms_key_id:
            self.write_args = {"ServerSideEncryption": "aws:kms"}
            self.write_args["SSEKMSKeyId"] = settings.sse_kms_key_id
        elif settings.sse_customer_key_path:
            try:
                key = read_sse_customer_key(settings.sse_customer_key_path)
            except ValueError as error:
                raise StorageError(
                    f"[offsite] sse_customer_key_path {settings.sse_customer_key_path}: {error}"
                ) from None
            import base64

            SECRETS.add(base64.b64encode(key).decode())
            self.read_args = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}
            self.write_args = dict(self.read_args)

    def _key(self, key: str) -> str:
        return self.prefix + _plain(key)

    def put(self, key: str, source: BinaryIO, *, check: Check | None = None) -> None:
        def progress(_: int) -> None:
            if check is not None:
                check()

        with self._errors(f"uploading {key} to"):
            self.client.upload_fileobj(
                source,
                self.bucket,
                self._key(key),
                ExtraArgs=self.write_args or None,
                Config=self.transfer,
                Callback=progress,
            )

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        with self._errors(f"reading {key} from"):
            try:
                answer = self.client.get_object(
                    Bucket=self.bucket, Key=self._key(key), **self.read_args
                )
            except Exception as error:
                if _status(error) == 404:
                    raise ObjectMissing(f"{self.where}/{key} does not exist") from None
                raise
            body = answer["Body"]
            try:
                yield body
            finally:
                body.close()

    def head(self, key: str) -> StoredObject | None:
        with self._errors(f"looking up {key} in"):
            try:
                answer = self.client.head_object(
                    Bucket=self.bucket, Key=self._key(key), **self.read_args
                )
            except Exception as error:
                if _status(error) == 404:
                    return None
                raise
        return StoredObject(key, int(answer["ContentLength"]), answer["LastModified"])

    def list(self) -> list[StoredObject]:
        found = []
        with self._errors("listing"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix) :]
                    if name and "/" not in name and not name.startswith("."):
                        found.append(StoredObject(name, int(item["Size"]), item["LastModified"]))
        return found

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key} from"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """botocore's exceptions -> ``StorageError`` naming what failed, where, and why."""
        try:
            yield
        except StorageError:
            raise
        except Exception as error:
            if not _is_storage_error(error):
                raise
            raise StorageError(f"{doing} {self.where} failed: {self._reason(error)}") from None

    def _reason(self, error: BaseException) -> str:
        from botocore import exceptions as boto

        endpoint = self.endpoint or "AWS S3"
        known = (
            boto.ClientError,
            boto.EndpointConnectionError,
            boto.ConnectionClosedError,
            boto.ConnectTimeoutError,
            boto.ReadTimeoutError,
        )
        cause: BaseException | None = error  # boto3 wraps a ClientError in its own errors
        while cause is not None and not isinstance(cause, known):
            cause = cause.__cause__ or cause.__context__
        cause = cause or error
        if isinstance(cause, boto.ClientError):
            detail = cause.response.get("Error", {})
            code = str(detail.get("Code") or _status(cause) or "error")
            message = " ".join(str(detail.get("Message") or "").split())[:200]
            hint = _CLIENT_HINTS.get(code, "")
            if code == "NoSuchBucket":
                hint = f"; create the bucket {self.bucket} first"
            text = f"{code}{': ' + message if message else ''}{hint}"
        elif isinstance(cause, boto.EndpointConnectionError | boto.ConnectionClosedError):
            text = f"cannot reach {endpoint} ({_short(cause)})"
        elif isinstance(cause, boto.ConnectTimeoutError | boto.ReadTimeoutError):
            text = f"{endpoint} did not answer in time ({_short(cause)})"
        else:
            text = f"{type(cause).__name__}: {_short(cause)}"
        return redact(text)


_CLIENT_HINTS = {
    "AccessDenied": "; check the permissions of the credentials on the bucket",
    "InvalidAccessKeyId": "; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "; check AWS_SECRET_ACCESS_KEY",
}


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def _is_storage_error(error: BaseException) -> bool:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(error, BotoCoreError | ClientError | Boto3Error)


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:199] + "…"
