"""The pytest plugin end to end, through pytester: options, usage errors, skips, summary, journal, rerun."""

import json
import os
import shlex
import subprocess
import sys
import textwrap

from pathlib import Path

import pytest

SUITE = ("--pyargs", "conformance.suite", "-p", "no:cacheprovider", "--tier=quick")

GOOD_KERNEL = '''
import torch.nn.functional as F

def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """my kernel: SDPA with the layout translated"""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if causal and q.shape[-2] != k.shape[-2]:
        raise NotImplementedError("bottom-right causal")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)

attention.conformance_capabilities = {"dtypes": ["fp32", "fp64"], "equal_seqlens": True, "backward": False}
'''

LEAKY_KERNEL = '''
import torch

def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """causal mask one token too wide"""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * (softmax_scale or q.shape[-1] ** -0.5)
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq + 1), float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v).transpose(1, 2)
'''


def journal(pytester):
    lines = (pytester.path / "conformance-results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def realised(backend, check, tier="quick"):
    from conformance import grid
    from conformance.checks import CHECKS

    return [r.case for r in grid.for_backend(CHECKS[check], backend.capabilities, "cpu", tier) if r.case]


def test_builtin_backend_run_prints_table_and_writes_journal(pytester):
    from conformance.backends import naive

    n_forward, n_sanity = len(realised(naive.BACKEND, "forward")), len(realised(naive.BACKEND, "sanity"))
    result = pytester.runpytest(*SUITE, "--backend=naive", "--check=forward,sanity")
    result.assert_outcomes(passed=n_forward + n_sanity)
    result.stdout.fnmatch_lines(["*attention-conformance: device cpu, tier quick, backends: naive*",
                                 "*attention conformance*", "*backend*forward*sanity*verdict*",
                                 f"naive*{n_forward}/0/0*{n_sanity}/0/0*pass*", "results journal: conformance-results.jsonl"])
    records = journal(pytester)
    assert records[0]["record"] == "run" and records[0]["device"] == "cpu" and "torch" in records[0]["versions"]
    assert records[0]["machine"]["cpus"] >= 1 and records[0]["machine"]["torch_threads"] >= 1 and records[0]["machine"]["cpu"]
    cases = records[1:-1]
    assert records[-1]["record"] == "end" and records[-1]["exitstatus"] == 0
    assert len(cases) == n_forward + n_sanity and {r["check"] for r in cases} == {"forward", "sanity"}
    forward = next(r for r in cases if r["check"] == "forward")
    assert forward["outcome"] == "passed" and forward["comparisons"][0]["error"] <= forward["comparisons"][0]["bound"]
    assert set(forward) >= {"run_id", "nodeid", "backend", "case_id", "case", "device", "tier", "duration_s", "rerun"}


def test_import_string_with_declaration_skips_with_reasons(pytester):
    pytester.makepyfile(my_kernels=GOOD_KERNEL)
    result = pytester.runpytest(*SUITE, "--backend=my_kernels.py:attention")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 0 and outcomes["skipped"] > 0 and "failed" not in outcomes
    result.stdout.fnmatch_lines(["skipped cases of my_kernels.py:attention: *, by reason*",
                                 "* seqlen_q != seqlen_k is the intent*declared: equal only*"])
    skipped = [r for r in journal(pytester) if r.get("outcome") == "skipped"]
    assert all(r["reasons"] for r in skipped)
    assert any("dtype fp16 is the intent; declared: fp32, fp64" in r["reasons"][0] for r in skipped)
    assert any(r["reasons"][0].endswith(": backward not supported") for r in skipped if r["check"] == "gradients")


def test_failure_prints_findings_and_a_rerun_line_that_reruns_only_it(pytester):
    pytester.makepyfile(leaky=LEAKY_KERNEL)
    result = pytester.runpytest(*SUITE, "--backend=leaky.py:attention", "--check=causal")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*causal check failed for backend 'leaky.py:attention' on case *",
                                 "*future-independence] keys/values at * positions are masked for * query rows; changing them changed*",
                                 "*rerun: pytest --pyargs conformance.suite*"])
    rerun = next(line for line in result.stdout.lines if "rerun: pytest" in line).split("rerun: pytest ", 1)[1]
    again = pytester.runpytest("-p", "no:cacheprovider", *shlex.split(rerun))
    again.assert_outcomes(failed=1)


