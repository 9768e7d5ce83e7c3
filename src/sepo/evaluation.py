"""Evaluation metrics: preference accuracy, batched generation, rewards, win rate, KL on samples, AlpacaEval export.

Everything here takes models and token ids and returns plain numbers or lists, so ``sepo eval`` and
``sepo demo`` compose the same functions.

* Preference accuracy (held-out pairs). With a reference, the implicit reward of a response is
  ``log pi(y|x) - log pi_ref(y|x)`` (DPO, Rafailov et al. 2023, eq. 5, up to the factor beta); without one it
  is the length-normalised log-prob ``(1/|y|) log pi(y|x)`` (SimPO, Meng et al. 2024, eq. 4). A pair counts as
  correct when the chosen response's reward is higher; an exact tie counts 1/2.
* Win rate of policy generations against reference generations on the same prompts under a reward:
  ``mean_i [1(r_i^pi > r_i^ref) + 1/2 * 1(r_i^pi = r_i^ref)]``.
* KL(pi || pi_ref) on the policy's own samples y ~ pi(.|x): ``mean_samples sum_t [log pi(y_t|x,y<t) -
  log pi_ref(y_t|x,y<t)]`` -- an unbiased Monte-Carlo estimate when sampling at temperature 1 without top-k /
  top-p; a model against itself gives exactly 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sepo.data.collate import collate_pairs
from sepo.errors import SepoError
from sepo.models import response_log_probs

RewardFn = Callable[[list[str], list[str]], list[float]]

# --------------------------------------------------------------------------- log-probs


@torch.inference_mode()
def sequence_log_probs(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                       pad_token_id: int, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs and response lengths, each (N,), through ``response_log_probs``."""
    device = next(model.parameters()).device
    sums, lengths = [], []
    for s in range(0, len(prompt_ids), batch_size):
        rows = [{"prompt_input_ids": p, "chosen_input_ids": r, "rejected_input_ids": r, "index": s + i}
                for i, (p, r) in enumerate(zip(prompt_ids[s : s + batch_size], response_ids[s : s + batch_size]))]
        batch = collate_pairs(rows, pad_token_id, include_rejected=False).to(device)
        logps = response_log_probs(model, batch)  # (B, R)
        sums.append(logps.sum(-1).cpu())
        lengths.append(batch.response_mask.sum(-1).cpu())
    if not sums:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(sums), torch.cat(lengths)


def preference_accuracy(model, rows, pad_token_id: int, *, reference=None, batch_size: int = 32) -> dict[str, float]:
    """Held-out preference accuracy on canonical pairs (``rows``: a Dataset or list of dicts).

    Returns ``accuracy`` (ties 1/2), ``margin`` (mean reward margin chosen - rejected) and ``metric``
    (``implicit`` with a reference, ``logprob`` -- length-normalised log-prob -- without)."""
    prompts = [r["prompt_input_ids"] for r in rows]
    lc, nc = sequence_log_probs(model, prompts, [r["chosen_input_ids"] for r in rows], pad_token_id, batch_size)
    lr, nr = sequence_log_probs(model, prompts, [r["rejected_input_ids"] for r in rows], pad_token_id, batch_size)
    if reference is not None:
        rc, _ = sequence_log_probs(reference, prompts, [r["chosen_input_ids"] for r in rows], pad_token_id, batch_size)
        rr, _ = sequence_log_probs(reference, prompts, [r["rejected_input_ids"] for r in rows], pad_token_id, batch_size)
        margin, metric = (lc - rc) - (lr - rr), "implicit"
    else:
        margin, metric = lc / nc.clamp(min=1) - lr / nr.clamp(min=1), "logprob"
    return {"accuracy": ties_half(margin), "margin": float(margin.mean()) if len(margin) else 0.0,
            "metric": metric, "num_pairs": len(margin)}


def ties_half(margin: torch.Tensor) -> float:
    """Share of positive entries, zeros counted 1/2."""
    if margin.numel() == 0:
        return 0.0
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


