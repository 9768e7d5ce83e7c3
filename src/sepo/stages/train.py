"""`sepo train`: one explicit accelerate loop for every loss of sepo.core.objectives.ALL_LOSSES -- sft, dpo, ipo, rdpo,
rpo, simpo, rrhf, tdpo, sepo and the token-level ones (the SePO variants, tgdpo, sparsepo, sdpo).

    sepo train --config configs/train_sepo.yaml
    sepo train --model stories260k --data runs/selected --loss sepo --output runs/policy gamma=2
    accelerate launch --config_file configs/accelerate/ddp.yaml -m sepo train --config ...
    torchrun --nproc_per_node 2 -m sepo train ...          # 2 CPU processes (gloo)

``run`` reads top to bottom, one named phase each: plan the output folder, load the pairs, plan the steps (the
seeded global batches of sepo.data.loader), attach the reference log-probs, build the optimisation, resume, train,
save. Each loss gets exactly the inputs its signature names (sepo.core.objectives.loss_inputs): cached reference
log-probs, the reference in memory for a per-position KL, the selection, the token rewards, SparsePO's masks. The
loop talks to the device once per optimizer step (one all-reduce of the step's sums and one read-back for
the non-finite check); metrics stay tensors until they are logged.

Output folder ``<output>``: the final model (save_pretrained, with its tokenizer; LoRA merged unless
``merge_lora=false``) directly in it, so ``AutoModelForCausalLM.from_pretrained(<output>)`` loads it;
``sepo_metadata.json`` (written last: the run finished), ``train_log.jsonl`` and ``checkpoints/checkpoint-<step>``
(sepo.stages.checkpoints). A run that replaces a previous one is built in ``<output>.partial`` and swapped in when
complete (sepo.stages.train_output). See docs/train.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import torch

from sepo import __version__
from sepo.config import option, to_dict, validate_choices
from sepo.core.logprobs import default_chunk_size
from sepo.core.losses import METRICS, LossOutput
from sepo.core.objectives import (
    ALL_LOSSES,
    SELECTION_AS_WEIGHTS,
    loss_inputs,
    needs_reference,
    needs_reference_logps,
    needs_reference_model,
    reads_token_rewards,
)
from sepo.core.token_losses import TOKEN_LOSSES
from sepo.data.columns import INDEX, REF_LOGPS_COLUMNS, REWARD_COLUMNS, TOKEN_COLUMNS, selection_columns
from sepo.data.loader import GlobalBatchSampler, PairCollator, pair_loader
from sepo.data.options import DataOptions
from sepo.errors import ConfigError, SepoError
from sepo.io import fingerprint, owns_output
from sepo.stages.train_output import RunFolder

log = logging.getLogger(__name__)
# config field -> loss keyword; None in the config = the loss's own default (see docs/losses.md)
HYPER_PARAMETERS = {"beta": "beta", "gamma": "gamma", "label_smoothing": "label_smoothing", "alpha": "alpha",
                    "tdpo_variant": "variant", "sepo_normalize": "normalize", "ipo_length_normalize": "length_normalize",
                    "rrhf_sft_reduction": "sft_reduction", "anchor_weight": "anchor_weight",
                    "anchor_tokens": "anchor_tokens", "margin": "margin", "sdpo_quantile": "quantile",
                    "sparsepo_l1_reward": "l1_reward", "sparsepo_l1_kl": "l1_kl"}
# SparsePO's learned masks: the authors' defaults (SparseConfig.mask_dropout, mask_weight_decay)
MASK_DROPOUT, MASK_WEIGHT_DECAY = 0.01, 0.01
LEARNED_MASKS = ("learned", "learned_independent")
FAULT_ENV = "SEPO_FAULT_KILL_AFTER_STEP"  # fault injection for the kill-and-resume test: SIGKILL after step N
# config keys that change nothing a checkpoint holds: a run may resume with other values of these (prefix_sharing
# changes only the summation order, ~1e-6 in fp32; it is the switch to flip when a model misbehaves packed)
NOT_IN_RUN_KEY = ("resume", "overwrite", "output", "log_with", "eval_steps", "logging_steps", "num_workers",
                  "prefix_sharing")
# what one optimizer step sums over its micro-batches and processes (one all-reduce): the pairs that count, the
# weighted sums of LossOutput's METRICS, the tokens run through the model and the micro-batches with a non-finite loss
STATS = ("pairs", *METRICS, "tokens", "non_finite")
PAIRS, TOKENS, NON_FINITE = STATS.index("pairs"), STATS.index("tokens"), STATS.index("non_finite")


@dataclass
class TrainConfig:
    """Train a policy (or the SFT reference, or the DPO oracle) with one of the losses of docs/losses.md."""

    model: str | None = option(None, "model to start from: hub id, local folder or 'stories260k'")
    data: str | None = option(None, "pairs: a sepo dataset folder (`sepo select` output for sepo) or any source the "
                              "data layer reads")
    output: str = option("runs/train", "output folder: the final model, train_log.jsonl, checkpoints/")
    loss: str = option("sepo", "training objective (docs/losses.md)", choices=tuple(ALL_LOSSES))
    reference: str | None = option(None, f"reference model of {', '.join(n for n in ALL_LOSSES if needs_reference(n))} "
                                   "(none: the starting model)")
    eval_data: str | None = option(None, "held-out pairs evaluated every eval_steps (none: split eval_size off data)")
    eval_size: float = option(0, "share (< 1) or number (>= 1) of data rows held out for evaluation; 0: none",
                              unit="rows")
    subset: float | None = option(None, "train on a seeded random subset: share (<= 1) or number (> 1) of rows "
                                  "(oracle runs)")
    seed: int = option(0, "seed for data order, subset, eval split, LoRA init and dropout")
    # ---- length and batches
    num_epochs: float = option(1.0, "passes over the training data (ignored when max_steps is set)", unit="epochs")
    max_steps: int | None = option(None, "optimizer steps to train for (overrides num_epochs)", unit="steps")
    batch_size: int = option(8, "pairs per micro-batch per process (each pair is two sequences); an optimizer step "
                             "takes batch_size x processes x gradient_accumulation_steps pairs", unit="pairs")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", unit="micro-batches")
    num_workers: int | None = option(None, "DataLoader worker processes collating batches (per process); none: 0 on "
                                     "CPU (its cores run the model), 2 on an accelerator", unit="processes")
    # ---- optimisation
    learning_rate: float = option(1e-5, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler: str = option("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = option(0.1, "share of the optimizer steps spent warming up linearly")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    # ---- loss hyper-parameters: none = the loss's own default (docs/losses.md); setting one a loss ignores fails
    beta: float | None = option(None, "beta: KL strength (dpo, ipo, rdpo, rpo, tdpo, sepo_dpo's anchor, tgdpo, "
                                "sparsepo, sdpo: 0.1) or reward scale (simpo 2.0)")
    gamma: float | None = option(None, "gamma: reward scale of sepo and the sepo_* losses (1.0); simpo's target "
                                 "margin (0.5)")
    label_smoothing: float | None = option(None, "label-flip rate: cDPO (dpo, 0), rdpo (0.1), simpo (0), sdpo (0)")
    alpha: float | None = option(None, "alpha: NLL weight of rpo, rrhf and sepo_nll (1.0); KL weight of tdpo2 (0.5); "
                                 "token-reward guidance of tgdpo (0.5)")
    tdpo_variant: int | None = option(None, "TDPO1 or TDPO2 (default 2)", choices=(None, 1, 2))
    sepo_normalize: str | None = option(None, "sepo: mean over selected tokens ('selected', default) or divide by "
                                        "the response length ('length')", choices=(None, "selected", "length"))
    ipo_length_normalize: bool | None = option(None, "ipo: divide each log-ratio by its response length (TRL's form); "
                                               "default false, the paper's sums")
    rrhf_sft_reduction: str | None = option(None, "rrhf: the fine-tuning NLL as a token mean ('mean', default) or the "
                                            "paper's sum ('sum')", choices=(None, "mean", "sum"))
    anchor_weight: float | None = option(None, "sepo_dpo, sepo_kl, sepo_logratio: weight lambda of the anchor to the "
                                         "reference (1.0)")
    anchor_tokens: str | None = option(None, "sepo_dpo, sepo_kl, sepo_logratio: tokens the anchor covers, 'all' "
                                       "(sepo_dpo's default) or 'unselected' (the others')",
                                       choices=(None, "all", "unselected"))
    margin: float | None = option(None, "sepo_margin: target margin of SePO's reward, in its units (0.5)")
    sdpo_quantile: float | None = option(None, "sdpo: per response, DPO keeps the tokens at or above this quantile of "
                                         "the policy's distance from what the preference wants (0.6: ~40%)")
    sparsepo_mask: str | None = option(None, "sparsepo's token masks: from the reference's activations ('activation', "
                                       "MaPO) or learned with the policy ('learned': one common mask, default; "
                                       "'learned_independent': separate reward and KL masks)",
                                       choices=(None, "activation", *LEARNED_MASKS))
    sparsepo_l1_reward: float | None = option(None, "sparsepo, learned masks: L1 weight lambda_u on the reward mask (0)")
    sparsepo_l1_kl: float | None = option(None, "sparsepo, learned masks: L1 weight lambda_d on the KL mask (0)")
    sparsepo_mask_dropout: float | None = option(None, f"sparsepo, learned masks: dropout in the mask heads "
                                                 f"({MASK_DROPOUT}, the authors')")
    sparsepo_mask_weight_decay: float | None = option(None, f"sparsepo, learned masks: AdamW weight decay of the mask "
                                                      f"heads ({MASK_WEIGHT_DECAY}, the authors')")
    use_selection: bool | None = option(None, "train on the selected tokens only (the selection's weights, or its "
                                        "masks in older folders); none: true for sepo, false otherwise. The sepo_* "
                                        "losses read the selection as their own input instead")
    # ---- model and precision
    dtype: str = option("float32", "dtype the weights are loaded in", choices=("auto", "float32", "bfloat16", "float16"))
    mixed_precision: str = option("no", "accelerate mixed precision (autocast)", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, ~30% slower)")
    chunk_size: int | None = option(None, "response positions per LM-head + log-softmax chunk (bounds logits memory "
                                    "to chunk_size x vocab); none: 64 on CPU (below the allocator's mmap threshold), "
                                    "1024 on GPU", unit="positions")
    prefix_sharing: bool = option(True, "compute each prompt once per pair: chosen and rejected packed in one row "
                                  "with a block attention mask (exact: fp32 log-probs equal the unshared ones to "
                                  "~1e-6); a model or attention kernel that cannot do it runs plain rows and says so "
                                  "once (docs/performance.md)")
    lora: bool = option(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (scale alpha/r)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: list[str] = option(["all-linear"], "modules given adapters ('all-linear' or names)")
    merge_lora: bool = option(True, "save LoRA merged into the weights (false: save the adapter only)")
    # ---- logging, evaluation, checkpoints
    logging_steps: int = option(10, "log train metrics every this many optimizer steps", unit="steps")
    eval_steps: int | None = option(None, "evaluate every this many steps (none: only at the end)", unit="steps")
    save_steps: int | None = option(None, "checkpoint every this many steps (none: no checkpoints)", unit="steps")
    save_total_limit: int | None = option(2, "keep at most this many checkpoints (none: all)")
    log_with: list[str] = option([], "accelerate trackers besides stdout and train_log.jsonl: tensorboard, wandb, ...")
    resume: bool = option(False, "continue from the latest checkpoint in output (optimizer, scheduler, RNG, data); "
                          "resume only from folders you trust (docs/train.md)")
    overwrite: bool = option(False, "replace an existing output folder (with resume: when its checkpoint is from "
                             "another config); the new run is built beside it and swapped in once complete")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading raw data")

    def __post_init__(self):
        validate_choices(self)
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or (self.chunk_size or 1) < 1:
            raise ConfigError("batch_size, gradient_accumulation_steps and chunk_size must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be >= 1")
        if self.max_steps is None and not self.num_epochs > 0:
            raise ConfigError("num_epochs must be > 0 (or set max_steps)")
        if not 0 <= self.warmup_ratio < 1 or self.learning_rate <= 0:
            raise ConfigError("warmup_ratio must be in [0, 1) and learning_rate > 0")
        for name in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or none)")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError("num_workers must be >= 0 (or none)")
        if self.subset is not None and self.subset <= 0:
            raise ConfigError("subset must be > 0 (a share <= 1 or a row count)")
        loss_kwargs(self)  # a hyper-parameter the loss does not take is an error, not a silent knob
        check_loop_settings(self)
        check_hyper_parameter_values(self)


def trains_on_selection(cfg: TrainConfig) -> bool:
    """Whether the loss counts only the selected tokens (its weights are the selection): use_selection, else sepo."""
    return cfg.use_selection if cfg.use_selection is not None else cfg.loss in SELECTION_AS_WEIGHTS


def needs_selection(cfg: TrainConfig) -> bool:
    """Whether the run reads `sepo select`'s selection: as the loss's weights, or as its own input (sepo_*)."""
    return trains_on_selection(cfg) or "selection" in loss_inputs(cfg.loss)


def sparse_mask_kind(cfg: TrainConfig) -> str | None:
    """SparsePO's masks: 'activation', 'learned' (the default) or 'learned_independent'; None for other losses."""
    return (cfg.sparsepo_mask or "learned") if "token_masks" in loss_inputs(cfg.loss) else None


