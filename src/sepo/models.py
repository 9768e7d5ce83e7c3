"""Loading policy / reference / oracle models and tokenizers, and the one forward every stage uses.

Models load from a hub id or a local folder exactly as ``AutoModelForCausalLM.from_pretrained`` would.
Special-token ids always come from the tokenizer; a tokenizer with no pad token gets one assigned
explicitly, with a warning.

``response_log_probs`` is the single place a model is run on a PairBatch. It runs the model's *own*
forward (so DDP / DeepSpeed hooks fire) with ``logits_to_keep=1`` and ``output_hidden_states=True``, then
projects only the needed positions through the LM head (``sepo.core.logprobs``). Where that is not
possible -- FSDP, whose sharded LM head cannot be called outside the root forward, or an architecture whose
last hidden state is not what the head consumes -- it falls back to materialising full logits.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sepo.core.logprobs import full_logits_log_probs, selective_log_probs, selective_log_probs_and_kl
from sepo.errors import SepoError
from sepo.hub import hub_hint, hub_kwargs

log = logging.getLogger(__name__)

STORIES260K = Path(__file__).parent / "assets" / "stories260K"
"""The real pretrained 260K-parameter TinyStories Llama shipped with the package (MIT, see its SOURCE.md)."""

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_path(name_or_path: str) -> str:
    """``stories260k`` is an alias for the bundled model; anything else is a hub id or a local path."""
    return str(STORIES260K) if name_or_path.lower() in ("stories260k", "sepo:stories260k") else name_or_path


def resolve_dtype(name: str):
    if name not in DTYPES:
        raise SepoError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype in (torch.bfloat16, torch.float16) and not torch.cuda.is_available():
        log.warning("dtype %s requested without a GPU; CPU kernels for it are slow", name)
    return dtype


def _refuse_missing_local_path(kind: str, name: str) -> None:
    """A name that can only be a local path (hub ids are `name` or `org/name`) and does not exist: say so now,
    instead of after transformers has retried the hub for it."""
    looks_local = (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
                   or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir()))  # runs/oracle, data/x
    if looks_local and not Path(name).expanduser().exists():
        raise SepoError(f"{kind} '{name}' does not exist: it is a local path (not a hub id `org/name`); check the "
                        "path, or train / download the model there first")


def _load_error(kind: str, name: str, err: Exception) -> SepoError:
    local = Path(name).exists()
    hint = ("the folder exists but is not a complete Hugging Face checkpoint (config.json, weights, tokenizer files)"
            if local else f"not a local folder, and {hub_hint()}")
    return SepoError(f"could not load {kind} '{name}': {hint}. ({type(err).__name__}: {str(err).splitlines()[0][:300]})")


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   padding_side: str = "right"):
    from transformers import AutoTokenizer

    name_or_path = resolve_path(name_or_path)
    _refuse_missing_local_path("tokenizer", name_or_path)
    hub = hub_kwargs("tokenizer", name_or_path, revision=revision)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code, **hub)
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors...
        raise _load_error("tokenizer", name_or_path, e) from None
    tok.padding_side = padding_side
    return ensure_pad_token(tok)


_pad_said: set[tuple[str, str]] = set()


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token one, saying so once per tokenizer and process. Pad positions are
    always masked out, so reusing EOS (or UNK) is safe; the assignment is recorded in every dataset's metadata."""
    if tokenizer.pad_token_id is None:
        fallback = "eos_token" if tokenizer.eos_token is not None else "unk_token"
        token = getattr(tokenizer, fallback)
        if token is None:
            raise SepoError("the tokenizer has neither a pad, an EOS nor an UNK token; add a pad token to it first")
        key = (getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__, token)
        if key not in _pad_said:
            _pad_said.add(key)
            log.warning("tokenizer %s has no pad token; padding with its %s %r (id %d), always masked out", key[0],
                        fallback, token, tokenizer.convert_tokens_to_ids(token))
        tokenizer.pad_token = token
    return tokenizer


def context_limit(config) -> int | None:
    """How many positions a model takes, from its config (None where the config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def shortest_context(**models: str | None) -> tuple[int | None, str]:
    """The fewest positions among the named models (``oracle="runs/oracle", reference="stories260k"``) and which
    one that is, e.g. ``(512, "the oracle stories260k")``: what raw data is truncated to when ``max_length`` is
    unset (``sepo.data.options.with_lengths``). ``(None, "")`` when no config says."""
    found = [(context_limit(load_model_config(name)), f"the {role} {name}") for role, name in models.items() if name]
    found = [(n, who) for n, who in found if n]
    return min(found) if found else (None, "")


def load_model_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config alone (no weights): cheap checks before anything heavy runs."""
    from transformers import AutoConfig

    name_or_path = resolve_path(name_or_path)
    _refuse_missing_local_path("model", name_or_path)
    hub = hub_kwargs("model", name_or_path, revision=revision)
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code, **hub)
    except Exception as e:
        raise _load_error("model", name_or_path, e) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary (token -> id) and special tokens: equal fingerprints = interchangeable ids."""
    from sepo.io import fingerprint

    return fingerprint(sorted(tokenizer.get_vocab().items()), tokenizer.eos_token_id, tokenizer.bos_token_id)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    lora: LoraSettings | None = None,
    trainable: bool = True,
):
    """Load a causal LM (optionally wrapped with LoRA). ``trainable=False`` freezes it and sets eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    name_or_path = resolve_path(name_or_path)
    _refuse_missing_local_path("model", name_or_path)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code,
              **hub_kwargs("model", name_or_path, revision=revision)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    dtype_value = resolve_dtype(dtype)
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    kwargs["dtype" if major_minor >= (4, 56) else "torch_dtype"] = dtype_value
    try:
        with transformers_progress(not is_small_model(name_or_path)):
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as e:
        raise _load_error("model", name_or_path, e) from None
    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None and trainable:
        from peft import LoraConfig, get_peft_model

        targets = lora.target_modules
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
            target_modules=targets[0] if targets == ["all-linear"] else targets))
        if gradient_checkpointing:
            model.enable_input_require_grads()
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


