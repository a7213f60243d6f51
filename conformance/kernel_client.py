"""The judge's side of the kernel's process (kernel_worker.py): start it, send it requests, and give
the checks a ``Backend`` whose functions run there.

Every request carries an id that its reply repeats, so a reply left over from an interrupted wait is
never taken for the next one; a wait that ends any other way than with its reply (a time limit, the
process dying, an exception such as pytest-timeout's) kills the process with everything it started
(its process group) and the next request starts a fresh one. Each wait is bounded per call into the
kernel, not per case: the limit detects a hung kernel, and the judge's own work (the float64
reference) never counts against it.
"""

from __future__ import annotations

import atexit
import functools
import io
import multiprocessing
import os
import pickle
import signal
import socket
import tempfile
import weakref
from multiprocessing import reduction

import torch

from conformance import compile_clock, judge_memory, kernel_side
from conformance.backend import (Backend, ContractError, DeviceFault, KernelCrashed, KernelRaised, KernelTimedOut,
                                 OutOfMemory, Unsupported)
from conformance.capabilities import Capabilities

STARTUP_LIMIT = 300  # seconds for the process to import torch and the suite; not counted in any call's limit
LOG_TAIL_BYTES = 64 * 1024  # how much of the kernel's log a crash report reads
POLL_S = 0.2  # how often a wait checks that the process is still alive (a forked child may hold the pipe)
_LIVE: weakref.WeakSet = weakref.WeakSet()


