"""`sepo demo [--quick]`: SePO end to end on the embedded task, where the gold reward and the key tokens are known.

    sepo demo --quick --output runs/demo-quick

1. Task: story openings (``sepo.tasks.sentiment``); two continuations per prompt sampled from the bundled
   stories260K model, labelled by a Bradley-Terry draw on the gold sentiment reward; held-out prompts for eval.
2. ``sepo pipeline`` on that data: a DPO oracle on a random subset, token rewards, k = 30% selection, and the
   methods reference / DPO / SimPO / SePO / SePO on a random 30% (the control), same data and budget.
3. Weak-to-strong: the same pipeline with a 2-layer kit model (stories260K's tokenizer) briefly fine-tuned on
   the chosen responses as the oracle's base; the policy is still stories260K.
4. How good the selection is against the known key tokens (precision / recall vs random), plots and tables.

Writes ``output/results.json``, ``results.md`` and PNG plots; docs/demo.md explains every number.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sepo import __version__
from sepo.config import from_dict, option
from sepo.errors import ConfigError
from sepo.io import atomic_write_json, atomic_write_text, load_dataset_dir, owns_output, save_dataset

log = logging.getLogger(__name__)
GOLD = "sepo.tasks.sentiment:gold_reward_batch"
FULL = {"num_prompts": 600, "eval_prompts": 200, "max_new_tokens": 40, "num_epochs": 2}
QUICK = {"num_prompts": 240, "eval_prompts": 64, "max_new_tokens": 32, "num_epochs": 1}


@dataclass
class DemoConfig:
    """SePO end to end on the embedded sentiment task with known key tokens."""

    output: str = option("runs/demo", "run folder (rerunning resumes; finished stages are skipped)")
    quick: bool = option(False, "the small version (about 30 s on 2 CPU cores; the test suite runs it): fewer prompts, shorter "
                         "samples, one epoch; any size key set explicitly wins")
    model: str = option("stories260k", "policy and reference model (must share the stories260K tokenizer's vocabulary "
                        "for the lexicon key tokens to be meaningful)")
    num_prompts: int | None = option(None, "training prompts, two samples each (none: 600, quick 240)", unit="prompts")
    eval_prompts: int | None = option(None, "held-out prompts (none: 200, quick 64)", unit="prompts")
    max_new_tokens: int | None = option(None, "length of sampled continuations (none: 40, quick 32)", unit="tokens")
    num_epochs: int | None = option(None, "epochs of every policy and oracle run (none: 2, quick 1)", unit="epochs")
    bt_temperature: float = option(1.0, "Bradley-Terry temperature of the labels: P(y1 > y2) = "
                                   "sigmoid((r1 - r2) / t)")
    label_noise: float = option(0.0, "probability of flipping a label after the Bradley-Terry draw")
    oracle_fraction: float = option(0.5, "share of the training pairs the oracle is trained on")
    ratio: float = option(0.3, "k: share of tokens selected per response (SePO and the random control)")
    learning_rate: float = option(5e-5, "learning rate of every policy run (oracles too)")
    batch_size: int = option(16, "pairs per optimizer step", unit="pairs")
    weak_to_strong: bool = option(True, "also run SePO with a weak 2-layer oracle")
    weak_preset: str = option("tiny", "kit size preset of the weak oracle's base model", choices=("micro", "tiny", "small"))
    weak_learning_rate: float = option(2e-3, "learning rate of the weak model's SFT (it starts from random weights)")
    seed: int = option(0, "seed of prompts, samples, labels, subsets and the random control")
    threads: int | None = option(1, "torch intra-op threads; none: torch's default. The 260K-parameter model gains "
                                 "little from a second thread (see docs/demo.md, Run time), while threads that spin-wait "
                                 "for each other on a busy machine make it many times slower")

    def __post_init__(self):
        sizes = QUICK if self.quick else FULL
        for key, value in sizes.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.num_prompts < 16 or self.eval_prompts < 4:
            raise ConfigError("num_prompts must be >= 16 and eval_prompts >= 4")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be >= 1 (or none for torch's default)")
        if not 0 < self.ratio <= 1 or not 0 <= self.label_noise < 0.5:
            raise ConfigError("ratio must be in (0, 1] and label_noise in [0, 0.5)")


def pipeline_config(cfg: DemoConfig, out: Path, *, weak: Path | None = None):
    """The pipeline the demo runs: strong (oracle from the model itself) or weak-to-strong."""
    from sepo.stages.pipeline import PipelineConfig

    train = {"num_epochs": cfg.num_epochs, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size}
    methods = ({"sepo_weak": {"loss": "sepo"}} if weak else
               {"dpo": {"loss": "dpo"}, "simpo": {"loss": "simpo"}, "sepo": {"loss": "sepo"},
                "sepo_random": {"loss": "sepo", "selection": "random"}})
    return from_dict(PipelineConfig, {
        "output": str(out / ("weak-to-strong" if weak else "pipeline")),
        "data": str(out / "task" / "train"), "eval_data": str(out / "task" / "eval"),
        "reference": str(weak) if weak else cfg.model, "policy": cfg.model if weak else None,
        "stages": ["sft", "oracle", "score", "select", "train", "eval"] if weak else
                  ["oracle", "score", "select", "train", "eval"],
        "oracle_fraction": cfg.oracle_fraction, "methods": methods, "reward": GOLD, "seed": cfg.seed,
        "sft": {"num_epochs": cfg.num_epochs + 1, "learning_rate": cfg.weak_learning_rate,
                "batch_size": cfg.batch_size},
        "oracle": {**train, "num_epochs": cfg.num_epochs + 1},
        "select": {"chosen_ratio": cfg.ratio, "rejected_ratio": cfg.ratio},
        "train": train,
        "eval": {"max_new_tokens": cfg.max_new_tokens, "num_prompts": cfg.eval_prompts},
    })


def selection_quality(tokenizer, folder: Path) -> dict:
    """Precision / recall of a selected dataset's masks against the lexicon tokens (both sides pooled)."""
    from sepo.tasks.sentiment import lexicon_token_mask
    from sepo.tasks.sentiment import selection_quality as quality

    ds, _ = load_dataset_dir(folder, ("chosen_mask", "rejected_mask"))
    sel, key = [], []
    for row in ds:
        for side in ("chosen", "rejected"):
            sel.append(list(row[f"{side}_mask"]))
            key.append(lexicon_token_mask(tokenizer, row[f"{side}_input_ids"]))
    return quality(sel, key)


