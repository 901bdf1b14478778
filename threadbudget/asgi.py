"""Pure ASGI middleware: admit requests within the CPU budget, queue the rest, shed overflow.

Works with Starlette, FastAPI or any ASGI app, and imports no framework::

    app = BudgetMiddleware(app)                      # or app.add_middleware(BudgetMiddleware)

Each admitted HTTP request holds a slot of a :class:`CpuSlots` for as long as the app handles
it. Requests beyond the budget wait in a bounded FIFO queue with a deadline; overflow and
expired waits get 503 (or 429) with a Retry-After computed from the queue depth and the
observed service time. Exempt paths (health, metrics) never wait. A client that disconnects
while queued gives its place up. Lifespan and websocket scopes pass through untouched.

The grant reaches sync endpoints, which frameworks run in worker threads, through
:func:`threadbudget.sized_by_grant` (FastAPI: :class:`threadbudget.fastapi.BudgetRoute` does it
for every sync endpoint).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._admission import DEFAULT_EXEMPT_PATHS, Admission
from ._coordinate import CpuSlots, activate, deactivate, set_default_thread_limiter
from ._slots import Grant

__all__ = ["BudgetMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BudgetMiddleware:
    """Admission control for an ASGI app; see the module docstring.

    *slots*: the pool to admit through (default: ``CpuSlots()``, sized from the environment).
    *max_queue*: requests allowed to wait (default 8 x budget); *queue_timeout*: seconds a
    request may wait (default 30; ``None`` waits as long as it takes). *thread_limiter*: size of
    anyio's default worker-thread limiter, set once per event loop; the default makes sure it
    is at least ``budget + 8`` so admitted sync endpoints never wait for a thread; ``False``
    leaves it alone. *server_timing* adds ``Server-Timing: queue;dur=<ms>`` to responses.
    """

    def __init__(
        self,
        app: ASGIApp,
        slots: CpuSlots | None = None,
        *,
        max_queue: int | None = None,
        queue_timeout: float | None = 30.0,
        status_code: int = 503,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
        exempt: Callable[[str], bool] | None = None,
        thread_limiter: int | bool = True,
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
        if not isinstance(thread_limiter, bool) and (
            not isinstance(thread_limiter, int) or thread_limiter < 1
        ):
            raise ValueError(f"thread_limiter must be True, False or >= 1, got {thread_limiter!r}")
        self.thread_limiter = thread_limiter
        self.server_timing = server_timing
        self._sized_loop: object = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                self._size_thread_limiter()
            await self.app(scope, receive, send)
            return
        self._size_thread_limiter()
        if self.admission.is_exempt(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        await self._admit(scope, receive, send)

    def _size_thread_limiter(self) -> None:
        if self.thread_limiter is False:
            return
        token = anyio.lowlevel.current_token()
        if self._sized_loop == token:
            return
        self._sized_loop = token
        limiter = anyio.to_thread.current_default_thread_limiter()
        if self.thread_limiter is True:
            wanted = max(int(limiter.total_tokens), self.slots.budget + 8)
        else:
            wanted = int(self.thread_limiter)
        if wanted != limiter.total_tokens:
            set_default_thread_limiter(wanted)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission = self.admission
        if not admission.try_enqueue():
            await self._reject(send, admission.rejection("queue full"))
            return
        asked = time.perf_counter()
        buffered: list[Message] = []
        disconnected = False
        slot = self.slots.async_slot(timeout=admission.queue_timeout)
        grant: Grant | None = None
        timed_out = False

        async def watch_for_disconnect(wait_scope: anyio.CancelScope) -> None:
            # Reading the request while it waits is the only way to see the client leave; the
            # messages read are replayed to the app.
            nonlocal disconnected
            while True:
                message = await receive()
                buffered.append(message)
                if message["type"] == "http.disconnect":
                    disconnected = True
                    wait_scope.cancel()
                    return

        dequeued = False

        def leave_queue() -> None:
            # Right when the wait ends, not after the watcher stops: a request arriving in
            # between must not count this one as queued.
            nonlocal dequeued
            if not dequeued:
                dequeued = True
                admission.dequeue(
                    admitted=grant is not None, timed_out=timed_out, gone=disconnected
                )

        try:
            if not self.slots.would_wait():
                # Free tokens and nobody queued: no wait to watch.
                grant = await slot.__aenter__()
                leave_queue()
            else:
                async with anyio.create_task_group() as watchers:
                    wait_scope = anyio.CancelScope()
                    watchers.start_soon(watch_for_disconnect, wait_scope)
                    with wait_scope:
                        try:
                            grant = await slot.__aenter__()
                        except TimeoutError:
                            timed_out = True
                        finally:
                            leave_queue()
                    watchers.cancel_scope.cancel()
        finally:
            leave_queue()
        if grant is None:
            if not disconnected:
                await self._reject(send, admission.rejection("queue timeout"))
            return

        waited_ms = (time.perf_counter() - asked) * 1000
        started = time.perf_counter()
        active = activate(self.slots)
        try:
            await self.app(scope, _replaying(buffered, receive), self._timed_send(send, waited_ms))
        finally:
            deactivate(active)
            admission.record_service(time.perf_counter() - started)
            await slot.__aexit__(None, None, None)

    def _timed_send(self, send: Send, waited_ms: float) -> Send:
        if not self.server_timing:
            return send

        async def send_with_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"queue;dur={waited_ms:.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        return send_with_timing

    async def _reject(self, send: Send, rejection: Any) -> None:
        body = f"{rejection.reason}: the server is at its CPU budget; retry later\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": rejection.status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(rejection.retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replaying(buffered: list[Message], receive: Receive) -> Receive:
    """A receive that first returns the messages read while the request waited."""
    if not buffered:
        return receive
    pending = list(buffered)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
