"""AUROC (Mann-Whitney, ties 1/2) and a selection's precision with its base rate and ceiling, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sepo.core.metrics import auroc, selection_precision


def test_auroc_counts_pairs_and_ties_half():
    """keys score [3, 1, 1], others [1, 0]. Pairs (key, other): 3>1, 3>0, 1=1 (1/2), 1>0, 1=1 (1/2), 1>0
    -> (1 + 1 + 0.5 + 1 + 0.5 + 1) / (3 * 2) = 5 / 6."""
    scores = torch.tensor([3.0, 1.0, 0.0, 1.0, 1.0])
    labels = torch.tensor([True, True, False, True, False])
    assert_close(torch.tensor(auroc(scores, labels)), torch.tensor(5 / 6))


def test_auroc_extremes_chance_and_undefined():
    """Keys all above -> 1; all below -> 0; all scores equal -> every pair a tie -> 1/2; one class empty -> NaN."""
    labels = torch.tensor([True, True, False, False, False])
    assert auroc(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), labels) == 1.0
    assert auroc(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), labels) == 0.0
    assert auroc(torch.zeros(5), labels) == 0.5
    assert math.isnan(auroc(torch.ones(3), torch.zeros(3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([True, False]))


def test_auroc_matches_the_pairwise_definition_on_random_ties():
    """Against the O(n1 * n0) definition, on integer scores with many ties."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()
    labels = torch.rand(200, generator=g) < 0.3
    diff = scores[labels][:, None] - scores[~labels][None, :]
    expected = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
    assert_close(torch.tensor(auroc(scores, labels), dtype=torch.float64), expected)


def test_selection_precision_base_rate_ceiling_recall():
    """Response 1: n = 4, key [1, 1, 0, 0], selected [1, 0, 1, 0] -> k = 2, m = 2, tp = 1.
    Response 2: n = 6, key [0, 0, 0, 0, 0, 1], selected [1, 1, 1, 0, 0, 0] -> k = 3, m = 1, tp = 0.
    precision = 1 / 5 = 0.2; recall = 1 / 3; base rate = (2 * 2/4 + 3 * 1/6) / 5 = (1 + 0.5) / 5 = 0.3;
    ceiling = (min(2, 2) + min(3, 1)) / 5 = 3 / 5 = 0.6; key fraction 3 / 10; selected fraction 5 / 10."""
    key = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    selected = torch.tensor([1, 0, 1, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    q = selection_precision(selected, key, torch.tensor([4, 6]))
    assert_close(torch.tensor([q.precision, q.recall, q.base_rate, q.ceiling, q.key_fraction, q.selected_fraction]),
                 torch.tensor([0.2, 1 / 3, 0.3, 0.6, 0.3, 0.5]))
    assert (q.tokens, q.key_tokens, q.selected_tokens) == (10, 3, 5)


def test_selection_precision_undefined_ratios_are_nan():
    """Nothing selected: precision, base rate and ceiling undefined; no key token: recall undefined."""
    q = selection_precision(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), torch.tensor([3]))
    assert all(math.isnan(v) for v in (q.precision, q.base_rate, q.ceiling, q.recall))
    assert q.key_fraction == 0.0 and q.selected_fraction == 0.0
    with pytest.raises(ValueError, match="for 5 tokens"):
        selection_precision(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), torch.tensor([5]))
