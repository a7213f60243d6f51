"""`attn-conformance` (also `python -m conformance`): the suite without a checkout. `attn-conformance
--help` lists the commands, `attn-conformance COMMAND --help` explains one."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

CERTIFY_EXTRA = ("transformers", "matplotlib", "rich")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attention-conformance")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        from conformance import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-conformance", description="Conformance and regression suite for "
                                     "attention kernels. Exit status 0: all good; 1: failures or regressions; 2: usage.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser("run", add_help=False, help="the conformance suite: pytest --pyargs conformance.suite [PYTEST "
                        "ARGS]; every argument after 'run' goes to pytest ('run --help' is pytest's help, with this "
                        "suite's options under 'attention kernel conformance')")

    commands.add_parser("list-backends", help="every known backend, available here or why not",
                        description="Every known backend, available here or why not.")

    p = commands.add_parser("summary", help="the verdict table rebuilt from a results journal alone",
                            description="The verdict table rebuilt from a results journal alone. Exit 1 when the run "
                            "failed, did not finish, or had failing cases.")
    p.add_argument("journal", nargs="?", default="conformance-results.jsonl",
                   help="the results journal (default conformance-results.jsonl)")
    p.add_argument("--run", default=None, metavar="RUN_ID",
                   help="the run to summarise, by its id or the id's start (default: the last one; a rerun with "
                        "--case or --check is added after the run before it)")

    p = commands.add_parser("certify", help="is this machine ready for the FlashAttention lab? (needs the [certify] "
                            "extra)", description="Is this machine ready for the FlashAttention lab? A report in "
                            "--out; exit 0 only if certified. With several GPUs, each is certified in a process of its "
                            "own, side by side, and --out holds a node report. Needs the [certify] extra: "
                            "pip install 'attention-conformance[certify]'.")
    p.add_argument("--out", default="certification", help="folder of the report (default certification/)")
    p.add_argument("--size", choices=("full", "tiny"), default=None,
                   help="full: the lab's sizes (default with a GPU); tiny: seconds on a CPU (default without one)")
    p.add_argument("--memory-budget", type=float, default=16.0, metavar="GB")
    p.add_argument("--gpus", default="all", help="all (default) or a comma-separated list of CUDA_VISIBLE_DEVICES "
                   "entries")

    p = commands.add_parser("compare", help="two results journals, or two baseline folders, side by side",
                            description="Two results journals (conformance-results.jsonl): new failures, fixed cases, "
                            "outcome changes, error/bound ratios that moved, speed medians. Or two baseline folders "
                            "(<arch>/<backend>.json): the median change of each entry. Exit 1 when B has a new "
                            "failure or an entry slower than --slowdown.")
    p.add_argument("a", metavar="A", help="the earlier run: a journal file or a baselines folder")
    p.add_argument("b", metavar="B", help="the later run, of the same kind as A")
    p.add_argument("--slowdown", type=float, default=10.0, metavar="PCT",
                   help="a median slower than this many percent is a regression (default 10)")
    p.add_argument("--ratio-factor", type=float, default=2.0, metavar="X",
                   help="journals: list error/bound ratios that changed by more than this factor (default 2)")

    p = commands.add_parser("update-baselines", help="write the speed baselines a run's journal holds (for a run "
                            "cut before its end, which writes them)",
                            description="The speed measurements of a run made with --update-baselines, read from its "
                            "results journal and merged into the stored baseline files as the run writes them at its "
                            "end: for a run cut before that (a time limit, a lost machine), whose journal keeps every "
                            "case that finished. Exit 1 when the run holds none.")
    p.add_argument("journal", nargs="?", default="conformance-results.jsonl",
                   help="the results journal (default conformance-results.jsonl)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="the run, by its id or the id's start (default: the "
                   "last one)")
    p.add_argument("--baselines-dir", default=None, metavar="DIR",
                   help="write DIR/<arch>/<backend>.json (default: the files the run named, relative to where it ran)")

    p = commands.add_parser("export-benchmark", help="a journal's speed measurements for github-action-benchmark",
                            description="The speed measurements of a results journal as github-action-benchmark's "
                            "'customSmallerIsBetter' JSON ([{name, unit, value, range, extra}]), one entry per "
                            "backend and mode:case.")
    p.add_argument("journal", nargs="?", default="conformance-results.jsonl")
    p.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")
    p.add_argument("--metric", choices=("median_ms", "ratio"), default="median_ms",
                   help="median_ms (default), or ratio: the median over the reference kernel's, timed beside it")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        # pytest in a process of its own: this one has imported the package already, so pytest could not
        # rewrite its asserts (PytestAssertRewriteWarning) and would reuse modules loaded before its options
        return subprocess.call([sys.executable, "-m", "pytest", "--pyargs", "conformance.suite", *argv[1:]])
    args = _parser().parse_args(argv)
    if args.command == "list-backends":
        from conformance.listing import backend_listing

        print("\n".join(backend_listing()))
        return 0
    if args.command == "summary":
        return _summary(args.journal, args.run)
    if args.command == "certify":
        return _certify(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "update-baselines":
        return _update_baselines(args)
    return _export(args)


def _certify(args) -> int:
    missing = [m for m in CERTIFY_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: attn-conformance certify needs {', '.join(missing)}, which the [certify] extra installs: "
              "pip install 'attention-conformance[certify]'", file=sys.stderr)
        return 2
    from conformance import workers
    from conformance.certify.run import certify, default_size

    if args.size is None:
        args.size = default_size()

    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"error: --out {args.out} is a file; give a folder for the report", file=sys.stderr)
        return 2
    gpus = workers.visible_gpus() if args.gpus == "all" else [g.strip() for g in args.gpus.split(",") if g.strip()]
    if len(gpus) > 1:
        from conformance.certify.node import certify_node

        return certify_node(Path(args.out), gpus, args.size, args.memory_budget)
    if args.gpus != "all":  # one named GPU: pin this process to it before CUDA starts
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return certify(Path(args.out), args.size, args.memory_budget)


def _compare(args) -> int:
    from conformance import compare, results

    a, b = Path(args.a), Path(args.b)
    for path in (a, b):
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    if a.is_dir() != b.is_dir():
        print("error: compare two journals or two baseline folders, not one of each", file=sys.stderr)
        return 2
    try:
        if a.is_dir():
            diff = compare.baseline_folders(a, b, args.slowdown / 100)
        else:
            diff = compare.journals(a, b, args.slowdown / 100, args.ratio_factor)
    except (results.ResultsFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(diff.lines))
    return 1 if diff.regressed else 0


def _update_baselines(args) -> int:
    from conformance import baselines, results

    try:
        journal = results.read(args.journal, args.run)
    except results.ResultsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    updates = baselines.updates(journal.cases)
    if not updates:
        print(f"error: run {journal.header.get('run_id')} of {args.journal} holds no baseline update (a speed check "
              "run with --update-baselines, of cases that passed)", file=sys.stderr)
        return 1
    if args.baselines_dir is not None:
        updates = [{**u, "file": str(baselines.path(args.baselines_dir, u["arch"], u["backend"]))} for u in updates]
    for file, entries in baselines.apply(updates):
        print(f"{file}: {entries} entries written")
    return 0


def _export(args) -> int:
    from conformance import compare, results

    try:
        entries = compare.benchmark_export(args.journal, args.metric)
    except results.ResultsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not entries:
        print(f"note: {args.journal} holds no speed measurement (run the speed check: --check=speed)", file=sys.stderr)
    text = json.dumps(entries, indent=1) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def _summary(path: str, run_id: str | None = None) -> int:
    from conformance import results, summary

    try:
        journal = results.read(path, run_id)
    except results.ResultsFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header, records = journal.header, journal.cases
    if journal.others:
        print(f"{path} holds {len(journal.others) + 1} runs; the others (--run RUN_ID to see one):")
        for other in journal.others:
            print(f"  run {other.get('run_id')} started {other.get('started')}: {summary.run_args(other)}")
    print(f"run {header.get('run_id')} started {header.get('started')}: device {header.get('device')}, "
          f"tier {header.get('tier')}, {len(records)} cases recorded")
    print("\n".join(summary.failure_groups(records) + summary.table(records, reasons_shown=None)))
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
