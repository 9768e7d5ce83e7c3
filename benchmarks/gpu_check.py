"""The GPU check: sepo's training step and scorer on one GPU in bf16, against TRL and the paper's procedure.

    bash benchmarks/fetch_wheels.sh             # once, where PyPI is reachable: TRL + datasets wheels into .whl/
    bash benchmarks/gpu_check.sh [--json out]   # on the GPU machine (installs .whl/ first); under 8 minutes on an H200
    bash benchmarks/gpu_check.sh --cpu-smoke    # tiny shapes on the CPU in seconds (the test suite runs it)

Models: random-initialised models with the shapes of Qwen2.5-0.5B and Qwen2.5-1.5B (benchmarks/configs/, nothing
downloaded), bf16 weights, sdpa attention. Data: synthetic pairs with HH-RLHF-like lengths (issue 13's harmless-base
medians: prompt 213, chosen 62, rejected 82 tokens, each drawn uniformly within +-50% of its median, seeded),
token ids drawn at random; responses end with the EOS of the word-level tokenizer TRL is given (bench_train.py).

Sections, for each model:
  train   one optimizer step (`sepo.stages.train.compute_loss` + backward + AdamW) for sepo (30% of tokens
          selected), dpo (cached reference log-probs) and simpo, prefix sharing off and on; TRL's DPOTrainer (its
          reference model in memory), DPOTrainer(precompute_ref_log_probs=True) and CPOTrainer(loss_type="simpo",
          cpo_alpha=0) on the same batch (bench_train.trl_step: its own training_step + the same AdamW). Median of
          the timed steps after warm-up steps. Tokens/s = non-pad tokens of the plain rows (the same for every row).
  score   `sepo score`'s scoring (`sepo.stages.score.score_rows`, what the stage runs on each shard: length-sorted
          batches read from an Arrow dataset, collated, packed with sharing on, both models, the rewards copied back
          and unpadded), sharing off and on, against the paper's procedure (one example at a
          time, full logits and a fp32 log-softmax at every position, top-k by repeated argmax:
          bench_score.paper_scorer). Tokens/s = scored response tokens.
  head    max |difference| of bf16 per-token log-probs: selective head vs full logits, packed vs plain rows, and
          each against the fp32 model's full logits.
MFU = model FLOPs (benchmarks/roofline.py: the work each path computes, 3x forward for training) per second over
the bf16 matmul peak measured at the start (8192³). Peak memory = torch.cuda.max_memory_allocated over the timed
steps (weights, optimizer state and activations), or the RSS increase on the CPU.
Targets: sepo score >= 20x the paper's procedure; prefix sharing faster and not larger.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from roofline import Shape, Work, batch_work, describe_peaks, measure_peaks  # noqa: E402

LOSSES = ("sepo", "dpo", "simpo")
TRL_PATHS = [("dpo", "trl", "DPOTrainer"), ("dpo", "trl_precomputed", "DPOTrainer precompute_ref_log_probs"),
             ("simpo", "trl", "CPOTrainer simpo")]
PAD, EOS = 0, 2  # ids of "<pad>" and "</s>" in bench_train's word-level tokenizer, which TRL is given
GPU = {"models": ["qwen2.5-0.5b", "qwen2.5-1.5b"], "dtype": torch.bfloat16, "medians": (213, 62, 82),
       "train_pairs": 8, "warmup": 2, "steps": 5, "score_pairs": 64, "score_batch": 16, "paper_pairs": 16, "peak_n": None}
SMOKE = {"models": ["kit-qwen2-tiny"], "dtype": torch.float32, "medians": (12, 4, 5), "train_pairs": 2, "warmup": 1,
         "steps": 1, "score_pairs": 4, "score_batch": 2, "paper_pairs": 2, "peak_n": 256}


# ---------------------------------------------------------------------------------------------- setup


def build_model(name: str, dtype, device, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if name.startswith("kit-"):
        from sepo.testing import tiny_config

        config = tiny_config("qwen2", "tiny", 512, pad_token_id=PAD, eos_token_id=EOS)
    else:
        fields = json.loads((HERE / "configs" / f"{name}.json").read_text())
        fields.pop("_comment", None)
        config = AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def hh_like_rows(n: int, medians, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(median: int, eos: bool) -> list[int]:
        out = [rng.randrange(3, vocab) for _ in range(max(1, round(median * rng.uniform(0.5, 1.5))))]
        if eos:
            out[-1] = EOS
        return out

    rows = []
    for i in range(n):
        row = {"index": i, "prompt_input_ids": ids(medians[0], False)}
        for side, median in (("chosen", medians[1]), ("rejected", medians[2])):
            row[f"{side}_input_ids"] = ids(median, True)
            row[f"{side}_mask"] = [j == 0 or rng.random() < 0.3 for j in range(len(row[f"{side}_input_ids"]))]
            row[f"{side}_ref_logps"] = [-rng.random() * 10 for _ in row[f"{side}_input_ids"]]
        rows.append(row)
    return rows


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def release(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def timed(step, device, warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per step, peak MiB) over ``steps`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        rss = _rss_kib("VmRSS")
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else (_rss_kib("VmHWM") - rss) / 1024
    return statistics.median(times), peak


def row(section: str, model: str, case: str, sharing: str, seconds: float, tokens: int, flops: float, peak_mib: float,
        peaks: dict) -> dict:
    r = {"section": section, "model": model, "case": case, "sharing": sharing, "seconds": seconds,
         "tokens_per_s": tokens / seconds, "flop_per_s": flops / seconds, "mfu": flops / seconds / peaks["square"],
         "peak_mib": peak_mib}
    print(f"  {section:5s} {case:38s} sharing {sharing:3s} {r['tokens_per_s']:12,.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
          f"peak {peak_mib:9,.0f} MiB", flush=True)
    return r


# ---------------------------------------------------------------------------------------------- sections


def train_section(name: str, setup: dict, device, peaks: dict, trl_reason: str | None) -> list[dict]:
    from sepo.core.logprobs import default_chunk_size
    from sepo.data.collate import collate_pairs
    from sepo.data.shared_prefix import with_shared_prefix
    from sepo.stages.train import TrainConfig, compute_loss

    policy = build_model(name, setup["dtype"], device, seed=0).train()
    config, shape = policy.config, Shape.of(policy.config)
    rows = hh_like_rows(setup["train_pairs"], setup["medians"], config.vocab_size)
    plain = collate_pairs(rows, PAD, weight_columns=("chosen_mask", "rejected_mask"),
                          ref_columns=("chosen_ref_logps", "rejected_ref_logps"))
    tokens = int(plain.attention_mask.sum())
    results = []
    for loss in LOSSES:
        cfg = TrainConfig(loss=loss, chunk_size=default_chunk_size(torch.device(device)))
        for sharing in ("off", "on"):
            batch = (with_shared_prefix(plain, PAD) if sharing == "on" else plain).to(device)
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)

            def step(batch=batch, cfg=cfg, optimizer=optimizer):
                compute_loss(cfg, policy, None, batch, {}).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds, peak = timed(step, device, setup["warmup"], setup["steps"])
            heads = batch.response_mask & (batch.token_weights.bool() if loss == "sepo" else True)
            flops = 3 * batch_work(batch, int(heads.sum())).flops(shape)
            results.append(row("train", name, f"sepo train --loss {loss}", sharing, seconds, tokens, flops, peak, peaks))
            optimizer.state.clear()
            release(device)
    if trl_reason is not None:
        print(f"  train TRL rows skipped: {trl_reason}", flush=True)
    else:
        results += trl_rows(name, setup, device, peaks, policy, plain, tokens, shape)
    return results


def trl_rows(name, setup, device, peaks, policy, plain, tokens, shape) -> list[dict]:
    """TRL's trainers on the same policy and batch (run after ours: TRL patches the policy's forward)."""
    from bench_train import trl_step

    cuda = torch.device(device).type == "cuda"
    overrides = {"use_cpu": not cuda, "bf16": cuda and setup["dtype"] == torch.bfloat16}
    every = int(plain.attention_mask.sum())
    results = []
    for loss, path, label in TRL_PATHS:
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)
        ref = build_model(name, setup["dtype"], device, seed=0).eval() if path == "trl" else None
        step, step_tokens, tmp = trl_step(policy, policy.config, plain, loss, path, optimizer, ref_model=ref,
                                          args_overrides=overrides)
        try:
            seconds, peak = timed(step, device, setup["warmup"], setup["steps"])
        finally:
            tmp.cleanup()
        if step_tokens != tokens:
            raise SystemExit(f"TRL ({label}) ran {step_tokens} tokens, ours {tokens}: not the same batch")
        # TRL's DPO projects the completion positions through its fused LM head; CPO builds full logits
        head = int(plain.response_mask.sum()) if loss == "dpo" else every
        policy_work = batch_work(plain, head)
        flops = 3 * policy_work.flops(shape) + (policy_work.flops(shape) if ref is not None else 0)
        results.append(row("train", name, f"TRL {label}", "-", seconds, tokens, flops, peak, peaks))
        del step, optimizer, ref
        release(device)
    return results


def score_section(name: str, setup: dict, device, peaks: dict) -> tuple[list[dict], dict]:
    import datasets

    from bench_score import paper_scorer
    from sepo.core.logprobs import default_chunk_size
    from sepo.data.collate import collate_pairs, length_bucketed_batches
    from sepo.data.rows import pair_lengths
    from sepo.data.shared_prefix import with_shared_prefix
    from sepo.models import response_log_probs
    from sepo.stages.score import score_rows

    oracle = build_model(name, setup["dtype"], device, seed=1).eval().requires_grad_(False)
    reference = build_model(name, setup["dtype"], device, seed=2).eval().requires_grad_(False)
    shape, chunk = Shape.of(oracle.config), default_chunk_size(torch.device(device))
    rows = hh_like_rows(setup["score_pairs"], setup["medians"], oracle.config.vocab_size, seed=1)
    ds = datasets.Dataset.from_list(rows)
    response_tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    results = []
    for sharing in ("off", "on"):
        def score_all(sharing=sharing):
            with torch.inference_mode():
                score_rows(ds, oracle, reference, PAD, device, beta=0.1, batch_size=setup["score_batch"],
                           chunk_size=chunk, prefix_sharing=sharing == "on")

        work = Work()  # what score_rows computes: its batches, as it makes them, through both models
        for positions in length_bucketed_batches(pair_lengths(ds), setup["score_batch"], shuffle=False):
            batch = collate_pairs([rows[i] for i in positions], PAD)
            work = work + batch_work(with_shared_prefix(batch, PAD) if sharing == "on" else batch) * 2
        seconds, peak = timed(score_all, device, 1, 1)
        results.append(row("score", name, "sepo score", sharing, seconds, response_tokens, work.flops(shape), peak, peaks))
        release(device)
    paper_rows = rows[: setup["paper_pairs"]]
    paper_tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in paper_rows)
    paper_work = Work()
    for r in paper_rows:
        for side in ("chosen", "rejected"):
            length = len(r["prompt_input_ids"]) + len(r[f"{side}_input_ids"])
            paper_work = paper_work + Work(length, length * (length + 1) // 2, length) * 2

    def paper():
        with torch.device(device), torch.inference_mode():
            paper_scorer(oracle, reference, paper_rows)

    seconds, peak = timed(paper, device, 1, 1)
    results.append(row("score", name, "paper's procedure", "-", seconds, paper_tokens, paper_work.flops(shape), peak,
                       peaks))

    # the head check: what bf16 does to per-token log-probs on each path
    batch = collate_pairs(rows[: setup["score_batch"]], PAD).to(device)
    shared = with_shared_prefix(collate_pairs(rows[: setup["score_batch"]], PAD), PAD).to(device)
    mask = batch.response_mask
    with torch.inference_mode():
        selective = response_log_probs(oracle, batch, chunk_size=chunk)
        full = response_log_probs(oracle, batch, full_logits=True)
        packed = response_log_probs(oracle, shared, chunk_size=chunk)
    with torch.inference_mode():
        exact = response_log_probs(oracle.float(), batch, full_logits=True)  # the fp32 model, full logits
    head = {"model": name, "dtype": str(setup["dtype"]).replace("torch.", ""), "tokens": int(mask.sum())}
    for label, a, b in (("selective vs full logits", selective, full), ("packed vs plain rows", packed, selective),
                        ("selective vs fp32 full logits", selective, exact), ("full vs fp32 full logits", full, exact)):
        head[label] = float((a - b)[mask].abs().max())
        print(f"  head  {label:30s} max |d log p| = {head[label]:.3e} ({head['tokens']} tokens, {head['dtype']})")
    return results, head


# ---------------------------------------------------------------------------------------------- main


def trl_unavailable() -> str | None:
    """Why TRL's rows cannot run here, or None."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception as e:  # ImportError, or a version conflict raised at import
        return (f"trl / datasets not importable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); on the GPU "
                "machine gpu_check.sh installs them from .whl/ (fill it with benchmarks/fetch_wheels.sh)")
    return None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "peft", "pyarrow", "datasets", "trl"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")  # a 0 MiB peak (tiny smoke shapes on the CPU) has no ratio


