"""Streaming compression for backup files: constant memory, sha256 on both sides, strict reading.

Every function works in 1 MiB chunks, so memory stays flat whatever the size of the database.
While it streams, it hashes what it reads and what it produces: one pass gives the checksum of
the file and of the content inside it. Decompression is strict: truncated data, a failed check
(gzip's CRC-32, zstd's content checksum) or data that is not of the codec are ``CorruptData``.

gzip output is reproducible (no name, no time in the header). zstd frames carry the content
size and a checksum. Both libraries release the GIL while they work: the event loop keeps going.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from ..locks import open_private

CHUNK = 1 << 20
CODECS = ("gzip", "zstd", "none")
SUFFIXES = {"gzip": ".gz", "zstd": ".zst", "none": ""}
GZIP_LEVEL = 6
ZSTD_LEVEL = 3
# Two worker threads: with the full integrity check off the critical path, the second core is
# free while compressing (0.57x the time of one thread, measured); their job buffers cost a
# few MiB at level 3, whatever the size of the database.
ZSTD_THREADS = 2
_GZIP_WBITS = 31  # deflate inside a gzip container

Progress = Callable[[int], None]  # bytes of input consumed so far
Check = Callable[[], None]  # raises to abandon the work (deadline, shutdown)


class CorruptData(ValueError):
    """The compressed data is damaged, truncated, or not of the expected codec."""


@dataclass(frozen=True)
class Digest:
    """Size and sha256 of a stream of bytes."""

    bytes: int
    sha256: str


class _Hasher:
    def __init__(self, *, hashing: bool = True) -> None:
        self.size = 0
        self._hash = hashlib.sha256() if hashing else None

    def update(self, data: bytes) -> None:
        self.size += len(data)
        if self._hash is not None:
            self._hash.update(data)

    def digest(self) -> Digest:
        return Digest(self.size, self._hash.hexdigest() if self._hash is not None else "")


# Chunks a hashing thread may be behind by: bounds the memory (a few MiB) whatever the size.
_HASH_BACKLOG = 8


class _ThreadedHasher(_Hasher):
    """A ``_Hasher`` whose sha256 runs on a worker thread, in order: hashlib releases the GIL
    for big buffers, so decompression and the two sha256 of a restore use the cores side by
    side instead of one after the other. Use it as a context manager (the thread ends)."""

    def __init__(self, *, hashing: bool = True) -> None:
        super().__init__(hashing=hashing)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dbkeeper-sha256")
        self._pending: deque[Future[None]] = deque()

    def update(self, data: bytes) -> None:
        self.size += len(data)
        if self._hash is None:
            return
        self._pending.append(self._pool.submit(self._hash.update, data))
        while len(self._pending) > _HASH_BACKLOG:
            self._pending.popleft().result()

    def digest(self) -> Digest:
        while self._pending:
            self._pending.popleft().result()
        return super().digest()

    def __enter__(self) -> _ThreadedHasher:
        return self

    def __exit__(self, *_: object) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


def codec_for_suffix(name: str) -> str:
    """The codec a backup file name implies: ``.gz`` gzip, ``.zst`` zstd, anything else none."""
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith(".zst"):
        return "zstd"
    return "none"


def create_private(path: Path) -> BinaryIO:
    """A new file only its owner can read (backups hold users' data); never an existing one."""
    return os.fdopen(open_private(path, new=True), "wb")


def fsync_file(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _chunks(path: Path, progress: Progress | None, check: Check | None) -> Iterator[bytes]:
    done = 0
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            if check is not None:
                check()
            yield chunk
            done += len(chunk)
            if progress is not None:
                progress(done)


def hash_file(path: Path, progress: Progress | None = None, check: Check | None = None) -> Digest:
    hasher = _Hasher()
    for chunk in _chunks(path, progress, check):
        hasher.update(chunk)
    return hasher.digest()


def compress(
    source: Path,
    target: Path,
    codec: str,
    *,
    progress: Progress | None = None,
    check: Check | None = None,
) -> tuple[Digest, Digest]:
    """Compress ``source`` into the new file ``target``, fsynced; return (content, file) digests."""
    content, written = _Hasher(), _Hasher()
    size = source.stat().st_size
    with create_private(target) as out:

        def emit(data: bytes) -> None:
            if data:
                written.update(data)
                out.write(data)

        if codec == "gzip":
            gz = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
            for chunk in _chunks(source, progress, check):
                content.update(chunk)
                emit(gz.compress(chunk))
            emit(gz.flush())
        elif codec == "zstd":
            compressor = zstandard.ZstdCompressor(
                level=ZSTD_LEVEL, write_checksum=True, write_content_size=True, threads=ZSTD_THREADS
            )
            zs = compressor.compressobj(size=size)
            for chunk in _chunks(source, progress, check):
                content.update(chunk)
                emit(zs.compress(chunk))
            emit(zs.flush())
        else:
            raise ValueError(f"unknown codec {codec!r}")
        fsync_file(out)
    return content.digest(), written.digest()


def decompress(
    source: Path,
    codec: str,
    sink: BinaryIO | None = None,
    *,
    progress: Progress | None = None,
    check: Check | None = None,
    hash_content: bool = True,
) -> tuple[Digest, Digest]:
    """Stream the content of ``source`` into ``sink`` (or nowhere); return (file, content) digests.

    Both sha256 run on their own threads beside the decompressor (``_ThreadedHasher``).
    ``codec`` "none" copies. Raises ``CorruptData`` when the data is not whole and sound.
    ``hash_content`` False: the content is counted, not hashed (its sha256 is "").
    """
    with contextlib.ExitStack() as threads:
        file = threads.enter_context(_ThreadedHasher())
        content = threads.enter_context(_ThreadedHasher(hashing=hash_content))
        _decompress_into(source, codec, sink, file, content, progress, check)
        return file.digest(), content.digest()


def _decompress_into(
    source: Path,
    codec: str,
    sink: BinaryIO | None,
    file: _Hasher,
    content: _Hasher,
    progress: Progress | None,
    check: Check | None,
) -> None:
    def emit(data: bytes) -> None:
        if data:
            content.update(data)
            if sink is not None:
                sink.write(data)

    def read() -> Iterator[bytes]:
        for chunk in _chunks(source, progress, check):
            file.update(chunk)
            yield chunk

    if codec == "none":
        for chunk in read():
            emit(chunk)
    elif codec == "gzip":
        _gunzip(read(), emit)
    elif codec == "zstd":
        _unzstd(source, read(), emit)
    else:
        raise ValueError(f"unknown codec {codec!r}")


def read_back(
    source: Path,
    codec: str,
    *,
    progress: Progress | None = None,
    check: Check | None = None,
) -> tuple[Digest, int]:
    """Read a file just written back from the disk: its (file) digest and its content's size.

    zstd: every byte decompressed against the frame's content checksum, which the compressor
    computed over its input, so a file whose sha256 is the one computed while writing and whose
    frame checks holds exactly the bytes that were compressed; the content is not hashed a
    second time. gzip (CRC-32 only) and uncompressed files: the content's sha256 is part of
    the answer's comparison, so ``decompress`` is the read-back for them.
    """
    if codec != "zstd":
        raise ValueError(f"a frame read-back needs zstd, not {codec!r}")
    with open(source, "rb") as head:
        header = head.read(18)
    try:
        checksummed = bool(header) and zstandard.get_frame_parameters(header).has_checksum
    except zstandard.ZstdError:
        checksummed = False
    if not checksummed:
        raise CorruptData("the zstd file has no content checksum to read it back against")
    file, content = decompress(source, codec, progress=progress, check=check, hash_content=False)
    return file, content.bytes


def _gunzip(chunks: Iterator[bytes], emit: Callable[[bytes], None]) -> None:
    """gzip, bounded output per step; several members in a row (``cat a.gz b.gz``) are fine."""
    stream = zlib.decompressobj(_GZIP_WBITS)
    seen_any = False
    try:
        for chunk in chunks:
            seen_any = True
            data = chunk
            while data:
                emit(stream.decompress(data, CHUNK))
                if stream.eof:
                    data = stream.unused_data
                    if data:
                        stream = zlib.decompressobj(_GZIP_WBITS)  # the next member
                else:
                    data = stream.unconsumed_tail
        emit(stream.flush())
    except zlib.error as error:
        raise CorruptData(f"the gzip data is damaged or not gzip at all ({error})") from None
    if not seen_any:
        raise CorruptData("the file is empty")
    if not stream.eof:
        raise CorruptData("the gzip data ends early: the file is truncated")


def _unzstd(source: Path, chunks: Iterator[bytes], emit: Callable[[bytes], None]) -> None:
    """zstd with bounded output; a frame shorter than its declared content size is truncated."""
    with open(source, "rb") as head:
        header = head.read(18)
    if not header:
        raise CorruptData("the file is empty")
    try:
        declared = zstandard.get_frame_parameters(header).content_size
    except zstandard.ZstdError as error:
        raise CorruptData(f"the file is not zstd data ({error})") from None

    class Reader:
        def __init__(self) -> None:
            self._chunks = chunks
            self._buffer = b""

        def read(self, size: int = -1) -> bytes:
            while size < 0 or len(self._buffer) < size:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._buffer += chunk
            if size < 0:
                size = len(self._buffer)
            data, self._buffer = self._buffer[:size], self._buffer[size:]
            return data

    produced = 0
    try:
        for data in zstandard.ZstdDecompressor().read_to_iter(
            Reader(),  # type: ignore[arg-type]  # any object with read(size) will do
            read_size=CHUNK,
            write_size=CHUNK,
        ):
            produced += len(data)
            emit(data)
        for _ in chunks:  # read (and hash) whatever follows the frame
            pass
    except zstandard.ZstdError as error:
        raise CorruptData(f"the zstd data is damaged ({error})") from None
    unknown = zstandard.CONTENTSIZE_UNKNOWN
    if declared not in (unknown, zstandard.CONTENTSIZE_ERROR) and produced != declared:
        raise CorruptData(
            f"the zstd data ends early: {produced} of {declared} bytes (the file is truncated)"
        )
