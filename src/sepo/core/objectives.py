"""Every loss ``sepo train`` trains, by name, and what each one reads -- read off its signature, so a loss says it once.

``ALL_LOSSES`` is ``sepo.core.losses.LOSSES`` (sequence-level) plus ``sepo.core.token_losses.TOKEN_LOSSES``
(token-level): the one mapping the training loop, the CLI's ``--loss`` choices and the pipeline read. The
questions the loop and the pipeline ask of a loss (as torchtune's ``is_reference_free``) are answered here from
``loss_inputs``:

    needs_reference_logps(name)  it takes ref_chosen_logps: log pi_ref of the observed tokens (cached on disk, or from
                                 the reference in memory when the loss needs that anyway)
    needs_reference_model(name)  it takes chosen_kl: the reference's whole distribution at every position, so the
                                 reference stays in memory (tdpo, sepo_kl, sparsepo)
    needs_reference(name)        either: the loss compares the policy with a reference
    is_reference_free(name)      neither
    reads_selection(name)        it trains on ``sepo select``'s selection (sepo as its weights; the SePO variants as
                                 their ``chosen_selection``)
    reads_token_rewards(name)    it takes ``sepo score``'s per-token rewards (tgdpo)

A loss added to either mapping with these keywords in its signature is treated accordingly everywhere.
"""

from __future__ import annotations

from sepo.core.losses import INPUT_KEYWORDS, LOSSES, signature_inputs
from sepo.core.token_losses import TOKEN_LOSSES
from sepo.errors import ConfigError

__all__ = ["ALL_LOSSES", "INPUT_KEYWORDS", "SELECTION_AS_WEIGHTS", "is_reference_free", "loss_inputs",
           "needs_reference", "needs_reference_logps", "needs_reference_model", "reads_selection",
           "reads_token_rewards"]

ALL_LOSSES = {**LOSSES, **TOKEN_LOSSES}
# the losses that train on the selection as their token weights unless use_selection=false
SELECTION_AS_WEIGHTS = ("sepo",)


def _function(name: str):
    try:
        return ALL_LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss '{name}'; choose one of {', '.join(ALL_LOSSES)}") from None


def loss_inputs(name: str) -> frozenset[str]:
    """What loss ``name`` reads beyond the policy log-probs and the weights: the keys of INPUT_KEYWORDS it takes."""
    return signature_inputs(_function(name))


def needs_reference_logps(name: str) -> bool:
    """Whether loss ``name`` takes the reference log-probs of the observed tokens (``ref_chosen_logps``)."""
    return "ref_logps" in loss_inputs(name)


def needs_reference_model(name: str) -> bool:
    """Whether loss ``name`` needs the reference's whole distribution at every position (it takes ``chosen_kl``),
    so the reference stays in memory instead of being replaced by cached log-probs."""
    return "kl" in loss_inputs(name)


def needs_reference(name: str) -> bool:
    """Whether loss ``name`` compares the policy with a reference model in any way."""
    return needs_reference_logps(name) or needs_reference_model(name)


def is_reference_free(name: str) -> bool:
    """Whether loss ``name`` never reads a reference model (as torchtune's ``is_reference_free``)."""
    return not needs_reference(name)


def reads_selection(name: str) -> bool:
    """Whether loss ``name`` trains on ``sepo select``'s selection by default: as its token weights (sepo) or as
    its ``chosen_selection`` input (the SePO variants)."""
    return name in SELECTION_AS_WEIGHTS or "selection" in loss_inputs(name)


def reads_token_rewards(name: str) -> bool:
    """Whether loss ``name`` takes ``sepo score``'s per-token rewards (``chosen_token_rewards``)."""
    return "token_rewards" in loss_inputs(name)
