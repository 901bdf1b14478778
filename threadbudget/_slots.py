"""A process-wide, fair pool of CPU tokens shared by threads and async tasks.

Oversubscription happens when request concurrency times native intra-op threads exceeds the
CPUs we may use. A :class:`TokenPool` holds one token per CPU of the budget; each unit of work
holds ``k`` tokens while it runs and runs its native pools with ``k`` threads (through the
``on_enter`` / ``on_exit`` hooks), so the native threads in flight never exceed the budget.

Why it is built this way:

* One ``threading.Lock`` and one FIFO ``deque`` serve sync threads and async tasks alike, so a
  service that mixes worker threads and coroutines still has a single arrival order. The lock is
  only held for bookkeeping, never while anyone sleeps.
* Strict FIFO, no barging: a request that arrives while anyone is queued joins the queue even if
  enough tokens are free for it; otherwise a stream of small requests could starve a large one
  forever.
* Tokens are handed to waiters at release time (already accounted to them under the lock)
  instead of waking them to compete, so a woken waiter never loses its tokens to a newcomer and
  the budget invariant lives in one place. A waiter that is cancelled, interrupted or times out
  at the very moment of the hand-over finds the tokens accounted to it and gives them back (or,
  for a timeout, keeps them: the grant arrived in time).
* An async waiter is woken through its own event loop's thread-safe callback queue, because the
  release may run in any thread, or in another event loop.

Residual hazard: an asynchronous ``KeyboardInterrupt`` (a signal) landing in the few bytecodes
between the bookkeeping and the return of ``__enter__`` can still leak a grant; Python offers no
way to close that window (``threading.Lock`` has it too). Interrupts *while waiting*, which is
where a process spends its time when the pool is contended, are handled.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from time import perf_counter
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeVar, cast, get_args

import anyio
import anyio.lowlevel

from ._forksafety import track_for_fork
from ._warnings import warn

__all__ = [
    "DEFAULT_DEMAND_MEMORY",
    "WAIT_BUCKETS",
    "AsyncSlot",
    "ElasticRule",
    "Grant",
    "GrantRule",
    "Policy",
    "PoolSnapshot",
    "Slot",
    "TokenPool",
]

Policy = Literal["static", "elastic"]

GrantRule = Callable[[int, int, int, float], int]
"""``(free, behind, in_flight, demand) -> tokens this request needs now``.

