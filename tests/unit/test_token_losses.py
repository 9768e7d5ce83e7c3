"""The token-level losses of sepo.core.token_losses against values computed by hand (arithmetic in each
docstring), which tokens each one sends gradient to, and against transcriptions of the authors' code on random
inputs (TGDPO, SparsePO / MaPO, selective DPO; each transcription cites repository, file and function).

The shared example is the one of test_losses.py, one pair, R = 3 (x = a padded slot whose value must be ignored):

    chosen_logps     [-1, -2, x=0]      weights [1, 1, 0]
    rejected_logps   [-2, -2, -2]       weights [1, 1, 1]
    ref_chosen       [-1.5, -1.5, x=9]  -> rho_w = log pi - log pi_ref = [0.5, -0.5]
    ref_rejected     [-1, -2, -1]       -> rho_l = [-1, 0, -1]
    selection        S_w = {0} [1, 0, 0],  S_l = {1, 2} [0, 1, 1]
    SePO, gamma = 2: r(y_w) = 2 * (-1) = -2, r(y_l) = 2 * (-2) = -4, -log sigma(2) = log(1 + e^-2) = 0.1269280
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sepo.core.losses import LOSSES, dpo_loss, sepo_loss, tdpo_loss
from sepo.core.token_losses import (
    TOKEN_LOSS_INPUTS,
    TOKEN_LOSSES,
    row_quantile,
    sdpo_loss,
    sparsepo_loss,
    tgdpo_loss,
)
from sepo.errors import SepoError

SEPO_LOSS = 0.1269280  # log(1 + e^-2)


def softplus(x: float) -> float:  # -log sigma(-x)
    return math.log1p(math.exp(x))


def example():
    return {
        "chosen_logps": torch.tensor([[-1.0, -2.0, 0.0]]),
        "rejected_logps": torch.tensor([[-2.0, -2.0, -2.0]]),
        "chosen_weights": torch.tensor([[1.0, 1.0, 0.0]]),
        "rejected_weights": torch.tensor([[1.0, 1.0, 1.0]]),
    }


REF = {"ref_chosen_logps": torch.tensor([[-1.5, -1.5, 9.0]]), "ref_rejected_logps": torch.tensor([[-1.0, -2.0, -1.0]])}
SELECTION = {"chosen_selection": torch.tensor([[1.0, 0.0, 0.0]]), "rejected_selection": torch.tensor([[0.0, 1.0, 1.0]])}
KL = {"chosen_kl": torch.tensor([[0.1, 0.2, 5.0]]), "rejected_kl": torch.tensor([[0.5, 0.5, 0.5]])}


def call(name, pair=None, **kw):
    """The loss ``name`` on the example, given every input it declares in TOKEN_LOSS_INPUTS."""
    pair = pair or example()
    needs = TOKEN_LOSS_INPUTS[name]
    extra = {**(REF if "ref_logps" in needs else {}), **(SELECTION if "selection" in needs else {}),
             **(KL if "kl" in needs else {})}
    return TOKEN_LOSSES[name](*pair.values(), **{**extra, **kw})


# ------------------------------------------------------------------ the SePO variants, by hand


def test_sepo_dpo_anchor_on_all_and_on_unselected_tokens():
    """gamma = 2, beta = 0.5, lambda = 1.
    all tokens: h = (0.5 - 0.5) - (-1 + 0 - 1) = 2, -log sigma(1) = 0.3132617; L = 0.1269280 + 0.3132617 = 0.4401897.
    unselected (chosen {1}, rejected {0}): h = -0.5 - (-1) = 0.5, -log sigma(0.25) = 0.5759394; L = 0.7028674.
    lambda = 0.5, all: 0.1269280 + 0.1566308 = 0.2835588. Rewards are SePO's: -2 and -4."""
    out = call("sepo_dpo", gamma=2.0, beta=0.5)
    assert_close(out.losses, torch.tensor([0.4401897]))
    assert_close((out.chosen_rewards, out.rejected_rewards), (torch.tensor([-2.0]), torch.tensor([-4.0])))
    assert_close(call("sepo_dpo", gamma=2.0, beta=0.5, anchor_tokens="unselected").losses, torch.tensor([0.7028674]))
    assert_close(call("sepo_dpo", gamma=2.0, beta=0.5, anchor_weight=0.5).losses, torch.tensor([0.2835588]))


