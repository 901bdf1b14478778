"""CPU slots: the token pool wired to native thread limits, executors and anyio worker threads.

A unit of work that holds ``k`` tokens runs its per-thread native pools (OpenMP, torch's MKL)
with ``k`` threads, in the thread that does the work. Process-wide pools (OpenBLAS pthreads,
MKL's global setting, BLIS) cannot follow one thread's grant: they run one thread, are raised
when a slot holds the whole budget (nobody else can be inside them then), and go back to one
when the next smaller grant starts.
"""

from __future__ import annotations

import concurrent.futures
import functools
import sys
import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.lowlevel import RunVar

from ._controllers import ThreadSetter, registered_controllers
from ._detect import CpuBudget
from ._forksafety import track_for_fork
from ._pinning import CpuPinning, pinning_cpus
from ._plan import Plan, make_plan
from ._slots import DEFAULT_DEMAND_MEMORY, Grant, Policy, TokenPool
from ._warnings import warn

__all__ = [
    "CpuExecutor",
    "CpuSlots",
    "NativeThreadLimits",
    "activate",
    "deactivate",
    "set_default_thread_limiter",
    "sized_by_grant",
]

R = TypeVar("R")
P = ParamSpec("P")
_Undo = Callable[[], None]


class NativeThreadLimits:
    """Sets the calling thread's native limits to a grant and puts them back afterwards.

    The setters come from the registered controllers and are resolved again only when the set
    of imported modules has changed (a new native library may have arrived), so entering costs
    a few ctypes calls. Resolving also puts process-wide pools at one thread, their resting size
    under slots.
    """

    def __init__(self, budget: int, *, pinning: CpuPinning | None = None) -> None:
        self._budget = budget
        self._pinning = pinning
        self._lock = threading.Lock()
        self._modules_seen = -1
        self._shared_raised = False
        self._thread_setters: tuple[ThreadSetter, ...] = ()
        self._process_setters: tuple[ThreadSetter, ...] = ()
        track_for_fork(self)

    def _after_fork_in_child(self) -> None:
        # The parent may have forked while resolving; the child resolves again on first use.
        self._lock = threading.Lock()
        self._modules_seen = -1

    @property
    def pinned_cpus(self) -> tuple[int, ...] | None:
        return self._pinning.cpus if self._pinning is not None else None

    def refresh(self) -> None:
        """Look for newly loaded native libraries now (otherwise done on the next import)."""
        with self._lock:
            self._modules_seen = -1
        self._resolve()

    def _resolve(self) -> None:
        with self._lock:
            modules = len(sys.modules)
            if modules == self._modules_seen:
                return
            thread_setters: list[ThreadSetter] = []
            process_setters: list[ThreadSetter] = []
            for controller in registered_controllers():
                try:
                    if not controller.is_loaded():
                        continue
                    per_thread = controller.thread_setter()
                    shared = controller.process_setter()
                except Exception as error:  # one broken controller must not stop the work
                    warn(f"controller {controller.name!r} failed to resolve: {error!r}")
                    continue
                if per_thread is not None:
                    thread_setters.append(per_thread)
                if shared is not None:
                    process_setters.append(shared)
                    shared(1)
            self._shared_raised = False
            self._thread_setters = tuple(thread_setters)
            self._process_setters = tuple(process_setters)
            self._modules_seen = modules

    def enter(self, threads: int) -> list[_Undo]:
        """Set this thread's limits to *threads*; the result goes to :meth:`exit`."""
        if len(sys.modules) != self._modules_seen:
            self._resolve()
        undos: list[_Undo] = []
        try:
            for setter in self._thread_setters:
                undos.append(setter(threads))
            if self._process_setters:
                exclusive = threads == self._budget > 1
                # Checked before the call, without the lock: false on nearly every entry.
                if exclusive != self._shared_raised:
                    self._size_shared_pools(exclusive, threads)
            if self._pinning is not None and threads == 1:
                undos.append(self._pinning.pin())
        except BaseException:
            self.exit(undos)  # leave this thread as it was, then let the slot fail
            raise
        return undos

    def _size_shared_pools(self, exclusive: bool, threads: int) -> None:
        """Raise shared pools for a whole-budget grant; lower them for the next smaller one.

        Lowering waits for a smaller grant to arrive instead of happening at exit: a pthreads
        OpenBLAS stops and restarts its threads on every change, and back-to-back whole-budget
        grants (one request at a time) would pay that twice per request. Both moves are safe: a
        whole-budget grant means no other slot runs, and a smaller grant can only start after
        the whole-budget holder has left.
        """
        with self._lock:  # checked again: another thread may have moved them meanwhile
            if exclusive and not self._shared_raised:
                for setter in self._process_setters:
                    setter(threads)
                self._shared_raised = True
            elif not exclusive and self._shared_raised:
                for setter in self._process_setters:
                    setter(1)
                self._shared_raised = False

    @staticmethod
    def exit(undos: object) -> None:
        assert isinstance(undos, list)
        if undos:
            for undo in reversed(undos):
                undo()


