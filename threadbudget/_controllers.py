"""Runtime controllers: resize the pools of native libraries that are already loaded.

One controller per library family behind a small ABC, kept in a registry that third parties
extend with :func:`register_controller`. Controllers import nothing until asked, so importing
threadbudget loads no native library.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RuntimeChange",
    "RuntimeController",
    "ThreadSetter",
    "ThreadpoolctlController",
    "TorchController",
    "register_controller",
    "registered_controllers",
    "unregister_controller",
]


#: Sets the calling thread's limit and returns the function that puts the old one back.
ThreadSetter = Callable[[int], Callable[[], None]]


@dataclass
class RuntimeChange:
    """What one controller changed, with the callable that undoes it."""

    controller: str
    library: str
    before: int | None
    after: int
    undo: Callable[[], None] | None = None
    notes: list[str] = field(default_factory=list)


class RuntimeController(ABC):
    """Reads and sets the thread count of one family of already-loaded native libraries."""

    #: Short unique name, shown by ``threadbudget info`` and used to unregister.
    name: str = ""

    @abstractmethod
    def is_loaded(self) -> bool:
        """Whether the library is in the process now; must not import it."""

    @abstractmethod
    def pools(self) -> list[dict[str, Any]]:
        """One JSON-able description per loaded pool, with at least ``num_threads``."""

    @abstractmethod
    def limit(self, threads: int) -> list[RuntimeChange]:
        """Set every loaded pool of this family to *threads*; return what changed."""

    def thread_setter(self) -> ThreadSetter | None:
        """A cheap function that sizes the *calling thread's* pools and returns an undo.

        ``None`` when this family has no per-thread limit. Only per-thread runtimes (OpenMP,
        thread-local MKL) need one; it is resolved once and then called at the start of each
        thread, or on entering a slot, so it must cost microseconds, not the hundreds
        threadpoolctl spends per call.
        """
        return None

    def process_setter(self) -> ThreadSetter | None:
        """Like :meth:`thread_setter`, for pools shared by the whole process, or ``None``.

        Changing a shared pool affects every thread, so slots call this only while one slot
        holds the whole budget.
        """
        return None


class ThreadpoolctlController(RuntimeController):
    """BLAS and OpenMP libraries as threadpoolctl finds them (OpenBLAS, MKL, BLIS, libgomp...).

    OpenBLAS (pthreads), MKL and BLIS limits are process-wide. OpenMP limits set here apply to
    the calling thread and to nothing else: threads started later begin from OMP_NUM_THREADS.
    """

    name = "threadpoolctl"

    def is_loaded(self) -> bool:
        return bool(self.pools())

    def pools(self) -> list[dict[str, Any]]:
        from threadpoolctl import threadpool_info

        return list(threadpool_info())

    def limit(self, threads: int) -> list[RuntimeChange]:
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController()
        before = {lib.filepath: lib.num_threads for lib in controller.lib_controllers}
        if not before:
            return []
        limiter = controller.limit(limits=threads)
        restored = threading.Event()

        def undo() -> None:
            if not restored.is_set():
                restored.set()
                limiter.restore_original_limits()

        changes: list[RuntimeChange] = []
        for lib in controller.lib_controllers:
            changes.append(
                RuntimeChange(
                    controller=self.name,
                    library=f"{lib.prefix} ({lib.internal_api})",
                    before=before[lib.filepath],
                    after=threads,
                    # One undo restores them all; attach it once.
                    undo=undo if not changes else None,
                )
            )
        return changes

    def thread_setter(self) -> ThreadSetter | None:
        from threadpoolctl import ThreadpoolController

        runtimes = [
            (lib.dynlib.omp_get_max_threads, lib.dynlib.omp_set_num_threads)
            for lib in ThreadpoolController().lib_controllers
            if lib.user_api == "openmp"
        ]
        if not runtimes:
            return None

        return _setter_over(runtimes)

    def process_setter(self) -> ThreadSetter | None:
        from threadpoolctl import ThreadpoolController

        pools: list[tuple[Callable[[], Any], Callable[[int], Any]]] = []
        for lib in ThreadpoolController().lib_controllers:
            if lib.user_api == "openmp" or getattr(lib, "threading_layer", None) == "openmp":
                continue  # per-thread: sized by thread_setter
            if lib.internal_api == "openblas":
                # threadpoolctl >= 3.6 lets one "controlling" thread resize a pthreads OpenBLAS
                # and silently ignores the others; slots run in many threads, so call OpenBLAS.
                symbols = _openblas_symbols(lib.dynlib)
                if symbols is not None:
                    pools.append(symbols)
                continue
            pools.append((lib.get_num_threads, lib.set_num_threads))
        return _setter_over(pools) if pools else None


def _openblas_symbols(
    dynlib: Any,
) -> tuple[Callable[[], Any], Callable[[int], Any]] | None:
    """OpenBLAS's own get/set functions, whatever prefix and suffix this build gave them."""
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            getter = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
            setter = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if getter is not None and setter is not None:
                return getter, setter
    return None


def _setter_over(
    runtimes: list[tuple[Callable[[], Any], Callable[[int], Any]]],
) -> ThreadSetter:
    """One setter over several (getter, setter) pairs, undoing in reverse order."""

    def set_threads(threads: int) -> Callable[[], None]:
        previous = [(setter, getter()) for getter, setter in runtimes]
        for _getter, setter in runtimes:
            setter(threads)

        def undo() -> None:
            for setter, value in reversed(previous):
                setter(value)

        return undo

    return set_threads