@pytest.mark.parametrize("spec, message", [
    ("nonesuch", "*unknown backend 'nonesuch'. Known backends: naive, sdpa-math, tiled*"),
    ("missing.py:fn", "*cannot import 'missing.py:fn': no file missing.py*"),
    ("no.such.module:fn", "*cannot import 'no.such.module:fn': ModuleNotFoundError*"),
    ("conformance.tiers:TIERS", "*'conformance.tiers:TIERS' is a tuple, not a callable*"),
    ("conformance.tiers:nothing", "*module 'conformance.tiers' has no attribute 'nothing'*"),
])
def test_bad_backend_is_a_usage_error(pytester, spec, message):
    result = pytester.runpytest(*SUITE, f"--backend={spec}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_declaration_is_a_usage_error(pytester):
    pytester.makepyfile(kern="def f(q, k, v, **kw):\n    return q\nf.conformance_capabilities = {'dtype': 'fp16'}\n")
    result = pytester.runpytest(*SUITE, "--backend=kern.py:f")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid conformance_capabilities: unknown capability keys ?'dtype'?; known keys: devices, dtypes*"])
    pytester.makepyfile(kern2="def f(q, k, v, **kw):\n    return q\nf.conformance_compiled = 'yes'\n")
    result = pytester.runpytest(*SUITE, "--backend=kern2.py:f")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*conformance_compiled must be True or False, not 'yes'*"])


@pytest.mark.parametrize("args, message", [
    (("--check=sped",), "*unknown check(s) sped; known checks: forward, gradients, causal, sanity, window*"),
    (("--case=b2_q17_zz3",), "*--case: cannot read token 'zz3' of case id 'b2_q17_zz3'*"),
    (("--case=b2_q17_k17_h3_kv2_d8_fp32_seed1",), "*invalid case: nheads 3 is not a multiple of nheads_k 2*"),
])
def test_bad_options_are_usage_errors(pytester, args, message):
    result = pytester.runpytest(*SUITE, "--backend=naive", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_list_backends(pytester):
    result = pytester.runpytest("--list-backends")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["naive *available", "*devices cpu,cuda; dtypes bf16,fp16,fp32,fp64*memory quadratic*",
                                 "sdpa-math *available", "tiled *available", "*memory linear*"])


def test_entry_point_backend(pytester):
    """A third-party package registers a backend through the entry-point group, with no other code."""
    pytester.makepyfile(thirdparty_attn=textwrap.dedent('''
        from conformance import Backend, Capabilities
        from conformance.backends.sdpa_math import BACKEND as MATH
        BACKEND = Backend("thirdparty", MATH.fn, Capabilities(causal=("top_left",), dtypes={"fp32"}))
    '''))
    dist = pytester.mkdir("thirdparty_attn-1.0.dist-info")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-attn\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[attention_conformance.backends]\nthirdparty = thirdparty_attn:BACKEND\n")
    pytester.syspathinsert()
    listing = pytester.runpytest("--list-backends")
    listing.stdout.fnmatch_lines(["thirdparty *available"])
    result = pytester.runpytest(*SUITE, "--backend=thirdparty", "--check=causal")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 0 and "failed" not in outcomes
    result.stdout.fnmatch_lines(["*causal alignment * not supported (declared: top_left) (* = bottom_right)*"])


UNRELATED_TEST = """
import sys

def test_x():
    heavy = [m for m in ("torch", "conformance.session", "conformance.checks", "conformance.fuzz_driver")
             if m in sys.modules]
    assert not heavy, heavy
"""


def test_plugin_stays_out_of_unrelated_runs(pytester):
    """Installed plugins load in every pytest run: one without conformance tests imports nothing heavy
    of ours (in a process of its own, so nothing this process imported counts), prints nothing of ours
    and writes nothing."""
    pytester.makepyfile(test_other=UNRELATED_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "conformance-results.jsonl").exists()
    output = result.stdout.str() + result.stderr.str()
    assert "attention-conformance:" not in output and "attention conformance" not in output  # header, summary


FOREIGN_CONFTEST = """
import pytest

def pytest_addoption(parser):  # options of the repository's own, named like ours (Triton's tests define --device)
    parser.addoption("--device", default="cuda")
    parser.addoption("--check", action="store_true")

@pytest.fixture
def device(request):
    return request.config.getoption("--device")
"""


def test_a_repository_defining_our_short_names_keeps_them_and_our_prefixed_names_work(pytester):
    """Its conftest's --device and --check are its own, its tests run, and the suite runs beside them
    with --attn-device and --attn-check (its rerun lines say so). The same run writes no .benchmarks/
    and gives junit XML the case's properties."""
    pytester.makeconftest(FOREIGN_CONFTEST)
    pytester.makepyfile(test_own="def test_own(device, pytestconfig):\n"
                                 "    assert device == 'xpu' and pytestconfig.getoption('check') is True\n")
    case = "b2_q17_k17_h4_d32_fp32_seed1"
    result = pytester.runpytest("-p", "no:cacheprovider", "--device=xpu", "--check", "test_own.py", "--pyargs",
                                "conformance.suite", "--attn-device=cpu", "--backend=naive", "--attn-check=forward",
                                f"--case={case}", "--isolation=none", "--junitxml=junit.xml")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*attention-conformance: device cpu, tier standard, backends: naive*"])
    record = next(r for r in journal(pytester) if r["record"] == "case")
    assert record["rerun"] == (f"pytest --pyargs conformance.suite --backend=naive --attn-device=cpu "
                               f"--attn-check=forward --case={case}")
    assert not (pytester.path / ".benchmarks").exists()  # pytest-benchmark's storage, made by its configure

    import xml.etree.ElementTree as ET

    cases = {c.get("name"): c for c in ET.parse(pytester.path / "junit.xml").iter("testcase")}
    props = {p.get("name"): p.get("value") for p in cases[f"test_forward[naive-{case}]"].iter("property")}
    worst = max(record["comparisons"], key=lambda c: c["error"] / c["bound"])
    assert props == {"backend": "naive", "check": "forward", "case": case, "outcome": "passed",
                     "error": str(worst["error"]), "bound": str(worst["bound"]), "comparison": worst["name"],
                     "rerun": record["rerun"]}
    assert not list(cases["test_own"].iter("property"))  # the repository's own tests get none


def test_a_run_is_ours_when_its_options_or_arguments_name_the_suite(pytester, monkeypatch):
    """What makes a run ours (and so -n auto count GPUs rather than CPU cores): our options, a
    conformance hypothesis profile, the suite by module or by folder, or a folder above a checkout's
    suite; not a folder above an installed copy (pytest does not collect site-packages)."""
    from conformance import plugin, workers

    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0", "1"])
    pytester.makepyfile(test_other="def test_x():\n    pass\n")
    ours = {args: plugin.is_ours(pytester.parseconfig(*args)) for args in [
        ("test_other.py",), ("--tier=quick",), ("--attn-tier=quick",), ("--hypothesis-profile=conformance-dev",),
        ("--pyargs", "conformance.suite"), ("--pyargs", "conformance.suite.test_fuzz::test_fuzz"),
        (str(plugin.SUITE_DIR),), (str(plugin.SUITE_DIR / "test_conformance.py") + "::test_forward",)]}
    assert ours == {args: args != ("test_other.py",) for args in ours}
    assert plugin.pytest_xdist_auto_num_workers(pytester.parseconfig("test_other.py")) is None
    assert plugin.pytest_xdist_auto_num_workers(pytester.parseconfig("--pyargs", "conformance.suite")) == 2
    assert not plugin.is_ours(pytester.parseconfig("--pyargs", "conformancex"))

    installed = pytester.mkdir("venv-lib") / "site-packages" / "conformance" / "suite"
    installed.mkdir(parents=True)
    monkeypatch.setattr(plugin, "SUITE_DIR", installed)
    assert not plugin.is_ours(pytester.parseconfig("."))
    monkeypatch.setattr(plugin, "SUITE_DIR", pytester.path / "checkout" / "conformance" / "suite")
    assert plugin.is_ours(pytester.parseconfig("."))


def test_wrong_layout_is_a_usage_error_with_the_fix(pytester):
    pytester.makepyfile(bhsd="""
import torch.nn.functional as F

def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
""")
    result = pytester.runpytest(*SUITE, "--backend=bhsd.py:attention", "--check=forward", "--case=b2_q17_k17_h4_d8_fp32_seed1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*contract] backend 'bhsd.py:attention' returned shape (2, 4, 17, 8) instead of q's "
                                 "(2, 17, 4, 8), which is (batch, heads, seqlen, head_dim)*transpose(1, 2)*",
                                 "usage error: backend bhsd.py:attention does not follow the calling convention*"])


