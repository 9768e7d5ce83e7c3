"""`sepo inspect`: what the oracle rewards, how concentrated it is, and what was selected.

    sepo inspect --scores runs/selected --output runs/inspect

    sepo inspect --scores runs/selected --task sentiment     # + selection quality against the known key tokens

Reads a `sepo score` or `sepo select` folder and writes (atomically) ``summary.json`` (reward statistics,
chosen vs rejected and selected vs unselected; the pairs' reward margins; the reward concentration; with
``--task`` or ``--key-tokens`` the polarity-aware selection quality), ``concentration.png`` (the share of a
response's sum |r_t| carried by its top x% of tokens -- the paper's Figure 1), ``reward_histograms.png`` and
``examples.html``: a self-contained page of N pairs with each token coloured by its reward and the selected
tokens outlined. See docs/inspect.md.
"""

from __future__ import annotations

import html
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sepo import __version__
from sepo.config import option, to_dict
from sepo.core.rewards import abs_reward_share_curve, curve_crossing, token_share_for_abs_reward
from sepo.core.selection import SIDES
from sepo.errors import ConfigError, SepoError
from sepo.io import arrow_table, atomic_dir, flat_column, load_dataset_dir, owns_output, write_metadata
from sepo.stages.select import check_token_aligned, pad_rows, token_pieces
from sepo.tasks import TASK_NAMES, KeyTokens

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
    """Reward statistics, the reward-concentration curve, selection quality and an HTML view of the selection."""

    scores: str | None = option(None, "a `sepo score` or `sepo select` output folder")
    output: str | None = option(None, "report folder (none: '<scores>-inspect' beside the input)")
    num_examples: int = option(20, "pairs shown in examples.html (the first rows)", unit="pairs")
    level: float = option(0.8, "share of a response's sum |r_t| the concentration measure asks for")
    tokenizer: str | None = option(None, "tokenizer to show tokens as text (none: the one in the metadata)")
    batch_rows: int = option(4096, "responses per vectorized batch of the concentration computation",
                             unit="responses")
    task: str | None = option(None, "a task with known key tokens (sepo.tasks): adds the selection quality "
                                    f"against them; one of {', '.join(TASK_NAMES)}")
    key_tokens: str | None = option(None, "module:function giving the key tokens of a pair, in the signature of "
                                          "Task.key_tokens (instead of --task)")
    overwrite: bool = option(False, "replace an existing report folder")

    def __post_init__(self):
        if not 0.0 < self.level <= 1.0:
            raise ConfigError(f"level must be in (0, 1], got {self.level}")
        if self.num_examples < 0 or self.batch_rows < 1:
            raise ConfigError("num_examples must be >= 0 and batch_rows >= 1")
        if self.task is not None and self.task not in TASK_NAMES:
            raise ConfigError(f"unknown task '{self.task}'; known tasks: {', '.join(TASK_NAMES)}")
        if self.task and self.key_tokens:
            raise ConfigError("give --task or --key-tokens, not both (a task brings its own key tokens)")
        if self.key_tokens is not None and ":" not in self.key_tokens:
            raise ConfigError(f"--key-tokens takes module:function, got {self.key_tokens!r}")


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


@dataclass
class Concentration:
    """The concentration of each side's responses (``SIDES``): per response, the share of its tokens that
    carries ``level`` of its sum |r_t| (N,) (NaN where every reward is 0), and the sum over those responses of
    their share curves on ``grid`` (G,) (divided by their count, the mean curve)."""

    level: float
    grid: torch.Tensor  # (G,)
    shares: dict[str, torch.Tensor]  # side -> (N,)
    curve_sums: dict[str, torch.Tensor]  # side -> (G,) float64

    def summary(self) -> dict:
        """Per side and over all responses: how many have a reward, the token share at which the mean curve
        reaches the level, the mean and median per-response share, and the mean curve itself."""
        groups = {"responses": SIDES, **{side: (side,) for side in SIDES}}
        out: dict = {"level": self.level, "grid": [round(float(x), 4) for x in self.grid]}
        for name, sides in groups.items():
            shares = torch.cat([self.shares[s] for s in sides])
            valid = ~shares.isnan()
            n = int(valid.sum())
            mean_curve = sum(self.curve_sums[s] for s in sides) / max(n, 1)  # (G,)
            out[name] = {
                "responses": n, "responses_without_reward": int((~valid).sum()),
                "tokens_for_level_on_mean_curve": _rounded(curve_crossing(self.grid, mean_curve, self.level)) if n
                else None,
                "tokens_for_level_mean": float(shares[valid].mean()) if n else None,
                "tokens_for_level_median": float(shares[valid].median()) if n else None,
                "mean_curve": [round(float(x), 5) for x in mean_curve] if n else None,
            }
        return out


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 6)  # a grid point: 0.35, not 0.35000000000000003


