"""Preference data: read any source, normalise it to canonical pairs, tokenize with an exact boundary.

    raw = load_preference_data("hh-rlhf/test.jsonl.gz", DataOptions())          # text pairs + format
    tokenized = tokenize_pairs(raw.dataset, tokenizer, DataOptions())          # + token id columns
    pairs, metadata = load_pairs("runs/pairs-or-any-source", tokenizer, DataOptions())   # what stages call

See docs/data.md for formats, the boundary rule, truncation and validation.
"""

from sepo.data.columns import TOKEN_ALIGNED_COLUMNS, TOKEN_COLUMNS
from sepo.data.formats import REASONS, detect_format
from sepo.data.load import RawPairs, load_pairs, load_preference_data, pairs_metadata
from sepo.data.options import DataOptions
from sepo.data.subsets import shuffle, subset, train_eval_split
from sepo.data.tokenize import TokenizedPairs, tokenize_pairs

__all__ = [
    "REASONS",
    "TOKEN_ALIGNED_COLUMNS",
    "TOKEN_COLUMNS",
    "DataOptions",
    "RawPairs",
    "TokenizedPairs",
    "detect_format",
    "load_pairs",
    "load_preference_data",
    "pairs_metadata",
    "shuffle",
    "subset",
    "tokenize_pairs",
    "train_eval_split",
]
