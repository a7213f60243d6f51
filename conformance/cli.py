"""`attn-conformance` (also `python -m conformance`): the suite without a checkout.

    attn-conformance run [pytest options]   the conformance suite (= pytest --pyargs conformance.suite ...)
    attn-conformance list-backends          every known backend, available here or why not
    attn-conformance summary [JOURNAL]      the verdict table rebuilt from a results journal alone
                                            (default conformance-results.jsonl)
    attn-conformance certify [--out DIR] [--size full|tiny] [--memory-budget GB] [--gpus all|0,1,...]
                                            is this machine ready for the FlashAttention lab? a report
                                            in DIR (default certification/); exit 0 only if certified.
                                            With several GPUs, each is certified in a process of its
                                            own, side by side, and DIR holds a node report
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n", 2)[2]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else ""
    if command == "run":
        import pytest

        return int(pytest.main(["--pyargs", "conformance.suite", *argv]))
    if command == "list-backends":
        from conformance.listing import backend_listing

        print("\n".join(backend_listing()))
        return 0
    if command == "certify":
        import argparse

        from conformance.certify.run import certify

        parser = argparse.ArgumentParser(prog="attn-conformance certify")
        parser.add_argument("--out", default="certification")
        parser.add_argument("--size", choices=("full", "tiny"), default="full")
        parser.add_argument("--memory-budget", type=float, default=16.0)
        parser.add_argument("--gpus", default="all", help="all (default) or a comma-separated list of "
                            "CUDA_VISIBLE_DEVICES entries")
        args = parser.parse_args(argv)
        import os
        from pathlib import Path

        from conformance import workers

        if Path(args.out).exists() and not Path(args.out).is_dir():
            parser.error(f"--out {args.out} is a file; give a folder for the report")

        gpus = workers.visible_gpus() if args.gpus == "all" else [g.strip() for g in args.gpus.split(",") if g.strip()]
        if len(gpus) > 1:
            from conformance.certify.node import certify_node

            return certify_node(Path(args.out), gpus, args.size, args.memory_budget)
        if args.gpus != "all":  # one named GPU: pin this process to it before CUDA starts
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return certify(Path(args.out), args.size, args.memory_budget)
    if command == "summary":
        return _summary(argv[0] if argv else "conformance-results.jsonl")
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


def _summary(path: str) -> int:
    from conformance import results, summary

    try:
        journal = results.read(path)
    except results.ResultsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header, records = journal.header, journal.cases
    print(f"run {header.get('run_id')} started {header.get('started')}: device {header.get('device')}, "
          f"tier {header.get('tier')}, {len(records)} cases recorded")
    print("\n".join(summary.table(records)))
    if not journal.complete:
        print("INCOMPLETE: the run did not finish (the journal has no end record: it was killed, crashed, or "
              "ended by a kernel); not a pass", file=sys.stderr)
        return 1
    if journal.end["exitstatus"] != 0:
        print(f"the run ended with exit status {journal.end['exitstatus']}")
        return 1
    return 1 if any(r["outcome"] in ("failed", "crashed", "timed out", "harness error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
