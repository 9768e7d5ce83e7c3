"""Training speed and memory of `sepo train`'s step per loss, against a naive step measured in the same run.

    python benchmarks/bench_train.py [--steps 4] [--threads 1] [--vocabs 8192,50257] [--json out.json]

Model: a random-init Llama from the tiny-model kit, preset "small" (hidden 128, 4 layers), with a vocabulary of
8,192 or 50,257 tokens; fp32; CPU. One step = forward + backward + AdamW step on a batch of 4 pairs (8 sequences,
prompts 64-128 and responses 32-128 tokens, right-padded), with a seeded 30% token selection.

  ours   -- `sepo train`'s step (sepo.stages.train.compute_loss): chosen and rejected in one forward, the LM head and
            fp32 log-softmax only at response positions (for sepo only the selected ones), in chunks of 64;
            dpo/ipo/rpo read the cached reference log-probs, tdpo runs its in-memory reference.
  naive  -- the plain step: full logits (N, T, V), log_softmax over all of them, gather the labels, mask to the
            response (the same loss function afterwards). A reference loss runs the reference forward the same way
            each step (no cache), as trainers do without precomputed reference log-probs.
  trl    -- TRL's DPOTrainer / CPOTrainer(loss_type="simpo"), only when `trl` is importable (an optional peer).

Tokens/s: non-pad input tokens (prompt + response, chosen + rejected) per second of the FASTEST of the timed steps
(after one warm-up step): the CPU is shared, and the least-disturbed step is the most repeatable figure. Peak memory: each measurement runs in its own process; after the model, batch and warm-up step the
kernel's peak-RSS counter is reset (/proc/self/clear_refs) and the figure is the peak RSS (VmHWM) during the timed
steps minus the RSS before them, so every byte torch allocates on CPU counts.
Targets (issue 4) at vocab >= 50k are against TRL; without TRL the table reports ours vs naive only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = [  # (loss, path)
    ("sft", "ours"), ("sft", "naive"),
    ("dpo", "ours"), ("dpo", "naive"),
    ("simpo", "ours"), ("simpo", "naive"),
    ("sepo", "ours"), ("sepo", "naive"),
    ("tdpo", "ours"),
]
PAIRS = 4


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_batch(vocab: int, seed: int = 0):
    import random

    import torch

    from sepo.data.collate import collate_pairs

    rng = random.Random(seed)
    rows = []
    for i in range(PAIRS):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(64, 128))]
        row = {"index": i, "prompt_input_ids": prompt}
        for side in ("chosen", "rejected"):
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(32, 128))]
            row[f"{side}_input_ids"] = ids
            row[f"{side}_mask"] = [j == 0 or rng.random() < 0.3 for j in range(len(ids))]
            row[f"{side}_ref_logps"] = [-rng.random() * 10 for _ in ids]
        rows.append(row)
    batch = collate_pairs(rows, pad_token_id=0, weight_columns=("chosen_mask", "rejected_mask"),
                          ref_columns=("chosen_ref_logps", "rejected_ref_logps"))
    return batch, int(batch.attention_mask.sum()), torch


def naive_log_probs(model, batch):
    """Full logits, log_softmax over every position and the whole vocabulary, gather, mask.  -> (N, R)"""
    import torch

    from sepo.core.logprobs import response_positions

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()  # (N, T, V)
    logp = torch.log_softmax(logits, dim=-1)[:, :-1]  # (N, T-1, V)
    token_logp = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1): log p(x_{t+1} | x_<=t)
    pos = response_positions(batch.prompt_lengths, batch.response_ids.shape[1]).clamp(0, token_logp.shape[1] - 1)
    return token_logp.gather(1, pos).masked_fill(~batch.response_mask, 0.0)  # (N, R)


def worker(vocab: int, loss: str, path: str, steps: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sepo.core.losses import LOSSES, NEEDS_REFERENCE
    from sepo.stages.train import TrainConfig, compute_loss
    from sepo.testing import tiny_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = tiny_config("llama", "small", vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    ref = None
    if loss == "tdpo" or (path == "naive" and loss in NEEDS_REFERENCE):
        ref = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    batch, tokens, _ = make_batch(vocab)
    cfg = TrainConfig(loss=loss, chunk_size=64)  # what sepo train uses on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if path == "ours":
            out = compute_loss(cfg, model, ref, batch if loss != "sft" else _chosen_only(batch), {})
        else:
            logps = naive_log_probs(model, batch)
            weights = batch.response_mask.float() * (batch.token_weights if loss == "sepo" else 1.0)
            c, r = batch.split(logps)
            wc, wr = batch.split(weights)
            extra = {}
            if loss in NEEDS_REFERENCE:
                with torch.no_grad():
                    extra["ref_chosen_logps"], extra["ref_rejected_logps"] = batch.split(naive_log_probs(ref, batch))
            out = LOSSES[loss](c, r, wc, wr, **extra)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator pools, optimizer state
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    rss0 = _rss_kib("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = min(times)  # the least-disturbed step: the 2 cores are shared, so the mean mostly measures neighbours
    step_tokens = tokens if loss != "sft" or path == "naive" else int(_chosen_only(batch).attention_mask.sum())
    return {"vocab": vocab, "loss": loss, "path": path, "tokens_per_s": step_tokens / seconds,
            "peak_mib": (_rss_kib("VmHWM") - rss0) / 1024, "seconds_per_step": seconds,
            "median_seconds_per_step": sorted(times)[len(times) // 2]}


def _chosen_only(batch):
    """sft trains on prompt + chosen only (as `sepo train` does)."""
    from dataclasses import replace

    b = batch.num_pairs
    return replace(batch, input_ids=batch.input_ids[:b], attention_mask=batch.attention_mask[:b],
                   prompt_lengths=batch.prompt_lengths[:b], response_ids=batch.response_ids[:b],
                   response_mask=batch.response_mask[:b], token_weights=batch.token_weights[:b],
                   ref_logps=batch.ref_logps[:b], include_rejected=False)


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: on a shared 2-core box, 2 threads make OpenMP barriers wait on descheduled peers and step times swing 20x)")
    parser.add_argument("--vocabs", default="8192,50257")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        vocab, loss, path = args.worker.split(":")
        print(json.dumps(worker(int(vocab), loss, path, args.steps, args.threads)))
        return

    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for loss, path in CASES:
            proc = subprocess.run([sys.executable, __file__, "--worker", f"{vocab}:{loss}:{path}", "--steps",
                                   str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                raise SystemExit(f"worker {vocab}:{loss}:{path} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"vocab {vocab:>6} {loss:>6} {path:>6}: {r['tokens_per_s']:8.0f} tok/s  peak {r['peak_mib']:7.1f} MiB",
                  flush=True)

    print("\n| vocab | loss | ours tok/s | naive tok/s | speed-up | ours peak MiB | naive peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["vocab"], r["loss"], r["path"]): r for r in results}
    for vocab in sorted({r["vocab"] for r in results}):
        for loss in dict.fromkeys(loss for loss, _ in CASES):
            ours, naive = by.get((vocab, loss, "ours")), by.get((vocab, loss, "naive"))
            if naive is None:
                print(f"| {vocab} | {loss} | {ours['tokens_per_s']:.0f} | - | - | {ours['peak_mib']:.0f} | - | - |")
                continue
            print(f"| {vocab} | {loss} | {ours['tokens_per_s']:.0f} | {naive['tokens_per_s']:.0f} | "
                  f"{ours['tokens_per_s'] / naive['tokens_per_s']:.2f}x | {ours['peak_mib']:.0f} | "
                  f"{naive['peak_mib']:.0f} | {ours['peak_mib'] / max(naive['peak_mib'], 1e-9):.2f}x |")
    print("\nTRL:", "importable but not wired into this benchmark" if trl_available() else
          "not installed (an optional peer): TRL rows not measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
