"""Tokenized pairs: the prompt/response boundary against brute-force references, BOS/EOS, truncation."""

from __future__ import annotations

import datasets
import pytest

from sepo.data import DataOptions, load_preference_data, tokenize_pairs
from sepo.errors import ConfigError, DataError, SepoError
from sepo.testing import build_tokenizer

TOKENIZERS = ["gpt2", "stories260k", "gpt2+chatml"]


def make_tokenizer(kind: str):
    name, _, template = kind.partition("+")
    return build_tokenizer(name, chat_template=template or None)


def pairs(rows) -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"index": i, "prompt": p, "prompt_messages": [{"role": "user", "content": p}], "chosen": c, "rejected": r}
        for i, (p, c, r) in enumerate(rows)])


STORY_ROWS = [
    ("Once upon a time, there was a little girl.", " She was happy and smiled.", " She was sad and cried."),
    ("Tom had a big red ball.", " He played with his friend.", " He lost it."),
    ("Count: 1, 2,", " 3, 4", " 5, 9"),
]


@pytest.fixture(scope="module")
def hh_sample(hh_path):
    """25 multi-turn HH-RLHF pairs plus short story pairs."""
    raw = load_preference_data(str(hh_path), DataOptions(on_invalid="skip"))
    return datasets.concatenate_datasets([raw.dataset.select(range(25)).select_columns(
        ["index", "prompt", "prompt_messages", "chosen", "rejected"]), pairs(STORY_ROWS)])


def boundary_by_decoding(tok, ids: list[int], prompt_text: str) -> list[int]:
    """Brute force: every k at which the decoded first k ids are exactly the prompt text."""
    return [k for k in range(len(ids) + 1) if tok.decode(ids[:k], skip_special_tokens=True) == prompt_text]


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_boundary_matches_brute_force_references(hh_sample, kind):
    tok = make_tokenizer(kind)
    out = tokenize_pairs(hh_sample, tok, DataOptions(max_length=4096, max_prompt_length=2048))
    assert out.chat_template == ("tokenizer" if "chatml" in kind else "none")
    assert out.stats["rows"] == len(hh_sample) and out.stats["prompt_truncated"] == 0
    eos = tok.eos_token_id
    for row in out.dataset:
        prompt_ids = row["prompt_input_ids"]
        if out.chat_template == "tokenizer":
            prompt_text = tok.apply_chat_template(row["prompt_messages"], add_generation_prompt=True, tokenize=False)
            # the prompt is exactly what the model is given when it generates
            generation_ids = tok.apply_chat_template(row["prompt_messages"], add_generation_prompt=True,
                                                     tokenize=True)["input_ids"]
            assert prompt_ids == generation_ids
        else:
            prompt_text = row["prompt"]
        for side in ("chosen", "rejected"):
            response_ids = row[f"{side}_input_ids"]
            text = row[side].lstrip() if out.chat_template == "tokenizer" else row[side]
            assert response_ids[-1] == eos and eos not in response_ids[:-1]
            whole = prompt_ids + response_ids[:-1]
            # 1. the boundary found by decoding every prefix is where the prompt ids end
            assert boundary_by_decoding(tok, whole, prompt_text) == [len(prompt_ids)]
            assert tok.decode(whole, skip_special_tokens=True) == prompt_text + text
            # 2. the model sees the text tokenized in one piece (plus EOS): no artefact at the boundary
            assert prompt_ids + response_ids == tok(prompt_text + text)["input_ids"] + [eos]


def test_merge_across_the_boundary_keeps_the_prompt_ids():
    tok = build_tokenizer("gpt2")
    # GPT-2 merges ".<" into one token, so prompt+response is not prompt ids + more ids
    prompt, chosen, rejected = "Write a puzzle.", "<noinput>", "A puzzle."
    assert tok(prompt + chosen)["input_ids"][: len(tok(prompt)["input_ids"])] != tok(prompt)["input_ids"]
    out = tokenize_pairs(pairs([(prompt, chosen, rejected)]), tok, DataOptions())
    row = out.dataset[0]
    assert out.stats["boundary_retokenized"] == 1
    assert row["prompt_input_ids"] == tok(prompt)["input_ids"]
    assert row["chosen_input_ids"] == tok(chosen)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(row["prompt_input_ids"] + row["chosen_input_ids"]) == prompt + chosen + tok.eos_token


@pytest.mark.parametrize("template_bos", [True, False])
def test_bos_appears_once(template_bos):
    tok = build_tokenizer("stories260k")
    template = ("{{ bos_token }}" if template_bos else "") + \
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    out = tokenize_pairs(pairs(STORY_ROWS), tok, DataOptions(chat_template=template))
    assert out.chat_template == "custom"
    for ids in out.dataset["prompt_input_ids"]:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(out.dataset[0]["prompt_input_ids"], skip_special_tokens=True) == \
        "User: Once upon a time, there was a little girl.\nAssistant:"
    assert tok.decode(out.dataset[0]["chosen_input_ids"], skip_special_tokens=True) == "She was happy and smiled."


def test_template_from_a_jinja_file_and_the_off_switch(tmp_path):
    tok = build_tokenizer("gpt2", chat_template="chatml")
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}Q: {{ m['content'] }}{% endfor %} A:")
    out = tokenize_pairs(pairs(STORY_ROWS[:1]), tok, DataOptions(chat_template=str(path)))
    assert tok.decode(out.dataset[0]["prompt_input_ids"]) == "Q: Once upon a time, there was a little girl. A:"
    plain = tokenize_pairs(pairs(STORY_ROWS[:1]), tok, DataOptions(chat_template="none"))
    assert plain.chat_template == "none" and plain.dataset[0]["prompt_input_ids"] == tok(STORY_ROWS[0][0])["input_ids"]
    with pytest.raises(ConfigError, match="does not exist"):
        tokenize_pairs(pairs(STORY_ROWS[:1]), tok, DataOptions(chat_template=str(tmp_path / "missing.jinja")))
    with pytest.raises(ConfigError, match="auto, none, a Jinja template string"):
        tokenize_pairs(pairs(STORY_ROWS[:1]), tok, DataOptions(chat_template="chatml-please"))


