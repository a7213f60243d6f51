"""Investigates disagreements the suite found on a GPU, to tell a backend's bug from the suite's:
for each case, which query rows differ from the float64 reference and what those rows hold instead
(zeros, the mean of V, NaN, another row's answer). Usage: python tools/diagnose_findings.py"""

from __future__ import annotations

import torch

from conformance import reference, registry
from conformance.backend import call
from conformance.case import Case
from conformance.inputs import make_inputs

CASES = {
    "flash": ["b1_q3_k1_h1_d33_bf16_win0.-1_seed0", "b1_q8_k4_h1_d64_bf16_win0.-1_seed1",
              "b1_q8_k4_h1_d64_bf16_win2.-1_seed1", "b1_q8_k4_h1_d64_bf16_win-1.1_seed1",
              "b1_q4_k8_h1_d64_bf16_win0.-1_seed1"],
    "sdpa-efficient": ["b1_q3_k2_h1_d64_bf16_causalbr_seed0", "b1_q129_k65_h4_d64_fp16_causalbr_seed1"],
    "sdpa-cudnn": ["b1_q3_k2_h1_d64_bf16_causalbr_seed0", "b1_q129_k65_h4_d64_fp16_causalbr_seed1"],
}


def describe(backend_name: str, case: Case) -> None:
    backend = registry.load(backend_name)
    inputs = make_inputs(case, "cuda")
    out = call(backend, inputs.q, inputs.k, inputs.v, case).double()
    ref = reference.attention(inputs.q, inputs.k, inputs.v, case)
    mean_v = reference.attention(inputs.q, inputs.k, inputs.v, case, masked_rows="mean_v")
    lo, hi = reference.key_range(case) if reference.key_range(case) else (None, None)
    print(f"== {backend_name} {case.id}")
    for i in range(case.seqlen_q):
        err = float((out[:, i] - ref[:, i]).abs().max())
        if err > 0.05 or torch.isnan(out[:, i]).any():
            what = ("NaN" if torch.isnan(out[:, i]).any() else "zeros" if float(out[:, i].abs().max()) == 0
                    else "mean of V" if float((out[:, i] - mean_v[:, i]).abs().max()) < 0.02 else "other")
            keys = "" if lo is None else f" (reference keys {int(lo[i])}..{int(hi[i])})"
            print(f"  row {i}: max error {err:.3f}; backend returns {what}{keys}")


if __name__ == "__main__":
    for name, ids in CASES.items():
        for case_id in ids:
            try:
                describe(name, Case.from_id(case_id))
            except Exception as exc:  # noqa: BLE001 - a diagnosis reports what it meets
                print(f"== {name} {case_id}: {type(exc).__name__}: {exc}")
