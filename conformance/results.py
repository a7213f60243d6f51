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
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = 1


def versions() -> dict:
    import torch

    from conformance import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "attention_conformance": __version__}


def machine() -> dict:
    """The CPU the judge ran on and torch's threads there: a result seen once, on one machine, may be that
    machine's (a fresh VM can land on another host), and a journal that names it can say so."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


class Journal:
    """Appends records to a JSON-lines file: started afresh by a run, or (``append``, a rerun of some
    cases or checks) continued after the runs already there, each run under its own run id."""

    def __init__(self, path: str | os.PathLike, header: dict, append: bool = False):
        self.path = Path(path)
        self.run_id = uuid.uuid4().hex[:12]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = append and _ends_torn(self.path)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if torn:  # a run killed while writing its last line: that line stays torn, on a line of its own
            self._file.write("\n")
        self.write({"record": "run", "schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "argv": sys.argv, "versions": versions(), "machine": machine(), **header})

    def write(self, record: dict) -> None:
        record.setdefault("run_id", self.run_id)
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _ends_torn(path: Path) -> bool:
    """The file exists, is not empty, and its last line has no newline."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


@dataclass
class JournalContents:
    header: dict
    cases: list[dict]
    end: dict | None  # None: the run did not finish
    others: list[dict] = field(default_factory=list)  # the headers of the file's other runs, in order

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


def read_runs(path: str | os.PathLike) -> list[JournalContents]:
    """Every run of a journal, in the order written: a run's header, case records and end record; a
    rerun of some cases (``--case``, ``--check``) is appended after the run before it. A torn line (a
    run killed while writing it) is dropped, at the file's end or just before the next run's header;
    anything else wrong is a ResultsFileError naming the file, the line and the fault."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"cannot read results file {path}: {exc}") from None
    runs: list[JournalContents] = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except RecursionError:
            raise ResultsFileError(f"results file {path}, line {number}: nested too deeply to be a record") from None
        except json.JSONDecodeError as exc:
            if number > 1 and (number == len(lines) or _is_header(lines[number])):
                continue
            raise ResultsFileError(f"results file {path}, line {number}: not JSON ({exc.msg})") from None
        kind = record.get("record") if isinstance(record, dict) else None
        run = runs[-1] if runs else None
        if kind == "run":
            if record.get("schema") != SCHEMA:
                raise ResultsFileError(f"results file {path}: schema {record.get('schema')!r}, this version reads "
                                       f"schema {SCHEMA}")
            runs.append(JournalContents(record, [], None))
        elif run is None:
            raise ResultsFileError(f"results file {path}: line 1 is not a run header; not a conformance journal")
        elif run.end is not None:
            raise ResultsFileError(f"results file {path}, line {number}: a record after the run's end record")
        elif kind == "case" and _is_case(record):
            run.cases.append(record)
        elif kind == "end" and type(record.get("exitstatus")) is int:
            run.end = record
        else:
            raise ResultsFileError(f"results file {path}, line {number}: not a case record (a case record needs "
                                   "string fields backend, check and outcome)")
    if not runs:
        raise ResultsFileError(f"results file {path} is empty")
    for run in runs:
        run.others = [r.header for r in runs if r is not run]
    return runs


def _is_header(line: str) -> bool:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("record") == "run"


def read(path: str | os.PathLike, run_id: str | None = None) -> JournalContents:
    """One run of a journal: the last one written, or the one whose run id starts with ``run_id``."""
    runs = read_runs(path)
    if run_id is None:
        return runs[-1]
    found = [r for r in runs if str(r.header.get("run_id", "")).startswith(run_id)]
    if len(found) != 1:
        ids = ", ".join(str(r.header.get("run_id")) for r in runs)
        raise ResultsFileError(f"results file {path}: {'no' if not found else 'more than one'} run with id "
                               f"{run_id!r} (its runs: {ids})")
    return found[0]


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
    replaced only if it is a journal: anything else at that path is refused, never overwritten. With
    ``append`` (a run narrowed by --case or --check: a rerun) the run is added after the file's runs."""

    def __init__(self, path: str | None, header: dict, append: bool = False):
        self.path, self.header, self.append = path or None, header, append
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
                self._journal = Journal(self.path, self.header, append=self.append)
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
