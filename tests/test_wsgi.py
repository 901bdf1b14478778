"""The WSGI BudgetMiddleware in a real threaded WSGI server, and called directly.

The server tests run one WSGI process (waitress when installed, else wsgiref with
ThreadingMixIn) serving several plain WSGI apps, each behind its own BudgetMiddleware and
CpuSlots, under a path prefix, plus a Flask app wrapped with
``app.wsgi_app = BudgetMiddleware(app.wsgi_app, slots)``. Control routes (``/control/...``)
are exempt through a custom ``exempt`` callable; blocking routes wait on a gate the tests
close and open (never longer than 20 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from threadbudget import CpuSlots, TokenPool
from threadbudget.wsgi import BudgetMiddleware

from .servers import Server, wsgi_server

WSGI_APP = r'''
import json
import threading
import time
from urllib.parse import parse_qs

import numpy  # noqa: F401  (loads OpenBLAS, a process-wide pool that slots size)
from threadpoolctl import threadpool_info

import threadbudget
from threadbudget.wsgi import BudgetMiddleware

GATE = threading.Event()  # /block waits while the gate is closed, 20 s at most
GATE.set()
STREAMS = {"started": 0, "closed": 0}

CONFIGS = {
    # name: (CpuSlots arguments, BudgetMiddleware options)
    "a": ({"budget": 2, "policy": "static"}, {"max_queue": 2, "queue_timeout": 10.0}),
    "e": ({"budget": 2}, {}),
    "t": ({"budget": 1}, {"max_queue": 2, "queue_timeout": 1.0}),
    "r": ({"budget": 1}, {"max_queue": 0, "status_code": 429}),
    "s": ({"budget": 1}, {"max_queue": 2, "queue_timeout": 10.0}),
}
SLOTS = {}
MIDDLEWARE = {}


def blas_threads():
    return sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})


def stats_of(name):
    snapshot = SLOTS[name].snapshot()
    admission = MIDDLEWARE[name].admission
    return {
        "in_use": snapshot.in_use,
        "holders": snapshot.holders,
        "waiting": snapshot.waiting,
        "queued": admission.queued,
        "admitted": admission.admitted,
        "rejected_full": admission.rejected_full,
        "rejected_timeout": admission.rejected_timeout,
        "streams": dict(STREAMS),
    }


def idle():
    return all(
        s.in_use == 0 and s.waiting == 0 and MIDDLEWARE[n].admission.queued == 0
        for n, s in ((n, SLOTS[n].snapshot()) for n in SLOTS)
    )


def respond(start_response, payload, status="200 OK"):
    body = json.dumps(payload).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


def stream(count, ms):
    STREAMS["started"] += 1
    try:
        for i in range(count):
            yield f"chunk {i}\n".encode()
            time.sleep(ms / 1000)
    finally:
        STREAMS["closed"] += 1


def failing_stream():
    yield b"first\n"
    raise RuntimeError("boom while streaming")


def control(name, path, start_response):
    if path == "/control/stats":
        return respond(start_response, stats_of(name))
    if path == "/control/idle":
        return respond(start_response, {"idle": idle()})
    if path == "/control/hold":
        GATE.clear()
        return respond(start_response, {})
    if path == "/control/release":
        GATE.set()
        return respond(start_response, {})
    if path == "/control/blas":
        return respond(start_response, {"blas": blas_threads()})
    return None


def make(name, slot_options, options):
    slots = SLOTS[name] = threadbudget.CpuSlots(**slot_options)

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if path == "/health":
            return respond(start_response, {"ok": True})
        if path == "/info":
            payload = {
                "grant": slots.current_grant(),
                "blas": blas_threads(),
                "script_name": environ.get("SCRIPT_NAME"),
            }
            return respond(start_response, payload)
        if path == "/block":
            released = GATE.wait(20)
            return respond(start_response, {"grant": slots.current_grant(), "released": released})
        if path == "/stream":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return stream(int(query.get("n", "5")), float(query.get("ms", "100")))
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/boom-stream":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return failing_stream()
        answer = control(name, path, start_response)
        if answer is not None:
            return answer
        return respond(start_response, {"path": path}, "404 Not Found")

    middleware = MIDDLEWARE[name] = BudgetMiddleware(
        app, slots, exempt=lambda path: path.startswith("/control/"), **options
    )
    return middleware


APPS = {name: make(name, *config) for name, config in CONFIGS.items()}

try:
    import flask
except ImportError:
    flask = None

if flask is not None:
    flask_app = flask.Flask(__name__)
    flask_slots = SLOTS["flask"] = threadbudget.CpuSlots(1)

    @flask_app.get("/hello")
    def hello():
        return flask.jsonify(grant=flask_slots.current_grant(), root=flask.request.script_root)

    @flask_app.get("/block")
    def flask_block():
        return flask.jsonify(released=GATE.wait(20))

    @flask_app.get("/boom")
    def flask_boom():
        raise RuntimeError("boom")

    @flask_app.get("/control/stats")
    def flask_stats():
        return flask.jsonify(stats_of("flask"))

    flask_app.wsgi_app = MIDDLEWARE["flask"] = BudgetMiddleware(
        flask_app.wsgi_app,
        flask_slots,
        max_queue=0,
        exempt=lambda path: path.startswith("/control/"),
    )
    APPS["flask"] = flask_app


def app(environ, start_response):
    """/<name>/rest goes to app <name> as /rest (SCRIPT_NAME /<name>); anything else to "a"."""
    head, _, rest = environ.get("PATH_INFO", "")[1:].partition("/")
    target = APPS.get(head)
    if target is None:
        return APPS["a"](environ, start_response)
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + "/" + head
    environ["PATH_INFO"] = "/" + rest
    return target(environ, start_response)
'''


# -- helpers -------------------------------------------------------------------------------


def client(server: Server, timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=timeout, trust_env=False)


def get(server: Server, path: str, timeout: float = 10.0) -> httpx.Response:
    with client(server, timeout) as c:
        return c.get(path)


def stats(server: Server, name: str) -> dict[str, Any]:
    response = get(server, f"/{name}/control/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def wait_stats(
    server: Server, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        current = stats(server, name)
        if predicate(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout} s; stats: {current}")
        time.sleep(0.02)


@contextmanager
def gate_closed(server: Server) -> Iterator[None]:
    get(server, "/control/hold").raise_for_status()
    try:
        yield
    finally:
        get(server, "/control/release")


def release(server: Server) -> None:
    get(server, "/control/release").raise_for_status()


@contextmanager
def background(server: Server) -> Iterator[Callable[[str], Future[httpx.Response]]]:
    """Send requests from worker threads; every one is answered or fails within 30 s."""
    with ThreadPoolExecutor(max_workers=8) as pool:

        def submit(path: str) -> Future[httpx.Response]:
            return pool.submit(get, server, path, 30.0)

        yield submit


def retry_after(response: httpx.Response) -> int:
    value = response.headers.get("retry-after")
    assert value is not None, f"{response.status_code} without Retry-After: {response.headers}"
    assert value.isdigit(), value
    assert int(value) >= 1
    return int(value)


def queue_ms(headers: Any) -> float:
    value = dict(headers).get("Server-Timing") or headers.get("server-timing")
    assert value is not None, f"no Server-Timing in {headers}"
    assert value.startswith("queue;dur="), value
    return float(value.removeprefix("queue;dur="))


@pytest.fixture(scope="module")
def wsgi_main() -> Iterator[Server]:
    with wsgi_server(WSGI_APP) as server:
        yield server


@pytest.fixture
def main(wsgi_main: Server) -> Iterator[Server]:
    """The shared server, left idle for the next test: gate open, nothing held or queued."""
    yield wsgi_main
    release(wsgi_main)
    deadline = time.monotonic() + 25
    while not get(wsgi_main, "/control/idle").json()["idle"]:
        assert time.monotonic() < deadline, "the server did not go idle after the test"
        time.sleep(0.05)


# -- real server -----------------------------------------------------------------------------


def test_grant_and_native_pools_inside_the_app(main: Server) -> None:
    """The slot is taken in the thread that runs the app, so its limits apply right there."""
    elastic = get(main, "/e/info")
    static = get(main, "/a/info")
    outside = get(main, "/e/control/blas")
    assert elastic.status_code == static.status_code == 200
    # A lone request gets the whole elastic budget, and only then may OpenBLAS (process-wide)
    # run more than one thread; it rests at one outside slots.
    assert elastic.json() == {"grant": 2, "blas": [2], "script_name": "/e"}
    assert static.json() == {"grant": 1, "blas": [1], "script_name": "/a"}
    assert outside.json() == {"blas": [1]}
    assert queue_ms(elastic.headers) < 250


def test_overflow_is_refused_at_once_and_exempt_paths_still_answer(main: Server) -> None:
    """/a: budget 2 (static), max_queue 2: the 5th concurrent request gets 503 at once."""
    with gate_closed(main), background(main) as submit:
        blockers = [submit("/a/block") for _ in range(2)]
        wait_stats(main, "a", lambda s: s["holders"] == 2)
        queued = [submit("/a/block") for _ in range(2)]
        before = wait_stats(main, "a", lambda s: s["waiting"] == 2)

        started = time.perf_counter()
        over = get(main, "/a/block")
        elapsed = time.perf_counter() - started
        exempt = {path: get(main, path) for path in ("/a/health", "/a/control/stats")}
        release(main)
        answers = [f.result(timeout=30) for f in blockers + queued]
    assert over.status_code == 503
    assert elapsed < 1.0, f"overflow took {elapsed:.2f} s (queue_timeout is 10 s)"
    assert retry_after(over) >= 1
    assert "queue full" in over.text
    assert "server-timing" not in over.headers
    for path, response in exempt.items():
        assert response.status_code == 200, path
        assert "server-timing" not in response.headers, path
    assert [r.status_code for r in answers] == [200] * 4
    assert all(r.json() == {"grant": 1, "released": True} for r in answers)
    assert stats(main, "a")["rejected_full"] == before["rejected_full"] + 1


def test_queue_timeout_answers_503_after_about_queue_timeout(main: Server) -> None:
    """/t: budget 1, queue_timeout 1.0 s."""
    with gate_closed(main), background(main) as submit:
        holder = submit("/t/block")
        before = wait_stats(main, "t", lambda s: s["holders"] == 1)
        started = time.perf_counter()
        late = get(main, "/t/block")
        elapsed = time.perf_counter() - started
        release(main)
        assert holder.result(timeout=30).status_code == 200
    assert late.status_code == 503
    assert 0.8 <= elapsed <= 3.0, f"queue timeout of 1.0 s answered after {elapsed:.2f} s"
    assert retry_after(late) >= 1
    assert "queue timeout" in late.text
    assert stats(main, "t")["rejected_timeout"] == before["rejected_timeout"] + 1


def test_status_code_429_option(main: Server) -> None:
    with gate_closed(main), background(main) as submit:
        holder = submit("/r/block")
        wait_stats(main, "r", lambda s: s["holders"] == 1)
        refused = get(main, "/r/info")
        release(main)
        assert holder.result(timeout=30).status_code == 200
    assert refused.status_code == 429
    assert retry_after(refused) >= 1


def test_server_timing_reports_the_queue_wait(main: Server) -> None:
    quick = get(main, "/a/info")
    with gate_closed(main), background(main) as submit:
        blockers = [submit("/a/block") for _ in range(2)]
        wait_stats(main, "a", lambda s: s["holders"] == 2)
        waited = submit("/a/info")
        wait_stats(main, "a", lambda s: s["waiting"] == 1)
        time.sleep(0.3)
        release(main)
        slow = waited.result(timeout=30)
        for blocker in blockers:
            blocker.result(timeout=30)
    assert quick.status_code == slow.status_code == 200
    assert queue_ms(quick.headers) < 250
    assert queue_ms(slow.headers) >= 250
    assert queue_ms(slow.headers) > queue_ms(quick.headers)


def test_streamed_body_holds_the_slot_until_consumed(main: Server) -> None:
    """/s: budget 1. The slot is held while the generator body streams, and freed after."""
    before = stats(main, "s")
    with client(main) as c, c.stream("GET", "/s/stream?n=5&ms=100") as response:
        assert response.status_code == 200
        assert queue_ms(response.headers) < 250
        chunks = response.iter_bytes()
        first = next(chunks)
        during = stats(main, "s")
        rest = b"".join(chunks)
    assert (first + rest).decode().splitlines() == [f"chunk {i}" for i in range(5)]
    assert during["in_use"] == 1
    after = wait_stats(main, "s", lambda s: s["in_use"] == 0, timeout=5)
    assert after["streams"]["closed"] == before["streams"]["closed"] + 1
    assert get(main, "/s/info").json()["grant"] == 1


def test_client_leaving_mid_stream_frees_the_slot(main: Server) -> None:
    """The server closes the body when the client has gone; closing it releases the slot."""
    before = stats(main, "s")
    with client(main) as c, c.stream("GET", "/s/stream?n=100&ms=50") as response:
        assert next(response.iter_bytes()).startswith(b"chunk 0")
        assert stats(main, "s")["in_use"] == 1
    # Leaving the block closed the connection with 95+ chunks (5 s) still to come.
    after = wait_stats(main, "s", lambda s: s["in_use"] == 0, timeout=5)
    assert after["streams"]["closed"] == before["streams"]["closed"] + 1
    started = time.perf_counter()
    assert get(main, "/s/info").status_code == 200
    assert time.perf_counter() - started < 1.0


def test_app_that_raises_releases_the_slot(main: Server) -> None:
    """/s has budget 1: a leaked slot would leave every later request waiting."""
    boom = get(main, "/s/boom")
    assert boom.status_code == 500
    with client(main) as c:
        try:
            with c.stream("GET", "/s/boom-stream") as response:
                assert response.status_code == 200  # headers were sent before the failure
                body = b"".join(response.iter_bytes())
            assert body.startswith(b"first")
        except httpx.HTTPError:
            pass  # the server may cut the connection once the body fails
    wait_stats(main, "s", lambda s: s["in_use"] == 0, timeout=5)
    started = time.perf_counter()
    info = get(main, "/s/info")
    assert info.status_code == 200
    assert info.json()["grant"] == 1
    assert time.perf_counter() - started < 1.0


def test_flask_app_wrapped_through_wsgi_app(main: Server) -> None:
    pytest.importorskip("flask")
    hello = get(main, "/flask/hello")
    assert hello.status_code == 200
    assert hello.json() == {"grant": 1, "root": "/flask"}
    assert queue_ms(hello.headers) < 250
    with gate_closed(main), background(main) as submit:
        holder = submit("/flask/block")
        wait_stats(main, "flask", lambda s: s["holders"] == 1)
        refused = get(main, "/flask/hello")
        exempt = get(main, "/flask/control/stats")
        release(main)
        assert holder.result(timeout=30).json() == {"released": True}
    assert refused.status_code == 503
    assert retry_after(refused) >= 1
    assert exempt.status_code == 200
    # Flask turns the exception into a 500 itself; the slot is released all the same.
    assert get(main, "/flask/boom").status_code == 500
    wait_stats(main, "flask", lambda s: s["in_use"] == 0, timeout=5)
    assert get(main, "/flask/hello").status_code == 200


def test_wsgiref_threaded_server() -> None:
    """The same semantics in the standard library's server (threads from ThreadingMixIn)."""
    with wsgi_server(WSGI_APP, kind="wsgiref") as server:
        info = get(server, "/e/info")
        assert info.json()["grant"] == 2
        assert queue_ms(info.headers) < 250
        with gate_closed(server), background(server) as submit:
            holder = submit("/r/block")
            wait_stats(server, "r", lambda s: s["holders"] == 1)
            refused = get(server, "/r/info")
            release(server)
            assert holder.result(timeout=30).status_code == 200
        assert refused.status_code == 429
        assert retry_after(refused) >= 1
        with client(server) as c, c.stream("GET", "/s/stream?n=3&ms=20") as response:
            assert len(b"".join(response.iter_bytes()).splitlines()) == 3
        wait_stats(server, "s", lambda s: s["in_use"] == 0, timeout=5)
        assert get(server, "/s/boom").status_code == 500
        wait_stats(server, "s", lambda s: s["in_use"] == 0, timeout=5)


