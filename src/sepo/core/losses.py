"""Preference-optimisation losses as pure functions over per-token log-probs.

Every loss takes the same first four arguments, all ``(B, R)`` over the response-token grid of
``sepo.data.collate.PairBatch`` (B pairs, R response slots, right-padded):

    chosen_logps, rejected_logps      log pi_theta(y_t | x, y_<t) per token, fp32 (0 where not computed)
    chosen_weights, rejected_weights  per-token weight: 1 = the token counts, 0 = padding or not selected

so ``log pi(y|x)`` is ``sum_t w_t * logp_t`` and any loss can run on a SePO selection by passing the
selection as the weights. Losses that compare with a reference also take ``ref_chosen_logps`` /
``ref_rejected_logps`` (B, R) (the cached reference log-probs); ``tdpo`` also takes the per-token
sequential KL. Hyper-parameters are keyword-only with the source paper's defaults.

Each returns a :class:`LossOutput`: per-pair ``losses`` (B,), the implicit ``chosen_rewards`` and
``rejected_rewards`` (B,, detached), and from them ``accuracies`` and ``margins``.

``LOSSES`` maps a name to its function; ``sepo.core.objectives.ALL_LOSSES`` adds the token-level losses of
``sepo.core.token_losses``. What a loss consumes is read off its signature (``signature_inputs``), so each loss
says it once; ``sepo.core.objectives`` answers the loop's questions from it (``needs_reference``,
``needs_reference_model``, ``is_reference_free``, ...).

Precondition: every response has at least one counted token (a weight > 0). ``sepo train`` checks it once, when it
loads the data (``sepo.stages.train_data.check_pairs``); the losses do not check it per call (that would read a
device value back on every micro-batch). Where a mean over the counted tokens is taken, a response with none
gets 0 (and no gradient) rather than a division by zero.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sepo.errors import SepoError

__all__ = ["INPUT_KEYWORDS", "LOSSES", "METRICS", "LossOutput", "sequence_logps", "signature_inputs"]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")  # LossOutput.metric_sums


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,) per-pair loss; the training objective is losses.mean()
    chosen_rewards: torch.Tensor  # (B,) implicit reward of the chosen response (detached)
    rejected_rewards: torch.Tensor  # (B,) implicit reward of the rejected response (detached)

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards  # (B,)

    @property
    def accuracies(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float()  # (B,)

    def per_pair(self) -> torch.Tensor:
        """(B, 5) detached: loss, chosen reward, rejected reward, accuracy, margin of each pair (order of METRICS)."""
        return torch.stack([self.losses.detach(), self.chosen_rewards, self.rejected_rewards, self.accuracies,
                            self.margins], dim=-1)

    def metric_sums(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(5,) weighted sums over the pairs (``weights`` (B,), default 1), still on the device: a training loop
        adds them up and divides by the summed weights when it logs, so nothing is read back per micro-batch."""
        values = self.per_pair()  # (B, 5)
        return values.sum(0) if weights is None else (values * weights[:, None]).sum(0)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Batch means as 0-dim tensors (``.item()`` them only when they are logged)."""
        return dict(zip(METRICS, self.per_pair().mean(0)))


# --------------------------------------------------------------------------- shared pieces


def sequence_logps(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum_t w_t * log pi(y_t | x, y_<t).  (B, R), (B, R) -> (B,)"""
    return (logps * weights).sum(-1)


