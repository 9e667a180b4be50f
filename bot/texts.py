"""How dbkeeper writes things for people: durations, sizes, and texts that fit Telegram.

Chat answers use Telegram's HTML parse mode, so every value that comes from outside (table
names, error messages, file names) goes through ``escape``; texts longer than a message are cut
at line ends by ``split_message``, counting as Telegram does (UTF-16 code units).
"""

from __future__ import annotations

import html

# One truth: a megabyte is 1,000,000 bytes everywhere dbkeeper writes one (chat, logs, the
# command line, [health] size_warning_mb), as disk makers and `df -H` count.
MB = 1000 * 1000

# telegram.constants.MessageLimit.MAX_TEXT_LENGTH, spelled out: importing PTB costs every command
# line start 0.1 s, and the command line sends nothing (a test keeps the two equal).
MAX_MESSAGE_LENGTH = 4096


def duration(seconds: float) -> str:
    """``45s``, ``12m 5s``, ``3h 20m``, ``2d 4h``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def megabytes(size: float) -> str:
    """``45.23 MB`` (the contract's messages), ``1.50 GB`` from 1 GB up; powers of 1000."""
    if size >= 1000 * MB:
        return f"{size / MB / 1000:,.2f} GB"
    return f"{size / MB:.2f} MB"


def size(value: float) -> str:
    """``512 B``, ``61.4 KB``, ``12.4 MB``, ``1.1 GB`` (powers of 1000, as ``megabytes``):
    logs and listings, one decimal."""
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def counted(number: int, noun: str) -> str:
    """``1 table``, ``4 tables``, ``1,234 records``: a count and its noun, singular for one."""
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def escape(value: object) -> str:
    """A value made safe to put inside HTML parse-mode text."""
    return html.escape(str(value), quote=False)


def split_message(text: str, limit: int = MAX_MESSAGE_LENGTH) -> list[str]:
    """Pieces of at most ``limit`` UTF-16 code units (Telegram's count), cut at line ends."""
    pieces: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while _units(line) > limit:  # a single line longer than a message
            cut = _fit(line, limit)
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:cut])
            line = line[cut:]
        if _units(current) + _units(line) > limit:
            pieces.append(current)
            current = ""
        current += line
    if current.strip():
        pieces.append(current)
    return [piece.rstrip("\n") for piece in pieces if piece.strip()]


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, limit: int) -> int:
    """How many characters of ``text`` fit in ``limit`` UTF-16 code units."""
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)
