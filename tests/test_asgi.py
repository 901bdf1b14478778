"""The ASGI BudgetMiddleware against real uvicorn servers and a real HTTP client.

Most tests talk to one uvicorn process (``MAIN_APP``) that serves several FastAPI apps, each
behind its own BudgetMiddleware and CpuSlots, under a path prefix (``/a/...``, ``/t/...``): one
server start serves every configuration. Control routes (``/control/...``) are exempt through
a custom ``exempt`` callable, so the tests can watch the pool and the queue while they fill
them. Blocking routes wait on a gate the tests close and open (never longer than 20 s).

A few fast tests drive the middleware in-process (httpx.ASGITransport, starlette's
TestClient, or hand-made ASGI calls) for logic that needs no network.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import psutil
import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from threadbudget import CpuSlots, TokenPool
from threadbudget.asgi import BudgetMiddleware

from .servers import Server, uvicorn_server

pytestmark = pytest.mark.anyio

SERVER_TIMING = re.compile(r"^queue;dur=(\d+\.\d)$")

# One uvicorn process, one FastAPI app per configuration, each behind its own middleware.
MAIN_APP = r'''
import hashlib
import threading
import time

import anyio.to_thread
import numpy
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

import threadbudget
from threadbudget.asgi import BudgetMiddleware
from threadbudget.fastapi import BudgetRoute

GATE = threading.Event()  # /block waits while the gate is closed, 20 s at most
GATE.set()
MATRIX = numpy.random.default_rng(0).standard_normal((300, 300))

CONFIGS = {
    # name: (CpuSlots arguments, BudgetMiddleware options)
    "a": ({"budget": 2, "policy": "static"}, {"max_queue": 3, "queue_timeout": 10.0}),
    "f": ({"budget": 1}, {"max_queue": 5, "queue_timeout": 10.0}),
    "t": ({"budget": 1}, {"max_queue": 4, "queue_timeout": 1.0}),
    "r": ({"budget": 1}, {"max_queue": 0, "status_code": 429}),
    "ra0": ({"budget": 1}, {"max_queue": 0}),
    "ra5": ({"budget": 1}, {"max_queue": 5}),
    "n": ({"budget": 1}, {"max_queue": 2}),
    "o": ({"budget": 2}, {"max_queue": 4, "queue_timeout": 1.0}),
}
SLOTS = {}
MIDDLEWARE = {}
SEEN = {}


def stats_of(name):
    snapshot = SLOTS[name].snapshot()
    admission = MIDDLEWARE[name].admission
    return {
        "in_use": snapshot.in_use,
        "holders": snapshot.holders,
        "waiting": snapshot.waiting,
        "cancellations": snapshot.cancellations,
        "timeouts": snapshot.timeouts,
        "queued": admission.queued,
        "admitted": admission.admitted,
        "rejected_full": admission.rejected_full,
        "rejected_timeout": admission.rejected_timeout,
        "disconnected": admission.disconnected,
        "service": admission._service_seconds,
        "seen": list(SEEN[name]),
    }


def make(name, slot_options, options):
    slots = SLOTS[name] = threadbudget.CpuSlots(**slot_options)
    seen = SEEN[name] = []
    api = FastAPI()
    api.router.route_class = BudgetRoute

    @api.get("/health")
    def health():  # sync on purpose: it needs a worker thread of anyio's default limiter
        return {"ok": True}

    @api.get("/block")
    def block(tag: str = ""):
        seen.append(tag)
        released = GATE.wait(20)
        return {"tag": tag, "grant": slots.current_grant(), "released": released}

    @api.get("/work")
    def work(ms: float = 0.0):
        time.sleep(ms / 1000)
        return {"grant": slots.current_grant()}

    @api.get("/burn")
    def burn(ms: float = 300.0):
        deadline = time.perf_counter() + ms / 1000
        while time.perf_counter() < deadline:
            MATRIX @ MATRIX
        return {"grant": slots.current_grant()}

    @api.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    @api.get("/nested")
    async def nested():
        outer = slots.current_grant()
        holders = slots.snapshot().holders
        # A nested slot of the same pool reuses the request's grant; timeout turns a deadlock
        # into an error instead of a hang.
        inner = await slots.run_sync(slots.current_grant, timeout=5)
        return {"outer": outer, "inner": inner, "holders": holders}

    @api.get("/control/stats")
    async def stats():
        return stats_of(name)

    @api.get("/control/idle")
    async def idle():
        return {
            "idle": all(
                s.in_use == 0 and s.waiting == 0 and MIDDLEWARE[n].admission.queued == 0
                for n, s in ((n, SLOTS[n].snapshot()) for n in SLOTS)
            )
        }

    @api.post("/control/hold")
    async def hold():
        GATE.clear()

    @api.post("/control/release")
    async def release():
        GATE.set()

    @api.get("/control/limiter")
    async def limiter():
        return {"total_tokens": anyio.to_thread.current_default_thread_limiter().total_tokens}

    @api.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"echo:{text}:{slots.snapshot().in_use}")
        except WebSocketDisconnect:
            pass

    middleware = MIDDLEWARE[name] = BudgetMiddleware(
        api, slots, exempt=lambda path: path.startswith("/control/"), **options
    )
    return middleware


class Prefixes:
    """/<name>/rest goes to configuration <name> as /rest; anything else (and lifespan) to "a"."""

    def __init__(self, apps, default):
        self.apps = apps
        self.default = default

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            head, _, rest = scope["path"][1:].partition("/")
            if head in self.apps:
                scope = dict(scope, path="/" + rest)
                await self.apps[head](scope, receive, send)
                return
        await self.default(scope, receive, send)


APPS = {name: make(name, *config) for name, config in CONFIGS.items()}
app = Prefixes(APPS, APPS["a"])
'''

# FastAPI behind the middleware with and without BudgetRoute; counts the OS threads of a
# torch matmul inside the server process.
TORCH_APP = r"""
import os
import time

