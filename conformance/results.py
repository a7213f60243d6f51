"""The results journal: one JSON object per line, written and flushed to disk as each case ends, so a
run killed halfway keeps every case it finished. Fields are documented in the README.

The first line of a run is a ``{"record": "run", ...}`` header; each case is a ``{"record": "case",
...}`` line. ``read`` loads a journal back (the terminal summary can be rebuilt from it alone).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

SCHEMA = 1


def versions() -> dict:
    import torch

    from conformance import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "attention_conformance": __version__}


class Journal:
    """Appends records to a JSON-lines file; the file is started afresh by each run."""

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.run_id = uuid.uuid4().hex[:12]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self.write({"record": "run", "schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "argv": sys.argv, "versions": versions(), **header})

    def write(self, record: dict) -> None:
        record.setdefault("run_id", self.run_id)
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read(path: str | os.PathLike) -> tuple[dict | None, list[dict]]:
    """The run header and the case records of a journal; a torn last line (a killed run) is ignored."""
    header, cases = None, []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number} is not JSON") from None
        if record.get("record") == "run":
            header = record
        elif record.get("record") == "case":
            cases.append(record)
    return header, cases


class Recorder:
    """The run's case records, in memory for the summary and in the journal (opened at the first
    record, so a pytest run that holds no conformance test writes no file)."""

    def __init__(self, path: str | None, header: dict):
        self.path, self.header = path or None, header
        self.records: list[dict] = []
        self._journal: Journal | None = None

    def add(self, record: dict) -> None:
        self.records.append(record)
        if self.path:
            if self._journal is None:
                self._journal = Journal(self.path, self.header)
            self._journal.write(record)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
