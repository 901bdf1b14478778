"""Serve app.py in one mode: ``python serve.py --mode threadbudget --port 8000``.

Sets ``INFERENCE_MODE`` and replaces this process with uvicorn (``os.execv``), so the process id
the caller started is the server itself: the load test samples that process's threads and CPU
time. Binds 127.0.0.1 only, one worker process, no access log (a log line per request would add
CPU work to what is measured).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def uvicorn_argv(port: int, host: str = "127.0.0.1") -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "app:app",
        "--app-dir",
        str(HERE),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
        # Longer than the pauses between load-test runs, so an idle keep-alive connection is
        # not closed by the server at the moment the client reuses it.
        "--timeout-keep-alive",
        "60",
        # Bounded shutdown: the load test stops the server even with requests still in flight.
        "--timeout-graceful-shutdown",
        "5",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=("default", "one-thread", "threadbudget"), default="default"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="threadbudget mode: requests that may wait for a slot (default: 8 x budget)",
    )
    parser.add_argument(
        "--policy",
        choices=("elastic", "static"),
        default=None,
        help="threadbudget mode: grant policy of the slots (default: elastic)",
    )
    args = parser.parse_args(argv)
    os.environ["INFERENCE_MODE"] = args.mode
    if args.policy is not None:
        os.environ["INFERENCE_POLICY"] = args.policy
    if args.max_queue is not None:
        os.environ["INFERENCE_MAX_QUEUE"] = str(args.max_queue)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = uvicorn_argv(args.port)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