def measure_concentration(flat: dict[str, tuple[torch.Tensor, torch.Tensor]], level: float = 0.8,
                          batch_rows: int = 4096) -> Concentration:
    """Reward concentration (paper Fig. 1) of flat reward columns ``{side: (values (T,), lengths (N,))}``,
    vectorized over padded batches of responses."""
    grid = torch.linspace(0, 1, CURVE_POINTS, dtype=torch.float64)
    shares, curve_sums = {}, {}
    for side in SIDES:
        values, lengths = flat[side]
        share = torch.full((lengths.shape[0],), float("nan"))
        curve_sum = torch.zeros(CURVE_POINTS, dtype=torch.float64)
        for b in range(0, lengths.shape[0], batch_rows):
            rows = torch.arange(b, min(b + batch_rows, lengths.shape[0]))
            rewards, mask, _ = pad_rows(values, lengths, rows)  # (n, R)
            share[rows] = token_share_for_abs_reward(rewards, mask, level)
            curve_sum += abs_reward_share_curve(rewards, mask, grid).nan_to_num(0.0).double().sum(dim=0)  # NaN rows: none
        shares[side], curve_sums[side] = share, curve_sum
    return Concentration(level, grid, shares, curve_sums)


def concentration_summary(ds, *, level: float = 0.8, batch_rows: int = 4096) -> dict:
    """The concentration section of ``summary.json`` for a dataset with ``chosen_rewards`` / ``rejected_rewards``,
    plus ``shares``: side -> every response's share of tokens for the level (None: no reward), in row order
    (``sepo sweep`` bootstraps its CIs from them), and ``gaussian_tokens_for_level_mean``: the same mean for
    rewards without structure -- i.i.d. N(0, 1) at the same response lengths (seeded) -- to read it against."""
    table = arrow_table(ds)
    flat = {side: flat_column(table, f"{side}_rewards") for side in SIDES}
    conc = measure_concentration(flat, level, batch_rows)
    shares = {side: [None if x != x else round(x, 5) for x in conc.shares[side].tolist()] for side in SIDES}
    gen = torch.Generator().manual_seed(0)
    noise = {side: (torch.randn(values.shape, generator=gen), lengths) for side, (values, lengths) in flat.items()}
    gaussian = measure_concentration(noise, level, batch_rows).summary()["responses"]["tokens_for_level_mean"]
    return {**conc.summary(), "shares": shares, "gaussian_tokens_for_level_mean": gaussian}


def reward_statistics(flat: dict, masks: dict | None) -> dict:
    """Per side: token-reward statistics, mean response length; selected vs unselected with a selection."""
    out = {}
    for side in SIDES:
        values, lengths = flat[side]
        out[side] = {"tokens": describe(values),
                     "response_length_mean": float(lengths.double().mean()) if len(lengths) else 0.0}
        if masks is not None:
            out[side]["selected"] = describe(values[masks[side]])
            out[side]["unselected"] = describe(values[~masks[side]])
    return out


def pair_margins(flat: dict, num_pairs: int) -> dict:
    """The oracle's reward margin sum_t r(chosen_t) - sum_t r(rejected_t) per pair: its mean, and how often the
    oracle prefers the chosen response (margin > 0)."""
    margins = torch.zeros(num_pairs, dtype=torch.float64)
    for sign, side in ((1, "chosen"), (-1, "rejected")):
        values, lengths = flat[side]
        margins.index_add_(0, torch.repeat_interleave(torch.arange(num_pairs), lengths), sign * values.double())
    return {"mean_reward_margin": float(margins.mean()) if num_pairs else None,
            "oracle_prefers_chosen": float((margins > 0).double().mean()) if num_pairs else None}