class KernelProcess:
    def __init__(self, call_timeout: float | None = None):
        self.call_timeout = call_timeout
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._sock = None  # the connection's socket, for the file descriptors of shared tensors
        self._next_id = 0
        self._fresh_for = None  # the kernel_side.FRESH key the process serves (until other work runs there)
        self._compile_clock = None  # the process's compile_clock.Clock
        self._log = None  # the process's log, open here; its name is removed once the process has opened it
        self._cuda_slots: list[tuple[bytes, int]] = []  # IPC reference-count slots of CUDA tensors sent there
        self._stopped: list[tuple] = []  # (process, its slots) of processes stopped whose end is not yet seen
        _LIVE.add(self)
        _install_sigterm_handler()

    # -- lifetime --------------------------------------------------------------------------------
    def _start(self) -> None:
        from conformance.kernel_worker import serve

        parent, child = self._context.Pipe()
        if self._log is not None:
            self._log.close()
        self._log = tempfile.NamedTemporaryFile(prefix="attn-conformance-kernel-", suffix=".log", delete=False)
        self._compile_clock = compile_clock.Clock()
        try:
            process = self._context.Process(target=serve, args=(child, self._log.name, self._compile_clock.path),
                                            daemon=True, name="attn-conformance-kernel")
            process.start()
            self._process = process
            child.close()
            self._conn, self._sock = parent, connection_socket(parent)
            try:
                ready = parent.poll(STARTUP_LIMIT) and receive(parent, self._sock, _ReplyUnpickler, 10) == "ready"
            except (EOFError, OSError, ProtocolError, pickle.UnpicklingError):
                ready = False
        finally:
            # opened by both processes now (or the process is gone): no file is left behind, even when the
            # judge is killed
            os.unlink(self._compile_clock.path)
            os.unlink(self._log.name)
        if not ready:
            code = self.stop()
            raise RuntimeError(f"the kernel process did not start ({_describe_exit(code)}): "
                               f"{_log_excerpt(self._log, 0)}")

    def stop(self) -> int | None:
        """Kill the process and its group (whatever the kernel started); its exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.is_alive():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
        else:
            _kill_group(process.pid)  # it died: kill what it left behind (a forked child holding the pipe)
        process.join(10)
        self._stopped.append((process, self._cuda_slots))
        self._cuda_slots = []
        try:
            self._release_the_dead()
        finally:
            self._conn.close()
            self._sock.close()
            self._conn = self._sock = None
        return process.exitcode

    def _release_the_dead(self) -> None:
        """Release the CUDA IPC slots sent to stopped processes now known to be dead (nothing there can still
        read what it was sent); one that outlived its stop's wait keeps them until a later stop sees it end."""
        waiting = []
        for process, slots in self._stopped:
            if process.exitcode is None:
                waiting.append((process, slots))
                continue
            try:
                release_cuda_slots(slots)
            except RuntimeError:  # torch's release refused: those blocks stay allocated, as without it
                pass
        self._stopped = waiting

    def _exit(self) -> None:
        """Ask a live process to exit, so that it releases what it received (CUDA IPC handles), then end it."""
        if self._process is not None and self._process.is_alive():
            try:
                self.request("exit", None, timeout=5)
                self._process.join(5)
            except Exception:  # noqa: BLE001 - it is killed below in any case
                pass
        self.stop()

    def close(self) -> None:
        self._exit()
        if self._log is not None:
            self._log.close()

    # -- requests --------------------------------------------------------------------------------
    def request(self, op: str, args, timeout: float | None = None, like: torch.Tensor | None = None,
                fresh_for=None):
        """The reply's payload; the kernel's refusals and errors as the exceptions of backend.py and this
        module. ``like``: a call's output may have no more elements than this tensor before the judge copies
        it (a view claiming terabytes must not make the judge run out of memory). ``fresh_for``: the key of
        a kernel_side.FRESH procedure (``procedure``); any other request ends the process's freshness."""
        if self._process is None or not self._process.is_alive():
            self.stop()
            self._start()
        self._fresh_for = fresh_for
        self._next_id += 1
        request_id = self._next_id
        log_start = os.fstat(self._log.fileno()).st_size
        limit = timeout if timeout is not None else self.call_timeout
        try:
            send(self._conn, self._sock, (request_id, op, args), self._cuda_slots)
            status, payload = self._wait(request_id, limit, log_start)
        except BaseException:
            self.stop()  # a message cut short, or a reply that belongs to nobody: the process goes
            raise
        if len(self._cuda_slots) > SLOTS_KEPT:  # a long-lived process: forget the slots it released
            self._cuda_slots = held_cuda_slots(self._cuda_slots)
        if status == "ok":
            if like is not None:
                out, handle = payload
                if out.numel() > like.numel():  # shape, dtype and device are held to q's after the copy
                    raise ContractError(f"backend returned shape {tuple(out.shape)} ({out.numel()} elements), more "
                                        f"than q's {tuple(like.shape)}")
            # every tensor copied at once into the judge's own memory (a CUDA one into its pool, out of the
            # kernel's reach): what the kernel's process shared can then be released or reused by it
            return judge_memory.copied(payload)
        if status == "unsupported":
            raise Unsupported(payload)
        if status == "oom":
            raise OutOfMemory(payload)
        if status == "fault":
            self.stop()
            raise DeviceFault(payload)
        if status == "contract":
            raise ContractError(payload)
        if status == "raised":
            raise KernelRaised(payload)
        raise RuntimeError(f"kernel process: {status}: {payload}")

    def _wait(self, request_id: int, limit: float | None, log_start: int):
        """The reply; past ``limit`` seconds, less what torch.compile spent compiling meanwhile (at most
        ``limit`` again: a compilation that never ends still times out), the call has timed out."""
        waited, compiled_before = 0.0, self._compile_clock.seconds()
        while True:
            if self._conn.poll(POLL_S):
                try:
                    reply_id, status, payload = receive(self._conn, self._sock, self._unpickler,
                                                        max(POLL_S, (limit or STARTUP_LIMIT) - waited))
                except (EOFError, OSError):  # the process died mid-call: its end of the pipe closed
                    self._process.join(10)
                    raise KernelCrashed(self._death(log_start)) from None
                except (pickle.UnpicklingError, ProtocolError, ValueError, TypeError, RuntimeError, OverflowError,
                        AttributeError, IndexError, KeyError) as exc:  # a malformed reply, not the judge's bug
                    self.stop()
                    raise ContractError(f"the kernel's process sent something other than tensors and plain data "
                                        f"({exc}); the judge does not load it") from None
                if reply_id == request_id:
                    return status, payload
                continue  # a reply to an earlier, abandoned request
            waited += POLL_S
            if not self._process.is_alive():  # dead, though a child it forked may still hold the pipe
                raise KernelCrashed(self._death(log_start))
            if limit is not None and waited >= limit:
                compiling = min(self._compile_clock.seconds() - compiled_before, limit)
                if waited < limit + compiling:
                    continue
                spent = f", {compiling:.0f} s of torch.compile's compilation not counted" if compiling >= 1 else ""
                self.stop()
                raise KernelTimedOut(f"one call into the kernel did not return within {limit:g} s{spent} (a hang "
                                     "detector, not a speed verdict: --case-timeout); its process was killed")

    def _unpickler(self, file, fds) -> _ReplyUnpickler:
        return _ReplyUnpickler(file, fds, sender=self._process.pid)

    def _death(self, log_start: int) -> str:
        code = self.stop()
        tail = _log_excerpt(self._log, log_start)
        return f"the kernel's process died with {_describe_exit(code)}" + (f": {tail}" if tail else "")

    # -- what the checks use ----------------------------------------------------------------------
    def describe(self, specs: list[str]) -> dict:
        return self.request("describe", list(specs), timeout=STARTUP_LIMIT)

    def forget(self, release: bool = False) -> None:
        """Drop the autograd graphs kept for backward (at the start of each case); ``release``: and return
        the memory torch's allocators hold unused (a GPU shared by several pytest-xdist workers)."""
        if self._process is not None and self._process.is_alive():
            self.request("forget", release)

    def backend(self, spec: str, described: dict) -> Backend:
        """The judge's Backend for ``spec``: the declaration it sent (checked like a user's declaration:
        a TypeError or ValueError says what is wrong), and functions that run there."""
        decl = described["declaration"]
        if not (isinstance(decl["capabilities"], dict) and isinstance(decl["description"], str)
                and all(isinstance(decl[k], bool) for k in ("varlen", "kvcache", "compiled"))):
            raise TypeError("declaration fields of the wrong type")
        capabilities = Capabilities().updated(decl["capabilities"])
        return Backend(name=spec, fn=_RemoteFn(self, spec, "fn"), capabilities=capabilities,
                       description=decl["description"], unavailable_reasons=lambda: list(described["unavailable"]),
                       varlen_fn=_RemoteFn(self, spec, "varlen_fn") if decl["varlen"] else None,
                       kvcache_fn=_RemoteFn(self, spec, "kvcache_fn") if decl["kvcache"] else None,
                       compiled=decl["compiled"], kernel_side=lambda name, *args: self.procedure(spec, name, args))

    def procedure(self, spec: str, name: str, args):
        """``kernel_side.PROCEDURES[name]`` for backend ``spec`` there; one in ``kernel_side.FRESH`` in a
        process started for its key (kept for the next procedure with that key while nothing else runs
        there), whose first work (CUDA's initialisation, a compiled kernel's compilation) is start-up:
        STARTUP_LIMIT more than a call's limit."""
        if name not in kernel_side.FRESH:
            return self.request("procedure", (name, spec, args))
        key = (spec, name, kernel_side.FRESH[name](*args))
        if key != self._fresh_for:
            self._exit()
        limit = None if self.call_timeout is None else self.call_timeout + STARTUP_LIMIT
        return self.request("procedure", (name, spec, args), timeout=limit, fresh_for=key)


