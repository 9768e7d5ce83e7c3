"""Running a packed pair batch (``sepo.data.shared_prefix``) through a model: the prompt computed once per pair.

The packed row goes through the model's own forward with a custom 4D attention mask and explicit position ids --
one forward, so DDP / DeepSpeed hooks, gradient checkpointing and LoRA work exactly as on plain rows. transformers
(4.46 and later, 5.x) hands a 4D mask to the attention kernel unchanged; what the kernel expects differs:

    sdpa    bool, True = attend (torch's scaled_dot_product_attention)
    eager   additive: 0 where allowed, the dtype's minimum elsewhere (the kernel adds it to the scores)

Other kernels (flash_attention_2/3 take no 4D mask, flex_attention wants a BlockMask), sliding-window or chunked
attention layers (a custom mask replaces their window) and models that ignore ``position_ids`` cannot share a
prefix exactly: ``prefix_sharing_supported`` says no once, with the reason, and the batch runs as plain rows.

Why a packed row and not the prompt's KV cache reused for both responses: one forward instead of two (the second
with a holed 2D mask and a batch-expanded cache), no cache held through autograd, and it composes with gradient
checkpointing, which recomputes layers and would append to a cache twice. docs/performance.md has the measurement.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from sepo.core.logprobs import full_logits_log_probs_at, selective_log_probs_and_kl_at, selective_log_probs_at
from sepo.data.shared_prefix import CHOSEN, REJECTED, SharedPrefix

log = logging.getLogger(__name__)

# attention implementation -> whether the 4D mask is additive (eager) or boolean (sdpa)
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


def _inner(model):
    from sepo.models import unwrap

    return unwrap(model)


def unsupported_reason(model) -> str | None:
    """Why this model's configuration cannot take a packed pair exactly, or None (the numeric probe still runs)."""
    cfg = _inner(model).config
    kernel = getattr(cfg, "_attn_implementation", None) or "eager"
    if kernel not in MASK_KINDS:
        return (f"attention implementation '{kernel}' takes no custom 4D mask (prefix sharing needs "
                f"{' or '.join(MASK_KINDS)})")
    layer_types = getattr(cfg, "layer_types", None) or []
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed:
        return f"layers with {', '.join(windowed)} attention (a custom mask would replace their window)"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and not layer_types:
        return f"sliding-window attention ({cfg.sliding_window} positions; a custom mask would replace the window)"
    return None