# -- in-process: pure logic ------------------------------------------------------------------


class StartResponse:
    """A fake start_response that records what the middleware passed on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], tuple[Any, ...]]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        self.calls.append((status, headers, exc_info))
        return lambda data: None

    @property
    def status(self) -> str:
        return self.calls[-1][0]

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.calls[-1][1])


def environ(path: str = "/") -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": ""}


@contextmanager
def whole_budget_held(slots: CpuSlots) -> Iterator[None]:
    """Hold every token from another thread (a slot in *this* thread would be reused as nested)."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with slots.slot(slots.budget):
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        yield
    finally:
        done.set()
        holder.join(10)


def grant_app(slots: CpuSlots, calls: list[str] | None = None) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if calls is not None:
            calls.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        grant = slots.current_grant()
        return [str(None if grant is None else int(grant)).encode()]

    return app


def test_admits_and_holds_the_slot_until_close() -> None:
    slots = CpuSlots(2, native_limits=False)
    middleware = BudgetMiddleware(grant_app(slots), slots)
    start_response = StartResponse()
    body = middleware(environ("/x"), start_response)
    try:
        assert b"".join(body) == b"2"  # a lone request: the whole elastic budget
        assert start_response.status == "200 OK"
        assert queue_ms(start_response.headers) < 100
        assert slots.snapshot().in_use == 2  # iterated, not closed: still held
        assert slots.current_grant() == 2
    finally:
        body.close()  # type: ignore[attr-defined]
    assert slots.snapshot().in_use == 0
    assert slots.current_grant() is None
    body.close()  # type: ignore[attr-defined]  # a second close is harmless
    assert slots.snapshot().in_use == 0
    assert middleware.admission.admitted == 1