# --------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             batch_size: int = 32, seed: int = 0) -> list[tuple[str, list[int]]]:
    """Continue each prompt (token ids); returns ``(text, ids)`` per prompt, ids cut after the first EOS
    (kept). Prompts are left-padded in batches; pad and EOS ids come from the tokenizer. Seeded."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None:
        raise SepoError("the tokenizer has no pad token; load it with sepo.models.load_tokenizer")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[str, list[int]]] = []
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {
        "do_sample": False}
    for s in range(0, len(prompt_ids), batch_size):
        chunk = [list(p) for p in prompt_ids[s : s + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (B, P) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)  # (B, P)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              pad_token_id=pad, eos_token_id=eos, **sampling)
        for row in seqs[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]
            out.append((tokenizer.decode(row, skip_special_tokens=True), row))
    return out


# --------------------------------------------------------------------------- rewards, win rate, KL


def load_reward(spec: str, *, device: str | torch.device = "cpu", batch_size: int = 16) -> RewardFn:
    """``module:function`` (called as ``fn(prompts: list[str], completions: list[str]) -> list[float]``) or a
    Hugging Face ``AutoModelForSequenceClassification`` (hub id or folder) scoring ``prompt + completion``:
    its single logit, or for a classifier with several labels the last label's logit minus the first's."""
    if ":" in spec and not Path(spec).exists():
        module_name, fn_name = spec.split(":", 1)
        try:  # imports and later runs that module's code, by design: a reward is code the user chose
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise SepoError(f"reward '{spec}': cannot import {fn_name} from module {module_name} ({e})"
                            + _import_path_hint(module_name)) from None
        if not callable(fn):
            raise SepoError(f"reward '{spec}' is not callable")
        return _checked(fn, spec)
    return _classifier_reward(spec, device, batch_size)


def _import_path_hint(module_name: str) -> str:
    """The usual reason a reward module in the current folder does not import: the `sepo` command does not put
    the current folder on the import path (``python -m sepo`` does)."""
    import sys

    top = module_name.split(".")[0]
    here = Path.cwd()
    if not ((here / f"{top}.py").is_file() or (here / top).is_dir()):
        return ""
    on_path = {str(Path(p or ".").resolve()) for p in sys.path}
    if str(here.resolve()) in on_path:
        return ""
    return (f"; {top} is in the current folder, which is not on the import path: run with PYTHONPATH=. (or "
            "`python -m sepo`, or install the module)")


def _checked(fn: RewardFn, name: str) -> RewardFn:
    def call(prompts: list[str], completions: list[str]) -> list[float]:
        values = list(fn(list(prompts), list(completions)))
        if len(values) != len(completions):
            raise SepoError(f"reward {name} returned {len(values)} values for {len(completions)} completions")
        return [float(v) for v in values]

    return call


def _classifier_reward(path: str, device, batch_size: int) -> RewardFn:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sepo.hub import hub_kwargs

    hub = hub_kwargs("reward model", path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **hub)
        model = AutoModelForSequenceClassification.from_pretrained(path, **hub).to(device).eval()
    except Exception as e:  # transformers raises OSError / ValueError / hub errors
        raise SepoError(f"reward '{path}' is neither module:function nor a loadable sequence-classification "
                        f"model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id

    @torch.inference_mode()
    def call(prompts: list[str], completions: list[str]) -> list[float]:
        values: list[float] = []
        for s in range(0, len(prompts), batch_size):
            texts = [p + c for p, c in zip(prompts[s : s + batch_size], completions[s : s + batch_size])]
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True).to(device)
            logits = model(**enc).logits.float()  # (B, labels)
            values += (logits[:, 0] if logits.shape[-1] == 1 else logits[:, -1] - logits[:, 0]).tolist()
        return values

    return call


def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> float:
    """Share of prompts where the policy's reward beats the reference's; ties count 1/2."""
    if len(policy_rewards) != len(reference_rewards):
        raise ValueError("win_rate needs one reference reward per policy reward")
    margin = torch.tensor(policy_rewards, dtype=torch.float64) - torch.tensor(reference_rewards, dtype=torch.float64)
    return ties_half(margin)


def kl_on_samples(policy, reference, prompt_ids: Sequence[Sequence[int]], sample_ids: Sequence[Sequence[int]],
                  pad_token_id: int, batch_size: int = 32) -> float:
    """Monte-Carlo KL(pi || pi_ref): mean over samples y ~ pi of sum_t [log pi(y_t) - log pi_ref(y_t)]."""
    keep = [i for i, y in enumerate(sample_ids) if len(y)]
    if not keep:
        return 0.0
    prompts, samples = [prompt_ids[i] for i in keep], [sample_ids[i] for i in keep]
    lp, _ = sequence_log_probs(policy, prompts, samples, pad_token_id, batch_size)
    lr, _ = sequence_log_probs(reference, prompts, samples, pad_token_id, batch_size)
    return float((lp - lr).mean())


def alpacaeval_records(prompts: Sequence[str], outputs: Sequence[str], generator: str) -> list[dict]:
    """AlpacaEval's model-outputs format: ``[{"instruction", "output", "generator"}, ...]``."""
    return [{"instruction": p, "output": o, "generator": generator} for p, o in zip(prompts, outputs)]