class TorchController(RuntimeController):
    """torch's intra-op and inter-op pools, set through torch's own API.

    ``torch.set_num_threads`` stores a process-wide value that every thread applies at its next
    parallel region, so unlike a bare ``omp_set_num_threads`` it reaches threads created later.
    torch links MKL statically, out of threadpoolctl's sight, which is why torch needs its own
    controller. The inter-op pool can be sized once, before it starts; it is never restored.
    """

    name = "torch"

    def is_loaded(self) -> bool:
        return "torch" in sys.modules

    def pools(self) -> list[dict[str, Any]]:
        if not self.is_loaded():
            return []
        torch = sys.modules["torch"]
        return [
            {
                "library": "torch",
                "version": str(getattr(torch, "__version__", "?")),
                "num_threads": int(torch.get_num_threads()),
                "num_interop_threads": int(torch.get_num_interop_threads()),
                "parallel_info": str(torch.__config__.parallel_info()),
            }
        ]

    def limit(self, threads: int) -> list[RuntimeChange]:
        if not self.is_loaded():
            return []
        torch = sys.modules["torch"]
        before = int(torch.get_num_threads())
        torch.set_num_threads(threads)
        change = RuntimeChange(
            controller=self.name,
            library="torch intra-op",
            before=before,
            after=threads,
            undo=lambda: torch.set_num_threads(before),
        )
        interop_before = int(torch.get_num_interop_threads())
        if interop_before != threads:
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError as error:
                change.notes.append(
                    f"torch's inter-op pool stays at {interop_before}: it can be sized only once, "
                    f"before its first use ({str(error).strip().splitlines()[0]})"
                )
        return [change]

    def thread_setter(self) -> ThreadSetter | None:
        """Run torch's lazy per-thread init, then size this thread's OpenMP team and MKL.

        ``torch.set_num_threads`` reaches a new thread only when that thread runs an ATen
        parallel loop; a bare matmul goes to MKL, which then follows the OpenMP default the
        library loaded with. Calling torch's own ``set_num_threads`` per thread would also clear
        oneDNN caches, so the two native calls are made directly.
        """
        if not self.is_loaded():
            return None
        torch = sys.modules["torch"]
        library_dir = Path(str(torch.__file__)).parent / "lib"
        openmp_libraries = ("libgomp*.so*", "libomp*.so*", "libiomp*.so*")
        openmp_get = _symbol(library_dir, openmp_libraries, "omp_get_max_threads")
        openmp_set = _symbol(library_dir, openmp_libraries, "omp_set_num_threads")
        # The trailing underscore is MKL's Fortran interface, which takes a pointer in every
        # build; the plain name is an alias of it in some builds and the C function in others.
        # It returns the thread's previous local limit (0: none, follow the global one).
        mkl_local = _symbol(library_dir, ("libtorch_cpu.so",), "mkl_set_num_threads_local_")
        lazy_init = torch.get_num_threads

        def set_torch_threads(threads: int) -> Callable[[], None]:
            lazy_init()
            previous_openmp = None
            if openmp_get is not None and openmp_set is not None:
                previous_openmp = openmp_get()
                openmp_set(threads)
            previous_mkl = None
            if mkl_local is not None:
                previous_mkl = mkl_local(ctypes.byref(ctypes.c_int(threads)))

            def undo() -> None:
                if previous_openmp is not None and openmp_set is not None:
                    openmp_set(previous_openmp)
                if previous_mkl is not None and mkl_local is not None:
                    mkl_local(ctypes.byref(ctypes.c_int(previous_mkl)))

            return undo

        return set_torch_threads


def _symbol(directory: Path, patterns: tuple[str, ...], name: str) -> Callable[..., Any] | None:
    """*name* from the first already-loaded library in *directory* that exports it."""
    for pattern in patterns:
        for path in sorted(directory.glob(pattern)):
            try:
                # RTLD_NOLOAD: only libraries torch already loaded; never load a second copy.
                library = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            except OSError:
                continue
            function = getattr(library, name, None)
            if function is not None:
                return function  # type: ignore[no-any-return]
    return None


_registry_lock = threading.Lock()
_registry: dict[str, RuntimeController] = {}


def register_controller(controller: RuntimeController) -> None:
    """Add a controller (replacing one of the same name); it runs on every later ``apply``."""
    if not isinstance(controller, RuntimeController):
        raise TypeError(f"expected a RuntimeController instance, got {controller!r}")
    if not controller.name:
        raise ValueError(f"{type(controller).__name__} must set a non-empty 'name'")
    with _registry_lock:
        _registry[controller.name] = controller


def unregister_controller(name: str) -> None:
    """Remove the controller registered under *name*; ``KeyError`` if there is none."""
    with _registry_lock:
        if name not in _registry:
            raise KeyError(f"no controller named {name!r}; registered: {sorted(_registry)}")
        del _registry[name]


def registered_controllers() -> list[RuntimeController]:
    """The controllers ``apply_plan`` runs, in order (torch's first, then threadpoolctl's)."""
    with _registry_lock:
        return list(_registry.values())


# torch first: its set_num_threads also moves libgomp, whose original value must be read before.
register_controller(TorchController())
register_controller(ThreadpoolctlController())
