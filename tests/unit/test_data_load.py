"""The checks of pairs against the model they are about to run through (sepo.data.load)."""

import pytest
from datasets import Dataset

from sepo.data.load import check_token_ids, vocabulary_size
from sepo.errors import SepoError


def _pairs(chosen_ids: list[list[int]]) -> Dataset:
    n = len(chosen_ids)
    return Dataset.from_dict({"prompt_input_ids": [[1, 2]] * n, "chosen_input_ids": chosen_ids,
                              "rejected_input_ids": [[3]] * n})


def test_ids_below_the_vocabulary_pass_and_the_first_row_past_it_is_named():
    """Vocabulary 10: ids 0..9 fit. Row 2 (1-based) holds 10 and row 3 holds 12: the message names the largest
    id (12) and the first row that has one outside (2)."""
    check_token_ids(_pairs([[4, 9], [5]]), 10, "policy", "m")
    with pytest.raises(SepoError, match=r"token id 12 in chosen_input_ids \(dataset row 2 is the first\) is outside "
                                        r"the policy m's vocabulary \(10 tokens\)"):
        check_token_ids(_pairs([[4, 9], [5, 10], [12]]), 10, "policy", "m")


def test_a_pad_token_the_model_has_no_embedding_for_is_refused():
    check_token_ids(_pairs([[1]]), 10, "reference", "r", pad_token_id=9)
    with pytest.raises(SepoError, match="pad token id 10 is outside the reference r's vocabulary"):
        check_token_ids(_pairs([[1]]), 10, "reference", "r", pad_token_id=10)


def test_the_vocabulary_comes_from_the_config_or_its_text_config():
    from transformers import LlamaConfig

    assert vocabulary_size(LlamaConfig(vocab_size=512)) == 512
    check_token_ids(_pairs([[10_000]]), None, "policy", "m")  # unknown vocabulary: nothing checked