def summarise(results: list[dict]) -> dict:
    by = {(r["model"], r["case"], r["sharing"]): r for r in results}
    summary = {}
    for model in dict.fromkeys(r["model"] for r in results):
        s = {}
        for loss in LOSSES:
            off, on = by[(model, f"sepo train --loss {loss}", "off")], by[(model, f"sepo train --loss {loss}", "on")]
            s[f"train {loss}: sharing on / off tokens/s"] = on["tokens_per_s"] / off["tokens_per_s"]
            s[f"train {loss}: sharing on / off peak memory"] = _ratio(on["peak_mib"], off["peak_mib"])
        for label, (_, _, trl_label) in zip(("dpo", "dpo", "simpo"), TRL_PATHS):
            trl = by.get((model, f"TRL {trl_label}", "-"))
            if trl is not None:
                ours = by[(model, f"sepo train --loss {label}", "on")]
                s[f"{label} (sharing on) / TRL {trl_label}: tokens/s"] = ours["tokens_per_s"] / trl["tokens_per_s"]
                s[f"{label} (sharing on) / TRL {trl_label}: peak memory"] = _ratio(ours["peak_mib"], trl["peak_mib"])
        off, on, paper = (by[(model, "sepo score", "off")], by[(model, "sepo score", "on")],
                          by[(model, "paper's procedure", "-")])
        s["score: sharing on / off tokens/s"] = on["tokens_per_s"] / off["tokens_per_s"]
        s["score (sharing off) / paper's procedure tokens/s (target >= 20x)"] = off["tokens_per_s"] / paper["tokens_per_s"]
        s["score (sharing on) / paper's procedure tokens/s (target >= 20x)"] = on["tokens_per_s"] / paper["tokens_per_s"]
        summary[model] = s
        print(f"\n{model}:")
        for k, v in s.items():
            print(f"  {k:72s} {v:8.2f}x")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, fp32, in seconds")
    parser.add_argument("--json", default=None, help="also write every figure here")
    args = parser.parse_args()
    started = time.time()
    setup = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run on the GPU machine, or pass --cpu-smoke")
    device = "cpu" if args.cpu_smoke else "cuda"
    env = versions()
    env["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print("gpu_check:", ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    if args.cpu_smoke:
        print("cpu smoke: tiny shapes, one step each -- this checks that every section runs; its figures mean nothing")
    trl_reason = trl_unavailable()
    peaks = measure_peaks(dtype=setup["dtype"], device=device, n=setup["peak_n"])
    print(describe_peaks(peaks) + f" in {str(setup['dtype']).replace('torch.', '')}", flush=True)
    results, heads = [], []
    for name in setup["models"]:
        print(f"\n== {name}", flush=True)
        results += train_section(name, setup, device, peaks, trl_reason)
        release(device)  # the policy (and TRL's models) are gone with the section
        score_rows, head = score_section(name, setup, device, peaks)
        results += score_rows
        heads.append(head)
        release(device)
    summary = summarise(results)
    seconds = time.time() - started
    print(f"\ngpu_check done in {seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": env, "peaks": peaks, "trl_skipped": trl_reason,
                                               "results": results, "head": heads, "summary": summary,
                                               "seconds": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
