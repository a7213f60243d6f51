"""Sly kernels: wrong ones that try to make the suite pass them, and ones that try to escape or outlive
the run. Each is a mutant the judge-apart design must catch (tests/test_kernel_client.py). Loaded by
import string (tests/sly.py:NAME), so only the kernel's process imports this module, as with any kernel.
"""

import gc
import os
import subprocess
import sys
import time

import torch

import conformance.reference
import conformance.tolerance
import conformance.verdict
from conformance.backends import naive


def _wrong(q, k, v, softmax_scale=None, **kwargs):
    """A softmax scale 1.5 times too large: fails nearly every case on its own."""
    return naive.attention(q, k, v, softmax_scale=1.5 * (softmax_scale or q.shape[-1] ** -0.5), **kwargs)


# At import, the kernel's module patches the suite so that its wrong answer is judged right. The judge
# never imports this module, so none of it reaches the reference, the comparison or the verdict.
_real_reference = conformance.reference.attention


def _same_bug_reference(q, k, v, case, **kwargs):
    return _real_reference(q, k, v, case.replace(softmax_scale=1.5 * case.scale), **kwargs)


conformance.reference.attention = _same_bug_reference
conformance.tolerance.Comparison.passed = property(lambda self: True)
conformance.verdict.Verdict.fail = lambda self, prop, message: None
_real_softmax = torch.softmax
torch.softmax = lambda x, dim=-1, **kw: _real_softmax(x * 1.5, dim, **kw)  # a careless global patch


def patches_the_suite(q, k, v, **kwargs):
    """Wrong, with the suite patched to agree (reference, comparison, verdict, torch.softmax)."""
    return _wrong(q, k, v, **kwargs)


def relies_on_patched_softmax(q, k, v, softmax_scale=None, causal=False, **kwargs):
    """Computes with torch.softmax, which this module patched globally."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * (softmax_scale or q.shape[-1] ** -0.5)
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def steals_the_reference(q, k, v, **kwargs):
    """Returns the suite's float64 answer for these inputs if it can find one through gc."""
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.dtype == torch.float64 and obj.shape == q.shape:
            return obj.to(q.dtype)
    return torch.zeros_like(q)


def says_out_of_memory(q, k, v, **kwargs):
    """An error whose text mentions memory, from a kernel that simply fails: not an out-of-memory."""
    raise RuntimeError("kernel failed: not enough shared memory for this tile (out of memory)")


def exits_cleanly(q, k, v, **kwargs):
    """Ends its process with status 0 in the middle of a call."""
    os._exit(0)


def forks_then_crashes(q, k, v, **kwargs):
    """Forks a child that outlives it (holding the pipe to the judge), then dies of a signal."""
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    os.abort()


def hangs_with_a_child(q, k, v, **kwargs):
    """Starts a process that would outlive it, writes its pid where the test reads it, then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["SLY_PID_FILE"], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(600)


for _fn in (patches_the_suite, relies_on_patched_softmax, steals_the_reference, says_out_of_memory, exits_cleanly,
            forks_then_crashes, hangs_with_a_child):
    _fn.conformance_capabilities = {"dtypes": ["fp32", "fp64"], "causal": [], "backward": False}


class _RunsCodeWhenLoaded(torch.Tensor):
    """A tensor whose unpickling would run code in whoever loads it."""

    def __reduce_ex__(self, protocol):
        return (os.system, ("touch " + os.environ.get("SLY_PWNED", "/tmp/sly-pwned"),))


def replies_with_code(q, k, v, **kwargs):
    """Patches the kernel process's reply so that loading it would run a command in the judge."""
    import conformance.kernel_worker as worker

    real = worker._Worker.call

    def call(self, *args):
        status, (out, handle) = real(self, *args)
        return status, (_RunsCodeWhenLoaded(), handle)

    worker._Worker.call = call
    return naive.attention(q, k, v, **kwargs)


replies_with_code.conformance_capabilities = {"dtypes": ["fp32", "fp64"], "causal": [], "backward": False}


def refuses_what_it_gets_wrong(q, k, v, **kwargs):
    """Right without GQA; raises the suite's Unsupported for the GQA cases it declares and gets wrong."""
    from conformance.backend import Unsupported

    if q.shape[2] != k.shape[2]:
        raise Unsupported("not today")
    return naive.attention(q, k, v, **kwargs)


def returns_a_huge_view(q, k, v, **kwargs):
    """A tensor that claims far more memory than exists: copying it would end the judge."""
    return torch.zeros(1, dtype=q.dtype).expand(10**6, 10**6)


def _patch_cuda_replies(change):
    """This process' CUDA replies, their rebuild arguments (torch's reduce_tensor) changed by ``change``."""
    from conformance import kernel_client

    original = kernel_client._SharingPickler.reducer_override

    def reducer_override(self, obj):
        reduced = original(self, obj)
        if reduced is NotImplemented:
            return reduced
        rebuild, args = reduced
        args = list(args)
        change(args, obj)
        return rebuild, tuple(args)

    kernel_client._SharingPickler.reducer_override = reducer_override


def _claim_more(args, obj):
    args[8] += 2**30  # storage_size_bytes
    args[3] += 2**30 // obj.element_size()  # the view's offset, in elements, into the claimed part


def _claim_none(args, obj):
    args[7], args[8] = None, 0  # no handle: torch would give the view memory of the judge's own


def claims_memory_it_never_shared(q, k, v, **kwargs):
    """Right, but its process' reply says its output's storage is 1 GiB larger than the allocation it shares,
    and puts the output's view in that part: copying it reads memory the kernel never shared."""
    _patch_cuda_replies(_claim_more)
    return naive.attention(q, k, v, **kwargs)


def claims_no_memory(q, k, v, **kwargs):
    """Right, but its process' reply shares no memory for its output: rebuilt as torch does, the output
    would be whatever the judge's allocator hands out for it (what the judge last freed there)."""
    _patch_cuda_replies(_claim_none)
    return naive.attention(q, k, v, **kwargs)


for _fn in (claims_memory_it_never_shared, claims_no_memory):
    _fn.conformance_capabilities = {"dtypes": ["fp16", "fp32"], "causal": [], "backward": False, "devices": ["cuda"]}


for _fn in (refuses_what_it_gets_wrong, returns_a_huge_view):
    _fn.conformance_capabilities = {"dtypes": ["fp32", "fp64"], "causal": [], "backward": False}