class _RemoteFn:
    """A backend function that runs in the kernel's process. Tensors cross as shared memory (CUDA IPC
    on the GPU), so the kernel works on the judge's own tensors; what comes back is copied at once."""

    def __init__(self, client: KernelProcess, spec: str, which: str):
        self.client, self.spec, self.which = client, spec, which

    def __call__(self, *args, **kwargs):
        grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        # keyword tensors that require grad (a float attn_bias): their gradients come back too
        kw_grad = tuple(name for name, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad)
        if torch.is_grad_enabled() and (any(grad) or kw_grad):
            return _Differentiable.apply(self, kwargs, grad, kw_grad, *args, *(kwargs[n] for n in kw_grad))
        return self.send(args, kwargs, None)[0]

    def send(self, args, kwargs, grad, kw_grad=()):
        shared = lambda x: x.detach() if isinstance(x, torch.Tensor) else x  # noqa: E731
        return self.client.request("call", (self.spec, self.which, tuple(shared(a) for a in args),
                                            {k: shared(v) for k, v in kwargs.items()}, grad, kw_grad),
                                   like=args[0])


class _Differentiable(torch.autograd.Function):
    """The kernel's forward and backward, each a request; the graph stays in the kernel's process.
    ``tensors``: the positional arguments, then the keyword tensors named in ``kw_grad``."""

    @staticmethod
    def forward(ctx, remote, kwargs, grad, kw_grad, *tensors):
        out, handle = remote.send(tensors[:len(grad)], kwargs, grad, kw_grad)
        ctx.remote, ctx.handle, ctx.grad, ctx.kw_grad = remote, handle, grad, kw_grad
        if handle is None:  # the kernel's output has no graph: so has ours
            ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = iter(ctx.remote.client.request("backward", (ctx.handle, dout.detach())))
        back = tuple((next(grads) if g else None) for g in (*ctx.grad, *(True for _ in ctx.kw_grad)))
        return (None, None, None, None, *back)