@owns_output()
def run(cfg: DemoConfig) -> dict:
    import torch

    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves global state as it was, even on an error


def _run(cfg: DemoConfig) -> dict:
    import torch

    from sepo.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint
    from sepo.stages import pipeline
    from sepo.tasks.sentiment import make_preference_pairs, story_prompts
    from sepo.testing import build_tiny_model

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tok = load_tokenizer(cfg.model)

    # ------------------------------------------------------------------ 1. the task: prompts and labelled pairs
    task = out / "task"
    if not (task / "eval").is_dir():
        log.info("== task: %d + %d prompts, 2 samples each from %s", cfg.num_prompts, cfg.eval_prompts, cfg.model)
        model = load_causal_lm(cfg.model, trainable=False)
        prompts = story_prompts(cfg.num_prompts + cfg.eval_prompts, seed=cfg.seed)
        meta = {"stage": "demo-task", "sepo_version": __version__, "source": "sepo.tasks.sentiment",
                "tokenizer": cfg.model, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                "config": {"bt_temperature": cfg.bt_temperature, "label_noise": cfg.label_noise, "seed": cfg.seed}}
        for name, part, seed in (("train", prompts[: cfg.num_prompts], cfg.seed),
                                 ("eval", prompts[cfg.num_prompts :], cfg.seed + 1)):
            pairs = make_preference_pairs(model, tok, part, max_new_tokens=cfg.max_new_tokens,
                                          bt_temperature=cfg.bt_temperature, label_noise=cfg.label_noise, seed=seed)
            save_dataset(pairs, task / name, {**meta, "num_rows": len(pairs)}, overwrite=True)
        del model
    train_pairs, _ = load_dataset_dir(task / "train")
    log.info("task: %d training pairs, %d held-out pairs", len(train_pairs), len(load_dataset_dir(task / "eval")[0]))

    # ------------------------------------------------------------------ 2. the pipeline: oracle, selection, methods
    strong = pipeline.run(pipeline_config(cfg, out))
    methods = dict(strong["methods"])

    # ------------------------------------------------------------------ 3. weak-to-strong
    weak = None
    if cfg.weak_to_strong:
        weak_init = out / "weak-init"
        if not (weak_init / "config.json").is_file():
            build_tiny_model(weak_init, arch="llama", preset=cfg.weak_preset, tokenizer=tok, seed=cfg.seed)
        weak = pipeline.run(pipeline_config(cfg, out, weak=weak_init))
        methods["sepo_weak"] = weak["methods"]["sepo_weak"]

    # ------------------------------------------------------------------ 4. selection vs the known key tokens
    strong_dir, weak_dir = out / "pipeline", out / "weak-to-strong"
    oracle = selection_quality(tok, strong_dir / "selected")
    rand = selection_quality(tok, strong_dir / "selected-random")
    selection = {"precision": oracle["precision"], "recall": oracle["recall"],
                 "random_precision": rand["precision"], "random_recall": rand["recall"],
                 "key_fraction": oracle["key_fraction"], "selected_fraction": oracle["selected_fraction"]}
    if weak is not None:
        w = selection_quality(tok, weak_dir / "selected")
        selection.update(weak_precision=w["precision"], weak_recall=w["recall"])
    weak_params = None
    if weak is not None:
        n_strong = sum(p.numel() for p in load_causal_lm(cfg.model, trainable=False).parameters())
        n_weak = sum(p.numel() for p in load_causal_lm(str(weak_dir / "sft"), trainable=False).parameters())
        weak_params = {"policy_parameters": n_strong, "weak_oracle_parameters": n_weak}

    # ------------------------------------------------------------------ 5. plots and tables
    plots = make_plots(out, methods, strong_dir, weak_dir if weak is not None else None, tok)
    results = {"methods": methods, "selection": selection, "weak_to_strong": weak_params, "plots": plots,
               "num_train_pairs": len(train_pairs), "seconds": round(time.time() - started, 1),
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "sepo_version": __version__,
               "torch_threads": torch.get_num_threads()}
    atomic_write_json(out / "results.json", results)
    table = results_markdown(results)
    atomic_write_text(out / "results.md", table)
    print(table)
    log.info("demo finished in %.0f s; results in %s", results["seconds"], out)
    return results