import anyio
import torch
from fastapi import FastAPI
from fastapi.routing import APIRoute

import threadbudget
from threadbudget.asgi import BudgetMiddleware
from threadbudget.fastapi import BudgetRoute

X = torch.randn(1000, 1000)


def op():
    for _ in range(6):
        X @ X


op()
EVENTS = {}


def event(name):
    if name not in EVENTS:
        EVENTS[name] = anyio.Event()
    return EVENTS[name]


def make(route_class, **slot_options):
    slots = threadbudget.CpuSlots(int(os.environ["TEST_BUDGET"]), **slot_options)
    api = FastAPI()
    api.router.route_class = route_class

    @api.get("/health")
    def health():
        return {"ok": True}

    @api.get("/busy")
    def busy():
        time.sleep(0.4)  # pool threads of earlier operations stop spinning
        _, activity = threadbudget.measure_busy_threads(op)
        return {
            "grant": slots.current_grant(),
            "busy": activity.busy_count,
            "torch_threads": torch.get_num_threads(),
        }

    @api.get("/async_hold")
    async def async_hold():
        await event("a_release").wait()
        return {"grant": slots.current_grant()}

    @api.get("/async_probe")
    async def async_probe():
        await event("b_go").wait()
        return {"grant": slots.current_grant(), "loop_threads": torch.get_num_threads()}

    @api.post("/control/set/{name}")
    async def set_event(name: str):
        event(name).set()

    @api.post("/control/reset")
    async def reset():
        EVENTS.clear()

    @api.get("/control/stats")
    async def stats():
        return {"holders": slots.snapshot().holders}

    @api.get("/control/loop_threads")
    async def loop_threads():
        return {"threads": torch.get_num_threads()}

    return BudgetMiddleware(api, slots, exempt=lambda path: path.startswith("/control/"))


APPS = {
    "elastic": make(BudgetRoute),
    "static": make(BudgetRoute, policy="static", threads=1),
    "plain": make(APIRoute, policy="static", threads=1),
}


async def app(scope, receive, send):
    if scope["type"] in ("http", "websocket"):
        head, _, rest = scope["path"][1:].partition("/")
        if head in APPS:
            await APPS[head](dict(scope, path="/" + rest), receive, send)
            return
    await APPS["elastic"](scope, receive, send)
"""

# Lifespan hooks behind the middleware; a budget of 64 so that budget + 8 exceeds anyio's 40.
LIFESPAN_APP = r"""
import os
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI

import threadbudget
from threadbudget.asgi import BudgetMiddleware

STATE = {"startups": 0}


@asynccontextmanager
async def lifespan(app):
    STATE["startups"] += 1
    STATE["limiter_at_startup"] = anyio.to_thread.current_default_thread_limiter().total_tokens
    yield
    Path(os.environ["SHUTDOWN_FILE"]).write_text("shutdown ran")


api = FastAPI(lifespan=lifespan)


@api.get("/health")
def health():
    return {"ok": True}


@api.get("/state")
async def state():
    return {
        **STATE,
        "limiter_now": anyio.to_thread.current_default_thread_limiter().total_tokens,
    }


