"""Seconds a kernel's process spends compiling with torch.compile, kept where the judge can read them.

The hang detector (``--case-timeout``) limits one call into the kernel. A compiled kernel's first call
with a new dtype, head dim or mask compiles first; measured on an H100 with eight pytest-xdist workers
compiling at once, compiled flex took over 120 s on two fp32 cases with odd head dims, and the
standard tier's limit called them hangs (a third such case did not finish compiling in 4 minutes on an
idle H100: a real finding). So what torch.compile reports as compilation (dynamo's compile callbacks:
tracing, a backward compiled at its first use, autotuning) does not count towards a call's limit, up
to the limit again: a call that compiles may take twice its limit, and a compilation that never ends
still times out.

Two doubles in a small file that both processes map, written only by the kernel's process: the
seconds of compilations that ended, and when the one under way began (``time.monotonic``, one clock for
every process of a machine), 0 when none is. The judge makes the file for each process it starts and
removes its name once the process has mapped it (a path, not a shared object, crosses to the spawned
process: multiprocessing's shared arrays fail to pickle after pytester has reloaded multiprocessing).
A kernel could write them too, to look as if it were compiling: that only delays its hang verdict, by
at most the call's limit.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import mmap
import os
import struct
import sys
import tempfile
import time

CALLBACKS_MODULE = "torch._dynamo.callback"
_LAYOUT = struct.Struct("dd")  # seconds of ended compilations; monotonic start of the one under way, or 0


class Clock:
    """The two doubles, mapped from ``path`` (a new file, zeroed, when no path is given)."""

    def __init__(self, path: str | None = None):
        if path is None:
            fd, path = tempfile.mkstemp(prefix="attn-conformance-compile-clock-")
            os.ftruncate(fd, _LAYOUT.size)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)
        self.path = path

    def seconds(self) -> float:
        """The seconds spent compiling so far, the compilation under way included."""
        ended, started = _LAYOUT.unpack_from(self._map)
        return ended + (time.monotonic() - started if started else 0.0)

    def start(self, *_) -> None:
        """dynamo's compile-start callback (it passes the compilation's arguments)."""
        ended, _started = _LAYOUT.unpack_from(self._map)
        _LAYOUT.pack_into(self._map, 0, ended, time.monotonic())

    def end(self, *_) -> None:
        _LAYOUT.pack_into(self._map, 0, self.seconds(), 0.0)


def install(clock: Clock) -> None:
    """In the kernel's process: count torch.compile's compilations in ``clock``. Importing dynamo costs
    over a second, so the callbacks are registered when the kernel's code first imports it."""
    module = sys.modules.get(CALLBACKS_MODULE)
    if module is not None:
        _register(module, clock)
    else:
        sys.meta_path.insert(0, _OnImport(clock))


def _register(module, clock: Clock) -> None:
    module.on_compile_start(clock.start)
    module.on_compile_end(clock.end)


class _OnImport(importlib.abc.MetaPathFinder):
    """Registers the callbacks as soon as dynamo's callback module has run, then steps aside."""

    def __init__(self, clock):
        self.clock = clock

    def find_spec(self, name, path, target=None):
        if name != CALLBACKS_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run, clock = spec.loader.exec_module, self.clock

        def exec_module(module):
            run(module)
            _register(module, clock)

        spec.loader.exec_module = exec_module
        return spec
