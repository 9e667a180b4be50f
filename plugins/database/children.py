"""Child processes that die with dbkeeper: the external tools (pg_dump, pg_restore, Litestream).

A tool runs in a process group of its own (a Ctrl+C in the terminal reaches dbkeeper, which
decides when and how its tools stop) and is signalled by the kernel when the thread that
started it dies (Linux ``PR_SET_PDEATHSIG``): a killed dbkeeper never leaves a tool behind,
replacing a database or replicating one nobody watches. On a failure the whole group is
killed and reaped (:func:`kill_group`).

``PR_SET_PDEATHSIG`` follows the *thread* that forked: start long-lived children from a thread
that lives as long as they should (the event loop's), never from a short-lived worker. And it
comes again each time the child is handed from a dying thread to another one of the dying
process: harmless for SIGKILL, but a child that must get one graceful signal needs a one-thread
parent in between (``offsite/guardian.py``, for Litestream).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
try:  # loaded here: a forked child only calls it
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the process group and the kill on failure remain
    _prctl = None


def dies_with(parent: int, sig: int = signal.SIGKILL) -> Callable[[], None]:
    """For ``preexec_fn``: the child gets ``sig`` when its parent dies (Linux)."""

    def setup() -> None:  # in the child, between fork and exec
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return setup


def kill_group(process: subprocess.Popen[Any]) -> None:
    """Kill the tool and anything it started (its process group), and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.communicate(timeout=5)
