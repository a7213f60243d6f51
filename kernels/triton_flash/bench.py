"""Speed of the triton backend beside other backends, with the suite's own speed machinery, on one GPU.

  side:   python kernels/triton_flash/bench.py side [--backends triton,sdpa-flash,sdpa-cudnn,flash] [--json F]
      fp16, (batch, heads) = (4, 16), seqlens --seqlens (4096,8192,2048,16384 in that order, until
      --budget-s is spent), head dims 64 and 128, causal and not, forward and forward+backward. Each case is
      measured once with every backend timed interleaved in the same rounds (conformance.checks.speed.measure:
      settled clocks, L2 flushed, medians, the timed outputs checked against the float64 reference), and
      printed as TFLOP/s and triton's ratio to each other backend.
  stored: python kernels/triton_flash/bench.py stored --baselines DIR --variant FILE.py [--tier quick]
      The speed check's stored-baseline verdict (what `pytest --check=speed` does without --speed-against)
      for the unchanged triton backend and for FILE.py's `attention` under the name `triton`, judged
      against DIR's triton baselines: the variant (variants.py extra-pass) must fail, the unchanged one pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time

import torch

from conformance import registry
from conformance.case import Case
from conformance.checks import execute
from conformance.checks import speed as speed_check
from conformance.options import RunOptions
from conformance.verdict import Verdict


def side(args) -> None:
    names = args.backends.split(",")
    backends = {name: registry.load(name) for name in names}
    for name, backend in list(backends.items()):
        reasons = backend.unavailable_reasons()
        if reasons:
            print(f"{name} unavailable: {'; '.join(reasons)}")
            del backends[name]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows, t0 = [], time.time()
    for n in map(int, args.seqlens.split(",")):
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: seqlen {n} and later not measured", flush=True)
            break
        for d in (64, 128):
            for causal in (False, True):
                case = Case(batch=args.batch, seqlen_q=n, seqlen_k=n, nheads=args.heads, head_dim=d, dtype="fp16",
                            causal="bottom_right" if causal else None, seed=1)
                for mode in ("fwd", "fwdbwd"):
                    versions = {name: b for name, b in backends.items()
                                if not b.capabilities.not_supported_reasons(case, "cuda", speed_check.NEEDS)}
                    verdict = Verdict("speed", names[0], case, "cuda")
                    timed = speed_check.measure(versions, case, "cuda", mode, verdict)
                    row = {"seqlen": n, "d": d, "causal": causal, "mode": mode, "outputs_ok": verdict.passed,
                           "gpu": timed["gpu"], "entries": timed["entries"]}
                    rows.append(row)
                    tf = {name: e["tflops"] for name, e in timed["entries"].items()}
                    print(f"N={n:5} d={d:3} {'causal' if causal else 'full  '} {mode:6} "
                          + "  ".join(f"{name} {v:5.0f}" for name, v in tf.items())
                          + ("" if verdict.passed else "  OUTPUT CHECK FAILED: " + verdict.message()), flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
    first, others = names[0], [n for n in names[1:] if n in backends]
    print(f"\n| N | d | causal | mode | {first} TFLOP/s | " + " | ".join(f"{o} | ratio" for o in others) + " |")
    print("| --- " * (5 + 2 * len(others)) + "|")
    for r in rows:
        e = r["entries"]
        cells = [f"{e[o]['tflops']:.0f} | {e[first]['tflops'] / e[o]['tflops']:.2f}" if o in e else "- | -"
                 for o in others]
        print(f"| {r['seqlen']} | {r['d']} | {'yes' if r['causal'] else 'no'} | {r['mode']} | {e[first]['tflops']:.0f} | "
              + " | ".join(cells) + " |")


def stored(args) -> None:
    backend = registry.load("triton")
    spec = importlib.util.spec_from_file_location("triton_flash_variant", args.variant)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    versions = {"unchanged": backend, "variant": dataclasses.replace(backend, fn=module.attention)}
    options = RunOptions(tier=args.tier, baselines_dir=args.baselines)
    for label, b in versions.items():
        for case in speed_check.cases(args.tier):
            verdict = execute("speed", b, case, "cuda", options)
            print(f"stored baseline, {label}: {case.id}: {'passed' if verdict.passed else 'FAILED'}")
            for finding in verdict.findings:
                print(f"    [{finding.property}] {finding.message}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("side")
    s.add_argument("--backends", default="triton,sdpa-flash,sdpa-cudnn,flash")
    s.add_argument("--seqlens", default="4096,8192,2048,16384")
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--heads", type=int, default=16)
    s.add_argument("--budget-s", type=float, default=120)
    s.add_argument("--json", default=None)
    st = sub.add_parser("stored")
    st.add_argument("--baselines", required=True)
    st.add_argument("--variant", required=True)
    st.add_argument("--tier", default="quick")
    args = parser.parse_args(argv)
    side(args) if args.command == "side" else stored(args)


if __name__ == "__main__":
    main()
