"""SparsePO's mask producers (sepo.core.token_masks): by hand, against the authors' code, and trainable."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from sepo.core.token_losses import sparsepo_loss
from sepo.core.token_masks import SparseMaskHead, activation_token_mask


def test_activation_mask_by_hand():
    """Layer 1 means per token [1, 3, 2, x] -> [0, 1, 0.5]; layer 2 [4, 4, 6, x] -> [0, 0, 1]; mean over the layers
    [0, 0.5, 0.75, 0 (padding)]. A one-token response gets 1."""
    layer1 = torch.tensor([[[1.0, 1.0], [2.0, 4.0], [2.0, 2.0], [50.0, 50.0]]])  # (1, 4, 2)
    layer2 = torch.tensor([[[4.0, 4.0], [3.0, 5.0], [6.0, 6.0], [-9.0, 9.0]]])
    mask = torch.tensor([[True, True, True, False]])
    assert_close(activation_token_mask([layer1, layer2], mask), torch.tensor([[0.0, 0.5, 0.75, 0.0]]))
    single = torch.tensor([[True, False, False, False]])
    assert_close(activation_token_mask([layer1], single), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_activation_mask_equals_the_authors_zn_rescale():
    """Transcription of huawei-noah/HEBO, SparsePO/src/trainers/mapo_trainer.py, MAPOTrainer.apply_activation_mapping
    ("zn_rescale": hidden mean, masked z-normalisation with a float16 std, min-max rescale with float16 min/max),
    averaged over the hooked layers as concatenated_forward does. Tolerance: their float16 casts."""
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(4, 9, 16, generator=g) for _ in range(3)]
    mask = torch.arange(9)[None] < torch.tensor([9, 5, 3, 7])[:, None]

    def zn_rescale(x):
        a = x.mean(-1)
        mean = ((a * mask).sum(-1) / mask.sum(-1)).view(-1, 1)
        std = torch.tensor([a[i, mask[i]].std() for i in range(a.shape[0])]).half().float().view(-1, 1) + 1e-12
        z = (a - mean) / std
        low = torch.tensor([z[i, mask[i]].min() for i in range(a.shape[0])]).half().float().view(-1, 1)
        high = torch.tensor([z[i, mask[i]].max() for i in range(a.shape[0])]).half().float().view(-1, 1)
        return (z - low) / (high - low) * mask

    official = torch.stack([zn_rescale(x) for x in layers]).mean(0)
    assert_close(activation_token_mask(layers, mask), official, atol=3e-3, rtol=0)


def test_mask_head_is_the_authors_architecture_and_trains_through_sparsepo():
    """Same parameters as SimpleMaskAllLayers (shared LayerNorm, one Linear(H, 1) per layer, a bias-free
    Linear(L, 1) mixer); masks >= 0; the loss's gradient reaches every parameter, and the L1 term lowers the mask."""
    torch.manual_seed(0)
    head = SparseMaskHead(hidden_size=8, num_layers=3, dropout=0.0)
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert shapes == {"layer_norm.weight": (8,), "layer_norm.bias": (8,), "per_layer.0.weight": (1, 8),
                      "per_layer.0.bias": (1,), "per_layer.1.weight": (1, 8), "per_layer.1.bias": (1,),
                      "per_layer.2.weight": (1, 8), "per_layer.2.bias": (1,), "mixer.weight": (1, 3)}
    with torch.no_grad():  # a live start: every unit and the mixer pass positive values
        for unit in head.per_layer:
            unit.bias.fill_(1.0)
        head.mixer.weight.fill_(0.5)
    hidden = [torch.randn(4, 5, 8) for _ in range(3)]  # chosen rows 0-1, rejected rows 2-3
    masks = head(hidden)
    assert masks.shape == (4, 5) and (masks >= 0).all()
    logps, ref = -torch.rand(4, 5), -torch.rand(4, 5)
    weights, kl = torch.ones(4, 5), torch.rand(4, 5)
    out = sparsepo_loss(logps[:2], logps[2:], weights[:2], weights[2:], ref[:2], ref[2:], chosen_kl=kl[:2],
                        rejected_kl=kl[2:], chosen_reward_mask=masks[:2], rejected_reward_mask=masks[2:], beta=0.5,
                        l1_reward=0.1, l1_kl=0.1)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    leaf = masks[:2].detach().requires_grad_()
    sparsepo_loss(logps[:2], logps[2:], weights[:2], weights[2:], ref[:2], ref[2:], chosen_kl=kl[:2],
                  rejected_kl=kl[2:], chosen_reward_mask=leaf, rejected_reward_mask=masks[2:].detach(), beta=0.0,
                  l1_reward=0.1, l1_kl=0.1).loss.backward()  # beta 0: only the penalty depends on the mask
    assert_close(leaf.grad, torch.full((2, 5), 0.1 / 2))  # d/dm of (0.1 + 0.1) / 2 * |m|, averaged over 2 pairs