def _size_of(budget: int | CpuBudget | Plan | None) -> int:
    if budget is None:
        return make_plan().process_budget
    if isinstance(budget, Plan):
        return budget.process_budget
    if isinstance(budget, CpuBudget):
        return budget.budget
    return budget


class CpuSlots(TokenPool):
    """A :class:`TokenPool` whose slots also size the native thread pools of the work inside.

    *budget* is a count, a :class:`CpuBudget`, a :class:`Plan` (its per-process share) or
    ``None`` to detect and plan from the environment. The default policy is ``elastic``: a lone
    request may use the whole budget, and grants shrink to one thread as load rises
    (``threads`` and ``demand_memory`` as for :class:`TokenPool`).

    Entering a sync slot sets the calling thread's limits; :meth:`run_sync` and
    :meth:`executor` run work in worker threads and set the limits there. An async slot only
    holds tokens: the event loop's thread is shared by every task, so CPU work under an async
    slot belongs in :meth:`run_sync` (or a sync endpoint wrapped by :func:`sized_by_grant`). Pass
    ``native_limits=False`` for a plain token pool.

    ``pin=True`` (or a list of CPU numbers) also pins each thread that holds a one-token grant
    to a CPU that no other slot of this pool holds, for the duration of the slot; see
    :mod:`threadbudget._pinning` for why and ``docs/coordination.md#pinning`` for when it pays.
    """

    __slots__ = ("_limiter", "_native")

    def __init__(
        self,
        budget: int | CpuBudget | Plan | None = None,
        *,
        policy: Policy = "elastic",
        threads: int | None = None,
        native_limits: bool = True,
        demand_memory: float = DEFAULT_DEMAND_MEMORY,
        pin: bool | Iterable[int] = False,
    ) -> None:
        size = _size_of(budget)
        cpus = pinning_cpus(pin, size)
        if cpus is not None and not native_limits:
            raise ValueError("pin needs native_limits=True: pinning is applied with the limits")
        pinning = CpuPinning(cpus) if cpus is not None else None
        self._native = NativeThreadLimits(size, pinning=pinning) if native_limits else None
        super().__init__(
            size,
            threads=threads,
            policy=policy,
            demand_memory=demand_memory,
            on_enter=self._native.enter if self._native else None,
            on_exit=self._native.exit if self._native else None,
            # Async slots share the event loop's thread; their limits are applied in the worker
            # thread that runs the work (run_sync, sized_by_grant) instead.
            async_hooks=False,
        )
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"threadbudget_limiter_{id(self):x}")

    @property
    def native_limits(self) -> NativeThreadLimits | None:
        return self._native

    @property
    def pinned_cpus(self) -> tuple[int, ...] | None:
        """The CPUs one-token slots are pinned to (``pin=``), or ``None`` when not pinning."""
        return self._native.pinned_cpus if self._native is not None else None

    def thread_limiter(self) -> anyio.CapacityLimiter:
        """The anyio limiter for this pool's worker threads, one per event loop.

        It is separate from anyio's default limiter (40 threads, shared with every sync
        endpoint, dependency and file operation), so CPU work queued here never holds up I/O.
        It has as many tokens as the budget: the slot is taken first, so it never blocks.
        """
        try:
            return self._limiter.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self.budget)
            self._limiter.set(limiter)
            return limiter

    async def run_sync(
        self,
        function: Callable[..., R],
        /,
        *args: Any,
        k: int | None = None,
        timeout: float | None = None,
    ) -> R:
        """Run ``function(*args)`` in a worker thread inside a slot, from async code.

        Waits for the slot in the event loop (cancellable, FIFO with every other waiter), then
        runs the call in a thread of :meth:`thread_limiter` with its native limits set to the
        grant. ``timeout`` bounds the wait for the slot, not the call.
        """
        nested = self.current_grant() is not None
        async with self.async_slot(k, timeout=timeout) as grant:
            # A nested call (from code already running under this grant, e.g. a run_sync
            # worker calling back into the loop) must not queue for a thread that its own
            # caller may be holding: it gets a thread of its own.
            limiter = anyio.CapacityLimiter(1) if nested else self.thread_limiter()
            return await anyio.to_thread.run_sync(
                functools.partial(self._with_native_limits, grant, function, args, {}),
                limiter=limiter,
            )

    def call_sized(self, function: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call *function* in this thread with its native limits set to the current grant.

        The grant is the one held in this context (a request admitted by the middleware, an
        enclosing slot in another thread or task); without one, the call takes a slot first.
        """
        grant = self.current_grant()
        if grant is None:
            with self.slot():
                return function(*args, **kwargs)
        return self._with_native_limits(grant, function, args, kwargs)

    def _with_native_limits(
        self,
        grant: Grant,
        function: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        if self._native is None:
            return function(*args, **kwargs)
        undos = self._native.enter(int(grant))
        try:
            return function(*args, **kwargs)
        finally:
            self._native.exit(undos)

    def executor(
        self, max_workers: int | None = None, *, k: int | None = None, timeout: float | None = None
    ) -> CpuExecutor:
        """A :class:`concurrent.futures.Executor` whose workers run each job in a slot."""
        return CpuExecutor(self, max_workers, k=k, timeout=timeout)


class CpuExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool whose every job runs inside a slot of *pool*.

    Workers default to the pool's budget: more would only wait for tokens. Jobs start in
    submission order (the executor's queue, then the pool's FIFO).
    """

    def __init__(
        self,
        pool: TokenPool,
        max_workers: int | None = None,
        *,
        k: int | None = None,
        timeout: float | None = None,
        thread_name_prefix: str = "threadbudget-cpu",
    ) -> None:
        super().__init__(
            pool.budget if max_workers is None else max_workers,
            thread_name_prefix=thread_name_prefix,
        )
        self._pool = pool
        self._slot_k = k
        self._slot_timeout = timeout
        pool.slot(k, timeout=timeout)  # validate k and timeout now, not in a worker

    def submit(
        self, fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[R]:
        return super().submit(self._in_slot, fn, args, kwargs)

    def _in_slot(self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        with self._pool.slot(self._slot_k, timeout=self._slot_timeout):
            return fn(*args, **kwargs)


_active_slots: ContextVar[CpuSlots | None] = ContextVar("threadbudget_active_slots", default=None)


def activate(slots: CpuSlots) -> Token[CpuSlots | None]:
    """Make *slots* the pool that :func:`sized_by_grant` uses in this context (middleware)."""
    return _active_slots.set(slots)


def deactivate(token: Token[CpuSlots | None]) -> None:
    _active_slots.reset(token)


def sized_by_grant(function: Callable[P, R]) -> Callable[P, R]:
    """Run a sync function with native limits set to the grant of the request it serves.

    For sync endpoints that frameworks run in worker threads: the middleware holds the slot in
    the request's context, anyio copies that context into the worker thread, and this wrapper
    sets the worker's OpenMP/MKL limits to the grant for the call. Outside a request admitted
    by threadbudget it calls *function* unchanged.
    """

    @functools.wraps(function)
    def sized(*args: P.args, **kwargs: P.kwargs) -> R:
        slots = _active_slots.get()
        if slots is None:
            return function(*args, **kwargs)
        return slots.call_sized(function, *args, **kwargs)

    return sized


def set_default_thread_limiter(total_tokens: int) -> int:
    """Resize anyio's default worker-thread limiter for the running event loop.

    Starlette and FastAPI run every sync endpoint, dependency and background task through it
    (40 threads by default). Call it inside the event loop, e.g. in a lifespan handler; returns
    the previous size.
    """
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int) or total_tokens < 1:
        raise ValueError(f"total_tokens must be a whole number >= 1, got {total_tokens!r}")
    try:
        limiter = anyio.to_thread.current_default_thread_limiter()
    except RuntimeError as error:  # no running loop (sniffio / anyio say so)
        raise RuntimeError(
            "set_default_thread_limiter() must be called from inside a running event loop "
            "(for example in the application's lifespan handler)"
        ) from error
    previous = int(limiter.total_tokens)
    limiter.total_tokens = total_tokens
    return previous
