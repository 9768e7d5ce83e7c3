"""`sepo score`: a reward for every response token, r_t = beta * (log pi_oracle - log pi_ref) (SePO eq. 6).

    sepo score --oracle runs/oracle --reference runs/sft --data runs/pairs --output runs/scores --beta 0.1
    accelerate launch -m sepo score ...          # rows sharded over GPUs, merged by the main process
    torchrun --nproc_per_node 2 -m sepo score ...   # the same with CPU processes

Output: the input pairs plus ``chosen_rewards`` / ``rejected_rewards`` (float32 lists, entry i = reward of
response token i, first token and EOS included) and ``sepo_metadata.json``. Work is written in shards of
``shard_size`` rows, each atomically, under ``<output>.partial/`` (``sepo.stages.shards``, shared with `sepo
train`'s reference cache); rerunning the same command after a kill skips the finished shards. See docs/score.md.
"""

from __future__ import annotations

import dataclasses
import json
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
from sepo.data.columns import INDEX, REWARD_COLUMNS, TOKEN_ALIGNED_COLUMNS, TOKEN_COLUMNS
from sepo.data.load import check_fits_model, recorded_name
from sepo.data.options import DataOptions
from sepo.data.rows import list_lengths, pair_lengths, rows_of, unpad_rows
from sepo.data.shared_prefix import with_shared_prefix
from sepo.errors import ConfigError, SepoError
from sepo.io import atomic_write_json, dataset_fingerprint, fingerprint, owns_output, save_dataset
from sepo.stages import shards

log = logging.getLogger(__name__)


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
    prefix_sharing: bool = option(True, "compute each prompt once per pair: chosen and rejected packed in one row "
                                  "with a block attention mask (exact: fp32 rewards equal the unshared ones to "
                                  "~1e-6); a model or attention kernel that cannot do it runs plain rows and says so "
                                  "once (docs/performance.md)")
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


# ---------------------------------------------------------------------------------------------- scoring


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
               chunk_size: int, prefix_sharing: bool = False, progress=None) -> dict:
    """Score a Dataset slice; returns its reward columns in row order (float32 arrays) and running sums.
    ``prefix_sharing``: each batch also carries its packed layout (one row per pair, the prompt computed once), run
    by every model that passes ``sepo.prefix_sharing.prefix_sharing_supported`` (the others run the plain rows)."""
    out = {c: [None] * len(rows) for c in REWARD_COLUMNS}
    stats = {"pairs": len(rows), "chosen_tokens": 0, "rejected_tokens": 0, "chosen_sum": 0.0, "rejected_sum": 0.0,
             "oracle_prefers_chosen": 0}
    columns = [*TOKEN_COLUMNS, INDEX] if INDEX in rows.column_names else list(TOKEN_COLUMNS)
    # length-bucketed, not shuffled: sorted by length inside buckets, so little padding and a fixed order
    for positions in length_bucketed_batches(pair_lengths(rows), batch_size, shuffle=False):
        batch = collate_pairs(rows_of(rows, positions, columns), pad_token_id)
        batch = (with_shared_prefix(batch, pad_token_id) if prefix_sharing else batch).to(device)
        rewards = score_batch(oracle, reference, batch, beta, chunk_size)  # (2B, R)
        bad = non_finite_rows(rewards, batch.response_mask)
        if bad.numel():
            i = int(bad[0])
            side, pair = ("chosen", i) if i < batch.num_pairs else ("rejected", i - batch.num_pairs)
            raise SepoError(f"non-finite reward (NaN or inf) in the {side} response of dataset row index="
                            f"{int(batch.index[pair])}: the oracle or reference gives non-finite log-probs there. "
                            "Check the model weights, or score in float32 (--dtype float32).")
        values = unpad_rows(rewards, batch.response_mask)  # 2B float32 arrays
        for n, row_values in enumerate(values):
            side = "chosen" if n < batch.num_pairs else "rejected"
            out[f"{side}_rewards"][positions[n % batch.num_pairs]] = row_values
            stats[f"{side}_tokens"] += len(row_values)
            stats[f"{side}_sum"] += float(row_values.astype("float64").sum())
        sums = [v.astype("float64").sum() for v in values]
        stats["oracle_prefers_chosen"] += sum(int(c > r) for c, r in zip(sums[: batch.num_pairs],
                                                                           sums[batch.num_pairs :]))
        if progress is not None:
            progress.update(int(batch.response_mask.sum()))
    return {"columns": out, "stats": stats}