@pytest.mark.parametrize("args, message", [
    (("--case-timeout=0",), "*--case-timeout: must be a finite number > 0, not 0*"),
    (("--case-timeout=nan",), "*--case-timeout: must be a finite number > 0, not nan*"),
    (("--case-timeout=inf",), "*--case-timeout: must be a finite number > 0, not inf*"),
    (("--case-timeout=soon",), "*--case-timeout: 'soon' is not a valid float*"),
    (("--crash-limit=-1",), "*--crash-limit: must be a finite number > 0, not -1*"),
    (("--isolation=none", "--case-timeout=5"), "*--case-timeout needs --isolation=process*"),
    (("--results-file=.",), "*--results-file . is a directory*"),
    (("--backend=",), "*--backend is empty*"),
    (("--backend=naiv",), "*unknown backend 'naiv'. Did you mean 'naive'?*"),
    (("--tier=huge",), "*--tier: invalid choice: 'huge'*"),
    (("--fuzz=forever",), "*--fuzz: invalid choice: 'forever'*"),
])
def test_invalid_option_values_are_usage_errors(pytester, args, message):
    result = pytester.runpytest(*SUITE, "--backend=naive", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_results_file_that_is_not_a_journal_is_never_overwritten(pytester):
    notes = pytester.path / "notes.jsonl"
    notes.write_text('{"my": "data"}\n')
    result = pytester.runpytest(*SUITE, "--backend=naive", "--results-file=notes.jsonl")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*results file notes.jsonl exists and is not a conformance journal*"])
    assert notes.read_text() == '{"my": "data"}\n'


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"record": "case"}\n', "line 1 is not a run header"),
    ('{"record": "run", "schema": 99}\n', "schema 99, this version reads schema 1"),
    ('{"record": "run", "schema": 1}\nnot json\n{"record": "case"}\n', "line 2: not JSON"),
    ('{"record": "run", "schema": 1}\n{"record": "case", "backend": "x"}\n', "line 2: not a case record"),
])
def test_corrupt_journal_is_named_with_what_is_wrong(pytester, content, message):
    path = pytester.path / "bad.jsonl"
    path.write_text(content)
    result = pytester.run(sys.executable, "-m", "conformance", "summary", str(path))
    assert result.ret == 2
    result.stderr.fnmatch_lines([f"error: *bad.jsonl*{message}*"])


