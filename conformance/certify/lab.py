"""The lab's tables, measured here and set beside what the lab notes promise (shared/lab-notes.md:
"Lab-1.5: FlashAttention Deep Dive"). Sizes come from a profile: "full" is the lab's, "tiny" runs on
a CPU in seconds (for CI), where the comparison is not meaningful but the code path is exercised."""

from __future__ import annotations

import math
import time

import torch

from conformance.backend import OutOfMemory, call, classify
from conformance.case import Case
from conformance.inputs import make_inputs
from conformance.timing import summarize, time_calls

NOTES_FORWARD = {512: (10, 5, 2.0), 1024: (35, 12, 2.9), 2048: (140, 30, 4.7), 4096: ("OOM or 560", 80, 7.0)}
NOTES_GPT2_SPEEDUP = {512: 2.3, 1024: 3.6, 2048: 6.3, 4096: "~8+", 8192: "~15+"}
NOTES_GPT2_MEMORY_GB = {512: (2.1, 1.8), 1024: (4.5, 2.5), 2048: (12, 4.2), 4096: ("OOM (>24)", 8.5), 8192: ("OOM", 18)}
PROFILES = {
    "full": {"forward": (512, 1024, 2048, 4096), "forward_batch": 8, "gpt2": dict(n_layer=24, n_head=16, n_embd=1024),
             "gpt2_lengths": (512, 1024, 2048, 4096, 8192), "gpt2_batch": 4, "long_tokens": 8192,
             "long_model": dict(layers=8, width=1024, heads=16), "steps": 3},
    "tiny": {"forward": (64, 128), "forward_batch": 2, "gpt2": dict(n_layer=2, n_head=4, n_embd=64),
             "gpt2_lengths": (64, 128), "gpt2_batch": 2, "long_tokens": 256, "long_model": dict(layers=2, width=64, heads=4),
             "steps": 2},
}


GPT2_MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024)


def gpt2_label(config: dict) -> str:
    """The model's name true to what runs: GPT-2 Medium only at its configuration."""
    shape = f"{config['n_layer']} layers, {config['n_head']} heads, width {config['n_embd']}"
    if config == GPT2_MEDIUM:
        return f"GPT-2 Medium ({shape})"
    return f"A GPT-2-style model of {shape} (the lab's GPT-2 Medium has 24 layers, 16 heads, width 1024)"


def model_label(config: dict) -> str:
    """The RoPE model's configuration in words."""
    return f"{config['layers']} layers, width {config['width']}, {config['heads']} heads"


def _oom(exc: BaseException) -> bool:
    return classify(exc) is OutOfMemory


def forward_table(standard, flash, device: str, dtype: str, profile: dict) -> list[dict]:
    """Standard attention vs FlashAttention, forward time and speedup (the notes' first notebook)."""
    rows = []
    for n in profile["forward"]:
        case = Case(batch=profile["forward_batch"], seqlen_q=n, seqlen_k=n, nheads=16, head_dim=64, dtype=dtype, seed=4)
        inputs = make_inputs(case, device, draw_on_device=True)
        row = {"seqlen": n, "notes_standard_ms": NOTES_FORWARD.get(n, (None,) * 3)[0],
               "notes_flash_ms": NOTES_FORWARD.get(n, (None,) * 3)[1], "notes_speedup": NOTES_FORWARD.get(n, (None,) * 3)[2]}
        for label, backend in (("standard", standard), ("flash", flash)):
            try:
                samples, _, _ = time_calls(lambda i, b=backend: call(b, inputs.q, inputs.k, inputs.v, case), device,
                                           warmup=1, budget_s=0.2, min_reps=3, max_reps=30)
                row[f"{label}_ms"] = summarize(samples)["median_ms"]
            except Exception as exc:  # noqa: BLE001 - OOM is the notes' expected result for standard at 4096
                if not _oom(exc):
                    raise
                row[f"{label}_ms"] = "OOM"
        if isinstance(row["standard_ms"], float) and isinstance(row["flash_ms"], float):
            row["speedup"] = row["standard_ms"] / row["flash_ms"]
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _gpt2(config: dict, positions: int, impl: str, device: str, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_positions=positions, vocab_size=50257, **config)
    with torch.device(device):  # initialised where it runs: 355M parameters built on the CPU take seconds
        return GPT2LMHeadModel._from_config(cfg, attn_implementation=impl, dtype=dtype)


