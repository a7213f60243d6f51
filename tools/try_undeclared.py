"""Runs a check's grid on a backend with flags it does not declare yet turned on, to verify a function
written but not declared (flex's KV-cache function; flash's mixed prefill and decode batches through
flash_attn_varlen_func) before declaring it. In the judge's process (no isolation); prints one line per case.

Usage: python tools/try_undeclared.py BACKEND CHECK FLAG[,FLAG...] [--tier standard] [--device cuda]
       [--only FIELD]   (only cases using this Case field, e.g. new_seqlens)
e.g.   python tools/try_undeclared.py flash kvcache mixed_batch --only new_seqlens
       python tools/try_undeclared.py flex kvcache kvcache,paged_kv"""

from __future__ import annotations

import argparse
import dataclasses

from conformance import grid, registry
from conformance.checks import CHECKS, execute


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend")
    parser.add_argument("check")
    parser.add_argument("flags", help="capability flags to turn on, comma-separated")
    parser.add_argument("--tier", default="standard")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", help="only cases whose Case field of this name is set")
    args = parser.parse_args()
    backend = registry.load(args.backend)
    flags = {name: True for name in args.flags.split(",")}
    backend = dataclasses.replace(backend, capabilities=dataclasses.replace(backend.capabilities, **flags))
    failed = 0
    for r in grid.for_backend(CHECKS[args.check], backend.capabilities, args.device, args.tier):
        if r.case is None or (args.only and getattr(r.case, args.only) is None):
            continue
        try:
            verdict = execute(args.check, backend, r.case, args.device)
            line = "PASS" if verdict.passed else "FAIL " + verdict.message()
            failed += not verdict.passed
        except Exception as exc:  # noqa: BLE001 - a report line per case
            line, failed = f"RAISED {type(exc).__name__}: {str(exc)[:300]}", failed + 1
        print(f"{backend.name} {r.case.id} {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
