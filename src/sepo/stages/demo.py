"""`sepo demo [--quick] [--task NAME]`: does SePO's token selection beat DPO, SimPO and a random selection at the
same KL, on a task whose answers are known? A `sepo sweep` that says so, with confidence intervals.

    sepo demo
    sepo demo --quick --output runs/demo-quick
    sepo demo --task minimal_pairs seeds=0,1,2 jobs=2

1. Task (``sepo.tasks``, default sentiment): prompts, two samples per prompt from the bundled stories260K,
   labelled by the task's gold reward; held-out prompts for eval.
2. Shared work, once: a DPO oracle of stories260K on half of the pairs, token rewards, k = 30% selection and
   its random control; and a weak oracle (a 2-layer kit model on stories260K's tokenizer, SFT then DPO)
   selecting for the same policy.
3. Points: reference (untrained), DPO, SimPO, SePO, SePO on random tokens, weak-to-strong SePO, each at three
   learning rates and two training seeds; each trained and evaluated (gold reward, win rate, KL, degeneration).
4. The matched-KL verdict at KL budgets 1, 3 and 10 nats (paired bootstrap over seeds and prompts), the
   frontier plot, and the token-reward plots of the oracles.

Writes ``output/results.json``, ``results.md``, ``frontier.png``, ``concentration.png``, ``token_rewards.png``;
the sweep's own files are in ``output`` too (docs/sweep.md). docs/demo.md explains every number.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepo import __version__
from sepo.config import from_dict, option
from sepo.errors import ConfigError
from sepo.io import atomic_write_json, atomic_write_text, load_dataset_dir, owns_output
from sepo.tasks import TASK_NAMES

log = logging.getLogger(__name__)
METHODS = ("dpo", "simpo", "sepo", "sepo_random", "sepo_weak")
# per method, three learning rates chosen so that the methods' KL ranges overlap the budgets 1, 3, 10 nats
# (docs/demo.md, "Choosing the strengths")
LEARNING_RATES = {"dpo": [5e-5, 1.5e-4, 4e-4], "simpo": [3e-5, 8e-5, 2e-4], "sepo": [5e-6, 1.2e-5, 3e-5],
                  "sepo_random": [4e-5, 9e-5, 2e-4], "sepo_weak": [1e-5, 3e-5, 8e-5]}
# eval generates for all held-out prompts in one batch: for a 260K-parameter model each decoding step costs
# about the same at batch 32 or 512, so fewer, larger batches are several times faster
EVAL_BATCH = 512
FULL = {"output": "runs/demo", "num_prompts": 1800, "eval_prompts": 340, "max_new_tokens": 40, "num_epochs": 1,
        "seeds": [0, 1], "learning_rates": LEARNING_RATES}
QUICK = {"output": "runs/demo-quick", "num_prompts": 400, "eval_prompts": 120, "max_new_tokens": 24, "num_epochs": 1,
         "seeds": [0, 1], "learning_rates": {m: [lrs[0], lrs[-1]] for m, lrs in LEARNING_RATES.items()}}
# The other tasks, at the sizes where they show what they are built for (docs/tasks.md): longer responses, so
# that the few edited words are a small share of the tokens; every prompt gives a pair (no ties to drop).
# Their learning rates: TASK_LEARNING_RATES below.
TASK_SIZES = {
    "minimal_pairs": {"full": {"num_prompts": 1100, "eval_prompts": 240, "max_new_tokens": 64},
                      "quick": {"num_prompts": 240, "eval_prompts": 80, "max_new_tokens": 40}},
    "noisy_chosen": {"full": {"num_prompts": 1100, "eval_prompts": 240, "max_new_tokens": 64},
                     "quick": {"num_prompts": 240, "eval_prompts": 80, "max_new_tokens": 40}},
}
TASK_LEARNING_RATES = {
    "sentiment": LEARNING_RATES,
    # from the claim sweeps' calibration (configs/claims/*.yaml: 640 pairs), scaled by about 0.8 for these sizes'
    # 1.7x more steps (KL grows about with steps x lr^2); docs/tasks.md gives the measured KL ranges
    "minimal_pairs": {"dpo": [2e-5, 5e-5, 1.2e-4], "simpo": [2.5e-5, 6e-5, 1.5e-4], "sepo": [1e-5, 2.5e-5, 6e-5],
                      "sepo_random": [3e-5, 8e-5, 2e-4], "sepo_weak": [1e-5, 2.5e-5, 6e-5]},
    "noisy_chosen": {"dpo": [2e-5, 5e-5, 1.2e-4], "simpo": [2.5e-5, 6e-5, 1.5e-4], "sepo": [1e-5, 2.5e-5, 6e-5],
                     "sepo_random": [3e-5, 8e-5, 2e-4], "sepo_weak": [1e-5, 2.5e-5, 6e-5]},
}

# --quick on the edit tasks trains on 4.6x fewer pairs (steps) than their full size; with KL ~ steps x lr^2 about
# sqrt(4.6) ~ 2x the rates reach similar KL (measured: docs/tasks.md)
QUICK_LR_SCALE = {"minimal_pairs": 2.0, "noisy_chosen": 2.0}


def demo_defaults(task: str, quick: bool) -> dict:
    """The sizes, learning rates, seeds and output folder ``sepo demo [--quick] --task TASK`` runs with."""
    out = dict(QUICK if quick else FULL)
    out.update(TASK_SIZES.get(task, {}).get("quick" if quick else "full", {}))
    lrs = TASK_LEARNING_RATES[task]
    scale = QUICK_LR_SCALE.get(task, 1.0) if quick else 1.0
    out["learning_rates"] = ({m: [v[0] * scale, v[-1] * scale] for m, v in lrs.items()} if quick
                             else {m: list(v) for m, v in lrs.items()})
    if task != "sentiment":
        out["output"] = f"{out['output']}-{task}"
    return out


@dataclass
class DemoConfig:
    """SePO against DPO, SimPO and a random selection at matched KL, on a task with known answers."""

    output: str | None = option(None, "run folder (none: runs/demo, quick runs/demo-quick; another task: -TASK "
                                "appended); rerunning resumes: finished stages and points are kept")
    quick: bool = option(False, "the small version the test suite runs: fewer prompts, shorter samples, two "
                         "learning rates per method instead of three; any size key set explicitly wins")
    task: str = option("sentiment", "the known-answer task (sepo.tasks)", choices=TASK_NAMES)
    task_options: dict[str, Any] = option({}, "the task's own knobs (sentiment: bt_temperature)")
    model: str = option("stories260k", "policy, reference and sampler of the task's pairs; the weak oracle's kit model "
                        "uses its tokenizer")
    num_prompts: int | None = option(None, "training prompts, a pair each (none: sentiment 1800, quick 400; "
                                     "minimal_pairs and noisy_chosen 1100, quick 240)", unit="prompts")
    eval_prompts: int | None = option(None, "held-out prompts (none: sentiment 340, quick 120; minimal_pairs and "
                                      "noisy_chosen 240, quick 80)", unit="prompts")
    max_new_tokens: int | None = option(None, "length of sampled continuations (none: sentiment 40, quick 24; "
                                        "minimal_pairs and noisy_chosen 64, quick 40)", unit="tokens")
    num_epochs: float | None = option(None, "epochs of every policy run (none: 1); the oracles get one more",
                                      unit="epochs")
    label_noise: float = option(0.0, "probability of flipping a label after the task's draw")
    oracle_fraction: float = option(0.5, "share of the training pairs the oracles are trained on")
    oracle_learning_rate: float = option(1e-4, "learning rate of both oracles' DPO")
    ratio: float = option(0.3, "k: share of tokens selected per response (SePO and the random control)")
    learning_rates: dict[str, list[float]] | None = option(
        None, "method -> its learning rates, the strength axis (none: three per method, calibrated per task, "
        "quick the lowest and highest; see TASK_LEARNING_RATES in sepo/stages/demo.py); a method left out keeps "
        "its defaults")
    seeds: list[int] | None = option(None, "training seeds of every point (none: 0, 1)")
    batch_size: int = option(16, "pairs per optimizer step", unit="pairs")
    weak_to_strong: bool = option(True, "also run SePO with the selection of a weak 2-layer oracle")
    weak_preset: str = option("tiny", "kit size preset of the weak oracle's base model", choices=("micro", "tiny", "small"))
    weak_learning_rate: float = option(2e-3, "learning rate of the weak model's SFT (it starts from random weights)")
    budgets: list[float] = option([1.0, 3.0, 10.0], "KL budgets at which the methods are compared", unit="nats")
    seed: int = option(0, "seed of prompts, samples, labels, the oracles' subset and the random control")
    jobs: int = option(2, "worker processes training points in parallel")
    threads: int | None = option(1, "torch threads per worker; none: CPU cores // jobs. The 260K-parameter model "
                                 "gains little from more, and threads that spin-wait on a busy machine make it slower "
                                 "(docs/demo.md, Run time)")

    def __post_init__(self):
        if self.task not in TASK_NAMES:
            raise ConfigError(f"unknown task '{self.task}'; known tasks: {', '.join(TASK_NAMES)}")
        sizes = demo_defaults(self.task, self.quick)
        for key, value in sizes.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.num_prompts < 16 or self.eval_prompts < 4:
            raise ConfigError("num_prompts must be >= 16 and eval_prompts >= 4")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be >= 1 (or none: CPU cores // jobs)")
        if not 0 < self.ratio <= 1 or not 0 <= self.label_noise < 0.5:
            raise ConfigError("ratio must be in (0, 1] and label_noise in [0, 0.5)")
        unknown = [m for m in self.learning_rates if m not in METHODS]
        if unknown:
            raise ConfigError(f"learning_rates.{unknown[0]}: the demo's methods are {', '.join(METHODS)}")
        if any(not lrs for lrs in self.learning_rates.values()):
            raise ConfigError("each method needs at least one learning rate")


def sweep_config(cfg: DemoConfig):
    """The sweep the demo runs."""
    from sepo.stages.sweep import SweepConfig

    lrs = {**demo_defaults(cfg.task, cfg.quick)["learning_rates"], **cfg.learning_rates}
    methods = {"dpo": {"loss": "dpo"}, "simpo": {"loss": "simpo"}, "sepo": {"loss": "sepo", "variant": "oracle"},
               "sepo_random": {"loss": "sepo", "selection": "random", "variant": "oracle"}}
    variants: dict[str, dict] = {"oracle": {}}
    if cfg.weak_to_strong:
        methods["sepo_weak"] = {"loss": "sepo", "variant": "weak"}
        variants["weak"] = {"reference": f"kit:llama:{cfg.weak_preset}:{cfg.model}:{cfg.seed}",
                            "sft": {"num_epochs": cfg.num_epochs + 2, "learning_rate": cfg.weak_learning_rate,
                                    "batch_size": cfg.batch_size}}
    for name, spec in methods.items():
        spec["learning_rate"] = list(lrs[name])
    # the demo's questions, answered with paired CIs: does the selection beat the baselines, and chance?
    contrasts = ["sepo - dpo", "sepo - simpo", "sepo - sepo_random"] + (["sepo_weak - sepo"] if cfg.weak_to_strong else [])
    return from_dict(SweepConfig, {
        "output": cfg.output, "task": cfg.task, "task_options": cfg.task_options, "num_prompts": cfg.num_prompts,
        "eval_prompts": cfg.eval_prompts, "max_new_tokens": cfg.max_new_tokens, "label_noise": cfg.label_noise,
        "reference": cfg.model, "oracle_fraction": cfg.oracle_fraction,
        "oracle": {"num_epochs": cfg.num_epochs + 1, "learning_rate": cfg.oracle_learning_rate,
                   "batch_size": cfg.batch_size},
        "select": {"chosen_ratio": cfg.ratio, "rejected_ratio": cfg.ratio}, "variants": variants,
        "methods": methods, "train": {"num_epochs": cfg.num_epochs, "batch_size": cfg.batch_size},
        "eval": {"batch_size": EVAL_BATCH}, "seeds": cfg.seeds, "seed": cfg.seed, "budgets": cfg.budgets,
        "contrasts": contrasts, "jobs": cfg.jobs, "threads": cfg.threads})


@owns_output()
def run(cfg: DemoConfig) -> dict:
    from sepo.stages import sweep

    started = time.time()
    result = sweep.execute(sweep_config(cfg))
    plots = _plots(cfg, result)
    results = _results(cfg, result, plots, seconds=time.time() - started)
    atomic_write_json(Path(cfg.output) / "results.json", {k: v for k, v in results.items() if k != "markdown"})
    atomic_write_text(Path(cfg.output) / "results.md", results["markdown"])
    print(results["markdown"])
    log.info("demo finished in %.0f s; results in %s", results["seconds"], cfg.output)
    return results


# --------------------------------------------------------------------------- phases


def _plots(cfg: DemoConfig, result) -> list[str]:
    from sepo.models import load_tokenizer

    variants = result.plan.variants
    weak = variants["weak"].folder if "weak" in variants else None
    return ["frontier.png", *make_plots(Path(cfg.output), variants["oracle"].folder, weak, load_tokenizer(cfg.model))]


def _weak_parameters(result) -> dict | None:
    """Parameter counts of the policy and of the weak oracle (weak-to-strong: the oracle is the smaller one)."""
    from sepo.models import load_causal_lm

    if "weak" not in result.plan.variants:
        return None
    count = lambda name: sum(p.numel() for p in load_causal_lm(name, trainable=False).parameters())  # noqa: E731
    return {"policy_parameters": count(result.plan.policy),
            "weak_oracle_parameters": count(str(result.plan.variants["weak"].folder / "sft"))}


def _results(cfg: DemoConfig, result, plots: list[str], *, seconds: float) -> dict:
    summary = {k: v for k, v in result.summary.items() if k != "markdown"}
    train_pairs = len(load_dataset_dir(Path(cfg.output) / "base" / "data" / "train")[0])
    strengths = {m: len(spec["learning_rate"]) for m, spec in sweep_config(cfg).methods.items()}
    results = {"summary": summary, "num_train_pairs": train_pairs, "weak_to_strong": _weak_parameters(result),
               "plots": plots, "strengths": strengths, "seeds": list(cfg.seeds), "seconds": round(seconds, 1),
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "sepo_version": __version__}
    results["markdown"] = results_markdown(cfg, results, result.markdown)
    return results


def results_markdown(cfg: DemoConfig, results: dict, sweep_markdown: str) -> str:
    full = len(FULL["learning_rates"]["dpo"]), len(FULL["seeds"])
    used = max(results["strengths"].values()), len(results["seeds"])
    lines = [f"# sepo demo ({cfg.task}): does token selection beat DPO and SimPO at the same KL?", "",
             f"{results['num_train_pairs']} training pairs; {used[0]} learning rates x {used[1]} seeds per method."]
    if used < full:
        lines.append(f"**Fewer points than the full demo ({full[0]} learning rates x {full[1]} seeds per method"
                     f"{', on 1,000+ pairs' if cfg.quick else ''}): the confidence intervals are wider and the "
                     "verdicts below are indicative only.**")
    if results["weak_to_strong"]:
        w = results["weak_to_strong"]
        lines.append(f"Weak-to-strong: the weak oracle has {w['weak_oracle_parameters']:,} parameters, the policy "
                     f"{w['policy_parameters']:,}.")
    body = sweep_markdown.split("\n", 2)[2] if sweep_markdown.startswith("# ") else sweep_markdown
    return "\n".join(lines) + "\n\n" + body


def make_plots(out: Path, strong_dir: Path, weak_dir: Path | None, tok) -> list[str]:
    """concentration.png (both oracles) and token_rewards.png (the oracle's selected vs unselected tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from sepo.core.rewards import abs_reward_share_curve
    from sepo.data.collate import pad_right

    fig, ax = plt.subplots(figsize=(5, 4))
    fig2, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    grid = torch.linspace(0, 1, 51)
    for label, folder in (("oracle", strong_dir), ("weak oracle", weak_dir)):
        if folder is None:
            continue
        ds, _ = load_dataset_dir(folder / "selected", ("chosen_rewards", "rejected_rewards"))
        cr, rr = pad_right(ds["chosen_rewards"], 0.0, torch.float32), pad_right(ds["rejected_rewards"], 0.0, torch.float32)
        cm = pad_right(ds["chosen_mask"], False, torch.bool, length=cr.shape[1])
        rm = pad_right(ds["rejected_mask"], False, torch.bool, length=rr.shape[1])
        valid_c = pad_right([[True] * len(x) for x in ds["chosen_rewards"]], False, torch.bool, length=cr.shape[1])
        valid_r = pad_right([[True] * len(x) for x in ds["rejected_rewards"]], False, torch.bool, length=rr.shape[1])
        curve = torch.cat([abs_reward_share_curve(cr, valid_c, grid), abs_reward_share_curve(rr, valid_r, grid)])
        ax.plot(grid.numpy(), curve.nanmean(0).numpy(), label=label)  # over responses of both sides
        if label == "oracle":
            for a, rewards, sel, valid, side in ((axes[0], cr, cm, valid_c, "chosen"), (axes[1], rr, rm, valid_r, "rejected")):
                a.hist(rewards[valid & ~sel].numpy(), bins=50, alpha=0.6, density=True, label="unselected")
                a.hist(rewards[sel].numpy(), bins=50, alpha=0.6, density=True, label="selected")
                a.set(title=f"{side} responses", xlabel="token reward r_t")
                a.legend()
    ax.plot([0, 1], [0, 1], "k:", label="uniform")
    ax.set(xlabel="share of a response's tokens (largest |r_t| first)",
           ylabel="share of the response's sum |r_t|", title="reward concentration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "concentration.png", dpi=100)
    fig2.tight_layout()
    fig2.savefig(out / "token_rewards.png", dpi=100)
    plt.close(fig)
    plt.close(fig2)
    return ["concentration.png", "token_rewards.png"]
