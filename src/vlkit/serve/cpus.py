"""Which CPUs each chat model's engine process is bound to. An engine that runs fewer torch threads
than this process may use gets CPUs of its own, the last ones, and the HTTP handling (parsing, image
decoding, templating) is bound to the others while the app runs (``vlkit.serve.app``): the operating
system then never runs the two on one core by turns, and the engine never moves between cores. On
two vCPUs with one engine thread, 8 concurrent clients of the demo VLM got a few percent more
requests a second than unbound, about as much as the VM's run-to-run spread (``benchmarks/RESULTS.md``,
sessions 23 and 31)."""

from __future__ import annotations

import os


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where the OS does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


_base: list[int] | None = None  # the process's CPUs before running apps' engines took some
_held: dict[object, list[int]] = {}  # each running app's engines' CPUs


def free_cpus() -> list[int]:
    """This process's CPUs that no running app's engine holds."""
    held = {c for cpus in _held.values() for c in cpus}
    return [c for c in (_base if _base is not None else usable_cpus()) if c not in held]


def engine_cpus(threads: int, free: list[int]) -> list[int] | None:
    """The CPUs of an engine with ``threads`` threads: the last ones of ``free``
    (:func:`free_cpus`); None, left unbound, when they would not leave the HTTP handling at least one."""
    if threads < 1 or threads >= len(free):
        return None
    return free[len(free) - threads :]


def hold(owner: object, cpus: list[int]) -> None:
    """``owner``'s (an app's) engines hold ``cpus``: every thread of this process keeps off them, and
    off every other running app's engines' CPUs, until :func:`release`."""
    global _base
    if _base is None:
        _base = usable_cpus()
    _held[owner] = list(cpus)
    bind(free_cpus())


def release(owner: object) -> None:
    """``owner``'s engines have stopped: this process's threads may use their CPUs again (all it had
    before the first :func:`hold` once no app holds any)."""
    global _base
    if _held.pop(owner, None) is None:
        return
    bind(free_cpus())
    if not _held:
        _base = None


def bind(cpus: list[int] | None) -> None:
    """Bind every thread of this process (``import torch`` has started one already), and so every
    thread they start from now on, to ``cpus`` (None: leave them)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tasks:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