def test_sepo_kl_token_mean_of_the_kl_on_the_anchor_tokens():
    """gamma = 2, lambda = 1. KL chosen [0.1, 0.2, x=5], rejected [0.5, 0.5, 0.5].
    unselected: P(y_w) = 0.2 (token 1), P(y_l) = 0.5 (token 0); L = 0.1269280 + 0.7 = 0.8269280.
    all: P(y_w) = (0.1 + 0.2) / 2 = 0.15, P(y_l) = 0.5; L = 0.1269280 + 0.65 = 0.7769280.
    lambda = 2, unselected: 0.1269280 + 1.4 = 1.5269280."""
    assert_close(call("sepo_kl", gamma=2.0).losses, torch.tensor([0.8269280]))
    assert_close(call("sepo_kl", gamma=2.0, anchor_tokens="all").losses, torch.tensor([0.7769280]))
    assert_close(call("sepo_kl", gamma=2.0, anchor_weight=2.0).losses, torch.tensor([1.5269280]))


def test_sepo_logratio_squared_log_ratio_on_the_anchor_tokens():
    """gamma = 2, lambda = 1. k = rho^2 / 2: chosen token 1: 0.125; rejected token 0: 0.5 (token 1: 0, token 2: 0.5).
    unselected: L = 0.1269280 + 0.125 + 0.5 = 0.7519280.
    all: P(y_w) = (0.125 + 0.125) / 2 = 0.125, P(y_l) = (0.5 + 0 + 0.5) / 3 = 1/3; L = 0.1269280 + 0.4583333 = 0.5852613."""
    assert_close(call("sepo_logratio", gamma=2.0).losses, torch.tensor([0.7519280]))
    assert_close(call("sepo_logratio", gamma=2.0, anchor_tokens="all").losses, torch.tensor([0.5852613]))


def test_sepo_nll_and_sepo_margin():
    """gamma = 2. nll, alpha = 2: the chosen token-mean NLL is (1 + 2) / 2 = 1.5; L = 0.1269280 + 3 = 3.1269280.
    margin 1: -log sigma(-2 + 4 - 1) = log(1 + e^-1) = 0.3132617; margin 0 is SePO: 0.1269280."""
    assert_close(call("sepo_nll", gamma=2.0, alpha=2.0).losses, torch.tensor([3.1269280]))
    assert_close(call("sepo_margin", gamma=2.0, margin=1.0).losses, torch.tensor([0.3132617]))
    assert_close(call("sepo_margin", gamma=2.0, margin=0.0).losses, torch.tensor([SEPO_LOSS]))


def test_soft_selection_is_a_weighted_token_mean():
    """Soft selection chosen [0.5, 1, x=1], rejected [1, 0, 0]; gamma = 1, margin 0:
    r(y_w) = (0.5 (-1) + 1 (-2)) / 1.5 = -5/3 (the padded slot's weight is cut by the response weights),
    r(y_l) = -2; L = -log sigma(1/3) = log(1 + e^(-1/3)) = 0.5403056."""
    soft = {"chosen_selection": torch.tensor([[0.5, 1.0, 1.0]]), "rejected_selection": torch.tensor([[1.0, 0.0, 0.0]])}
    out = call("sepo_margin", margin=0.0, **soft)
    assert_close(out.chosen_rewards, torch.tensor([-5 / 3]))
    assert_close(out.losses, torch.tensor([0.5403056]))


@pytest.mark.parametrize("name,off", [("sepo_dpo", {"anchor_weight": 0.0}), ("sepo_kl", {"anchor_weight": 0.0}),
                                      ("sepo_logratio", {"anchor_weight": 0.0}), ("sepo_nll", {"alpha": 0.0}),
                                      ("sepo_margin", {"margin": 0.0})])
