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


def engine_cpus(threads: int, taken: int, usable: list[int] | None = None) -> list[int] | None:
    """The CPUs of an engine with ``threads`` threads when ``taken`` CPUs went to engines started
    before it: the last free ones of ``usable`` (this process's by default); None, left unbound,
    when they would not leave the HTTP handling at least one CPU."""
    usable = usable_cpus() if usable is None else usable
    free = len(usable) - taken
    if threads < 1 or threads >= free:
        return None
    return usable[free - threads : free]


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
