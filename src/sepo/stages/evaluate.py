"""`sepo eval`: held-out preference accuracy, generation, reward, win rate and KL against a reference.

    sepo eval --model runs/policy --reference stories260k --data runs/pairs-eval \
        --reward sepo.tasks.sentiment:gold_reward_batch --output runs/eval

Output folder (written atomically): ``metrics.json``, ``generations.jsonl`` (prompt, policy and reference
completions with their rewards), ``alpaca_eval.json`` (AlpacaEval's model-outputs format) and
``sepo_metadata.json``. See docs/eval.md for the definitions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sepo import __version__
from sepo.config import option, to_dict, validate_choices
from sepo.data.options import DataOptions
from sepo.errors import ConfigError, DataError, SepoError
from sepo.evaluation import (
    alpacaeval_records,
    generate,
    kl_on_samples,
    load_reward,
    preference_accuracy,
    win_rate,
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


@owns_output()
def run(cfg: EvalConfig) -> dict:
    from accelerate import Accelerator

    from sepo.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint

    if not (cfg.model and cfg.data):
        raise ConfigError("sepo eval needs --model (the policy) and --data (held-out pairs: their prompts are what "
                          "it generates for)")
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise SepoError(f"{out} already exists; choose another --output or pass --overwrite")
    started = time.time()

    # ------------------------------------------------------------------ models and the reward
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # loaded first: a wrong --reward fails in seconds, not after the accuracy pass and the generations
    reward_fn = load_reward(cfg.reward, device=accelerator.device) if cfg.reward and cfg.num_prompts > 0 else None
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    policy = load_causal_lm(cfg.model, dtype=cfg.dtype, trainable=False).to(accelerator.device)
    reference = None
    if cfg.reference:
        reference = load_causal_lm(cfg.reference, dtype=cfg.dtype, trainable=False).to(accelerator.device)
        from sepo.models import check_same_vocabulary

        check_same_vocabulary(tok, load_tokenizer(cfg.reference), "model", "reference")
    metrics: dict = {"model": cfg.model, "reference": cfg.reference}

    # ------------------------------------------------------------------ data
    from sepo.models import shortest_context

    pairs = load_eval_pairs(cfg.data, tok, cfg.data_options, shortest_context(model=cfg.model, reference=cfg.reference))
    if cfg.max_pairs is not None:
        pairs = pairs.select(range(min(cfg.max_pairs, len(pairs))))
    from sepo.data.load import check_context_length
    from sepo.models import context_limit

    for role, name, model in (("model", cfg.model, policy), ("reference", cfg.reference, reference)):
        if model is not None:
            check_context_length(pairs, context_limit(model.config), role, name)

    # ------------------------------------------------------------------ preference accuracy
    if len(pairs):
        use_ref = reference if (cfg.accuracy_metric == "implicit" or
                                (cfg.accuracy_metric == "auto" and reference is not None)) else None
        acc = preference_accuracy(policy, pairs, tok.pad_token_id, reference=use_ref, batch_size=cfg.batch_size)
        metrics.update(pref_accuracy=acc["accuracy"], pref_margin=acc["margin"], pref_metric=acc["metric"],
                       num_pairs=acc["num_pairs"])
        log.info("preference accuracy (%s): %.3f on %d pairs", acc["metric"], acc["accuracy"], acc["num_pairs"])

    # ------------------------------------------------------------------ generation
    records: list[dict] = []
    if cfg.num_prompts > 0:
        seen: dict[str, list[int]] = {}
        for row in pairs:
            if row["prompt"] not in seen and len(seen) < cfg.num_prompts:
                seen[row["prompt"]] = list(row["prompt_input_ids"])
        prompts, prompt_ids = list(seen), list(seen.values())
        sampling = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "temperature": cfg.temperature,
                    "top_p": cfg.top_p, "top_k": cfg.top_k, "batch_size": cfg.batch_size, "seed": cfg.seed}
        gen = generate(policy, tok, prompt_ids, **sampling)
        records = [{"prompt": p, "output": t, "output_tokens": len(ids)} for p, (t, ids) in zip(prompts, gen)]
        metrics["num_prompts"] = len(prompts)
        metrics["mean_output_tokens"] = sum(r["output_tokens"] for r in records) / max(len(records), 1)
        ref_gen = generate(reference, tok, prompt_ids, **sampling) if reference is not None else None
        if ref_gen is not None:
            for r, (t, _) in zip(records, ref_gen):
                r["reference_output"] = t

        # -------------------------------------------------------------- reward and win rate
        if reward_fn is not None:
            rewards = reward_fn(prompts, [r["output"] for r in records])
            for r, v in zip(records, rewards):
                r["reward"] = v
            metrics["reward"] = sum(rewards) / len(rewards)
            if ref_gen is not None:
                ref_rewards = reward_fn(prompts, [t for t, _ in ref_gen])
                for r, v in zip(records, ref_rewards):
                    r["reference_reward"] = v
                metrics["reference_reward"] = sum(ref_rewards) / len(ref_rewards)
                metrics["win_rate"] = win_rate(rewards, ref_rewards)
                log.info("reward %.3f vs reference %.3f; win rate %.3f", metrics["reward"],
                         metrics["reference_reward"], metrics["win_rate"])

        # -------------------------------------------------------------- KL on the policy's samples
        if reference is not None:
            metrics["kl"] = kl_on_samples(policy, reference, prompt_ids, [ids for _, ids in gen], tok.pad_token_id,
                                          cfg.batch_size)
            log.info("KL(pi || pi_ref) on policy samples: %.4f nats", metrics["kl"])

    # ------------------------------------------------------------------ write
    metrics["seconds"] = round(time.time() - started, 2)
    if accelerator.is_main_process:
        generator = cfg.generator_name or Path(cfg.model).name
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            atomic_write_json(tmp / "metrics.json", metrics)
            if records:
                (tmp / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
                atomic_write_json(tmp / "alpaca_eval.json", alpacaeval_records(
                    [r["prompt"] for r in records], [r["output"] for r in records], generator))
            write_metadata(tmp, {"stage": "eval", "sepo_version": __version__, "source": cfg.data,
                                 "tokenizer": cfg.tokenizer or cfg.model,
                                 "tokenizer_fingerprint": tokenizer_fingerprint(tok), "num_rows": len(records),
                                 "config": to_dict(cfg)})
        log.info("wrote %s", out)
    return metrics
