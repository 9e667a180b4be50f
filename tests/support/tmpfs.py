"""Small real file systems for tests of full disks (a tmpfs mount needs root)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(target: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``target`` with ``options`` (``size=4m``...); skips where not allowed.

    Its root is the owner's only (mode 0700, unless the options say otherwise): a tmpfs is
    world-writable by default, and dbkeeper refuses to write into such a directory.
    """
    target.mkdir(exist_ok=True)
    if "mode=" not in options:
        options += ",mode=0700"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], check=False)
