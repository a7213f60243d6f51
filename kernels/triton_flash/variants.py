"""Deliberately changed copies of flash.py, to show that the suite catches a change that breaks or slows
the kernel (README, "Our own Triton kernel"):

    python kernels/triton_flash/variants.py no-rescale /tmp/broken/flash.py   # CI's run must fail on it
    python kernels/triton_flash/variants.py extra-pass /tmp/slow/flash.py     # the speed gate must fail it

- ``no-rescale``: the online softmax forgets to rescale the output accumulator when the running maximum
  grows (Algorithm 1, line 10 without diag(exp(m_old - m_new))): wrong whenever a later key block holds a
  larger score than the earlier ones.
- ``extra-pass``: the forward pass first sweeps every key block once more to find each row's maximum score
  (a two-pass softmax); the online loop then starts from that maximum. The result is the same function
  (the maximum only shifts the exponent), computed with 50% more forward matrix products: slower, correct.
"""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "flash.py"

VARIANTS = {
    "no-rescale": [("        acc = acc * alpha[:, None]\n", "        acc = acc  # BROKEN: no rescale\n")],
    "extra-pass": [(
        "    # Which key blocks: [0, full) are seen whole",
        "    for start_n in range(0, seqlen_k // BLOCK_N * BLOCK_N, BLOCK_N):  # SLOWED: an extra pass over K\n"
        "        k_t = tl.load(k_base + (start_n + tl.arange(0, BLOCK_N))[None, :] * stride_kn"
        " + offs_d[:, None] * stride_kd)\n"
        "        m_i = tl.maximum(m_i, tl.max(tl.dot(q, k_t, input_precision=PRECISION) * qk_scale, 1))\n"
        "    # Which key blocks: [0, full) are seen whole",
    )],
}


def make(name: str, out: str | Path) -> Path:
    """Writes the variant's copy of flash.py to ``out``; every replaced text must be found exactly once."""
    text = SOURCE.read_text()
    for old, new in VARIANTS[name]:
        if text.count(old) != 1:
            raise ValueError(f"variant {name}: the text to replace occurs {text.count(old)} times in {SOURCE}")
        text = text.replace(old, new)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python {sys.argv[0]} {{{'|'.join(VARIANTS)}}} OUT.py")
    print(make(sys.argv[1], sys.argv[2]))