def test_body_is_a_context_manager_and_closes_the_apps_body() -> None:
    slots = CpuSlots(1, native_limits=False)
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"a"

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Body:
        start_response("200 OK", [])
        return Body()

    with BudgetMiddleware(app, slots)(environ(), StartResponse()) as body:  # type: ignore[attr-defined]
        assert list(body) == [b"a"]
        assert slots.snapshot().in_use == 1
    assert closed == [True]
    assert slots.snapshot().in_use == 0


@pytest.mark.parametrize(
    ("status_code", "status"), [(503, "503 Service Unavailable"), (429, "429 Too Many Requests")]
)
def test_refuses_when_full(status_code: int, status: str) -> None:
    slots = CpuSlots(1, native_limits=False)
    calls: list[str] = []
    middleware = BudgetMiddleware(
        grant_app(slots, calls), slots, max_queue=0, status_code=status_code
    )
    start_response = StartResponse()
    with whole_budget_held(slots):
        started = time.perf_counter()
        body = middleware(environ("/x"), start_response)
        elapsed = time.perf_counter() - started
    assert elapsed < 1.0
    assert start_response.status == status
    assert start_response.headers["Retry-After"] == "1"
    assert "Server-Timing" not in start_response.headers
    assert b"queue full" in b"".join(body)
    assert calls == []
    assert middleware.admission.rejected_full == 1


