"""The end-of-run grouping of failures by cause (summary.failure_groups), from journal records alone."""

from conformance import summary
from conformance.case import Case
from conformance.checks import execute
from mutants import DIAGNOSIS_MUTANTS, MUTANTS


def record(case_id, check="forward", backend="mine", outcome="failed", diagnosis=None, prop="forward"):
    finding = {"property": prop, "message": "out: max abs error ... EXCEEDS bound ..."}
    if diagnosis:
        finding["diagnosis"] = diagnosis
    return {"record": "case", "backend": backend, "check": check, "outcome": outcome, "case_id": case_id,
            "findings": [finding] if outcome != "passed" else []}


def test_failures_sharing_a_cause_print_once_with_count_and_ids():
    scale = "softmax scale not applied (scores unscaled)"
    records = [record(f"case{i}", diagnosis=scale) for i in range(37)]
    records += [record("gqa1", diagnosis="GQA head mapping"), record("ok", outcome="passed"),
                record("odd1"), record("odd2"), record("c1", check="causal", diagnosis=scale, prop="causal-reference"),
                record("boom", outcome="crashed", prop="crashed")]
    lines = summary.failure_groups(records)
    assert lines[0].startswith("failures by cause") and "journal" in lines[0]
    text = "\n".join(lines)
    assert f"  mine forward: 37 cases fail, all fit '{scale}':" in lines
    assert "  mine forward: 1 case fails, fits 'GQA head mapping':" in lines
    assert "  mine causal: 1 case fails, fits '" + scale + "':" in lines
    assert "  mine forward: 2 cases fail on [forward], no common cause found:" in lines
    assert "  mine forward: 1 case crashed:" in lines
    assert "ok" not in text.split()
    assert lines[1].startswith("  mine forward: 37")  # the largest group first
    ids = [line for line in lines[2:4]]
    assert ids[0].startswith("      case0, case1,") and ids[1].endswith("more") and "case36" not in text
    assert all(len(line) <= 100 for line in lines)


def test_ids_wrap_within_the_width_and_count_what_is_left_out():
    ids = [Case(seqlen_q=n, seqlen_k=n).id for n in range(1, 60)]
    lines = summary._id_lines(ids, 80, 2)
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)
    shown = sum(line.count("seed") for line in lines)
    assert lines[-1].endswith(f"... and {len(ids) - shown} more")
    assert summary._id_lines(ids[:2], 100, 2) == ["      " + ", ".join(ids[:2])]


def test_no_failures_no_lines():
    assert summary.failure_groups([record("a", outcome="passed"), record("b", outcome="skipped")]) == []


def test_groups_real_verdicts_by_their_diagnosis():
    """Records as the session writes them (Verdict.as_dict): two mutants, each grouped under its cause."""
    mutants = {m.backend.name: m.backend for m in MUTANTS + DIAGNOSIS_MUTANTS}
    records = []
    for name in ("scale-forgotten", "wrong-gqa-mapping"):
        for case in (Case(seqlen_q=65, seqlen_k=65, nheads=8, nheads_k=2), Case(seqlen_q=17, seqlen_k=17, nheads=4,
                                                                                 nheads_k=2)):
            verdict = execute("forward", mutants[name], case, "cpu")
            records.append({"backend": name, "check": "forward", "case_id": case.id,
                            "outcome": "passed" if verdict.passed else "failed", **verdict.as_dict()})
    lines = summary.failure_groups(records)
    assert "  scale-forgotten forward: 2 cases fail, all fit 'softmax scale not applied (scores unscaled)':" in lines
    assert any(line.startswith("  wrong-gqa-mapping forward: 2 cases fail, all fit 'GQA head mapping") for line in lines)
