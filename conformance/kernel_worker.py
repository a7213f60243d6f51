"""The kernel's process: the only process that imports a backend's code.

The judge (the pytest process: inputs, float64 reference, tolerance, verdicts) never loads a kernel's
module, so nothing a kernel does at import or call time (patching the suite, torch, or the verdict;
finding the reference through ``gc``) can reach the numbers it is judged by. This process answers
requests, one at a time, each tagged with the request id the reply repeats:

- ``describe``: the declaration of each named backend, as plain data (or why it cannot be loaded);
- ``call``: one call of a backend's ``fn``, ``varlen_fn`` or ``kvcache_fn`` on tensors the judge sent
  (shared memory on the CPU, CUDA IPC on the GPU: the kernel works on the judge's tensors in place, so
  what it writes into its inputs is seen by the judge); with gradients requested, the autograd graph
  is kept under a handle for ``backward``;
- ``procedure``: a measurement that must run where the kernel runs (``kernel_side.PROCEDURES``:
  memory peaks, timings); it returns numbers the judge decides on.

Errors come back as a status: ``unsupported`` (the library's own refusal), ``oom`` (the allocator's
own error types only), ``fault`` (a context-poisoning device error, waited for before any reply: this
process then exits and is replaced), ``raised`` (any other exception of the kernel), ``contract`` (it
returned no tensor).
"""

from __future__ import annotations

import faulthandler
import os
import resource
import signal


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the judge dies (a SIGKILL to pytest leaves no spinning worker)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


LOG_LIMIT_BYTES = 2**30  # the largest file this process may write (its log; shared memory for what it returns)


ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # torch's allocator settings, old and new name


def _no_expandable_segments() -> None:
    """This process' CUDA memory in plain cudaMalloc segments, whatever the environment says: the judge takes
    a CUDA output only in memory it can check against its allocation (kernel_client.cuda_reply_problem),
    and an expandable segment's share names a process and file descriptors for the judge to take. Set
    before torch's allocator first reads its settings (at the first CUDA allocation)."""
    for name in ALLOC_CONF_VARIABLES:
        if "expandable_segments" in os.environ.get(name, ""):
            kept = [p for p in os.environ[name].split(",") if p.strip() and "expandable_segments" not in p]
            os.environ[name] = ",".join([*kept, "expandable_segments:False"])


def serve(conn, log_path: str, clock_path: str) -> None:
    os.setpgrp()  # a group of its own: the judge kills it with every process the kernel started
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing kernel must not write a core dump of GBs
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the log's limit a write fails (OSError), it does not kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (LOG_LIMIT_BYTES, LOG_LIMIT_BYTES))  # a flood cannot fill the disk
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)  # a kernel's prints and a fatal error's traceback go to the log, not the terminal
    os.dup2(log, 2)
    faulthandler.enable()
    _no_expandable_segments()
    import torch  # noqa: F401 - imported before "ready", outside any call's time limit

    from conformance import compile_clock, kernel_side, registry, threads  # noqa: F401

    compile_clock.install(compile_clock.Clock(clock_path))  # the judge's time limit does not count compilation
    threads.limit()  # torch's threads, unless the user set OMP_NUM_THREADS (threads.py: a busy machine)

    from conformance.kernel_client import connection_socket, receive, send

    sock = connection_socket(conn)  # tensors' shared memory is handed over through it (kernel_client: the wire)
    send(conn, sock, "ready")
    worker = _Worker()
    while True:
        try:
            request_id, op, args = receive(conn, sock, _RequestUnpickler, 60)
        except (EOFError, OSError):  # the judge is gone
            return
        if op == "exit":  # a clean end: what this process received over CUDA IPC is released as it exits
            send(conn, sock, (request_id, "ok", None))
            return
        status, payload = _settled(worker.handle(op, args), args)
        try:
            send(conn, sock, (request_id, status, payload))
        except Exception as exc:  # noqa: BLE001 - a reply that cannot be sent (unpicklable output) is the kernel's
            send(conn, sock, (request_id, "contract",
                              f"its result could not be sent back: {type(exc).__name__}: {exc}"))
        if status == "fault":
            return


def _settled(reply: tuple, args) -> tuple:
    """``reply`` once the device has finished what the kernel started, whatever the request and its
    status: a fault its launches left behind (a misaligned address raised only at the next
    synchronisation) is then this request's ``fault``, here, never the next one's. Sent unfinished, a
    tensor hung the judge: torch's CUDA IPC made the receiver's stream wait on the sender's event and
    synchronises that stream when the received tensor is freed (StorageSharing.cpp), and an event
    behind a fault never completes (the judge no longer waits on it: kernel_client). Every device the
    request's and the reply's tensors are on is waited for, and the current one (a kernel may have
    switched devices)."""
    import torch
    from torch.utils._pytree import tree_leaves

    from conformance.backend import DeviceFault, invoke

    if reply[0] == "fault" or not torch.cuda.is_initialized():
        return reply
    devices = {torch.cuda.current_device()} | {t.device.index for t in tree_leaves((args, reply))
                                                if isinstance(t, torch.Tensor) and t.is_cuda}
    try:
        for device in sorted(devices):
            invoke(None, torch.cuda.synchronize, device)  # device-wide: a side stream's work too
    except DeviceFault as exc:
        return "fault", str(exc)
    except Exception as exc:  # noqa: BLE001 - sorted by invoke: the kernel's work raised
        return "raised", str(exc)
    return reply


