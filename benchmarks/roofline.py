"""The roofline column every benchmark prints: model FLOPs counted from the model's shape and the positions actually
computed, over a matmul peak measured in the same run.

FLOP count (model FLOPs, the convention of MFU): 2 per multiply-add of every matmul, pad positions excluded.
Per real position and layer: the q, k, v and o projections (``2·H·d·(2·heads + 2·kv_heads)``) and the MLP
(``2·3·H·I`` gated -- llama, qwen2 --, ``2·2·H·I`` otherwise -- gpt_neox); per attended (query, key) pair and
layer ``4·heads·d`` (scores and the weighted sum; causal pairs counted once, as attention actually needs them);
per position projected through the LM head ``2·H·V`` (response positions only for the selective head, every
position for full logits). Norms, rotary, softmax and other elementwise work are not counted. A training step
counts 3x the trained model's forward (backward = 2x forward; recomputation for checkpointing is not model FLOPs)
plus 1x any frozen model's forward.

Peak: the best of a few timed matmuls in the benchmark's own process -- a square ``n³`` product (2048 on a CPU,
8192 on a GPU) and the LM-head shape ``(chunk x H) @ (H x V)`` -- so "% of peak" says how close a benchmark runs
to what this machine's matmul kernels reach right now, not to a datasheet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

GATED_MLP = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "olmo2")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size,
                   gated_mlp=config.model_type in GATED_MLP)

    @property
    def per_position(self) -> int:
        """Projection and MLP FLOPs of one position through every layer."""
        projections = 2 * self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 2 * (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return self.layers * (projections + mlp)

    @property
    def per_attended_pair(self) -> int:
        return self.layers * 4 * self.heads * self.head_dim

    @property
    def per_head_position(self) -> int:
        return 2 * self.hidden * self.vocab


@dataclass
class Work:
    """What a forward computes: real positions, attended (query, key) pairs, positions through the LM head."""

    positions: int = 0
    attended: int = 0
    head_positions: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.positions + other.positions, self.attended + other.attended,
                    self.head_positions + other.head_positions)

    def __mul__(self, k: int) -> Work:
        return Work(self.positions * k, self.attended * k, self.head_positions * k)

    def flops(self, shape: Shape) -> int:
        """Forward FLOPs of this work on a model of this shape."""
        return (self.positions * shape.per_position + self.attended * shape.per_attended_pair
                + self.head_positions * shape.per_head_position)


def causal_pairs(length: int) -> int:
    """(query, key) pairs of a causal sequence: 1 + 2 + ... + length."""
    return length * (length + 1) // 2


def sequence_work(length: int, head_positions: int) -> Work:
    return Work(length, causal_pairs(length), head_positions)


def packed_pair_work(prompt: int, chosen: int, rejected: int, head_positions: int) -> Work:
    """One packed row [prompt | chosen | rejected]: each response sees the prompt and itself, causally."""
    attended = causal_pairs(prompt) + chosen * prompt + causal_pairs(chosen) + rejected * prompt + causal_pairs(rejected)
    return Work(prompt + chosen + rejected, attended, head_positions)


def batch_work(batch, head_positions: int | None = None) -> Work:
    """The work of one forward over a PairBatch as it will run: packed rows when it carries ``batch.shared``,
    plain rows otherwise; ``head_positions`` defaults to every response token (the selective head)."""
    heads = int(batch.response_mask.sum()) if head_positions is None else head_positions
    if batch.shared is not None:
        from sepo.data.shared_prefix import CHOSEN, PROMPT, REJECTED

        seg = batch.shared.segments
        work = Work(head_positions=heads)
        for p, c, r in zip(*((seg == s).sum(1).tolist() for s in (PROMPT, CHOSEN, REJECTED))):
            work = work + packed_pair_work(p, c, r, 0)
        return work
    work = Work(head_positions=heads)
    for length in batch.attention_mask.sum(1).tolist():
        work = work + sequence_work(int(length), 0)
    return work


def matmul_peak(m: int, k: int, n: int, *, dtype=torch.float32, device="cpu", repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` (m x k) @ (k x n) products after a warm-up."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def measure_peaks(shape: Shape | None = None, *, dtype=torch.float32, device="cpu", chunk: int = 64,
                  n: int | None = None) -> dict:
    """{"square": FLOP/s of the n³ product, "lm_head": FLOP/s of the LM-head shape (when a shape is given)}."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    peaks = {"square": matmul_peak(n, n, n, dtype=dtype, device=device), "square_n": n}
    if shape is not None:
        peaks["lm_head"] = matmul_peak(chunk, shape.hidden, shape.vocab, dtype=dtype, device=device)
    return peaks


def describe_peaks(peaks: dict) -> str:
    text = f"matmul peak, this run: {peaks['square'] / 1e9:,.1f} GFLOP/s ({peaks['square_n']}³)"
    if "lm_head" in peaks:
        text += f", {peaks['lm_head'] / 1e9:,.1f} GFLOP/s in the LM-head shape"
    return text


def roofline(flops: float, seconds: float, peaks: dict) -> dict:
    """Achieved FLOP/s and its share of the square matmul peak."""
    achieved = flops / seconds
    return {"flops": flops, "flop_per_s": achieved, "peak_share": achieved / peaks["square"]}


def describe(r: dict) -> str:
    return f"{r['flop_per_s'] / 1e9:,.1f} GFLOP/s ({100 * r['peak_share']:.0f}% of peak)"