def packed_forward(model, shared: SharedPrefix, *, full_logits: bool = False, **overrides) -> torch.Tensor:
    """(B, T, H) final hidden states of the packed rows through the model's own forward (logits for one position
    only), or (B, T, V) logits with ``full_logits``. ``overrides`` replace the layout's fields (the probe)."""
    inner = _inner(model)
    kind = MASK_KINDS[getattr(inner.config, "_attn_implementation", None) or "eager"]
    shared = replace(shared, **overrides) if overrides else shared
    mask = shared.attention_mask(inner.dtype if kind == "additive" else None)  # (B, 1, T, T)
    if full_logits:
        return model(input_ids=shared.input_ids, attention_mask=mask, position_ids=shared.position_ids,
                     use_cache=False).logits
    out = model(input_ids=shared.input_ids, attention_mask=mask, position_ids=shared.position_ids,
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def shared_response_log_probs(model, batch, mask: torch.Tensor, *, chunk_size: int | None = None,
                              full_logits: bool = False, **overrides) -> torch.Tensor:
    """``sepo.models.response_log_probs`` of a batch carrying ``batch.shared``: the same (2B, R) fp32 grid, from
    one packed row per pair. ``mask`` (2B, R) says where log-probs are wanted."""
    from sepo.models import output_head, selective_head_supported

    s = batch.shared
    if full_logits or not selective_head_supported(model):
        logits = packed_forward(model, s, full_logits=True, **overrides)  # (B, T, V)
        return full_logits_log_probs_at(logits, s.logit_positions, batch.response_ids, mask, rows=s.logit_rows)
    hidden = packed_forward(model, s, **overrides)  # (B, T, H)
    return selective_log_probs_at(hidden, output_head(model), s.logit_positions, batch.response_ids, mask,
                                  chunk_size, rows=s.logit_rows)


def shared_response_log_probs_and_kl(model, ref_model, batch, *, chunk_size: int | None = None):
    """``sepo.models.response_log_probs_and_kl`` (TDPO) of a batch carrying ``batch.shared``: both models run the
    packed rows; policy log-probs, reference log-probs and per-token KL, each (2B, R) fp32."""
    from sepo.models import output_head

    s = batch.shared
    hidden = packed_forward(model, s)  # (B, T, H)
    with torch.no_grad():
        ref_hidden = packed_forward(ref_model, s)  # (B, T, H)
    return selective_log_probs_and_kl_at(hidden, output_head(model), ref_hidden, output_head(ref_model),
                                         s.logit_positions, batch.response_ids, batch.response_mask, chunk_size,
                                         rows=s.logit_rows)


def _probe_batch(vocab_size: int, device):
    """Two pairs with unequal prompts and responses (so both layouts pad), on ``device``."""
    from sepo.data.collate import collate_pairs
    from sepo.data.shared_prefix import with_shared_prefix

    def ids(start, n):
        return [(start + 7 * k) % vocab_size for k in range(n)]

    rows = [{"index": 0, "prompt_input_ids": ids(3, 5), "chosen_input_ids": ids(11, 3), "rejected_input_ids": ids(5, 6)},
            {"index": 1, "prompt_input_ids": ids(13, 3), "chosen_input_ids": ids(2, 5), "rejected_input_ids": ids(9, 2)}]
    pad = rows[0]["prompt_input_ids"][0]  # any valid id: pad positions are masked and never read
    return with_shared_prefix(collate_pairs(rows, pad), pad).to(device)


def prefix_sharing_supported(model, *, full_logits: bool = False) -> bool:
    """Whether packed pairs give this model's plain log-probs; checked once per model (the answer is kept on the
    model object) and, when the answer is no, said once with the reason.

    The probe compares the packed log-probs with the plain ones on a tiny batch, and calibrates itself against two
    deliberately wrong layouts -- rejected seeing chosen, and position ids that do not restart -- so it also works
    in half precision, where exact agreement is not expected: the packed result must agree to 1e-4 or be at least
    10x closer to the plain one than either wrong layout is (a model that ignores the mask or the position ids
    fails)."""
    inner = _inner(model)
    ok = getattr(inner, "_sepo_prefix_sharing_ok", None)
    if ok is not None:
        return ok
    reason = unsupported_reason(model)
    if reason is None:
        from sepo.models import response_log_probs

        batch = _probe_batch(inner.config.vocab_size, inner.device)
        s, mask = batch.shared, batch.response_mask
        was_training = model.training
        model.eval()  # no dropout: the probe compares two forwards and draws nothing from the RNG
        try:
            with torch.no_grad():
                plain = response_log_probs(model, replace(batch, shared=None), full_logits=full_logits)  # (4, R)

                def gap(**overrides) -> float:
                    packed = shared_response_log_probs(model, batch, mask, full_logits=full_logits, **overrides)
                    return float((packed - plain)[mask].abs().max())

                exact = gap()
                sees_chosen = gap(segments=torch.where(s.segments == REJECTED, CHOSEN, s.segments))
                no_restart = gap(position_ids=torch.arange(s.input_ids.shape[1], device=inner.device).expand_as(
                    s.position_ids))
        except Exception as e:  # a kernel or model that refuses a 4D mask or explicit position ids
            reason = f"its forward refused a packed row ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        else:
            if not (exact <= 1e-4 or exact * 10 < min(sees_chosen, no_restart)):
                reason = (f"packed log-probs differ from the plain ones by up to {exact:.2e} (a wrong mask gives "
                          f"{sees_chosen:.2e}, wrong positions {no_restart:.2e}): the model does not honour a custom "
                          "attention mask or position ids")
        finally:
            model.train(was_training)
    ok = reason is None
    if not ok:
        log.warning("%s: prefix sharing off, each prompt is computed twice: %s", type(inner).__name__, reason)
    inner._sepo_prefix_sharing_ok = ok
    return ok