def _mean_logps(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean log-prob per response, (1/|S|) sum_{t in S} log pi(y_t | x, y_<t); 0 for a response with no
    counted token (see the module docstring's precondition).  (B, R), (B, R) -> (B,)"""
    counts = weights.sum(-1)  # (B,)
    return sequence_logps(logps, weights) / counts.clamp(min=torch.finfo(counts.dtype).tiny)


def _require_reference(name: str, *refs) -> None:
    if any(r is None for r in refs):
        raise SepoError(f"loss '{name}' compares the policy with a reference model but got no reference log-probs; "
                        "give a reference (train: `reference`, default the starting model) so they can be cached")


def _dpo_logits(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps, ref_rejected_logps):
    """(pi_logratios - ref_logratios, policy_chosen - ref_chosen, policy_rejected - ref_rejected), each (B,)."""
    policy_chosen = sequence_logps(chosen_logps, chosen_weights)  # (B,)
    policy_rejected = sequence_logps(rejected_logps, rejected_weights)  # (B,)
    ref_chosen = sequence_logps(ref_chosen_logps, chosen_weights)  # (B,)
    ref_rejected = sequence_logps(ref_rejected_logps, rejected_weights)  # (B,)
    pi_logratios = policy_chosen - policy_rejected
    ref_logratios = ref_chosen - ref_rejected
    return pi_logratios - ref_logratios, policy_chosen - ref_chosen, policy_rejected - ref_rejected


# --------------------------------------------------------------------------- the losses


def sft_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights) -> LossOutput:
    """Supervised fine-tuning: token-mean negative log-likelihood of the chosen response.

        L = - (1/|y_w|) sum_t log pi_theta(y_w,t | x, y_w,<t)

    (the reference / SFT model of the DPO and SePO papers). ``rejected_logps`` may be None (training skips the
    rejected half); when given, the rewards are the token-mean log-probs of both responses.

    Batch reduction: the objective is the mean over pairs of each response's token mean, so every response
    weighs the same whatever its length; TRL (SFTTrainer, and DPOTrainer's RPO term) takes one token mean over
    every chosen token of the batch, which weighs long responses more. sepo's batches are length-bucketed, so
    the two differ little in practice; the per-pair form keeps ``losses`` a meaningful (B,) vector.
    """
    chosen_mean = _mean_logps(chosen_logps, chosen_weights)  # (B,)
    if rejected_logps is None:
        rejected_mean = torch.zeros_like(chosen_mean)
    else:
        rejected_mean = _mean_logps(rejected_logps, rejected_weights)
    return LossOutput(-chosen_mean, chosen_mean.detach(), rejected_mean.detach())


def dpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
             ref_rejected_logps=None, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), sigmoid form; ``label_smoothing`` eps > 0 gives conservative DPO (cDPO,
    Mitchell 2023), which assumes a fraction eps of the labels is flipped:

        h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))   # pi_logratios - ref_logratios
        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
        reward(y) = beta (log pi(y) - log pi_ref(y))
    """
    _require_reference("dpo", ref_chosen_logps, ref_rejected_logps)
    h, chosen_ratio, rejected_ratio = _dpo_logits(chosen_logps, rejected_logps, chosen_weights, rejected_weights,
                                                  ref_chosen_logps, ref_rejected_logps)  # (B,) each
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
             ref_rejected_logps=None, *, beta: float = 0.1, length_normalize: bool = False) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv 2310.12036, eq. 17), with beta playing the role of the regulariser tau:

        h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
        L = (h - 1 / (2 beta))^2
        reward(y) = beta (log pi(y) - log pi_ref(y))

    ``length_normalize=True`` divides each response's log-ratio by its length |y| (TRL's IPO, whose comment says
    the IPO authors' results used that form): h = ratio(y_w) / |y_w| - ratio(y_l) / |y_l|, and the rewards use the
    normalised ratios. Default False, the paper's sums: the target margin 1 / (2 beta) is then a sequence-level
    log-ratio margin, as in DPO; normalised, it is a per-token one, so the same beta means a far stronger push
    (beta values do not carry over between the two forms).
    """
    _require_reference("ipo", ref_chosen_logps, ref_rejected_logps)
    h, chosen_ratio, rejected_ratio = _dpo_logits(chosen_logps, rejected_logps, chosen_weights, rejected_weights,
                                                  ref_chosen_logps, ref_rejected_logps)
    if length_normalize:
        chosen_ratio = chosen_ratio / chosen_weights.sum(-1).clamp_min(1e-12)  # (B,)
        rejected_ratio = rejected_ratio / rejected_weights.sum(-1).clamp_min(1e-12)
        h = chosen_ratio - rejected_ratio
    losses = (h - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def rdpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
              ref_rejected_logps=None, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409): an unbiased loss under a label-flip
    rate eps = ``label_smoothing`` (< 0.5):

        h as in DPO
        L = [ -(1 - eps) log sigma(beta h) + eps log sigma(-beta h) ] / (1 - 2 eps)
    """
    _require_reference("rdpo", ref_chosen_logps, ref_rejected_logps)
    if not 0 <= label_smoothing < 0.5:
        raise SepoError(f"rdpo needs 0 <= label_smoothing < 0.5 (the label-flip rate), got {label_smoothing}")
    h, chosen_ratio, rejected_ratio = _dpo_logits(chosen_logps, rejected_logps, chosen_weights, rejected_weights,
                                                  ref_chosen_logps, ref_rejected_logps)
    losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
        1 - 2 * label_smoothing)
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def rpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
             ref_rejected_logps=None, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    arXiv 2404.19733): DPO plus alpha times the
    token-mean NLL of the chosen response:

        L = -log sigma(beta h) - alpha (1/|y_w|) log pi(y_w)

    The NLL is each response's token mean, averaged over pairs like the DPO term (TRL's ``rpo_alpha`` takes one
    token mean over the batch's chosen tokens; see ``sft_loss``).
    """
    _require_reference("rpo", ref_chosen_logps, ref_rejected_logps)
    h, chosen_ratio, rejected_ratio = _dpo_logits(chosen_logps, rejected_logps, chosen_weights, rejected_weights,
                                                  ref_chosen_logps, ref_rejected_logps)
    nll = -_mean_logps(chosen_logps, chosen_weights)  # (B,)
    losses = -F.logsigmoid(beta * h) + alpha * nll
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): reference-free, length-normalised, with a target reward margin gamma:

        reward(y) = (beta / |y|) log pi(y)
        L = -log sigma(reward(y_w) - reward(y_l) - gamma)      (label_smoothing eps mixes in the flipped label)
    """
    chosen_rewards = beta * _mean_logps(chosen_logps, chosen_weights)  # (B,)
    rejected_rewards = beta * _mean_logps(rejected_logps, rejected_weights)  # (B,)
    logits = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def rrhf_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, *, alpha: float = 1.0,
              sft_reduction: str = "mean") -> LossOutput:
    """RRHF (Yuan et al. 2023, arXiv 2304.05302) for a pair: a hinge ranking loss on length-normalised log-probs plus
    alpha times the fine-tuning loss L_ft on the better response:

        p(y) = (1/|y|) log pi(y)
        L = max(0, p(y_l) - p(y_w)) + alpha L_ft
        L_ft = -(1/|y_w|) log pi(y_w)    (sft_reduction="mean", default)
             = -log pi(y_w)              (sft_reduction="sum": the paper's L_ft, a plain sum over tokens)

    The authors' code (GanjinZero/RRHF, train.py, RRHFTrainer.compute_loss) returns rrhf_weight * rank + sft with
    the sft term divided by the padded row length (query + the batch's longest candidate), so its size depends
    on the batch; "mean" divides by the response's own length instead. Their rrhf_weight on the rank term is
    1 / alpha here, up to the overall scale of the loss.
    """
    p_chosen = _mean_logps(chosen_logps, chosen_weights)  # (B,)
    p_rejected = _mean_logps(rejected_logps, rejected_weights)  # (B,)
    if sft_reduction == "mean":
        sft = -p_chosen
    elif sft_reduction == "sum":
        sft = -sequence_logps(chosen_logps, chosen_weights)
    else:
        raise SepoError(f"rrhf sft_reduction must be 'mean' or 'sum', got {sft_reduction!r}")
    losses = torch.relu(p_rejected - p_chosen) + alpha * sft
    return LossOutput(losses, p_chosen.detach(), p_rejected.detach())


def tdpo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, ref_chosen_logps=None,
              ref_rejected_logps=None, *, chosen_kl: torch.Tensor, rejected_kl: torch.Tensor, beta: float = 0.1,
              alpha: float = 0.5, variant: int = 2) -> LossOutput:
    """TDPO (Zeng et al. 2024, "Token-level Direct Preference Optimization",
    arXiv 2404.11999). With the
    sequential KL D(y) = sum_t w_t KL(pi_ref(. | x, y_<t) || pi_theta(. | x, y_<t)) (``chosen_kl`` /
    ``rejected_kl`` are the per-token terms, (B, R)):

        u = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
        TDPO1:  L = -log sigma(beta (u - (D(y_l) - D(y_w))))
        TDPO2:  L = -log sigma(beta (u - alpha (D(y_l) - sg[D(y_w)])))          (sg = stop-gradient)

    The rewards (logged, accuracy, margin) are DPO's beta (log pi(y) - log pi_ref(y)); the authors' code
    (tdpo_loss in Vance0124/Token-level-Direct-Preference-Optimization) logs beta (log-ratio + D(y)), so their
    logged rewards and accuracies differ from these by the KL term; the loss is the same.
    """
    _require_reference("tdpo", ref_chosen_logps, ref_rejected_logps)
    if variant not in (1, 2):
        raise SepoError(f"tdpo variant must be 1 or 2, got {variant}")
    u, chosen_ratio, rejected_ratio = _dpo_logits(chosen_logps, rejected_logps, chosen_weights, rejected_weights,
                                                  ref_chosen_logps, ref_rejected_logps)  # (B,)
    kl_chosen = sequence_logps(chosen_kl, chosen_weights)  # (B,)
    kl_rejected = sequence_logps(rejected_kl, rejected_weights)  # (B,)
    if variant == 1:
        logits = u - (kl_rejected - kl_chosen)
    else:
        logits = u - alpha * (kl_rejected - kl_chosen.detach())
    losses = -F.logsigmoid(beta * logits)
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def sepo_loss(chosen_logps, rejected_logps, chosen_weights, rejected_weights, *, gamma: float = 1.0,
              normalize: str = "selected", chosen_lengths: torch.Tensor | None = None,
              rejected_lengths: torch.Tensor | None = None) -> LossOutput:
    """SePO (Yang et al. 2024, "Selective Preference Optimization via Token-Level Reward Function Estimation",
    arXiv 2408.13518): reference-free, on the selected tokens S_w, S_l only (the weights are the selection):

        reward(y) = gamma * (1/|S|) sum_{t in S} log pi(y_t | x, y_<t)
        L = -log sigma(reward(y_w) - reward(y_l))

    ``normalize="selected"`` divides by the number of selected tokens |S|; ``"length"`` by the full response
    length (``chosen_lengths`` / ``rejected_lengths``, (B,)).
    """
    if normalize == "selected":
        chosen_mean = _mean_logps(chosen_logps, chosen_weights)  # (B,)
        rejected_mean = _mean_logps(rejected_logps, rejected_weights)  # (B,)
    elif normalize == "length":
        if chosen_lengths is None or rejected_lengths is None:
            raise SepoError("sepo normalize='length' needs chosen_lengths and rejected_lengths")
        chosen_mean = sequence_logps(chosen_logps, chosen_weights) / chosen_lengths.clamp(min=1)
        rejected_mean = sequence_logps(rejected_logps, rejected_weights) / rejected_lengths.clamp(min=1)
    else:
        raise SepoError(f"sepo normalize must be 'selected' or 'length', got {normalize!r}")
    chosen_rewards, rejected_rewards = gamma * chosen_mean, gamma * rejected_mean
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


LOSSES = {
    "sft": sft_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "rdpo": rdpo_loss,
    "rpo": rpo_loss,
    "simpo": simpo_loss,
    "rrhf": rrhf_loss,
    "tdpo": tdpo_loss,
    "sepo": sepo_loss,
}


# what a loss may read beyond the policy log-probs and the weights -> the keyword (of its chosen half) it takes it by
INPUT_KEYWORDS = {"ref_logps": "ref_chosen_logps", "kl": "chosen_kl", "selection": "chosen_selection",
                  "token_rewards": "chosen_token_rewards", "token_masks": "chosen_reward_mask",
                  "lengths": "chosen_lengths"}


def signature_inputs(fn) -> frozenset[str]:
    """The keys of INPUT_KEYWORDS that loss function ``fn`` takes: what it reads, said once, in its signature."""
    params = inspect.signature(fn).parameters
    return frozenset(need for need, keyword in INPUT_KEYWORDS.items() if keyword in params)