def test_one_hot_selection_reproduces_the_hard_sepo_loss_exactly(name, off):
    """With its extra term switched off, each variant on a 0/1 selection (float weights or a bool mask) is bit for
    bit SePO trained on that mask (``core.losses.sepo_loss`` with the mask as its weights), on random inputs."""
    g = torch.Generator().manual_seed(0)
    pair = {"chosen_logps": -torch.rand(4, 7, generator=g) * 3, "rejected_logps": -torch.rand(4, 7, generator=g) * 3,
            "chosen_weights": torch.ones(4, 7), "rejected_weights": torch.ones(4, 7)}
    pair["chosen_weights"][:, 5:] = 0  # padding
    mask_w = (torch.rand(4, 7, generator=g) < 0.4) | (torch.arange(7) == 0)  # at least one key token
    mask_l = (torch.rand(4, 7, generator=g) < 0.4) | (torch.arange(7) == 1)
    mask_w[:, 5:] = False
    hard = sepo_loss(pair["chosen_logps"], pair["rejected_logps"], mask_w.float(), mask_l.float(), gamma=1.5)
    extra = {}
    if "ref_logps" in TOKEN_LOSS_INPUTS[name]:
        extra = {"ref_chosen_logps": -torch.rand(4, 7, generator=g), "ref_rejected_logps": -torch.rand(4, 7, generator=g)}
    if "kl" in TOKEN_LOSS_INPUTS[name]:
        extra = {"chosen_kl": torch.rand(4, 7, generator=g), "rejected_kl": torch.rand(4, 7, generator=g)}
    for selection in ((mask_w.float(), mask_l.float()), (mask_w, mask_l)):
        out = TOKEN_LOSSES[name](*pair.values(), chosen_selection=selection[0], rejected_selection=selection[1],
                                 gamma=1.5, **extra, **off)
        assert torch.equal(out.losses, hard.losses) and torch.equal(out.chosen_rewards, hard.chosen_rewards)


def gradients(name, **kw):
    """Gradient of the loss w.r.t. each token's log-prob (and KL), on the example with token-level leaves."""
    pair = example()
    leaves = {k: pair[k].clone().requires_grad_() for k in ("chosen_logps", "rejected_logps")}
    kl = {k: v.clone().requires_grad_() for k, v in KL.items()}
    needs = TOKEN_LOSS_INPUTS[name]
    extra = {**(REF if "ref_logps" in needs else {}), **(kl if "kl" in needs else {})}
    TOKEN_LOSSES[name](leaves["chosen_logps"], leaves["rejected_logps"], pair["chosen_weights"],
                       pair["rejected_weights"], **SELECTION, **extra, **kw).loss.backward()
    grads = {k: v.grad for k, v in leaves.items()}
    if "kl" in needs:  # the KL is a function of the policy: its gradient reaches the policy through these
        grads = {"chosen_logps": grads["chosen_logps"] + kl["chosen_kl"].grad,
                 "rejected_logps": grads["rejected_logps"] + kl["rejected_kl"].grad}
    return grads


# which unselected tokens move: chosen token 1 and rejected token 0 are the unselected ones
@pytest.mark.parametrize("name,chosen_unselected,rejected_unselected", [
    ("sepo_dpo", True, True), ("sepo_kl", True, True), ("sepo_logratio", True, True),
    ("sepo_nll", True, False), ("sepo_margin", False, False)])
def test_which_tokens_receive_gradient(name, chosen_unselected, rejected_unselected):
    """The anchored variants reach the unselected tokens; sepo_nll only the chosen response's; sepo_margin, like bare
    SePO, none of them. Every variant moves the selected tokens, and padding never."""
    g = gradients(name)
    assert g["chosen_logps"][0, 0] != 0 and (g["rejected_logps"][0, 1:] != 0).all()  # the selected tokens
    assert (g["chosen_logps"][0, 1] != 0) == chosen_unselected
    assert (g["rejected_logps"][0, 0] != 0) == rejected_unselected
    assert g["chosen_logps"][0, 2] == 0  # padding
    # bare SePO, for contrast: nothing outside the selection
    logps = example()["chosen_logps"].requires_grad_()
    sepo_loss(logps, example()["rejected_logps"], SELECTION["chosen_selection"],
              SELECTION["rejected_selection"]).loss.backward()
    assert logps.grad[0, 1] == 0