class _ReplyUnpickler(pickle.Unpickler):
    """Unpickles what the kernel's process sends, allowing only what tensors and plain data need (the
    rebuild functions of torch.multiprocessing, torch's tensor, storage, size, device and dtypes, the
    file-descriptor hand-over, and CUDA tensors through ``_rebuild_cuda_tensor_unsynced``): a reply built
    to run code in the judge when loaded is refused."""

    ALLOWED = {("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch.storage", "UntypedStorage"),
               ("torch.storage", "TypedStorage"),
               ("multiprocessing.resource_sharer", "DupFd"), ("conformance.inputs", "Inputs"),
               *(("torch.multiprocessing.reductions", name) for name in (
                   "rebuild_tensor", "rebuild_storage_fd", "rebuild_storage_empty",
                   "rebuild_typed_storage", "rebuild_typed_storage_child"))}

    def __init__(self, file, fds: list[int] = (), sender: int | None = None):
        super().__init__(file)
        self.fds = list(fds)
        self.sender = sender  # the kernel process' pid, which names the CUDA IPC counter files it makes

    def persistent_load(self, pid):
        return storage_from_fd(self.fds, pid)

    def find_class(self, module, name):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return functools.partial(_rebuild_cuda_tensor_unsynced, self.sender)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _rebuild_cuda_tensor_unsynced(sender: int | None, *args):
    """torch's rebuild_cuda_tensor with its last argument, event_sync_required, False: the judge's stream
    never waits on an event of the kernel's process. Such a wait is what hung the judge when a kernel's
    fault surfaced after its reply (an event behind a fault never completes, and torch synchronises the
    stream when the received tensor is freed). The kernel's process finishes the device's work before
    it replies (kernel_worker._settled); one that skips that, patched by the kernel, gets its output
    read as it stands, never a judge that hangs. The arguments are checked before torch acts on them
    (``cuda_reply_problem``), the storage torch made after (``outside_its_allocation``)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if len(args) != 15:
        raise pickle.UnpicklingError(f"rebuild_cuda_tensor with {len(args)} arguments, not 15")
    problem = cuda_reply_problem(args, sender)
    if problem:
        raise pickle.UnpicklingError(f"a CUDA tensor with {problem}")
    try:
        tensor = rebuild_cuda_tensor(*args[:-1], False)
    except Exception as exc:  # noqa: BLE001 - whatever torch makes of a malformed share, it is not a reply
        raise pickle.UnpicklingError(f"a CUDA tensor torch could not rebuild ({type(exc).__name__}: {exc})") from None
    storage = tensor.untyped_storage()
    if storage.nbytes() != args[8]:
        raise pickle.UnpicklingError(f"a CUDA storage of {storage.nbytes()} bytes, said to be {args[8]}")
    if storage.nbytes():
        pointer = storage.data_ptr()
        outside = outside_its_allocation(pointer, storage.nbytes(), args[9], allocation_of(pointer, storage.device))
        if outside:
            raise pickle.UnpicklingError(f"a CUDA storage {outside}")
    return tensor


# torch trusts the arguments of a CUDA tensor's rebuild: it maps the allocation a handle names (for an
# expandable segment, from a header naming a process and file descriptors to take from it), decrements the
# int64 at any offset of a shared-memory file the sender names, and a storage with no handle it allocates
# anew in the judge, so a view on it shows whatever the judge's allocator last freed there. So a reply's
# CUDA tensor must be what reduce_tensor writes for the sender's own cudaMalloc memory, checked first.

REF_COUNTER_SLOTS = 10000  # int64 slots in one CUDA IPC counter file (torch's CUDA_IPC_REF_COUNTER_FILE_SIZE)


def cuda_reply_problem(args: tuple, sender: int | None) -> str:
    """What in the 15 arguments of a CUDA tensor's rebuild is not what torch's reduce_tensor writes for a
    tensor in process ``sender``'s own cudaMalloc memory; "" when nothing is."""
    (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, nbytes, storage_offset, requires_grad,
     counter, counter_offset, event, _) = args

    def ints(values) -> bool:
        return isinstance(values, tuple) and all(type(v) is int for v in values)

    if tensor_cls is not torch.Tensor or storage_cls not in (torch.storage.TypedStorage, torch.UntypedStorage):
        return "classes other than a tensor's and its storage's"
    if not (ints(size) and ints(stride) and len(size) == len(stride) and type(offset) is int
            and isinstance(dtype, torch.dtype) and type(device) is int and type(requires_grad) is bool):
        return "a view, dtype or device of other types than a tensor's"
    if not torch.cuda.is_available():
        return "no CUDA device here to hold it"
    if handle is None or nbytes == 0:
        return "" if 0 in size else "elements but no memory (torch would allocate it here)"
    if not (type(handle) is bytes and (len(handle) == 64 or (len(handle) == 66 and handle[1:2] == b"c"))):
        return "a handle that names no cudaMalloc allocation (an expandable segment's is not taken)"
    if not (type(nbytes) is int and type(storage_offset) is int and nbytes > 0 and storage_offset >= 0):
        return "a storage size or offset that is not a count of bytes"
    if sender is None or not (type(counter) is bytes and counter.startswith(f"/torch_{sender}_".encode())):
        return "a reference count in a file its process did not make"
    if not (type(counter_offset) is int and 0 <= counter_offset < REF_COUNTER_SLOTS):
        return f"a reference count at slot {counter_offset!r} of a file of {REF_COUNTER_SLOTS}"
    if event is not None and type(event) is not bytes:
        return "an event handle that is not bytes"
    return ""