def test_torn_last_line_of_a_killed_run_is_dropped(pytester):
    path = pytester.path / "torn.jsonl"
    path.write_text('{"record": "run", "schema": 1}\n'
                    '{"record": "case", "backend": "b", "check": "forward", "outcome": "passed"}\n{"record": "ca')
    result = pytester.run(sys.executable, "-m", "conformance", "summary", str(path))
    result.stdout.fnmatch_lines(["*1 cases recorded*", "b *1/0/0*pass*"])
    assert result.ret == 1  # a killed run is never a pass
    result.stderr.fnmatch_lines(["INCOMPLETE: the run did not finish*"])


def test_summary_of_a_finished_run_is_its_verdict(pytester):
    path = pytester.path / "done.jsonl"
    lines = ['{"record": "run", "schema": 1}', '{"record": "case", "backend": "b", "check": "forward", "outcome": "passed"}']
    path.write_text("\n".join(lines + ['{"record": "end", "exitstatus": 0}']) + "\n")
    assert pytester.run(sys.executable, "-m", "conformance", "summary", str(path)).ret == 0
    path.write_text("\n".join(lines + ['{"record": "case", "backend": 3, "check": "forward", "outcome": null}']) + "\n")
    result = pytester.run(sys.executable, "-m", "conformance", "summary", str(path))
    assert result.ret == 2
    result.stderr.fnmatch_lines(["*line 3: not a case record*"])


