"""`sepo inspect`: what the oracle rewards, how concentrated it is, and what was selected.

    sepo inspect --scores runs/selected --output runs/inspect

Reads a `sepo score` or `sepo select` folder and writes (atomically) ``summary.json`` (reward statistics,
chosen vs rejected and selected vs unselected), ``concentration.png`` (the share of a pair's tokens that
accounts for 80% of its reward difference -- the paper's Figure 1), ``reward_histograms.png`` and
``examples.html``: a self-contained page of N pairs with each token coloured by its reward and the selected
tokens outlined. See docs/inspect.md.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sepo import __version__
from sepo.config import option, to_dict
from sepo.core.rewards import concentration, concentration_curve, pair_contributions
from sepo.core.selection import SIDES
from sepo.errors import ConfigError, SepoError
from sepo.io import arrow_table, atomic_dir, load_dataset_dir, owns_output, write_metadata
from sepo.stages.select import check_token_aligned, flat_column, pad_rows, token_pieces

log = logging.getLogger(__name__)
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# torch.quantile refuses inputs above 16M elements; the quantiles are taken over a seeded sample of this size
QUANTILE_SAMPLE = 1_000_000
# a token is drawn in full colour from this quantile of |r| over the shown pairs, so one outlier does not wash
# out every other token
COLOUR_QUANTILE = 0.95
CURVE_POINTS = 101  # token shares 0, 0.01, ..., 1 at which the concentration curve is evaluated


@dataclass
class InspectConfig:
    """Reward statistics, the reward-concentration curve and an HTML view of the selected tokens."""

    scores: str | None = option(None, "a `sepo score` or `sepo select` output folder")
    output: str | None = option(None, "report folder (none: '<scores>-inspect' beside the input)")
    num_examples: int = option(20, "pairs shown in examples.html (the first rows)", unit="pairs")
    level: float = option(0.8, "share of a pair's reward difference the concentration measure asks for")
    tokenizer: str | None = option(None, "tokenizer to show tokens as text (none: the one in the metadata)")
    batch_rows: int = option(4096, "pairs per vectorized batch of the concentration computation", unit="pairs")
    overwrite: bool = option(False, "replace an existing report folder")

    def __post_init__(self):
        if not 0.0 < self.level <= 1.0:
            raise ConfigError(f"level must be in (0, 1], got {self.level}")
        if self.num_examples < 0 or self.batch_rows < 1:
            raise ConfigError("num_examples must be >= 0 and batch_rows >= 1")


# ---------------------------------------------------------------------------------------------- helpers


def describe(values: torch.Tensor) -> dict:
    """Count, mean, std, min, max and quantiles of a flat tensor."""
    v = values.double()
    if v.numel() == 0:
        return {"count": 0}
    sample = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:QUANTILE_SAMPLE]]
    q = torch.quantile(sample, torch.tensor(QUANTILES, dtype=torch.float64))
    return {"count": int(v.numel()), "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), **{f"q{int(p * 100):02d}": float(x) for p, x in zip(QUANTILES, q)}}


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Display text of each token: the text it adds (``token_pieces``), else its vocabulary entry."""
    if tokenizer is None:
        return [f"#{i} " for i in ids]
    return [piece or tokenizer.convert_ids_to_tokens(i) for i, piece in zip(ids, token_pieces(tokenizer, ids))]


