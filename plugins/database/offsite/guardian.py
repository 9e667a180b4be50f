"""Litestream's parent: a one-thread process between dbkeeper and Litestream.

Run as a script (``python -I -S guardian.py LITESTREAM ARGS...``; it imports nothing of
dbkeeper). Why it exists: the kernel's parent-death signal (``PR_SET_PDEATHSIG``) is sent
each time a child is handed from a dying thread to another thread of its parent. dbkeeper has
many threads, so when it is killed Litestream would get SIGTERM several times, and Litestream
takes a second signal as "stop now": it skips its final sync, the one that uploads the last
commits. This process has one thread, so its death sends Litestream exactly one SIGTERM; and
it dies with dbkeeper itself (SIGKILL, as many times as the kernel likes).

It writes Litestream's pid on its stdout (then closes it), passes SIGTERM and SIGINT on, and
exits the way Litestream did (the same status, or the same signal).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str]) -> int:
    guardian = os.getpid()
    child = os.fork()
    if child == 0:  # Litestream-to-be
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != guardian:  # the guardian died before the line above
                os._exit(1)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # stdout is dbkeeper's pipe: never Litestream's
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.write(1, f"{child}\n".encode())
    os.close(1)

    def forward(signum: int, _frame: object) -> None:
        os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    _, status = os.waitpid(child, 0)  # retried after a handler runs (PEP 475)
    if os.WIFSIGNALED(status):
        died_of = os.WTERMSIG(status)
        if died_of != signal.SIGKILL:  # whose action cannot be changed (nor needs to be)
            signal.signal(died_of, signal.SIG_DFL)
        os.kill(guardian, died_of)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
