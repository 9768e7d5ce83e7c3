"""Model/tokenizer loading and the tiny-model kit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sepo.data.collate import collate_pairs
from sepo.errors import SepoError
from sepo.models import (
    check_same_vocabulary,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
    response_log_probs,
    tokenizer_fingerprint,
)
from sepo.testing import ARCHITECTURES, build_tiny_model, build_tokenizer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kit_models_load_like_hub_models(tmp_path, arch):
    path = build_tiny_model(tmp_path / arch, arch=arch, preset="micro", tokenizer="stories260k")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) == 512
    assert model.config.eos_token_id == tok.eos_token_id
    assert model(torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 512)


def test_kit_trains_a_bpe_tokenizer_on_given_text(tmp_path):
    tok = build_tokenizer("bpe", texts=["the cat sat on the mat"] * 20 + ["a dog ran"] * 20, vocab_size=300)
    ids = tok("the cat sat")["input_ids"]
    assert tok.decode(ids) == "the cat sat" and tok.pad_token_id is not None and tok.eos_token_id is not None
    path = build_tiny_model(tmp_path / "bpe", preset="micro", tokenizer=tok)
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == len(tok)


def test_bundled_stories260k_generates_its_known_story():
    """The bundled checkpoint reproduces llama2.c's greedy sample (see assets/stories260K/SOURCE.md)."""
    tok = load_tokenizer("stories260k")
    model = load_causal_lm("stories260k", trainable=False)
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0], skip_special_tokens=True).startswith("Once upon a time, there was a little girl named Lily")
    assert not any(p.requires_grad for p in model.parameters())


def test_pad_token_is_assigned_from_the_tokenizer_in_one_log_line_per_tokenizer(caplog, recwarn):
    import sepo.models

    sepo.models._pad_said.clear()
    for _ in range(3):
        tok = AutoTokenizer.from_pretrained(str(build_tiny_model.__globals__["STORIES260K"]))
        assert tok.pad_token_id is None
        with caplog.at_level("WARNING", logger="sepo"):
            ensure_pad_token(tok)
        assert tok.pad_token_id == tok.eos_token_id  # taken from the tokenizer, not hard-coded
    said = [r.getMessage() for r in caplog.records if "no pad token" in r.getMessage()]
    assert len(said) == 1 and "padding with its eos_token '</s>' (id 2)" in said[0]
    assert not [w for w in recwarn if "pad token" in str(w.message)]  # a log line, not a warning with a source line


def test_missing_model_and_tokenizer_give_clear_errors(tmp_path):
    with pytest.raises(SepoError, match="could not load model"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(SepoError, match="does not exist: it is a local path"):  # refused before any hub retry
        load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(SepoError, match="could not load tokenizer"):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer files
    with pytest.raises(SepoError, match="unknown dtype"):
        load_causal_lm("stories260k", dtype="fp8")


def test_vocabulary_check(gpt2_tokenizer_path):
    a, b = load_tokenizer("stories260k"), load_tokenizer(str(gpt2_tokenizer_path))
    check_same_vocabulary(a, load_tokenizer("stories260k"), "oracle", "reference")
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    with pytest.raises(SepoError, match="different vocabularies"):
        check_same_vocabulary(a, b, "oracle", "reference")


def test_lora_wraps_and_selective_head_still_matches_full_logits():
    from sepo.models import LoraSettings

    model = load_causal_lm("stories260k", lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rows = [{"index": 0, "prompt_input_ids": [1, 300, 301], "chosen_input_ids": [302, 2], "rejected_input_ids": [303, 304, 2]}]
    batch = collate_pairs(rows, pad_token_id=0)
    torch.testing.assert_close(response_log_probs(model, batch), response_log_probs(model, batch, full_logits=True))