def check_loop_settings(cfg: TrainConfig) -> None:
    """Settings the loop (not the loss function) reads: each must reach something for the chosen loss."""
    if cfg.use_selection is not None and cfg.loss in TOKEN_LOSSES:
        raise ConfigError(f"use_selection has no effect on loss '{cfg.loss}': its weights are the whole response"
                          f"{' and it reads the selection as its own input' if needs_selection(cfg) else ''}; unset it")
    kind = sparse_mask_kind(cfg)
    for name in ("sparsepo_mask", "sparsepo_mask_dropout", "sparsepo_mask_weight_decay"):
        if getattr(cfg, name) is not None and kind is None:
            raise ConfigError(f"{name}={getattr(cfg, name)} has no effect on loss '{cfg.loss}' (only sparsepo has "
                              "token masks)")
    if kind == "activation":
        for name in ("sparsepo_l1_reward", "sparsepo_l1_kl", "sparsepo_mask_dropout", "sparsepo_mask_weight_decay"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"{name}={getattr(cfg, name)} has no effect with sparsepo_mask=activation (the "
                                  "activation mask is fixed, nothing learns it); use sparsepo_mask=learned")


def check_hyper_parameter_values(cfg: TrainConfig) -> None:
    """Values a loss cannot use are a ConfigError now, not a failure (or a silently inverted objective) at the first
    step, after the reference cache was computed."""
    if cfg.beta is not None and cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0 (got {cfg.beta}); a negative beta inverts the preference")
    if cfg.label_smoothing is not None and not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing is a label-flip rate and must be in [0, 0.5) (got {cfg.label_smoothing})")
    if cfg.alpha is not None and cfg.alpha < 0:
        raise ConfigError(f"alpha must be >= 0 (got {cfg.alpha})")
    if cfg.gamma is not None and cfg.loss == "simpo" and cfg.gamma < 0:
        raise ConfigError(f"gamma is simpo's target margin and must be >= 0 (got {cfg.gamma})")
    if cfg.gamma is not None and cfg.loss != "simpo" and cfg.gamma <= 0:
        raise ConfigError(f"gamma scales {cfg.loss}'s reward and must be > 0 (got {cfg.gamma})")
    for name in ("anchor_weight", "margin", "sparsepo_l1_reward", "sparsepo_l1_kl", "sparsepo_mask_weight_decay"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0 (got {getattr(cfg, name)})")
    if cfg.sdpo_quantile is not None and not 0 <= cfg.sdpo_quantile <= 1:
        raise ConfigError(f"sdpo_quantile must be in [0, 1] (got {cfg.sdpo_quantile})")
    if cfg.sparsepo_mask_dropout is not None and not 0 <= cfg.sparsepo_mask_dropout < 1:
        raise ConfigError(f"sparsepo_mask_dropout must be in [0, 1) (got {cfg.sparsepo_mask_dropout})")


def loss_kwargs(cfg: TrainConfig) -> dict:
    """The hyper-parameters set in ``cfg`` as keywords of ``ALL_LOSSES[cfg.loss]``; ConfigError for one it ignores."""
    accepted = inspect.signature(ALL_LOSSES[cfg.loss]).parameters
    out = {}
    for name, keyword in HYPER_PARAMETERS.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if keyword not in accepted:
            takes = [n for n, k in HYPER_PARAMETERS.items() if k in accepted]
            raise ConfigError(f"{name}={value} has no effect on loss '{cfg.loss}' (it takes: {', '.join(takes) or 'none'})")
        out[keyword] = value
    return out


@dataclass
class TrainResult:
    output_dir: str  # the final model (save_pretrained + tokenizer) is in this folder
    metrics: dict = field(default_factory=dict)  # final_loss, train/* (last logging window), eval/*
    steps: int = 0  # optimizer steps done


@dataclass
class TrainData:
    tokenizer: object
    pairs: object  # datasets.Dataset of the training pairs (after subset and eval split)
    eval_pairs: object | None
    metadata: dict  # the data's sepo_metadata
    reference: object | None = None  # reference_cache.ReferenceLogps of pairs (losses with a cached reference)
    eval_reference: object | None = None


@dataclass
class Optimisation:
    model: torch.nn.Module  # prepared by accelerate (DDP / FSDP / DeepSpeed wrapper)
    ref_model: torch.nn.Module | None  # tdpo, sepo_kl, sparsepo: the reference kept in memory
    optimizer: object
    scheduler: object  # stepped by hand, once per optimizer step
    sampler: GlobalBatchSampler
    loader: object  # prepared DataLoader of training micro-batches
    eval_loader: object | None
    hyper: dict  # the loss's keyword arguments
    full_logits: bool  # FSDP: the sharded LM head cannot be called outside the root forward
    masks: torch.nn.Module | None = None  # sparsepo's learned masks (core.token_masks.SparseMasks), prepared

    @property
    def trained(self) -> list[torch.nn.Module]:
        """The prepared modules the optimizer trains: the policy, and SparsePO's learned masks."""
        return [self.model] if self.masks is None else [self.model, self.masks]

    def train(self, mode: bool = True) -> None:
        for module in self.trained:
            module.train(mode)


# ---------------------------------------------------------------------------------------------- one step


def compute_loss(cfg: TrainConfig, model, ref_model, batch, hyper: dict, full_logits: bool = False,
                 masks=None) -> LossOutput:
    """Policy log-probs of one PairBatch through the selective head (``full_logits``: the plain path, for FSDP), then
    the loss with every input its signature names (sepo.core.objectives.loss_inputs). ``masks``: SparsePO's learned
    masks (None: the activation masks).  All grids (N, R)."""
    from sepo.models import response_log_probs, response_log_probs_and_kl, response_log_probs_kl_and_states

    fn, inputs = ALL_LOSSES[cfg.loss], loss_inputs(cfg.loss)
    weights = batch.response_mask.float()  # (N, R)
    if trains_on_selection(cfg):
        weights = weights * batch.token_weights  # only the selected tokens count ...
    extra: dict = {}
    if "token_masks" in inputs:  # SparsePO: masks from the reference's hidden states of the KL's own forward
        logps, ref_logps, kl, states = response_log_probs_kl_and_states(model, ref_model, batch,
                                                                        chunk_size=cfg.chunk_size)
        extra.update(sparse_masks(batch, states, masks))
    elif "kl" in inputs:
        logps, ref_logps, kl = response_log_probs_and_kl(model, ref_model, batch, chunk_size=cfg.chunk_size)
    else:
        # ... and only they go through the LM head (for sepo ~30% of the response positions)
        logps = response_log_probs(model, batch, mask=weights.bool(), chunk_size=cfg.chunk_size,
                                   full_logits=full_logits)  # (N, R)
        ref_logps, kl = batch.ref_logps, None
    sides = {"kl": (kl, "chosen_kl", "rejected_kl"),
             "ref_logps": (ref_logps, "ref_chosen_logps", "ref_rejected_logps"),
             "selection": (batch.token_weights, "chosen_selection", "rejected_selection"),
             "token_rewards": (batch.token_rewards, "chosen_token_rewards", "rejected_token_rewards"),
             "lengths": (batch.response_mask.sum(-1).float(), "chosen_lengths", "rejected_lengths")}
    for need, (grid, chosen, rejected) in sides.items():
        if need in inputs:
            extra[chosen], extra[rejected] = batch.split(grid)
    if not batch.include_rejected:  # sft trains on the chosen half only
        return fn(logps, None, weights, None, **hyper)
    (chosen_logps, rejected_logps), (chosen_w, rejected_w) = batch.split(logps), batch.split(weights)
    return fn(chosen_logps, rejected_logps, chosen_w, rejected_w, **extra, **hyper)


def sparse_masks(batch, states: list, masks) -> dict:
    """SparsePO's token masks (N, R) from the reference's hidden states at the response positions: the fixed
    activation mask (``masks`` None), or the learned ones, whose gradient reaches the mask heads only (the reference's
    states carry none). Computed every step from the reference forward the KL needs anyway, so nothing is cached."""
    from sepo.core.token_masks import activation_token_mask

    if masks is None:
        with torch.no_grad():
            reward, kl = activation_token_mask(states, batch.response_mask), None
    else:
        reward, kl = masks([s.float() for s in states])
    out = dict(zip(("chosen_reward_mask", "rejected_reward_mask"), batch.split(reward)))
    if kl is not None:
        out.update(zip(("chosen_kl_mask", "rejected_kl_mask"), batch.split(kl)))
    return out


def micro_batch_loss(losses: torch.Tensor, pair_weights: torch.Tensor, step_pairs: int, num_processes: int,
                     accumulation: int) -> torch.Tensor:
    """The loss to backpropagate for one micro-batch, so that the optimizer step's gradient is the mean over the
    step's pairs, however they are split over processes and micro-batches:

        loss = sum_i w_i l_i * (num_processes * accumulation) / step_pairs

    ``accelerator.backward`` divides by ``accumulation`` and DDP / FSDP average over processes, leaving
    sum_{pairs of the step} w_i grad l_i / step_pairs. ``losses``, ``pair_weights`` (B,)."""
    return (losses * pair_weights).sum() * (num_processes * accumulation / step_pairs)


def micro_batch_stats(out: LossOutput, batch, loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(len(STATS),) on the device: what a micro-batch adds to its optimizer step's sums."""
    w = batch.pair_weights
    return torch.cat([w.sum().view(1).to(dtype), out.metric_sums(w).to(dtype),
                      batch.attention_mask.sum().view(1).to(dtype), (~torch.isfinite(loss)).view(1).to(dtype)])


def evaluate(cfg: TrainConfig, accelerator, opt: Optimisation) -> dict:
    """Mean loss, rewards, accuracy and margin over the held-out pairs (sharded over processes; one reduce)."""
    opt.train(False)
    sums = torch.zeros(1 + len(METRICS), dtype=_stats_dtype(accelerator.device), device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for batch in opt.eval_loader:
            out = compute_loss(cfg, opt.model, opt.ref_model, batch, opt.hyper, opt.full_logits, opt.masks)
            w = batch.pair_weights
            sums += torch.cat([w.sum().view(1), out.metric_sums(w)]).to(sums.dtype)
    values = accelerator.reduce(sums, "sum").tolist()
    opt.train()
    return {f"eval/{k}": v / max(values[0], 1.0) for k, v in zip(METRICS, values[1:])}


def _stats_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


# ---------------------------------------------------------------------------------------------- phases


def run_key(cfg: TrainConfig) -> str:
    """What a checkpoint must have been made with to be resumed (the config, less what changes no result)."""
    return fingerprint({k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_RUN_KEY})


def _resolve_defaults(cfg: TrainConfig, accelerator) -> TrainConfig:
    """The device-dependent defaults (none in the config) made concrete."""
    on_cpu = accelerator.device.type == "cpu"
    return dataclasses.replace(cfg, chunk_size=cfg.chunk_size or default_chunk_size(accelerator.device),
                               num_workers=cfg.num_workers if cfg.num_workers is not None else (0 if on_cpu else 2))


def _load_data(cfg: TrainConfig, accelerator) -> TrainData:
    """Tokenizer and pairs, checked once: the data's tokenizer, masks, empty selections, lengths, the reference's
    vocabulary. Nothing has been written yet, so a refused input costs no previous run."""
    from sepo.data import load_pairs
    from sepo.data.load import check_fits_model
    from sepo.models import (
        check_same_vocabulary,
        load_model_config,
        load_tokenizer,
        shortest_context,
    )
    from sepo.stages import train_data as td

    tokenizer = load_tokenizer(cfg.model)
    for source in (cfg.data, cfg.eval_data):
        if source:
            td.check_data_tokenizer(source, tokenizer, cfg.model)
    # raw data is cut to the shorter context of the policy and the reference (when max_length is unset)
    fit = dict(zip(("context", "whose"), shortest_context(policy=cfg.model, reference=cfg.reference or cfg.model)))
    with accelerator.main_process_first():
        pairs, metadata = load_pairs(cfg.data, tokenizer, cfg.data_options, **fit)
        eval_pairs = load_pairs(cfg.eval_data, tokenizer, cfg.data_options, **fit)[0] if cfg.eval_data else None
    pairs = td.take_subset(pairs, cfg.subset, cfg.seed)
    if eval_pairs is None and cfg.eval_size:
        pairs, eval_pairs = td.split_eval(pairs, cfg.eval_size, cfg.seed)
    selection, rewards = needs_selection(cfg), reads_token_rewards(cfg.loss)
    td.check_pairs(pairs, cfg.data, needs_selection=selection, needs_token_rewards=rewards)
    if eval_pairs is not None:
        td.check_pairs(eval_pairs, cfg.eval_data or cfg.data, needs_selection=selection, needs_token_rewards=rewards)
    if rewards:
        _check_scoring_beta(cfg, metadata)
    config = load_model_config(cfg.model)
    for part in (pairs, eval_pairs):
        if part is not None:
            check_fits_model(part, config, "policy", cfg.model, pad_token_id=tokenizer.pad_token_id)
    if needs_reference(cfg.loss):
        check_same_vocabulary(load_tokenizer(cfg.reference or cfg.model), tokenizer, "reference", "policy")
    return TrainData(tokenizer, pairs, eval_pairs, metadata)


def _check_scoring_beta(cfg: TrainConfig, metadata: dict) -> None:
    """TGDPO's authors compute the token rewards with the policy's beta; a warning when the data was scored with
    another (the rewards' scale, hence alpha's effect, then differs from theirs)."""
    scored = metadata.get("beta")
    trained = cfg.beta if cfg.beta is not None else inspect.signature(ALL_LOSSES[cfg.loss]).parameters["beta"].default
    if scored is not None and abs(float(scored) - trained) > 1e-12 * max(1.0, abs(trained)):
        log.warning("%s was scored with beta=%s but %s trains with beta=%s: the token rewards' scale differs from the "
                    "authors' setting (score with the training beta to reproduce it; alpha scales the guidance)",
                    cfg.data, scored, cfg.loss, trained)


def _plan_steps(cfg: TrainConfig, accelerator, pairs) -> GlobalBatchSampler:
    """The optimizer steps of the run and the pairs each draws (the same for any process count)."""
    from sepo.data.rows import pair_lengths

    return GlobalBatchSampler(pair_lengths(pairs), batch_size=cfg.batch_size, num_processes=accelerator.num_processes,
                              accumulation=cfg.gradient_accumulation_steps, seed=cfg.seed, num_steps=cfg.max_steps,
                              num_epochs=cfg.num_epochs)


def _attach_reference(cfg: TrainConfig, accelerator, data: TrainData, sampler: GlobalBatchSampler,
                      folder: RunFolder) -> TrainData:
    """Cached reference log-probs of the rows the run draws (and of the eval rows), computed across the processes
    where the cache lacks them; the reference is in memory only meanwhile. A loss that needs the reference's whole
    distribution (tdpo, sepo_kl, sparsepo) keeps the reference in memory instead and reads its log-probs from it."""
    from sepo.models import load_causal_lm
    from sepo.stages import reference_cache as rc

    if not needs_reference_logps(cfg.loss) or needs_reference_model(cfg.loss):
        return data
    reference = cfg.reference or cfg.model
    found = {}
    for name, part, rows, source in (("train", data.pairs, sampler.rows(), cfg.data),
                                     ("eval", data.eval_pairs, None, cfg.eval_data or cfg.data)):
        if part is None:
            continue
        found[name] = rc.reference_logps(
            part, range(len(part)) if rows is None else rows, key=rc.cache_key(reference, part, cfg.dtype),
            data=source, run_folder=folder.work, accelerator=accelerator,
            load_reference=lambda: load_causal_lm(reference, dtype=cfg.dtype, trainable=False).to(accelerator.device),
            pad_token_id=data.tokenizer.pad_token_id, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size,
            prefix_sharing=cfg.prefix_sharing)
    return dataclasses.replace(data, reference=found.get("train"), eval_reference=found.get("eval"))


def _setup_loaders(cfg: TrainConfig, accelerator, data: TrainData, sampler: GlobalBatchSampler,
                   prefix_sharing: bool = False) -> tuple:
    """-> (train loader, eval loader or None): the sampler's micro-batches, collated in ``num_workers`` workers
    (``prefix_sharing``: packed there too); the held-out pairs in a fixed order, padded to whole global batches as
    well."""
    from sepo.data.loader import PairDataset
    from sepo.data.rows import pair_lengths

    refs = REF_LOGPS_COLUMNS if data.reference is not None else None
    rewards = REWARD_COLUMNS if reads_token_rewards(cfg.loss) else None

    def dataset_and_collator(pairs, joined, include_rejected: bool) -> tuple[PairDataset, PairCollator]:
        selection = selection_columns(pairs.column_names) if needs_selection(cfg) else None  # per folder: eval may differ
        columns = [*TOKEN_COLUMNS, INDEX, *(selection or ()), *(rewards or ())]
        return PairDataset(pairs, columns, joined=joined), PairCollator(
            data.tokenizer.pad_token_id, include_rejected=include_rejected, weight_columns=selection, ref_columns=refs,
            reward_columns=rewards, prefix_sharing=prefix_sharing)

    dataset, collate = dataset_and_collator(data.pairs, data.reference, cfg.loss != "sft")
    loader = pair_loader(dataset, sampler, collate, num_workers=cfg.num_workers)
    if data.eval_pairs is None:
        return loader, None
    eval_sampler = GlobalBatchSampler(pair_lengths(data.eval_pairs), batch_size=cfg.batch_size,
                                      num_processes=accelerator.num_processes, shuffle=False)
    dataset, collate = dataset_and_collator(data.eval_pairs, data.eval_reference, True)
    return loader, pair_loader(dataset, eval_sampler, collate, num_workers=cfg.num_workers)


def _fill_deepspeed_config(cfg: TrainConfig, plugin) -> None:
    """DeepSpeed takes the micro-batch and the clipping from its own config. accelerate fills their "auto" values from
    a loader's ``batch_size`` (None with a batch sampler: it would refuse) and with a clipping of 1.0: give it ours.
    (Not exercised by the CPU test suite: DeepSpeed needs GPUs.)"""
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if plugin.is_auto("gradient_clipping"):
        plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm or 0.0


def _sparse_masks_module(cfg: TrainConfig, accelerator):
    """SparsePO's learned masks (None for any other setting), sized by the reference whose hidden states they read."""
    from accelerate.utils import DistributedType

    from sepo.core.token_masks import SparseMasks
    from sepo.models import load_model_config

    kind = sparse_mask_kind(cfg)
    if kind not in LEARNED_MASKS:
        return None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("sparsepo's learned masks are a second trained module, and accelerate's DeepSpeed engine "
                          "takes one model; use DDP, or sparsepo_mask=activation")
    config = load_model_config(cfg.reference or cfg.model)
    dropout = cfg.sparsepo_mask_dropout if cfg.sparsepo_mask_dropout is not None else MASK_DROPOUT
    return SparseMasks(config.hidden_size, config.num_hidden_layers, independent=kind == "learned_independent",
                       dropout=dropout).train()


def _setup_optimisation(cfg: TrainConfig, accelerator, data: TrainData, sampler: GlobalBatchSampler) -> Optimisation:
    """Policy (LoRA optional), SparsePO's learned masks, AdamW, the schedule, the loaders (packing pairs when
    ``prefix_sharing`` is on and every model that runs them passes the probe); all but the schedule prepared by
    accelerate."""
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    from sepo.models import LoraSettings, load_causal_lm, selective_head_supported
    from sepo.prefix_sharing import prefix_sharing_supported

    full_logits = accelerator.distributed_type == DistributedType.FSDP
    if needs_reference_model(cfg.loss) and full_logits:
        raise ConfigError(f"{cfg.loss} is not supported under FSDP (it calls both LM heads directly); use DDP or "
                          "DeepSpeed")
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules)) if cfg.lora else None
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing, lora=lora)
    model.train()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    masks = _sparse_masks_module(cfg, accelerator)
    if masks is not None:  # their own group, with the authors' weight decay, on the policy's schedule
        groups.append({"params": list(masks.parameters()), "weight_decay": cfg.sparsepo_mask_weight_decay
                       if cfg.sparsepo_mask_weight_decay is not None else MASK_WEIGHT_DECAY})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * sampler.num_steps),
                              num_training_steps=sampler.num_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fill_deepspeed_config(cfg, accelerator.state.deepspeed_plugin)
    if masks is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # a second prepared model: synchronised like the policy, and in the checkpoint (model_1.safetensors)
        model, masks, optimizer = accelerator.prepare(model, masks, optimizer)
    ref_model = None
    if needs_reference_model(cfg.loss):  # the reference's whole distribution at every position: kept in memory
        ref_model = load_causal_lm(cfg.reference or cfg.model, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    # the one-off probes run forwards: do them now, on every process, in eval mode (no dropout), so they draw no
    # random numbers after a resumed run restores the RNG; the loaders are built after them, to know whether to pack
    model.eval()
    if not full_logits:
        selective_head_supported(model)
    # sparsepo reads the reference's hidden states of every layer from plain rows: nothing to pack for it
    sharing = cfg.prefix_sharing and (cfg.loss != "sft" or data.eval_pairs is not None) and \
        "token_masks" not in loss_inputs(cfg.loss) and all(
        prefix_sharing_supported(m, full_logits=full_logits) for m in (model, ref_model) if m is not None)
    model.train()
    if sharing:
        log.info("prefix sharing on: chosen and rejected run as one packed row per pair, each prompt computed once")
    loader, eval_loader = _setup_loaders(cfg, accelerator, data, sampler, prefix_sharing=sharing)
    loader = accelerator.prepare(loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    return Optimisation(model, ref_model, optimizer, scheduler, sampler, loader, eval_loader, loss_kwargs(cfg),
                        full_logits, masks)


def _resume_or_start(cfg: TrainConfig, accelerator, opt: Optimisation, folder: RunFolder) -> tuple[int, dict]:
    """-> (the step to start from, the metrics last logged). Resuming: model, optimizer and RNG from the checkpoint,
    the scheduler and the step from its JSON state; the data position follows from the step (the sampler is a pure
    function of the seed and the global batch). Then the log and the trackers start."""
    from sepo.stages.checkpoints import load_checkpoint, read_state, truncate_log

    step, metrics = 0, {}
    if folder.checkpoint is not None:
        made_with = read_state(folder.checkpoint).get("global_batch")
        if made_with != opt.sampler.global_batch:
            raise SepoError(f"{folder.checkpoint} was made with global batches of {made_with} pairs, this run has "
                            f"{opt.sampler.global_batch} (batch_size x {accelerator.num_processes} processes x "
                            "gradient_accumulation_steps): resume with the process count it was made with")
        state = load_checkpoint(accelerator, folder.checkpoint, opt.scheduler)
        step, metrics = state["step"], dict(state.get("metrics", {}))
        # accelerate counts micro-batches to know where an accumulation ends; load_state restores the count from
        # the RNG file, set it here too so the first resumed micro-batch always starts an optimizer step
        accelerator.step = step * cfg.gradient_accumulation_steps
        log.info("resumed from %s (step %d of %d)", folder.checkpoint, step, opt.sampler.num_steps)
    if accelerator.is_main_process:
        truncate_log(folder.log_file, step) if step else folder.log_file.unlink(missing_ok=True)
        accelerator.init_trackers("sepo-train", config={k: v for k, v in to_dict(cfg).items()
                                                        if isinstance(v, (int, float, str, bool))})
    return step, metrics


@dataclass
class _Recorder:
    """Where logged values go: stdout, train_log.jsonl (main process) and the accelerate trackers."""

    accelerator: object
    path: object
    total_steps: int

    def __call__(self, step: int, values: dict) -> None:
        if self.accelerator.is_main_process:
            log.info("step %d/%d %s", step, self.total_steps, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)


def _non_finite_error(step: int, checks: list, folder: RunFolder, accelerator) -> SepoError:
    """Which micro-batch of the step went non-finite (only now are its values read back)."""
    from sepo.stages.checkpoints import checkpoint_dirs

    where = f"on another process than {accelerator.process_index}"
    for k, (loss, index) in enumerate(checks, start=1):
        if not bool(torch.isfinite(loss)):
            where = f"micro-batch {k} (dataset rows index={index.tolist()}), loss {float(loss)}"
            break
    last = checkpoint_dirs(folder.work)
    return SepoError(f"non-finite loss at step {step}, {where}: lower learning_rate or use float32; nothing was saved "
                     f"after it{f'; the last good checkpoint is {last[-1]}' if last else ''}")


class _Window:
    """The train metrics between two log records: summed on the device step by step, read back once per record."""

    def __init__(self, device, dtype: torch.dtype, unlogged: set):
        self.sums = torch.zeros(len(STATS), dtype=dtype, device=device)
        self.grad_norm = torch.zeros((), dtype=dtype, device=device)
        self.unlogged, self.steps, self.tick = unlogged, 0, time.time()

    def add(self, step_totals: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.sums += step_totals
        if grad_norm is not None:
            self.grad_norm += grad_norm.to(self.grad_norm.dtype)
        self.steps += 1

    def read(self, **extra) -> dict:
        values = torch.cat([self.sums, self.grad_norm.view(1)]).tolist()  # the window's one read-back
        pairs = max(values[PAIRS], 1.0)
        metrics = {f"train/{k}": values[STATS.index(k)] / pairs for k in METRICS if k not in self.unlogged}
        if values[-1]:
            metrics["train/grad_norm"] = values[-1] / self.steps
        metrics.update({f"train/{k}": v for k, v in extra.items()})
        metrics["train/tokens_per_second"] = values[TOKENS] / max(time.time() - self.tick, 1e-9)
        self.sums.zero_(), self.grad_norm.zero_()
        self.steps, self.tick = 0, time.time()
        return metrics


def _train(cfg: TrainConfig, accelerator, opt: Optimisation, folder: RunFolder, step: int, metrics: dict) -> tuple:
    """The loop over micro-batches from ``step`` on; -> (steps done, last logged metrics, final loss)."""
    from sepo.stages.checkpoints import save_checkpoint

    num_processes, accumulation, total_steps = accelerator.num_processes, cfg.gradient_accumulation_steps, \
        opt.sampler.num_steps
    record = _Recorder(accelerator, folder.log_file, total_steps)
    loader = accelerator.skip_first_batches(opt.loader, step * accumulation) if step else opt.loader
    dtype = _stats_dtype(accelerator.device)
    # sft trains on the chosen half only: a rejected reward of 0, and the accuracy/margin against it, mean nothing
    window = _Window(accelerator.device, dtype, {"rewards/rejected", "rewards/accuracy", "rewards/margin"}
                     if cfg.loss == "sft" else set())
    step_sums, checks, totals = torch.zeros(len(STATS), dtype=dtype, device=accelerator.device), [], None
    for batch in loader:
        with accelerator.accumulate(*opt.trained):
            with accelerator.autocast():
                out = compute_loss(cfg, opt.model, opt.ref_model, batch, opt.hyper, opt.full_logits, opt.masks)
            loss = micro_batch_loss(out.losses, batch.pair_weights, batch.step_pairs, num_processes, accumulation)
            step_sums += micro_batch_stats(out, batch, loss.detach(), dtype)
            checks.append((loss.detach(), batch.index))
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                totals = accelerator.reduce(step_sums, "sum")  # the step's one collective
                if totals[NON_FINITE] > 0:  # the step's one read-back, before the optimizer touches the weights
                    raise _non_finite_error(step + 1, checks, folder, accelerator)
                if cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_([p for m in opt.trained for p in m.parameters()],
                                                            cfg.max_grad_norm)
            opt.optimizer.step()
            opt.optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        opt.scheduler.step()
        step += 1
        window.add(totals, grad_norm)
        step_sums, checks = torch.zeros_like(step_sums), []

        if step % cfg.logging_steps == 0 or step == total_steps:
            metrics = window.read(lr=opt.scheduler.get_last_lr()[0], epoch=step / opt.sampler.steps_per_epoch)
            record(step, metrics)
        if opt.eval_loader is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
            record(step, evaluate(cfg, accelerator, opt))
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            save_checkpoint(accelerator, folder.work, {"step": step, "run_key": folder.run_key, "metrics": metrics,
                                                       "global_batch": opt.sampler.global_batch,
                                                       "scheduler": opt.scheduler.state_dict()}, cfg.save_total_limit)
        if os.environ.get(FAULT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # an honest crash, for the resume test
    final_loss = float(totals[STATS.index("loss")] / totals[PAIRS]) if totals is not None else float("nan")
    return step, metrics, final_loss


def _save(cfg: TrainConfig, accelerator, opt: Optimisation, data: TrainData, folder: RunFolder, step: int,
          metrics: dict, final_loss: float, started: float) -> TrainResult:
    """The final evaluation, then the model with its tokenizer (and SparsePO's learned masks) and the metadata (last);
    a replacement is swapped in."""
    from sepo.core.token_masks import MASKS_FILE, save_sparse_masks
    from sepo.models import tokenizer_fingerprint
    from sepo.stages.train_output import save_final_model

    metrics = {**metrics, "final_loss": final_loss}
    if opt.eval_loader is not None:
        eval_metrics = evaluate(cfg, accelerator, opt)
        _Recorder(accelerator, folder.log_file, opt.sampler.num_steps)(step, eval_metrics)
        metrics.update(eval_metrics)
    metadata = {
        "stage": "train", "sepo_version": __version__, "source": cfg.data, "model": cfg.model, "loss": cfg.loss,
        "loss_kwargs": opt.hyper, "tokenizer": cfg.model, "tokenizer_fingerprint": tokenizer_fingerprint(data.tokenizer),
        "num_rows": len(data.pairs), "steps": step, "num_processes": accelerator.num_processes, "metrics": metrics,
        "seconds": round(time.time() - started, 2), "config": to_dict(cfg), "data_metadata": data.metadata,
    }
    also_save = None
    if opt.masks is not None:
        metadata["sparsepo_masks"] = MASKS_FILE

        def also_save(staging):
            save_sparse_masks(accelerator.unwrap_model(opt.masks), staging / MASKS_FILE)
    save_final_model(accelerator, opt.model, data.tokenizer, folder, merge_lora=cfg.merge_lora, metadata=metadata,
                     also_save=also_save)
    accelerator.end_training()
    log.info("trained %d steps in %.1fs (final loss %.4f) -> %s", step, time.time() - started, final_loss, folder.final)
    return TrainResult(output_dir=str(folder.final), metrics=metrics, steps=step)


# ---------------------------------------------------------------------------------------------- run


@owns_output()
def run(cfg: TrainConfig) -> TrainResult:
    from accelerate.utils import set_seed

    from sepo.stages.launch import make_accelerator
    from sepo.stages.train_output import plan_run_folder

    if not (cfg.model and cfg.data):
        raise ConfigError("sepo train needs --model and --data")
    started = time.time()
    folder = plan_run_folder(cfg.output, run_key(cfg), resume=cfg.resume, overwrite=cfg.overwrite)
    accelerator = make_accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                   mixed_precision=cfg.mixed_precision, log_with=cfg.log_with or None,
                                   project_dir=str(folder.work))
    set_seed(cfg.seed)
    cfg = _resolve_defaults(cfg, accelerator)
    data = _load_data(cfg, accelerator)
    sampler = _plan_steps(cfg, accelerator, data.pairs)
    folder.create(accelerator)  # the inputs checked out: only now is anything written
    data = _attach_reference(cfg, accelerator, data, sampler, folder)
    opt = _setup_optimisation(cfg, accelerator, data, sampler)
    step, metrics = _resume_or_start(cfg, accelerator, opt, folder)
    log.info("training %s with loss %s on %d pairs (%d eval): %d steps of %d pairs (%d x %d processes x %d "
             "accumulation)", cfg.model, cfg.loss, len(data.pairs), len(data.eval_pairs or ()), sampler.num_steps,
             sampler.global_batch, cfg.batch_size, accelerator.num_processes, cfg.gradient_accumulation_steps)
    step, metrics, final_loss = _train(cfg, accelerator, opt, folder, step, metrics)
    return _save(cfg, accelerator, opt, data, folder, step, metrics, final_loss, started)