def outside_its_allocation(pointer: int, nbytes: int, offset: int, allocation: tuple[int, int] | None) -> str:
    """Why a storage of ``nbytes`` at ``pointer``, said to lie ``offset`` bytes into the allocation its
    handle mapped, does not lie within that allocation (``allocation``: the (base, size) of the one that
    holds ``pointer``, None for none); "" when it does."""
    if allocation is None:
        return f"at {pointer:#x}, in no allocation of the device"
    base, size = allocation
    if pointer - offset != base:
        return f"said to start {offset} bytes into its allocation lies in another, {pointer - base} bytes into it"
    if offset + nbytes > size:
        return f"of {nbytes} bytes, {offset} bytes into an allocation of {size} bytes, ends past it"
    return ""


def allocation_of(pointer: int, device: torch.device) -> tuple[int, int] | None:
    """(base, size) of the device allocation that holds ``pointer``, from the driver (cuMemGetAddressRange);
    None where none does."""
    import ctypes

    try:
        driver = _driver()
    except OSError as exc:  # no driver to ask: the storage cannot be checked, so it is not taken
        raise pickle.UnpicklingError(f"a CUDA storage that cannot be checked ({exc})") from None
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    with torch.cuda.device(device):  # the device's context current for the driver call
        status = driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
    if status == CUDA_ERROR_NOT_FOUND:
        return None
    if status != 0:
        raise pickle.UnpicklingError(f"cuMemGetAddressRange failed with CUDA driver error {status}")
    return base.value, size.value


CUDA_ERROR_NOT_FOUND = 500


@functools.cache
def _driver():
    import ctypes

    return ctypes.CDLL("libcuda.so.1")  # loaded by torch already: the same library