def test_queue_timeout_in_process() -> None:
    slots = CpuSlots(1, native_limits=False)
    middleware = BudgetMiddleware(grant_app(slots), slots, queue_timeout=0.2)
    start_response = StartResponse()
    with whole_budget_held(slots):
        started = time.perf_counter()
        body = middleware(environ("/x"), start_response)
        elapsed = time.perf_counter() - started
    assert 0.16 <= elapsed < 1.5
    assert start_response.status.startswith("503")
    assert int(start_response.headers["Retry-After"]) >= 1
    assert b"queue timeout" in b"".join(body)
    assert middleware.admission.rejected_timeout == 1
    assert middleware.admission.queued == 0


def test_exempt_paths_and_callable_skip_admission() -> None:
    slots = CpuSlots(1, native_limits=False)
    calls: list[str] = []
    middleware = BudgetMiddleware(
        grant_app(slots, calls), slots, max_queue=0, exempt=lambda path: path.endswith(".css")
    )
    with whole_budget_held(slots):
        for path in ("/health", "/metrics/x", "/livez", "/static/site.css"):
            start_response = StartResponse()
            body = middleware(environ(path), start_response)
            assert isinstance(body, list)  # the app's own body, not wrapped
            assert b"".join(body) == b"None"  # no grant: never admitted
            assert "Server-Timing" not in start_response.headers
        refused = StartResponse()
        middleware(environ("/healthcheck"), refused)
    assert refused.status.startswith("503")
    assert calls == ["/health", "/metrics/x", "/livez", "/static/site.css"]


