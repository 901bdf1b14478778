"""WSGI middleware with the ASGI middleware's semantics, for threaded WSGI servers.

gunicorn's ``gthread`` workers, waitress and similar servers call the app in one thread per
request, so the slot is taken in the thread that does the work and its native limits apply
there directly::

    app = BudgetMiddleware(app)               # Flask: app.wsgi_app = BudgetMiddleware(app.wsgi_app)

The slot is held until the response iterable is closed, so a streamed body counts too. WSGI
gives no way to notice a client that leaves while its request waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from ._admission import DEFAULT_EXEMPT_PATHS, Admission, Rejection
from ._coordinate import CpuSlots, activate, deactivate

__all__ = ["BudgetMiddleware"]

StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class BudgetMiddleware:
    """Admission control for a WSGI app; arguments as for the ASGI ``BudgetMiddleware``."""

    def __init__(
        self,
        app: WSGIApp,
        slots: CpuSlots | None = None,
        *,
        max_queue: int | None = None,
        queue_timeout: float | None = 30.0,
        status_code: int = 503,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
        exempt: Callable[[str], bool] | None = None,
        server_timing: bool = True,
    ) -> None:
        self.app = app
        self.slots = CpuSlots() if slots is None else slots
        self.admission = Admission(
            self.slots,
            max_queue=max_queue,
            queue_timeout=queue_timeout,
            status_code=status_code,
            exempt_paths=exempt_paths,
            exempt=exempt,
        )
        self.server_timing = server_timing

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        admission = self.admission
        if admission.is_exempt(str(environ.get("PATH_INFO", ""))):
            return self.app(environ, start_response)
        if not admission.try_enqueue():
            return _reject(start_response, admission.rejection("queue full"))
        asked = time.perf_counter()
        slot = self.slots.slot(timeout=admission.queue_timeout)
        try:
            slot.__enter__()
        except TimeoutError:
            admission.dequeue(timed_out=True)
            return _reject(start_response, admission.rejection("queue timeout"))
        except BaseException:
            admission.dequeue()
            raise
        admission.dequeue(admitted=True)
        waited_ms = (time.perf_counter() - asked) * 1000
        started = time.perf_counter()
        active = activate(self.slots)

        def finish() -> None:
            deactivate(active)
            admission.record_service(time.perf_counter() - started)
            slot.__exit__(None, None, None)

        def timed_start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            if self.server_timing:
                headers = [*headers, ("Server-Timing", f"queue;dur={waited_ms:.1f}")]
            return start_response(status, headers, *exc)

        try:
            body = self.app(environ, timed_start_response)
        except BaseException as error:
            _finish_with(finish, error)
            raise
        return _ClosingBody(body, finish)


def _finish_with(finish: Callable[[], None], error: BaseException) -> None:
    try:
        finish()
    except Exception as cleanup_error:  # keep the app's error; attach ours
        error.__context__ = cleanup_error


class _ClosingBody:
    """Passes the body through and releases the slot when the server closes it."""

    def __init__(self, body: Iterable[bytes], finish: Callable[[], None]) -> None:
        self._body = body
        self._finish: Callable[[], None] | None = finish

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            finish, self._finish = self._finish, None
            if finish is not None:
                finish()

    def __enter__(self) -> _ClosingBody:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _reject(start_response: StartResponse, rejection: Rejection) -> list[bytes]:
    body = f"{rejection.reason}: the server is at its CPU budget; retry later\n".encode()
    status = "503 Service Unavailable" if rejection.status == 503 else "429 Too Many Requests"
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Retry-After", str(rejection.retry_after)),
        ],
    )
    return [body]