def _colour(r: float, scale: float) -> str:
    a = min(abs(r) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba(0,150,60,{a:.3f})" if r >= 0 else f"rgba(215,40,40,{a:.3f})"


def render_html(rows: list[dict], tokenizer, scale: float, title: str) -> str:
    """A self-contained page (inline CSS, no scripts): tokens coloured by reward, selected ones outlined."""
    css = ("body{font-family:sans-serif;margin:2em;max-width:70em}.pair{border-top:1px solid #ccc;padding:.5em 0}"
           ".prompt{color:#555;white-space:pre-wrap}.resp{white-space:pre-wrap;line-height:1.9;font-family:monospace}"
           ".tok{border-radius:3px;padding:1px 0}.sel{outline:2px solid #1f3bff}.legend span{padding:2px 6px}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p class='legend'>token reward: <span style='background:rgba(0,150,60,1)'>positive</span> "
             f"<span style='background:rgba(215,40,40,1)'>negative</span> (full colour at |r| &ge; {scale:.3g}); "
             "<span class='sel'>selected</span> tokens are outlined; hover a token for its reward.</p>"]
    for row in rows:
        parts.append(f"<div class='pair' id='pair-{row['index']}'><h3>row {row['index']}</h3>"
                     f"<div class='prompt'>{html.escape(str(row.get('prompt', '')))}</div>")
        for side in SIDES:
            ids, rewards = row[f"{side}_input_ids"], row[f"{side}_rewards"]
            mask = row.get(f"{side}_mask") or [False] * len(ids)
            spans = [f"<span class='tok{' sel' if m else ''}' style='background:{_colour(r, scale)}' "
                     f"title='r={r:.4f}' data-reward='{r:.6g}'>{html.escape(t)}</span>"
                     for t, r, m in zip(token_texts(tokenizer, ids), rewards, mask)]
            parts.append(f"<p><b>{side}</b> (sum r = {sum(rewards):.3f})</p><div class='resp {side}'>{''.join(spans)}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- run


def report_folder(cfg: InspectConfig) -> Path | None:
    return Path(cfg.output) if cfg.output else Path(cfg.scores).parent / f"{Path(cfg.scores).name}-inspect" \
        if cfg.scores else None


@owns_output(report_folder)
def run(cfg: InspectConfig) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from sepo.models import load_tokenizer

    if not cfg.scores:
        raise ConfigError("sepo inspect needs --scores (a `sepo score` or `sepo select` folder)")
    out = report_folder(cfg)
    if out.exists() and not cfg.overwrite:
        raise SepoError(f"{out} already exists; choose another --output or pass --overwrite")

    # ---- 1. load ----
    ds, meta = load_dataset_dir(cfg.scores, ("chosen_input_ids", "rejected_input_ids", "chosen_rewards",
                                             "rejected_rewards"), produced_by="sepo score")
    has_masks = {"chosen_mask", "rejected_mask"} <= set(ds.column_names)
    table = arrow_table(ds)
    check_token_aligned(table, cfg.scores, kinds=("rewards", "mask"))
    flat = {side: flat_column(table, f"{side}_rewards") for side in SIDES}
    masks = {side: flat_column(table, f"{side}_mask")[0].bool() for side in SIDES} if has_masks else None

    # ---- 2. summary statistics ----
    summary: dict = {"num_pairs": len(ds), "has_selection": has_masks}
    for side in SIDES:
        values, lengths = flat[side]
        summary[side] = {"tokens": describe(values), "response_length_mean": float(lengths.double().mean())
                         if len(lengths) else 0.0}
        if masks is not None:
            summary[side]["selected"] = describe(values[masks[side]])
            summary[side]["unselected"] = describe(values[~masks[side]])

    # ---- 3. reward concentration (paper Fig. 1), vectorized over padded batches of pairs ----
    grid = torch.linspace(0, 1, CURVE_POINTS)
    shares, curves = [], []
    for b in range(0, len(ds), cfg.batch_rows):
        rows = torch.arange(b, min(b + cfg.batch_rows, len(ds)))
        (cr, cm, _), (rr, rm, _) = (pad_rows(*flat[side], rows) for side in SIDES)
        contributions, mask = pair_contributions(cr, cm, rr, rm)  # (n, Lc + Lr)
        shares.append(concentration(contributions, mask, cfg.level)[0])
        curves.append(concentration_curve(contributions, mask, grid))
    share = torch.cat(shares) if shares else torch.zeros(0)
    curve = torch.cat(curves) if curves else torch.zeros(0, grid.numel())
    valid = ~share.isnan()
    margins = torch.zeros(len(ds), dtype=torch.float64)
    for sign, side in ((1, "chosen"), (-1, "rejected")):
        values, lengths = flat[side]
        margins.index_add_(0, torch.repeat_interleave(torch.arange(len(ds)), lengths), sign * values.double())
    summary["pairs"] = {
        "mean_reward_margin": float(margins.mean()) if len(ds) else None,
        "oracle_prefers_chosen": float((margins > 0).double().mean()) if len(ds) else None,
        "concentration_level": cfg.level, "pairs_with_positive_margin": int(valid.sum()),
        "mean_token_share_for_level": float(share[valid].mean()) if valid.any() else None,
        "median_token_share_for_level": float(share[valid].median()) if valid.any() else None,
    }

    # ---- 4. plots and the HTML page, written atomically ----
    tokenizer = None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer or meta.get("tokenizer") or "")
    except SepoError as e:
        log.warning("tokens shown as ids: %s", e)
    examples = [ds[i] for i in range(min(cfg.num_examples, len(ds)))]
    shown = [abs(r) for row in examples for side in SIDES for r in row[f"{side}_rewards"]]
    scale = float(torch.tensor(shown).quantile(COLOUR_QUANTILE)) if shown else 1.0
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        if valid.any():
            ax1.plot(grid.numpy(), curve[valid].nanmean(0).numpy(), label="mean over pairs")
            ax2.hist(share[valid].numpy(), bins=20, range=(0, 1), color="#4c72b0")
        ax1.axhline(cfg.level, color="grey", ls="--", label=f"{cfg.level:.0%} of the reward difference")
        ax1.set(xlabel="share of the pair's tokens (largest contributions first)",
                ylabel="share of reward difference", title="reward concentration")
        ax1.legend()
        ax2.set(xlabel=f"share of tokens holding {cfg.level:.0%} of the difference", ylabel="pairs",
                title=f"{int(valid.sum())} pairs with a positive margin")
        fig.tight_layout()
        fig.savefig(tmp / "concentration.png", dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2 if masks is not None else 1, figsize=(11 if masks is not None else 6, 4),
                                 squeeze=False)
        for side in SIDES:
            axes[0, 0].hist(flat[side][0].numpy(), bins=60, alpha=0.55, label=side)
        axes[0, 0].set(xlabel="token reward r_t", ylabel="tokens", title="chosen vs rejected", yscale="log")
        axes[0, 0].legend()
        if masks is not None:
            every = torch.cat([flat[s][0] for s in SIDES])
            chosen_sel = torch.cat([masks[s] for s in SIDES])
            axes[0, 1].hist(every[chosen_sel].numpy(), bins=60, alpha=0.55, label="selected")
            axes[0, 1].hist(every[~chosen_sel].numpy(), bins=60, alpha=0.55, label="unselected")
            axes[0, 1].set(xlabel="token reward r_t", title="selected vs unselected", yscale="log")
            axes[0, 1].legend()
        fig.tight_layout()
        fig.savefig(tmp / "reward_histograms.png", dpi=110)
        plt.close(fig)
        (tmp / "examples.html").write_text(render_html(
            [{**row, "index": row.get("index", i)} for i, row in enumerate(examples)], tokenizer, scale,
            f"sepo inspect: {cfg.scores}"), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        write_metadata(tmp, {"stage": "inspect", "sepo_version": __version__, "source": cfg.scores,
                             "tokenizer": meta.get("tokenizer"), "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
                             "num_rows": len(ds), "config": to_dict(cfg)})
    pairs = summary["pairs"]
    if pairs["mean_token_share_for_level"] is not None:
        log.info("%.0f%% of the reward difference sits in %.1f%% of a pair's tokens on average (%d pairs)",
                 100 * cfg.level, 100 * pairs["mean_token_share_for_level"], pairs["pairs_with_positive_margin"])
    else:
        log.info("no pair has a positive reward margin (the oracle prefers no chosen response): no concentration")
    log.info("wrote %s (summary.json, concentration.png, reward_histograms.png, examples.html)", out)
    return summary
