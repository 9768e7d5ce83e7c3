"""Prefix sharing on real models: packed pairs give the plain path's per-token log-probs and gradients (fp32:
log-probs to 1e-5, gradients to 1e-5 of each parameter's largest gradient entry -- summation-order noise), on the kit architectures with both attention
kernels that take a custom mask, stories260K, LoRA, gradient checkpointing and TDPO's per-token KL; and models that
cannot share fall back to the plain rows, saying so once."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from sepo.data.collate import collate_pairs
from sepo.data.shared_prefix import with_shared_prefix
from sepo.models import load_causal_lm, response_log_probs, response_log_probs_and_kl
from sepo.prefix_sharing import prefix_sharing_supported, unsupported_reason

TOL = {"atol": 1e-5, "rtol": 1e-5}


def assert_close_grad(got, want, name):
    """Gradients to 1e-5 of the tensor's scale (entries near 0 of a gradient whose largest entry is ~100 carry
    summation-order noise of ~1e-5 absolute)."""
    assert_close(got, want, atol=1e-5 * max(1.0, float(want.abs().max())), rtol=1e-5, msg=lambda m: f"{name}: {m}")
# Every padding case: chosen longer than rejected and the reverse, a one-token response, a one-token prompt, the
# longest packed row not being the longest plain row, and the batch's widest response grid set by a rejected side.
ROWS = [
    {"index": 0, "prompt_input_ids": [1, 5, 9, 14], "chosen_input_ids": [22, 7, 2], "rejected_input_ids": [31, 2]},
    {"index": 1, "prompt_input_ids": [1], "chosen_input_ids": [8, 9, 10, 11, 12, 2], "rejected_input_ids": [2]},
    {"index": 2, "prompt_input_ids": [1, 3, 3, 3, 3, 3, 3], "chosen_input_ids": [50], "rejected_input_ids": [60, 61, 2]},
    {"index": 3, "prompt_input_ids": [1, 70, 71], "chosen_input_ids": [72, 2], "rejected_input_ids": [80, 81, 82, 83, 84, 85, 86, 2]},
]


def kit_model(arch: str, attn: str, vocab: int = 128):
    from transformers import AutoModelForCausalLM

    from sepo.testing import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, "tiny", vocab, pad_token_id=0), attn_implementation=attn)


def log_probs_and_grads(model, batch, mask=None):
    """Log-probs (N, R) and the gradient of a weighted sum of them w.r.t. every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logps = response_log_probs(model, batch, mask, chunk_size=4)  # small chunks: several per batch
    weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def assert_same(model, batch, mask=None):
    plain, plain_grads = log_probs_and_grads(model, batch, mask)
    shared, shared_grads = log_probs_and_grads(model, with_shared_prefix(batch, pad_token_id=0), mask)
    assert model._sepo_prefix_sharing_ok  # the shared path really ran
    assert_close(shared, plain, **TOL)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert_close_grad(shared_grads[name], grad, name)
    return plain


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_packed_pairs_give_the_plain_log_probs_and_gradients(arch, attn):
    model = kit_model(arch, attn)
    plain = assert_same(model, collate_pairs(ROWS, pad_token_id=0))
    assert (plain[collate_pairs(ROWS, pad_token_id=0).response_mask] < 0).all()


def test_a_selection_mask_and_full_logits_read_the_same_tokens():
    """SePO's selected tokens only (the mask the loss passes), and the full-logits path (FSDP) on packed rows."""
    model = kit_model("llama", "sdpa")
    batch = collate_pairs(ROWS, pad_token_id=0)
    selected = batch.response_mask & (torch.rand(batch.response_mask.shape, generator=torch.Generator().manual_seed(0)) < 0.4)
    selected[:, 0] = batch.response_mask[:, 0]  # the first token (shared reading position) always in
    got = assert_same(model, batch, selected)
    assert (got[~selected] == 0).all()
    with torch.no_grad():
        full = response_log_probs(model, with_shared_prefix(batch, 0), full_logits=True)
        assert_close(full, response_log_probs(model, batch, full_logits=True), **TOL)


