"""The launch-configuration sweep behind flash.CONFIGS, on one GPU, in one process.

    python kernels/triton_flash/tune.py [--n 8192] [--batch 4] [--heads 16] [--json FILE]

For each head dim and kernel (forward, dK/dV, dQ) every candidate (BLOCK_M, BLOCK_N, num_warps,
num_stages) is first checked against a float32 PyTorch reference (fp16, 1024 tokens; max abs error of
out, dq, dk, dv, relative to the reference's largest value), then timed with triton.testing.do_bench
(median, fp16, non-causal and causal) at the benchmark size. Prints a table per kernel; the fastest
correct candidate per head dim is what CONFIGS should hold. Not a conformance or speed verdict (the
suite gives those): a tuning aid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flash  # noqa: E402

CANDIDATES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 4, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 4)]},
    "dkdv": {64: [(32, 128, 4, 5), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 5), (64, 128, 4, 3)],
             128: [(64, 64, 4, 3), (32, 128, 8, 5), (64, 128, 8, 3), (32, 64, 4, 5), (32, 128, 4, 4)]},
    "dq": {64: [(128, 32, 4, 5), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 5), (128, 64, 4, 3)],
           128: [(64, 64, 4, 3), (128, 32, 8, 5), (128, 64, 8, 3), (64, 32, 4, 5), (128, 32, 4, 4)]},
}


def reference(q, k, v, scale, causal):
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, scale=scale).transpose(1, 2)


def inputs(batch, n, heads, d, grad=True):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads, d, device="cuda", dtype=torch.float16, generator=g).requires_grad_(grad)
               for _ in range(3))
    return q, k, v, torch.randn(batch, n, heads, d, device="cuda", dtype=torch.float16, generator=g)


def error(kernel, config, d, causal):
    """Max abs error of out, dq, dk, dv over the reference's largest value, with `config` for `kernel`."""
    q, k, v, do = inputs(1, 1024, 4, d)
    scale = d ** -0.5
    ref = reference(q, k, v, scale, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    out, lse = flash._forward(q, k, v, scale, causal, config if kernel == "fwd" else None)
    delta = flash._delta(do, out, q.shape[2])
    dk, dv = flash._dkdv(do, q, k, v, lse, delta, scale, causal, config if kernel == "dkdv" else None)
    dq = flash._dq(do, q, k, v, lse, delta, scale, causal, config if kernel == "dq" else None)
    return max(((a.float() - b).abs().max() / b.abs().max()).item()
               for a, b in zip((out, dq, dk, dv), (ref, *ref_grads)))


def timer(kernel, config, batch, n, heads, d, causal):
    q, k, v, do = inputs(batch, n, heads, d, grad=False)
    scale = d ** -0.5
    out, lse = flash._forward(q, k, v, scale, causal)
    delta = flash._delta(do, out, heads)
    run = {"fwd": lambda: flash._forward(q, k, v, scale, causal, config),
           "dkdv": lambda: flash._dkdv(do, q, k, v, lse, delta, scale, causal, config),
           "dq": lambda: flash._dq(do, q, k, v, lse, delta, scale, causal, config)}[kernel]
    return triton.testing.do_bench(run, warmup=50, rep=200, return_mode="median")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--kernels", default="fwd,dkdv,dq")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows = []
    for kernel in args.kernels.split(","):
        # matrix products of each kernel per (query, key) pair, 2*d FLOPs each: fwd 2, dK/dV 4, dQ 3
        products = {"fwd": 2, "dkdv": 4, "dq": 3}[kernel]
        for d in map(int, args.head_dims.split(",")):
            for config in CANDIDATES[kernel][d]:
                row = {"kernel": kernel, "d": d, "config": config}
                try:
                    row["error"] = error(kernel, config, d, True)
                    for causal in (False, True):
                        ms = timer(kernel, config, args.batch, args.n, args.heads, d, causal)
                        flops = products * 2 * args.batch * args.heads * args.n * args.n * d * (0.5 if causal else 1)
                        row["causal" if causal else "full"] = (ms, flops / ms / 1e9)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory): say so
                    row["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                if "failed" in row:
                    print(f"{kernel:5} d{d:<4} {str(config):20} FAILED {row['failed']}", flush=True)
                else:
                    print(f"{kernel:5} d{d:<4} {str(config):20} err {row['error']:.1e}  "
                          f"full {row['full'][0]:7.3f} ms {row['full'][1]:5.0f} TF/s  "
                          f"causal {row['causal'][0]:7.3f} ms {row['causal'][1]:5.0f} TF/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
