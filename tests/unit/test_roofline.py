"""The FLOP count of benchmarks/roofline.py, on a hand-computed case and against real models' weight counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from roofline import Shape, Work, batch_work, packed_pair_work, roofline, sequence_work  # noqa: E402
from sepo.data.collate import collate_pairs  # noqa: E402
from sepo.data.shared_prefix import PAD, with_shared_prefix  # noqa: E402

TINY = Shape(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, gated_mlp=True)


def test_flops_of_a_hand_computed_case():
    """H=4, 1 layer, 2 heads, 1 kv head, d=2, gated MLP I=8, V=10.
    Per position: q 2·4·4 = 32, k 2·4·2 = 16, v 16, o 2·4·4 = 32 (= 96), MLP 2·3·4·8 = 192  -> 288.
    Per attended pair: 4·2·2 = 16. Per LM-head position: 2·4·10 = 80.
    One 3-token sequence, head at 2 positions: 3·288 + (1+2+3)·16 + 2·80 = 864 + 96 + 160 = 1120.
    The pair prompt (2) | chosen (1) | rejected (1), head at 2 positions:
      plain: two 3-token rows     6·288 + 12·16 + 2·80 = 1728 + 192 + 160 = 2080
      packed: one 4-token row     4·288 + (3 + 1·2 + 1 + 1·2 + 1)·16 + 2·80 = 1152 + 144 + 160 = 1456
    A training step: 3 x forward = 3·2080 = 6240 (plain)."""
    assert (TINY.per_position, TINY.per_attended_pair, TINY.per_head_position) == (288, 16, 80)
    assert sequence_work(3, 2).flops(TINY) == 1120
    plain = sequence_work(3, 1) + sequence_work(3, 1)
    assert plain.flops(TINY) == 2080 and (plain * 3).flops(TINY) == 6240
    assert packed_pair_work(2, 1, 1, 2).flops(TINY) == 1456
    rows = [{"index": 0, "prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8]}]
    batch = collate_pairs(rows, pad_token_id=0)
    assert batch_work(batch).flops(TINY) == 2080
    assert batch_work(with_shared_prefix(batch, 0)).flops(TINY) == 1456
    r = roofline(2080, 2.0, {"square": 2080.0})
    assert r["flop_per_s"] == 1040 and r["peak_share"] == 0.5


def test_packed_attention_pairs_are_the_mask_entries():
    """The attended pairs counted for a packed row are exactly the real queries' allowed keys in its mask."""
    rows = [{"index": 0, "prompt_input_ids": [1, 2, 3, 4], "chosen_input_ids": [5, 6, 7], "rejected_input_ids": [8, 9]},
            {"index": 1, "prompt_input_ids": [1], "chosen_input_ids": [5], "rejected_input_ids": [8, 9, 10, 11]}]
    shared = with_shared_prefix(collate_pairs(rows, pad_token_id=0), 0).shared
    real = shared.segments != PAD  # (B, T)
    allowed = shared.allowed()[:, 0] & real[:, :, None]  # (B, T, T), real queries only
    assert int(allowed.sum()) == packed_pair_work(4, 3, 2, 0).attended + packed_pair_work(1, 1, 4, 0).attended


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_per_position_flops_are_twice_the_layer_weights(arch):
    """Every multiply-add of a position's projections and MLP uses one weight once: per_position = 2 x the number
    of matmul weights in the layers (biases and norms excluded); the LM head likewise."""
    from transformers import AutoModelForCausalLM

    from sepo.testing import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(arch, "small", 300))
    shape = Shape.of(model.config)
    layer_weights = sum(p.numel() for n, p in model.named_parameters()
                        if ".layers." in n and n.endswith("weight") and p.dim() == 2)
    assert shape.per_position == 2 * layer_weights
    assert shape.per_head_position == 2 * model.get_output_embeddings().weight.numel()
    assert Work(1, 0, 0).flops(shape) == shape.per_position