def _summary(stats: dict, num_rows: int) -> dict:
    """The merged run's statistics from the shards' summed ones."""
    return {
        "num_pairs": num_rows,
        "chosen_tokens": stats.get("chosen_tokens", 0), "rejected_tokens": stats.get("rejected_tokens", 0),
        "mean_chosen_token_reward": stats.get("chosen_sum", 0.0) / max(stats.get("chosen_tokens", 0), 1),
        "mean_rejected_token_reward": stats.get("rejected_sum", 0.0) / max(stats.get("rejected_tokens", 0), 1),
        "oracle_prefers_chosen": stats.get("oracle_prefers_chosen", 0) / max(num_rows, 1),
    }


# ---------------------------------------------------------------------------------------------- phases


def _load_tokenizer(cfg: ScoreConfig):
    """The tokenizer the data is tokenized with; the oracle and the reference must agree on what every id means."""
    from sepo.models import check_same_vocabulary, load_tokenizer

    oracle_tokenizer = load_tokenizer(cfg.oracle)
    check_same_vocabulary(oracle_tokenizer, load_tokenizer(cfg.reference), "oracle", "reference")
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else oracle_tokenizer
    check_same_vocabulary(tokenizer, oracle_tokenizer, "tokenizer", "oracle")
    return tokenizer


def _load_pairs(cfg: ScoreConfig, tokenizer, accelerator):
    """-> (pairs, data metadata): a sepo folder as it is, anything else read and tokenized now (by the main
    process first, so the others read its cache)."""
    from sepo.data import load_pairs

    with accelerator.main_process_first():
        from sepo.models import shortest_context

        context, whose = shortest_context(oracle=cfg.oracle, reference=cfg.reference)  # raw data is cut to fit them
        pairs, data_metadata = load_pairs(cfg.data, tokenizer, cfg.data_options, context=context,
                                          whose=whose)  # refuses another tokenizer's ids
    # a scored or selected folder scored again: its old rewards and the masks chosen from them go
    return pairs.remove_columns([c for c in TOKEN_ALIGNED_COLUMNS if c in pairs.column_names]), data_metadata