def test_app_raising_at_call_releases_the_slot() -> None:
    slots = CpuSlots(1, native_limits=False)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise RuntimeError("boom")

    middleware = BudgetMiddleware(app, slots)
    with pytest.raises(RuntimeError, match="boom"):
        middleware(environ(), StartResponse())
    assert slots.snapshot().in_use == 0
    assert slots.current_grant() is None
    assert middleware.admission.admitted == 1


def test_body_raising_while_iterated_releases_on_close() -> None:
    slots = CpuSlots(1, native_limits=False)
    finished: list[bool] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            yield b"one"
            raise RuntimeError("mid-stream")
        finally:
            finished.append(True)

    body = BudgetMiddleware(app, slots)(environ(), StartResponse())
    try:
        with pytest.raises(RuntimeError, match="mid-stream"):
            list(body)
        assert slots.snapshot().in_use == 1  # until the server closes the body
    finally:
        body.close()  # type: ignore[attr-defined]
    assert finished == [True]
    assert slots.snapshot().in_use == 0


def test_generator_app_calling_start_response_late_gets_server_timing() -> None:
    slots = CpuSlots(1, native_limits=False)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("X-App", "1")])  # runs at the first next(), not at call
        yield b"late"

    start_response = StartResponse()
    body = BudgetMiddleware(app, slots)(environ(), start_response)
    try:
        assert start_response.calls == []
        assert list(body) == [b"late"]
    finally:
        body.close()  # type: ignore[attr-defined]
    assert start_response.headers["X-App"] == "1"
    assert queue_ms(start_response.headers) < 100


