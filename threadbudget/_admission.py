"""What the ASGI and WSGI middleware share: the queue bound, exemptions and Retry-After."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ._coordinate import CpuSlots
from ._forksafety import track_for_fork

__all__ = ["DEFAULT_EXEMPT_PATHS", "Admission", "Rejection"]

DEFAULT_EXEMPT_PATHS = ("/health", "/healthz", "/livez", "/readyz", "/metrics")


@dataclass(frozen=True)
class Rejection:
    """Why a request was turned away, and when to come back (whole seconds)."""

    reason: str
    status: int
    retry_after: int


class Admission:
    """Admission state for one middleware: queue depth, service time, counters.

    The queue bound is checked before waiting, so overflow is answered at once instead of
    adding to a queue that cannot drain in time. The service time is an exponentially weighted
    mean of how long admitted requests held their slot; with the queue depth it gives a
    Retry-After that grows with the backlog.
    """

    def __init__(
        self,
        slots: CpuSlots,
        *,
        max_queue: int | None,
        queue_timeout: float | None,
        status_code: int,
        exempt_paths: Iterable[str],
        exempt: Callable[[str], bool] | None,
    ) -> None:
        if not isinstance(slots, CpuSlots):
            raise TypeError(f"slots must be a CpuSlots, got {slots!r}")
        if max_queue is None:
            max_queue = 8 * slots.budget
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be a whole number >= 0, got {max_queue!r}")
        if queue_timeout is not None and (
            isinstance(queue_timeout, bool)
            or not isinstance(queue_timeout, int | float)
            or not queue_timeout > 0
        ):
            raise ValueError(
                f"queue_timeout must be a number of seconds > 0, got {queue_timeout!r}"
            )
        if status_code not in (429, 503):
            raise ValueError(f"status_code must be 503 or 429, got {status_code!r}")
        if isinstance(exempt_paths, str | bytes):
            raise TypeError(f"exempt_paths must be a collection of paths, not {exempt_paths!r}")
        paths = tuple(exempt_paths)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"exempt paths must start with '/', got {path!r}")
        # "/metrics/" and "/metrics" mean the same route and everything below it.
        paths = tuple(path.rstrip("/") or "/" for path in paths)
        if exempt is not None and not callable(exempt):
            raise TypeError(f"exempt must be a callable taking the path, got {exempt!r}")
        self.slots = slots
        self.max_queue = max_queue
        self.queue_timeout = None if queue_timeout is None else float(queue_timeout)
        self.status_code = status_code
        self.exempt_paths = paths
        self.exempt = exempt
        self._lock = threading.Lock()
        self._queued = 0
        self._service_seconds = 0.0
        self.admitted = 0
        self.rejected_full = 0
        self.rejected_timeout = 0
        self.disconnected = 0
        track_for_fork(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._queued = 0

    def is_exempt(self, path: str) -> bool:
        if self.exempt is not None and self.exempt(path):
            return True
        return any(p in (path, "/") or path.startswith(p + "/") for p in self.exempt_paths)

    def try_enqueue(self) -> bool:
        """Count one more waiter, or refuse when the queue is full and it would have to wait."""
        with self._lock:
            if self._queued >= self.max_queue and self.slots.would_wait():
                self.rejected_full += 1
                return False
            self._queued += 1
            return True

    def dequeue(
        self, *, admitted: bool = False, timed_out: bool = False, gone: bool = False
    ) -> None:
        with self._lock:
            self._queued -= 1
            self.admitted += admitted
            self.rejected_timeout += timed_out
            self.disconnected += gone

    def record_service(self, seconds: float) -> None:
        with self._lock:
            if self._service_seconds == 0.0:
                self._service_seconds = seconds
            else:
                self._service_seconds += 0.2 * (seconds - self._service_seconds)

    def retry_after(self) -> int:
        """Seconds until the backlog ahead of a new request has likely drained (at least 1)."""
        with self._lock:
            backlog = self._queued + 1
            service = self._service_seconds
        return max(1, math.ceil(backlog * service / self.slots.budget))

    def rejection(self, reason: str) -> Rejection:
        return Rejection(reason, self.status_code, self.retry_after())

    @property
    def queued(self) -> int:
        return self._queued
