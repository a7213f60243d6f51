"""pytest-xdist's split of a conformance run: a case family to one worker, the fuzz tests handed out first."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conformance import scheduling
from conformance.case import Case

BASE = Case(batch=2, seqlen_q=128, seqlen_k=128, nheads=4, head_dim=64, dtype="bf16", seed=1)


def test_a_family_leaves_out_sizes_and_numbers_and_keeps_what_a_kernel_is_compiled_for():
    family = scheduling.family(BASE)
    for same in (BASE.replace(batch=1, seqlen_q=4096, seqlen_k=4097), BASE.replace(seed=9, magnitude=16.0),
                 BASE.replace(nheads=8, nheads_k=8)):
        assert scheduling.family(same) == family
    others = [BASE.replace(dtype="fp16"), BASE.replace(head_dim=128), BASE.replace(causal="bottom_right"),
              BASE.replace(nheads_k=2), BASE.replace(layout="bhsd"), BASE.replace(softmax_scale=0.5),
              BASE.replace(window=(16, 0)), BASE.replace(softcap=30.0), BASE.replace(alibi=True)]
    assert len({family, *map(scheduling.family, others)}) == 1 + len(others)
    assert scheduling.family(BASE.replace(causal="top_left")) == scheduling.family(BASE.replace(causal="bottom_right"))


def test_a_test_of_a_check_belongs_to_its_cases_family_and_any_other_test_is_its_own_unit():
    case = BASE.replace(nheads_k=2)
    for backend in ("sdpa-flash", "my_kernels.py:attention", "b1"):
        nodeid = f"conformance/suite/test_conformance.py::test_forward[{backend}-{case.id}]"
        assert scheduling.scope(nodeid) == "family:" + scheduling.family(case)
    for nodeid in ("conformance/suite/test_fuzz.py::test_fuzz[flex-forward]", "tests/test_x.py::test_y",
                   "conformance/suite/test_conformance.py::test_forward[naive-b2_q1_k1_h4_d64_fp99_seed0]"):
        assert scheduling.scope(nodeid) == nodeid


class _Node:
    def __init__(self, name):
        self.gateway, self.shutting_down, self.sent = SimpleNamespace(id=name), False, []

    def send_runtest_some(self, indices):
        self.sent.append(list(indices))

    def shutdown(self):
        self.shutting_down = True


def _scheduled(collection):
    """The scheduler with two fake workers that collected ``collection``, after its first hand-out."""
    config = SimpleNamespace(option=SimpleNamespace(tx=["2*popen"]), getvalue=lambda name: ["2*popen"])
    sched = scheduling.scheduler(config, None)
    nodes = [_Node("gw0"), _Node("gw1")]
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        sched.add_node_collection(node, collection)
    sched.schedule()
    return sched, nodes


def test_the_scheduler_hands_out_fuzz_tests_first_then_whole_families_the_longest_first():
    small, large = BASE.replace(dtype="fp16"), BASE
    collection = [f"s.py::test_forward[naive-{small.id}]",
                  *(f"s.py::test_forward[naive-{large.replace(seed=s).id}]" for s in range(3)),
                  "f.py::test_fuzz[naive-forward]", f"s.py::test_causal[naive-{small.replace(seed=5).id}]"]
    sched, nodes = _scheduled(collection)
    assert nodes[0].sent[0] == [4]  # the fuzz test
    assert nodes[1].sent[0] == [1, 2, 3]  # the largest family, whole
    assert nodes[0].sent[1] == [0, 5]  # the other family, a second unit so that the fuzz test runs
    assert nodes[1].shutting_down  # nothing left for it


def test_a_family_whose_kernel_combines_features_is_handed_out_before_a_larger_plain_one():
    rich = BASE.replace(causal="bottom_right", window=(48, 0), softcap=30.0, alibi=True)
    plain = [f"s.py::test_forward[flex-{BASE.replace(seed=s).id}]" for s in range(23)]
    collection = [*plain, f"s.py::test_window[flex-{rich.id}]"]
    assert scheduling.cost(collection[-1:]) > scheduling.cost(plain) == len(plain)
    sched, nodes = _scheduled(collection)
    assert nodes[0].sent[0] == [23]  # the one case of three features, first
    assert nodes[1].sent[0] == list(range(23))


def test_an_xdist_run_keeps_each_family_on_one_worker(pytester):
    result = pytester.runpytest_subprocess("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "-n", "2",
                                           "--tier=quick", "--check=forward", "--backend=naive,sdpa-math",
                                           "--results-file=run.jsonl")
    assert result.ret == 0, result.stdout.str()
    cases = [r for r in map(json.loads, (pytester.path / "run.jsonl").read_text().splitlines())
             if r["record"] == "case"]
    workers: dict[str, set] = {}
    for record in cases:
        workers.setdefault(scheduling.family(Case.from_id(record["case_id"])), set()).add(record["worker"])
    shared = [family for family, ran_on in workers.items() if len(ran_on) > 1]
    assert len(cases) >= 40 and {w for ran_on in workers.values() for w in ran_on} == {"gw0", "gw1"}
    assert not shared, shared


def test_a_crashed_worker_gives_back_only_its_tests_not_run_and_the_crashing_one_is_not_run_again():
    collection = [f"s.py::test_forward[naive-{BASE.replace(seed=s).id}]" for s in range(4)] + \
                 [f"s.py::test_forward[naive-{BASE.replace(dtype='fp16', seed=s).id}]" for s in range(2)] + \
                 [f"s.py::test_forward[naive-{BASE.replace(head_dim=32).id}]"]
    sched, nodes = _scheduled(collection)
    assert nodes[0].sent == [[0, 1, 2, 3]] and nodes[1].sent == [[4, 5], [6]]
    sched.mark_test_complete(nodes[0], 0)
    assert sched.remove_node(nodes[0]) == collection[1]  # the test it was running when it died
    assert list(sched.workqueue.items()) == [(scheduling.scope(collection[2]), {collection[2]: False,
                                                                               collection[3]: False})]
    sched.mark_test_complete(nodes[1], 4)  # gw1 is down to two tests: it gets those not run
    assert nodes[1].sent[-1] == [2, 3] and not sched.workqueue


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_xdist_run_whose_worker_dies_finishes(pytester, workers):
    """A kernel loaded into the worker (--isolation=none) that aborts kills the worker; xdist replaces it,
    and the replacement gets what the dead one had not run (with one worker: a unit of one test)."""
    pytester.makepyfile(crashers=(Path(__file__).parent / "crashers.py").read_text())
    cases = [*(f"b2_q65_k65_h4_d64_fp32_seed{s}" for s in range(3, 7)), "b2_q65_k65_h4_d59_fp32_seed2",
             "b1_q65_k65_h4_d59_fp32_seed9", "b2_q33_k33_h4_d40_fp32_seed7", "b2_q65_k65_h4_d64_fp64_seed8"]
    result = pytester.runpytest_subprocess("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "-n", workers,
                                           "--isolation=none", "--check=forward", f"--case={','.join(cases)}",
                                           "--backend=crashers.py:aborts_at_d59", timeout=120)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 6 and outcomes.get("failed") == 2, result.stdout.str()
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*d59*"])
