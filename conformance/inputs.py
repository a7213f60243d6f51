"""Tensors for a case: drawn on the CPU from the case's seed, so every device sees the same numbers."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from conformance.case import Case


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor

    def clone(self) -> Inputs:
        return Inputs(*(t.detach().clone() for t in (self.q, self.k, self.v, self.dout)))

    def to(self, device: str | torch.device) -> Inputs:
        """A copy on ``device`` (views of a packed layout become tensors of their own)."""
        return Inputs(*(t.detach().to(device, copy=True) for t in (self.q, self.k, self.v, self.dout)))

    def differing(self, other: Inputs, names=("q", "k", "v", "dout")) -> list[str]:
        """Which of ``names`` differ from ``other``'s: a kernel wrote into them, or they did not reach it."""
        return [n for n in names if not torch.equal(getattr(self, n).detach(), getattr(other, n).detach())]


def make_inputs(case: Case, device: str | torch.device, *, requires_grad: bool = False,
                seed_offset: int = 0, draw_on_device: bool = False) -> Inputs:
    """q, k, v in the case's layout (views into shared storage for 'packed' and 'bhsd') and an upstream
    gradient. ``seed_offset`` draws another input set of the same case (used to catch stale results).
    Numbers are drawn on the CPU, the same on every device, unless ``draw_on_device`` (the timing and
    memory sweeps, whose inputs reach hundreds of MB, only need them random)."""
    gen = torch.Generator(device=device if draw_on_device else "cpu").manual_seed(case.seed * 1000 + seed_offset)
    b, sq, sk, h, hk, d = case.batch, case.seqlen_q, case.seqlen_k, case.nheads, case.nheads_k, case.head_dim
    dtype = case.torch_dtype

    def draw(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=gen.device) * std).to(device=device, dtype=dtype)

    if case.layout == "packed":
        qkv = torch.cat([draw(b, sq, h, d, std=case.magnitude), draw(b, sq, hk, d, std=case.magnitude),
                         draw(b, sq, hk, d)], dim=2).requires_grad_(requires_grad)
        q, k, v = qkv.split([h, hk, hk], dim=2)
    elif case.layout == "bhsd":
        bases = [draw(b, h, sq, d, std=case.magnitude), draw(b, hk, sk, d, std=case.magnitude),
                 draw(b, hk, sk, d)]
        q, k, v = (t.requires_grad_(requires_grad).transpose(1, 2) for t in bases)
    else:
        q = draw(b, sq, h, d, std=case.magnitude).requires_grad_(requires_grad)
        k = draw(b, sk, hk, d, std=case.magnitude).requires_grad_(requires_grad)
        v = draw(b, sk, hk, d).requires_grad_(requires_grad)
    return Inputs(q, k, v, draw(b, sq, h, d))


def alibi_slopes(nheads: int) -> torch.Tensor:
    """The standard ALiBi slopes 2^(-8 i / n), i = 1..n (Press et al.), as float32 like flash-attn expects."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / nheads) for i in range(nheads)], dtype=torch.float32)


def attn_bias(case: Case, device: str | torch.device) -> torch.Tensor:
    """The case's attn_bias tensor (``Case.attn_bias``), drawn on the CPU from its seed: bool for the
    mask kinds, the case's dtype for the additive ones, shaped ``case.bias_shape`` (contiguous)."""
    return _attn_bias_cpu(case).to(device).clone()


@functools.lru_cache(maxsize=16)
def _attn_bias_cpu(case: Case) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed * 1000 + 500)
    shape = case.bias_shape
    kind, pattern = case.attn_bias.split(".")
    rows_shape = shape[:-1]
    if kind in ("keep", "rows"):
        if pattern[2] == "1" and pattern[3] == "k":  # key padding: each (batch, head) keeps a prefix of keys
            lengths = torch.randint(1, shape[-1] + 1, rows_shape, generator=gen)
            keep = torch.arange(shape[-1]) < lengths.unsqueeze(-1)
        else:
            keep = torch.rand(shape, generator=gen) < 0.75
            # every query keeps at least one key
            keep.scatter_(-1, torch.randint(0, shape[-1], (*rows_shape, 1), generator=gen), True)
        if kind == "rows":  # about a quarter of the rows (at least one) keep no key at all
            off = torch.rand(rows_shape, generator=gen) < 0.25
            off.view(-1)[min(1, off.numel() - 1)] = True
            keep &= ~off.unsqueeze(-1)
        return keep
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "add":
        return (2 * noise).to(case.torch_dtype)
    # "big": a per-row offset of 100 to 250, either sign, far beyond exp's float32 range (88), plus noise
    sign = torch.randint(0, 2, (*rows_shape, 1), generator=gen, dtype=torch.float64) * 2 - 1
    offset = sign * (100 + 150 * torch.rand((*rows_shape, 1), generator=gen, dtype=torch.float64))
    return (offset + 2 * noise).to(case.torch_dtype)