def gpt2_table(device: str, dtype, profile: dict, impls) -> list[dict]:
    """GPT-2 of the profile's configuration (Medium in "full"; randomly initialised, nothing downloaded):
    training step time and peak memory per attention implementation and sequence length."""
    rows = []
    for n in profile["gpt2_lengths"]:
        row = {"seqlen": n, "notes_speedup": NOTES_GPT2_SPEEDUP.get(n), "notes_memory_gb": NOTES_GPT2_MEMORY_GB.get(n)}
        for impl in impls:
            row[impl] = _train_steps(lambda: _gpt2(profile["gpt2"], max(profile["gpt2_lengths"]), impl, device, dtype),
                                     lambda model: {"input_ids": torch.randint(0, 50257, (profile["gpt2_batch"], n),
                                                                               device=device)},
                                     device, profile["steps"])
        eager, fast = row.get("eager", {}), row.get(impls[-1], {})
        if "step_ms" in eager and "step_ms" in fast:
            row["speedup"] = eager["step_ms"] / fast["step_ms"]
        rows.append(row)
    return rows


def _train_steps(build, batch, device: str, steps: int) -> dict:
    """Median step time (after one warm-up step) and peak memory of a few AdamW training steps."""
    model = optimizer = None
    try:
        model = build()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            data = batch(model)
            loss = model(**data, labels=data["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
            if not math.isfinite(float(loss.detach())):
                return {"error": "loss is not finite"}
        result = {"step_ms": sorted(times[1:])[len(times[1:]) // 2], "loss": float(loss.detach())}
        if device == "cuda":
            result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return result
    except Exception as exc:  # noqa: BLE001 - out of memory is the notes' expected result at long lengths
        if _oom(exc):
            return {"oom": True}
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()


class RopeLM(torch.nn.Module):
    """A small causal language model with rotary position embeddings, its attention a backend's
    function in flash-attn's convention."""

    def __init__(self, attention, layers: int, width: int, heads: int, vocab: int = 1024):
        super().__init__()
        self.attention, self.heads = attention, heads
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "norm1": torch.nn.RMSNorm(width), "qkv": torch.nn.Linear(width, 3 * width, bias=False),
            "proj": torch.nn.Linear(width, width, bias=False), "norm2": torch.nn.RMSNorm(width),
            "mlp": torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)),
        }) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab, bias=False)

    @staticmethod
    def rope(x):
        """Rotate pairs of channels by position-dependent angles (RoFormer), x: (batch, seq, heads, dim)."""
        seq, dim = x.shape[1], x.shape[-1]
        freqs = 10000.0 ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
        angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * freqs
        cos, sin = angles.cos()[None, :, None].to(x.dtype), angles.sin()[None, :, None].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, input_ids, labels=None):
        x = self.embed(input_ids)
        b, s, w = x.shape
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](x)).view(b, s, 3, self.heads, w // self.heads).unbind(2)
            out = self.attention(self.rope(q), self.rope(k), v, causal=True)
            x = x + block["proj"](out.reshape(b, s, w))
            x = x + block["mlp"](block["norm2"](x))
        logits = self.head(x).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return type("Output", (), {"loss": loss})()


def long_sequence_table(backends: dict, device: str, dtype, profile: dict, budget_gb: float = 16.0) -> list[dict]:
    """A few training steps of the RoPE model at the profile's length (8K tokens in 'full') per backend,
    against a memory budget (the notes: 8K+ tokens in under 16 GB with FlashAttention, OOM without)."""
    rows = []
    tokens = profile["long_tokens"]
    for label, backend in backends.items():
        result = _train_steps(lambda b=backend: RopeLM(b.fn, **profile["long_model"]).to(device=device, dtype=dtype),
                              lambda model: {"input_ids": torch.randint(0, 1024, (1, tokens), device=device)},
                              device, profile["steps"])
        result["within_budget"] = ("peak_gb" in result and result["peak_gb"] <= budget_gb) if device == "cuda" else None
        rows.append({"backend": label, "tokens": tokens, "budget_gb": budget_gb, **result})
    return rows
