"""FastAPI integration (needs the ``web`` extra): sync endpoints run with their request's grant.

FastAPI runs a sync ``def`` endpoint in a worker thread; native thread limits belong to a
thread, so the grant the middleware took for the request has to be applied there::

    from fastapi import FastAPI
    from threadbudget.asgi import BudgetMiddleware
    from threadbudget.fastapi import BudgetRoute

    app = FastAPI()
    app.router.route_class = BudgetRoute      # before the routes are declared
    app.add_middleware(BudgetMiddleware)
"""

from __future__ import annotations

import inspect
from typing import Any

from ._batching import BatchQueueFull
from ._coordinate import sized_by_grant

try:
    from fastapi.routing import APIRoute
except ModuleNotFoundError as error:  # pragma: no cover - exercised with fastapi hidden
    raise ModuleNotFoundError(
        "threadbudget.fastapi needs FastAPI: pip install 'threadbudget[web]'", name=error.name
    ) from error

__all__ = ["BudgetRoute", "add_batch_overflow_handler"]


class BudgetRoute(APIRoute):
    """An ``APIRoute`` whose sync endpoints run with native limits set to the request's grant.

    Async endpoints are left alone: they run on the event loop, and CPU work inside them should
    go through ``CpuSlots.run_sync``, which applies the grant in its worker thread.
    """

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        if callable(endpoint) and not (
            inspect.iscoroutinefunction(endpoint)
            or inspect.iscoroutinefunction(getattr(endpoint, "__call__", None))  # noqa: B004
        ):
            endpoint = sized_by_grant(endpoint)
        super().__init__(path, endpoint, **kwargs)


def add_batch_overflow_handler(app: Any, *, status_code: int = 503) -> None:
    """Answer :class:`BatchQueueFull` from any endpoint with 503 (or 429) and Retry-After."""
    if status_code not in (429, 503):
        raise ValueError(f"status_code must be 503 or 429, got {status_code!r}")
    from fastapi.responses import PlainTextResponse

    async def overflow(request: Any, error: Exception) -> PlainTextResponse:
        assert isinstance(error, BatchQueueFull)
        return PlainTextResponse(
            f"{error}\n", status_code=status_code, headers={"Retry-After": str(error.retry_after)}
        )

    app.add_exception_handler(BatchQueueFull, overflow)