def load_key_tokens(cfg: InspectConfig) -> KeyTokens | None:
    """The key-token function of ``--task`` or ``--key-tokens`` (None: no selection quality)."""
    if cfg.task:
        from sepo.tasks import get_task

        return get_task(cfg.task).key_tokens
    if not cfg.key_tokens:
        return None
    module_name, fn_name = cfg.key_tokens.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SepoError(f"--key-tokens {cfg.key_tokens}: cannot import {fn_name} from module {module_name} ({e})") from None
    if not callable(fn):
        raise SepoError(f"--key-tokens {cfg.key_tokens} is not callable")
    return fn


def plot_concentration(path: Path, conc: Concentration) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([0, 1], [0, 1], "k:", label="uniform |r_t|")
    for side in SIDES:
        valid = ~conc.shares[side].isnan()
        if valid.any():
            ax1.plot(conc.grid.numpy(), (conc.curve_sums[side] / int(valid.sum())).numpy(), label=f"{side} (mean)",
                     ls="-" if side == "chosen" else "--")
            ax2.hist(conc.shares[side][valid].numpy(), bins=20, range=(0, 1), alpha=0.55, label=side)
    ax1.axhline(conc.level, color="grey", ls="--", label=f"{conc.level:.0%} of sum |r_t|")
    ax1.set(xlabel="share of a response's tokens (largest |r_t| first)", ylabel="share of the response's sum |r_t|",
            ylim=(0, 1.02), title="reward concentration")
    ax1.legend()
    ax2.set(xlabel=f"share of tokens carrying {conc.level:.0%} of sum |r_t|", ylabel="responses",
            title="per response")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward_histograms(path: Path, flat: dict, masks: dict | None) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if masks is not None else 1, figsize=(11 if masks is not None else 6, 4),
                             squeeze=False)
    for side in SIDES:
        axes[0, 0].hist(flat[side][0].numpy(), bins=60, alpha=0.55, label=side)
    axes[0, 0].set(xlabel="token reward r_t", ylabel="tokens", title="chosen vs rejected", yscale="log")
    axes[0, 0].legend()
    if masks is not None:
        every = torch.cat([flat[s][0] for s in SIDES])
        selected = torch.cat([masks[s] for s in SIDES])
        axes[0, 1].hist(every[selected].numpy(), bins=60, alpha=0.55, label="selected")
        axes[0, 1].hist(every[~selected].numpy(), bins=60, alpha=0.55, label="unselected")
        axes[0, 1].set(xlabel="token reward r_t", title="selected vs unselected", yscale="log")
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- run


def report_folder(cfg: InspectConfig) -> Path | None:
    return Path(cfg.output) if cfg.output else Path(cfg.scores).parent / f"{Path(cfg.scores).name}-inspect" \
        if cfg.scores else None


@owns_output(report_folder)
def run(cfg: InspectConfig) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    out = _output_folder(cfg)
    key_tokens = load_key_tokens(cfg)  # a bad --task / --key-tokens fails before any work
    ds, meta, flat, masks = _load(cfg)
    summary: dict = {"num_pairs": len(ds), "has_selection": masks is not None, **reward_statistics(flat, masks),
                     "pairs": pair_margins(flat, len(ds))}
    concentration = measure_concentration(flat, cfg.level, cfg.batch_rows)
    summary["concentration"] = concentration.summary()
    tokenizer = _tokenizer(cfg, meta, required=key_tokens is not None)
    if key_tokens is not None:
        from sepo.tasks import get_task
        from sepo.tasks.quality import selection_report

        avoid = get_task(cfg.task).avoid_tokens if cfg.task else None
        summary["selection_quality"] = {"key_tokens": cfg.key_tokens or f"task {cfg.task}",
                                        **selection_report(ds, tokenizer, key_tokens, avoid)}
    _write_report(out, cfg, ds, meta, summary, flat, masks, concentration, tokenizer)
    _log_summary(summary, out)
    return summary


def _output_folder(cfg: InspectConfig) -> Path:
    if not cfg.scores:
        raise ConfigError("sepo inspect needs --scores (a `sepo score` or `sepo select` folder)")
    out = report_folder(cfg)
    if out.exists() and not cfg.overwrite:
        raise SepoError(f"{out} already exists; choose another --output or pass --overwrite")
    return out


