"""How pytest-xdist splits a conformance run among its workers: cases of one family to one worker.

xdist's default (``--dist=load``) deals tests out round robin, so the cases of one dtype, head dim, mask
and feature set land on most workers, and a compiled kernel compiles that variant in each of them (flex:
3 s or more per variant and worker), and the float64 reference of a case run by several backends is
computed in several workers. Here a case family (``family``: what a compiled kernel specialises on, not
its sizes or seed) is one unit of work, given to one worker whole; the fuzz tests, each one long test of
many drawn cases, are handed out first, then the families, the longest expected first (``cost``). Used under
``--dist=load``, xdist's default with ``-n``; any other ``--dist`` is xdist's own.
"""

from __future__ import annotations

import functools
import re

from conformance import features
from conformance.case import Case

_CASE_IN_ID = re.compile(r"\[(?:.+?)-(b\d+_q\d+_k\d+_[^\]]+)\]$")  # test[<backend>-<case id>]


def family(case: Case) -> str:
    """The case's dtype, head dim, layout, masking, GQA or not, custom scale or not and its features
    (the bias's kind and pattern, the page size): what a kernel is compiled or autotuned for. Batch,
    seqlens, head counts, magnitude and seed are left out: they are sizes and numbers, not variants."""
    parts = [case.dtype, f"d{case.head_dim}", case.layout, "gqa" if case.nheads_k != case.nheads else "mha",
             "causal" if case.causal else "full", "scale" if case.softmax_scale is not None else "",
             case.attn_bias or "", f"page{case.page_block}" if case.page_block else ""]
    parts += [f.name for f in features.present(case)]
    return "-".join(p for p in parts if p)


@functools.lru_cache(maxsize=None)
def _case(nodeid: str) -> Case | None:
    found = _CASE_IN_ID.search(nodeid)
    if found is None:
        return None
    try:
        return Case.from_id(found.group(1))
    except Exception:  # noqa: BLE001 - an id that only looks like a case's (a user's test): no case
        return None


@functools.lru_cache(maxsize=None)  # asked again as each test completes
def scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its case's family for a test of a check, else the test alone."""
    case = _case(nodeid)
    return nodeid if case is None else "family:" + family(case)


FEATURE_COST = 8  # tests' worth of time one case feature is taken to add to its family's compilation


def cost(nodeids) -> int:
    """A unit's expected time, in tests: its tests, plus FEATURE_COST for each feature of its family, since a
    compiled kernel's variant compiles longer the more features it combines. Handed out by size alone, a
    feature-rich family of one case went last: on an H100 (torch 2.11) flex's attn_bias case with a window,
    softcap, ALiBi and a float bias with its gradient (64 s to compile alone) was still compiling 2 minutes
    after every other worker had finished. With 8, a family of one case with three features goes before
    the largest plain family of flex's standard tier (22 or 23 cases): a rough weight, not a measured one."""
    case = _case(next(iter(nodeids), ""))
    return len(nodeids) + (0 if case is None else FEATURE_COST * len(features.present(case)))


def scheduler(config, log):
    """An xdist scheduler that hands out ``scope`` units, fuzz tests first, then the longest expected (``cost``)."""
    from xdist.scheduler import LoadScopeScheduling

    class FamilyScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

        def schedule(self) -> None:
            if self.collection is not None or not self.collection_is_completed:
                return super().schedule()
            if not self._check_nodes_have_same_collection():
                self.log("**Different tests collected, aborting run**")
                return None
            collection = next(iter(self.registered_collections.values()))
            units: dict[str, dict[str, bool]] = {}
            for nodeid in collection:
                units.setdefault(scope(nodeid), {})[nodeid] = False
            # a test that is no family (a fuzz test) first; sorted() keeps the collection's order in a tie
            for name in sorted(units, key=lambda name: (name.startswith("family:"), -cost(units[name]))):
                self.workqueue[name] = units[name]
            self.collection = list(collection)
            for node in self.nodes:
                if self.workqueue:
                    self._assign_work_unit(node)
            # with the collection set, the base class gives each node a second unit (a worker holds its last
            # test until it has the next, pytest-xdist #277) or shuts it down when none is left
            return super().schedule()

        def _reschedule(self, node) -> None:
            """Keep a worker at two tests or more while units wait (it holds its last test until it has the next,
            pytest-xdist #277): a unit of one test, put back after a crash, is otherwise all a replacement worker
            gets. A worker still collecting gets its work when its collection arrives."""
            if node.shutting_down or node not in self.registered_collections:
                return
            super()._reschedule(node)
            while self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) < 2:
                self._assign_work_unit(node)

        def remove_node(self, node) -> str | None:
            """A worker gone: the test it was running is the crashed one (reported by xdist, not run again)
            and only its tests not yet run go back, first in the queue. The base class puts back whole units,
            finished ones too: handed to a worker holding its last test, an empty unit sends nothing, and that
            worker waits for a next test forever; and it runs the crashing test again on every worker."""
            workload = self.assigned_work.pop(node)
            pending = [(name, nodeid) for name, unit in workload.items() for nodeid, done in unit.items() if not done]
            if not pending:
                return None
            again: dict[str, dict[str, bool]] = {}
            for name, nodeid in pending[1:]:
                again.setdefault(name, {})[nodeid] = False
            for name in reversed(again):
                self.workqueue[name] = again[name]
                self.workqueue.move_to_end(name, last=False)
            for other in self.assigned_work:
                self._reschedule(other)
            return pending[0][1]

    return FamilyScheduling(config, log)
