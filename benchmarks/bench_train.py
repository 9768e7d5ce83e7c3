"""Training speed and memory of `sepo train`'s step per loss, against a naive step measured in the same run.

    python benchmarks/bench_train.py [--steps 4] [--threads 1] [--vocabs 8192,50257] [--json out.json]

Model: a random-init Llama from the tiny-model kit, preset "small" (hidden 128, 4 layers), with a vocabulary of
8,192 or 50,257 tokens; fp32; CPU. One step = forward + backward + AdamW step on a batch of 4 pairs (8 sequences,
prompts 64-128 and responses 32-128 tokens ending with EOS, right-padded), with a seeded 30% token selection.

  ours   -- `sepo train`'s micro-batch (sepo.stages.train.compute_loss, then micro_batch_loss and micro_batch_stats as
            the loop runs them): chosen and rejected in one forward, the LM head and
            fp32 log-softmax only at response positions (for sepo only the selected ones), in chunks of 64;
            dpo/ipo/rpo read the cached reference log-probs, tdpo runs its in-memory reference. Each prompt is
            computed twice (``prefix_sharing=false``).
  shared -- the same step with prefix sharing, `sepo train`'s default: one packed row [prompt | chosen | rejected]
            per pair (sepo.data.shared_prefix), each prompt computed once (dpo, simpo, sepo, tdpo; sft trains on the
            chosen side only and has nothing to share).
  naive  -- the plain step: full logits (N, T, V), log_softmax over all of them, gather the labels, mask to the
            response (the same loss function afterwards). A reference loss runs the reference forward the same way
            each step (no cache), as trainers do without precomputed reference log-probs.
  trl    -- TRL's trainers, only when `trl` is importable (an optional peer, never a dependency): DPOTrainer with its
            reference model in memory (dpo/trl), DPOTrainer(precompute_ref_log_probs=True) (dpo/trl_precomputed) and
            CPOTrainer(loss_type="simpo", cpo_alpha=0), i.e. pure SimPO (simpo/trl). Same model and the same 8 token
            sequences (checked), fp32; one step = the trainer's own training_step + optimizer.step + zero_grad
            (see trl_step for the settings).

Tokens/s: non-pad input tokens (prompt + response, chosen + rejected) per second of the FASTEST of the timed steps
(after one warm-up step): the CPU is shared, and the least-disturbed step is the most repeatable figure. Peak memory: each measurement runs in its own process; after the model, batch and warm-up step the
kernel's peak-RSS counter is reset (/proc/self/clear_refs) and the figure is the peak RSS (VmHWM) during the timed
steps minus the RSS before them, so every byte torch allocates on CPU counts.
Roofline: each case's model FLOPs per step (benchmarks/roofline.py) over its fastest step, as a share of the matmul
peak measured at the start of the run with the workers' thread count.
Targets (issue 4) at vocab >= 50k are against TRL: sepo >= 2x TRL SimPO's and >= 4x TRL DPO's tokens/s with <= 0.5x
TRL DPO's peak memory; dpo with the cached reference >= 1.5x TRL DPO with precompute_ref_log_probs=True. With TRL
installed the run ends with those ratios (met / missed); without it the tables report ours vs naive only.
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
    ("dpo", "shared"), ("simpo", "shared"), ("sepo", "shared"), ("tdpo", "shared"),
]
TRL_CASES = [  # measured only when `trl` is importable (an optional peer, never a dependency of sepo)
    ("dpo", "trl"),              # DPOTrainer, reference model in memory (its default)
    ("dpo", "trl_precomputed"),  # DPOTrainer(precompute_ref_log_probs=True)
    ("simpo", "trl"),            # CPOTrainer(loss_type="simpo", cpo_alpha=0): pure SimPO
]
PAIRS = 4
PAD, BOS, EOS = 0, 1, 2


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
            ids[-1] = EOS  # responses end with EOS, as `sepo data prepare` (and TRL's preprocessing) make them
            row[f"{side}_input_ids"] = ids
            row[f"{side}_mask"] = [j == 0 or rng.random() < 0.3 for j in range(len(ids))]
            row[f"{side}_ref_logps"] = [-rng.random() * 10 for _ in ids]
        rows.append(row)
    batch = collate_pairs(rows, pad_token_id=0, weight_columns=("chosen_mask", "rejected_mask"),
                          ref_columns=("chosen_ref_logps", "rejected_ref_logps"), pair_weights=[1.0] * PAIRS,
                          step_pairs=PAIRS)
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

    from sepo.core.losses import LOSSES
    from sepo.core.objectives import needs_reference
    from sepo.stages.train import TrainConfig, compute_loss, micro_batch_loss, micro_batch_stats
    from sepo.testing import tiny_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = tiny_config("llama", "small", vocab, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    batch, tokens, _ = make_batch(vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if path.startswith("trl"):
        step, step_tokens, tmp = trl_step(model, config, batch, loss, path, optimizer)
        try:
            return _measure(step, step_tokens, steps) | {"vocab": vocab, "loss": loss, "path": path,
                                                         "threads": torch.get_num_threads(),
                                                         "flops": step_flops(config, batch, loss, path)}
        finally:
            tmp.cleanup()
    label = path
    if path == "shared":
        from sepo.data.shared_prefix import with_shared_prefix

        batch, path = with_shared_prefix(batch, PAD), "ours"  # the same step on the packed layout
    ref = None
    if loss == "tdpo" or (path == "naive" and needs_reference(loss)):
        ref = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    cfg = TrainConfig(loss=loss, chunk_size=64)  # what sepo train uses on CPU

    def step():
        if path == "ours":  # the loop's micro-batch: the loss, normalised by the step's pairs, and the step's sums
            b = batch if loss != "sft" else _chosen_only(batch)
            out = compute_loss(cfg, model, ref, b, {})
            loss_value = micro_batch_loss(out.losses, b.pair_weights, b.step_pairs, 1, 1)
            micro_batch_stats(out, b, loss_value.detach(), torch.float64)
        else:
            logps = naive_log_probs(model, batch)
            weights = batch.response_mask.float() * (batch.token_weights if loss == "sepo" else 1.0)
            c, r = batch.split(logps)
            wc, wr = batch.split(weights)
            extra = {}
            if needs_reference(loss):
                with torch.no_grad():
                    extra["ref_chosen_logps"], extra["ref_rejected_logps"] = batch.split(naive_log_probs(ref, batch))
            loss_value = LOSSES[loss](c, r, wc, wr, **extra).loss
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_tokens = tokens if loss != "sft" or path == "naive" else int(_chosen_only(batch).attention_mask.sum())
    return _measure(step, step_tokens, steps) | {"vocab": vocab, "loss": loss, "path": label,
                                                 "flops": step_flops(config, batch, loss, label)}


def step_flops(config, batch, loss: str, path: str) -> int:
    """Model FLOPs of one step as the path computes it (benchmarks/roofline.py): 3x the policy's forward, plus 1x a
    reference forward run in the step. ours: LM head at the response positions the loss reads (sepo: the selected
    ones; shared: the packed rows, each prompt once); naive and TRL: at every position (TRL's rows are counted like
    the naive ones)."""
    from roofline import Shape, Work, batch_work
    from sepo.core.objectives import needs_reference

    shape = Shape.of(config)
    b = _chosen_only(batch) if loss == "sft" and path == "ours" else batch
    every = int(b.attention_mask.sum())
    if path in ("ours", "shared"):
        heads = b.response_mask & (b.token_weights.bool() if loss == "sepo" else True)
        policy, ref = batch_work(b, int(heads.sum())), batch_work(b) if loss == "tdpo" else Work()
    else:
        policy = batch_work(b, every)
        ref = policy if (path == "naive" and needs_reference(loss)) or (loss, path) == ("dpo", "trl") else Work()
    return 3 * policy.flops(shape) + ref.flops(shape)


def _measure(step, step_tokens: int, steps: int) -> dict:
    """One warm-up step, then `steps` timed ones: tokens/s of the fastest, peak RSS increase over all of them."""
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
    return {"tokens_per_s": step_tokens / seconds, "peak_mib": (_rss_kib("VmHWM") - rss0) / 1024,
            "seconds_per_step": seconds, "median_seconds_per_step": sorted(times)[len(times) // 2]}


def _word_tokenizer(vocab: int):
    """A word-level tokenizer with one word per token id ("w17" <-> 17; 0 <pad>, 1 <s>, 2 </s>) and no post-processor,
    so TRL's own text preprocessing turns the benchmark's text rows back into exactly the benchmark's token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No bos_token: TRL's CPOTrainer prepends the BOS to every prompt when the tokenizer has one, and the benchmark's
    # prompts have none (their token ids would change). The EOS the responses end with is kept as is by both trainers.
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>"), words