def test_stories260k_multi_turn_prompts():
    """The real pretrained model, on prompts of several dialogue turns (packed rows far apart in length)."""
    from transformers import AutoTokenizer

    from sepo.models import STORIES260K

    tok = AutoTokenizer.from_pretrained(str(STORIES260K))
    model = load_causal_lm("stories260k", dtype="float32")
    turns = ["User: Tell me a story.\nAssistant: Once upon a time there was a cat.\nUser: What did the cat do?\n"
             "Assistant:", "User: Hi.\nAssistant: Hello!\nUser: Who is Lily?\nAssistant: Lily is a girl.\n"
             "User: Is she happy?\nAssistant:"]
    responses = [(" The cat played in the sun.", " It sat."), (" Yes, she smiles a lot.", " No.")]
    rows = []
    for i, (prompt, (chosen, rejected)) in enumerate(zip(turns, responses)):
        rows.append({"index": i, "prompt_input_ids": tok(prompt)["input_ids"],
                     "chosen_input_ids": tok(chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                     "rejected_input_ids": tok(rejected, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]})
    assert_same(model, collate_pairs(rows, pad_token_id=tok.pad_token_id or 0))


def test_lora_and_gradient_checkpointing():
    from sepo.models import LoraSettings

    batch = collate_pairs(ROWS, pad_token_id=0)
    lora = load_causal_lm("stories260k", dtype="float32", lora=LoraSettings(r=4, alpha=8, dropout=0.0,
                                                                             target_modules=["q_proj", "v_proj"]))
    for n, p in lora.named_parameters():  # LoRA's B starts at 0: give it values, so the adapters change outputs
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    lora.train()
    assert_same(lora, batch)
    ckpt = load_causal_lm("stories260k", dtype="float32", gradient_checkpointing=True)
    ckpt.train()
    assert ckpt.is_gradient_checkpointing
    assert_same(ckpt, batch)


def test_tdpo_per_token_kl_is_the_plain_one():
    policy, reference = kit_model("qwen2", "sdpa"), kit_model("qwen2", "sdpa")
    with torch.no_grad():  # make the reference differ from the policy, so the KL is not 0
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.02)
    batch = collate_pairs(ROWS, pad_token_id=0)
    outs = {}
    for name, b in (("plain", batch), ("shared", with_shared_prefix(batch, 0))):
        policy.zero_grad(set_to_none=True)
        logps, ref_logps, kl = response_log_probs_and_kl(policy, reference, b, chunk_size=4)
        (logps.sum() + kl.sum()).backward()
        outs[name] = (logps.detach(), ref_logps, kl.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()})
    for got, want in zip(outs["shared"][:3], outs["plain"][:3]):
        assert_close(got, want, **TOL)
    assert (outs["plain"][2][batch.response_mask] > 0).all()
    for n, g in outs["plain"][3].items():
        assert_close_grad(outs["shared"][3][n], g, n)


class _DropsPositionIds(torch.nn.Module):
    """A wrapper (like DDP's) around a model whose forward ignores position ids, as some architectures do."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        kwargs.pop("position_ids", None)
        return self.module(**kwargs)


def test_a_model_that_ignores_position_ids_falls_back_and_says_so_once(caplog):
    model = _DropsPositionIds(kit_model("llama", "sdpa"))
    batch = collate_pairs(ROWS, pad_token_id=0)
    with caplog.at_level(logging.WARNING, logger="sepo.prefix_sharing"), torch.no_grad():
        got = response_log_probs(model, with_shared_prefix(batch, 0))
        again = response_log_probs(model, with_shared_prefix(batch, 0))
    assert not prefix_sharing_supported(model)
    warnings = [r.getMessage() for r in caplog.records if "prefix sharing off" in r.getMessage()]
    assert len(warnings) == 1 and "position ids" in warnings[0]
    with torch.no_grad():
        plain = response_log_probs(model, batch)
    assert torch.equal(got, plain) and torch.equal(again, plain)  # the plain rows ran


def test_configurations_that_cannot_share_are_named():
    from types import SimpleNamespace

    def fake(**cfg):
        return SimpleNamespace(config=SimpleNamespace(**cfg))

    assert unsupported_reason(fake(_attn_implementation="sdpa")) is None
    assert "flash_attention_2" in unsupported_reason(fake(_attn_implementation="flash_attention_2"))
    assert "sliding_attention" in unsupported_reason(fake(_attn_implementation="sdpa",
                                                          layer_types=["full_attention", "sliding_attention"]))
    assert "sliding-window" in unsupported_reason(fake(_attn_implementation="eager", sliding_window=4096))
    assert unsupported_reason(fake(_attn_implementation="eager", sliding_window=4096, use_sliding_window=False)) is None


def test_a_sliding_window_model_runs_the_plain_rows(caplog):
    """Qwen2 with its sliding window switched on: the custom mask would replace the window, so no sharing."""
    from transformers import AutoModelForCausalLM

    from sepo.testing import tiny_config

    cfg = tiny_config("qwen2", "tiny", 128, pad_token_id=0)
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 4, 0
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    batch = collate_pairs(ROWS, pad_token_id=0)
    with caplog.at_level(logging.WARNING, logger="sepo.prefix_sharing"), torch.no_grad():
        got = response_log_probs(model, with_shared_prefix(batch, 0))
        plain = response_log_probs(model, replace(batch, shared=None))
    assert torch.equal(got, plain)
    assert any("sliding_attention" in r.getMessage() for r in caplog.records)
