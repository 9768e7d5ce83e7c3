"""Token-level preference losses: SePO variants that stay anchored to the reference, TGDPO, SparsePO and
selective DPO. Pure functions over per-token log-probs, masks and weights, like ``sepo.core.losses``.

The first four arguments are those of every loss in ``sepo.core.losses``, all ``(B, R)`` on the response grid:

    chosen_logps, rejected_logps      log pi_theta(y_t | x, y_<t), fp32 (0 where not computed)
    chosen_weights, rejected_weights  1 = a real response token, 0 = padding (the response mask as floats)

Here the weights are the *whole response*: the token-level structure comes in as keyword-only (B, R) inputs,

    chosen_selection, rejected_selection          SePO's key tokens from ``sepo select``: the 0/1 mask or the
                                                  soft ``*_weights`` in [0, 1]
    chosen_token_rewards, rejected_token_rewards  the oracle's r_t (``sepo score``'s ``*_rewards`` columns)
    chosen_kl, rejected_kl                        KL(pi_ref(. | x, y_<t) || pi_theta(. | x, y_<t)) per position
    chosen_reward_mask, ...                       SparsePO's token masks (see ``sepo.core.token_masks``)

so one loss can weigh the selected and the unselected tokens differently. The reference log-probs
``ref_chosen_logps`` / ``ref_rejected_logps`` (B, R) are the 5th and 6th arguments, as in ``core.losses``.
Each returns a :class:`~sepo.core.losses.LossOutput`. ``TOKEN_LOSSES`` maps a name to its function and
``TOKEN_LOSS_INPUTS`` names what each one needs beyond the policy log-probs (docs/losses.md).

The SePO family shares SePO's contrast on the selected tokens S (Yang et al. 2024, arXiv 2408.13518; the
``sepo`` loss of ``core.losses``), a weighted token mean so a soft selection is a weighted average and a 0/1 one is SePO exactly:

    r(y) = gamma * sum_t s_t w_t log pi(y_t) / sum_t s_t w_t          (s = selection, w = weights)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sepo.core.losses import (
    LossOutput,
    _dpo_logits,
    _mean_logps,
    _require_reference,
    sequence_logps,
    signature_inputs,
)
from sepo.errors import SepoError

__all__ = ["TOKEN_LOSSES", "TOKEN_LOSS_INPUTS", "row_quantile", "sdpo_loss", "sepo_dpo_loss", "sepo_kl_loss",
           "sepo_logratio_loss", "sepo_margin_loss", "sepo_nll_loss", "sparsepo_loss", "tgdpo_loss"]

ANCHOR_TOKENS = ("all", "unselected")


# --------------------------------------------------------------------------- shared pieces


def _selected_rewards(chosen_logps, rejected_logps, chosen_weights, rejected_weights, chosen_selection,
                      rejected_selection, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SePO's rewards r(y_w), r(y_l) = gamma * (selection-weighted token mean of log pi), each (B,). A selection may
    be a bool mask or float weights."""
    chosen = gamma * _mean_logps(chosen_logps, chosen_weights * chosen_selection.to(chosen_weights.dtype))
    rejected = gamma * _mean_logps(rejected_logps, rejected_weights * rejected_selection.to(rejected_weights.dtype))
    return chosen, rejected


def _anchor_weights(weights: torch.Tensor, selection: torch.Tensor, anchor_tokens: str) -> torch.Tensor:
    """The tokens an anchor covers: every token, or the unselected ones (weight 1 - s_t for a soft selection)."""
    if anchor_tokens == "all":
        return weights
    if anchor_tokens == "unselected":
        return weights * (1.0 - selection.to(weights.dtype))
    raise SepoError(f"anchor_tokens must be one of {', '.join(ANCHOR_TOKENS)}, got {anchor_tokens!r}")