def trl_step(model, config, batch, loss: str, path: str, optimizer, *, ref_model=None, args_overrides=None):
    """TRL's step on the same model and the same 4 pairs: the trainer's own `training_step` (its collated batch, its
    loss, its forward and backward), then optimizer.step() and zero_grad(), as its training loop does per step.

    TRL 1.x tokenizes text itself (DPOTrainer and CPOTrainer both re-tokenize prompt / chosen / rejected text and append
    the EOS), so the pairs are given as text in a word-level vocabulary that maps back to the benchmark's ids one to one;
    the collated batch is checked to hold exactly the benchmark's 8 sequences before anything is timed.
    Settings: fp32 (`bf16=False`; TRL's default bf16=True would autocast on CPU) and `gradient_checkpointing=False`
    (TRL's default True recomputes activations: slower; ours does not checkpoint either); no logging, eval or saving;
    no truncation; the same AdamW as ours, passed through `optimizers=`. The reference of path "trl" is a second
    model in memory (TRL's default, ref_model=None, would load a copy of the policy from its hub id / folder, which an
    in-memory random model has not; the cost is the same); "trl_precomputed" precomputes the reference log-probs with
    the initial policy in the trainer's __init__ (untimed, like our cached reference) and keeps no reference model.
    ``ref_model`` and ``args_overrides`` (e.g. ``use_cpu=False, bf16=True``) serve benchmarks/gpu_check.py."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    tok, words = _word_tokenizer(config.vocab_size)
    b = batch.num_pairs
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(b):
        rows["prompt"].append(" ".join(words[t] for t in batch.input_ids[i, : batch.prompt_lengths[i]].tolist()))
        for side, j in (("chosen", i), ("rejected", b + i)):
            ids = batch.input_ids[j, batch.prompt_lengths[j] : int(batch.attention_mask[j].sum())].tolist()
            rows[side].append(" " + " ".join(words[t] for t in ids))  # prompt + response is the sequence's text
    tmp = tempfile.TemporaryDirectory()
    common = dict(output_dir=tmp.name, per_device_train_batch_size=b, bf16=False, use_cpu=True,
                  gradient_checkpointing=False, learning_rate=1e-4, report_to="none", logging_strategy="no",
                  save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    common.update(args_overrides or {})
    if loss == "simpo" and path == "trl":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, max_length=1024, **common)  # None would mean 512
        trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok,
                             optimizers=(optimizer, None))
    elif loss == "dpo" and path in ("trl", "trl_precomputed"):
        from trl import DPOConfig, DPOTrainer

        precompute = path == "trl_precomputed"
        args = DPOConfig(max_length=None, precompute_ref_log_probs=precompute, **common)
        ref = None if precompute else ref_model if ref_model is not None else AutoModelForCausalLM.from_config(config)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_dict(rows),
                             processing_class=tok, optimizers=(optimizer, None))
    else:
        raise SystemExit(f"no TRL counterpart for loss {loss} / path {path}")
    inputs = next(iter(trainer.get_train_dataloader()))  # TRL's collator (its sampler shuffles the 4 pairs)
    if "input_ids" in inputs:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
    else:  # CPOTrainer concatenates chosen and rejected inside its forward
        cat = trainer.concatenated_inputs(inputs, padding_value=tok.pad_token_id)
        ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]

    def seqs(x, m):
        return sorted(tuple(r[: int(n)]) for r, n in zip(x.tolist(), m.sum(1).tolist()))

    if seqs(ids, mask) != seqs(batch.input_ids, batch.attention_mask):
        raise SystemExit(f"TRL ({path}, {loss}) did not collate the benchmark's token sequences; cannot compare")
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop; gradient_accumulation_steps=1

    def step():
        trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, int(mask.sum()), tmp


def _chosen_only(batch):
    """sft trains on prompt + chosen only (as `sepo train` does)."""
    from dataclasses import replace

    b = batch.num_pairs
    return replace(batch, input_ids=batch.input_ids[:b], attention_mask=batch.attention_mask[:b],
                   prompt_lengths=batch.prompt_lengths[:b], response_ids=batch.response_ids[:b],
                   response_mask=batch.response_mask[:b], token_weights=batch.token_weights[:b],
                   ref_logps=batch.ref_logps[:b], include_rejected=False)


def trl_version() -> str | None:
    """TRL's version when it is importable (an optional peer, never a dependency), else None."""
    try:
        import trl
    except Exception:
        return None
    return trl.__version__


