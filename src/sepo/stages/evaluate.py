"""`sepo eval`: held-out preference accuracy, generation, reward, win rate and KL against a reference.

    sepo eval --model runs/policy --reference stories260k --data runs/pairs-eval \
        --reward sepo.tasks.sentiment:gold_reward_batch --output runs/eval

Output folder (written atomically): ``metrics.json``, ``generations.jsonl`` (prompt, policy and reference
completions with their rewards and the KL term of each policy sample), ``alpaca_eval.json`` (AlpacaEval's model-outputs format) and
``sepo_metadata.json``. See docs/eval.md for the definitions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sepo import __version__
from sepo.config import option, to_dict, validate_choices
from sepo.data.options import DataOptions
from sepo.errors import ConfigError, DataError, SepoError
from sepo.evaluation import (
    alpacaeval_records,
    degeneration,
    generate,
    kl_per_sample,
    load_reward,
    mean_of,
    preference_accuracy,
    win_rate,
    word_vocabulary,
)
from sepo.io import atomic_dir, atomic_write_json, owns_output, write_metadata

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluate a policy: preference accuracy, generations, reward, win rate and KL vs a reference."""

    model: str | None = option(None, "policy to evaluate: hub id, local folder or 'stories260k'")
    reference: str | None = option(None, "reference model (implicit-reward accuracy, win rate, KL); none: skip those")
    data: str | None = option(None, "held-out pairs: a sepo dataset folder, or any source `sepo data prepare` reads")
    output: str = option("runs/eval", "output folder")
    reward: str | None = option(None, "reward for generations: module:function (prompts, completions -> floats) "
                                "or a sequence-classification model; none: no reward, no win rate")
    accuracy_metric: str = option("auto", "pair score: implicit reward vs the reference, length-normalised "
                                  "log-prob, or auto (implicit when a reference is given)",
                                  choices=("auto", "implicit", "logprob"))
    max_pairs: int | None = option(None, "evaluate at most this many pairs (first rows); none: all", unit="pairs")
    num_prompts: int = option(128, "distinct prompts to generate for (0: no generation)", unit="prompts")
    max_new_tokens: int = option(64, "longest generated continuation", unit="tokens")
    do_sample: bool = option(True, "sample (true) or greedy decoding (false)")
    temperature: float = option(1.0, "sampling temperature (KL on samples is unbiased only at 1.0)")
    top_p: float = option(1.0, "nucleus sampling mass (1.0: off)")
    top_k: int = option(0, "top-k sampling (0: off)")
    batch_size: int = option(32, "sequences per forward / generate call", unit="sequences")
    generator_name: str | None = option(None, "the `generator` field of the AlpacaEval export (none: model name)")
    tokenizer: str | None = option(None, "tokenizer (none: the model's own)")
    dtype: str = option("float32", "dtype the models are loaded in", choices=("auto", "float32", "bfloat16", "float16"))
    seed: int = option(0, "sampling seed")
    vocabulary_data: str | None = option(None, "pairs whose prompts and responses define the known words for the "
                                         "unknown_words share (e.g. the training data; none: the eval pairs)")
    overwrite: bool = option(False, "replace an existing output folder")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading raw data (when data is not a "
                                       "sepo dataset folder)")

    def __post_init__(self):
        validate_choices(self)
        if self.accuracy_metric == "implicit" and not self.reference:
            raise ConfigError("accuracy_metric=implicit needs a reference model")
        if self.num_prompts < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("num_prompts must be >= 0, max_new_tokens and batch_size >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be > 0 and top_p in (0, 1]")


def load_eval_pairs(data: str, tokenizer, options: DataOptions, context: tuple[int | None, str] = (None, "")):
    """Tokenized pairs through the data layer: a sepo dataset folder as it is (its tokenizer checked against
    ``tokenizer``), anything else read and tokenized now (cut to ``context``, see ``shortest_context``)."""
    from sepo.data import load_pairs

    ds, _ = load_pairs(data, tokenizer, options, context=context[0], whose=context[1])
    if "prompt" not in ds.column_names:
        raise DataError("no prompt text to generate from", file=data, field="prompt",
                        hint="re-prepare the data with `sepo data prepare`, which keeps it")
    return ds


