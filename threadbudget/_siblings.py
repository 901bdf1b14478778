"""Worker indexes for servers that give their workers none (``uvicorn --workers``).

gunicorn and Celery number their workers; uvicorn's multiprocess supervisor does not, so its
workers could only each take ``budget // workers`` and leave the remainder idle. Each worker
here takes the lowest index that no live sibling (a process with the same parent) holds, by
locking a file named after the parent and the index. The kernel drops the lock when the worker
exits, so a replacement worker takes over the index of the one it replaces.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ._threads import stat_fields

__all__ = ["claim_sibling_index"]

# Open for the life of the process: closing one would release its index.
_held: list[int] = []


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, so a reused pid names another file."""
    try:
        fields = stat_fields(Path(f"/proc/{pid}"))
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def claim_sibling_index(workers: int, *, directory: Path | None = None) -> int | None:
    """The lowest index in ``0..workers-1`` that no live sibling holds, now held by this
    process; ``None`` when all are taken or locks are unavailable (not Linux, no writable
    temporary directory)."""
    try:
        import fcntl
    except ModuleNotFoundError:  # not POSIX
        return None
    parent = os.getppid()
    started = _start_time(parent)
    if started is None:
        return None
    base = Path(tempfile.gettempdir()) / "threadbudget-workers" if directory is None else directory
    try:
        base.mkdir(parents=True, exist_ok=True)
        for index in range(workers):
            fd = os.open(base / f"{parent}-{started}-{index}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live sibling holds it
                os.close(fd)
                continue
            _held.append(fd)
            _remove_stale_locks(base)
            return index
    except OSError:
        return None
    return None


def _remove_stale_locks(base: Path) -> None:
    """Delete the lock files of servers that have exited, so restarts leave none behind.

    A file is stale when the parent it names is gone (its pid is free or now another process,
    told apart by the start time) and no worker still holds it: an orphaned worker that
    outlived its server keeps its file until it exits too.
    """
    import fcntl

    try:
        candidates = list(base.glob("*-*-*.lock"))
    except OSError:  # tidying up is a courtesy: the index is claimed either way
        return
    for path in candidates:
        parent, _, rest = path.name.partition("-")
        started = rest.partition("-")[0]
        if not parent.isdigit() or _start_time(int(parent)) == started:
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:  # removed by a sibling meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:  # still held, or not ours to remove
            pass
        finally:
            os.close(fd)