TRL_NAMES = {("dpo", "trl"): "DPOTrainer", ("dpo", "trl_precomputed"): "DPOTrainer, precompute_ref_log_probs=True",
             ("simpo", "trl"): 'CPOTrainer, loss_type="simpo", cpo_alpha=0'}
# Issue 4's targets at vocab >= 50k: (ours (loss, path), TRL (loss, path), "speed" or "memory", bound)
TARGETS = [
    (("sepo", "ours"), ("simpo", "trl"), "speed", 2.0),
    (("sepo", "ours"), ("dpo", "trl"), "speed", 4.0),
    (("sepo", "ours"), ("dpo", "trl"), "memory", 0.5),
    (("dpo", "ours"), ("dpo", "trl_precomputed"), "speed", 1.5),
]


def print_trl_tables(results: list[dict], version: str) -> None:
    by = {(r["vocab"], r["loss"], r["path"]): r for r in results}
    print(f"\nTRL {version} (same model, same 8 sequences, fp32, no gradient checkpointing) against ours:")
    print("\n| vocab | TRL trainer | TRL tok/s | TRL peak MiB | ours (same loss) tok/s | ours / TRL speed | "
          "ours (sepo) tok/s | sepo / TRL speed | sepo peak MiB | sepo / TRL memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for vocab in sorted({r["vocab"] for r in results}):
        sepo = by.get((vocab, "sepo", "ours"))
        for (loss, path), name in TRL_NAMES.items():
            trl, ours = by.get((vocab, loss, path)), by.get((vocab, loss, "ours"))
            if trl is None or ours is None or sepo is None:
                continue
            print(f"| {vocab} | {name} | {trl['tokens_per_s']:.0f} | {trl['peak_mib']:.0f} | "
                  f"{loss} {ours['tokens_per_s']:.0f} | {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
                  f"{sepo['tokens_per_s']:.0f} | {sepo['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
                  f"{sepo['peak_mib']:.0f} | {sepo['peak_mib'] / max(trl['peak_mib'], 1e-9):.2f}x |")
    big = [v for v in sorted({r["vocab"] for r in results}) if v >= 50_000]
    if not big:
        print("\nTargets of issue 4 are stated at vocab >= 50k: run with --vocabs 50257 to check them.")
        return
    for vocab in big:
        print(f"\nTargets of issue 4 at vocab {vocab}:\n\n| target | measured | |\n|---|---|---|")
        for (o_loss, o_path), (t_loss, t_path), kind, bound in TARGETS:
            ours, trl = by.get((vocab, o_loss, o_path)), by.get((vocab, t_loss, t_path))
            label = f"{o_loss} ({o_path}) vs TRL {TRL_NAMES[(t_loss, t_path)]}"
            if ours is None or trl is None:
                print(f"| {label} | not measured | - |")
                continue
            if kind == "speed":
                ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
                print(f"| {label}: tok/s >= {bound}x | {ratio:.2f}x ({ours['tokens_per_s']:.0f} vs "
                      f"{trl['tokens_per_s']:.0f}) | {'met' if ratio >= bound else 'missed'} |")
            else:
                ratio = ours["peak_mib"] / max(trl["peak_mib"], 1e-9)
                print(f"| {label}: peak memory <= {bound}x | {ratio:.2f}x ({ours['peak_mib']:.0f} vs "
                      f"{trl['peak_mib']:.0f} MiB) | {'met' if ratio <= bound else 'missed'} |")


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

    import torch

    from roofline import Shape, describe, describe_peaks, measure_peaks, roofline
    from sepo.testing import tiny_config

    version = trl_version()
    torch.set_num_threads(args.threads)  # the peak with the workers' thread count
    peaks = {v: measure_peaks(Shape.of(tiny_config("llama", "small", int(v)))) for v in args.vocabs.split(",")}
    for v, p in peaks.items():
        print(f"vocab {v}: {describe_peaks(p)}")
    results = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for loss, path in CASES + (TRL_CASES if version else []):
            proc = subprocess.run([sys.executable, __file__, "--worker", f"{vocab}:{loss}:{path}", "--steps",
                                   str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                raise SystemExit(f"worker {vocab}:{loss}:{path} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(roofline(r["flops"], r["seconds_per_step"], peaks[str(vocab)]))
            results.append(r)
            print(f"vocab {vocab:>6} {loss:>6} {path:>15}: {r['tokens_per_s']:8.0f} tok/s  peak "
                  f"{r['peak_mib']:7.1f} MiB  {describe(r)}", flush=True)

    print("\n| vocab | loss | ours tok/s | naive tok/s | speed-up | ours peak MiB | naive peak MiB | memory ratio | "
          "ours FLOP/s (% of peak) | naive FLOP/s (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    shared_rows = []
    by = {(r["vocab"], r["loss"], r["path"]): r for r in results}
    for vocab in sorted({r["vocab"] for r in results}):
        for loss in dict.fromkeys(loss for loss, _ in CASES):
            ours, naive, shared = (by.get((vocab, loss, p)) for p in ("ours", "naive", "shared"))
            if shared is not None:
                shared_rows.append(f"| {vocab} | {loss} | {ours['tokens_per_s']:.0f} | {shared['tokens_per_s']:.0f} | "
                                   f"{shared['tokens_per_s'] / ours['tokens_per_s']:.2f}x | {ours['peak_mib']:.0f} | "
                                   f"{shared['peak_mib']:.0f} | {shared['peak_mib'] / max(ours['peak_mib'], 1e-9):.2f}x"
                                   f" | {describe(shared)} |")
            if naive is None:
                print(f"| {vocab} | {loss} | {ours['tokens_per_s']:.0f} | - | - | {ours['peak_mib']:.0f} | - | - | "
                      f"{describe(ours)} | - |")
                continue
            print(f"| {vocab} | {loss} | {ours['tokens_per_s']:.0f} | {naive['tokens_per_s']:.0f} | "
                  f"{ours['tokens_per_s'] / naive['tokens_per_s']:.2f}x | {ours['peak_mib']:.0f} | "
                  f"{naive['peak_mib']:.0f} | {ours['peak_mib'] / max(naive['peak_mib'], 1e-9):.2f}x | "
                  f"{describe(ours)} | {describe(naive)} |")
    print("\nprefix sharing (the same step, each prompt computed once; tokens/s counts the same tokens):")
    print("\n| vocab | loss | plain tok/s | shared tok/s | speed-up | plain peak MiB | shared peak MiB | memory ratio | "
          "shared FLOP/s (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(shared_rows))
    if version:
        print_trl_tables(results, version)
    else:
        print("\nTRL: not installed (an optional peer, `pip install trl`): TRL rows and issue 4's targets not measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