def test_every_check_has_a_test_in_the_suite():
    import conformance.suite.test_conformance as suite
    from conformance.checks import CHECKS

    marked = {m.args[0] for name in dir(suite) if name.startswith("test_")
              for m in getattr(getattr(suite, name), "pytestmark", []) if m.name == "attention_check"}
    assert marked == set(CHECKS)


def test_pytest_benchmark_machine_info_gains_the_gpu_facts(pytester):
    pytester.makepyfile(test_b="def test_x(benchmark):\n    benchmark(lambda: sum(range(10)))\n")
    pytester.runpytest("-p", "no:cacheprovider", "--benchmark-json=bench.json").assert_outcomes(passed=1)
    info = json.loads((pytester.path / "bench.json").read_text())["machine_info"]["attention_conformance"]
    assert {"arch", "torch", "cuda", "cudnn", "flash-attn", "xformers", "triton"} <= set(info)


def test_a_case_without_the_checks_feature_is_skipped_not_a_harness_error(pytester):
    result = pytester.runpytest(*SUITE, "--backend=naive", "--check=causal", "--case=b2_q17_k17_h4_d32_fp32_seed1")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*the causal check exercises causal, which case b2_q17_k17_h4_d32_fp32_seed1 does not have*"])


def test_module_form_import_string_from_the_current_folder(tmp_path):
    """`pytest --backend=my_kernels:fn` from the kernel's own folder (the console script, unlike
    `python -m pytest` and pytester, puts no folder on sys.path)."""
    (tmp_path / "my_kernels.py").write_text(GOOD_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    package = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(package)  # the suite under test, not the kernel's folder
    result = subprocess.run([str(Path(sys.executable).parent / "pytest"), *SUITE, "--backend=my_kernels:attention",
                             "--check=forward", "--case=b2_q17_k17_h4_d32_fp32_seed1", "--results-file="],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-1500:] + result.stderr[-500:]


def test_the_header_names_the_backends_a_default_run_tests():
    from types import SimpleNamespace

    from conformance.plugin import Conformance

    def header(specs, backends):
        selection = SimpleNamespace(device="cpu", tier="standard", backend_specs=specs, backends=backends)
        plugin = Conformance(SimpleNamespace(pluginmanager=SimpleNamespace(has_plugin=lambda name: False)))
        plugin.session = SimpleNamespace(selection=selection, runner=SimpleNamespace(protected=True))
        return plugin.pytest_report_header()

    named = lambda: [SimpleNamespace(name=n) for n in ("naive", "sdpa-math", "tiled")]  # noqa: E731
    assert header([], named) == ["attention-conformance: device cpu, tier standard, backends: naive, sdpa-math, "
                                 "tiled (every backend usable here; --backend to choose)"]
    assert header(["mine.py:f"], named) == ["attention-conformance: device cpu, tier standard, backends: mine.py:f"]

    assert header([], lambda: [])[0].endswith("backends: none usable here (see --attn-list-backends)")

    def broken():
        raise RuntimeError("the kernel process did not start")

    assert header([], broken)[0].endswith("backends: every backend usable here (see --attn-list-backends)")


def test_update_missing_baselines_records_into_the_working_baselines_only_what_is_missing(pytester):
    """The run's options as the checks get them: --update-missing-baselines records (into ./baselines, as
    --update-baselines does) with the missing-only rule on; --update-baselines alone times every case."""
    pytester.makeconftest('''
        from conformance.plugin import SESSION

        def pytest_collection_finish(session):
            options = session.config.stash[SESSION].options
            print(f"OPTIONS update={options.update_baselines} missing={options.missing_baselines_only} "
                  f"dir={options.baselines_dir}")
    ''')
    for flag, expected in (("--update-missing-baselines", "update=True missing=True dir=baselines"),
                           ("--update-baselines", "update=True missing=False dir=baselines"),
                           ("--tier=quick", "update=False missing=False")):
        result = pytester.runpytest(*SUITE, "--backend=naive", "--check=speed", "-s", flag)
        result.stdout.fnmatch_lines([f"OPTIONS {expected}*"])
