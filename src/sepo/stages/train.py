"""`sepo train`: one explicit accelerate loop for sft, dpo, ipo, rdpo, rpo, simpo, rrhf, tdpo and sepo.

    sepo train --config configs/train_sepo.yaml
    sepo train --model stories260k --data runs/selected --loss sepo --output runs/policy gamma=2
    accelerate launch --config_file configs/accelerate/ddp.yaml -m sepo train --config ...

Output folder ``<output>``: the final model (save_pretrained, with its tokenizer; LoRA merged unless
``merge_lora=false``) directly in it, so ``AutoModelForCausalLM.from_pretrained(<output>)`` loads it;
``sepo_metadata.json`` (written last: the run finished), ``train_log.jsonl`` and ``checkpoints/checkpoint-<step>``
(accelerate state: model, optimizer, scheduler, RNG; ``train_state.json``: the data position).
See docs/train.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sepo import __version__
from sepo.config import option, to_dict, validate_choices
from sepo.core.logprobs import default_chunk_size
from sepo.core.losses import LOSSES, NEEDS_REFERENCE, NEEDS_REFERENCE_MODEL, LossOutput
from sepo.data.options import DataOptions
from sepo.errors import ConfigError, SepoError
from sepo.io import dataset_fingerprint, fingerprint

log = logging.getLogger(__name__)
# config field -> loss keyword; None in the config = the loss's own default (see docs/losses.md)
HYPER_PARAMETERS = {"beta": "beta", "gamma": "gamma", "label_smoothing": "label_smoothing", "alpha": "alpha",
                    "tdpo_variant": "variant", "sepo_normalize": "normalize"}
FAULT_ENV = "SEPO_FAULT_KILL_AFTER_STEP"  # fault injection for the kill-and-resume test: SIGKILL after step N


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
    batch_size: int = option(8, "pairs per micro-batch per process (each pair is two sequences)", unit="pairs")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", unit="micro-batches")
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
    resume: bool = option(False, "continue from the latest checkpoint in output (optimizer, scheduler, RNG, data)")
    overwrite: bool = option(False, "replace an existing output folder (with resume: when its checkpoint is from "
                             "another config)")
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
    if cfg.loss in NEEDS_REFERENCE_MODEL:
        logps, ref_logps, kl = response_log_probs_and_kl(model, ref_model, batch, chunk_size=cfg.chunk_size)
        extra["chosen_kl"], extra["rejected_kl"] = batch.split(kl)
    else:
        # ... and only they go through the LM head (for sepo ~30% of the response positions)
        logps = response_log_probs(model, batch, mask=weights.bool(), chunk_size=cfg.chunk_size,
                                   full_logits=full_logits)  # (N, R)
        ref_logps = batch.ref_logps
    if cfg.loss in NEEDS_REFERENCE:
        extra["ref_chosen_logps"], extra["ref_rejected_logps"] = batch.split(ref_logps)
    if cfg.loss == "sepo":
        extra["chosen_lengths"], extra["rejected_lengths"] = batch.split(batch.response_mask.sum(-1).float())
    if not batch.include_rejected:  # sft trains on the chosen half only
        return fn(logps, None, weights, None, **hyper)
    (chosen_logps, rejected_logps), (chosen_w, rejected_w) = batch.split(logps), batch.split(weights)
    return fn(chosen_logps, rejected_logps, chosen_w, rejected_w, **extra, **hyper)


def evaluate(cfg, accelerator, model, ref_model, ds, hyper, collate, full_logits=False) -> dict:
    """Mean loss, rewards, accuracy and margin over held-out pairs (sharded over processes)."""
    from sepo.data.collate import length_bucketed_batches
    from sepo.stages.train_utils import pair_lengths

    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # pairs, loss, chosen, rejected, acc, margin
    batches = length_bucketed_batches(pair_lengths(ds), cfg.batch_size, shuffle=False)
    with torch.no_grad(), accelerator.autocast():
        for positions in batches[accelerator.process_index :: accelerator.num_processes]:
            batch = collate(ds, positions, include_rejected=True).to(accelerator.device)
            out = compute_loss(cfg, model, ref_model, batch, hyper, full_logits)
            sums += torch.tensor([len(positions), float(out.losses.sum()), float(out.chosen_rewards.sum()),
                                  float(out.rejected_rewards.sum()), float(out.accuracies.sum()),
                                  float(out.margins.sum())], dtype=torch.float64, device=sums.device)
    sums = accelerator.reduce(sums, "sum")
    model.train()
    n = max(float(sums[0]), 1.0)
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
    return {f"eval/{k}": float(v) / n for k, v in zip(names, sums[1:])}


# ---------------------------------------------------------------------------------------------- run


def run(cfg: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    from sepo.data import load_pairs
    from sepo.data.collate import collate_pairs, length_bucketed_batches
    from sepo.data.load import check_context_length
    from sepo.models import (
        LoraSettings,
        check_same_vocabulary,
        context_limit,
        load_causal_lm,
        load_model_config,
        load_tokenizer,
        selective_head_supported,
        tokenizer_fingerprint,
    )
    from sepo.stages import train_utils as tu

    if not (cfg.model and cfg.data):
        raise ConfigError("sepo train needs --model and --data")
    started = time.time()
    out = Path(cfg.output)
    hyper = loss_kwargs(cfg)
    selection = trains_on_selection(cfg)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, log_with=cfg.log_with or None, project_dir=str(out))
    set_seed(cfg.seed)
    if cfg.chunk_size is None:
        cfg = dataclasses.replace(cfg, chunk_size=default_chunk_size(accelerator.device))

    # ---- 1. the output folder: fresh, or resumed from its latest checkpoint (touched only once the inputs check out)
    run_key = fingerprint({k: v for k, v in to_dict(cfg).items()
                           if k not in ("resume", "overwrite", "output", "log_with", "eval_steps", "logging_steps")})
    checkpoints = tu.checkpoint_dirs(out) if cfg.resume else []
    checkpoint = checkpoints[-1] if checkpoints else None
    if checkpoint is not None and json.loads((checkpoint / tu.STATE_FILE).read_text())["run_key"] != run_key:
        if not cfg.overwrite:
            raise SepoError(f"{checkpoint} is from another config or data; rerun with the same settings to resume, or "
                            "pass --overwrite to start again")
        checkpoint = None
    clear_output = checkpoint is None and out.exists() and any(out.iterdir())
    if clear_output:
        if not (cfg.overwrite or cfg.resume):
            raise SepoError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it")
        ours = {tu.CHECKPOINTS, "train_log.jsonl", "sepo_metadata.json", "config.json"}
        if not ours & {p.name for p in out.iterdir()}:  # never delete a folder a training run did not write
            raise SepoError(f"{out} exists and was not written by sepo train; choose another --output")

    # ---- 2. tokenizer and data: the selection must have been made with the policy's tokenizer ----
    tokenizer = load_tokenizer(cfg.model)
    for source in (cfg.data, cfg.eval_data):
        if source:
            tu.check_data_tokenizer(source, tokenizer, cfg.model)
    with accelerator.main_process_first():
        pairs, data_meta = load_pairs(cfg.data, tokenizer, cfg.data_options)
        eval_pairs = load_pairs(cfg.eval_data, tokenizer, cfg.data_options)[0] if cfg.eval_data else None
    pairs = tu.take_subset(pairs, cfg.subset, cfg.seed)
    if eval_pairs is None and cfg.eval_size:
        pairs, eval_pairs = tu.split_eval(pairs, cfg.eval_size, cfg.seed)
    tu.check_pairs(pairs, cfg.data, needs_selection=selection)
    if eval_pairs is not None:
        tu.check_pairs(eval_pairs, cfg.eval_data or cfg.data, needs_selection=selection)
    limit = context_limit(load_model_config(cfg.model))
    for part in (pairs, eval_pairs):
        if part is not None:
            check_context_length(part, limit, "policy", cfg.model)
    reference = cfg.reference or cfg.model
    if cfg.loss in NEEDS_REFERENCE:
        check_same_vocabulary(load_tokenizer(reference), tokenizer, "reference", "policy")

    # the inputs are usable: only now is an old run replaced (a bad input must not cost the user their last run)
    if clear_output and accelerator.is_main_process:
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)

    # ---- 3. reference log-probs: computed once, cached beside the data; the reference then leaves memory ----
    if cfg.loss in NEEDS_REFERENCE and cfg.loss not in NEEDS_REFERENCE_MODEL:
        for name, part in (("train", pairs), ("eval", eval_pairs)):
            if part is None:
                continue
            key = fingerprint(tu.model_fingerprint(reference), dataset_fingerprint(part, tu.PAIR_COLUMNS), cfg.dtype)
            cache = tu.reference_cache_dir(cfg.data if name == "train" else (cfg.eval_data or cfg.data), cfg.output, key)
            with accelerator.main_process_first():
                part = tu.attach_reference_logps(part, cache, lambda p=part: tu.compute_reference_logps(
                    load_causal_lm(reference, dtype=cfg.dtype, trainable=False).to(accelerator.device), p,
                    tokenizer.pad_token_id, accelerator.device, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size))
            pairs, eval_pairs = (part, eval_pairs) if name == "train" else (pairs, part)
    ref_model = None
    if cfg.loss in NEEDS_REFERENCE_MODEL:  # tdpo needs the reference's whole distribution at every position
        ref_model = load_causal_lm(reference, dtype=cfg.dtype, trainable=False).to(accelerator.device)

    cached_ref = cfg.loss in NEEDS_REFERENCE and ref_model is None
    columns = [*tu.PAIR_COLUMNS, "index", *(tu.MASK_COLUMNS if selection else ()), *(tu.REF_COLUMNS if cached_ref else ())]

    def collate(ds, positions, include_rejected=cfg.loss != "sft"):
        rows = tu.rows_of(ds, positions, [c for c in columns if c in ds.column_names])
        return collate_pairs(rows, tokenizer.pad_token_id, include_rejected=include_rejected,
                             weight_columns=tu.MASK_COLUMNS if selection else None,
                             ref_columns=tu.REF_COLUMNS if cached_ref else None)

    # ---- 4. policy, optimizer, schedule ----
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules)) if cfg.lora else None
    model = load_causal_lm(cfg.model, dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing, lora=lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    global_batch = cfg.batch_size * accelerator.num_processes
    lengths = tu.pair_lengths(pairs)
    micro_per_epoch = len(length_bucketed_batches(lengths, global_batch, drop_last=accelerator.num_processes > 1))
    if micro_per_epoch == 0:
        raise SepoError(f"{cfg.data}: {len(pairs)} pairs are fewer than one batch of {global_batch} across processes")
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP's sharded LM head cannot be called outside the root forward: materialise full logits there
    full_logits = accelerator.distributed_type == DistributedType.FSDP
    if full_logits and ref_model is not None:
        raise ConfigError("tdpo is not supported under FSDP (it calls both LM heads directly); use DDP or DeepSpeed")
    if not full_logits:  # the one-off selective-head probe runs a forward: do it now, in eval mode (no dropout),
        model.eval()  # so it draws no random numbers after a resumed run restores the RNG
        selective_head_supported(model)
        model.train()
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step, any process count

    # ---- 5. resume: model, optimizer, scheduler and RNG from the checkpoint; the data position from its state ----
    step, state = 0, {}
    if checkpoint is not None:
        state = tu.load_checkpoint(accelerator, checkpoint)
        step = state["step"]
        accelerator.step = step * cfg.gradient_accumulation_steps
        log.info("resumed from %s (step %d of %d)", checkpoint, step, total_steps)
    elif cfg.resume:
        log.info("no checkpoint in %s: starting from the beginning", out)
    log_path = out / "train_log.jsonl"
    if accelerator.is_main_process:
        tu.truncate_log(log_path, step) if step else log_path.unlink(missing_ok=True)
        accelerator.init_trackers("sepo-train", config={k: v for k, v in to_dict(cfg).items()
                                                        if isinstance(v, (int, float, str, bool))})
    log.info("training %s with loss %s on %d pairs (%d eval): %d steps of %d pairs x %d accumulation", cfg.model,
             cfg.loss, len(pairs), len(eval_pairs) if eval_pairs is not None else 0, total_steps, global_batch,
             cfg.gradient_accumulation_steps)

    def record(values: dict) -> None:
        if accelerator.is_main_process:
            log.info("step %d/%d %s", step, total_steps, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        accelerator.log(values, step=step)

    # ---- 6. the loop: micro-batch m of the flat stream over epochs; an optimizer step every accumulation ----
    # sft trains on the chosen half only: a rejected reward of 0, and the accuracy/margin against it, mean nothing
    unlogged = ("rewards/rejected", "rewards/accuracy", "rewards/margin") if cfg.loss == "sft" else ()
    window: dict[str, float] = {}
    window_n, tokens, tick = 0, 0, time.time()
    final_loss, step_losses, metrics = float("nan"), [], dict(state.get("metrics", {}))
    epoch_batches, batches_epoch = [], None  # the batch order of the current epoch, computed once per epoch
    for m in range(step * cfg.gradient_accumulation_steps, total_steps * cfg.gradient_accumulation_steps):
        epoch, b = divmod(m, micro_per_epoch)
        if epoch != batches_epoch:
            epoch_batches = length_bucketed_batches(lengths, global_batch, seed=cfg.seed + epoch,
                                                    drop_last=accelerator.num_processes > 1)
            batches_epoch = epoch
        positions = epoch_batches[b][accelerator.process_index :: accelerator.num_processes]
        batch = collate(pairs, positions).to(accelerator.device)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                result = compute_loss(cfg, model, ref_model, batch, hyper, full_logits)
            loss = result.loss
            bad = torch.tensor(float(not torch.isfinite(loss)), device=accelerator.device)
            if accelerator.reduce(bad, "sum") > 0:
                last = tu.checkpoint_dirs(out)
                raise SepoError(f"non-finite loss ({float(loss.detach())}) at step {step + 1}, micro-batch {m} (dataset rows "
                                f"index={batch.index.tolist()}): lower learning_rate or use float32; nothing was saved "
                                f"after it{f'; the last good checkpoint is {last[-1]}' if last else ''}")
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                # once per optimizer step, but the window is averaged over micro-batches: scale to compensate
                window["grad_norm"] = window.get("grad_norm", 0.0) + float(
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)) * cfg.gradient_accumulation_steps
            optimizer.step()
            optimizer.zero_grad()
        for k, v in result.metrics().items():
            if k in unlogged:
                continue
            window[k] = window.get(k, 0.0) + v
        window_n += 1
        tokens += int(batch.attention_mask.sum())
        step_losses.append(float(loss.detach()))
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        final_loss, step_losses = sum(step_losses) / len(step_losses), []

        if step % cfg.logging_steps == 0 or step == total_steps:
            elapsed = time.time() - tick
            metrics = {f"train/{k}": v / window_n for k, v in window.items()}
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/epoch": (m + 1) / micro_per_epoch,
                            "train/tokens_per_second": tokens * accelerator.num_processes / max(elapsed, 1e-9)})
            record(metrics)
            window, window_n, tokens, tick = {}, 0, 0, time.time()
        if eval_pairs is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
            record(evaluate(cfg, accelerator, model, ref_model, eval_pairs, hyper, collate, full_logits))
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            tu.save_checkpoint(accelerator, out, step, {"step": step, "run_key": run_key, "metrics": metrics},
                               cfg.save_total_limit)
        if os.environ.get(FAULT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # an honest crash, for the resume test

    # ---- 7. final evaluation and the model, saved with its tokenizer ----
    metrics = {**metrics, "final_loss": final_loss}
    if eval_pairs is not None:
        eval_metrics = evaluate(cfg, accelerator, model, ref_model, eval_pairs, hyper, collate, full_logits)
        record(eval_metrics)
        metrics.update(eval_metrics)
    metadata = {
        "stage": "train", "sepo_version": __version__, "source": cfg.data, "model": cfg.model, "loss": cfg.loss,
        "loss_kwargs": hyper, "tokenizer": cfg.model, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "num_rows": len(pairs), "steps": step, "metrics": metrics, "seconds": round(time.time() - started, 2),
        "config": to_dict(cfg), "data_metadata": data_meta,
    }
    tu.save_final_model(accelerator, model, tokenizer, out, merge_lora=cfg.merge_lora, metadata=metadata)
    accelerator.end_training()
    log.info("trained %d steps in %.1fs (final loss %.4f) -> %s", step, time.time() - started, final_loss, out)
    return TrainResult(output_dir=str(out), metrics=metrics, steps=step)