def _RequestUnpickler(file, fds):  # noqa: N802 - used as a class: the judge's requests, trusted
    import pickle

    from conformance.kernel_client import storage_from_fd

    unpickler = pickle.Unpickler(file)
    unpickler.persistent_load = lambda pid: storage_from_fd(fds, pid)
    return unpickler


class _Worker:
    def __init__(self):
        self.backends: dict = {}
        self.graphs: dict[int, tuple] = {}  # handle -> (output, leaves), for backward
        self.next_handle = 0
        self.last_reply = None  # kept alive until the next request (CUDA IPC: the judge copies it first)

    def backend(self, spec: str):
        from conformance import registry

        if spec not in self.backends:
            self.backends[spec] = registry.load(spec)
        return self.backends[spec]

    def handle(self, op: str, args):
        from conformance.backend import (ContractError, DeviceFault, KernelRaised, OutOfMemory, Unsupported,
                                         invoke)
        from conformance.registry import BackendNotFound

        self.last_reply = None
        try:
            if op == "describe":
                return "ok", self.describe(args)
            if op == "forget":
                self.graphs.clear()
                if args:
                    _release_memory()
                return "ok", None
            if op == "call":
                return self.call(*args)
            if op == "backward":
                return "ok", invoke(None, self.backward, *args)
            if op == "procedure":
                from conformance import kernel_side

                name, spec, procedure_args = args
                self.last_reply = invoke(self.backend(spec), kernel_side.PROCEDURES[name], self.backend(spec),
                                         *procedure_args)
                return "ok", self.last_reply
            return "harness", f"unknown request {op!r}"
        except Unsupported as exc:
            return "unsupported", str(exc)
        except BackendNotFound as exc:
            return "not-found", str(exc)
        except OutOfMemory as exc:
            try:
                _release_memory()
            except Exception as err:  # noqa: BLE001 - a device the kernel left broken: the reply is still the oom
                return "oom", f"{exc} (releasing memory after it then raised {type(err).__name__}: {err})"
            return "oom", str(exc)
        except DeviceFault as exc:
            return "fault", str(exc)
        except ContractError as exc:
            return "contract", str(exc)
        except KernelRaised as exc:
            return "raised", str(exc)
        except BaseException as exc:  # noqa: BLE001 - sys.exit() and the like from a kernel: reported, never fatal
            return "raised", f"{type(exc).__name__}: {exc}"

    def describe(self, specs: list[str]) -> dict:
        from conformance import registry

        described = {}
        for spec in specs:
            try:
                backend = self.backend(spec)
                described[spec] = {"declaration": declaration(backend), "unavailable": list(backend.unavailable_reasons())}
            except registry.BackendNotFound as exc:
                described[spec] = {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - a broken third-party backend is reported, not fatal
                described[spec] = {"error": f"failed to load: {type(exc).__name__}: {exc}"}
        return described

    def call(self, spec: str, which: str, args: tuple, kwargs: dict, grad: tuple | None, kw_grad: tuple = ()):
        import torch

        from conformance.backend import invoke

        backend = self.backend(spec)
        fn = getattr(backend, which)
        leaves = ()
        if grad is not None:  # the judge wants gradients of these positional tensors (and keyword ones)
            args = tuple(t.detach().requires_grad_(True) if g else t for t, g in zip(args, grad))
            kwargs = {k: (v.detach().requires_grad_(True) if k in kw_grad else v) for k, v in kwargs.items()}
            leaves = tuple(t for t, g in zip(args, grad) if g) + tuple(kwargs[k] for k in kw_grad)
        with torch.enable_grad() if grad is not None else torch.no_grad():
            out = invoke(backend, fn, *args, **kwargs)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            return "contract", f"backend {spec!r} returned {type(out).__name__}, not a tensor"
        if type(out) is not torch.Tensor:  # a subclass would not be loaded by the judge: send its data
            out = out.as_subclass(torch.Tensor)
        handle = None
        if leaves and out.requires_grad:
            handle = self.next_handle = self.next_handle + 1
            self.graphs[handle] = (out, leaves)
        self.last_reply = out.detach()
        return "ok", (self.last_reply, handle)

    def backward(self, handle: int, dout):
        import torch

        out, leaves = self.graphs.pop(handle)
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        self.last_reply = tuple(None if g is None else g.detach() for g in grads)
        return self.last_reply


def declaration(backend) -> dict:
    """A backend's declaration as plain data (what the judge rebuilds its Backend from)."""
    import dataclasses

    caps = {k: (sorted(v) if isinstance(v, frozenset) else v)
            for k, v in dataclasses.asdict(backend.capabilities).items()}
    return {"name": backend.name, "description": backend.description, "capabilities": caps,
            "varlen": backend.varlen_fn is not None, "kvcache": backend.kvcache_fn is not None,
            "compiled": bool(backend.compiled)}


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