@dataclass
class _Models:
    """What the phases of one eval share: the device, the tokenizer, the models and the reward."""

    accelerator: Any
    tokenizer: Any
    policy: Any
    reference: Any | None
    reward_fn: Any | None


@owns_output()
def run(cfg: EvalConfig) -> dict:
    if not (cfg.model and cfg.data):
        raise ConfigError("sepo eval needs --model (the policy) and --data (held-out pairs: their prompts are what "
                          "it generates for)")
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise SepoError(f"{out} already exists; choose another --output or pass --overwrite")
    started = time.time()
    models = _setup_models(cfg)
    pairs = _setup_data(cfg, models)
    metrics: dict = {"model": cfg.model, "reference": cfg.reference}
    metrics.update(_preference_accuracy(cfg, models, pairs))
    records: list[dict] = []
    if cfg.num_prompts > 0:
        records = _generate(cfg, models, pairs)
        metrics.update(_generation_metrics(cfg, models, pairs, records))
    metrics["seconds"] = round(time.time() - started, 2)
    _write(cfg, models, metrics, records)
    return metrics


# --------------------------------------------------------------------------- phases


def _setup_models(cfg: EvalConfig) -> _Models:
    from accelerate import Accelerator

    from sepo.models import check_same_vocabulary, load_causal_lm, load_tokenizer

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # loaded first: a wrong --reward fails in seconds, not after the accuracy pass and the generations
    reward_fn = load_reward(cfg.reward, device=accelerator.device) if cfg.reward and cfg.num_prompts > 0 else None
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_causal_lm(cfg.model, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    reference = None
    if cfg.reference:
        reference = load_causal_lm(cfg.reference, dtype=cfg.dtype, trainable=False).to(accelerator.device)
        check_same_vocabulary(tok, load_tokenizer(cfg.reference), "model", "reference")
    return _Models(accelerator, tok, policy, reference, reward_fn)


def _setup_data(cfg: EvalConfig, models: _Models):
    from sepo.data.load import check_fits_model
    from sepo.models import shortest_context

    pairs = load_eval_pairs(cfg.data, models.tokenizer, cfg.data_options,
                            shortest_context(model=cfg.model, reference=cfg.reference))
    if cfg.max_pairs is not None:
        pairs = pairs.select(range(min(cfg.max_pairs, len(pairs))))
    for role, name, model in (("model", cfg.model, models.policy), ("reference", cfg.reference, models.reference)):
        if model is not None:
            check_fits_model(pairs, model.config, role, name, pad_token_id=models.tokenizer.pad_token_id)
    return pairs


def _preference_accuracy(cfg: EvalConfig, models: _Models, pairs) -> dict:
    if not len(pairs):
        return {}
    use_ref = models.reference if (cfg.accuracy_metric == "implicit" or
                                   (cfg.accuracy_metric == "auto" and models.reference is not None)) else None
    acc = preference_accuracy(models.policy, pairs, models.tokenizer.pad_token_id, reference=use_ref,
                              batch_size=cfg.batch_size)
    log.info("preference accuracy (%s): %.3f on %d pairs", acc["metric"], acc["accuracy"], acc["num_pairs"])
    return {"pref_accuracy": acc["accuracy"], "pref_margin": acc["margin"], "pref_metric": acc["metric"],
            "num_pairs": acc["num_pairs"]}


def _generate(cfg: EvalConfig, models: _Models, pairs) -> list[dict]:
    """One policy sample per distinct prompt (the first ``num_prompts``), the reference's beside it, each with
    its reward and, for the policy's, its KL term: the per-prompt records of generations.jsonl."""
    seen: dict[str, list[int]] = {}
    for row in pairs:
        if row["prompt"] not in seen and len(seen) < cfg.num_prompts:
            seen[row["prompt"]] = list(row["prompt_input_ids"])
    prompts, prompt_ids = list(seen), list(seen.values())
    sampling = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "top_k": cfg.top_k, "batch_size": cfg.batch_size, "seed": cfg.seed}
    gen = generate(models.policy, models.tokenizer, prompt_ids, **sampling)
    records = [{"prompt": p, "prompt_input_ids": ids, "output": t, "output_ids": out_ids, "output_tokens": len(out_ids)}
               for p, ids, (t, out_ids) in zip(prompts, prompt_ids, gen)]
    if models.reference is not None:
        for r, (t, _) in zip(records, generate(models.reference, models.tokenizer, prompt_ids, **sampling)):
            r["reference_output"] = t
    if models.reward_fn is not None:
        for r, v in zip(records, models.reward_fn(prompts, [r["output"] for r in records])):
            r["reward"] = v
        if models.reference is not None:
            for r, v in zip(records, models.reward_fn(prompts, [r["reference_output"] for r in records])):
                r["reference_reward"] = v
    if models.reference is not None:
        kls = kl_per_sample(models.policy, models.reference, prompt_ids, [r["output_ids"] for r in records],
                            models.tokenizer.pad_token_id, cfg.batch_size)
        for r, v in zip(records, kls):
            r["kl"] = v
    for r in records:  # the ids were needed for the KL only
        del r["prompt_input_ids"], r["output_ids"]
    return records


