"""SparsePO's token masks (Christopoulou et al. 2024, arXiv 2410.05102): the weights ``sparsepo_loss`` puts on
each token's reward and KL terms. Two sources, both read from the *reference* model's activations at the
positions that predict the response tokens (position P + i - 1 for response token i, where the log-probs are
read, see ``sepo.core.logprobs``):

- ``activation_token_mask``: fixed, no parameters (the paper's model-activation mask, MaPO). It depends on the
  reference and the data only, so it can be computed once, like the reference log-probs.
- ``SparseMaskHead``: learned with the policy (the paper's learnable mask, ``mask_model="simple_all"``), a small
  module over every layer's hidden states; ``SparseMasks`` holds one (a common mask) or two (independent reward and
  KL masks), saved beside the policy by ``save_sparse_masks`` (safetensors) and read back by ``load_sparse_masks``.

Both are checked against the authors' code (huawei-noah/HEBO, SparsePO/) in tests/unit/test_token_masks.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MASKS_FILE", "SparseMaskHead", "SparseMasks", "activation_token_mask", "load_sparse_masks",
           "save_sparse_masks"]


def activation_token_mask(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The model-activation mask: per layer, each token's mean activation over the hidden units, rescaled to
    [0, 1] within its response; then the mean over layers.

        a_t = mean_h x_t,h;   m_t = (a_t - min_u a_u) / (max_u a_u - min_u a_u)   (u over the response's tokens)

    The authors' ``zn_rescale`` (MAPOTrainer.apply_activation_mapping, SparsePO/src/trainers/mapo_trainer.py)
    z-normalises a before the min-max rescale; the z-normalisation cancels out of the ratio, so this is the same
    mask without their float16 rounding. A response whose activations are all equal gets 1 everywhere (the
    authors' code divides by zero there). Differences from the authors: their ``activation_hook="all"`` also
    averages MLP, attention and logit activations read through patched modeling code; here the caller passes the
    residual stream (``output_hidden_states``) of any transformers model.

    hidden_states: one (N, R, H) tensor per layer; mask (N, R) bool (a real response token) -> (N, R) fp32, 0 on
    padding.
    """
    if not hidden_states:
        raise ValueError("activation_token_mask needs at least one layer of hidden states")
    layers = []
    for states in hidden_states:
        a = states.float().mean(-1)  # (N, R)
        low = a.masked_fill(~mask, float("inf")).amin(-1, keepdim=True)  # (N, 1)
        high = a.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
        spread = high - low
        flat = ~(spread > 0)  # one token, equal activations, or no token at all
        rescaled = (a - low) / torch.where(flat, torch.ones_like(spread), spread)
        layers.append(torch.where(flat, torch.ones_like(a), rescaled))
    return torch.stack(layers).mean(0).masked_fill(~mask, 0.0)


class SparseMaskHead(nn.Module):
    """The learnable SparsePO mask (the authors' ``SimpleMaskAllLayers`` with ReLU activations, SparsePO/src/
    masks/mask_models.py): every layer's hidden state goes through one shared LayerNorm and its own linear unit
    with a ReLU, and a bias-free linear mixer with a ReLU combines the layers:

        m_t = ReLU( sum_l v_l ReLU(w_l . LN(x_l,t) + b_l) )          (dropout after each ReLU while training)

    The masks are >= 0 and not capped at 1; ``sparsepo_loss``'s L1 penalty keeps them sparse. One head gives the
    common mask (reward and KL); two heads give independent ones. Trained with the policy (the authors: weight
    decay 0.01 on the head) and saved beside it.
    """

    def __init__(self, hidden_size: int, num_layers: int, *, dropout: float = 0.01, eps: float = 1e-5):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.per_layer = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """hidden_states: one (N, R, H) tensor per layer (the reference's, embeddings excluded) -> (N, R) masks."""
        if len(hidden_states) != len(self.per_layer):
            raise ValueError(f"the mask head has {len(self.per_layer)} layers, got {len(hidden_states)} hidden states")
        per_layer = [self.dropout(torch.relu(unit(self.layer_norm(x)))) for unit, x in zip(self.per_layer, hidden_states)]
        mixed = self.mixer(torch.cat(per_layer, dim=-1))  # (N, R, 1)
        return self.dropout(torch.relu(mixed)).squeeze(-1)


class SparseMasks(nn.Module):
    """The learned masks of one SparsePO run: one ``SparseMaskHead`` gives the common mask (m^u = m^d, the
    authors' default), two give independent reward and KL masks (their ``rw_kl_independent``). Saved by
    ``save_sparse_masks`` beside the trained policy.

    forward: one (N, R, H) tensor per layer -> (reward mask (N, R), KL mask (N, R) or None for the common mask)
    """

    def __init__(self, hidden_size: int, num_layers: int, *, independent: bool = False, dropout: float = 0.01):
        super().__init__()
        self.settings = {"hidden_size": hidden_size, "num_layers": num_layers, "independent": independent,
                         "dropout": dropout}
        self.reward = SparseMaskHead(hidden_size, num_layers, dropout=dropout)
        self.kl = SparseMaskHead(hidden_size, num_layers, dropout=dropout) if independent else None

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.reward(hidden_states), None if self.kl is None else self.kl(hidden_states)


MASKS_FILE = "sparsepo_masks.safetensors"  # beside the policy trained with learned SparsePO masks


def save_sparse_masks(masks: SparseMasks, path) -> None:
    """The heads' weights as safetensors, their settings in its metadata (nothing pickled)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in masks.state_dict().items()}
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in masks.settings.items()})


def load_sparse_masks(path) -> SparseMasks:
    """The masks ``save_sparse_masks`` wrote (``<policy folder>/sparsepo_masks.safetensors``), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        settings = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    masks = SparseMasks(settings["hidden_size"], settings["num_layers"], independent=settings["independent"],
                        dropout=settings["dropout"])
    masks.load_state_dict(load_file(str(path)))
    return masks.eval()
