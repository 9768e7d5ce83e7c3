"""Tiny-model kit: random-initialised small models of real architectures with a real tokenizer, saved with
``save_pretrained`` so every stage loads them exactly as it loads a hub model.

    path = build_tiny_model("runs/tiny-llama", arch="llama", preset="tiny", tokenizer="gpt2")
    AutoModelForCausalLM.from_pretrained(path)

Tokenizers: ``"gpt2"`` (the GPT-2 BPE from the shared folder), ``"stories260k"`` (the 512-token
SentencePiece BPE bundled with sepo), a path to any tokenizer folder, or ``"bpe"`` (a byte-level BPE
trained with `tokenizers` on ``texts``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from sepo.errors import SepoError
from sepo.models import STORIES260K

# hidden, layers, heads, kv heads, mlp
PRESETS: dict[str, dict[str, int]] = {
    "micro": {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1, "mlp": 32},
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "mlp": 128},
    "small": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "mlp": 256},
    "base": {"hidden": 256, "layers": 6, "heads": 8, "kv_heads": 4, "mlp": 704},
    "medium": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "mlp": 1408},  # body-dominated (benchmarks)
}
ARCHITECTURES = ("llama", "qwen2", "gpt_neox")

# A minimal ChatML template, for tests of the chat-template path with tokenizers that ship none.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def shared_dir() -> Path:
    """The project's shared resources folder: $SEPO_SHARED, else a ``shared`` folder beside the checkout."""
    env = os.environ.get("SEPO_SHARED")
    candidates = [Path(env)] if env else []
    for base in (Path.cwd(), Path(__file__).resolve()):
        candidates += [p / "shared" for p in [base, *base.parents]] + [p.parent / "shared" for p in [base, *base.parents]]
    for c in candidates:
        if (c / "DESIGN.md").is_file() or (c / "tokenizers").is_dir():
            return c
    raise SepoError("shared resources folder not found; set SEPO_SHARED to the folder holding tokenizers/ and data/")


def build_tokenizer(kind: str = "gpt2", *, texts: Iterable[str] | None = None, vocab_size: int = 2000,
                    chat_template: str | None = None):
    """A real tokenizer (see module docstring) with a pad token, optionally with a chat template."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "gpt2":
        tok = AutoTokenizer.from_pretrained(str(shared_dir() / "tokenizers" / "gpt2"))
    elif kind == "stories260k":
        tok = AutoTokenizer.from_pretrained(str(STORIES260K))
    elif kind == "bpe":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if texts is None:
            raise SepoError("build_tokenizer('bpe') needs texts to train on")
        core = Tokenizer(models.BPE(unk_token=None))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        core.train_from_iterator(list(texts), trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                      bos_token="<|endoftext|>")
    elif Path(kind).exists():
        tok = AutoTokenizer.from_pretrained(kind)
    else:
        raise SepoError(f"unknown tokenizer kind '{kind}': use gpt2, stories260k, bpe or a folder path")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        tok.chat_template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template
    return tok


def tiny_config(arch: str, preset: str, vocab_size: int, *, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                max_positions: int = 1024):
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    if arch not in ARCHITECTURES:
        raise SepoError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise SepoError(f"unknown size preset '{preset}'; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                             num_attention_heads=p["heads"], intermediate_size=p["mlp"],
                             max_position_embeddings=max_positions, **special)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(vocab_size=vocab_size, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
               num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], intermediate_size=p["mlp"],
               max_position_embeddings=max_positions, tie_word_embeddings=True, **special)


def build_tiny_model(output_dir: str | os.PathLike, *, arch: str = "llama", preset: str = "tiny",
                     tokenizer="gpt2", seed: int = 0, chat_template: str | None = None) -> Path:
    """Build, randomly initialise (seeded) and save a model + tokenizer; returns the folder."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(tokenizer, chat_template=chat_template) if isinstance(tokenizer, str) else tokenizer
    cfg = tiny_config(arch, preset, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from sepo.models import transformers_progress

    with transformers_progress(False):  # a kit model is a few MB: no "Writing model shards" bar
        model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
