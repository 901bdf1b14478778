"""Real servers for the middleware tests: uvicorn, and a threaded WSGI server, in subprocesses.

Each context manager writes the app's source into a fresh temporary directory, puts that
directory and the repository root on ``PYTHONPATH``, starts the server on a free port of
127.0.0.1, waits (at most 30 s) until a health route answers 200, yields a :class:`Server`,
and always stops the process afterwards (SIGTERM, then SIGKILL after 10 s) and removes the
directory, even when the test fails. Nothing listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from .conftest import python_env

__all__ = [
    "HOST",
    "Server",
    "free_port",
    "has_waitress",
    "uvicorn_server",
    "wsgi_server",
]

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 3

# A threaded wsgiref server, for when waitress is not installed (or asked for by name).
_WSGIREF_RUNNER = """
import importlib
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

target, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
module_name, _, attribute = target.partition(":")
app = getattr(importlib.import_module(module_name), attribute)


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = False


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


server = ThreadingWSGIServer((host, port), QuietHandler)
server.set_app(app)
print(f"serving on http://{host}:{port}", flush=True)
server.serve_forever(poll_interval=0.1)
"""


@dataclass
class Server:
    """A running server: its base URL, process and log."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (a start that loses the race retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def has_waitress() -> bool:
    return importlib.util.find_spec("waitress") is not None


@contextmanager
def uvicorn_server(
    source: str,
    *,
    module: str = "app",
    app: str = "app",
    env: Mapping[str, str] | None = None,
    health: str = "/health",
    args: Sequence[str] = (),
) -> Iterator[Server]:
    """Run ``uvicorn module:app`` with *source* as ``module.py``; yields the running server."""

    def argv(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:{app}",
            "--host",
            HOST,
            "--port",
            str(port),
            "--lifespan",
            "on",
            "--no-access-log",
            # Requests still blocked at teardown must not hold the shutdown up.
            "--timeout-graceful-shutdown",
            "3",
            *args,
        ]

    with _serve({f"{module}.py": source}, argv, env=env, health=health) as server:
        yield server


@contextmanager
def wsgi_server(
    source: str,
    *,
    module: str = "app",
    app: str = "app",
    kind: str | None = None,
    threads: int = 24,
    env: Mapping[str, str] | None = None,
    health: str = "/health",
) -> Iterator[Server]:
    """Run a threaded WSGI server (waitress, else wsgiref with ThreadingMixIn) on *source*.

    *kind* is ``"waitress"``, ``"wsgiref"`` or ``None`` (waitress when installed).
    """
    if kind is None:
        kind = "waitress" if has_waitress() else "wsgiref"
    files = {f"{module}.py": source}
    if kind == "waitress":

        def argv(port: int) -> list[str]:
            return [
                sys.executable,
                "-m",
                "waitress",
                f"--listen={HOST}:{port}",
                f"--threads={threads}",
                "--connection-limit=200",
                f"{module}:{app}",
            ]

    elif kind == "wsgiref":
        files["_threadbudget_wsgiref_runner.py"] = _WSGIREF_RUNNER

        def argv(port: int) -> list[str]:
            return [
                sys.executable,
                "_threadbudget_wsgiref_runner.py",
                f"{module}:{app}",
                HOST,
                str(port),
            ]

    else:
        raise ValueError(f"kind must be 'waitress', 'wsgiref' or None, got {kind!r}")
    with _serve(files, argv, env=env, health=health) as server:
        yield server


@contextmanager
def _serve(
    files: Mapping[str, str],
    argv: Callable[[int], list[str]],
    *,
    env: Mapping[str, str] | None,
    health: str,
) -> Iterator[Server]:
    directory = Path(tempfile.mkdtemp(prefix="threadbudget-server-"))
    try:
        for name, text in files.items():
            (directory / name).write_text(textwrap.dedent(text))
        environment = python_env(
            PYTHONPATH=os.pathsep.join([str(directory), str(REPO_ROOT)]),
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        environment.update(env or {})
        server = _start(directory, argv, environment, health)
        try:
            yield server
        finally:
            stop(server.process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _start(
    directory: Path, argv: Callable[[int], list[str]], env: dict[str, str], health: str
) -> Server:
    """Start the server, retrying on a new port if another process took the free one."""
    for attempt in range(_PORT_ATTEMPTS):
        port = free_port()
        log_path = directory / f"server-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv(port),
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = Server(f"http://{HOST}:{port}", port, process, directory, log_path)
        try:
            ready = _wait_ready(server, health)
        except BaseException:
            stop(process)
            raise
        if ready:
            return server
        stop(process)
        text = server.log()
        if "address already in use" not in text.lower():
            raise RuntimeError(f"server exited with {process.returncode} while starting:\n{text}")
    raise RuntimeError(f"no free port after {_PORT_ATTEMPTS} attempts:\n{server.log()}")


def _wait_ready(server: Server, health: str) -> bool:
    """True once *health* answers 200; False if the process exited; raises after 30 s."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(base_url=server.url, timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                if client.get(health).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise RuntimeError(
        f"server at {server.url} not ready within {STARTUP_TIMEOUT} s:\n{server.log()[-4000:]}"
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; always reaps the process."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
        except ProcessLookupError:
            pass
    process.wait()
