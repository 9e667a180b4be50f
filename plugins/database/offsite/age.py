"""age encryption of backup copies (``pyrage``, the Rust age library), streamed.

``encrypt`` and ``decrypt`` read and write file objects in 8 KiB steps: memory stays flat
whatever the size of the backup. Facts that shape this module (checked with pyrage 1.4):

* a wrong identity is ``DecryptError("No matching keys found")``, data that is not age is
  ``DecryptError("Header is invalid")``;
* truncated or altered ciphertext is a plain ``OSError("decryption error")``, raised only
  after the plaintext before the damage was written out: whoever decrypts writes into a
  temporary file and deletes it on any error (``offsite.uploads`` does);
* an exception raised by our reader or writer comes back as ``EncryptError`` /
  ``DecryptError`` carrying its text: the stream wrappers keep the original to re-raise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pyrage

Check = Callable[[], None]  # raises to abandon the work (a deadline, a stop request)
IDENTITY_PREFIX = "AGE-SECRET-KEY-1"


class RecipientProblem(ValueError):
    """An ``[offsite] encrypt_to`` entry that is not an age recipient."""


class WrongIdentity(ValueError):
    """None of the identities can decrypt the data."""


class NotDecryptable(ValueError):
    """The data is not age data, or it is damaged or truncated."""


def parse_recipients(values: Sequence[str]) -> list[Any]:
    """age recipients (``age1...``, or an ``ssh-ed25519``/``ssh-rsa`` public key)."""
    recipients = []
    for value in values:
        text = value.strip()
        try:
            if text.startswith("ssh-"):
                recipients.append(pyrage.ssh.Recipient.from_str(text))
            else:
                recipients.append(pyrage.x25519.Recipient.from_str(text))
        except (pyrage.RecipientError, ValueError) as error:
            shown = text if len(text) <= 80 else text[:77] + "..."
            hint = (
                " (that is a secret key: put its public key here, the age1... line "
                "age-keygen prints, and keep the secret key off this machine)"
                if text.upper().startswith(IDENTITY_PREFIX)
                else ""
            )
            if hint:
                shown = "AGE-SECRET-KEY-1..."  # never echo a secret key
            raise RecipientProblem(
                f"{shown!r} is not an age recipient ({error}){hint}; expected age1... "
                "(age-keygen -y KEYFILE prints it) or an ssh-ed25519 public key"
            ) from None
    return recipients


def load_identities(path: Path) -> list[Any]:
    """The age identities in an ``age-keygen`` file (``#`` comments and blank lines skipped).

    ``ValueError`` says what is wrong without quoting the file (it holds secret keys).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"the identity file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        why = getattr(error, "strerror", None) or "not a text file"
        raise ValueError(f"the identity file {path} cannot be read ({why})") from None
    identities = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(pyrage.x25519.Identity.from_str(line))
        except (pyrage.IdentityError, ValueError):
            raise ValueError(
                f"line {number} of the identity file {path} is not an age secret key "
                f"({IDENTITY_PREFIX}...); give a file written by age-keygen"
            ) from None
    if not identities:
        raise ValueError(f"the identity file {path} holds no age secret key ({IDENTITY_PREFIX}...)")
    return identities


def identity_secrets(identities: Sequence[Any]) -> list[str]:
    """The identities as text, for the log redaction (never to be shown)."""
    return [str(identity) for identity in identities]


class HashingReader:
    """A reader that hashes what passes through and checks ``check`` on every read."""

    def __init__(self, source: BinaryIO, check: Check | None = None) -> None:
        self.source = source
        self.check = check
        self.hash = hashlib.sha256()
        self.bytes = 0
        self.error: BaseException | None = None  # what we raised, for the caller to re-raise

    def read(self, size: int = -1) -> bytes:
        try:
            if self.check is not None:
                self.check()
            data = self.source.read(size)
        except BaseException as error:
            self.error = error
            raise
        self.hash.update(data)
        self.bytes += len(data)
        return data

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()


class HashingWriter:
    """A writer that hashes what passes through."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.bytes = 0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            self.sink.write(data)
        except BaseException as error:
            self.error = error
            raise
        self.hash.update(data)
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()


def encrypt(
    source: BinaryIO, sink: BinaryIO, recipients: Sequence[Any], check: Check | None = None
) -> tuple[HashingReader, HashingWriter]:
    """Encrypt ``source`` into ``sink``; returns what was read and written (sizes, sha256)."""
    reader, writer = HashingReader(source, check), HashingWriter(sink)
    try:
        pyrage.encrypt_io(reader, writer, list(recipients))
    except pyrage.EncryptError:
        if reader.error is not None:
            raise reader.error from None
        if writer.error is not None:
            raise writer.error from None
        raise
    return reader, writer


def decrypt(
    source: BinaryIO, sink: BinaryIO, identities: Sequence[Any], check: Check | None = None
) -> HashingWriter:
    """Decrypt ``source`` into ``sink``; returns what was written (size, sha256).

    ``WrongIdentity``: no identity fits. ``NotDecryptable``: not age data, or damaged or
    truncated (plaintext may have been written to ``sink`` by then: discard it).
    """
    reader, writer = HashingReader(source, check), HashingWriter(sink)
    try:
        pyrage.decrypt_io(reader, writer, list(identities))
    except (pyrage.DecryptError, OSError) as error:
        if reader.error is not None:
            raise reader.error from None
        if writer.error is not None:
            raise writer.error from None
        text = str(error)
        if "no matching keys" in text.lower():
            raise WrongIdentity(text) from None
        raise NotDecryptable(text or type(error).__name__) from None
    return writer
