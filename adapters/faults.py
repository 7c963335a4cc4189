"""A full disk as a typed error, and a fault-injection hook for crash tests of the write paths.

Test hook: LORAPLEX_FAULT_POINTS="point[=action],..." names points in the write paths (the
adapter store, the training-file store, checkpoint writing) and what happens when a process
reaches one: `kill` (the default) SIGKILLs the process; `crash` in a training worker (a
multiprocessing child) SIGKILLs the server that started it first, then the worker, like a
power loss (elsewhere it is `kill`);
`enospc` raises the error a full disk gives. Unset, every point is one falsy check. It is
read once, at import; tests set it in a server's environment (or call set_fault_points).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator

logger = logging.getLogger(__name__)

FAULT_POINTS_ENV = "LORAPLEX_FAULT_POINTS"
ACTIONS = ("kill", "crash", "enospc")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """No space left where the server writes; the message names no path."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.ENOSPC, f"no space left on the server's disk while {what}")
        self.what = what

    def __str__(self) -> str:
        return str(self.strerror)


def _parse(spec: str | None) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in (spec or "").split(","):
        name, _, action = item.strip().partition("=")
        if name:
            action = action or "kill"
            if action not in ACTIONS:
                raise ValueError(f"{FAULT_POINTS_ENV}: unknown action {action!r} for {name!r}")
            points[name] = action
    return points


_points = _parse(os.environ.get(FAULT_POINTS_ENV))


def set_fault_points(spec: str | None) -> None:
    """Replace the armed points (tests in this process); None disarms them all."""
    global _points
    _points = _parse(spec)


def fault_point(name: str) -> None:
    """Apply the action armed at `name`, if any (see the module docstring)."""
    if not _points:
        return
    action = _points.get(name)
    if action is None:
        return
    logger.warning("fault point %s: %s", name, action)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    parent = multiprocessing.parent_process()
    if action == "crash" and parent is not None and parent.pid is not None:
        os.kill(parent.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def disk_full_as_error(what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT inside the block into DiskFullError (`what`: 'storing an adapter')."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno not in _FULL_ERRNOS:
            raise
        logger.error("disk full while %s: %s", what, exc)
        raise DiskFullError(what) from exc
