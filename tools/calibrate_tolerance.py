"""Measure how close correct backends come to the tolerance bound, over random cases.

Prints, per dtype and backend, the largest ratio error / bound for the forward output and for the
gradients under the suite's rule (tolerance.py), and under the rule with a single evaluation order and
no accumulation term (flash-attn's rule as written), to show why the rule has the shape it has.
In 16-bit dtypes it also runs tests/mutants.py's half-precision accumulator, whose ratio must exceed 1
on long sums. Usage: python tools/calibrate_tolerance.py [cases per dtype] [device] [dtypes, comma-separated]
"""

from __future__ import annotations

import random
import sys

import torch

from conformance import reference
from conformance.backend import call
from conformance.backends import naive, sdpa_math, tiled
from conformance.case import Case
from conformance.expected import GRAD_NAMES, expected
from conformance.inputs import make_inputs
from conformance.tolerance import FORWARD_MULTIPLE, GRADIENT_MULTIPLE, compare, max_abs_error, ulp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from mutants import PRECISION_MUTANTS  # noqa: E402


def random_case(rng: random.Random, dtype: str) -> Case:
    heads = rng.choice(((4, 4), (8, 2), (4, 1)))
    lengths = (1, 17, 64, 65, 128, 257, 1000, 2113, 4096)
    return Case(batch=rng.choice((1, 2)), seqlen_q=rng.choice(lengths), seqlen_k=rng.choice(lengths), nheads=heads[0], nheads_k=heads[1],
                head_dim=rng.choice((16, 40, 59, 64, 128)), dtype=dtype,
                causal=rng.choice((None, "bottom_right", "top_left")), softmax_scale=rng.choice((None, 0.3)),
                magnitude=rng.choice((1.0, 4.0, 16.0)), seed=rng.randrange(10**5))


def single_order_error(inputs, case, masked_rows, ref):
    p = reference.attention(inputs.q, inputs.k, inputs.v, case, upcast=False, masked_rows=masked_rows)
    return max_abs_error(p, ref)


def ratio(c) -> float:
    return float("inf") if c.nonfinite else c.error / c.bound


def main(n: int, device: str, dtypes: list[str]) -> None:
    rng = random.Random(0)
    mutant = PRECISION_MUTANTS[0].backend
    print(f"{'dtype':<6}{'backend':<18}{'fwd ratio':>10}{'grad ratio':>11}{'fwd ratio, one order':>22}")
    for dtype in dtypes:
        worst: dict = {}
        for _ in range(n):
            case = random_case(rng, dtype)
            if case.seqlen_q * case.seqlen_k * case.nheads * case.batch > 2**23:  # keep the CPU minutes sane
                case = case.replace(batch=1, nheads=case.nheads_k, seqlen_q=min(case.seqlen_q, 257))
            inputs = make_inputs(case, device, requires_grad=True)
            backends = [naive.BACKEND, sdpa_math.BACKEND, tiled.BACKEND] + ([mutant] if dtype in ("fp16", "bf16") else [])
            for backend in backends:
                caps = backend.capabilities
                grads_wanted = caps.backward
                exp = expected(case, device, caps.masked_rows, grads_wanted, caps.accumulation)
                out = call(backend, inputs.q, inputs.k, inputs.v, case)
                n_acc = max(case.seqlen_q, case.seqlen_k)
                fwd = ratio(compare("out", out, exp.out, exp.out_torch_error, exp.out_magnitude, case.torch_dtype,
                                    FORWARD_MULTIPLE, n_acc))
                grad = 0.0
                if grads_wanted:
                    grads = torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), inputs.dout)
                    grad = max(ratio(compare(nm, g, r, e, m, case.torch_dtype, GRADIENT_MULTIPLE, n_acc))
                               for nm, g, r, e, m in zip(GRAD_NAMES, grads, exp.grads, exp.grad_torch_errors,
                                                         exp.grad_magnitudes))
                one = max_abs_error(out, exp.out) / (FORWARD_MULTIPLE * single_order_error(
                    inputs, case, caps.masked_rows, exp.out) + ulp(case.torch_dtype, float(exp.out.abs().max())))
                w = worst.setdefault(backend.name, [0.0, 0.0, 0.0, 0.0])
                long_noncausal = case.seqlen_k >= 2048 and case.seqlen_q > 1 and case.causal is None
                w[:] = max(w[0], fwd), max(w[1], grad), max(w[2], one), max(w[3], fwd if long_noncausal else 0.0)
        for name, (fwd, grad, one, long_fwd) in worst.items():
            extra = f"   (largest forward ratio on >= 2048 keys, not causal: {long_fwd:.2f})" if name == mutant.name else ""
            print(f"{dtype:<6}{name:<18}{fwd:>10.2f}{grad:>11.2f}{one:>22.2f}{extra}")
    print(f"({n} random cases per dtype on {device}; a ratio above 1 fails; gradients: worst of {GRAD_NAMES})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100, sys.argv[2] if len(sys.argv) > 2 else "cpu",
         sys.argv[3].split(",") if len(sys.argv) > 3 else ["fp16", "bf16", "fp32", "fp64"])
