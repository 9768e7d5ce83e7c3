"""Per-token log-probs: the label-shift convention against a brute-force loop, and the selective head against
full logits (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sepo.data.collate import collate_pairs
from sepo.models import load_causal_lm, response_log_probs

# prompts and responses of different lengths, so the right padding differs from row to row
ROWS = [
    {"index": 0, "prompt_input_ids": [1, 5, 9, 14], "chosen_input_ids": [22, 7, 2], "rejected_input_ids": [31, 2]},
    {"index": 1, "prompt_input_ids": [1, 40], "chosen_input_ids": [8, 9, 10, 11, 12, 2], "rejected_input_ids": [2]},
    {"index": 2, "prompt_input_ids": [1, 3, 3, 3, 3, 3, 3], "chosen_input_ids": [50], "rejected_input_ids": [60, 61, 2]},
]


def brute_force(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """One unpadded forward per response token: log p(y_i | prompt, y_<i) from the LAST position of the prefix."""
    out = []
    for i, token in enumerate(response):
        ids = torch.tensor([prompt + response[:i]])
        logits = model(input_ids=ids).logits[0, -1]  # predicts the next token: y_i
        out.append(torch.log_softmax(logits.float(), -1)[token])
    return torch.stack(out)


@pytest.fixture(scope="module")
def model(tiny_llama_stories):
    return load_causal_lm(str(tiny_llama_stories), trainable=False)


def test_right_padded_selective_log_probs_match_a_brute_force_loop(model):
    batch = collate_pairs(ROWS, pad_token_id=0)
    with torch.no_grad():
        got = response_log_probs(model, batch)  # (6, R)
        for n in range(6):
            row, side = ROWS[n % 3], "chosen" if n < 3 else "rejected"
            response = row[f"{side}_input_ids"]
            expected = brute_force(model, row["prompt_input_ids"], response)
            assert_close(got[n, : len(response)], expected, atol=1e-5, rtol=1e-5)
            assert (got[n, len(response) :] == 0).all()  # padding slots stay 0
    # the first response token is scored (from the last prompt position), not dropped
    assert (got[:, 0] != 0).all()


def test_left_padded_full_logits_agree(model):
    """A left-padded batch (position ids from the attention mask) gives the same per-token log-probs."""
    batch = collate_pairs(ROWS, pad_token_id=0)
    seqs = [r["prompt_input_ids"] + r["chosen_input_ids"] for r in ROWS]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])  # (3, T) left-padded
    attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits  # (3, T, V)
        right = response_log_probs(model, batch)[:3]
    for n, row in enumerate(ROWS):
        pad, p = width - len(seqs[n]), len(row["prompt_input_ids"])
        for i, token in enumerate(row["chosen_input_ids"]):
            expected = torch.log_softmax(logits[n, pad + p + i - 1].float(), -1)[token]
            assert_close(right[n, i], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_selective_head_matches_full_logits_at_vocab_50k(tiny_llama_gpt2, chunk_size):
    policy = load_causal_lm(str(tiny_llama_gpt2))
    rows = [dict(r, chosen_input_ids=[t * 997 % 50000 for t in r["chosen_input_ids"]]) for r in ROWS]
    batch = collate_pairs(rows, pad_token_id=50256)
    selected = batch.response_mask.clone()
    selected[:, 1::2] = False  # a SePO-like selection: only these positions go through the head

    def run(full: bool, mask):
        policy.zero_grad()
        logps = response_log_probs(policy, batch, mask=mask, chunk_size=chunk_size, full_logits=full)
        logps.sum().backward()
        return logps.detach(), policy.model.layers[0].mlp.up_proj.weight.grad.clone()

    for mask in (None, selected):
        full, full_grad = run(True, mask)
        sel, sel_grad = run(False, mask)
        assert_close(sel, full, atol=1e-5, rtol=1e-5)
        assert_close(sel_grad, full_grad, atol=1e-5, rtol=1e-4)
    assert (sel[~selected] == 0).all() and (sel[selected & batch.response_mask] != 0).all()


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_tiled_inference_head_equals_log_softmax_across_tile_edges(bias):
    """Without autograd, a bias-free linear head is reduced VOCAB_TILE columns at a time (log-sum-exp of the
    tiles' log-sum-exps); a head with a bias takes the one-matmul path. Both must equal log_softmax + gather,
    with targets on both sides of every tile edge and in the short last tile."""
    from sepo.core.logprobs import VOCAB_TILE, rows_log_probs

    torch.manual_seed(0)
    vocab = 2 * VOCAB_TILE + 5
    head = torch.nn.Linear(16, vocab, bias=bias)
    rows = torch.randn(70, 16) * 3
    edges = [0, VOCAB_TILE - 1, VOCAB_TILE, 2 * VOCAB_TILE - 1, 2 * VOCAB_TILE, vocab - 1]
    targets = torch.tensor(edges * 11 + edges[:4])  # (70,)
    with torch.no_grad():
        expected = torch.log_softmax(head(rows), -1).gather(-1, targets[:, None]).squeeze(-1)
        got = rows_log_probs(head, rows, targets, chunk_size=32)  # 3 chunks, the last one short
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