def test_a_template_that_fails_names_the_row():
    tok = build_tokenizer("gpt2", chat_template="{% if messages|length > 0 %}{{ raise_exception('no system') }}{% endif %}")
    with pytest.raises(DataError) as err:
        tokenize_pairs(pairs(STORY_ROWS), tok, DataOptions(), source="pairs.jsonl")
    assert (err.value.file, err.value.row, err.value.field) == ("pairs.jsonl", 1, "prompt_messages")
    assert "no system" in str(err.value) and "--chat-template none" in str(err.value)


def test_truncation_left_for_prompts_right_for_responses():
    tok = build_tokenizer("stories260k")
    long_prompt = "Once upon a time there was a dog. " * 3
    long_reply = " The dog ran and ran and ran and ran in the big green park all day long."
    rows = [(long_prompt, long_reply, " No."), ("Hi.", " Yes.", " No.")]
    opts = DataOptions(max_length=40, max_prompt_length=12)
    out = tokenize_pairs(pairs(rows), tok, opts)
    assert out.stats | {"dropped": None, "invalid_rows": None} == {
        "rows_in": 2, "rows": 2, "prompt_truncated": 1, "chosen_truncated": 1, "rejected_truncated": 0,
        "boundary_retokenized": 0, "dropped": None, "invalid_rows": None}
    first = out.dataset[0]
    full_prompt = tok(long_prompt)["input_ids"]
    assert first["prompt_input_ids"] == [tok.bos_token_id] + full_prompt[-11:]  # BOS kept, cut from the left
    chosen = first["chosen_input_ids"]
    assert len(first["prompt_input_ids"]) + len(chosen) == 40 and chosen[-1] == tok.eos_token_id
    untruncated = tok(long_prompt + long_reply)["input_ids"][len(full_prompt):]
    assert chosen[:-1] == untruncated[: len(chosen) - 1]  # cut from the right
    assert out.dataset[1]["prompt_input_ids"] == tok("Hi.")["input_ids"]


def test_responses_identical_after_truncation_are_invalid():
    tok = build_tokenizer("gpt2")
    rows = [("Q:", " the same long start, then A", " the same long start, then B")]
    with pytest.raises(DataError, match="row 1, field 'rejected': chosen and rejected have the same tokens"):
        tokenize_pairs(pairs(rows), tok, DataOptions(max_length=6, max_prompt_length=2))


def test_eos_comes_from_the_tokenizer_and_is_not_doubled():
    tok = build_tokenizer("gpt2")
    out = tokenize_pairs(pairs([("Q:", " yes<|endoftext|>", " no")]), tok, DataOptions())
    assert out.dataset[0]["chosen_input_ids"] == tok(" yes")["input_ids"] + [50256]
    stories = build_tokenizer("stories260k")
    out = tokenize_pairs(pairs([("Q:", " yes", " no")]), stories, DataOptions())
    assert out.dataset[0]["rejected_input_ids"][-1] == stories.eos_token_id == 2


def test_pad_token_assigned_and_no_eos_refused():
    tok = build_tokenizer("gpt2")
    tok.pad_token = None
    tokenize_pairs(pairs(STORY_ROWS[:1]), tok, DataOptions())
    assert tok.pad_token_id == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(SepoError, match="no EOS token"):
        tokenize_pairs(pairs(STORY_ROWS[:1]), tok, DataOptions())


def test_worker_processes_give_the_same_ids():
    tok = build_tokenizer("gpt2")
    rows = pairs(STORY_ROWS * 4)
    one = tokenize_pairs(rows, tok, DataOptions()).dataset
    two = tokenize_pairs(rows, tok, DataOptions(num_proc=2)).dataset
    assert one["chosen_input_ids"] == two["chosen_input_ids"] and one["prompt_input_ids"] == two["prompt_input_ids"]


def test_pairs_with_text_prompts_only():
    tok = build_tokenizer("gpt2", chat_template="chatml")
    rows = datasets.Dataset.from_dict({"prompt": ["Hi?", "Yo?"], "chosen": ["Hello.", "Hey."], "rejected": ["Go.", "Hey."]})
    out = tokenize_pairs(rows, tok, DataOptions(on_invalid="skip"))
    assert tok.decode(out.dataset[0]["prompt_input_ids"]) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert out.stats["dropped"] == {"identical_responses": 1}
    with pytest.raises(DataError, match="data, row 2, field 'rejected'"):
        tokenize_pairs(rows, tok, DataOptions())
    with pytest.raises(SepoError, match="lacks chosen"):
        tokenize_pairs(rows.remove_columns("chosen"), tok, DataOptions())


def test_tokenize_pairs_refuses_when_every_row_is_dropped():
    from sepo.models import load_tokenizer

    # the responses differ only after where max_length cuts them
    rows = datasets.Dataset.from_list([{"prompt": "A long question " * 10, "chosen": " Yes, sure.",
                                        "rejected": " Yes, no."}])
    with pytest.raises(DataError, match="no usable rows after tokenization") as err:
        tokenize_pairs(rows, load_tokenizer("stories260k"), DataOptions(max_length=4, on_invalid="skip"),
                       source="q.jsonl")
    assert err.value.file == "q.jsonl" and "raise --max-length" in err.value.hint