LOADING_BAR_MIN_BYTES = 2**30


@contextlib.contextmanager
def transformers_progress(show: bool):
    """transformers' own progress bars ("Loading weights", "Writing model shards") on or off for a block; the
    switch is global, so it is restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not show and was_enabled:
            hf_logging.enable_progress_bar()


def is_small_model(parameters_or_path) -> bool:
    """Under 1 GiB of weights (a local folder's weight files, or a model's parameters): loaded or saved in
    moments, so a progress bar for it is noise."""
    if isinstance(parameters_or_path, (str, Path)):
        folder = Path(parameters_or_path)
        return folder.is_dir() and sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin")
                                       for f in folder.glob(pattern)) < LOADING_BAR_MIN_BYTES
    return sum(p.numel() * p.element_size() for p in parameters_or_path) < LOADING_BAR_MIN_BYTES


def unwrap(model):
    """The transformers model inside DDP / DeepSpeed / PEFT wrappers."""
    m = model
    while hasattr(m, "module") and not hasattr(m, "config"):
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def output_head(model):
    """The function from final hidden states to logits, including logit scaling / soft-capping where an
    architecture has them (Cohere's ``logit_scale``, Gemma-2's ``final_logit_softcapping``)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    cfg = inner.config
    scale = getattr(cfg, "logit_scale", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if not scale and not cap:
        return head

    def apply(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if scale:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


def selective_head_supported(model) -> bool:
    """Check once per model that head(hidden_states[-1]) reproduces the model's own logits. The answer is
    kept on the model object itself (an id()-keyed cache could hand a freed model's answer to a new one)."""
    inner = unwrap(model)
    ok = getattr(inner, "_sepo_selective_head_ok", None)
    if ok is None:
        ids = torch.arange(3, 11, device=inner.device)[None] % inner.config.vocab_size  # (1, 8)
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            ok = out.hidden_states is not None and torch.allclose(
                output_head(model)(out.hidden_states[-1]).float(), out.logits.float(), atol=1e-3, rtol=1e-3)
        if not ok:
            log.warning("%s: hidden_states[-1] does not reproduce the logits; using full logits (more memory)",
                        type(inner).__name__)
        ok = bool(ok)
        inner._sepo_selective_head_ok = ok
    return ok


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N, T, H) through the model's own forward, with logits for one position only."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def response_log_probs(model, batch, mask: torch.Tensor | None = None, *, chunk_size: int | None = None,
                       full_logits: bool = False) -> torch.Tensor:
    """Per-token log-probs (N, R) fp32 of ``batch.response_ids`` where ``mask`` (default: every response
    token) is True, 0 elsewhere. ``full_logits=True`` forces the plain path (FSDP). ``chunk_size`` None: the
    device's default (``sepo.core.logprobs.default_chunk_size``). A batch carrying its packed layout
    (``batch.shared``, sepo.data.shared_prefix) computes each prompt once where the model supports it."""
    mask = batch.response_mask if mask is None else mask & batch.response_mask
    if batch.shared is not None:
        from sepo.prefix_sharing import prefix_sharing_supported, shared_response_log_probs

        if prefix_sharing_supported(model, full_logits=full_logits):
            return shared_response_log_probs(model, batch, mask, chunk_size=chunk_size, full_logits=full_logits)
    if full_logits or not selective_head_supported(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return full_logits_log_probs(logits, batch.prompt_lengths, batch.response_ids, mask)
    hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)  # (N, T, H)
    return selective_log_probs(hidden, output_head(model), batch.prompt_lengths, batch.response_ids, mask, chunk_size)


def response_log_probs_and_kl(model, ref_model, batch, *, chunk_size: int | None = None):
    """Policy log-probs, reference log-probs and per-token KL(pi_ref || pi_theta), each (N, R) fp32 (TDPO)."""
    if batch.shared is not None:
        from sepo.prefix_sharing import prefix_sharing_supported, shared_response_log_probs_and_kl

        if prefix_sharing_supported(model) and prefix_sharing_supported(ref_model):
            return shared_response_log_probs_and_kl(model, ref_model, batch, chunk_size=chunk_size)
    hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        ref_hidden = final_hidden_states(ref_model, batch.input_ids, batch.attention_mask)
    return selective_log_probs_and_kl(hidden, output_head(model), ref_hidden, output_head(ref_model),
                                      batch.prompt_lengths, batch.response_ids, batch.response_mask, chunk_size)


def check_same_vocabulary(tok_a, tok_b, name_a: str, name_b: str) -> None:
    """Refuse two tokenizers whose ids do not mean the same tokens."""
    if tokenizer_fingerprint(tok_a) != tokenizer_fingerprint(tok_b):
        raise SepoError(
            f"{name_a} and {name_b} have different vocabularies ({len(tok_a)} vs {len(tok_b)} tokens), so the same "
            f"token id means different tokens to them; give a {name_b} that shares the {name_a}'s tokenizer. (Token "
            "rewards can still reach a policy with another tokenizer: `sepo select --policy-tokenizer`.)")