def _load(cfg: InspectConfig):
    """The dataset, its metadata, flat reward columns ``{side: (values, lengths)}`` and flat masks (or None)."""
    ds, meta = load_dataset_dir(cfg.scores, ("chosen_input_ids", "rejected_input_ids", "chosen_rewards",
                                             "rejected_rewards"), produced_by="sepo score")
    table = arrow_table(ds)
    check_token_aligned(table, cfg.scores, kinds=("rewards", "mask"))
    flat = {side: flat_column(table, f"{side}_rewards") for side in SIDES}
    has_masks = {"chosen_mask", "rejected_mask"} <= set(ds.column_names)
    masks = {side: flat_column(table, f"{side}_mask")[0].bool() for side in SIDES} if has_masks else None
    return ds, meta, flat, masks


def _tokenizer(cfg: InspectConfig, meta: dict, *, required: bool):
    """The tokenizer to show tokens as text; ``required`` (key tokens are decoded from it): a missing one, or
    one other than the data was tokenized with, is an error instead of ids on the page."""
    from sepo.models import load_tokenizer, tokenizer_fingerprint

    name = cfg.tokenizer or meta.get("tokenizer") or ""
    try:
        tokenizer = load_tokenizer(name)
    except SepoError as e:
        if required:
            raise SepoError(f"the key tokens are found in the decoded text, which needs the data's tokenizer: {e}; "
                            "pass --tokenizer") from None
        log.warning("tokens shown as ids: %s", e)
        return None
    made_with = meta.get("tokenizer_fingerprint")
    if required and made_with and tokenizer_fingerprint(tokenizer) != made_with:
        raise SepoError(f"tokenizer {name} is not the one {cfg.scores} was tokenized with ({meta.get('tokenizer')}): "
                        "its ids would decode to other text; pass that tokenizer with --tokenizer")
    return tokenizer


def _write_report(out: Path, cfg: InspectConfig, ds, meta: dict, summary: dict, flat: dict, masks: dict | None,
                  concentration: Concentration, tokenizer) -> None:
    examples = [ds[i] for i in range(min(cfg.num_examples, len(ds)))]
    shown = [abs(r) for row in examples for side in SIDES for r in row[f"{side}_rewards"]]
    scale = float(torch.tensor(shown).quantile(COLOUR_QUANTILE)) if shown else 1.0
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        plot_concentration(tmp / "concentration.png", concentration)
        plot_reward_histograms(tmp / "reward_histograms.png", flat, masks)
        (tmp / "examples.html").write_text(render_html(
            [{**row, "index": row.get("index", i)} for i, row in enumerate(examples)], tokenizer, scale,
            f"sepo inspect: {cfg.scores}"), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        write_metadata(tmp, {"stage": "inspect", "sepo_version": __version__, "source": cfg.scores,
                             "tokenizer": meta.get("tokenizer"), "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
                             "num_rows": len(ds), "config": to_dict(cfg)})


def _log_summary(summary: dict, out: Path) -> None:
    conc = summary["concentration"]
    every = conc["responses"]
    if every["responses"]:
        on_curve = every["tokens_for_level_on_mean_curve"]
        log.info("%.0f%% of a response's sum |r_t| sits in its top %.0f%% of tokens (mean curve over %d responses; "
                 "per response: mean %.1f%%, median %.1f%%)", 100 * conc["level"], 100 * on_curve,
                 every["responses"], 100 * every["tokens_for_level_mean"], 100 * every["tokens_for_level_median"])
    else:
        log.info("every token reward is 0: no concentration")
    pairs = summary["pairs"]
    if pairs["oracle_prefers_chosen"] is not None:
        log.info("the oracle prefers the chosen response in %.1f%% of %d pairs (mean margin %.4g)",
                 100 * pairs["oracle_prefers_chosen"], summary["num_pairs"], pairs["mean_reward_margin"])
    if "selection_quality" in summary:
        from sepo.tasks.quality import markdown_table

        quality = summary["selection_quality"]
        log.info("selection quality against the key tokens of %s:\n%s", quality["key_tokens"], markdown_table(quality))
    log.info("wrote %s (summary.json, concentration.png, reward_histograms.png, examples.html)", out)