def _token_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t v_t / sum_t w_t, and 0 for a response with no weight (nothing to anchor).  (B, R) -> (B,)"""
    return sequence_logps(values, weights) / weights.sum(-1).clamp_min(torch.finfo(weights.dtype).tiny)


def _penalised_sepo(chosen_rewards, rejected_rewards, chosen_penalty, rejected_penalty, weight) -> LossOutput:
    """-log sigma(r(y_w) - r(y_l)) + weight * (P(y_w) + P(y_l))."""
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards) + weight * (chosen_penalty + rejected_penalty)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


# --------------------------------------------------------------------------- SePO variants


def sepo_dpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
                  ref_rejected_logps=None, *, chosen_selection: torch.Tensor, rejected_selection: torch.Tensor,
                  gamma: float = 1.0, beta: float = 0.1, anchor_weight: float = 1.0,
                  anchor_tokens: str = "all") -> LossOutput:
    """SePO's contrast on the selected tokens plus DPO's log-ratio margin as an anchor (DPO eq. 7, Rafailov et
    al. 2023, on the anchor tokens A: every token, or the unselected ones):

        h_A = sum_{t in A} (log pi - log pi_ref)(y_w,t) - sum_{t in A} (log pi - log pi_ref)(y_l,t)
        L   = -log sigma(r(y_w) - r(y_l)) - lambda log sigma(beta h_A)          (lambda = anchor_weight)

    The DPO term reaches every anchor token, so the tokens SePO leaves alone are tied to the reference through
    the implicit reward. Rewards (logged, accuracy, margin) are SePO's r(y).
    """
    _require_reference("sepo_dpo", ref_chosen_logps, ref_rejected_logps)
    r_w, r_l = _selected_rewards(chosen_logps, rejected_logps, chosen_weights, rejected_weights, chosen_selection,
                                 rejected_selection, gamma)  # (B,)
    h, _, _ = _dpo_logits(chosen_logps, rejected_logps, _anchor_weights(chosen_weights, chosen_selection, anchor_tokens),
                          _anchor_weights(rejected_weights, rejected_selection, anchor_tokens), ref_chosen_logps,
                          ref_rejected_logps)  # (B,)
    losses = -F.logsigmoid(r_w - r_l) - anchor_weight * F.logsigmoid(beta * h)
    return LossOutput(losses, r_w.detach(), r_l.detach())


def sepo_kl_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, *,
                 chosen_selection: torch.Tensor, rejected_selection: torch.Tensor, chosen_kl: torch.Tensor,
                 rejected_kl: torch.Tensor, gamma: float = 1.0, anchor_weight: float = 1.0,
                 anchor_tokens: str = "unselected") -> LossOutput:
    """SePO plus a per-token KL to the reference on the anchor tokens A (by default the unselected ones), with
    the exact per-position KL whose sum is TDPO's sequential KL (Zeng et al. 2024, arXiv 2404.11999):

        D_t  = KL(pi_ref(. | x, y_<t) || pi_theta(. | x, y_<t))               (chosen_kl / rejected_kl)
        P(y) = sum_{t in A} w_t D_t / sum_{t in A} w_t                         (a token mean; 0 when A is empty)
        L    = -log sigma(r(y_w) - r(y_l)) + lambda (P(y_w) + P(y_l))

    The KL covers the whole next-token distribution, so it also holds the probability mass SePO pushes off the
    rejected key tokens from drifting to arbitrary tokens (docs/losses.md). Needs the reference in memory.
    """
    r_w, r_l = _selected_rewards(chosen_logps, rejected_logps, chosen_weights, rejected_weights, chosen_selection,
                                 rejected_selection, gamma)
    p_w = _token_mean(chosen_kl, _anchor_weights(chosen_weights, chosen_selection, anchor_tokens))  # (B,)
    p_l = _token_mean(rejected_kl, _anchor_weights(rejected_weights, rejected_selection, anchor_tokens))
    return _penalised_sepo(r_w, r_l, p_w, p_l, anchor_weight)


def sepo_logratio_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
                       ref_rejected_logps=None, *, chosen_selection: torch.Tensor, rejected_selection: torch.Tensor,
                       gamma: float = 1.0, anchor_weight: float = 1.0,
                       anchor_tokens: str = "unselected") -> LossOutput:
    """SePO plus a squared log-ratio penalty on the anchor tokens A (by default the unselected ones): the cheap
    form of ``sepo_kl`` from the cached reference log-probs of the observed tokens only,

        k_t  = 1/2 (log pi(y_t) - log pi_ref(y_t))^2          (the "k2" KL estimator, Schulman 2020)
        P(y) = sum_{t in A} w_t k_t / sum_{t in A} w_t
        L    = -log sigma(r(y_w) - r(y_l)) + lambda (P(y_w) + P(y_l))

    k_t pins the probability of the token in the data, not the whole distribution at that position.
    """
    _require_reference("sepo_logratio", ref_chosen_logps, ref_rejected_logps)
    r_w, r_l = _selected_rewards(chosen_logps, rejected_logps, chosen_weights, rejected_weights, chosen_selection,
                                 rejected_selection, gamma)
    k_w = 0.5 * (chosen_logps - ref_chosen_logps) ** 2  # (B, R)
    k_l = 0.5 * (rejected_logps - ref_rejected_logps) ** 2
    # a padded slot's reference value is arbitrary: zero it before it can meet a zero weight as inf * 0
    k_w = k_w.masked_fill(chosen_weights == 0, 0.0)
    k_l = k_l.masked_fill(rejected_weights == 0, 0.0)
    p_w = _token_mean(k_w, _anchor_weights(chosen_weights, chosen_selection, anchor_tokens))
    p_l = _token_mean(k_l, _anchor_weights(rejected_weights, rejected_selection, anchor_tokens))
    return _penalised_sepo(r_w, r_l, p_w, p_l, anchor_weight)


def sepo_nll_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, *,
                  chosen_selection: torch.Tensor, rejected_selection: torch.Tensor, gamma: float = 1.0,
                  alpha: float = 1.0) -> LossOutput:
    """SePO plus alpha times the token-mean NLL of the whole chosen response, as RPO adds it to DPO (Pang et al.
    2024, arXiv 2404.19733):

        L = -log sigma(r(y_w) - r(y_l)) - alpha (1/|y_w|) sum_t w_t log pi(y_w,t)

    Every chosen token is pulled up; the rejected response's unselected tokens still receive no gradient.
    Reference-free.
    """
    r_w, r_l = _selected_rewards(chosen_logps, rejected_logps, chosen_weights, rejected_weights, chosen_selection,
                                 rejected_selection, gamma)
    nll = -_mean_logps(chosen_logps, chosen_weights)  # (B,)
    losses = -F.logsigmoid(r_w - r_l) + alpha * nll
    return LossOutput(losses, r_w.detach(), r_l.detach())


def sepo_margin_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, *,
                     chosen_selection: torch.Tensor, rejected_selection: torch.Tensor, gamma: float = 1.0,
                     margin: float = 0.5) -> LossOutput:
    """SePO with a target reward margin, as SimPO adds one (Meng et al. 2024, arXiv 2405.14734):

        L = -log sigma(r(y_w) - r(y_l) - margin)

    The loss keeps pushing until the selected-token margin exceeds ``margin`` (in r's units, gamma included).
    Reference-free; gradient only on the selected tokens.
    """
    r_w, r_l = _selected_rewards(chosen_logps, rejected_logps, chosen_weights, rejected_weights, chosen_selection,
                                 rejected_selection, gamma)
    losses = -F.logsigmoid(r_w - r_l - margin)
    return LossOutput(losses, r_w.detach(), r_l.detach())


# --------------------------------------------------------------------------- TGDPO


def tgdpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
               ref_rejected_logps=None, *, chosen_token_rewards: torch.Tensor, rejected_token_rewards: torch.Tensor,
               beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TGDPO (Zhu et al., ICML 2025, arXiv 2506.14574): DPO whose per-token beta is guided by token rewards
    r_hat_t of an induced DPO reward model, r_hat_t = beta_o (log pi_oracle - log pi_ref) -- exactly the rewards
    ``sepo score`` writes (SePO eq. 6) -- with the practical guidance f = 1 + alpha r_hat (chosen) and
    1 - alpha r_hat (rejected):

        rho_t = log pi(y_t) - log pi_ref(y_t)
        z = sum_t w_t beta (1 + alpha r_hat_w,t) rho_w,t - sum_t w_t beta (1 - alpha r_hat_l,t) rho_l,t
        L = -log sigma(z)

    Transcribed from the authors' ``CustomDPOTrainer.dpo_loss`` (dvlab-research/TGDPO,
    src/llamafactory/train/tgdpo/trainer.py, ``loss_type == "sigmoid"``), which computes r_hat with the policy's
    beta: score with ``beta`` equal to training's to reproduce it. Defaults are the authors' (beta 0.1, alpha 0.5).
    alpha = 0 is DPO. Rewards (logged) are DPO's beta * sum_t rho_t, as the authors log.
    """
    _require_reference("tgdpo", ref_chosen_logps, ref_rejected_logps)
    rho_w = (chosen_logps - ref_chosen_logps).masked_fill(chosen_weights == 0, 0.0)  # (B, R); padding's ref is junk
    rho_l = (rejected_logps - ref_rejected_logps).masked_fill(rejected_weights == 0, 0.0)
    guided_w = sequence_logps(beta * (1 + alpha * chosen_token_rewards) * rho_w, chosen_weights)  # (B,)
    guided_l = sequence_logps(beta * (1 - alpha * rejected_token_rewards) * rho_l, rejected_weights)
    losses = -F.logsigmoid(guided_w - guided_l)
    chosen_rewards = beta * sequence_logps(rho_w, chosen_weights)
    rejected_rewards = beta * sequence_logps(rho_l, rejected_weights)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


# --------------------------------------------------------------------------- SparsePO


def sparsepo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
                  ref_rejected_logps=None, *, chosen_kl: torch.Tensor, rejected_kl: torch.Tensor,
                  chosen_reward_mask: torch.Tensor, rejected_reward_mask: torch.Tensor,
                  chosen_kl_mask: torch.Tensor | None = None, rejected_kl_mask: torch.Tensor | None = None,
                  beta: float = 0.1, l1_reward: float = 0.0, l1_kl: float = 0.0) -> LossOutput:
    """SparsePO (Christopoulou et al. 2024, arXiv 2410.05102): TDPO1's objective with a token mask
    m^u on each token's reward term and m^d on its KL term, plus an L1 sparsity penalty on the masks:

        rho_t = log pi(y_t) - log pi_ref(y_t);  D_t = KL(pi_ref(. | x, y_<t) || pi_theta(. | x, y_<t))
        u     = sum_t w_t m^u_w,t rho_w,t - sum_t w_t m^u_l,t rho_l,t
        delta = sum_t w_t m^d_l,t D_l,t - sum_t w_t m^d_w,t D_w,t
        L     = -log sigma(beta (u - delta)) + lambda_u (|w m^u_w|_1 + |w m^u_l|_1) + lambda_d (|w m^d_w|_1 + |w m^d_l|_1)

    ``*_kl_mask`` None: one common mask (m^d = m^u, the paper's "sparse-common" and the activation-mask MaPO);
    the authors then halve both lambdas, since one mask is penalised twice: the penalty is
    (lambda_u + lambda_d) / 2 (|w m_w|_1 + |w m_l|_1). Masks of ones give TDPO1. Rewards (logged) are
    beta (sum m^u rho - sum m^d D), the authors' ``chosen_rewards``.

    Transcribed from ``SparseTrainer.get_batch_loss_metrics`` (huawei-noah/HEBO, SparsePO/src/trainers/
    sparse_trainer.py) and ``MAPOTrainer.mapo_loss`` (mapo_trainer.py); the authors' per-token "kl" is
    sum_v pi_ref (log pi - log pi_ref) = -D_t, hence the signs above. The masks come from
    ``sepo.core.token_masks``: the reference's activations (fixed) or a learned head (trained with the policy).
    """
    _require_reference("sparsepo", ref_chosen_logps, ref_rejected_logps)
    common = chosen_kl_mask is None and rejected_kl_mask is None
    if (chosen_kl_mask is None) != (rejected_kl_mask is None):
        raise SepoError("sparsepo needs both chosen_kl_mask and rejected_kl_mask, or neither (one common mask)")
    if common:
        chosen_kl_mask, rejected_kl_mask = chosen_reward_mask, rejected_reward_mask
    rho_w = (chosen_logps - ref_chosen_logps).masked_fill(chosen_weights == 0, 0.0)  # (B, R)
    rho_l = (rejected_logps - ref_rejected_logps).masked_fill(rejected_weights == 0, 0.0)
    u_w = sequence_logps(chosen_reward_mask * rho_w, chosen_weights)  # (B,)
    u_l = sequence_logps(rejected_reward_mask * rho_l, rejected_weights)
    d_w = sequence_logps(chosen_kl_mask * chosen_kl, chosen_weights)
    d_l = sequence_logps(rejected_kl_mask * rejected_kl, rejected_weights)
    losses = -F.logsigmoid(beta * ((u_w - u_l) - (d_l - d_w)))

    def l1(mask_w, mask_l):  # (B,)
        return sequence_logps(mask_w.abs(), chosen_weights) + sequence_logps(mask_l.abs(), rejected_weights)

    if common:
        losses = losses + (l1_reward + l1_kl) / 2 * l1(chosen_reward_mask, rejected_reward_mask)
    else:
        losses = losses + l1_reward * l1(chosen_reward_mask, rejected_reward_mask) + l1_kl * l1(chosen_kl_mask,
                                                                                              rejected_kl_mask)
    return LossOutput(losses, (beta * (u_w - d_w)).detach(), (beta * (u_l - d_l)).detach())


