"""Selection quality against known key tokens, by polarity (``sepo inspect --task``, ``sepo sweep``, the demo).

A token selection is judged on the side it was made for. The chosen response's selection (its top-k token
rewards) is compared with the chosen response's key tokens -- those that make it better -- and the rejected
response's selection (its bottom-k) with the rejected response's key tokens -- those that make it worse
(``Task.key_tokens`` gives both). Pooling the sides, or both polarities, would count a positive word in a
rejected response -- rightly high-reward, rightly not selected -- as a miss.

For each side, counted on every token of a key word and again on only the first token of each key word:

* ``auroc`` -- of the token reward *as the selection ranks it* (chosen: r; rejected: -r), key vs other tokens;
  0.5 is chance, 1 means every key token outranks every other token;
* with a selection (``chosen_mask`` / ``rejected_mask``): ``precision``, its ``base_rate`` (a random
  selection of the same number of tokens per response), its ``ceiling`` (the best any selection of that
  many tokens per response could do) and ``recall``; see :mod:`sepo.core.metrics`.

Where a task also names tokens to *avoid* (``Task.avoid_tokens``: noisy_chosen's junk), each side that has
any gets ``avoid``: the share of its selection that lands on them against the same base rate -- a selection
that ignores the junk lands on it as often as a random one; one that avoids it, less -- and the AUROC of the
signed reward for avoid vs other tokens (above 0.5: the ranking pulls the junk *into* the selection).

:func:`selection_report` computes it over a ``sepo select`` (or ``sepo score``: AUROC only) dataset;
:func:`markdown_table` prints it.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from sepo.core.metrics import auroc, selection_precision
from sepo.core.selection import SIDES
from sepo.errors import DataError
from sepo.io import arrow_table, flat_column
from sepo.tasks import KeyTokens

# the selection keeps the highest rewards of a chosen response and the lowest of a rejected one: ranked so,
# a key token should come first
SIGN = {"chosen": 1.0, "rejected": -1.0}
COUNTINGS = {"every_token": "every token of a key word", "first_token": "first token of each key word"}
_PER_TOKEN = tuple(f"{side}_{kind}" for side in SIDES for kind in ("rewards", "mask", "ref_logps"))


def key_token_masks(ds, tokenizer, key_tokens: KeyTokens, *, first_token_only: bool = False) -> dict[str, torch.Tensor]:
    """The key tokens of every pair, flat per side: ``{"chosen": (Tc,) bool, "rejected": (Tr,) bool}``, each
    the responses' masks laid end to end in row order (aligned with ``sepo.io.flat_column``)."""
    rows = ds.remove_columns([c for c in ds.column_names if c in _PER_TOKEN])  # key_tokens reads ids and text
    flat: dict[str, list[bool]] = {side: [] for side in SIDES}
    for i, row in enumerate(rows):
        masks = key_tokens(tokenizer, row, first_token_only=first_token_only)
        for side, mask in zip(SIDES, masks):
            n = len(row[f"{side}_input_ids"])
            if len(mask) != n:
                raise DataError(f"the key-token function returned {len(mask)} entries for {n} tokens", row=i + 1,
                                field=f"{side}_input_ids",
                                hint="a key-token function returns one bool per response token, for both sides")
            flat[side].extend(bool(m) for m in mask)
    return {side: torch.tensor(values, dtype=torch.bool) for side, values in flat.items()}


