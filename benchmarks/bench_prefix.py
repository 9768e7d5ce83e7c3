"""Prefix sharing on a body-dominated model: a training step's forward + backward and the scoring forward, with
each prompt computed once (packed pairs) against twice (plain rows), measured in the same process.

    python benchmarks/bench_prefix.py [--pairs 16] [--batch 4] [--rounds 3] [--threads 1] [--json out.json]

Model: the kit's Llama preset "medium" (hidden 512, 8 layers, 8 heads / 4 kv heads, MLP 1,408) with a 32,000-token
vocabulary, fp32, sdpa attention, random init: the transformer body is ~70% of a response position's FLOPs and
all of a prompt position's, as in real models (the kit's head-dominated rows stay in bench_train / bench_score).
Data: the first ``--pairs`` HH-RLHF harmless-base test pairs (split at the last "Assistant:" turn), GPT-2 tokenized
with ids folded into the vocabulary (only lengths matter here), prompts cut to their last 512 tokens and responses
to 256; batches of ``--batch`` pairs in length-sorted order, as `sepo score` and the reference cache make them.

Cases (all in one process, interleaved for ``--rounds`` rounds; each case's fastest round counts):
  train <loss> plain|shared  `sepo.stages.train.compute_loss` (sepo: 30% of tokens selected, dpo: cached reference
                             log-probs, simpo) + backward; the optimizer step (the same for both layouts) is left out
  train dpo kv               the alternative design: the prompt's KV cache (with gradients) reused for both responses
  score plain|shared|kv      `sepo.stages.score.score_batch`: oracle and reference, inference mode
Tokens/s counts the same tokens for every layout (non-pad tokens of the plain rows, prompt counted for both
sides; for score the scored response tokens), so a ratio of tokens/s is a ratio of times. FLOP/s counts the
work each layout actually computes (benchmarks/roofline.py), against the best matmul peak measured in the run (once
before and once in every round, like each case's best round).
Peak memory: RSS high-water mark over each case's run minus the RSS before it (after `malloc_trim`, with the
kernel's counter reset through /proc/self/clear_refs), in the same process.
Targets (issue 13): shared >= 1.4x plain tokens/s for every train loss and for score; peak memory not higher.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import Shape, batch_work, describe, describe_peaks, measure_peaks, roofline  # noqa: E402

LOSSES = ("sepo", "dpo", "simpo")
CHUNK = 64  # the CPU default of sepo train / sepo score


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # freed heap pages back to the OS: each case starts from the same floor
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_batches(args, vocab: int, pad: int):
    """Length-sorted batches of HH pairs, with a seeded 30% selection and made-up cached reference log-probs."""
    from bench_score import load_hh_pairs
    from sepo.data.collate import collate_pairs, length_bucketed_batches
    from sepo.models import load_tokenizer
    from sepo.testing import shared_dir

    tok = load_tokenizer(str(shared_dir() / "tokenizers" / "gpt2"))
    rows = load_hh_pairs(tok, args.pairs, max_prompt=512, max_response=256)
    rng = random.Random(0)
    for row in rows:
        for key in ("prompt", "chosen", "rejected"):
            row[f"{key}_input_ids"] = [t % vocab for t in row[f"{key}_input_ids"]]
        for side in ("chosen", "rejected"):
            n = len(row[f"{side}_input_ids"])
            row[f"{side}_mask"] = [i == 0 or rng.random() < 0.3 for i in range(n)]
            row[f"{side}_ref_logps"] = [-rng.random() * 10 for _ in range(n)]
    lengths = [len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows]
    batches = [collate_pairs([rows[i] for i in b], pad, weight_columns=("chosen_mask", "rejected_mask"),
                             ref_columns=("chosen_ref_logps", "rejected_ref_logps"))
               for b in length_bucketed_batches(lengths, args.batch, shuffle=False)]
    stats = {k: statistics.median(len(r[f"{k}_input_ids"]) for r in rows) for k in ("prompt", "chosen", "rejected")}
    return batches, stats


def kv_cache_log_probs(model, batch, mask, chunk_size: int):
    """The alternative to packing: the prompts run once with a KV cache (kept in the autograd graph), the cache is
    repeated for both sides, and the responses run as a second forward with a holed 2D mask.  -> (2B, R)"""
    from sepo.core.logprobs import selective_log_probs_at
    from sepo.models import output_head

    b = batch.num_pairs
    prompt_lengths = batch.prompt_lengths[:b]
    width = int(prompt_lengths.max())
    prompt_mask = torch.arange(width)[None] < prompt_lengths[:, None]  # (B, P)
    prompt_ids = torch.where(prompt_mask, batch.input_ids[:b, :width], batch.input_ids[0, 0])
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask.long(), use_cache=True, output_hidden_states=True,
                  logits_to_keep=1)
    cache = first.past_key_values
    cache.batch_repeat_interleave(2)  # rows b0 b0 b1 b1 ...: chosen and rejected of each pair
    order = torch.stack([torch.arange(b), torch.arange(b) + b], 1).reshape(-1)  # grid row of each cache row
    ids, resp_mask = batch.response_ids[order], batch.response_mask[order]  # (2B, R)
    attention = torch.cat([prompt_mask.repeat_interleave(2, 0), resp_mask], 1).long()  # (2B, P + R)
    positions = prompt_lengths.repeat_interleave(2)[:, None] + torch.arange(ids.shape[1])[None]  # (2B, R)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    second = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                   output_hidden_states=True, logits_to_keep=1, **{key: cache})
    last_prompt = first.hidden_states[-1][torch.arange(b), prompt_lengths - 1].repeat_interleave(2, 0)  # (2B, H)
    hidden = torch.cat([last_prompt[:, None], second.hidden_states[-1][:, :-1]], 1)  # (2B, R, H): predicts token i
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(2 * b)
    grid = torch.arange(hidden.shape[1]).expand(2 * b, -1)
    return selective_log_probs_at(hidden[inverse], output_head(model), grid, batch.response_ids, mask, chunk_size)


def make_cases(policy, oracle, reference, plain, shared):
    """name -> (step function, batches it runs on, 'train' | 'score', loss)"""
    from sepo.core.losses import LOSSES as LOSS_FNS
    from sepo.stages.score import score_batch
    from sepo.stages.train import TrainConfig, compute_loss

    def train(loss, batches):
        cfg = TrainConfig(loss=loss, chunk_size=CHUNK)

        def step():
            for batch in batches:
                compute_loss(cfg, policy, None, batch, {}).loss.backward()
            policy.zero_grad(set_to_none=True)
        return step

    def train_kv():
        for batch in plain:
            logps = kv_cache_log_probs(policy, batch, batch.response_mask, CHUNK)
            (c, r), (wc, wr) = batch.split(logps), batch.split(batch.response_mask.float())
            ref_c, ref_r = batch.split(batch.ref_logps)
            LOSS_FNS["dpo"](c, r, wc, wr, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r).loss.backward()
        policy.zero_grad(set_to_none=True)

    def score(batches):
        def step():
            with torch.inference_mode():
                for batch in batches:
                    score_batch(oracle, reference, batch, 0.1, CHUNK)
        return step

    def score_kv():
        from sepo.core.rewards import token_rewards

        with torch.inference_mode():
            for batch in plain:
                o = kv_cache_log_probs(oracle, batch, batch.response_mask, CHUNK)
                r = kv_cache_log_probs(reference, batch, batch.response_mask, CHUNK)
                token_rewards(o, r, batch.response_mask, 0.1)

    cases = {}
    for loss in LOSSES:
        cases[f"train {loss} plain"] = (train(loss, plain), plain, "train", loss)
        cases[f"train {loss} shared"] = (train(loss, shared), shared, "train", loss)
    cases["train dpo kv"] = (train_kv, shared, "train", "dpo")  # the kv design computes the packed work
    cases["score plain"] = (score(plain), plain, "score", None)
    cases["score shared"] = (score(shared), shared, "score", None)
    cases["score kv"] = (score_kv, shared, "score", None)
    return cases


def case_flops(shape: Shape, batches, kind: str, loss: str | None) -> int:
    """Model FLOPs of one run of a case: train = 3x the policy forward (head at the positions the loss reads);
    score = two models' forwards (head at every response token)."""
    total = 0
    for batch in batches:
        if kind == "train":
            heads = batch.response_mask & (batch.token_weights.bool() if loss == "sepo" else True)
            total += 3 * batch_work(batch, int(heads.sum())).flops(shape)
        else:
            total += 2 * batch_work(batch).flops(shape)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="HH-RLHF pairs per case")
    parser.add_argument("--batch", type=int, default=4, help="pairs per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: see docs/performance.md)")
    parser.add_argument("--preset", default="medium", help="kit size preset (medium: body-dominated)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from sepo.data.shared_prefix import with_shared_prefix
    from sepo.testing import tiny_config

    pad = 0
    config = tiny_config("llama", args.preset, args.vocab, pad_token_id=pad)
    models = []
    for seed in range(3):  # policy, oracle, reference
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"))
    policy, oracle, reference = models
    policy.train()
    oracle.eval().requires_grad_(False)
    reference.eval().requires_grad_(False)
    plain, medians = load_batches(args, args.vocab, pad)
    shared = [with_shared_prefix(b, pad) for b in plain]
    shape = Shape.of(config)
    peaks = measure_peaks(shape)
    plain_positions = sum(int(b.attention_mask.sum()) for b in plain)
    packed_positions = sum(b.shared.num_positions for b in shared)
    print(f"model: llama preset {args.preset} (hidden {shape.hidden}, {shape.layers} layers), vocab {args.vocab}, fp32, "
          f"{torch.get_num_threads()} thread(s); {args.pairs} HH pairs, median prompt {medians['prompt']} / chosen "
          f"{medians['chosen']} / rejected {medians['rejected']} tokens; positions plain {plain_positions}, packed "
          f"{packed_positions} ({plain_positions / packed_positions:.2f}x fewer)")
    print(describe_peaks(peaks))

    cases = make_cases(policy, oracle, reference, plain, shared)
    for fn, *_ in cases.values():  # warm-up (allocator pools, the one-off probes)
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    peaks_mib: dict[str, float] = {name: 0.0 for name in cases}
    for round_ in range(args.rounds):
        again = measure_peaks(shape)  # the best peak of the run, like the fastest round of each case
        peaks.update({k: max(v, again[k]) for k, v in peaks.items()})
        for name, (fn, *_rest) in cases.items():
            _release_memory()
            rss = _kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            peaks_mib[name] = max(peaks_mib[name], (_kib("VmHWM") - rss) / 1024)
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)

    print(describe_peaks(peaks) + " (the best of the rounds)")
    plain_tokens = plain_positions
    response_tokens = sum(int(b.response_mask.sum()) for b in plain)
    results = {}
    print("\n| case | tokens/s | vs plain | peak MiB | vs plain | model FLOP/s (% of peak) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, (_fn, batches, kind, loss) in cases.items():
        seconds = min(times[name])
        tokens = plain_tokens if kind == "train" else response_tokens
        base = name.rsplit(" ", 1)[0] + " plain"
        r = roofline(case_flops(shape, batches, kind, loss), seconds, peaks)
        results[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mib": peaks_mib[name], **r}
        speed = min(times[base]) / seconds
        memory = peaks_mib[name] / max(peaks_mib[base], 1e-9)
        results[name].update(speed_vs_plain=speed, memory_vs_plain=memory)
        print(f"| {name} | {tokens / seconds:,.0f} | {speed:.2f}x | {peaks_mib[name]:,.0f} | {memory:.2f}x | {describe(r)} |")
    met = all(results[f"{k} shared"]["speed_vs_plain"] >= 1.4 and results[f"{k} shared"]["memory_vs_plain"] <= 1.0
              for k in [f"train {loss}" for loss in LOSSES] + ["score"])
    print("\ntargets (shared >= 1.4x plain tokens/s, peak memory not higher; train per loss and score): "
          + ("met" if met else "missed"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "medians": medians, "peaks": peaks,
                                               "positions": {"plain": plain_positions, "packed": packed_positions},
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