def test_sepo_kl_anchor_on_unselected_leaves_the_selected_tokens_kl_alone():
    """anchor_tokens='unselected': no gradient through the KL of a selected token; 'all': through every token's."""
    for anchor, chosen_selected_kl_grad in (("unselected", False), ("all", True)):
        kl = {k: v.clone().requires_grad_() for k, v in KL.items()}
        TOKEN_LOSSES["sepo_kl"](*example().values(), **SELECTION, **kl, anchor_tokens=anchor).loss.backward()
        assert (kl["chosen_kl"].grad[0, 0] != 0) == chosen_selected_kl_grad
        assert kl["chosen_kl"].grad[0, 1] != 0 and kl["chosen_kl"].grad[0, 2] == 0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(SepoError, match="reference"):
        TOKEN_LOSSES["sepo_dpo"](*example().values(), **SELECTION)
    with pytest.raises(SepoError, match="anchor_tokens"):
        call("sepo_kl", anchor_tokens="selected")
    # An empty selection is refused once, when `sepo train` loads its data (train_data.check_pairs), not per call
    # (sepo.core.losses' precondition): here the selected mean is 0, so is the chosen reward.
    out = call("sepo_nll", chosen_selection=torch.tensor([[0.0, 0.0, 1.0]]))  # only the padded slot
    assert out.chosen_rewards.tolist() == [0.0] and torch.isfinite(out.losses).all()
    with pytest.raises(SepoError, match="both chosen_kl_mask and rejected_kl_mask"):
        sparsepo_loss(*example().values(), **REF, **KL, chosen_reward_mask=torch.ones(1, 3),
                      rejected_reward_mask=torch.ones(1, 3), chosen_kl_mask=torch.ones(1, 3))


def test_what_each_loss_reads_comes_from_its_signature():
    """TOKEN_LOSS_INPUTS is read off the signatures (one source of truth): each loss's inputs as docs/losses.md lists
    them, the first four arguments those of every loss, and no name shadows a loss of core.losses."""
    assert set(TOKEN_LOSSES) == set(TOKEN_LOSS_INPUTS) and not set(TOKEN_LOSSES) & set(LOSSES)
    assert {
        "sepo_dpo": {"selection", "ref_logps"}, "sepo_kl": {"selection", "kl"},
        "sepo_logratio": {"selection", "ref_logps"}, "sepo_nll": {"selection"}, "sepo_margin": {"selection"},
        "tgdpo": {"ref_logps", "token_rewards"}, "sparsepo": {"ref_logps", "kl", "token_masks"}, "sdpo": {"ref_logps"}} == TOKEN_LOSS_INPUTS
    for fn in TOKEN_LOSSES.values():
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["chosen_logps", "rejected_logps", "chosen_weights", "rejected_weights"]


# ------------------------------------------------------------------ TGDPO


def test_tgdpo_by_hand_and_alpha_zero_is_dpo():
    """beta = 0.5, alpha = 0.5; r_hat chosen [0.4, -0.2, x=7], rejected [0.2, -0.4, 1].
    chosen:   0.5 [(1 + 0.2)(0.5) + (1 - 0.1)(-0.5)] = 0.5 (0.6 - 0.45) = 0.075
    rejected: 0.5 [(1 - 0.1)(-1) + (1 + 0.2)(0) + (1 - 0.5)(-1)] = 0.5 (-0.9 - 0.5) = -0.7
    z = 0.775, L = log(1 + e^-0.775) = 0.3789184; rewards (DPO's): 0.5 * 0 = 0 and 0.5 * (-2) = -1.
    alpha = 0: z = 0.5 * 2 = 1, DPO's 0.3132617."""
    rewards = {"chosen_token_rewards": torch.tensor([[0.4, -0.2, 7.0]]),
               "rejected_token_rewards": torch.tensor([[0.2, -0.4, 1.0]])}
    out = tgdpo_loss(*example().values(), **REF, **rewards, beta=0.5, alpha=0.5)
    assert_close(out.losses, torch.tensor([0.3789184]))
    assert_close((out.chosen_rewards, out.rejected_rewards), (torch.tensor([0.0]), torch.tensor([-1.0])))
    plain = tgdpo_loss(*example().values(), **REF, **rewards, beta=0.5, alpha=0.0)
    assert_close(plain.losses, dpo_loss(*example().values(), **REF, beta=0.5).losses)


