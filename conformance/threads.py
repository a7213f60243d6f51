"""Torch's CPU threads in the judge and in the kernel's process.

By default torch starts one intra-op thread per core, in each process. The judge and the kernel's
process then share the machine's cores, and on a machine that other work keeps busy every parallel
region waits for its slowest thread: the suite's small cases spend their time at OpenMP barriers
(measured on 2 busy cores: over 30x slower than idle; README "Run time"). Both processes therefore
default to at most ``MAX_THREADS`` threads, and never more than the cores this process may run on.

The user's choice wins: with ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set in the environment (which
the kernel's process inherits), torch's own setting is left as it is.

torch.compile's compiler is shared out the same way (``compile_threads``).
"""

from __future__ import annotations

import os

MAX_THREADS = 1
MAX_REFERENCE_WORKERS = 4  # threads for the parts of a large case's reference (expected.py), at most
USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cores_available() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    return max(1, min(cores_available(), MAX_THREADS))


def user_setting(environ=None) -> str | None:
    """The environment variable through which the user chose torch's threads, if any."""
    environ = os.environ if environ is None else environ
    return next((name for name in USER_SETTINGS if environ.get(name, "").strip()), None)


def limit(environ=None) -> int:
    """Lower torch's intra-op threads to ``default_threads()`` unless the user chose them; never raise
    them. Returns the number of threads torch uses afterwards."""
    import torch

    if user_setting(environ) is None and torch.get_num_threads() > default_threads():
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()


def reference_workers(environ=None) -> int:
    """Threads the judge may use for the independent parts of a large case's reference (expected.py):
    the cores this process may run on, at most ``MAX_REFERENCE_WORKERS``, or the user's
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``. Each part is long and runs on one thread: no barriers
    to wait at, so sharing the cores with the kernel's process (expected.soon) costs it no waiting."""
    environ = os.environ if environ is None else environ
    name = user_setting(environ)
    if name is not None:
        try:
            return max(1, int(environ[name].strip()))
        except ValueError:
            return 1
    return max(1, min(cores_available(), MAX_REFERENCE_WORKERS))


HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def huge_pages(environ=None) -> bool:
    """Ask torch's CPU allocator for transparent huge pages on large buffers (``THP_MEM_ALLOC_ENABLE``),
    in this process and in the kernel's process it starts (which inherits the environment). A large
    tensor is a fresh mapping each time; with 4 KiB pages every page faults in on first touch, and a
    CPU run spent about a third of its time in the system (140 million page faults in the standard
    tier); with huge pages a fault maps 2 MiB. torch reads the variable at its first allocation, so this
    must run before any tensor is made here; later it changes only the kernel's process. The user's
    setting wins. Returns whether it is on."""
    environ = os.environ if environ is None else environ
    environ.setdefault(HUGE_PAGES, "1")
    return environ[HUGE_PAGES].strip() not in ("", "0")


COMPILE_THREADS = "TORCHINDUCTOR_COMPILE_THREADS"


def compile_threads(workers: int, environ=None) -> int | None:
    """The processes torch.compile's compiler (inductor) starts to compile a kernel's code, in this
    process and the kernel's process it starts (which inherits the environment): by default one per core
    (at most 32) in each process, so pytest-xdist's ``workers`` would each start a core's worth and the
    compilers would fight for the cores (on the 16-core H100 host, 16 workers: compiled flex's quick tier
    took 153 s cold against 124 s with one each). The cores this process may run on are shared out among
    the workers; with one worker torch's default stands. The user's setting wins. Returns the number
    set, or None where it is torch's to choose."""
    environ = os.environ if environ is None else environ
    if workers > 1 and not environ.get(COMPILE_THREADS, "").strip():
        environ[COMPILE_THREADS] = str(max(1, cores_available() // workers))
    try:
        return int(environ[COMPILE_THREADS]) if environ.get(COMPILE_THREADS, "").strip() else None
    except ValueError:  # the user's own setting, not a number: torch's to refuse when it compiles
        return None