def test_exc_info_reaches_the_server() -> None:
    slots = CpuSlots(1, native_limits=False)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        try:
            raise ValueError("late failure")
        except ValueError:
            import sys

            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"error"]

    start_response = StartResponse()
    body = BudgetMiddleware(app, slots, server_timing=False)(environ(), start_response)
    body.close()  # type: ignore[attr-defined]
    status, headers, exc_info = start_response.calls[-1]
    assert status.startswith("500")
    assert len(exc_info) == 1
    assert exc_info[0][0] is ValueError
    assert headers == []  # server_timing=False


def test_nested_slot_in_the_app_reuses_the_grant() -> None:
    """Budget 1: a second slot inside the request would deadlock; it reuses the grant."""
    slots = CpuSlots(1, native_limits=False)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with slots.slot(timeout=2) as inner:
            start_response("200 OK", [])
            outer = slots.current_grant()
            assert outer is not None
            return [f"{int(outer)}/{int(inner)}/{slots.snapshot().holders}".encode()]

    body = BudgetMiddleware(app, slots)(environ(), StartResponse())
    try:
        assert b"".join(body) == b"1/1/1"
    finally:
        body.close()  # type: ignore[attr-defined]


def test_app_can_format_its_grant_as_a_thread_count() -> None:
    """e.g. to set OMP_NUM_THREADS for a subprocess or a response header."""
    slots = CpuSlots(1, native_limits=False)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("X-Threads", f"{slots.current_grant()}")])
        return [str(slots.current_grant()).encode()]

    start_response = StartResponse()
    body = BudgetMiddleware(app, slots)(environ(), start_response)
    try:
        assert b"".join(body) == b"1"
        assert start_response.headers["X-Threads"] == "1"
    finally:
        body.close()  # type: ignore[attr-defined]


def test_concurrent_threads_never_exceed_the_budget() -> None:
    """Eight server threads at once through budget 2 (static): at most two inside at a time."""
    slots = CpuSlots(2, policy="static", native_limits=False)
    inside = 0
    peak = 0
    lock = threading.Lock()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.05)
        with lock:
            inside -= 1
        start_response("200 OK", [])
        return [b"ok"]

    middleware = BudgetMiddleware(app, slots, max_queue=8, queue_timeout=10)

    def serve() -> str:
        start_response = StartResponse()
        body = middleware(environ(), start_response)
        try:
            b"".join(body)
        finally:
            body.close()  # type: ignore[attr-defined]
        return start_response.status

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: serve(), range(8), timeout=30))
    assert statuses == ["200 OK"] * 8
    assert peak == 2
    assert middleware.admission.admitted == 8
    assert slots.snapshot().in_use == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "shown"),
    [
        ({"max_queue": -1}, ValueError, "-1"),
        ({"max_queue": False}, ValueError, "False"),
        ({"status_code": 500}, ValueError, "500"),
        ({"queue_timeout": 0}, ValueError, "0"),
        ({"queue_timeout": -2}, ValueError, "-2"),
        ({"exempt_paths": ["health"]}, ValueError, "'health'"),
        ({"slots": "two"}, TypeError, "'two'"),
        ({"slots": TokenPool(2)}, TypeError, "TokenPool"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], error: type[Exception], shown: str) -> None:
    slots = CpuSlots(2, native_limits=False)
    with pytest.raises(error, match=shown.replace("(", r"\(")):
        BudgetMiddleware(grant_app(slots), **{"slots": slots, **kwargs})
