"""Every loss of sepo.core.losses against values computed by hand (the arithmetic is in each docstring).

The shared example, one pair, R = 3 response slots (x = a padded slot whose value must be ignored):

    chosen_logps     [-1, -2, x=0]     weights [1, 1, 0]   -> log pi(y_w) = -3, token mean -1.5
    rejected_logps   [-2, -2, -2]      weights [1, 1, 1]   -> log pi(y_l) = -6, token mean -2
    ref_chosen       [-1.5, -1.5, x=9]                     -> log pi_ref(y_w) = -3
    ref_rejected     [-1, -2, -1]                          -> log pi_ref(y_l) = -4
    h = pi_logratios - ref_logratios = (-3 + 6) - (-3 + 4) = 2
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from sepo.core.losses import LOSSES
from sepo.core.objectives import (
    ALL_LOSSES,
    is_reference_free,
    needs_reference,
    needs_reference_logps,
    needs_reference_model,
    reads_selection,
    reads_token_rewards,
)
from sepo.errors import ConfigError, SepoError


def softplus(x: float) -> float:  # -log sigma(-x)... i.e. -log sigma(z) = softplus(-z)
    return math.log1p(math.exp(x))


@pytest.fixture
def pair():
    return {
        "chosen_logps": torch.tensor([[-1.0, -2.0, 0.0]]),
        "rejected_logps": torch.tensor([[-2.0, -2.0, -2.0]]),
        "chosen_weights": torch.tensor([[1.0, 1.0, 0.0]]),
        "rejected_weights": torch.tensor([[1.0, 1.0, 1.0]]),
    }


REF = {"ref_chosen_logps": torch.tensor([[-1.5, -1.5, 9.0]]), "ref_rejected_logps": torch.tensor([[-1.0, -2.0, -1.0]])}


def call(name, pair, **kw):
    extra = dict(REF) if needs_reference(name) else {}
    if name == "tdpo":
        extra |= {"chosen_kl": torch.tensor([[0.1, 0.2, 5.0]]), "rejected_kl": torch.tensor([[0.5, 0.5, 0.5]])}
    return LOSSES[name](pair["chosen_logps"], pair["rejected_logps"], pair["chosen_weights"], pair["rejected_weights"],
                        **extra, **kw)


def test_dpo_and_cdpo(pair):
    """beta = 0.5: beta h = 1, L = -log sigma(1) = log(1 + e^-1) = 0.3132617;
    rewards: chosen 0.5 (-3 + 3) = 0, rejected 0.5 (-6 + 4) = -1; accuracy 1, margin 1.
    cDPO eps = 0.1: 0.9 * 0.3132617 + 0.1 * log(1 + e^1) = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617."""
    out = call("dpo", pair, beta=0.5)
    assert_close(out.losses, torch.tensor([0.3132617]))
    assert_close(out.chosen_rewards, torch.tensor([0.0]))
    assert_close(out.rejected_rewards, torch.tensor([-1.0]))
    assert_close(out.accuracies, torch.tensor([1.0]))
    assert_close(out.margins, torch.tensor([1.0]))
    assert_close(call("dpo", pair, beta=0.5, label_smoothing=0.1).losses, torch.tensor([0.4132617]))


def test_ipo(pair):
    """beta = 0.5: (h - 1/(2 beta))^2 = (2 - 1)^2 = 1; beta = 0.25: (2 - 2)^2 = 0.
    length_normalize (TRL's form), beta = 0.5: ratio(y_w) / |y_w| = 0 / 2 = 0, ratio(y_l) / |y_l| = -2 / 3,
    h = 2/3, L = (2/3 - 1)^2 = 1/9; rewards 0 and 0.5 (-2/3) = -1/3."""
    assert_close(call("ipo", pair, beta=0.5).losses, torch.tensor([1.0]))
    assert_close(call("ipo", pair, beta=0.25).losses, torch.tensor([0.0]))
    out = call("ipo", pair, beta=0.5, length_normalize=True)
    assert_close(out.losses, torch.tensor([1 / 9]))
    assert_close((out.chosen_rewards, out.rejected_rewards), (torch.tensor([0.0]), torch.tensor([-1 / 3])))


def test_rdpo(pair):
    """beta = 0.5, eps = 0.1: [0.9 log(1 + e^-1) - 0.1 log(1 + e^1)] / 0.8 = (0.2819355 - 0.1313262) / 0.8 = 0.1882617."""
    assert_close(call("rdpo", pair, beta=0.5, label_smoothing=0.1).losses, torch.tensor([0.1882617]))
    with pytest.raises(SepoError, match="label_smoothing"):
        call("rdpo", pair, label_smoothing=0.5)


def test_rpo(pair):
    """beta = 0.5, alpha = 2: 0.3132617 + 2 * 1.5 (token-mean NLL of the chosen response) = 3.3132617."""
    assert_close(call("rpo", pair, beta=0.5, alpha=2.0).losses, torch.tensor([3.3132617]))


def test_simpo(pair):
    """beta = 2, gamma = 0.5: rewards 2 (-1.5) = -3 and 2 (-2) = -4; L = -log sigma(-3 + 4 - 0.5) = log(1 + e^-0.5)
    = 0.4740770."""
    out = call("simpo", pair, beta=2.0, gamma=0.5)
    assert_close(out.losses, torch.tensor([0.4740770]))
    assert_close(out.chosen_rewards, torch.tensor([-3.0]))
    assert_close(out.rejected_rewards, torch.tensor([-4.0]))


def test_rrhf(pair):
    """alpha = 1: p_w = -1.5 > p_l = -2 so the hinge is 0; L = 0 + 1.5 = 1.5.
    Swapped (p_w = -2, p_l = -1.5), alpha = 0.5: max(0, -1.5 + 2) + 0.5 * 2 = 1.5."""
    assert_close(call("rrhf", pair, alpha=1.0).losses, torch.tensor([1.5]))
    swapped = {"chosen_logps": pair["rejected_logps"], "rejected_logps": pair["chosen_logps"],
               "chosen_weights": pair["rejected_weights"], "rejected_weights": pair["chosen_weights"]}
    assert_close(call("rrhf", swapped, alpha=0.5).losses, torch.tensor([1.5]))


def test_rrhf_sum_is_the_papers_fine_tuning_term(pair):
    """sft_reduction="sum": L_ft = -log pi(y_w) = 1 + 2 = 3; alpha = 1: L = 0 + 3 = 3.
    Swapped, alpha = 0.5: max(0, -1.5 + 2) + 0.5 * 6 = 3.5."""
    assert_close(call("rrhf", pair, sft_reduction="sum").losses, torch.tensor([3.0]))
    swapped = {"chosen_logps": pair["rejected_logps"], "rejected_logps": pair["chosen_logps"],
               "chosen_weights": pair["rejected_weights"], "rejected_weights": pair["chosen_weights"]}
    assert_close(call("rrhf", swapped, alpha=0.5, sft_reduction="sum").losses, torch.tensor([3.5]))
    with pytest.raises(SepoError, match="sft_reduction"):
        call("rrhf", pair, sft_reduction="padded")


def test_tdpo1_and_tdpo2(pair):
    """Sequential KL: D(y_w) = 0.1 + 0.2 = 0.3 (the padded 5 ignored), D(y_l) = 1.5; beta = 0.5, u = h = 2.
    TDPO1: -log sigma(0.5 (2 - (1.5 - 0.3))) = log(1 + e^-0.4) = 0.5130153.
    TDPO2, alpha = 0.5: -log sigma(0.5 (2 - 0.5 (1.5 - 0.3))) = log(1 + e^-0.7) = 0.4031860.
    TDPO2 stops the gradient through D(y_w); TDPO1 does not."""
    assert_close(call("tdpo", pair, beta=0.5, variant=1).losses, torch.tensor([0.5130153]))
    assert_close(call("tdpo", pair, beta=0.5, variant=2, alpha=0.5).losses, torch.tensor([0.4031860]))
    for variant, grad_flows in ((1, True), (2, False)):
        kl = torch.tensor([[0.1, 0.2, 5.0]], requires_grad=True)
        logps = pair["chosen_logps"].clone().requires_grad_()
        out = LOSSES["tdpo"](logps, *list(pair.values())[1:], **REF, chosen_kl=kl,
                             rejected_kl=torch.tensor([[0.5, 0.5, 0.5]]), beta=0.5, variant=variant)
        out.loss.backward()
        assert (kl.grad is not None and bool(kl.grad.abs().sum() > 0)) == grad_flows


def test_sepo_selected_and_length_normalisation(pair):
    """Selection S_w = {0}, S_l = {1, 2}; gamma = 2.
    selected: means -1 and -2, rewards -2 and -4, L = log(1 + e^-2) = 0.1269280.
    length (|y_w| = 2, |y_l| = 3): -1/2 and -4/3, rewards -1 and -8/3, L = log(1 + e^(-5/3)) = 0.1730080."""
    sel = dict(pair, chosen_weights=torch.tensor([[1.0, 0.0, 0.0]]), rejected_weights=torch.tensor([[0.0, 1.0, 1.0]]))
    out = call("sepo", sel, gamma=2.0)
    assert_close(out.losses, torch.tensor([0.1269280]))
    assert_close(out.chosen_rewards, torch.tensor([-2.0]))
    assert_close(out.rejected_rewards, torch.tensor([-4.0]))
    out = call("sepo", sel, gamma=2.0, normalize="length", chosen_lengths=torch.tensor([2.0]),
               rejected_lengths=torch.tensor([3.0]))
    assert_close(out.losses, torch.tensor([0.1730080]))
    assert_close(out.rejected_rewards, torch.tensor([-8 / 3]))


def test_sepo_gradient_reaches_only_selected_tokens(pair):
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    rejected = torch.tensor([[-2.0, -2.0, -2.0]], requires_grad=True)
    out = LOSSES["sepo"](logps, rejected, torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0]]))
    out.loss.backward()
    assert logps.grad[0, 1] < 0 and logps.grad[0, 0] == 0 and logps.grad[0, 2] == 0  # raise the selected chosen token
    assert rejected.grad[0, 0] > 0 and rejected.grad[0, 1] == 0  # lower the selected rejected tokens


def test_sft(pair):
    """L = token-mean NLL of the chosen response = 1.5; rewards are token-mean log-probs -1.5 and -2."""
    out = call("sft", pair)
    assert_close(out.losses, torch.tensor([1.5]))
    assert_close(out.rejected_rewards, torch.tensor([-2.0]))
    out = LOSSES["sft"](pair["chosen_logps"], None, pair["chosen_weights"], None)  # training skips the rejected half
    assert_close(out.losses, torch.tensor([1.5]))


def test_batch_of_two_pairs_is_per_pair(pair):
    """Losses are per pair: a batch of the example and its swap gives both values in order (dpo, beta = 0.5):
    the swap has h = -2, L = log(1 + e^1) = 1.3132617."""
    two = {k: torch.cat([v, v]) for k, v in pair.items()}
    two["chosen_logps"] = torch.stack([pair["chosen_logps"][0], pair["rejected_logps"][0]])
    two["rejected_logps"] = torch.stack([pair["rejected_logps"][0], pair["chosen_logps"][0]])
    two["chosen_weights"] = torch.stack([pair["chosen_weights"][0], pair["rejected_weights"][0]])
    two["rejected_weights"] = torch.stack([pair["rejected_weights"][0], pair["chosen_weights"][0]])
    ref = {"ref_chosen_logps": torch.cat([REF["ref_chosen_logps"], REF["ref_rejected_logps"]]),
           "ref_rejected_logps": torch.cat([REF["ref_rejected_logps"], REF["ref_chosen_logps"]])}
    out = LOSSES["dpo"](*two.values(), **ref, beta=0.5)
    assert_close(out.losses, torch.tensor([0.3132617, 1.3132617]))
    assert out.metrics()["rewards/accuracy"] == 0.5


@pytest.mark.parametrize("name", [n for n in LOSSES if "beta" in inspect.signature(LOSSES[n]).parameters])
def test_beta_reaches_the_loss(name, pair):
    assert not torch.equal(call(name, pair, beta=0.1).losses, call(name, pair, beta=1.0).losses)


@pytest.mark.parametrize("name", [n for n in LOSSES if needs_reference(n)])
def test_a_reference_loss_without_reference_log_probs_is_an_error(name, pair):
    kl = {"chosen_kl": torch.zeros(1, 3), "rejected_kl": torch.zeros(1, 3)} if name == "tdpo" else {}
    with pytest.raises(SepoError, match="reference"):
        LOSSES[name](*pair.values(), **kl)


def test_an_empty_selection_gives_a_zero_mean_not_a_device_check(pair):
    """The losses do not check for an empty selection per call (train.check_pairs refuses it when the data is loaded);
    a response with no counted token has a mean log-prob of 0 and no gradient. sepo, gamma = 1, rejected empty:
    reward_w = -1.5, reward_l = 0, L = -log sigma(-1.5) = log(1 + e^1.5) = 1.7014132."""
    logps = pair["rejected_logps"].clone().requires_grad_()
    out = LOSSES["sepo"](pair["chosen_logps"], logps, pair["chosen_weights"], torch.zeros(1, 3))
    assert_close(out.losses, torch.tensor([1.7014132]))
    assert_close(out.rejected_rewards, torch.tensor([0.0]))
    out.losses.sum().backward()
    assert_close(logps.grad, torch.zeros(1, 3))


def test_each_loss_says_what_reference_it_needs():
    """Read off the signatures: one source of truth for the trainer and the pipeline."""
    assert [n for n in LOSSES if needs_reference(n)] == ["dpo", "ipo", "rdpo", "rpo", "tdpo"]
    assert [n for n in LOSSES if needs_reference_model(n)] == ["tdpo"]
    assert [n for n in LOSSES if is_reference_free(n)] == ["sft", "simpo", "rrhf", "sepo"]
    # the token-level losses: sepo_kl and sparsepo read the reference's whole distribution only (no cached log-probs
    # of their own, but a reference all the same); sepo_nll and sepo_margin never read one
    tokens = [n for n in ALL_LOSSES if n not in LOSSES]
    assert [n for n in tokens if needs_reference_logps(n)] == ["sepo_dpo", "sepo_logratio", "tgdpo", "sparsepo", "sdpo"]
    assert [n for n in tokens if needs_reference_model(n)] == ["sepo_kl", "sparsepo"]
    assert [n for n in tokens if is_reference_free(n)] == ["sepo_nll", "sepo_margin"]
    assert [n for n in ALL_LOSSES if reads_selection(n)] == ["sepo", "sepo_dpo", "sepo_kl", "sepo_logratio", "sepo_nll",
                                                              "sepo_margin"]
    assert [n for n in ALL_LOSSES if reads_token_rewards(n)] == ["tgdpo"]


def test_metric_sums_weight_each_pair(pair):
    """Two pairs (the example, dpo beta = 0.5: loss 0.3132617, rewards 0 and -1) with weights 1 and 0: the sums are
    the first pair's values; with weights 1 and 1 the loss sum doubles. metrics() are means, still tensors."""
    two = {k: torch.cat([v, v]) for k, v in pair.items()}
    ref = {k: torch.cat([v, v]) for k, v in REF.items()}
    out = LOSSES["dpo"](*two.values(), **ref, beta=0.5)
    assert_close(out.metric_sums(torch.tensor([1.0, 0.0])), torch.tensor([0.3132617, 0.0, -1.0, 1.0, 1.0]))
    assert_close(out.metric_sums()[0], torch.tensor(2 * 0.3132617))
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.metrics().values())


def test_train_config_routes_every_knob_and_refuses_ignored_ones():
    from sepo.stages.train import TrainConfig, loss_kwargs

    assert loss_kwargs(TrainConfig(loss="dpo", beta=0.3, label_smoothing=0.2)) == {"beta": 0.3, "label_smoothing": 0.2}
    assert loss_kwargs(TrainConfig(loss="sepo", gamma=3.0, sepo_normalize="length")) == {"gamma": 3.0,
                                                                                       "normalize": "length"}
    assert loss_kwargs(TrainConfig(loss="tdpo", tdpo_variant=1, alpha=0.2)) == {"variant": 1, "alpha": 0.2}
    with pytest.raises(ConfigError, match="gamma=2.0 has no effect on loss 'dpo'"):
        TrainConfig(loss="dpo", gamma=2.0)
    with pytest.raises(ConfigError, match="beta=0.1 has no effect on loss 'sepo'"):
        TrainConfig(loss="sepo", beta=0.1)
    with pytest.raises(ConfigError, match="choose one of: sft, dpo"):
        TrainConfig(loss="ppo")