# --------------------------------------------------------------------------- selective DPO


def row_quantile(values: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each row's valid entries, linearly interpolated exactly as ``torch.quantile`` does it
    (rank q (n - 1) between the sorted values), in one sort for the whole batch. A row with no valid entry
    gets -inf.  values (B, R), valid (B, R) bool -> (B,)"""
    if not 0.0 <= q <= 1.0:
        raise SepoError(f"quantile must be in [0, 1], got {q}")
    ordered = values.masked_fill(~valid, float("inf")).sort(dim=-1).values  # (B, R): valid first, ascending
    n = valid.sum(-1, keepdim=True)  # (B, 1)
    rank = q * (n - 1).clamp_min(0).to(values.dtype)  # (B, 1)
    below = rank.floor().long()
    above = rank.ceil().long()
    low, high = ordered.gather(-1, below), ordered.gather(-1, above)
    out = torch.lerp(low, high, rank - below.to(values.dtype)).squeeze(-1)  # (B,)
    return out.masked_fill(n.squeeze(-1) == 0, float("-inf"))


def sdpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
              ref_rejected_logps=None, *, beta: float = 0.1, quantile: float = 0.6,
              label_smoothing: float = 0.0) -> LossOutput:
    """Selective DPO (Dong 2025, "Not All Preferences are What You Need for Post-Training: Selective Alignment
    Strategy for Preference Optimization"; code github Dongzhijin/SDPO): DPO on the tokens where the policy is
    furthest from where the preference wants it, chosen by the policy itself during training -- an oracle-free
    selection. Per response, from the current log-probs (no gradient through the choice):

        a_w,t = log pi_ref(y_w,t) - log pi(y_w,t)       (chosen: not yet raised)
        a_l,t = log pi(y_l,t) - log pi_ref(y_l,t)       (rejected: not yet lowered)
        K     = {t : a_t >= Quantile_q(a over the response's tokens)}      (q = quantile; 0.6 keeps ~40%)
        h     = sum_{K_w} (log pi - log pi_ref)(y_w) - sum_{K_l} (log pi - log pi_ref)(y_l)
        L     = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    Transcribed from ``DPOTrainer.mask_unimportant_tokens`` and the ``"sdpo"`` branch of ``dpo_loss``
    (Dongzhijin/SDPO, trl/trl/trainer/dpo_trainer.py); defaults are the authors' (quantile 0.6). The authors
    find a response's tokens by ``log pi != 0``; here by the weights. Rewards: beta * the kept log-ratio sums.
    """
    _require_reference("sdpo", ref_chosen_logps, ref_rejected_logps)
    with torch.no_grad():
        a_w = (ref_chosen_logps - chosen_logps).float()  # (B, R)
        a_l = (rejected_logps - ref_rejected_logps).float()
        valid_w, valid_l = chosen_weights > 0, rejected_weights > 0
        keep_w = valid_w & (a_w >= row_quantile(a_w, valid_w, quantile)[:, None])  # (B, R)
        keep_l = valid_l & (a_l >= row_quantile(a_l, valid_l, quantile)[:, None])
    h, chosen_ratio, rejected_ratio = _dpo_logits(chosen_logps, rejected_logps, chosen_weights * keep_w,
                                                  rejected_weights * keep_l, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# --------------------------------------------------------------------------- registry

TOKEN_LOSSES = {
    "sepo_dpo": sepo_dpo_loss,
    "sepo_kl": sepo_kl_loss,
    "sepo_logratio": sepo_logratio_loss,
    "sepo_nll": sepo_nll_loss,
    "sepo_margin": sepo_margin_loss,
    "tgdpo": tgdpo_loss,
    "sparsepo": sparsepo_loss,
    "sdpo": sdpo_loss,
}
# What each loss reads beyond the policy log-probs over the whole response, read off its signature
# (sepo.core.losses.INPUT_KEYWORDS):
#   ref_logps      the reference log-probs of the observed tokens (5th/6th arguments)
#   kl             per-position KL(pi_ref || pi_theta): the reference's full distribution, so the model in memory
#   selection      ``sepo select``'s chosen/rejected mask or weights, as chosen_selection / rejected_selection
#   token_rewards  ``sepo score``'s chosen_rewards / rejected_rewards, as chosen_token_rewards / ...
#   token_masks    SparsePO's masks (sepo.core.token_masks), as chosen_reward_mask / ... (and *_kl_mask)
TOKEN_LOSS_INPUTS = {name: signature_inputs(fn) for name, fn in TOKEN_LOSSES.items()}
