"""Cross-tokenizer projection of token rewards through character offsets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from sepo.core.projection import align_spans, project_rewards, spans_from_pieces
from sepo.models import load_tokenizer


def test_projection_hand_computed():
    """text "ab cd": oracle "ab"(0,2) r=1, " cd"(2,5) r=3, EOS(5,5) r=0.5; policy "a"(0,1), "b c"(1,4), "d"(4,5),
    EOS(5,5). "ab" splits 1/2 + 1/2; " cd" gives 2/3 of 3 = 2 to "b c" and 1/3 = 1 to "d"; EOS has no characters
    and goes to the policy's last token (its EOS): [0.5, 0.5 + 2, 1, 0.5], total 4.5 as before."""
    out = project_rewards(torch.tensor([1.0, 3.0, 0.5]), [(0, 2), (2, 5), (5, 5)], [(0, 1), (1, 4), (4, 5), (5, 5)])
    assert_close(out, torch.tensor([0.5, 2.5, 1.0, 0.5]))


def test_identity_when_tokenizations_agree_and_uncovered_characters_go_to_the_sink():
    spans = [(0, 3), (3, 4), (4, 4)]
    r = torch.tensor([0.2, -1.0, 0.7])
    assert_close(project_rewards(r, spans, spans), r)
    # the policy covers only characters 0..3: the oracle token (3, 4) is an orphan -> to the sink (index 0 here)
    assert_close(project_rewards(r, spans, [(0, 3)], sink=0), torch.tensor([r.sum().item()]))


@settings(max_examples=100, deadline=None)
@given(cuts_a=st.sets(st.integers(1, 39), max_size=15), cuts_b=st.sets(st.integers(1, 39), max_size=15),
       seed=st.integers(0, 10_000), extra_specials=st.integers(0, 2))
def test_projection_conserves_the_total_reward(cuts_a, cuts_b, seed, extra_specials):
    """Two random segmentations of a 40-character text (plus character-less special tokens at the end)."""
    def spans(cuts):
        edges = [0, *sorted(cuts), 40]
        return [(a, b) for a, b in zip(edges, edges[1:])]

    src = spans(cuts_a) + [(40, 40)] * extra_specials
    dst = spans(cuts_b) + [(40, 40)]
    r = torch.randn(len(src), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = project_rewards(r, src, dst)
    assert out.shape == (len(dst),)
    assert out.sum().item() == pytest.approx(r.sum().item(), abs=1e-9)


def test_align_spans_prefix_and_trailing_specials():
    text_ids, offsets = [5, 6, 7], [(0, 2), (2, 3), (3, 6)]
    assert align_spans([5, 6, 7, 2], text_ids, offsets, {2}) == [(0, 2), (2, 3), (3, 6), (6, 6)]
    assert align_spans([5, 6, 2], text_ids, offsets, {2}) == [(0, 2), (2, 3), (3, 3)]  # cut by max_length
    assert align_spans([5, 9, 2], text_ids, offsets, {2}) is None  # not this text's tokenization


def test_spans_from_decoded_pieces():
    """"He said hi": pieces "He", " said", special, " hi" -> (0, 2), (2, 7), (7, 7), (7, 10).
    A SentencePiece-style piece " He" at the very start (the text has no space) is placed as "He";
    a piece that is not in the text ("?") gets an empty span and does not move the cursor; a real token that
    decodes to "" (a lone SentencePiece '▁') covers the whitespace at the cursor."""
    assert spans_from_pieces(["He", " said", None, " hi"], "He said hi") == [(0, 2), (2, 7), (7, 7), (7, 10)]
    assert spans_from_pieces([" He", "?", " said"], "He said") == [(0, 2), (2, 2), (2, 7)]
    assert spans_from_pieces(["", "s", None], " s") == [(0, 1), (1, 2), (2, 2)]  # a lone '▁' takes the space


TEXTS = [" She was happy and smiled.", " Inside was a toy, and he was so glad!",
         " Café naïve — 😀 emoji, tabs\tand\nnewlines.", " 1234567 + 89 = 1234656"]


@pytest.mark.parametrize("direction", ["stories260k->gpt2", "gpt2->stories260k"])
def test_real_tokenizers_conserve_reward_stories260k_vs_gpt2(gpt2_tokenizer_path, direction):
    """The stories260K SentencePiece BPE (512 tokens, byte fallback) against GPT-2's byte-level BPE (50,257)."""
    tokenizers = {"stories260k": load_tokenizer("stories260k"), "gpt2": load_tokenizer(str(gpt2_tokenizer_path))}
    src_tok, dst_tok = (tokenizers[n] for n in direction.split("->"))
    for k, text in enumerate(TEXTS):
        enc = src_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [*enc["input_ids"], src_tok.eos_token_id]
        src_spans = align_spans(ids, enc["input_ids"], enc["offset_mapping"], set(src_tok.all_special_ids))
        assert src_spans is not None and src_spans[-1][0] == src_spans[-1][1]  # EOS: no characters
        dst = dst_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        dst_spans = [*map(tuple, dst["offset_mapping"]), (len(text), len(text))]
        r = torch.randn(len(ids), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        out = project_rewards(r, src_spans, dst_spans)
        assert out.shape == (len(dst_spans),)
        assert out.sum().item() == pytest.approx(r.sum().item(), abs=1e-9), text
        assert out[-1].item() == pytest.approx(r[-1].item(), abs=1e-9)  # every character covered: EOS -> EOS only
