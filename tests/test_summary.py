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


def _case(backend, check, outcome="passed", reasons=None, fuzz=False):
    r = {"record": "case", "backend": backend, "check": check, "outcome": outcome, "device": "cpu", "tier": "quick",
         "fuzz": fuzz}
    if reasons:
        r["reasons"] = reasons
    return r


CHECKS = ["forward", "gradients", "causal", "sanity", "window", "softcap", "alibi", "varlen", "kvcache",
          "determinism", "memory", "speed", "masks", "paged", "dropout"]


def test_the_table_fits_100_columns_wrapped_by_checks_and_names_the_backends():
    records = [_case(b, ch, outcome) for b in ("sdpa-efficient-long-name", "naive", "tiled")
               for ch in CHECKS for outcome in ("passed", "failed", "skipped", "crashed", "not run")]
    lines = summary.table(records)
    assert lines[0] == "3 backends (cpu, tier quick): sdpa-efficient-long-name, naive, tiled"
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    headers = [line.split() for line in lines if line.startswith("backend ")]
    assert len(headers) >= 2  # wrapped into blocks of checks, each led by the backend column
    assert [x for h in headers for x in h if x != "backend"] == [*CHECKS, "verdict", "other"]
    rows = [line for line in lines if line.startswith("naive ")]
    assert len(rows) == len(headers) and rows[0].split()[1] == "1/2/2"  # crashed as failed, not run as skipped
    assert rows[-2].endswith("FAIL") and rows[-1].endswith("15 crashed, 15 not run")


def test_skip_reasons_count_cases_and_all_are_available():
    records = [_case("mine", "window", "skipped", [f"intent not realisable (window {i}, fp16 (x)): window not supported"])
               for i in range(9)]
    records += [_case("mine", "window", "skipped", ["window not supported"], fuzz=True)]
    records += [_case("mine", "forward", "skipped", [f"reason {w}", "dtype fp16 not supported"])
                for w in ("one", "two", "three", "four", "five", "six")]
    records += [_case("mine", "speed", "skipped", ["needs a GPU"]), _case("mine", "forward")]
    lines = summary.table(records)
    text = "\n".join(lines)
    assert "skipped cases of mine: 17, by reason (top 5 of 9; all: attn-conformance summary):" in lines
    assert "    10  window not supported [window, fuzz window; 9 as intents not realisable]" in lines
    assert "     6  dtype * not supported (* = fp16) [forward]" in lines  # each case once per reason it gives
    assert "needs a GPU" not in text
    everything = summary.skip_reasons(records, "mine", shown=None)
    assert "     1  needs a GPU [speed]" in everything and len(everything) == 1 + 9
    assert len(summary.skip_reasons(records[:10] + records[-2:], "mine")) == 1 + 2  # all shown when few


def test_skip_reasons_differing_in_the_cases_values_are_one_family_counted_in_cases():
    caps = "(declared: 16-256 (multiples of 8))"
    records = [_case("mine", "forward", "skipped", [f"head dim {d} not supported {caps}"]) for d in (59, 111, 59)]
    records += [_case("mine", "gradients", "skipped", [f"intent not realisable (head dim {d}): head dim {d} is the "
                                                       f"intent; declared: 16-256; seqlens 17/129 are the intent; "
                                                       f"declared: multiples of 128"]) for d in (80, 96)]
    records += [_case("mine", "forward", "skipped", [f"seqlen {n} is not a multiple of 128"]) for n in range(1, 12)]
    records += [_case("mine", "forward", "skipped", ["GQA (nheads 4, nheads_k 2) not supported",
                                                     "dtype fp64 not supported (declared: bf16, fp16)"])]
    lines = summary.skip_reasons(records, "mine", shown=None)
    assert lines[0] == "skipped cases of mine: 17, by reason:"
    assert "    11  seqlen * is not a multiple of 128 (* = 1, 2, 3, 4, 5, 6, 7, 8, ... (11 values)) [forward]" in lines
    assert f"     3  head dim * not supported {caps} (* = 59, 111) [forward]" in lines
    assert all(len(line) <= 100 for line in lines)
    assert ("2  head dim * is the intent; declared: 16-256; seqlens * are the intent; declared: multiples of 128 "
            "(* = 80/17/129, 96/17/129) [gradients; 2 as intents") in " ".join(line.strip() for line in lines)
    assert "     1  GQA (nheads *, nheads_k *) not supported (* = 4/2) [forward]" in lines
    assert "     1  dtype * not supported (declared: bf16, fp16) (* = fp64) [forward]" in lines
    assert summary.reason_family("causal alignment top_left not supported (declared: bottom_right)") == (
        "causal alignment * not supported (declared: bottom_right)", ("top_left",))
    assert summary.reason_family("non-contiguous inputs (packed) not supported")[1] == ("packed",)
    crash = "not run: k crashed or timed out on 2 cases in a row (--crash-limit)"  # a setting, not the case's
    assert summary.reason_family(crash) == (crash, ())


def test_the_journal_summary_lists_every_skip_reason(tmp_path, capsys):
    from conformance import cli, results

    journal = results.Journal(tmp_path / "j.jsonl", {"device": "cpu", "tier": "quick"})
    for i in range(8):
        journal.write(_case("mine", "forward", "skipped", [f"reason {chr(97 + i)}"]))
    journal.write(_case("mine", "forward"))
    journal.write({"record": "end", "exitstatus": 0})
    journal.close()
    assert cli.main(["summary", str(tmp_path / "j.jsonl")]) == 0
    out = capsys.readouterr().out
    assert all(f"     1  reason {chr(97 + i)} [forward]" in out for i in range(8)) and "all: attn-conformance" not in out