def _generation_metrics(cfg: EvalConfig, models: _Models, pairs, records: list[dict]) -> dict:
    """Means over the prompts: reward, win rate, KL, length, and the degeneration indicators."""
    metrics: dict = {"num_prompts": len(records),
                     "mean_output_tokens": sum(r["output_tokens"] for r in records) / max(len(records), 1)}
    if records and "reward" in records[0]:
        rewards = [r["reward"] for r in records]
        metrics["reward"] = sum(rewards) / len(rewards)
        if "reference_reward" in records[0]:
            ref_rewards = [r["reference_reward"] for r in records]
            metrics["reference_reward"] = sum(ref_rewards) / len(ref_rewards)
            metrics["win_rate"] = win_rate(rewards, ref_rewards)
            log.info("reward %.3f vs reference %.3f; win rate %.3f", metrics["reward"], metrics["reference_reward"],
                     metrics["win_rate"])
    if records and "kl" in records[0]:
        metrics["kl"] = mean_of([r["kl"] for r in records])
        log.info("KL(pi || pi_ref) on policy samples: %.4f nats", metrics["kl"])
    metrics.update(degeneration([r["output"] for r in records], _known_words(cfg, pairs)))
    return metrics


def _known_words(cfg: EvalConfig, pairs) -> set[str]:
    """The words of the prompts and responses of ``vocabulary_data`` (none: of the eval pairs)."""
    from sepo.data import load_preference_data
    from sepo.io import METADATA_FILE, load_dataset_dir

    if cfg.vocabulary_data is None:
        texts = pairs
    elif (Path(cfg.vocabulary_data) / METADATA_FILE).is_file():
        texts = load_dataset_dir(cfg.vocabulary_data, ("prompt", "chosen", "rejected"))[0]
    else:
        texts = load_preference_data(cfg.vocabulary_data, cfg.data_options).dataset
    return word_vocabulary(t for column in ("prompt", "chosen", "rejected") for t in texts[column])


def _write(cfg: EvalConfig, models: _Models, metrics: dict, records: list[dict]) -> None:
    from sepo.models import tokenizer_fingerprint

    if not models.accelerator.is_main_process:
        return
    out = Path(cfg.output)
    generator = cfg.generator_name or Path(cfg.model).name
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        atomic_write_json(tmp / "metrics.json", metrics)
        if records:
            (tmp / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            atomic_write_json(tmp / "alpaca_eval.json", alpacaeval_records(
                [r["prompt"] for r in records], [r["output"] for r in records], generator))
        write_metadata(tmp, {"stage": "eval", "sepo_version": __version__, "source": cfg.data,
                             "tokenizer": cfg.tokenizer or cfg.model,
                             "tokenizer_fingerprint": tokenizer_fingerprint(models.tokenizer),
                             "num_rows": len(records), "config": to_dict(cfg)})
    log.info("wrote %s", out)
