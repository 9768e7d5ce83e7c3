"""`sepo score`: a reward for every response token, r_t = beta * (log pi_oracle - log pi_ref) (SePO eq. 6).

    sepo score --oracle runs/oracle --reference runs/sft --data runs/pairs --output runs/scores --beta 0.1
    accelerate launch -m sepo score ...          # rows sharded over GPUs, merged by the main process
    torchrun --nproc_per_node 2 -m sepo score ...   # the same with CPU processes

Output: the input pairs plus ``chosen_rewards`` / ``rejected_rewards`` (float32 lists, entry i = reward of
response token i, first token and EOS included) and ``sepo_metadata.json``. Work is written in shards of
``shard_size`` rows, each atomically, under ``<output>.partial/``; rerunning the same command after a kill
skips the finished shards. See docs/score.md.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sepo import __version__
from sepo.config import option, to_dict, validate_choices
from sepo.core.logprobs import default_chunk_size
from sepo.core.rewards import non_finite_rows, token_rewards
from sepo.data.collate import collate_pairs, length_bucketed_batches
from sepo.data.load import check_context_length, recorded_name
from sepo.data.options import DataOptions
from sepo.data.tokenize import TOKEN_ALIGNED_COLUMNS, TOKEN_COLUMNS
from sepo.errors import ConfigError, SepoError
from sepo.io import (
    METADATA_FILE,
    arrow_table,
    atomic_write_json,
    dataset_fingerprint,
    fingerprint,
    load_dataset_dir,
    owns_output,
    read_metadata,
    save_dataset,
)

log = logging.getLogger(__name__)
REWARD_COLUMNS = ("chosen_rewards", "rejected_rewards")


@dataclass
class ScoreConfig:
    """Score every chosen and rejected response token with an oracle and a reference model."""

    oracle: str | None = option(None, "oracle model (DPO-trained on a subset): hub id, local folder or 'stories260k'")
    reference: str | None = option(None, "reference model the oracle was trained from (same tokenizer)")
    data: str | None = option(None, "pairs: a `sepo data prepare` folder, or any source the data layer reads")
    output: str = option("runs/scores", "output dataset folder")
    beta: float = option(0.1, "beta of the oracle's DPO training: the scale of r_t")
    batch_size: int = option(16, "pairs per forward (each pair is two sequences)", unit="pairs")
    shard_size: int = option(2048, "rows written per shard: the unit of resumption and of multi-process work",
                             unit="rows")
    chunk_size: int | None = option(None, "response positions per LM-head + log-softmax chunk (bounds logits "
                                    "memory to chunk_size x vocab); none: 64 on CPU (each chunk then stays below "
                                    "the allocator's mmap threshold: no page faults per chunk), 1024 on GPU",
                                    unit="positions")
    dtype: str = option("float32", "model dtype: float32, bfloat16 or float16 (half precision on GPU); "
                        "log-softmax is always fp32", choices=("auto", "float32", "bfloat16", "float16"))
    tokenizer: str | None = option(None, "tokenizer for raw data (none: the oracle's)")
    overwrite: bool = option(False, "replace an existing output folder and discard a partial run of another config")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading raw data (when data is not a "
                                       "sepo dataset folder)")

    def __post_init__(self):
        validate_choices(self)
        if self.batch_size < 1 or self.shard_size < 1 or (self.chunk_size is not None and self.chunk_size < 1):
            raise ConfigError("batch_size, shard_size and chunk_size must be >= 1")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")


# ---------------------------------------------------------------------------------------------- helpers


def score_batch(oracle, reference, batch, beta: float, chunk_size: int) -> torch.Tensor:
    """(N, R) fp32 rewards of one PairBatch: both models score the same batch through the selective head."""
    from sepo.models import response_log_probs

    mask = batch.attention_mask
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Right padding under a causal mask: no real token can attend to a pad (every pad comes after it),
        # so dropping the padding mask changes no value we read, and attention takes its fused causal path.
        batch = dataclasses.replace(batch, attention_mask=None)
    logp_oracle = response_log_probs(oracle, batch, chunk_size=chunk_size)  # (N, R)
    logp_ref = response_log_probs(reference, batch, chunk_size=chunk_size)  # (N, R)
    return token_rewards(logp_oracle, logp_ref, batch.response_mask, beta)


def score_rows(rows, oracle, reference, pad_token_id: int, device, *, beta: float, batch_size: int,
               chunk_size: int, progress=None) -> dict:
    """Score a Dataset slice; returns its reward columns in row order (float32 lists) and running sums."""
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(rows["prompt_input_ids"], rows["chosen_input_ids"], rows["rejected_input_ids"])]
    out = {"chosen_rewards": [None] * len(rows), "rejected_rewards": [None] * len(rows)}
    stats = {"pairs": len(rows), "chosen_tokens": 0, "rejected_tokens": 0, "chosen_sum": 0.0, "rejected_sum": 0.0,
             "oracle_prefers_chosen": 0}
    columns = [*TOKEN_COLUMNS, "index"] if "index" in rows.column_names else list(TOKEN_COLUMNS)
    # length-bucketed, not shuffled: sorted by length inside buckets, so little padding and a fixed order
    for positions in length_bucketed_batches(lengths, batch_size, shuffle=False):
        picked = rows.select_columns(columns)[positions]
        batch_rows = [dict(zip(picked, values)) for values in zip(*picked.values())]
        batch = collate_pairs(batch_rows, pad_token_id).to(device)
        rewards = score_batch(oracle, reference, batch, beta, chunk_size)  # (2B, R)
        bad = non_finite_rows(rewards, batch.response_mask)
        if bad.numel():
            i = int(bad[0])
            side, pair = ("chosen", i) if i < batch.num_pairs else ("rejected", i - batch.num_pairs)
            raise SepoError(f"non-finite reward (NaN or inf) in the {side} response of dataset row index="
                            f"{int(batch.index[pair])}: the oracle or reference gives non-finite log-probs there. "
                            "Check the model weights, or score in float32 (--dtype float32).")
        rewards, mask = rewards.float().cpu(), batch.response_mask.cpu()
        lengths_r = mask.sum(dim=1).tolist()
        for n in range(2 * batch.num_pairs):
            side = "chosen" if n < batch.num_pairs else "rejected"
            values = rewards[n, : lengths_r[n]]
            out[f"{side}_rewards"][positions[n % batch.num_pairs]] = values.numpy()
            stats[f"{side}_tokens"] += lengths_r[n]
            stats[f"{side}_sum"] += float(values.double().sum())
        margins = (rewards[: batch.num_pairs].double().sum(1) - rewards[batch.num_pairs :].double().sum(1))
        stats["oracle_prefers_chosen"] += int((margins > 0).sum())
        if progress is not None:
            progress.update(int(mask.sum()))
    return {"columns": out, "stats": stats}


def _response_tokens_per_row(ds):
    """Chosen + rejected response tokens of every row, read from Arrow without building Python lists."""
    import pyarrow.compute as pc

    table = arrow_table(ds)
    return sum(pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False) for c in TOKEN_COLUMNS[1:])


def _save_shard(folder: Path, start: int, result: dict) -> None:
    import datasets

    features = datasets.Features({"row": datasets.Value("int64"),
                                  **{c: datasets.List(datasets.Value("float32")) for c in REWARD_COLUMNS}})
    rows = list(range(start, start + len(result["columns"]["chosen_rewards"])))
    shard = datasets.Dataset.from_dict({"row": rows, **result["columns"]}, features=features)
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one "Saving the dataset" bar per shard would bury the scoring bar
    try:
        save_dataset(shard, folder, {"stage": "score-shard", "first_row": start, "stats": result["stats"]})
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------- run


@owns_output()
def run(cfg: ScoreConfig):
    import datasets
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from sepo.models import (
        check_same_vocabulary,
        context_limit,
        load_causal_lm,
        load_tokenizer,
        shortest_context,
        tokenizer_fingerprint,
    )

    if not (cfg.oracle and cfg.reference and cfg.data):
        raise ConfigError("sepo score needs --oracle, --reference and --data")
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise SepoError(f"{out} already exists; choose another --output or pass --overwrite")
    started = time.time()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    # ---- 1. tokenizers: the oracle and the reference must agree on what every id means ----
    oracle_tokenizer = load_tokenizer(cfg.oracle)
    check_same_vocabulary(oracle_tokenizer, load_tokenizer(cfg.reference), "oracle", "reference")
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else oracle_tokenizer
    check_same_vocabulary(tokenizer, oracle_tokenizer, "tokenizer", "oracle")

    # ---- 2. data ----
    with accelerator.main_process_first():
        from sepo.data import load_pairs  # a sepo folder as it is, anything else read and tokenized now

        context, whose = shortest_context(oracle=cfg.oracle, reference=cfg.reference)  # raw data is cut to fit them
        pairs, data_metadata = load_pairs(cfg.data, tokenizer, cfg.data_options, context=context,
                                          whose=whose)  # refuses another tokenizer's ids
    # a scored or selected folder scored again: its old rewards and the masks chosen from them go
    pairs = pairs.remove_columns([c for c in TOKEN_ALIGNED_COLUMNS if c in pairs.column_names])

    # ---- 3. models (before the work folder: a refused input leaves nothing behind) ----
    oracle = load_causal_lm(cfg.oracle, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    reference = load_causal_lm(cfg.reference, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    for role, name, model in (("oracle", cfg.oracle, oracle), ("reference", cfg.reference, reference)):
        check_context_length(pairs, context_limit(model.config), role, name)

    # ---- 4. the work folder: one config, one partial run; finished shards are kept ----
    work = out.parent / f"{out.name}.partial"
    run_key = fingerprint({k: v for k, v in to_dict(cfg).items() if k not in ("overwrite", "output")},
                          dataset_fingerprint(pairs, TOKEN_COLUMNS))
    if accelerator.is_main_process:
        if (work / "run.json").is_file():
            previous = read_metadata_json(work / "run.json")
            if previous.get("run_key") != run_key:
                if not cfg.overwrite:
                    raise SepoError(f"{work} holds a partial run of a different config or data (key {previous.get('run_key')}"
                                    f", this run {run_key}); rerun with the same settings to resume, or pass "
                                    "--overwrite to discard it")
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(work / "run.json", {"run_key": run_key, "config": to_dict(cfg)})
    accelerator.wait_for_everyone()
    num_shards = -(-len(pairs) // cfg.shard_size)
    shard_dirs = [work / f"shard-{s:05d}" for s in range(num_shards)]
    mine = [s for s in range(num_shards) if s % accelerator.num_processes == accelerator.process_index]
    todo = [s for s in mine if not (shard_dirs[s] / METADATA_FILE).is_file()]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d shards of this process already scored in %s", len(mine) - len(todo), len(mine), work)

    # ---- 5. score the shards of this process, each written atomically ----
    chunk_size = cfg.chunk_size or default_chunk_size(accelerator.device)
    spans = [(s * cfg.shard_size, min((s + 1) * cfg.shard_size, len(pairs))) for s in range(num_shards)]
    tokens = _response_tokens_per_row(pairs)  # (rows,)
    total = int(sum(tokens[a:b].sum() for a, b in (spans[s] for s in todo)))
    with tqdm(total=total, unit="tok", unit_scale=True, desc="score (response tokens)",
              disable=not accelerator.is_local_main_process) as progress, torch.inference_mode():
        for s in todo:
            rows = pairs.select(range(*spans[s]))
            result = score_rows(rows, oracle, reference, tokenizer.pad_token_id, accelerator.device, beta=cfg.beta,
                                batch_size=cfg.batch_size, chunk_size=chunk_size, progress=progress)
            _save_shard(shard_dirs[s], spans[s][0], result)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None

    # ---- 6. merge: input columns + reward columns, checked row by row, written atomically ----
    missing = [d.name for d in shard_dirs if not (d / METADATA_FILE).is_file()]
    if missing:
        raise SepoError(f"shards {', '.join(missing)} of {work} are missing after scoring; rerun the same command")
    shards = [load_dataset_dir(d)[0] for d in shard_dirs]
    scored = datasets.concatenate_datasets(shards) if shards else datasets.Dataset.from_dict(
        {"row": [], "chosen_rewards": [], "rejected_rewards": []})
    if scored["row"] != list(range(len(pairs))):
        raise SepoError(f"the shards in {work} do not cover the data row by row; delete {work} and rerun")
    merged = datasets.concatenate_datasets([pairs, scored.remove_columns("row")], axis=1)
    totals: dict = {}
    for d in shard_dirs:
        for k, v in read_metadata(d)["stats"].items():
            totals[k] = totals.get(k, 0) + v
    stats = {
        "num_pairs": len(merged),
        "chosen_tokens": totals.get("chosen_tokens", 0), "rejected_tokens": totals.get("rejected_tokens", 0),
        "mean_chosen_token_reward": totals.get("chosen_sum", 0.0) / max(totals.get("chosen_tokens", 0), 1),
        "mean_rejected_token_reward": totals.get("rejected_sum", 0.0) / max(totals.get("rejected_tokens", 0), 1),
        "oracle_prefers_chosen": totals.get("oracle_prefers_chosen", 0) / max(len(merged), 1),
    }
    metadata = {
        "stage": "score", "sepo_version": __version__, "source": cfg.data, "oracle": cfg.oracle,
        "reference": cfg.reference, "tokenizer": recorded_name(cfg.tokenizer or cfg.oracle),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "beta": cfg.beta, "num_rows": len(merged),
        "stats": stats, "num_processes": accelerator.num_processes, "seconds": round(time.time() - started, 2),
        "config": to_dict(cfg), "data_metadata": data_metadata,
    }
    save_dataset(merged, out, metadata, overwrite=cfg.overwrite)
    shutil.rmtree(work, ignore_errors=True)
    log.info("scored %d pairs (%d response tokens; oracle prefers the chosen response in %.1f%%) -> %s", len(merged),
             stats["chosen_tokens"] + stats["rejected_tokens"], 100 * stats["oracle_prefers_chosen"], out)
    return metadata


def read_metadata_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