def _load_models(cfg: ScoreConfig, accelerator, pairs, pad_token_id: int | None):
    """-> (oracle, reference, whether to pack pairs). Both models frozen on the device; pairs longer than either
    takes, or holding ids (or a pad id) outside either's vocabulary, are refused (before the work folder exists: a refused input leaves nothing behind). With
    ``prefix_sharing`` both are probed now (a model that cannot share says so once): pairs are packed only when
    both can run them."""
    from sepo.models import load_causal_lm
    from sepo.prefix_sharing import prefix_sharing_supported

    oracle = load_causal_lm(cfg.oracle, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    reference = load_causal_lm(cfg.reference, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    for role, name, model in (("oracle", cfg.oracle, oracle), ("reference", cfg.reference, reference)):
        check_fits_model(pairs, model.config, role, name, pad_token_id=pad_token_id)
    sharing = cfg.prefix_sharing and all([prefix_sharing_supported(oracle), prefix_sharing_supported(reference)])
    return oracle, reference, sharing


def _prepare_work_folder(cfg: ScoreConfig, accelerator, pairs) -> Path:
    """``<output>.partial``: one config, one partial run; its finished shards are kept for a rerun."""
    out = Path(cfg.output)
    work = out.parent / f"{out.name}.partial"
    # prefix_sharing changes only the summation order (~1e-6 in fp32): shards made either way are kept
    run_key = fingerprint({k: v for k, v in to_dict(cfg).items() if k not in ("overwrite", "output", "prefix_sharing")},
                          dataset_fingerprint(pairs, TOKEN_COLUMNS))
    if accelerator.is_main_process:
        previous = _read_json(work / "run.json")
        if previous and previous.get("run_key") != run_key:
            if not cfg.overwrite:
                raise SepoError(f"{work} holds a partial run of a different config or data (key {previous.get('run_key')}"
                                f", this run {run_key}); rerun with the same settings to resume, or pass "
                                "--overwrite to discard it")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        shards.remove_partial_pieces(work)
        atomic_write_json(work / "run.json", {"run_key": run_key, "config": to_dict(cfg)})
    accelerator.wait_for_everyone()
    return work


def _score_missing_rows(cfg: ScoreConfig, accelerator, work: Path, pairs, oracle, reference, pad_token_id: int,
                        prefix_sharing: bool):
    """Score the rows no finished shard holds; this process takes every num_processes-th shard."""
    import datasets
    from tqdm.auto import tqdm

    todo, mine = shards.plan(work, range(len(pairs)), cfg.shard_size, accelerator)
    if len(todo) < len(pairs):
        log.info("resuming: %d of %d rows already scored in %s", len(pairs) - len(todo), len(pairs), work)
    tokens = sum(list_lengths(pairs, c) for c in TOKEN_COLUMNS[1:])  # (rows,) response tokens, for the progress bar
    chunk_size = cfg.chunk_size or default_chunk_size(accelerator.device)

    def compute(rows: list[int]):
        result = score_rows(pairs.select(rows), oracle, reference, pad_token_id, accelerator.device, beta=cfg.beta,
                            batch_size=cfg.batch_size, chunk_size=chunk_size, prefix_sharing=prefix_sharing,
                            progress=progress)
        return result["columns"], result["stats"]

    features = {c: datasets.List(datasets.Value("float32")) for c in REWARD_COLUMNS}
    with tqdm(total=int(sum(tokens[rows].sum() for rows in mine)), unit="tok", unit_scale=True,
              desc="score (response tokens)", disable=not accelerator.is_local_main_process) as progress, \
            torch.inference_mode():
        shards.compute_pieces(work, mine, compute, features, accelerator)


def _merge_and_save(cfg: ScoreConfig, accelerator, work: Path, pairs, tokenizer, data_metadata: dict,
                    started: float) -> dict:
    """Input columns + reward columns, every row checked to be scored, written atomically; the work folder goes."""
    import datasets

    from sepo.models import tokenizer_fingerprint

    gathered = shards.gather_pieces(work, len(pairs))
    if not gathered.complete:
        raise SepoError(f"{work} lacks the rewards of {int((gathered.position < 0).sum())} rows after scoring; "
                        "rerun the same command")
    merged = datasets.concatenate_datasets([pairs, gathered.in_row_order()], axis=1)
    stats = _summary(gathered.stats, len(merged))
    metadata = {
        "stage": "score", "sepo_version": __version__, "source": cfg.data, "oracle": cfg.oracle,
        "reference": cfg.reference, "tokenizer": recorded_name(cfg.tokenizer or cfg.oracle),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "beta": cfg.beta, "num_rows": len(merged),
        "stats": stats, "num_processes": accelerator.num_processes, "seconds": round(time.time() - started, 2),
        "config": to_dict(cfg), "data_metadata": data_metadata,
    }
    save_dataset(merged, cfg.output, metadata, overwrite=cfg.overwrite)
    shutil.rmtree(work, ignore_errors=True)
    log.info("scored %d pairs (%d response tokens; oracle prefers the chosen response in %.1f%%) -> %s", len(merged),
             stats["chosen_tokens"] + stats["rejected_tokens"], 100 * stats["oracle_prefers_chosen"], cfg.output)
    return metadata


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------------------------- run


@owns_output()
def run(cfg: ScoreConfig):
    from sepo.stages.launch import make_accelerator

    if not (cfg.oracle and cfg.reference and cfg.data):
        raise ConfigError("sepo score needs --oracle, --reference and --data")
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise SepoError(f"{cfg.output} already exists; choose another --output or pass --overwrite")
    started = time.time()
    accelerator = make_accelerator()
    tokenizer = _load_tokenizer(cfg)
    pairs, data_metadata = _load_pairs(cfg, tokenizer, accelerator)
    oracle, reference, sharing = _load_models(cfg, accelerator, pairs, tokenizer.pad_token_id)
    work = _prepare_work_folder(cfg, accelerator, pairs)
    _score_missing_rows(cfg, accelerator, work, pairs, oracle, reference, tokenizer.pad_token_id, sharing)
    if not accelerator.is_main_process:
        return None
    return _merge_and_save(cfg, accelerator, work, pairs, tokenizer, data_metadata, started)