*free* tokens, requests queued *behind* this one, units of work *in flight* now (holding or
waiting, this one included) and the pool's recent *demand* (the most in flight lately, never
less than *in_flight*; see :class:`TokenPool`). The request is granted once the answer is <= the
free tokens, so a rule makes a request wait by answering more than is free (the elastic rule
answers 1 when nothing is free).
"""

#: Default of ``TokenPool(demand_memory=)``: past demand is forgotten with a half-life of this
#: many average slot durations.
# One: a client between two requests comes back within a small part of a slot's duration (well
# under a millisecond in process, a few over HTTP), which is all the memory has to bridge;
# longer makes a lone client that stays pay for its departed peers' reserve on its next request.
DEFAULT_DEMAND_MEMORY: Final = 1.0

# Upper bounds in seconds, Prometheus style (a wait w lands in the first bucket with w <= bound).
# Fixed rather than configurable so snapshots from different pools and processes add up.
WAIT_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    math.inf,
)

_F = TypeVar("_F", bound=Callable[..., Any])

# Waiter states; plain ints because they are compared on every hand-over.
_WAITING: Final = 0
_GRANTED: Final = 1
_GONE: Final = 2  # left the queue without a grant, or gave its grant back


class Grant(int):
    """The tokens granted to one unit of work.

    An ``int`` (so ``torch.set_num_threads(grant)`` works) that also says what it means through
    ``.threads``; immutable, and cached per size so entering a slot allocates nothing for it.
    """

    __slots__ = ()

    @property
    def threads(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"Grant(threads={int(self)})"

    def __str__(self) -> str:
        # The number, so os.environ["OMP_NUM_THREADS"] = str(grant) does what it says.
        return str(int(self))


@dataclass(frozen=True, slots=True)
class ElasticRule:
    """Split the free tokens over the work in flight, keeping a share for work expected back.

    ``grant = clamp((free - reserve) // (1 + behind), 1, cap)``, asked when a request arrives at
    an empty queue (``behind == 0``) and, at each release, for the queue head with ``behind``
    the number of requests queued after it. ``reserve`` is the share of the budget of the units
    that were in flight lately but are not now: ``(demand - in_flight) x budget / demand``,
    rounded; 0 when the pool is as busy now as it has been lately.

    * Low load: a lone request in a quiet pool gets every free token (up to ``cap``), so it runs
      with all the parallelism it may use: lowest latency.
    * Rising load: the tokens a release frees are spread over the queue (``free=8`` over three
      waiters gives 2, 3, 3), so grants shrink as the queue grows; once the queue is at least as
      long as the free tokens every request gets 1, concurrency reaches the budget and each unit
      runs single-threaded: the highest throughput, since intra-op scaling is sublinear.
    * The reserve is for clients between two requests. With two clients on two tokens, a rule
      that looks only at the queue gives the head both tokens, because at that instant the
      other client is between two requests; its next request then waits, and the two run one
      after the other with two threads each instead of side by side with one. Measured here,
      that cost 18-22 % of throughput at two clients (numpy and all-MiniLM-L6-v2). With the
      reserve the head gets one token, the other client's next request the other.
    * Otherwise work-conserving: every token beyond the reserve goes to a waiter (unless each
      already got ``cap``), and a lone request always gets at least one. A "fair share of the
      budget over everyone in flight" rule was rejected because it leaves tokens idle when a
      request arrives while others hold small grants, and a token left idle is throughput lost
      until the next release (grants cannot shrink while held). Only FIFO overrides this: a
      fixed-size request at the head that does not fit yet keeps the tokens for itself.

    The costs: after a burst, a lone request gets less than the whole budget until the pool
    forgets the burst (a half-life of ``demand_memory`` average slot durations); and grants
    cannot shrink, so a lone request that took the whole budget still makes an unexpected
    arrival wait for it. ``cap`` (the pool's ``threads=`` for this policy) bounds that worst
    case.
    """

    cap: int
    budget: int

    def __call__(self, free: int, behind: int, in_flight: int, demand: float) -> int:
        awaited = demand - in_flight
        if awaited > 0.0:
            free -= int(awaited * self.budget / demand + 0.5)
        share = free // (behind + 1)
        if share > self.cap:
            return self.cap
        return share if share > 1 else 1


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """A consistent copy of a pool's counters, all read under the pool's lock.

    ``recent_demand`` is the most units of work in flight lately, as the elastic rule sees it
    (see :class:`TokenPool`); 0 under the static policy, which does not track it.
    ``grants_by_size`` maps tokens granted to how many grants had that size. ``wait_counts[i]``
    counts grants whose wait was at most ``wait_bounds[i]`` and more than the bound before it;
    an uncontended grant counts as a zero wait. Waits that ended in a timeout or cancellation
    are counted in ``timeouts`` / ``cancellations`` and not in the histogram; a grant that was
    handed over and then given back because its waiter was cancelled at that moment counts in
    both ``grants_total`` and ``cancellations``.
    """

    budget: int
    policy: Policy
    threads: int
    in_use: int
    holders: int
    waiting: int
    recent_demand: float
    grants_total: int
    grants_by_size: Mapping[int, int]
    timeouts: int
    cancellations: int
    wait_bounds: tuple[float, ...]
    wait_counts: tuple[int, ...]
    wait_seconds_total: float

    @property
    def free(self) -> int:
        return self.budget - self.in_use


def _park(lock: threading.Lock, timeout: float | None) -> bool:
    """Block until a releaser opens ``lock`` (the waiter's private gate) or ``timeout`` passes.

    A module-level function so tests can make the wait itself raise, the way a signal would.
    ``Lock.acquire`` is interruptible by signals on POSIX, so Ctrl-C lands here as an exception.
    """
    if timeout is None:
        return lock.acquire()
    return lock.acquire(True, timeout)


class _SyncWaiter:
    """A thread queued for tokens; a pre-locked lock is its gate (cheaper than an Event)."""

    __slots__ = ("gate", "granted", "since", "state", "want")

    def __init__(self, want: int, since: float) -> None:
        self.want = want
        self.since = since
        self.granted = 0
        self.state = _WAITING
        self.gate = threading.Lock()
        self.gate.acquire()

    def wake(self) -> bool:
        self.gate.release()
        return True


class _AsyncWaiter:
    """A task queued for tokens, with what another thread needs to wake it safely."""

    __slots__ = ("event", "granted", "loop_thread", "since", "state", "token", "want")

    def __init__(self, want: int) -> None:
        self.want = want
        self.since = 0.0
        self.granted = 0
        self.state = _WAITING
        self.event = anyio.Event()
        self.token = anyio.lowlevel.current_token()
        self.loop_thread = threading.get_ident()

    def wake(self) -> bool:
        """Set the event in its own loop; False if that loop is gone (nobody will ever run)."""
        if threading.get_ident() == self.loop_thread:
            # Already on the loop's thread, so setting directly is safe and skips a loop round
            # trip (the common case: one async task releasing to another in the same loop).
            self.event.set()
            return True
        # Not anyio.from_thread.run_sync: it blocks the releasing thread until the loop runs
        # the call, which costs a loop round trip per release and deadlocks if that loop is
        # itself blocked on this pool. run_sync_soon only enqueues, on asyncio and trio alike.
        try:
            self.token.backend_class.run_sync_soon(self.event.set, (), self.token.native_token)
        except Exception:
            return False
        return True


_Waiter = _SyncWaiter | _AsyncWaiter


class _SlotBase:
    """State shared by the sync and async context managers; one instance per ``slot()`` call."""

    __slots__ = (
        "_ctx_token",
        "_epoch",
        "_grant",
        "_hooked",
        "_live",
        "_nested",
        "_pool",
        "_restore",
        "_since",
        "_timeout",
        "_want",
    )

    # Only what is read before entering is set here; _entered sets the rest. Every slot is built
    # and entered once per unit of work, so each attribute store counts.
    _ctx_token: Token[_SlotBase | None]
    _epoch: int
    _hooked: bool
    _restore: object
    _since: float
    # What nested slots check: a context copied into a task or thread that outlives this slot
    # still points at it, and must not reuse a grant that was given back.
    _live: bool

    def __init__(self, pool: TokenPool, want: int, timeout: float | None) -> None:
        self._pool = pool
        self._want = want
        self._timeout = timeout
        self._grant: Grant | None = None
        self._nested = False

    @property
    def grant(self) -> Grant | None:
        """The grant this slot holds (or reuses), ``None`` before it is entered."""
        return self._grant

    def _outer(self) -> _SlotBase | None:
        if self._grant is not None:
            raise RuntimeError("a slot context manager is single-use; call slot() again")
        outer = self._pool._held.get()
        if outer is not None and outer._live:
            self._nested = True
            self._grant = outer._grant
            return outer
        return None

    def _entered(self, k: int, *, hooks: bool = True) -> Grant:
        pool = self._pool
        grant = pool._grants[k]
        self._grant = grant
        self._live = True
        # The epoch of the tokens just taken: a slot released after a fork gives back nothing.
        self._epoch = pool._epoch
        self._since = perf_counter() if pool._tracks_demand else 0.0
        self._ctx_token = pool._held.set(self)
        self._hooked = False
        if hooks and pool._on_enter is not None:
            self._hooked = True
            try:
                self._restore = pool._on_enter(k)
            except BaseException:
                self._leave(call_hook=False)
                raise
        return grant

    def _leave(self, *, call_hook: bool = True) -> None:
        pool = self._pool
        grant = self._grant
        assert grant is not None
        self._live = False
        # try/except rather than contextlib.suppress: this is on every exit, and suppress
        # builds an object each time.
        try:  # noqa: SIM105
            pool._held.reset(self._ctx_token)
        except ValueError:
            # Exited in another context than it was entered in (a generator moved between
            # tasks); the stale entry is harmless because _live is now False.
            pass
        try:
            if call_hook and self._hooked and pool._on_exit is not None:
                pool._on_exit(self._restore)
        finally:
            # A slot entered before a fork holds tokens of the parent's pool, not the child's.
            if self._epoch == pool._epoch:
                pool._release(int(grant), self._since)


class Slot(_SlotBase):
    """``with pool.slot(k) as grant:`` holds ``grant`` tokens for the body of the block."""

    __slots__ = ()

    def __enter__(self) -> Grant:
        outer = self._outer()
        if outer is not None:
            assert outer._grant is not None
            return outer._grant
        return self._entered(self._pool._acquire_sync(self._want, self._timeout))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._nested:
            self._leave()


class AsyncSlot(_SlotBase):
    """``async with pool.async_slot(k) as grant:``; works under any anyio backend."""

    __slots__ = ()

    async def __aenter__(self) -> Grant:
        outer = self._outer()
        if outer is not None:
            assert outer._grant is not None
            return outer._grant
        # No unconditional yield on the fast path (like anyio.Lock(fast_acquire=True)): a free
        # token should cost microseconds, not a trip through the event loop. A task that is
        # already cancelled still must not get tokens, hence this cheap check.
        await anyio.lowlevel.checkpoint_if_cancelled()
        k = await self._pool._acquire_async(self._want, self._timeout)
        return self._entered(k, hooks=self._pool._async_hooks)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Synchronous on purpose: with no await in here, a cancellation cannot interrupt the
        # release, so no shielding is needed.
        if not self._nested:
            self._leave()


class TokenPool:
    """A fair pool of ``budget`` CPU tokens; each unit of work holds some while it runs.

    ``policy="static"``: every slot takes ``threads`` tokens (default 1) unless it passes ``k``.
    ``policy="elastic"``: a slot without ``k`` takes what :class:`ElasticRule` gives it, at most
    ``threads`` tokens (default: the whole budget). An explicit ``k`` always wins.

    Under ``elastic`` the pool keeps its *recent demand*: the most units of work it has had in
    flight (holding or waiting), forgotten with a half-life of ``demand_memory`` times the
    average time a slot is held, and never less than the number in flight now. Scaling by the
    slot duration makes "lately" mean the same for 10 ms and 10 s requests: two clients that
    alternate keep the demand at 2 however long each request takes. ``demand_memory=0`` looks
    only at the present.

    Requests are served in strict arrival order across threads and tasks. A slot nested inside
    another slot of the same pool in the same context (same thread, same task, or a child task or
    ``anyio.to_thread`` worker that inherited the context) reuses the outer grant: a unit that
    held tokens while waiting for more for its own sub-work could deadlock the pool.

    ``on_enter(k)`` runs in the thread or task that enters a (non-nested) slot, after the grant,
    and its result is passed to ``on_exit`` when that slot exits, before the tokens are released;
    they are where per-thread native thread limits get set and restored. For an async slot they
    run on the event loop's thread, unless ``async_hooks=False``: many tasks enter and leave in
    any order on that one thread, so per-thread settings made there cannot be restored right.
    """

    __slots__ = (
        "__weakref__",
        "_async_hooks",
        "_budget",
        "_by_size",
        "_cancellations",
        "_demand_at",
        "_demand_memory",
        "_demand_peak",
        "_epoch",
        "_free",
        "_grants",
        "_grants_total",
        "_held",
        "_hold_avg",
        "_holders",
        "_lock",
        "_on_enter",
        "_on_exit",
        "_policy",
        "_rule",
        "_threads",
        "_timeouts",
        "_tracks_demand",
        "_wait_counts",
        "_wait_total",
        "_waiters",
        "_want_default",
    )

    def __init__(
        self,
        budget: int,
        *,
        threads: int | None = None,
        policy: Policy = "static",
        on_enter: Callable[[int], object] | None = None,
        on_exit: Callable[[object], None] | None = None,
        async_hooks: bool = True,
        demand_memory: float = DEFAULT_DEMAND_MEMORY,
    ) -> None:
        budget = _positive_int("budget", budget, None)
        if policy not in get_args(Policy):
            raise ValueError(f"policy must be 'static' or 'elastic', got {policy!r}")
        if threads is None:
            threads = 1 if policy == "static" else budget
        threads = _positive_int("threads", threads, budget)
        if (
            isinstance(demand_memory, bool)
            or not isinstance(demand_memory, int | float)
            or not 0 <= demand_memory < math.inf
        ):
            raise ValueError(
                "demand_memory must be a finite number of slot durations >= 0, "
                f"got {demand_memory!r}"
            )
        self._budget = budget
        self._policy: Policy = policy
        self._threads = threads
        self._rule: GrantRule = ElasticRule(threads, budget)
        self._demand_memory = float(demand_memory)
        # Only the elastic rule reads the demand; static pools skip the clock reads entirely.
        self._tracks_demand = policy == "elastic"
        # 0 is "ask the rule"; a request's want is otherwise its fixed token count.
        self._want_default = threads if policy == "static" else 0
        self._on_enter = on_enter
        self._on_exit = on_exit
        self._async_hooks = async_hooks
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()
        self._free = budget
        self._holders = 0
        self._grants_total = 0
        self._by_size = [0] * (budget + 1)
        self._timeouts = 0
        self._cancellations = 0
        self._wait_counts = [0] * len(WAIT_BUCKETS)
        self._wait_total = 0.0
        # Built once so that entering a slot allocates nothing for its grant (index = size).
        self._grants = tuple(Grant(k) for k in range(budget + 1))
        self._reset_demand()
        self._epoch = 0
        # One variable per pool (pools are few and long-lived), so nesting is tracked per pool
        # and a lookup is a single ContextVar.get.
        self._held: ContextVar[_SlotBase | None] = ContextVar(
            f"threadbudget_slot_{id(self):x}", default=None
        )

        track_for_fork(self)

    def _after_fork_in_child(self) -> None:
        """Start the child with a fresh pool: no holders, no waiters, no lock held.

        A thread of the parent may have held the lock or tokens at the fork; in the child that
        thread does not exist, so both would be lost for good. Slots entered before the fork
        release nothing here (their epoch is the parent's).
        """
        self._lock = threading.Lock()
        self._waiters = deque()
        self._free = self._budget
        self._holders = 0
        self._grants_total = 0
        self._by_size = [0] * (self._budget + 1)
        self._timeouts = 0
        self._cancellations = 0
        self._wait_counts = [0] * len(WAIT_BUCKETS)
        self._wait_total = 0.0
        self._reset_demand()
        self._epoch += 1
        self._held = ContextVar(f"threadbudget_slot_{id(self):x}_{self._epoch}", default=None)

    def _reset_demand(self) -> None:
        self._demand_peak = 0.0
        self._demand_at = 0.0
        self._hold_avg = 0.0  # seconds; 0 until the first slot has been released

    # -- public API -------------------------------------------------------------------------

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def threads(self) -> int:
        """Tokens per slot under ``static``; the largest elastic grant under ``elastic``."""
        return self._threads

    @property
    def demand_memory(self) -> float:
        """Half-life of remembered demand, in average slot durations (elastic policy)."""
        return self._demand_memory

    def would_wait(self, k: int | None = None) -> bool:
        """Whether a slot asked for now would have to queue (a snapshot: it may change)."""
        want = self._want(k)
        with self._lock:
            return bool(self._waiters) or self._free < max(want, 1)

    def current_grant(self) -> Grant | None:
        """The grant of the slot of this pool held in the current context, if any.

        Visible in child tasks and in worker threads that inherited the context (anyio copies
        it into ``to_thread`` workers), which is how a grant reaches the thread doing the work.
        """
        held = self._held.get()
        return held._grant if held is not None and held._live else None

    def slot(self, k: int | None = None, *, timeout: float | None = None) -> Slot:
        """Hold tokens for a ``with`` block; raises ``TimeoutError`` after ``timeout`` seconds."""
        # The defaults skip the validating calls: this runs once per unit of work.
        return Slot(
            self,
            self._want_default if k is None else self._want(k),
            None if timeout is None else _check_timeout(timeout),
        )

    def async_slot(self, k: int | None = None, *, timeout: float | None = None) -> AsyncSlot:
        """Hold tokens for an ``async with`` block (asyncio or trio, through anyio)."""
        return AsyncSlot(
            self,
            self._want_default if k is None else self._want(k),
            None if timeout is None else _check_timeout(timeout),
        )

    def limit(self, k: int | None = None, *, timeout: float | None = None) -> Callable[[_F], _F]:
        """Decorator: run each call of a function (sync or ``async def``) inside a slot."""
        if callable(k):
            raise ValueError(f"use @pool.limit() with parentheses, got k={k!r}")
        want = self._want(k)
        checked = _check_timeout(timeout)

        def decorate(fn: _F) -> _F:
            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def run_async(*args: Any, **kwargs: Any) -> Any:
                    async with AsyncSlot(self, want, checked):
                        return await fn(*args, **kwargs)

                return cast(_F, run_async)

            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                with Slot(self, want, checked):
                    return fn(*args, **kwargs)

            return cast(_F, run)

        return decorate

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            demand = (
                self._demand_locked(perf_counter(), self._holders + len(self._waiters))
                if self._tracks_demand
                else 0.0
            )
            return PoolSnapshot(
                budget=self._budget,
                policy=self._policy,
                threads=self._threads,
                in_use=self._budget - self._free,
                holders=self._holders,
                waiting=len(self._waiters),
                recent_demand=float(demand),
                grants_total=self._grants_total,
                grants_by_size=MappingProxyType({k: n for k, n in enumerate(self._by_size) if n}),
                timeouts=self._timeouts,
                cancellations=self._cancellations,
                wait_bounds=WAIT_BUCKETS,
                wait_counts=tuple(self._wait_counts),
                wait_seconds_total=self._wait_total,
            )

    def __repr__(self) -> str:
        return (
            f"TokenPool(budget={self._budget}, policy={self._policy!r}, threads={self._threads},"
            f" in_use={self._budget - self._free}, waiting={len(self._waiters)})"
        )

    # -- internals --------------------------------------------------------------------------

    def _want(self, k: object) -> int:
        if k is None:
            return self._want_default
        return _positive_int("k", k, self._budget)

    def _demand_locked(self, now: float, in_flight: int) -> float:
        """Recent demand at *now*, with *in_flight* units holding or waiting since the last
        change; remembered for the next call. Lock held.

        The remembered peak decays exponentially, so the demand stays a single number updated
        only when work arrives or leaves (and when a snapshot is read).
        """
        peak = self._demand_peak
        if peak <= in_flight or self._demand_memory == 0.0:
            peak = float(in_flight)
        elif self._hold_avg > 0.0:
            peak *= 2.0 ** ((self._demand_at - now) / (self._demand_memory * self._hold_avg))
            if peak < in_flight:
                peak = float(in_flight)
        else:
            # No slot has ended yet, so nothing to scale the memory by: the peak and its time
            # stay as they are until one does.
            return peak
        self._demand_peak = peak
        self._demand_at = now
        return peak

    def _take_locked(self, want: int) -> int:
        """Grant at once if nobody is queued and enough is free; 0 otherwise. Lock held.

        Every uncontended slot passes through here, so the common cases of
        :meth:`_demand_locked` and of the elastic rule are written out inline.
        """
        queued = len(self._waiters)
        in_flight = self._holders + queued + 1
        demand = 0.0
        if self._tracks_demand:
            # This arrival is demand whether it is granted now, queues or gives up.
            now = perf_counter()
            if self._demand_peak <= in_flight:
                self._demand_peak = demand = in_flight
                self._demand_at = now
            else:
                demand = self._demand_locked(now, in_flight)
        if queued:
            return 0
        free = self._free
        if want:
            need = want
        elif demand <= in_flight:
            # ElasticRule with nobody behind and no reserve: all that is free, within 1..cap.
            cap = self._threads
            need = cap if free >= cap else (free or 1)
        else:
            need = self._rule(free, 0, in_flight, demand)
        if need > free:
            return 0
        self._free = free - need
        self._holders += 1
        self._grants_total += 1
        self._by_size[need] += 1
        self._wait_counts[0] += 1
        return need

    def _acquire_sync(self, want: int, timeout: float | None) -> int:
        with self._lock:
            k = self._take_locked(want)
            if k:
                return k
            if timeout == 0:
                self._timeouts += 1
                raise TimeoutError(f"no {_what(want)} free and timeout=0")
            waiter = _SyncWaiter(want, perf_counter())
            self._waiters.append(waiter)
        try:
            if _on_event_loop_thread():
                warn(
                    "TokenPool.slot() is waiting for tokens on an event loop thread, which"
                    " stalls every task on that loop; use async_slot(), or limit() on an"
                    " async def",
                    stacklevel=4,
                )
            opened = _park(waiter.gate, timeout)
        except BaseException:
            # Also covers the warning above raised as an error (warnings filters).
            self._abandon(waiter, timed_out=False)
            raise
        if opened or self._abandon(waiter, timed_out=True):
            return waiter.granted
        raise TimeoutError(f"waited {timeout} s for {_what(want)}")

    async def _acquire_async(self, want: int, timeout: float | None) -> int:
        with self._lock:
            k = self._take_locked(want)
            if k:
                return k
            if timeout == 0:
                self._timeouts += 1
                raise TimeoutError(f"no {_what(want)} free and timeout=0")
        # Built outside the lock: finding the event loop token is the slow part. The queue may
        # have moved meanwhile, hence the second try; arrival order is the order of enqueueing.
        waiter = _AsyncWaiter(want)
        with self._lock:
            k = self._take_locked(want)
            if k:
                return k
            waiter.since = perf_counter()
            self._waiters.append(waiter)
        try:
            if timeout is None:
                await waiter.event.wait()
                return waiter.granted
            with anyio.move_on_after(timeout):
                await waiter.event.wait()
                return waiter.granted
        except BaseException:
            self._abandon(waiter, timed_out=False)
            raise
        if self._abandon(waiter, timed_out=True):
            return waiter.granted
        raise TimeoutError(f"waited {timeout} s for {_what(want)}")

    def _abandon(self, waiter: _Waiter, *, timed_out: bool) -> bool:
        """Take a waiter that stopped waiting out of the books; True if it keeps a grant.

        Only a timeout keeps a grant that raced it (the tokens did arrive in time). A
        cancellation or exception must propagate, so its grant goes back to the queue.
        """
        with self._lock:
            state = waiter.state
            if state == _GONE:
                return False
            if state == _GRANTED and timed_out:
                return True
            waiter.state = _GONE
            if timed_out:
                self._timeouts += 1
            else:
                self._cancellations += 1
            self._note_leaving_locked()
            if state == _WAITING:
                self._waiters.remove(waiter)
            else:
                self._free += waiter.granted
                self._holders -= 1
            # Even without returned tokens, the leaver may have been the head blocking others.
            woken = self._dispatch_locked() if self._waiters else None
        if woken:
            self._wake(woken)
        return False

    def _note_leaving_locked(self) -> None:
        """A unit is about to stop holding or waiting: the demand up to now counts. Lock held."""
        if self._tracks_demand:
            self._demand_locked(perf_counter(), self._holders + len(self._waiters))

    def _release(self, k: int, since: float) -> None:
        with self._lock:
            if self._tracks_demand:
                now = perf_counter()
                held = now - since
                # An average over the last several slots (weight 1/8 each): slow enough to ride
                # out one odd request, quick enough to follow a change of workload.
                average = self._hold_avg
                self._hold_avg = held if average == 0.0 else average + (held - average) * 0.125
                in_flight = self._holders + len(self._waiters)
                if self._demand_peak <= in_flight:  # _demand_locked's common case, inline
                    self._demand_peak = in_flight
                    self._demand_at = now
                else:
                    self._demand_locked(now, in_flight)
            self._free += k
            self._holders -= 1
            if not self._waiters:
                return
            woken = self._dispatch_locked()
        if woken:
            self._wake(woken)

    def _dispatch_locked(self) -> list[_Waiter]:
        """Hand free tokens to the queue head while it fits; FIFO, so stop at the first misfit."""
        waiters = self._waiters
        free = self._free
        woken: list[_Waiter] = []
        now = 0.0
        # Nobody arrives or leaves during one pass: the same in flight and demand for each head.
        in_flight = self._holders + len(waiters)
        demand = self._demand_locked(perf_counter(), in_flight) if self._tracks_demand else 0.0
        while waiters:
            waiter = waiters[0]
            need = waiter.want or self._rule(free, len(waiters) - 1, in_flight, demand)
            if need > free:
                break
            waiters.popleft()
            free -= need
            waiter.granted = need
            waiter.state = _GRANTED
            if not woken:
                now = perf_counter()
            woken.append(waiter)
            wait = now - waiter.since
            self._wait_counts[bisect_left(WAIT_BUCKETS, wait)] += 1
            self._wait_total += wait
            self._by_size[need] += 1
        self._free = free
        self._holders += len(woken)
        self._grants_total += len(woken)
        return woken

    def _wake(self, woken: list[_Waiter]) -> None:
        # Outside the lock: a wake-up may cost a syscall, and the books are already right.
        for waiter in woken:
            if not waiter.wake():
                self._reclaim(waiter)

    def _reclaim(self, waiter: _Waiter) -> None:
        """Take back a grant whose waiter's event loop has ended, so it can never run."""
        with self._lock:
            if waiter.state != _GRANTED:
                return
            self._note_leaving_locked()
            waiter.state = _GONE
            self._cancellations += 1
            self._free += waiter.granted
            self._holders -= 1
            woken = self._dispatch_locked() if self._waiters else None
        if woken:
            self._wake(woken)


def _on_event_loop_thread() -> bool:
    """Whether an event loop (any anyio backend) runs in this thread; only asked before blocking."""
    try:
        anyio.lowlevel.current_token()
    except Exception:
        return False
    return True


def _positive_int(name: str, value: object, upper: int | None) -> int:
    """``value`` as an int in ``1..upper``; ValueError naming it otherwise (bool is refused)."""
    if value.__class__ is not int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(_range_message(name, value, upper))
        value = operator.index(cast(Any, value))
    assert isinstance(value, int)
    if value < 1 or (upper is not None and value > upper):
        raise ValueError(_range_message(name, value, upper))
    return value


def _range_message(name: str, value: object, upper: int | None) -> str:
    if upper is None:
        return f"{name} must be an integer >= 1, got {value!r}"
    return f"{name} must be an integer from 1 to the budget ({upper}), got {value!r}"


def _check_timeout(timeout: float | None) -> float | None:
    """None, or seconds >= 0; an infinite timeout is None (Lock.acquire rejects huge values)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    if timeout > threading.TIMEOUT_MAX:
        return None
    return float(timeout)


def _what(want: int) -> str:
    return f"{want} token(s)" if want else "a token"