app = BudgetMiddleware(api, threadbudget.CpuSlots(64, native_limits=False))
"""


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def http(server: Server, timeout: float = 10.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url,
        timeout=timeout,
        trust_env=False,
        limits=httpx.Limits(max_connections=200),
    )


async def stats(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await client.get(f"/{name}/control/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def stats_sync(server: Server, name: str) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=5, trust_env=False) as client:
        result: dict[str, Any] = client.get(f"/{name}/control/stats").json()
        return result


async def wait_stats(
    client: httpx.AsyncClient,
    name: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Poll /<name>/control/stats until *predicate* holds (at most *timeout* seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        current = await stats(client, name)
        if predicate(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout} s; stats: {current}")
        await anyio.sleep(0.02)


@asynccontextmanager
async def gate_closed(client: httpx.AsyncClient) -> AsyncIterator[None]:
    """/block requests wait inside their slot until the gate opens (here on exit at the latest)."""
    (await client.post("/control/hold")).raise_for_status()
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await client.post("/control/release")


async def release(client: httpx.AsyncClient) -> None:
    (await client.post("/control/release")).raise_for_status()


def retry_after(response: httpx.Response) -> int:
    value = response.headers.get("retry-after")
    assert value is not None, f"{response.status_code} without Retry-After: {response.headers}"
    assert value.isdigit(), f"Retry-After is not a whole number of seconds: {value!r}"
    seconds = int(value)
    assert seconds >= 1
    return seconds


def queue_ms(response: httpx.Response) -> float:
    header = response.headers.get("server-timing")
    assert header is not None, f"no Server-Timing on {response.status_code}: {response.headers}"
    match = SERVER_TIMING.match(header)
    assert match, f"unexpected Server-Timing {header!r}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def main_server() -> Iterator[Server]:
    with uvicorn_server(MAIN_APP) as server:
        yield server


@pytest.fixture
def main(main_server: Server) -> Iterator[Server]:
    """The shared server, left idle for the next test: gate open, nothing held or queued."""
    yield main_server
    with httpx.Client(base_url=main_server.url, timeout=5, trust_env=False) as client:
        client.post("/control/release").raise_for_status()
        deadline = time.monotonic() + 25
        while not client.get("/control/idle").json()["idle"]:
            assert time.monotonic() < deadline, "the server did not go idle after the test"
            time.sleep(0.05)


# -- real uvicorn: admission, queue bound, timeouts ------------------------------------------


async def test_queue_bound_rejects_overflow_at_once(main: Server) -> None:
    """max_queue=3, budget 2 (static): the 6th concurrent request gets 503 at once."""
    results: dict[str, httpx.Response] = {}

    async def fetch(tag: str) -> None:
        results[tag] = await client.get(f"/a/block?tag={tag}")

    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            for tag in ("h0", "h1"):
                tg.start_soon(fetch, tag)
            await wait_stats(client, "a", lambda s: s["holders"] == 2)
            for tag in ("q0", "q1", "q2"):
                tg.start_soon(fetch, tag)
            before = await wait_stats(client, "a", lambda s: s["waiting"] == 3)
            assert before["queued"] == 3

            started = time.perf_counter()
            over = await client.get("/a/block?tag=over")
            elapsed = time.perf_counter() - started
            assert over.status_code == 503
            assert elapsed < 1.0, f"overflow took {elapsed:.2f} s (queue_timeout is 10 s)"
            assert retry_after(over) >= 1
            assert "queue full" in over.text
            assert "server-timing" not in over.headers
            after = await stats(client, "a")
            assert after["rejected_full"] == before["rejected_full"] + 1
            await release(client)

    assert {tag: r.status_code for tag, r in results.items()} == dict.fromkeys(
        ("h0", "h1", "q0", "q1", "q2"), 200
    )
    assert all(r.json()["grant"] == 1 for r in results.values())
    assert "over" not in (stats_sync(main, "a"))["seen"]


async def test_queue_timeout_answers_503_after_about_queue_timeout(main: Server) -> None:
    """/t: budget 1, queue_timeout=1.0 s."""
    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/t/block?tag=holder")
            before = await wait_stats(client, "t", lambda s: s["holders"] == 1)
            started = time.perf_counter()
            late = await client.get("/t/block?tag=late")
            elapsed = time.perf_counter() - started
            await release(client)
    assert late.status_code == 503
    assert 0.8 <= elapsed <= 3.0, f"queue timeout of 1.0 s answered after {elapsed:.2f} s"
    assert retry_after(late) >= 1
    assert "queue timeout" in late.text
    after = stats_sync(main, "t")
    assert after["rejected_timeout"] == before["rejected_timeout"] + 1
    assert "late" not in after["seen"]


async def test_status_code_429_option(main: Server) -> None:
    """/r: budget 1, max_queue=0, status_code=429."""
    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/r/block?tag=holder")
            await wait_stats(client, "r", lambda s: s["holders"] == 1)
            started = time.perf_counter()
            refused = await client.get("/r/block?tag=refused")
            elapsed = time.perf_counter() - started
            await release(client)
    assert refused.status_code == 429
    assert elapsed < 1.0
    assert retry_after(refused) >= 1


async def test_retry_after_grows_with_backlog(main: Server) -> None:
    """Retry-After = ceil((queued + 1) x service time / budget): 1 s ahead vs 6 s ahead.

    /ra0 and /ra5 have budget 1 and the same known service time (one 900 ms request each);
    /ra0 refuses with an empty queue, /ra5 with five requests queued.
    """
    with anyio.fail_after(30):
        async with http(main) as client:
            async with anyio.create_task_group() as tg:  # prime both service times at once
                tg.start_soon(client.get, "/ra0/work?ms=900")
                tg.start_soon(client.get, "/ra5/work?ms=900")
            async with gate_closed(client), anyio.create_task_group() as tg:
                tg.start_soon(client.get, "/ra0/block?tag=holder")
                tg.start_soon(client.get, "/ra5/block?tag=holder")
                empty = await wait_stats(client, "ra0", lambda s: s["holders"] == 1)
                await wait_stats(client, "ra5", lambda s: s["holders"] == 1)
                for i in range(5):
                    tg.start_soon(client.get, f"/ra5/block?tag=q{i}")
                deep = await wait_stats(client, "ra5", lambda s: s["waiting"] == 5)
                near_empty = await client.get("/ra0/block?tag=refused")
                backlogged = await client.get("/ra5/block?tag=refused")
                await release(client)
    assert near_empty.status_code == backlogged.status_code == 503
    assert 0.9 <= empty["service"] < 2.0
    assert 0.9 <= deep["service"] < 2.0
    assert retry_after(near_empty) == max(1, math.ceil(1 * empty["service"] / 1))
    assert retry_after(backlogged) == max(1, math.ceil(6 * deep["service"] / 1))
    assert retry_after(backlogged) >= 5 * retry_after(near_empty) // 2
    assert retry_after(backlogged) > retry_after(near_empty)


async def test_client_that_leaves_while_queued_gives_its_place_up(main: Server) -> None:
    """/a: fill both slots, queue a request on a raw socket, close it, watch the queue empty."""
    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            blockers: list[httpx.Response] = []

            async def block(tag: str) -> None:
                blockers.append(await client.get(f"/a/block?tag={tag}"))

            tg.start_soon(block, "d-h0")
            tg.start_soon(block, "d-h1")
            before = await wait_stats(client, "a", lambda s: s["holders"] == 2)

            with socket.create_connection(("127.0.0.1", main.port), timeout=5) as raw:
                raw.sendall(b"GET /a/block?tag=d-gone HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                await wait_stats(client, "a", lambda s: s["waiting"] == 1)
            # The connection is closed: the middleware sees http.disconnect while queued.
            gone = await wait_stats(
                client, "a", lambda s: s["disconnected"] == before["disconnected"] + 1
            )
            assert gone["waiting"] == 0
            assert gone["queued"] == 0
            assert gone["cancellations"] == before["cancellations"] + 1
            assert gone["holders"] == 2

            # The next request takes the free place in the queue and is admitted once the
            # slots free up.
            nxt: list[httpx.Response] = []

            async def next_request() -> None:
                nxt.append(await client.get("/a/block?tag=d-next"))

            tg.start_soon(next_request)
            await wait_stats(client, "a", lambda s: s["waiting"] == 1)
            await release(client)
    assert [r.status_code for r in blockers] == [200, 200]
    assert nxt[0].status_code == 200
    after = stats_sync(main, "a")
    assert "d-gone" not in after["seen"]
    assert "d-next" in after["seen"]
    assert after["disconnected"] == before["disconnected"] + 1


async def test_queued_requests_are_served_in_arrival_order(main: Server) -> None:
    """/f: budget 1; four requests arrive 50 ms apart while the slot is held."""
    tags = [f"fifo{i}" for i in range(4)]
    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/f/block?tag=fifo-holder")
            await wait_stats(client, "f", lambda s: s["holders"] == 1)
            for position, tag in enumerate(tags, start=1):
                tg.start_soon(client.get, f"/f/block?tag={tag}")
                await anyio.sleep(0.05)
                await wait_stats(client, "f", lambda s, n=position: s["waiting"] == n)
            await release(client)
    seen = stats_sync(main, "f")["seen"]
    assert [tag for tag in seen if tag.startswith("fifo")][-5:] == ["fifo-holder", *tags]


async def test_server_timing_reports_the_queue_wait(main: Server) -> None:
    with anyio.fail_after(30):
        async with http(main) as client:
            quick = await client.get("/a/work")
            assert quick.status_code == 200
            waited: list[httpx.Response] = []

            async def queued() -> None:
                waited.append(await client.get("/a/work"))

            async with gate_closed(client), anyio.create_task_group() as tg:
                tg.start_soon(client.get, "/a/block?tag=st0")
                tg.start_soon(client.get, "/a/block?tag=st1")
                await wait_stats(client, "a", lambda s: s["holders"] == 2)
                tg.start_soon(queued)
                await wait_stats(client, "a", lambda s: s["waiting"] == 1)
                await anyio.sleep(0.3)
                await release(client)
            health = await client.get("/a/health")
    assert queue_ms(quick) < 250
    assert waited[0].status_code == 200
    assert queue_ms(waited[0]) >= 250
    assert queue_ms(waited[0]) > queue_ms(quick)
    assert "server-timing" not in health.headers  # exempt: never queued


async def test_exempt_paths_and_callable_answer_while_full(main: Server) -> None:
    """Slots and queue full on /a: /health (default list) and /control/* (callable) still answer."""
    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(client.get, f"/a/block?tag=ex-h{i}")
            await wait_stats(client, "a", lambda s: s["holders"] == 2)
            for i in range(3):
                tg.start_soon(client.get, f"/a/block?tag=ex-q{i}")
            await wait_stats(client, "a", lambda s: s["waiting"] == 3)
            timings = {}
            for path in ("/a/health", "/a/healthz", "/a/control/stats", "/a/control/limiter"):
                started = time.perf_counter()
                response = await client.get(path)
                timings[path] = time.perf_counter() - started
                # /healthz is exempt too but has no route: 404 from the app, not 503
                assert response.status_code == (404 if path == "/a/healthz" else 200), path
                assert "server-timing" not in response.headers
            refused = await client.get("/a/work")
            await release(client)
    assert refused.status_code == 503
    assert max(timings.values()) < 1.0, timings


async def test_queued_request_body_reaches_the_app(main: Server) -> None:
    """The middleware reads the request while it waits (to see disconnects) and replays it."""
    body = bytes(range(256)) * 1200  # 300 kB: several http.request messages
    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/a/block?tag=body-h0")
            tg.start_soon(client.get, "/a/block?tag=body-h1")
            await wait_stats(client, "a", lambda s: s["holders"] == 2)
            echoed: list[httpx.Response] = []

            async def post() -> None:
                echoed.append(await client.post("/a/echo", content=body))

            tg.start_soon(post)
            await wait_stats(client, "a", lambda s: s["waiting"] == 1)
            await anyio.sleep(0.2)  # the whole body arrives while the request waits
            await release(client)
    assert echoed[0].status_code == 200
    assert echoed[0].json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert queue_ms(echoed[0]) >= 150


async def test_async_endpoint_run_sync_reuses_the_request_grant(main: Server) -> None:
    """/n has budget 1: a second slot for run_sync would deadlock; it reuses the grant."""
    with anyio.fail_after(30):
        async with http(main) as client:
            response = await client.get("/n/nested")
    assert response.status_code == 200, response.text
    assert response.json() == {"outer": 1, "inner": 1, "holders": 1}


async def test_websocket_passes_through_while_full(main: Server) -> None:
    websockets_client = pytest.importorskip("websockets.asyncio.client")
    url = main.url.replace("http://", "ws://") + "/r/ws"
    with anyio.fail_after(30):
        async with http(main) as client, gate_closed(client), anyio.create_task_group() as tg:
            tg.start_soon(client.get, "/r/block?tag=ws-holder")
            await wait_stats(client, "r", lambda s: s["holders"] == 1)
            assert (await client.get("/r/work")).status_code == 429  # http is refused
            async with websockets_client.connect(url, open_timeout=5) as ws:
                await ws.send("hi")
                assert await ws.recv() == "echo:hi:1"  # the holder's token only
                during = await stats(client, "r")
            await release(client)
    assert during["holders"] == 1


async def test_overload_is_shed_and_health_stays_fast(main: Server) -> None:
    """Open-loop load at 3x capacity on /o: budget 2, each request holds its slot 300 ms.

    50 requests over 2.5 s (20/s against a capacity of 6.7/s), twice. Every request is
    answered 200 or 503 with Retry-After, nothing hangs, /health (a sync route: it needs a
    worker thread) answers within 50 ms every time it is polled but the slowest, and that one
    within 150 ms, half the time a request holds its slot: a poll that waited for a slot or for
    a worker thread would wait for a whole held request. The one exception is for a single
    scheduling hiccup of the shared machine (a 55 ms poll among 31 with a 3 ms median was seen
    in 1 of 5 runs on 2026-12-05). As a sanity bound, the server's RSS grows by less than
    50 MB from one burst to the next.

    The endpoint sleeps rather than computes so that the capacity is exact and the health
    bound measures the server (event loop, worker threads, admission), not how the machine's
    two cores are shared: see the CPU-bound test below.
    """
    process = psutil.Process(main.pid)
    with anyio.fail_after(60):
        async with http(main, timeout=15) as client:
            assert (await client.get("/o/work?ms=10")).status_code == 200  # warm up
            first = await overload_burst(client, main.url, "/o/work?ms=300")
            rss_first = process.memory_info().rss
            second = await overload_burst(client, main.url, "/o/work?ms=300")
            rss_second = process.memory_info().rss
    for burst in (first, second):
        burst.check(health_bound=0.050, slowest_bound=0.150)
    growth = rss_second - rss_first
    assert growth < 50 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB between bursts"


async def test_cpu_bound_overload_is_shed(main: Server) -> None:
    """The same load with 300 ms of numpy per request: budget 2 is every core of this machine.

    Shedding and Retry-After are as above. /health only gets a sanity bound here: with the
    budget at the machine's two cores, its latency is the kernel's scheduling of the loop
    thread against the work (and anything else running on the machine).
    """
    with anyio.fail_after(60):
        async with http(main, timeout=15) as client:
            assert (await client.get("/o/burn?ms=10")).status_code == 200  # warm up
            burst = await overload_burst(client, main.url, "/o/burn?ms=300")
    burst.check(health_bound=2.0)


class OverloadBurst:
    def __init__(self) -> None:
        self.outcomes: list[tuple[int | str, str | None]] = []
        self.health: list[tuple[int, float]] = []
        self.elapsed = 0.0

    def check(self, health_bound: float, slowest_bound: float | None = None) -> None:
        """*health_bound*: every /health poll but the slowest; *slowest_bound* (default the
        same): the slowest one."""
        errors = [o for o in self.outcomes if isinstance(o[0], str)]
        assert not errors, f"requests failed or timed out: {errors[:5]}"
        statuses = [int(status) for status, _ in self.outcomes]
        assert len(statuses) == 50
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        assert statuses.count(503) >= 5, f"no load shedding at ~3x capacity: {statuses}"
        assert statuses.count(200) >= 5, statuses
        for status, header in self.outcomes:
            if status == 503:
                assert header is not None
                assert header.isdigit(), header
                assert int(header) >= 1, header
        assert self.elapsed < 15, f"the burst took {self.elapsed:.1f} s"
        latencies = sorted(seconds for _, seconds in self.health)
        assert len(latencies) >= 15, f"only {len(latencies)} health polls"
        assert all(status == 200 for status, _ in self.health), self.health
        summary = (
            f"/health slowest {latencies[-1] * 1000:.1f} ms, next {latencies[-2] * 1000:.1f} ms, "
            f"median {latencies[len(latencies) // 2] * 1000:.1f} ms over {len(latencies)} polls"
        )
        assert latencies[-2] < health_bound, summary
        assert latencies[-1] < (health_bound if slowest_bound is None else slowest_bound), summary


async def overload_burst(
    client: httpx.AsyncClient, url: str, path: str, requests: int = 50, interval: float = 0.05
) -> OverloadBurst:
    """Send *requests* to *path*, one every *interval* s whatever the answers; poll /o/health."""
    burst = OverloadBurst()
    stop = threading.Event()

    def poll_health() -> None:
        # Its own thread and connection, so the load generator's event loop cannot delay it.
        with httpx.Client(base_url=url, timeout=5, trust_env=False) as health_client:
            for _ in range(100):
                if stop.is_set():
                    return
                started = time.perf_counter()
                try:
                    status = health_client.get("/o/health").status_code
                except httpx.HTTPError:
                    status = 0
                burst.health.append((status, time.perf_counter() - started))
                stop.wait(max(0.0, 0.1 - (time.perf_counter() - started)))

    async def one() -> None:
        try:
            response = await client.get(path)
        except httpx.HTTPError as error:
            burst.outcomes.append((repr(error), None))
        else:
            burst.outcomes.append((response.status_code, response.headers.get("retry-after")))

    poller = threading.Thread(target=poll_health, daemon=True)
    started = time.perf_counter()
    poller.start()
    try:
        async with anyio.create_task_group() as tg:
            for i in range(requests):
                tg.start_soon(one)
                await anyio.sleep(max(0.0, started + (i + 1) * interval - time.perf_counter()))
    finally:
        burst.elapsed = time.perf_counter() - started
        stop.set()
        await anyio.to_thread.run_sync(poller.join, 10)
    return burst


# -- real uvicorn: lifespan, thread limiter --------------------------------------------------


async def test_lifespan_passes_through_and_thread_limiter_is_raised(tmp_path: Path) -> None:
    shutdown_file = tmp_path / "shutdown"
    with uvicorn_server(LIFESPAN_APP, env={"SHUTDOWN_FILE": str(shutdown_file)}) as server:
        async with http(server) as client:
            state = (await client.get("/state")).json()
        assert not shutdown_file.exists()
    assert state["startups"] == 1
    # budget 64: the middleware raised anyio's limiter (40) to 64 + 8 before the app's startup
    assert state["limiter_at_startup"] == 72
    assert state["limiter_now"] == 72
    assert shutdown_file.read_text() == "shutdown ran"


# -- real uvicorn: native threads of sync endpoints (torch) ---------------------------------


BUDGET = len(os.sched_getaffinity(0))  # torch's default intra-op threads: one per CPU


@pytest.fixture(scope="module")
def torch_server() -> Iterator[Server]:
    pytest.importorskip("torch")
    with uvicorn_server(TORCH_APP, env={"TEST_BUDGET": str(BUDGET)}) as server:
        yield server


@pytest.mark.torch
@pytest.mark.parametrize(
    ("prefix", "grant", "busy"),
    [
        ("elastic", BUDGET, BUDGET),  # a lone request gets the whole budget
        ("static", 1, 1),  # policy="static", threads=1
        ("plain", 1, BUDGET),  # plain APIRoute: the grant is there but nothing applies it
    ],
)
async def test_sync_endpoint_runs_its_grant_of_native_threads(
    torch_server: Server, prefix: str, grant: int, busy: int
) -> None:
    assert BUDGET >= 2, "needs at least two CPUs to tell one thread from the whole budget"
    with anyio.fail_after(120):
        async with http(torch_server, timeout=100) as client:
            response = await client.get(f"/{prefix}/busy")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["grant"] == grant
    assert result["busy"] == busy, result
    assert result["torch_threads"] == busy, result


@pytest.mark.torch
async def test_loop_thread_limits_survive_interleaved_requests(torch_server: Server) -> None:
    """static, threads=1, budget 2: A enters, B enters, A leaves, then B looks at its thread.

    Async slots hold tokens only: many tasks share the event loop's thread and leave in any
    order, so nothing can restore per-thread limits set there. The loop thread must keep its
    own limits throughout; CPU work under an async slot goes through run_sync.
    """
    with anyio.fail_after(30):
        async with http(torch_server) as client:
            await client.post("/static/control/reset")
            baseline = (await client.get("/static/control/loop_threads")).json()["threads"]
            probe: list[httpx.Response] = []

            async def run_probe() -> None:
                probe.append(await client.get("/static/async_probe"))

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.get, "/static/async_hold")
                    await wait_holders(client, 1)
                    tg.start_soon(run_probe)
                    await wait_holders(client, 2)
                    await client.post("/static/control/set/a_release")
                    await wait_holders(client, 1)
                    await client.post("/static/control/set/b_go")
            finally:
                with anyio.CancelScope(shield=True):
                    await client.post("/static/control/set/a_release")
                    await client.post("/static/control/set/b_go")
            after = (await client.get("/static/control/loop_threads")).json()["threads"]
    inside = probe[0].json()
    assert inside["grant"] == 1
    assert inside["loop_threads"] == baseline, "async slots must not touch the loop thread"
    assert after == baseline, f"loop thread left at {after} threads, was {baseline}"


async def wait_holders(client: httpx.AsyncClient, holders: int) -> None:
    deadline = time.monotonic() + 10
    while (await client.get("/static/control/stats")).json()["holders"] != holders:
        assert time.monotonic() < deadline, f"never {holders} holders"
        await anyio.sleep(0.02)


# -- in-process: pure logic ------------------------------------------------------------------


def _plain_app(record: list[str] | None = None) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if record is not None:
            record.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    return app


async def _hold(slots: CpuSlots, k: int, held: anyio.Event, done: anyio.Event) -> None:
    async with slots.async_slot(k):
        held.set()
        await done.wait()


@asynccontextmanager
async def whole_budget_held(slots: CpuSlots) -> AsyncIterator[None]:
    """Hold every token from another task (a slot in *this* task would be reused as nested)."""
    held, done = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, slots, slots.budget, held, done)
        await held.wait()
        try:
            yield
        finally:
            done.set()


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_exempt_paths_and_callable_never_wait(anyio_backend: str) -> None:
    slots = CpuSlots(1, native_limits=False)
    record: list[str] = []
    middleware = BudgetMiddleware(
        _plain_app(record),
        slots,
        max_queue=0,
        exempt_paths=("/health", "/metrics"),
        exempt=lambda path: path.startswith("/internal/"),
    )
    with anyio.fail_after(10):
        async with whole_budget_held(slots), asgi_client(middleware) as client:
            for path in ("/health", "/health/deep", "/metrics", "/metrics/x", "/internal/a"):
                response = await client.get(path)
                assert response.status_code == 200, path
                assert "server-timing" not in response.headers
            # Not exempt: the default list was replaced, and prefixes match whole segments.
            for path in ("/healthz", "/healthcheck", "/internal", "/api"):
                response = await client.get(path)
                assert response.status_code == 503, path
                assert retry_after(response) == 1
    assert middleware.admission.rejected_full == 4
    assert record == ["/health", "/health/deep", "/metrics", "/metrics/x", "/internal/a"]


@pytest.mark.parametrize(
    ("kwargs", "error", "shown"),
    [
        ({"max_queue": -1}, ValueError, "-1"),
        ({"max_queue": 1.5}, ValueError, "1.5"),
        ({"max_queue": True}, ValueError, "True"),
        ({"status_code": 500}, ValueError, "500"),
        ({"status_code": 200}, ValueError, "200"),
        ({"queue_timeout": 0}, ValueError, "0"),
        ({"queue_timeout": -1.5}, ValueError, "-1.5"),
        ({"queue_timeout": "5"}, ValueError, "'5'"),
        ({"queue_timeout": float("nan")}, ValueError, "nan"),
        ({"exempt_paths": ("health",)}, ValueError, "'health'"),
        ({"exempt_paths": ("/ok", "metrics")}, ValueError, "'metrics'"),
        ({"thread_limiter": 0}, ValueError, "0"),
        ({"thread_limiter": -3}, ValueError, "-3"),
        ({"thread_limiter": 2.5}, ValueError, "2.5"),
        ({"slots": "two"}, TypeError, "'two'"),
        ({"slots": 2}, TypeError, "2"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], error: type[Exception], shown: str) -> None:
    with pytest.raises(error, match=re.escape(shown)):
        BudgetMiddleware(_plain_app(), **{"slots": CpuSlots(2, native_limits=False), **kwargs})


def test_slots_must_be_cpu_slots_not_a_plain_token_pool() -> None:
    with pytest.raises(TypeError, match="TokenPool"):
        BudgetMiddleware(_plain_app(), TokenPool(2))  # type: ignore[arg-type]


def test_queue_timeout_refuses_bool() -> None:
    with pytest.raises(ValueError, match="True"):
        BudgetMiddleware(_plain_app(), CpuSlots(2, native_limits=False), queue_timeout=True)


def test_exempt_must_be_callable() -> None:
    with pytest.raises(TypeError, match="/admin"):
        BudgetMiddleware(_plain_app(), CpuSlots(2, native_limits=False), exempt="/admin")  # type: ignore[arg-type]


def test_defaults() -> None:
    middleware = BudgetMiddleware(_plain_app(), CpuSlots(3, native_limits=False))
    admission = middleware.admission
    assert admission.max_queue == 24  # 8 x budget
    assert admission.queue_timeout == 30.0
    assert admission.status_code == 503
    assert admission.exempt_paths == ("/health", "/healthz", "/livez", "/readyz", "/metrics")
    assert (
        BudgetMiddleware(
            _plain_app(), CpuSlots(1, native_limits=False), queue_timeout=None
        ).admission.queue_timeout
        is None
    )


def test_retry_after_formula() -> None:
    """ceil((queued + 1) x mean service / budget), at least 1; the mean is an EWMA (0.2)."""
    admission = BudgetMiddleware(
        _plain_app(), CpuSlots(2, native_limits=False), max_queue=10
    ).admission
    assert admission.retry_after() == 1  # nothing served yet
    admission.record_service(1.5)
    assert admission.retry_after() == 1  # ceil(1 x 1.5 / 2)
    for _ in range(5):
        assert admission.try_enqueue()
    assert admission.retry_after() == math.ceil(6 * 1.5 / 2)
    admission.record_service(4.0)  # 1.5 + 0.2 x (4.0 - 1.5) = 2.0
    assert admission.retry_after() == math.ceil(6 * 2.0 / 2)
    rejection = admission.rejection("queue full")
    assert (rejection.status, rejection.retry_after, rejection.reason) == (503, 6, "queue full")
    for _ in range(5):
        admission.dequeue(admitted=True)
    assert admission.retry_after() == 1
    assert admission.admitted == 5


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_thread_limiter_sizing(anyio_backend: str) -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    original = limiter.total_tokens
    try:
        limiter.total_tokens = 5
        async with asgi_client(
            BudgetMiddleware(_plain_app(), CpuSlots(4, native_limits=False))
        ) as client:
            await client.get("/x")
        assert limiter.total_tokens == 12  # raised to budget + 8
        limiter.total_tokens = 100
        async with asgi_client(
            BudgetMiddleware(_plain_app(), CpuSlots(4, native_limits=False))
        ) as client:
            await client.get("/x")
        assert limiter.total_tokens == 100  # never lowered
        fixed = BudgetMiddleware(_plain_app(), CpuSlots(4, native_limits=False), thread_limiter=7)
        async with asgi_client(fixed) as client:
            await client.get("/x")
            assert limiter.total_tokens == 7
            limiter.total_tokens = 9
            await client.get("/x")
            assert limiter.total_tokens == 9  # sized once per event loop
        limiter.total_tokens = 3
        untouched = BudgetMiddleware(
            _plain_app(), CpuSlots(4, native_limits=False), thread_limiter=False
        )
        async with asgi_client(untouched) as client:
            await client.get("/health")
        assert limiter.total_tokens == 3
    finally:
        limiter.total_tokens = original


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_run_sync_in_admitted_async_endpoint_reuses_grant(anyio_backend: str) -> None:
    slots = CpuSlots(1, native_limits=False)
    api = FastAPI()

    @api.get("/nested")
    async def nested() -> dict[str, Any]:
        outer = slots.current_grant()
        inner = await slots.run_sync(slots.current_grant, timeout=5)
        return {"outer": outer, "inner": inner, "holders": slots.snapshot().holders}

    with anyio.fail_after(10):
        async with asgi_client(BudgetMiddleware(api, slots)) as client:
            response = await client.get("/nested")
    assert response.json() == {"outer": 1, "inner": 1, "holders": 1}
    assert slots.snapshot().in_use == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_disconnect_while_queued_in_process(anyio_backend: str) -> None:
    slots = CpuSlots(1, native_limits=False)
    record: list[str] = []
    middleware = BudgetMiddleware(_plain_app(record), slots, max_queue=1, queue_timeout=10)
    leave = anyio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/queued", "method": "GET", "headers": []}
    with anyio.fail_after(10):
        async with whole_budget_held(slots), anyio.create_task_group() as tg:
            tg.start_soon(middleware, scope, receive, send)
            while slots.snapshot().waiting != 1:
                await anyio.sleep(0.005)
            assert middleware.admission.queued == 1
            leave.set()
            while middleware.admission.queued:
                await anyio.sleep(0.005)
    assert sent == []  # nobody to answer
    assert record == []
    admission = middleware.admission
    assert (admission.disconnected, admission.admitted, admission.rejected_timeout) == (1, 0, 0)
    assert slots.snapshot().waiting == 0
    assert slots.snapshot().in_use == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_server_timing_can_be_turned_off(anyio_backend: str) -> None:
    slots = CpuSlots(1, native_limits=False)
    async with asgi_client(BudgetMiddleware(_plain_app(), slots, server_timing=False)) as client:
        response = await client.get("/x")
    assert response.status_code == 200
    assert "server-timing" not in response.headers
    async with asgi_client(BudgetMiddleware(_plain_app(), slots)) as client:
        response = await client.get("/x")
    assert queue_ms(response) < 100


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_request_arriving_with_an_admitted_one_is_queued_not_refused(
    anyio_backend: str,
) -> None:
    """budget 1, max_queue 1: A takes the slot, B (same loop turn) must wait for it, not 503."""
    slots = CpuSlots(1, native_limits=False)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await anyio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = BudgetMiddleware(app, slots, max_queue=1, queue_timeout=5)
    statuses: dict[str, int] = {}

    async def call(name: str) -> None:
        async def receive() -> dict[str, Any]:
            await anyio.sleep(30)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[name] = message["status"]

        await middleware({"type": "http", "path": "/", "headers": []}, receive, send)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "A")
            tg.start_soon(call, "B")
    assert statuses == {"A": 200, "B": 200}
    assert middleware.admission.rejected_full == 0


async def test_queue_bound_holds_when_the_free_tokens_are_too_few() -> None:
    slots = CpuSlots(3, policy="static", threads=2, native_limits=False)
    middleware = BudgetMiddleware(_plain_app(), slots, max_queue=1, queue_timeout=5)
    statuses: list[int] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            await anyio.sleep(30)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await middleware({"type": "http", "path": "/", "headers": []}, receive, send)

    held, done = anyio.Event(), anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold, slots, 2, held, done)  # 2 of 3 tokens: one stays free
            await held.wait()
            try:
                for _ in range(3):
                    tg.start_soon(call)
                    await anyio.sleep(0.01)
                await anyio.sleep(0.2)
                # one request fills the queue (max_queue=1); the other two are refused at once
                assert slots.snapshot().waiting == 1
                assert statuses == [503, 503]
            finally:
                done.set()
    assert statuses == [503, 503, 200]
    assert middleware.admission.rejected_full == 2


def test_lifespan_and_websocket_through_testclient() -> None:
    """In-process: lifespan events reach the app; a websocket connects while http is refused."""
    events: list[str] = []

    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    api = FastAPI(lifespan=asynccontextmanager(lifespan))

    @api.get("/x")
    def x() -> dict[str, bool]:
        return {"ok": True}

    @api.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("echo:" + await websocket.receive_text())
        await websocket.close()

    slots = CpuSlots(1, native_limits=False)
    middleware = BudgetMiddleware(api, slots, max_queue=0)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with slots.slot():
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        with TestClient(middleware) as client:
            assert events == ["startup"]
            assert client.get("/x").status_code == 503
            with client.websocket_connect("/ws") as websocket:
                websocket.send_text("hi")
                assert websocket.receive_text() == "echo:hi"
    finally:
        done.set()
        holder.join(10)
    assert events == ["startup", "shutdown"]
    assert middleware.admission.admitted == 0
