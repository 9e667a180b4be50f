"""Alembic, imported on first use, once, under a lock.

Most ``dbkeeper`` commands never read a revision (``backup list``, ``--help``), so Alembic is
not imported with the package (0.1 s of every start). But the health checks run on several
threads at once, and two threads importing Alembic's mutually importing modules together
deadlock (``_DeadlockError``) or see a half-initialized module (``cannot import name``): every
use goes through :func:`load_alembic` first, after which the imports are lookups.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_loaded = False


def load_alembic() -> None:
    """Import every Alembic module dbkeeper uses, in one thread, the first time."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            import alembic.autogenerate
            import alembic.command
            import alembic.config
            import alembic.runtime.migration
            import alembic.script  # noqa: F401

            _loaded = True