def results_markdown(results: dict) -> str:
    from sepo.stages.pipeline import results_markdown as methods_table

    s = results["selection"]
    lines = [methods_table(results, title="sepo demo: make the stories happier"),
             "gold_reward: mean gold sentiment reward of one sample per held-out prompt; win_rate: against the "
             "untrained model's sample on the same prompt (ties 1/2); kl: KL(pi || pi_ref) in nats per sample; "
             "pref_accuracy: held-out pairs (implicit reward for DPO, length-normalised log-prob otherwise); "
             "token_fraction: share of response tokens trained on.", "",
             f"| selection (k = {results['config']['ratio']:.0%}; {s['selected_fraction']:.1%} of tokens after "
             "flooring) | precision | recall |", "|---|---|---|",
             f"| oracle (DPO of the model itself) | {s['precision']:.3f} | {s['recall']:.3f} |",
             f"| random (same count per response) | {s['random_precision']:.3f} | {s['random_recall']:.3f} |"]
    if "weak_precision" in s:
        lines.append(f"| weak oracle (2-layer kit model) | {s['weak_precision']:.3f} | {s['weak_recall']:.3f} |")
    lines += ["", f"Key (lexicon) tokens are {s['key_fraction']:.1%} of all response tokens.",
              f"Finished in {results['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def make_plots(out: Path, methods: dict, strong_dir: Path, weak_dir: Path | None, tok) -> list[str]:
    """reward_vs_kl.png, concentration.png, token_rewards.png (selected vs unselected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from sepo.core.rewards import abs_reward_share_curve
    from sepo.data.collate import pad_right

    written = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, m in methods.items():
        if m.get("gold_reward") is not None and m.get("kl") is not None:
            ax.scatter(m["kl"], m["gold_reward"])
            ax.annotate(name, (m["kl"], m["gold_reward"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="KL(pi || pi_ref) on policy samples (nats)", ylabel="gold reward", title="reward vs KL")
    fig.tight_layout()
    fig.savefig(out / "reward_vs_kl.png", dpi=100)
    plt.close(fig)
    written.append("reward_vs_kl.png")

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
    return [*written, "concentration.png", "token_rewards.png"]
