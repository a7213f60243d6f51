"""The results journal: one JSON object per line, written and flushed to disk as each case ends, so a
run killed halfway keeps every case it finished. Fields are documented in the README.

The first line of a run is a ``{"record": "run", ...}`` header; each case is a ``{"record": "case",
...}`` line; a run that finished ends with ``{"record": "end", "exitstatus": ...}``. A journal without
that last line is of a run that did not finish (killed, crashed, or ended by a kernel): ``read``
reports it as incomplete, and nothing built on it may read as a pass.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass
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


@dataclass
class JournalContents:
    header: dict
    cases: list[dict]
    end: dict | None  # None: the run did not finish

    @property
    def complete(self) -> bool:
        return self.end is not None


_CASE_FIELDS = {"backend": str, "check": str, "outcome": str}


def _is_case(record: dict) -> bool:
    """The fields the summary reads, of the types it reads them as."""
    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    return (all(isinstance(record.get(k), t) for k, t in _CASE_FIELDS.items())
            and strings(record.get("reasons", []))
            and isinstance(record.get("gpu"), (str, type(None))) and isinstance(record.get("worker"), (str, type(None)))
            and isinstance(record.get("findings", []), list)
            and all(isinstance(f, dict) and isinstance(f.get("message"), str) for f in record.get("findings", [])))


def read(path: str | os.PathLike) -> JournalContents:
    """The run header, the case records and the end record of a journal. A torn last line (a run killed
    while writing it) is dropped; anything else wrong is a ResultsFileError naming the file, the line
    and the fault."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"cannot read results file {path}: {exc}") from None
    header, cases, end = None, [], None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except RecursionError:
            raise ResultsFileError(f"results file {path}, line {number}: nested too deeply to be a record") from None
        except json.JSONDecodeError as exc:
            if number == len(lines) and number > 1:
                break
            raise ResultsFileError(f"results file {path}, line {number}: not JSON ({exc.msg})") from None
        kind = record.get("record") if isinstance(record, dict) else None
        if number == 1:
            if kind != "run":
                raise ResultsFileError(f"results file {path}: line 1 is not a run header; not a conformance journal")
            if record.get("schema") != SCHEMA:
                raise ResultsFileError(f"results file {path}: schema {record.get('schema')!r}, this version reads "
                                       f"schema {SCHEMA}")
            header = record
        elif end is not None:
            raise ResultsFileError(f"results file {path}, line {number}: a record after the run's end record")
        elif kind == "case" and _is_case(record):
            cases.append(record)
        elif kind == "end" and type(record.get("exitstatus")) is int:
            end = record
        else:
            raise ResultsFileError(f"results file {path}, line {number}: not a case record (a case record needs "
                                   "string fields backend, check and outcome)")
    if header is None:
        raise ResultsFileError(f"results file {path} is empty")
    return JournalContents(header, cases, end)


class ResultsFileError(Exception):
    """A results file that cannot be read, or that exists and is not ours to replace."""


def _check_writable(path: str) -> None:
    """A journal path this run can write, checked before the first case runs."""
    if os.path.isdir(path):
        raise ResultsFileError(f"--results-file {path} is a directory; give a file path")
    folder = Path(path).resolve().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ResultsFileError(f"--results-file {path} cannot be written (no write permission, or {existing} is not a "
                               "directory); choose another path, or '' to write no journal")


class Recorder:
    """The run's case records, in memory for the summary and in the journal (opened at the first
    record, so a pytest run that holds no conformance test writes no file). An existing file is
    replaced only if it is a journal: anything else at that path is refused, never overwritten."""

    def __init__(self, path: str | None, header: dict):
        self.path, self.header = path or None, header
        if self.path:
            _check_writable(self.path)
        if self.path and os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                first = f.readline()
            try:
                is_journal = json.loads(first).get("record") == "run"
            except (json.JSONDecodeError, AttributeError):
                is_journal = False
            if not is_journal:
                raise ResultsFileError(f"results file {self.path} exists and is not a conformance journal "
                                       "(its first line is no run header); choose another --results-file or "
                                       "move it away")
        self.records: list[dict] = []
        self._journal: Journal | None = None

    def add(self, record: dict) -> None:
        self.records.append(record)
        if self.path:
            if self._journal is None:
                self._journal = Journal(self.path, self.header)
            self._journal.write(record)

    def finish(self, exitstatus: int) -> None:
        """The end record: this run finished, with this exit status and these counts."""
        if self._journal is not None:
            counts: dict[str, int] = {}
            for r in self.records:
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            self._journal.write({"record": "end", "exitstatus": exitstatus, "counts": counts,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