def _aligned(table, side: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-token column, flat, refused when a row's length differs from its response ids."""
    values, lengths = flat_column(table, f"{side}_{name}")
    _, id_lengths = flat_column(table, f"{side}_input_ids")
    bad = (lengths != id_lengths).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise DataError(f"{int(lengths[i])} entries for {int(id_lengths[i])} tokens of {side}_input_ids", row=i + 1,
                        field=f"{side}_{name}", hint="the per-token values do not belong to these token ids")
    return values, lengths


def _clean(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _side(score: torch.Tensor, key: torch.Tensor, selected: torch.Tensor | None, lengths: torch.Tensor) -> dict:
    """One side, one counting: AUROC of the signed score, plus the selection's precision when there is one."""
    out = {"auroc": auroc(score, key)}
    if selected is None:
        out.update(key_fraction=float(key.double().mean()) if key.numel() else math.nan,
                   tokens=int(key.numel()), key_tokens=int(key.sum()))
    else:
        out.update(asdict(selection_precision(selected, key, lengths)))
    return {k: _clean(v) for k, v in out.items()}


def _avoid(score: torch.Tensor, avoid: torch.Tensor, selected: torch.Tensor | None, lengths: torch.Tensor) -> dict:
    """Tokens to avoid on one side: AUROC of the signed score (avoid vs other), and with a selection the share of
    it on avoid tokens (``share``) beside a random selection's (``base_rate``) and the avoid tokens' ``recall``."""
    out = {"auroc": auroc(score, avoid), "avoid_fraction": float(avoid.double().mean()),
           "tokens": int(avoid.numel()), "avoid_tokens": int(avoid.sum())}
    if selected is not None:
        p = selection_precision(selected, avoid, lengths)
        out.update(share=p.precision, base_rate=p.base_rate, recall=p.recall, selected_tokens=p.selected_tokens)
    return {k: _clean(v) for k, v in out.items()}


def selection_report(ds, tokenizer, key_tokens: KeyTokens, avoid_tokens: KeyTokens | None = None) -> dict:
    """Polarity-aware quality of the token rewards and the selection of a ``sepo select`` dataset.

    ``ds`` has ``chosen_input_ids``, ``rejected_input_ids``, ``chosen_rewards``, ``rejected_rewards`` and,
    optionally, ``chosen_mask`` / ``rejected_mask`` (without them only AUROC is reported);
    ``key_tokens(tokenizer, row, *, first_token_only=False) -> (chosen_mask, rejected_mask)`` is a
    ``Task.key_tokens``. Returns ``{"pairs", "has_selection", "chosen": {...}, "rejected": {...}}``; each
    side holds ``score`` ("r" or "-r": how the selection ranks its tokens) and, per counting in
    :data:`COUNTINGS`, ``auroc``, ``key_fraction``, ``tokens``, ``key_tokens`` and with a selection
    ``precision``, ``base_rate``, ``ceiling``, ``recall``, ``selected_fraction``, ``selected_tokens``.
    With ``avoid_tokens`` (a ``Task.avoid_tokens``), a side holding any avoid token also gets ``avoid``:
    ``auroc``, ``avoid_fraction``, ``tokens``, ``avoid_tokens`` and with a selection ``share`` (selected tokens
    that are avoid tokens), ``base_rate``, ``recall``, ``selected_tokens``.
    Undefined ratios (no key token, nothing selected) are None.
    """
    missing = {f"{s}_{c}" for s in SIDES for c in ("input_ids", "rewards")} - set(ds.column_names)
    if missing:
        raise DataError(f"missing column(s) {', '.join(sorted(missing))}",
                        hint="selection quality needs a `sepo score` or `sepo select` output")
    has_selection = {"chosen_mask", "rejected_mask"} <= set(ds.column_names)
    table = arrow_table(ds)
    keys = {counting: key_token_masks(ds, tokenizer, key_tokens, first_token_only=counting == "first_token")
            for counting in COUNTINGS}
    avoid = key_token_masks(ds, tokenizer, avoid_tokens) if avoid_tokens is not None else None
    report: dict = {"pairs": len(ds), "has_selection": has_selection}
    for side in SIDES:
        rewards, lengths = _aligned(table, side, "rewards")
        selected = _aligned(table, side, "mask")[0].bool() if has_selection else None
        score = SIGN[side] * rewards.double()  # (T,)
        report[side] = {"score": "r" if SIGN[side] > 0 else "-r",
                        **{c: _side(score, keys[c][side], selected, lengths) for c in COUNTINGS}}
        if avoid is not None and avoid[side].any():
            report[side]["avoid"] = _avoid(score, avoid[side], selected, lengths)
    return report


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict, title: str | None = None) -> str:
    """The report as a Markdown table: one row per side and counting."""
    selection = report["has_selection"]
    head = ["side (ranked by)", "counted on", "AUROC"]
    head += ["precision", "base rate", "ceiling", "recall"] if selection else ["key fraction"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    describe = {"chosen": "chosen (top-k of r)", "rejected": "rejected (bottom-k of r)"}
    for side in SIDES:
        for counting, label in COUNTINGS.items():
            m = report[side][counting]
            cells = [describe[side], label, _fmt(m["auroc"], 2)]
            cells += ([_fmt(m[k]) for k in ("precision", "base_rate", "ceiling", "recall")] if selection
                      else [_fmt(m["key_fraction"])])
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{report['pairs']} pairs. Key tokens: of a chosen response those that make it better, of a "
              "rejected one those that make it worse. AUROC: the chance that a key token outranks another token "
              "as the selection ranks them (0.5 = chance)."
              + (" Base rate: the precision of a random selection of as many tokens per response; ceiling: the "
                 "best precision any selection of that many tokens could reach." if selection else "")]
    avoided = [side for side in SIDES if "avoid" in report[side]]
    if avoided:
        head = ["side (ranked by)", "AUROC", "avoid tokens"] + (["share of the selection", "base rate", "recall"]
                                                               if selection else [])
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for side in avoided:
            m = report[side]["avoid"]
            cells = [describe[side], _fmt(m["auroc"], 2), _fmt(m["avoid_fraction"])]
            cells += [_fmt(m[k]) for k in ("share", "base_rate", "recall")] if selection else []
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Tokens to avoid (the task's `avoid_tokens`: junk a selection should leave out): their share "
                  "of all tokens; AUROC above 0.5 means the ranking pulls them into the selection"
                  + ("; share of the selection: selected tokens that are to be avoided, against a random "
                     "selection's (base rate) -- lower is better." if selection else ".")]
    return "\n".join(lines) + "\n"
