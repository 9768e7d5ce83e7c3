"""Eval metrics against hand-computed values on tiny inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from sepo.errors import SepoError
from sepo.evaluation import (
    alpacaeval_records,
    generate,
    kl_on_samples,
    load_reward,
    preference_accuracy,
    sequence_log_probs,
    ties_half,
    win_rate,
)
from sepo.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("stories260k")


@pytest.fixture(scope="module")
def model():
    return load_causal_lm("stories260k", trainable=False)


def brute_logp(model, prompt, response):
    """sum_i log softmax(logits[P + i - 1])[y_i] from a plain full forward, one sequence."""
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0].float()
    return sum(torch.log_softmax(logits[len(prompt) + i - 1], -1)[y].item() for i, y in enumerate(response))


def test_win_rate_counts_ties_half():
    """policy [2, 2, 5, 1] vs reference [1, 2, 3, 4]: win, tie, win, loss -> (1 + 0.5 + 1 + 0) / 4 = 0.625."""
    assert win_rate([2, 2, 5, 1], [1, 2, 3, 4]) == 0.625
    assert win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert ties_half(torch.tensor([0.5, -1.0, 0.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        win_rate([1], [1, 2])


def test_kl_of_a_model_against_itself_is_zero_and_matches_brute_force(model, tok, tiny_llama_stories):
    prompts = [tok("Once upon a time")["input_ids"], tok("Tom had a big red ball.")["input_ids"]]
    samples = [ids for _, ids in generate(model, tok, prompts, max_new_tokens=12, seed=0)]
    assert kl_on_samples(model, model, prompts, samples, tok.pad_token_id) == 0.0
    other = AutoModelForCausalLM.from_pretrained(tiny_llama_stories).eval()
    expected = sum(brute_logp(model, p, y) - brute_logp(other, p, y) for p, y in zip(prompts, samples)) / 2
    torch.testing.assert_close(kl_on_samples(model, other, prompts, samples, tok.pad_token_id), expected,
                               atol=1e-3, rtol=1e-4)


def test_sequence_log_probs_match_a_plain_forward(model, tok):
    prompts = [tok("The cat sat.")["input_ids"], tok("Lily went to the park with her mom.")["input_ids"]]
    responses = [tok(" It was warm.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], [tok.eos_token_id]]
    sums, lengths = sequence_log_probs(model, prompts, responses, tok.pad_token_id, batch_size=2)
    torch.testing.assert_close(sums, torch.tensor([brute_logp(model, p, y) for p, y in zip(prompts, responses)]),
                               atol=1e-4, rtol=1e-4)
    assert lengths.tolist() == [len(responses[0]), 1]


def test_preference_accuracy_implicit_and_length_normalised(model, tok, story_pairs, tiny_llama_stories):
    """Against itself the implicit margin is 0 on every pair -> accuracy 1/2 (ties half). Without a
    reference, pair i is correct iff logp(c)/|c| > logp(r)/|r| (recomputed here with a plain forward)."""
    rows = list(story_pairs)
    same = preference_accuracy(model, rows, tok.pad_token_id, reference=model)
    assert same == {"accuracy": 0.5, "margin": 0.0, "metric": "implicit", "num_pairs": len(rows)}
    free = preference_accuracy(model, rows, tok.pad_token_id)
    norm = [brute_logp(model, r["prompt_input_ids"], r["chosen_input_ids"]) / len(r["chosen_input_ids"])
            - brute_logp(model, r["prompt_input_ids"], r["rejected_input_ids"]) / len(r["rejected_input_ids"])
            for r in rows]
    assert free["metric"] == "logprob"
    assert free["accuracy"] == pytest.approx(sum(m > 0 for m in norm) / len(rows))
    assert free["margin"] == pytest.approx(sum(norm) / len(norm), abs=1e-4)
    other = AutoModelForCausalLM.from_pretrained(tiny_llama_stories).eval()
    assert preference_accuracy(model, rows, tok.pad_token_id, reference=other)["margin"] != 0.0


def test_batched_left_padded_generation_equals_one_at_a_time(model, tok):
    prompts = [tok("Once upon a time")["input_ids"], tok("One day, Ben found a box in the garden.")["input_ids"]]
    batched = generate(model, tok, prompts, max_new_tokens=10, do_sample=False, batch_size=2)
    single = [generate(model, tok, [p], max_new_tokens=10, do_sample=False)[0] for p in prompts]
    assert batched == single
    assert batched[0][0].startswith(", there was a little girl named Lily")
    sampled = generate(model, tok, prompts, max_new_tokens=10, seed=1)
    assert sampled == generate(model, tok, prompts, max_new_tokens=10, seed=1)  # seeded


def test_reward_callable_and_sequence_classifier(tmp_path, tok):
    fn = load_reward("sepo.tasks.sentiment:gold_reward_batch")
    assert fn(["p", "q"], ["She was happy and she smiled at her mom.", "The dog cried and was angry and mad."]) == [2.0, -3.0]
    with pytest.raises(SepoError, match="cannot import"):
        load_reward("sepo.tasks.sentiment:no_such_function")
    bad = load_reward("operator:concat")  # returns prompts + completions: twice too many values
    with pytest.raises(SepoError, match="returned"):
        bad(["ab", "c", "d"], ["x", "y", "z"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scores = load_reward(str(tmp_path / "rm"))(["Tom had a ball.", "Hi"], [" He smiled.", " there, friend"])
    with torch.no_grad():
        direct = [rm(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in ["Tom had a ball. He smiled.",
                                                                              "Hi there, friend"]]
    torch.testing.assert_close(scores, direct, atol=1e-5, rtol=1e-5)


def test_alpacaeval_records_schema():
    recs = alpacaeval_records(["Say hi"], ["hi"], "my-policy")
    assert recs == [{"instruction": "Say hi", "output": "hi", "generator": "my-policy"}]