# -- the wire -------------------------------------------------------------------------------------
# A message is one pickle sent with Connection.send_bytes, led by the number of file descriptors that
# follow it over the same socket (SCM_RIGHTS): one per CPU tensor storage, which lives in shared memory
# (torch.multiprocessing's file-descriptor strategy). multiprocessing's own hand-over (DupFd) opens a
# connection to a thread of the sending process, with an authentication handshake, for each storage:
# a call with q, k, v and an output took a dozen wake-ups of the two processes, each a wait for a core
# on a busy machine. Here a call is one message each way.

FD_BATCH = 200  # descriptors per SCM_RIGHTS message (the kernel accepts at most 253)
MAX_FDS = 4096  # more in one message is a malformed message, not a call


class ProtocolError(Exception):
    """A message that does not follow the wire format (its file descriptors missing or malformed)."""


class _SharingPickler(reduction.ForkingPickler):
    """torch.multiprocessing's pickling, each CPU storage's descriptor collected to send beside."""

    def __init__(self, file):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.fds: list[int] = []
        self.cuda_slots: list[tuple[bytes, int]] = []

    def reducer_override(self, obj):
        """A CUDA tensor as torch pickles it, its IPC reference-count slot noted (``release_cuda_slots``)."""
        if not (isinstance(obj, torch.Tensor) and obj.is_cuda):
            return NotImplemented
        from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

        rebuild, args = reduce_tensor(obj)
        if rebuild is rebuild_cuda_tensor and args[11] is not None:  # ref_counter_handle, ref_counter_offset
            self.cuda_slots.append((args[11], args[12]))
        return rebuild, args

    def persistent_id(self, obj):
        if type(obj) is torch.UntypedStorage and obj.device.type == "cpu" and obj.nbytes() > 0:
            from torch.multiprocessing.reductions import StorageWeakRef, fd_id, shared_cache

            fd, size = obj._share_fd_cpu_()
            shared_cache[fd_id(fd)] = StorageWeakRef(obj)  # as torch's reduce_storage does
            self.fds.append(fd)
            return ("fd", len(self.fds) - 1, size)
        return None


def connection_socket(conn) -> socket.socket:
    """A socket on the connection's own descriptor (a duplicate), to pass descriptors through."""
    return socket.socket(fileno=os.dup(conn.fileno()))


def send(conn, sock: socket.socket, obj, cuda_slots: list | None = None) -> None:
    """Pickle first (a failure sends nothing), then the message and its descriptors. ``cuda_slots`` gets
    the IPC reference-count slots of the CUDA tensors the message shares, before any of it is sent."""
    buffer = io.BytesIO()
    pickler = _SharingPickler(buffer)
    try:
        pickler.dump(obj)
    except BaseException:
        release_cuda_slots(pickler.cuda_slots)  # shared, never sent: no receiver will release them
        raise
    if cuda_slots is not None:
        cuda_slots += pickler.cuda_slots
    conn.send_bytes(len(pickler.fds).to_bytes(4, "little") + buffer.getbuffer())
    for i in range(0, len(pickler.fds), FD_BATCH):
        reduction.sendfds(sock, pickler.fds[i:i + FD_BATCH])


# -- CUDA IPC memory of a process that is gone ------------------------------------------------------
# torch frees a CUDA block it shared only once each receiver has dropped it: every share gets a counter
# slot of its own (an int64 in a /dev/shm file named by the handle, after a 64-byte header), set to 1,
# that the receiver decrements once, when it frees the tensor. A kernel process killed mid-call never
# does, and the judge's inputs stayed allocated until the run ended (1.5 GiB per timed-out call of three
# 0.5 GiB inputs, measured on an H100). So once the process is dead, the judge releases the slots it
# sent there that still read 1. Never one that reads 0: a second decrement wraps it (torch reads it
# unsigned), and the block would never be freed (pytorch/pytorch#149187).

SLOT_HEADER_BYTES = 64  # the counter file's header (RefcountedMapAllocator's, map_alloc_alignment)
SLOTS_KEPT = 4096  # past this many noted for one process, those its receiver released are forgotten


