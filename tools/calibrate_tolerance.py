"""Measure how close correct backends come to the tolerance bound, over random cases.

Prints, per dtype and backend, the largest ratio error / bound for the forward output and for the
gradients under the suite's rule (tolerance.py), and under the rule with a single evaluation order and
no accumulation term (flash-attn's rule as written), to show why the rule has the shape it has.
Usage: python tools/calibrate_tolerance.py [cases per dtype] [device]
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
from conformance.tolerance import FORWARD_MULTIPLE, GRADIENT_MULTIPLE, bound, max_abs_error, ulp


def random_case(rng: random.Random, dtype: str) -> Case:
    heads = rng.choice(((4, 4), (8, 2), (4, 1)))
    return Case(batch=rng.choice((1, 2)), seqlen_q=rng.choice((1, 17, 64, 65, 128, 257, 1000)),
                seqlen_k=rng.choice((1, 17, 64, 65, 128, 257, 1000)), nheads=heads[0], nheads_k=heads[1],
                head_dim=rng.choice((16, 40, 59, 64, 128)), dtype=dtype,
                causal=rng.choice((None, "bottom_right", "top_left")), softmax_scale=rng.choice((None, 0.3)),
                magnitude=rng.choice((1.0, 4.0, 16.0)), seed=rng.randrange(10**5))


def single_order_error(inputs, case, masked_rows, ref):
    p = reference.attention(inputs.q, inputs.k, inputs.v, case, upcast=False, masked_rows=masked_rows)
    return max_abs_error(p, ref)


def main(n: int, device: str) -> None:
    rng = random.Random(0)
    print(f"{'dtype':<6}{'backend':<11}{'fwd ratio':>10}{'grad ratio':>11}{'fwd ratio, one order':>22}")
    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        worst: dict = {}
        for _ in range(n):
            case = random_case(rng, dtype)
            inputs = make_inputs(case, device, requires_grad=True)
            for backend in (naive.BACKEND, sdpa_math.BACKEND, tiled.BACKEND):
                caps = backend.capabilities
                exp = expected(case, device, caps.masked_rows, True)
                out = call(backend, inputs.q, inputs.k, inputs.v, case)
                grads = torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), inputs.dout)
                n_acc = max(case.seqlen_q, case.seqlen_k)
                fwd = max_abs_error(out, exp.out) / bound(exp.out_torch_error, exp.out_magnitude, case.torch_dtype,
                                                          FORWARD_MULTIPLE, n_acc)
                grad = max(max_abs_error(g, r) / bound(e, m, case.torch_dtype, GRADIENT_MULTIPLE, n_acc)
                           for g, r, e, m in zip(grads, exp.grads, exp.grad_torch_errors, exp.grad_magnitudes))
                one = max_abs_error(out, exp.out) / (FORWARD_MULTIPLE * single_order_error(
                    inputs, case, caps.masked_rows, exp.out) + ulp(case.torch_dtype, float(exp.out.abs().max())))
                w = worst.setdefault(backend.name, [0.0, 0.0, 0.0])
                w[:] = max(w[0], fwd), max(w[1], grad), max(w[2], one)
        for name, (fwd, grad, one) in worst.items():
            print(f"{dtype:<6}{name:<11}{fwd:>10.2f}{grad:>11.2f}{one:>22.2f}")
    print(f"({n} random cases per dtype on {device}; a ratio above 1 would fail; gradients: worst of {GRAD_NAMES})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100, sys.argv[2] if len(sys.argv) > 2 else "cpu")
