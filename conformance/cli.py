"""`attn-conformance` (also `python -m conformance`): the suite without a checkout.

    attn-conformance run [pytest options]   the conformance suite (= pytest --pyargs conformance.suite ...)
    attn-conformance list-backends          every known backend, available here or why not
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
        from conformance.plugin import backend_listing

        print("\n".join(backend_listing()))
        return 0
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