def random_pairs(seed: int, b: int = 5, r: int = 9, vocab: int = 11):
    """Random policy / reference / oracle logits over a vocabulary, labels and right padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, r + 1, (2, b), generator=g)
    mask = torch.arange(r)[None, None] < lengths[..., None]  # (2, B, R): chosen, rejected
    labels = torch.randint(0, vocab, (2, b, r), generator=g)
    logits = {who: torch.randn(2, b, r, vocab, generator=g) * 2 for who in ("policy", "ref", "oracle")}
    return mask, labels, logits


def token_logps(logits, labels):
    return logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)


def test_tgdpo_equals_the_authors_formula_on_random_inputs():
    """Transcription of dvlab-research/TGDPO, src/llamafactory/train/tgdpo/trainer.py, CustomDPOTrainer.dpo_loss
    (loss_type "sigmoid"), fed per-token log-probs already multiplied by the loss mask (get_batch_logps of
    src/llamafactory/train/trainer_utils.py): the token reward is beta (log pi_reward - log pi_ref) with the
    policy's beta, so sepo's oracle rewards are scored with the same beta here."""
    mask, labels, logits = random_pairs(1)
    beta, alpha = 0.3, 0.7
    lp = {who: token_logps(x, labels) * mask for who, x in logits.items()}  # (2, B, R), 0 on padding
    # -- the authors' sigmoid branch, per token then summed over the sequence
    ratio_w, ratio_l = lp["policy"][0] - lp["ref"][0], lp["policy"][1] - lp["ref"][1]
    reward_w, reward_l = lp["oracle"][0] - lp["ref"][0], lp["oracle"][1] - lp["ref"][1]
    official = -F.logsigmoid((beta * (1 + alpha * beta * reward_w) * ratio_w).sum(-1)
                             - (beta * (1 - alpha * beta * reward_l) * ratio_l).sum(-1))
    # -- sepo: r_hat as `sepo score` writes it, beta (log pi_oracle - log pi_ref)
    w = mask.float()
    out = tgdpo_loss(lp["policy"][0], lp["policy"][1], w[0], w[1], lp["ref"][0], lp["ref"][1],
                     chosen_token_rewards=beta * reward_w, rejected_token_rewards=beta * reward_l, beta=beta, alpha=alpha)
    assert_close(out.losses, official)
    assert_close(out.chosen_rewards, beta * ratio_w.sum(-1))


# ------------------------------------------------------------------ SparsePO


def test_sparsepo_by_hand_with_its_l1_penalty():
    """beta = 0.5; common mask m chosen [1, 0.5, x], rejected [0, 1, 0.5]; KL chosen [0.1, 0.2, x], rejected 0.5s.
    u = (1 (0.5) + 0.5 (-0.5)) - (0 (-1) + 1 (0) + 0.5 (-1)) = 0.25 + 0.5 = 0.75
    D_w = 0.1 + 0.5 (0.2) = 0.2, D_l = 0 + 0.5 + 0.25 = 0.75, delta = D_l - D_w = 0.55
    L = -log sigma(0.5 (0.75 - 0.55)) = log(1 + e^-0.1) = 0.6443967
    rewards: 0.5 (0.25 - 0.2) = 0.025 and 0.5 (-0.5 - 0.75) = -0.625.
    L1, common mask, lambda_u = lambda_d = 0.1: (0.1 + 0.1) / 2 (1.5 + 1.5) = 0.3 -> 0.9443967.
    The same masks passed as separate reward and KL masks: 0.1 (3) + 0.1 (3) = 0.6 -> 1.2443967."""
    masks = {"chosen_reward_mask": torch.tensor([[1.0, 0.5, 9.0]]),
             "rejected_reward_mask": torch.tensor([[0.0, 1.0, 0.5]])}
    out = sparsepo_loss(*example().values(), **REF, **KL, **masks, beta=0.5)
    assert_close(out.losses, torch.tensor([0.6443967]))
    assert_close((out.chosen_rewards, out.rejected_rewards), (torch.tensor([0.025]), torch.tensor([-0.625])))
    penalised = sparsepo_loss(*example().values(), **REF, **KL, **masks, beta=0.5, l1_reward=0.1, l1_kl=0.1)
    assert_close(penalised.losses, torch.tensor([0.9443967]))
    independent = sparsepo_loss(*example().values(), **REF, **KL, **masks, chosen_kl_mask=masks["chosen_reward_mask"],
                                rejected_kl_mask=masks["rejected_reward_mask"], beta=0.5, l1_reward=0.1, l1_kl=0.1)
    assert_close(independent.losses, torch.tensor([1.2443967]))


def test_sparsepo_with_masks_of_ones_is_tdpo1():
    ones = {"chosen_reward_mask": torch.ones(1, 3), "rejected_reward_mask": torch.ones(1, 3)}
    out = sparsepo_loss(*example().values(), **REF, **KL, **ones, beta=0.5)
    assert_close(out.losses, tdpo_loss(*example().values(), **REF, **KL, beta=0.5, variant=1).losses)


@pytest.mark.parametrize("independent", [False, True])
def test_sparsepo_equals_the_authors_formula_on_random_inputs(independent):
    """Transcription of huawei-noah/HEBO, SparsePO/src/trainers/sparse_trainer.py,
    SparseTrainer.get_batch_loss_metrics (mask_on_reward and mask_on_kl; rw_kl_independent False halves both L1
    weights in __init__), with the per-token "kl" there = sum_v pi_ref (log pi - log pi_ref) over the vocabulary;
    and of MAPOTrainer.mapo_loss (SparsePO/src/trainers/mapo_trainer.py): one activation mask, no L1."""
    mask, labels, logits = random_pairs(2)
    g = torch.Generator().manual_seed(3)
    rw_mask = torch.rand(2, *mask.shape[1:], generator=g)  # (2, B, R) chosen, rejected
    kl_mask = torch.rand(2, *mask.shape[1:], generator=g) if independent else rw_mask
    beta, l1_u, l1_d = 0.8, 0.01, 0.02
    # -- the authors' computation
    pol_vocab, ref_vocab = logits["policy"].log_softmax(-1), logits["ref"].log_softmax(-1)
    pol_tok, ref_tok = token_logps(logits["policy"], labels), token_logps(logits["ref"], labels)
    reward = (rw_mask * (pol_tok - ref_tok) * mask).sum(-1)  # (2, B)
    token_kl = (ref_vocab.exp() * (pol_vocab - ref_vocab)).sum(-1)  # (2, B, R), = -KL(pi_ref || pi)
    kl = (kl_mask * token_kl * mask).sum(-1)
    official = -F.logsigmoid(beta * ((reward[0] - reward[1]) - (kl[0] - kl[1])))
    scale_u, scale_d = (l1_u, l1_d) if independent else (l1_u / 2, l1_d / 2)
    official = official + scale_u * (rw_mask * mask).abs().sum(-1).sum(0) + scale_d * (kl_mask * mask).abs().sum(-1).sum(0)
    # -- sepo: KL(pi_ref || pi) per position, masks as inputs
    w = mask.float()
    kl_masks = {"chosen_kl_mask": kl_mask[0], "rejected_kl_mask": kl_mask[1]} if independent else {}
    out = sparsepo_loss(pol_tok[0], pol_tok[1], w[0], w[1], ref_tok[0], ref_tok[1], chosen_kl=-token_kl[0],
                        rejected_kl=-token_kl[1], chosen_reward_mask=rw_mask[0], rejected_reward_mask=rw_mask[1],
                        **kl_masks, beta=beta, l1_reward=l1_u, l1_kl=l1_d)
    assert_close(out.losses, official)
    assert_close(out.chosen_rewards, beta * (reward[0] + kl[0]))  # the authors' chosen_rewards
    if not independent:  # MaPO: mapo_loss with the mask as the activation mask, no penalty
        mapo = -F.logsigmoid(beta * ((reward[0] - reward[1]) - (kl[0] - kl[1])))
        out = sparsepo_loss(pol_tok[0], pol_tok[1], w[0], w[1], ref_tok[0], ref_tok[1], chosen_kl=-token_kl[0],
                            rejected_kl=-token_kl[1], chosen_reward_mask=rw_mask[0], rejected_reward_mask=rw_mask[1],
                            beta=beta)
        assert_close(out.losses, mapo)


# ------------------------------------------------------------------ selective DPO


def test_sdpo_by_hand():
    """beta = 0.5, quantile 0.6.
    chosen a = ref - pi = [-0.5, 0.5]: rank 0.6 (2 - 1) = 0.6, tau = -0.5 + 0.6 (1) = 0.1 -> keeps token 1 (rho -0.5).
    rejected a = pi - ref = [-1, 0, -1], sorted [-1, -1, 0]: rank 1.2, tau = -1 + 0.2 (1) = -0.8 -> keeps token 1 (rho 0).
    h = -0.5 - 0 = -0.5, L = -log sigma(-0.25) = log(1 + e^0.25) = 0.8259394; rewards 0.5 (-0.5) = -0.25 and 0.
    Only the kept tokens receive gradient.
    quantile 0.5: chosen tau = 0 (token 1); rejected rank 1 lands on a value, tau = -1, and a_t >= tau keeps all
    three (rho sum -2): h = -0.5 + 2 = 1.5, L = log(1 + e^-0.75) = 0.3868710."""
    pair = example()
    logps = pair["chosen_logps"].clone().requires_grad_()
    rejected = pair["rejected_logps"].clone().requires_grad_()
    out = sdpo_loss(logps, rejected, pair["chosen_weights"], pair["rejected_weights"], **REF, beta=0.5, quantile=0.6)
    assert_close(out.losses, torch.tensor([0.8259394]))
    assert_close((out.chosen_rewards, out.rejected_rewards), (torch.tensor([-0.25]), torch.tensor([0.0])))
    out.loss.backward()
    assert logps.grad[0].ne(0).tolist() == [False, True, False]
    assert rejected.grad[0].ne(0).tolist() == [False, True, False]
    median = sdpo_loss(*pair.values(), **REF, beta=0.5, quantile=0.5)
    assert_close(median.losses, torch.tensor([0.3868710]))


def test_row_quantile_is_torch_quantile_per_row():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(6, 10, generator=g)
    valid = torch.rand(6, 10, generator=g) < 0.7
    valid[0] = False  # an empty row
    valid[1, :] = False
    valid[1, 3] = True  # a single entry
    for q in (0.0, 0.25, 0.6, 1.0):
        got = row_quantile(values, valid, q)
        assert got[0] == float("-inf")
        for i in range(1, 6):
            assert_close(got[i], torch.quantile(values[i][valid[i]], q))


@pytest.mark.parametrize("quantile,smoothing", [(0.6, 0.0), (0.3, 0.1)])
def test_sdpo_equals_the_authors_formula_on_random_inputs(quantile, smoothing):
    """Transcription of Dongzhijin/SDPO, trl/trl/trainer/dpo_trainer.py: DPOTrainer.mask_unimportant_tokens (a
    per-sequence torch.quantile of the scores over the tokens whose log-prob is not 0, keep score >= it) followed
    by the "sdpo" branch of dpo_loss (the label-smoothed sigmoid) on the kept log-prob sums."""
    mask, labels, logits = random_pairs(5)
    lp = {who: token_logps(x, labels) * mask for who, x in logits.items()}
    beta = 0.2

    def mask_unimportant(pol_w, pol_l, ref_w, ref_l):
        scores_w = (ref_w - pol_w).masked_fill(pol_w == 0, float("-inf"))
        scores_l = (pol_l - ref_l).masked_fill(pol_l == 0, float("-inf"))
        sums = []
        for pol, ref, scores in ((pol_w, ref_w, scores_w), (pol_l, ref_l, scores_l)):
            tau = torch.stack([torch.quantile(s[s > float("-inf")], quantile) for s in scores])
            keep = scores >= tau[:, None]
            sums += [(pol * keep).sum(-1), (ref * keep).sum(-1)]
        return sums  # policy chosen, ref chosen, policy rejected, ref rejected

    pw, rw, pl, rl = mask_unimportant(lp["policy"][0], lp["policy"][1], lp["ref"][0], lp["ref"][1])
    logits_ = (pw - pl) - (rw - rl)
    official = -F.logsigmoid(beta * logits_) * (1 - smoothing) - F.logsigmoid(-beta * logits_) * smoothing
    w = mask.float()
    out = sdpo_loss(lp["policy"][0], lp["policy"][1], w[0], w[1], lp["ref"][0], lp["ref"][1], beta=beta,
                    quantile=quantile, label_smoothing=smoothing)
    assert_close(out.losses, official)
    assert_close((out.chosen_rewards, out.rejected_rewards), (beta * (pw - rw), beta * (pl - rl)))
