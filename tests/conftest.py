"""Shared fixtures: paths into ../shared, the bundled stories260K model, tiny kit models, toy pairs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sepo.models import STORIES260K
from sepo.testing import build_tiny_model, shared_dir

# Two cores on CI: one intra-op thread per test process keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("SEPO_TEST_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def hh_path(shared) -> Path:
    return shared / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


@pytest.fixture(scope="session")
def pandalm_path(shared) -> Path:
    return shared / "data" / "pandalm-testset" / "testset-v1.json"


@pytest.fixture(scope="session")
def llmbar_dir(shared) -> Path:
    return shared / "data" / "llmbar"


@pytest.fixture(scope="session")
def gpt2_tokenizer_path(shared) -> Path:
    return shared / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The real pretrained 260K TinyStories Llama bundled with the package."""
    return STORIES260K


@pytest.fixture(scope="session")
def tiny_llama_gpt2(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama with the real GPT-2 tokenizer (vocab 50,257)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-gpt2"), arch="llama", preset="tiny", tokenizer="gpt2")


@pytest.fixture(scope="session")
def tiny_llama_stories(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama sharing the stories260K tokenizer (512 tokens): a second model for
    oracle/reference or weak/strong pairs with the bundled model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-stories"), arch="llama", preset="tiny",
                            tokenizer="stories260k", seed=1)


STORY_PAIRS = [
    ("Once upon a time, there was a little girl.", " She was happy and smiled.", " She was sad and cried."),
    ("Tom had a big red ball.", " He played with his friend and they laughed.", " He lost it and felt angry."),
    ("The cat sat in the sun.", " It was warm and the cat loved it.", " It was hot and the cat was mad."),
    ("Lily went to the park.", " She saw a kind dog and gave it a hug.", " She fell down and hurt her knee."),
    ("One day, Ben found a box.", " Inside was a toy, and he was so glad.", " Inside was a bug, and he was scared."),
    ("Mom made a cake.", " Everyone ate it and said thank you.", " It fell on the floor and was ruined."),
]


def make_story_pairs_dataset(tokenizer, n: int | None = None):
    """Canonical tokenized pairs built directly (no data layer): for tests of later stages."""
    import datasets

    rows = STORY_PAIRS if n is None else (STORY_PAIRS * (n // len(STORY_PAIRS) + 1))[:n]
    eos = tokenizer.eos_token_id
    cols = {k: [] for k in ("index", "prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids",
                            "rejected_input_ids")}
    for i, (p, c, r) in enumerate(rows):
        cols["index"].append(i)
        cols["prompt"].append(p)
        cols["chosen"].append(c)
        cols["rejected"].append(r)
        cols["prompt_input_ids"].append(tokenizer(p)["input_ids"])
        cols["chosen_input_ids"].append(tokenizer(c, add_special_tokens=False)["input_ids"] + [eos])
        cols["rejected_input_ids"].append(tokenizer(r, add_special_tokens=False)["input_ids"] + [eos])
    return datasets.Dataset.from_dict(cols)


@pytest.fixture
def story_pairs(stories260k):
    from transformers import AutoTokenizer

    return make_story_pairs_dataset(AutoTokenizer.from_pretrained(str(stories260k)))