def held_cuda_slots(slots) -> list[tuple[bytes, int]]:
    """The slots of ``slots`` that still read 1: not released by their receiver (0 is final: torch never
    reuses a slot). One whose file is gone (torch removes a file once all its slots are released), or
    that reads anything else, is not held."""
    files: dict[bytes, set[int]] = {}
    for handle, offset in slots:
        files.setdefault(handle, set()).add(offset)
    held = []
    for handle, offsets in files.items():
        try:
            with open(os.path.join("/dev/shm", handle.decode().lstrip("/")), "rb") as counters:
                data = counters.read()
        except (OSError, UnicodeDecodeError):
            continue
        for offset in sorted(offsets):
            at = SLOT_HEADER_BYTES + 8 * offset
            if int.from_bytes(data[at:at + 8], "little", signed=True) == 1:
                held.append((handle, offset))
    return held


def release_cuda_slots(slots) -> int:
    """Release each of ``slots`` that its receiver did not (``held_cuda_slots``): they were sent to a process
    now dead, or never sent. Then torch frees the blocks no receiver holds. How many it released."""
    held = held_cuda_slots(slots)
    for handle, offset in held:
        torch.UntypedStorage._release_ipc_counter_cuda(handle, offset)
    if held and torch.cuda.is_initialized():
        torch.cuda.ipc_collect()
    return len(held)


def receive(conn, sock: socket.socket, unpickler, fd_wait: float):
    """The next message, loaded by ``unpickler(file, fds)``; its descriptors are closed afterwards (the
    storages map them). ``fd_wait``: seconds its descriptors may take to follow it."""
    data = conn.recv_bytes()
    if len(data) < 4:
        raise ProtocolError("a message shorter than its header")
    n = int.from_bytes(data[:4], "little")
    if n > MAX_FDS:
        raise ProtocolError(f"a message announcing {n} file descriptors")
    fds: list[int] = []
    try:
        while len(fds) < n:
            if not conn.poll(fd_wait):
                raise ProtocolError(f"{n - len(fds)} announced file descriptors did not follow")
            fds += reduction.recvfds(sock, min(FD_BATCH, n - len(fds)))
        return unpickler(io.BytesIO(memoryview(data)[4:]), fds).load()
    finally:
        for fd in fds:
            os.close(fd)


def storage_from_fd(fds: list[int], pid) -> torch.UntypedStorage:
    """The storage a persistent id ("fd", index, size) names, mapped from its descriptor (or the mapping
    this process already has of the same memory, as torch's rebuild_storage_fd does)."""
    from torch.multiprocessing.reductions import StorageWeakRef, fd_id, shared_cache, storage_from_cache

    if not (isinstance(pid, tuple) and len(pid) == 3 and pid[0] == "fd" and type(pid[1]) is int
            and type(pid[2]) is int and 0 <= pid[1] < len(fds) and pid[2] >= 0):
        raise pickle.UnpicklingError(f"refused persistent id {pid!r}")
    fd, size = fds[pid[1]], pid[2]
    if os.fstat(fd).st_size < size:  # mapping past the end of the memory would crash on access (SIGBUS)
        raise pickle.UnpicklingError(f"a storage of {size} bytes in shared memory of {os.fstat(fd).st_size}")
    key = fd_id(fd)
    storage = storage_from_cache(torch.UntypedStorage, key)
    if storage is None:
        storage = torch.UntypedStorage._new_shared_fd_cpu(fd, size)
        shared_cache[key] = StorageWeakRef(storage)
    return storage


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _install_sigterm_handler() -> None:
    """On SIGTERM (what CI timeouts send) kill every kernel process and its children first, then end
    as SIGTERM would have: a hung kernel must not outlive the run."""
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "_kills_kernels", False) or previous == signal.SIG_IGN or not _main_thread():
        return

    def handler(signum, frame):
        for client in list(_LIVE):
            client.stop()
        signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    handler._kills_kernels = True
    signal.signal(signal.SIGTERM, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@atexit.register
def _stop_all() -> None:
    for client in list(_LIVE):
        client.stop()


def _log_excerpt(log, start: int) -> str:
    """What the process wrote to ``log`` (the judge's open file) since ``start``: from the fatal error's
    report if there is one (that is what says why it died), else its last lines."""
    log.seek(max(start, os.fstat(log.fileno()).st_size - LOG_TAIL_BYTES))
    lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    shown = lines[fatal[-1]: fatal[-1] + 4] if fatal else lines[-4:]
    return " | ".join(shown)[:800]


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"{signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
