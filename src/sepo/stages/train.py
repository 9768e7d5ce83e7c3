"""`sepo train`: one explicit accelerate loop for sft, dpo, ipo, rdpo, rpo, simpo, rrhf, tdpo and sepo.

    sepo train --config configs/train_sepo.yaml
    sepo train --model stories260k --data runs/selected --loss sepo --output runs/policy gamma=2
    accelerate launch --config_file configs/accelerate/ddp.yaml -m sepo train --config ...
    torchrun --nproc_per_node 2 -m sepo train ...          # 2 CPU processes (gloo)

``run`` reads top to bottom, one named phase each: plan the output folder, load the pairs, plan the steps (the
seeded global batches of sepo.data.loader), attach the reference log-probs, build the optimisation, resume, train,
save. The loop talks to the device once per optimizer step (one all-reduce of the step's sums and one read-back for
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
from sepo.core.losses import LOSSES, METRICS, LossOutput, needs_reference, needs_reference_model
from sepo.data.columns import INDEX, MASK_COLUMNS, REF_LOGPS_COLUMNS, TOKEN_COLUMNS
from sepo.data.loader import GlobalBatchSampler, PairCollator, pair_loader
from sepo.data.options import DataOptions
from sepo.errors import ConfigError, SepoError
from sepo.io import fingerprint, owns_output
from sepo.stages.train_output import RunFolder

log = logging.getLogger(__name__)
# config field -> loss keyword; None in the config = the loss's own default (see docs/losses.md)
HYPER_PARAMETERS = {"beta": "beta", "gamma": "gamma", "label_smoothing": "label_smoothing", "alpha": "alpha",
                    "tdpo_variant": "variant", "sepo_normalize": "normalize"}
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
    """Train a policy (or the SFT reference, or the DPO oracle) with one of the losses of sepo.core.losses."""

    model: str | None = option(None, "model to start from: hub id, local folder or 'stories260k'")
    data: str | None = option(None, "pairs: a sepo dataset folder (`sepo select` output for sepo) or any source the "
                              "data layer reads")
    output: str = option("runs/train", "output folder: the final model, train_log.jsonl, checkpoints/")
    loss: str = option("sepo", "training objective", choices=tuple(LOSSES))
    reference: str | None = option(None, "reference model for dpo/ipo/rdpo/rpo/tdpo (none: the starting model)")
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
    beta: float | None = option(None, "beta: KL strength (dpo 0.1, ipo 0.1, rdpo 0.1, rpo 0.1, tdpo 0.1) or reward "
                                "scale (simpo 2.0)")
    gamma: float | None = option(None, "gamma: sepo reward scale (1.0) or simpo target margin (0.5)")
    label_smoothing: float | None = option(None, "label-flip rate: cDPO (dpo, 0), rdpo (0.1), simpo (0)")
    alpha: float | None = option(None, "alpha: NLL weight of rpo (1.0) and rrhf (1.0); KL weight of tdpo2 (0.5)")
    tdpo_variant: int | None = option(None, "TDPO1 or TDPO2 (default 2)", choices=(None, 1, 2))
    sepo_normalize: str | None = option(None, "sepo: mean over selected tokens ('selected', default) or divide by "
                                        "the response length ('length')", choices=(None, "selected", "length"))
    use_selection: bool | None = option(None, "train on the selected tokens only (chosen_mask/rejected_mask); none: "
                                        "true for sepo, false otherwise")
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
        check_hyper_parameter_values(self)


def trains_on_selection(cfg: TrainConfig) -> bool:
    """Whether the loss counts only the selected tokens (chosen_mask / rejected_mask): use_selection, else sepo."""
    return cfg.use_selection if cfg.use_selection is not None else cfg.loss == "sepo"


def check_hyper_parameter_values(cfg: TrainConfig) -> None:
    """Values a loss cannot use are a ConfigError now, not a failure (or a silently inverted objective) at the first
    step, after the reference cache was computed."""
    if cfg.beta is not None and cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0 (got {cfg.beta}); a negative beta inverts the preference")
    if cfg.label_smoothing is not None and not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing is a label-flip rate and must be in [0, 0.5) (got {cfg.label_smoothing})")
    if cfg.alpha is not None and cfg.alpha < 0:
        raise ConfigError(f"alpha must be >= 0 (got {cfg.alpha})")
    if cfg.gamma is not None and cfg.loss == "sepo" and cfg.gamma <= 0:
        raise ConfigError(f"gamma scales sepo's reward and must be > 0 (got {cfg.gamma})")
    if cfg.gamma is not None and cfg.gamma < 0:
        raise ConfigError(f"gamma is simpo's target margin and must be >= 0 (got {cfg.gamma})")


def loss_kwargs(cfg: TrainConfig) -> dict:
    """The hyper-parameters set in ``cfg`` as keywords of ``LOSSES[cfg.loss]``; ConfigError for one it ignores."""
    accepted = inspect.signature(LOSSES[cfg.loss]).parameters
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
    ref_model: torch.nn.Module | None  # tdpo only: the reference kept in memory
    optimizer: object
    scheduler: object  # stepped by hand, once per optimizer step
    sampler: GlobalBatchSampler
    loader: object  # prepared DataLoader of training micro-batches
    eval_loader: object | None
    hyper: dict  # the loss's keyword arguments
    full_logits: bool  # FSDP: the sharded LM head cannot be called outside the root forward


# ---------------------------------------------------------------------------------------------- one step


def compute_loss(cfg: TrainConfig, model, ref_model, batch, hyper: dict, full_logits: bool = False) -> LossOutput:
    """Policy log-probs of one PairBatch through the selective head (``full_logits``: the plain path, for FSDP),
    then the loss.  All grids (N, R)."""
    from sepo.models import response_log_probs, response_log_probs_and_kl

    fn = LOSSES[cfg.loss]
    weights = batch.response_mask.float()  # (N, R)
    if trains_on_selection(cfg):
        weights = weights * batch.token_weights  # only the selected tokens count ...
    extra: dict = {}
    if needs_reference_model(cfg.loss):
        logps, ref_logps, kl = response_log_probs_and_kl(model, ref_model, batch, chunk_size=cfg.chunk_size)
        extra["chosen_kl"], extra["rejected_kl"] = batch.split(kl)
    else:
        # ... and only they go through the LM head (for sepo ~30% of the response positions)
        logps = response_log_probs(model, batch, mask=weights.bool(), chunk_size=cfg.chunk_size,
                                   full_logits=full_logits)  # (N, R)
        ref_logps = batch.ref_logps
    if needs_reference(cfg.loss):
        extra["ref_chosen_logps"], extra["ref_rejected_logps"] = batch.split(ref_logps)
    if cfg.loss == "sepo":
        extra["chosen_lengths"], extra["rejected_lengths"] = batch.split(batch.response_mask.sum(-1).float())
    if not batch.include_rejected:  # sft trains on the chosen half only
        return fn(logps, None, weights, None, **hyper)
    (chosen_logps, rejected_logps), (chosen_w, rejected_w) = batch.split(logps), batch.split(weights)
    return fn(chosen_logps, rejected_logps, chosen_w, rejected_w, **extra, **hyper)


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


def evaluate(cfg: TrainConfig, accelerator, model, ref_model, loader, hyper: dict, full_logits: bool = False) -> dict:
    """Mean loss, rewards, accuracy and margin over the held-out pairs (sharded over processes; one reduce)."""
    model.eval()
    sums = torch.zeros(1 + len(METRICS), dtype=_stats_dtype(accelerator.device), device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for batch in loader:
            out = compute_loss(cfg, model, ref_model, batch, hyper, full_logits)
            w = batch.pair_weights
            sums += torch.cat([w.sum().view(1), out.metric_sums(w)]).to(sums.dtype)
    values = accelerator.reduce(sums, "sum").tolist()
    model.train()
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
    from sepo.data.load import check_context_length
    from sepo.models import (
        check_same_vocabulary,
        context_limit,
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
    selection = trains_on_selection(cfg)
    td.check_pairs(pairs, cfg.data, needs_selection=selection)
    if eval_pairs is not None:
        td.check_pairs(eval_pairs, cfg.eval_data or cfg.data, needs_selection=selection)
    limit = context_limit(load_model_config(cfg.model))
    for part in (pairs, eval_pairs):
        if part is not None:
            check_context_length(part, limit, "policy", cfg.model)
    if needs_reference(cfg.loss):
        check_same_vocabulary(load_tokenizer(cfg.reference or cfg.model), tokenizer, "reference", "policy")
    return TrainData(tokenizer, pairs, eval_pairs, metadata)


def _plan_steps(cfg: TrainConfig, accelerator, pairs) -> GlobalBatchSampler:
    """The optimizer steps of the run and the pairs each draws (the same for any process count)."""
    from sepo.data.rows import pair_lengths

    return GlobalBatchSampler(pair_lengths(pairs), batch_size=cfg.batch_size, num_processes=accelerator.num_processes,
                              accumulation=cfg.gradient_accumulation_steps, seed=cfg.seed, num_steps=cfg.max_steps,
                              num_epochs=cfg.num_epochs)


def _attach_reference(cfg: TrainConfig, accelerator, data: TrainData, sampler: GlobalBatchSampler,
                      folder: RunFolder) -> TrainData:
    """Cached reference log-probs of the rows the run draws (and of the eval rows), computed across the processes
    where the cache lacks them; the reference is in memory only meanwhile. tdpo keeps its reference instead."""
    from sepo.models import load_causal_lm
    from sepo.stages import reference_cache as rc

    if not needs_reference(cfg.loss) or needs_reference_model(cfg.loss):
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

    selection = trains_on_selection(cfg)
    columns = [*TOKEN_COLUMNS, INDEX, *(MASK_COLUMNS if selection else ())]
    refs = REF_LOGPS_COLUMNS if data.reference is not None else None

    def collator(include_rejected: bool) -> PairCollator:
        return PairCollator(data.tokenizer.pad_token_id, include_rejected=include_rejected,
                            weight_columns=MASK_COLUMNS if selection else None, ref_columns=refs,
                            prefix_sharing=prefix_sharing)

    loader = pair_loader(PairDataset(data.pairs, columns, joined=data.reference), sampler,
                         collator(cfg.loss != "sft"), num_workers=cfg.num_workers)
    if data.eval_pairs is None:
        return loader, None
    eval_sampler = GlobalBatchSampler(pair_lengths(data.eval_pairs), batch_size=cfg.batch_size,
                                      num_processes=accelerator.num_processes, shuffle=False)
    return loader, pair_loader(PairDataset(data.eval_pairs, columns, joined=data.eval_reference), eval_sampler,
                               collator(True), num_workers=cfg.num_workers)


def _fill_deepspeed_config(cfg: TrainConfig, plugin) -> None:
    """DeepSpeed takes the micro-batch and the clipping from its own config. accelerate fills their "auto" values from
    a loader's ``batch_size`` (None with a batch sampler: it would refuse) and with a clipping of 1.0: give it ours.
    (Not exercised by the CPU test suite: DeepSpeed needs GPUs.)"""
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if plugin.is_auto("gradient_clipping"):
        plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm or 0.0


def _setup_optimisation(cfg: TrainConfig, accelerator, data: TrainData, sampler: GlobalBatchSampler) -> Optimisation:
    """Policy (LoRA optional), AdamW, the schedule, the loaders (packing pairs when ``prefix_sharing`` is on and
    every model that runs them passes the probe); all but the schedule prepared by accelerate."""
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    from sepo.models import LoraSettings, load_causal_lm, selective_head_supported
    from sepo.prefix_sharing import prefix_sharing_supported

    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules)) if cfg.lora else None
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing, lora=lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * sampler.num_steps),
                              num_training_steps=sampler.num_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fill_deepspeed_config(cfg, accelerator.state.deepspeed_plugin)
    model, optimizer = accelerator.prepare(model, optimizer)
    full_logits = accelerator.distributed_type == DistributedType.FSDP
    ref_model = None
    if needs_reference_model(cfg.loss):  # tdpo needs the reference's whole distribution at every position
        if full_logits:
            raise ConfigError("tdpo is not supported under FSDP (it calls both LM heads directly); use DDP or DeepSpeed")
        ref_model = load_causal_lm(cfg.reference or cfg.model, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    # the one-off probes run forwards: do them now, on every process, in eval mode (no dropout), so they draw no
    # random numbers after a resumed run restores the RNG; the loaders are built after them, to know whether to pack
    model.eval()
    if not full_logits:
        selective_head_supported(model)
    sharing = cfg.prefix_sharing and (cfg.loss != "sft" or data.eval_pairs is not None) and all(
        prefix_sharing_supported(m, full_logits=full_logits) for m in (model, ref_model) if m is not None)
    model.train()
    if sharing:
        log.info("prefix sharing on: chosen and rejected run as one packed row per pair, each prompt computed once")
    loader, eval_loader = _setup_loaders(cfg, accelerator, data, sampler, prefix_sharing=sharing)
    loader = accelerator.prepare(loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    return Optimisation(model, ref_model, optimizer, scheduler, sampler, loader, eval_loader, loss_kwargs(cfg),
                        full_logits)


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
        with accelerator.accumulate(opt.model):
            with accelerator.autocast():
                out = compute_loss(cfg, opt.model, opt.ref_model, batch, opt.hyper, opt.full_logits)
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
                    grad_norm = accelerator.clip_grad_norm_(opt.model.parameters(), cfg.max_grad_norm)
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
            record(step, evaluate(cfg, accelerator, opt.model, opt.ref_model, opt.eval_loader, opt.hyper,
                                  opt.full_logits))
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
    """The final evaluation, then the model with its tokenizer and the metadata (last); a replacement is swapped in."""
    from sepo.models import tokenizer_fingerprint
    from sepo.stages.train_output import save_final_model

    metrics = {**metrics, "final_loss": final_loss}
    if opt.eval_loader is not None:
        eval_metrics = evaluate(cfg, accelerator, opt.model, opt.ref_model, opt.eval_loader, opt.hyper,
                                opt.full_logits)
        _Recorder(accelerator, folder.log_file, opt.sampler.num_steps)(step, eval_metrics)
        metrics.update(eval_metrics)
    metadata = {
        "stage": "train", "sepo_version": __version__, "source": cfg.data, "model": cfg.model, "loss": cfg.loss,
        "loss_kwargs": opt.hyper, "tokenizer": cfg.model, "tokenizer_fingerprint": tokenizer_fingerprint(data.tokenizer),
        "num_rows": len(data.pairs), "steps": step, "num_processes": accelerator.num_processes, "metrics": metrics,
        "seconds": round(time.time() - started, 2), "config": to_dict(cfg), "data_metadata": data.metadata,
    }
    save_final_model(accelerator, opt.model, data.tokenizer, folder, merge_lora=cfg.merge_lora, metadata=metadata)
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
