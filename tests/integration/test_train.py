"""`sepo train` end to end on micro models: every loss learns a toy set, the reference stays fixed, a SIGKILLed
run resumes bitwise, LoRA saves/reloads/generates, and bad input fails clearly with nothing half-written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoConfig

from sepo.core.objectives import ALL_LOSSES, is_reference_free, needs_reference_logps, needs_reference_model
from sepo.errors import DataError, SepoError
from sepo.io import METADATA_FILE, save_dataset
from sepo.stages import train
from sepo.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_story_pairs_dataset  # noqa: E402


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from sepo.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("micro"), preset="micro", tokenizer="stories260k", seed=3)


@pytest.fixture(scope="module")
def toy(micro, tmp_path_factory):
    """12 story pairs with a random ~half selection (>= 1 token per response; the boolean masks of a folder selected
    before soft weights existed) and random token rewards in [-1, 1] (scored with beta 0.1), ordered so that the
    untrained model prefers the REJECTED response (higher token-mean log-prob): every loss has something to learn."""
    from transformers import AutoTokenizer

    from sepo.data.collate import collate_pairs
    from sepo.models import load_causal_lm, response_log_probs

    tok = AutoTokenizer.from_pretrained(str(micro))
    ds = make_story_pairs_dataset(tok, 12)
    model = load_causal_lm(str(micro), trainable=False)
    rows = [dict(zip(ds.column_names, v)) for v in zip(*ds.to_dict().values())]
    with torch.no_grad():
        batch = collate_pairs(rows, tok.pad_token_id)
        logps = response_log_probs(model, batch)
    means = logps.sum(-1) / batch.response_mask.sum(-1)  # (2B,)
    rng = random.Random(0)
    for i, row in enumerate(rows):
        if means[i] > means[i + len(rows)]:
            row["chosen_input_ids"], row["rejected_input_ids"] = row["rejected_input_ids"], row["chosen_input_ids"]
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        for side in ("chosen", "rejected"):
            n = len(row[f"{side}_input_ids"])
            row[f"{side}_mask"] = [j == 0 or rng.random() < 0.5 for j in range(n)]
            row[f"{side}_rewards"] = [rng.uniform(-1, 1) for _ in range(n)]
    import datasets

    ds = datasets.Dataset.from_list(rows)
    from sepo.models import tokenizer_fingerprint

    return save_dataset(ds, tmp_path_factory.mktemp("toy") / "pairs",
                        {"stage": "select", "num_rows": len(ds), "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                         "beta": 0.1})


def cfg(micro, toy, out, **kw) -> TrainConfig:
    values = {"model": str(micro), "data": str(toy), "output": str(out), "batch_size": 12, "learning_rate": 5e-3,
              "warmup_ratio": 0.0, "lr_scheduler": "constant", "max_steps": 20, "logging_steps": 1, **kw}
    return TrainConfig(**values)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", list(ALL_LOSSES))
def test_every_loss_learns_the_toy_set_and_only_the_policy_changes(loss, micro, toy, tmp_path, monkeypatch):
    import sepo.models

    frozen = []  # every model loaded with trainable=False (the reference), with a snapshot of its weights
    real = sepo.models.load_causal_lm

    def recording(*args, **kwargs):
        m = real(*args, **kwargs)
        if kwargs.get("trainable") is False:
            frozen.append((m, {k: v.clone() for k, v in m.state_dict().items()}))
        return m

    monkeypatch.setattr(sepo.models, "load_causal_lm", recording)
    out = tmp_path / loss
    result = train.run(cfg(micro, toy, out, loss=loss, eval_data=str(toy)))

    first, metrics = read_log(out)[0], result.metrics
    assert result.steps == 20 and result.output_dir == str(out)
    assert metrics["eval/loss"] < first["train/loss"], "the loss did not fall"
    if loss == "sft":  # sft has no preference: it raises the chosen log-likelihood
        assert metrics["eval/rewards/chosen"] > first["train/rewards/chosen"]
        # it never scores the rejected half while training: no fake rejected reward / accuracy / margin is logged
        assert not {"train/rewards/rejected", "train/rewards/accuracy", "train/rewards/margin"} & set(first)
    else:
        assert metrics["eval/rewards/margin"] > first["train/rewards/margin"]
        assert metrics["eval/rewards/accuracy"] > first["train/rewards/accuracy"]
    # the policy changed; the reference (loaded only by reference losses) did not
    before, after = load_file(str(micro / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if needs_reference_logps(loss) and not needs_reference_model(loss):
        assert list((toy.parent / "pairs.ref-logps").iterdir()), "reference log-probs are cached beside the data"
    if is_reference_free(loss):
        assert not frozen, "a reference-free loss loaded a reference"
    assert frozen or not needs_reference_model(loss)  # tdpo, sepo_kl, sparsepo keep their reference in memory
    for model, snapshot in frozen:
        assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert json.loads((out / METADATA_FILE).read_text())["stage"] == "train"


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_sigkilled_run_resumes_bitwise(micro, toy, tmp_path):
    """A subprocess is SIGKILLed after step 5 (checkpoints at 2 and 4); resuming reaches exactly the final loss and
    weights of an uninterrupted run. LoRA dropout and gradient accumulation over epoch boundaries make the RNG and
    the data position matter."""
    args = {"loss": "sepo", "batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 8, "save_steps": 2,
            "lora": True, "lora_r": 4, "lora_dropout": 0.2, "lr_scheduler": "cosine", "warmup_ratio": 0.25,
            "learning_rate": 5e-3, "logging_steps": 1}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sepo", "train", "--model", str(micro), "--data", str(toy), "--output", str(killed),
           *(f"{k}={v}" for k, v in args.items())]
    env = {**os.environ, train.FAULT_ENV: "5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(d.name for d in (killed / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (killed / METADATA_FILE).exists()  # no final model from a killed run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train.run(cfg(micro, toy, killed, resume=True, **args))
        straight = train.run(cfg(micro, toy, tmp_path / "straight", **args))
    finally:
        torch.set_num_threads(threads)
    assert resumed.steps == straight.steps == 8
    assert resumed.metrics["final_loss"] == straight.metrics["final_loss"]
    a, b = _weights(killed), _weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(killed) if "train/loss" in r] == list(range(1, 9))


def test_lora_saves_reloads_and_generates(micro, toy, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for merge in (True, False):
        out = tmp_path / f"lora-{merge}"
        train.run(cfg(micro, toy, out, loss="simpo", lora=True, lora_r=4, max_steps=3, merge_lora=merge))
        model = (AutoModelForCausalLM if merge else AutoPeftModelForCausalLM).from_pretrained(str(out))
        tok = AutoTokenizer.from_pretrained(str(out))
        ids = tok("Once upon a time", return_tensors="pt")
        generated = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    assert (tmp_path / "lora-False" / "adapter_config.json").is_file()
    assert not (tmp_path / "lora-True" / "adapter_config.json").exists()


def test_cli_shortcuts_and_unknown_loss(micro, toy, tmp_path, capsys):
    from sepo.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--model", str(micro), "--data", str(toy), "--loss", "rrhf", "--output", str(out),
                 "max_steps=2", "batch_size=6", "eval_size=2", "alpha=0.5"]) == 0
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["loss"] == "rrhf" and meta["loss_kwargs"] == {"alpha": 0.5} and meta["num_rows"] == 10
    assert main(["train", "--model", str(micro), "--data", str(toy), "--loss", "ppo"]) == 2
    assert "sft, dpo, ipo, rdpo, rpo, simpo, rrhf, tdpo, sepo" in capsys.readouterr().err
    assert main(["train", "--model", str(micro), "--data", str(toy), "--output", str(out), "max_steps=1"]) == 2
    assert "already exists" in capsys.readouterr().err


def _variant(toy: Path, folder: Path, edit, metadata: dict | None = None) -> Path:
    """The toy pairs with ``edit(row, i)`` applied (and metadata entries replaced), saved in ``folder``."""
    from sepo.io import load_dataset_dir

    ds, meta = load_dataset_dir(toy)
    return save_dataset(ds.map(edit, with_indices=True), folder, {**meta, **(metadata or {})})


def test_bad_input_fails_clearly_and_writes_nothing(micro, toy, tmp_path):
    short = _variant(toy, tmp_path / "short", lambda r, i: {"chosen_mask": r["chosen_mask"][:-1]} if i == 3 else {})
    with pytest.raises(DataError, match=r"row 4, field 'chosen_mask'.*chosen_input_ids"):
        train.run(cfg(micro, short, tmp_path / "a"))
    empty = _variant(toy, tmp_path / "empty", lambda r, i: {"rejected_mask": [False] * len(r["rejected_mask"])} if i == 7 else {})
    with pytest.raises(DataError, match="row 8, field 'rejected_mask': no token of the rejected response is selected"):
        train.run(cfg(micro, empty, tmp_path / "b"))
    with pytest.raises(SepoError, match="no token selection"):
        train.run(cfg(micro, _nomask(toy, tmp_path), tmp_path / "c"))
    other = _variant(toy, tmp_path / "other", lambda r, i: {}, {"tokenizer_fingerprint": "0123456789abcdef",
                                                           "tokenizer": "gpt2"})
    # a selection made for another tokenizer: the fix that keeps its rewards, not a re-preparation that drops them
    with pytest.raises(SepoError, match=r"tokenized .*gpt2.*not the policy's.*sepo select --scores .* "
                                        r"--policy-tokenizer"):
        train.run(cfg(micro, other, tmp_path / "d"))
    # longer than the policy's positions: refused up front, not an index error inside the forward
    limit = AutoConfig.from_pretrained(str(micro)).max_position_embeddings
    long = _variant(toy, tmp_path / "long", lambda r, i: {"chosen_input_ids": r["chosen_input_ids"] * limit,
                                                          "chosen_mask": r["chosen_mask"] * limit} if i == 5 else {})
    with pytest.raises(SepoError, match=rf"1 pair\(s\) are longer than the policy .* can take \({limit} positions"):
        train.run(cfg(micro, long, tmp_path / "e"))
    # a token id past the policy's embedding (data from another tokenizer): refused up front, not an IndexError
    vocab = AutoConfig.from_pretrained(str(micro)).vocab_size
    alien = _variant(toy, tmp_path / "alien", lambda r, i: {"rejected_input_ids": [vocab + 7] + r["rejected_input_ids"][1:]}
                     if i == 3 else {})
    with pytest.raises(SepoError, match=rf"token id {vocab + 7} in rejected_input_ids \(dataset row 4 is the first\) "
                                        rf"is outside the policy .*vocabulary \({vocab} tokens\)"):
        train.run(cfg(micro, alien, tmp_path / "f"))
    for name in "abcdef":
        assert not (tmp_path / name).exists(), f"a failed run left {name}/ behind"

    # --overwrite with a bad input must not have deleted the previous run first
    done = tmp_path / "done"
    train.run(cfg(micro, toy, done, max_steps=1))
    with pytest.raises(DataError):
        train.run(cfg(micro, short, done, overwrite=True, max_steps=1))
    assert (done / METADATA_FILE).is_file() and (done / "model.safetensors").is_file()


@pytest.mark.parametrize(("loss", "settings", "received"), [
    ("dpo", {"beta": 0.3, "label_smoothing": 0.2}, {"beta": 0.3, "label_smoothing": 0.2}),
    ("simpo", {"beta": 1.5, "gamma": 0.7, "label_smoothing": 0.1}, {"beta": 1.5, "gamma": 0.7, "label_smoothing": 0.1}),
    ("rpo", {"alpha": 0.25}, {"alpha": 0.25}),
    ("tdpo", {"tdpo_variant": 1, "alpha": 0.3, "beta": 0.2}, {"variant": 1, "alpha": 0.3, "beta": 0.2}),
    ("sepo", {"gamma": 2.5, "sepo_normalize": "length"}, {"gamma": 2.5, "normalize": "length"}),
    ("ipo", {"ipo_length_normalize": True}, {"length_normalize": True}),
    ("rrhf", {"rrhf_sft_reduction": "sum"}, {"sft_reduction": "sum"}),
    ("sepo_dpo", {"gamma": 2.0, "beta": 0.2, "anchor_weight": 0.5, "anchor_tokens": "unselected"},
     {"gamma": 2.0, "beta": 0.2, "anchor_weight": 0.5, "anchor_tokens": "unselected"}),
    ("sepo_kl", {"anchor_weight": 0.3, "anchor_tokens": "all"}, {"anchor_weight": 0.3, "anchor_tokens": "all"}),
    ("sepo_logratio", {"gamma": 1.5, "anchor_weight": 2.0}, {"gamma": 1.5, "anchor_weight": 2.0}),
    ("sepo_nll", {"alpha": 0.5}, {"alpha": 0.5}),
    ("sepo_margin", {"margin": 0.2}, {"margin": 0.2}),
    ("tgdpo", {"beta": 0.1, "alpha": 0.2}, {"beta": 0.1, "alpha": 0.2}),
    ("sparsepo", {"beta": 0.2, "sparsepo_l1_reward": 0.01, "sparsepo_l1_kl": 0.02},
     {"beta": 0.2, "l1_reward": 0.01, "l1_kl": 0.02}),
    ("sdpo", {"sdpo_quantile": 0.3, "label_smoothing": 0.1}, {"quantile": 0.3, "label_smoothing": 0.1}),
])
def test_every_loss_hyper_parameter_reaches_the_loss(loss, settings, received, micro, toy, tmp_path, monkeypatch):
    """No silent knob: each TrainConfig hyper-parameter arrives at the loss function as its keyword, on every call."""
    import functools

    real, calls = ALL_LOSSES[loss], []

    @functools.wraps(real)  # keeps the signature loss_kwargs inspects
    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setitem(ALL_LOSSES, loss, recording)
    train.run(cfg(micro, toy, tmp_path / loss, loss=loss, max_steps=2, **settings))
    assert len(calls) == 2 and all({k: c[k] for k in received if k in c} == received for c in calls)


def test_hyper_parameter_values_a_loss_cannot_use_fail_at_config_time():
    from sepo.errors import ConfigError

    for bad in ({"loss": "rdpo", "label_smoothing": 0.6}, {"loss": "dpo", "beta": -1.0}, {"loss": "sepo", "gamma": 0.0},
                {"loss": "simpo", "gamma": -0.5}, {"loss": "rpo", "alpha": -1.0}):
        with pytest.raises(ConfigError, match=next(k for k in bad if k != "loss")):
            TrainConfig(model="m", data="d", **bad)
    TrainConfig(model="m", data="d", loss="simpo", gamma=0.0)  # a zero target margin is plain SimPO


@pytest.mark.parametrize(("settings", "message"), [
    ({"loss": "sepo_kl", "use_selection": True}, "use_selection has no effect on loss 'sepo_kl'.*reads the selection"),
    ({"loss": "tgdpo", "use_selection": False}, "use_selection has no effect on loss 'tgdpo'"),
    ({"loss": "dpo", "sparsepo_mask": "learned"}, "sparsepo_mask=learned has no effect on loss 'dpo'"),
    ({"loss": "sdpo", "sparsepo_mask_weight_decay": 0.1}, "sparsepo_mask_weight_decay=0.1 has no effect on loss"),
    ({"loss": "sparsepo", "sparsepo_mask": "activation", "sparsepo_l1_reward": 0.1}, "activation mask is fixed"),
    ({"loss": "sparsepo", "sparsepo_mask": "activation", "sparsepo_mask_dropout": 0.1}, "activation mask is fixed"),
    ({"loss": "dpo", "anchor_weight": 0.5}, "anchor_weight=0.5 has no effect on loss 'dpo'"),
    ({"loss": "sepo_nll", "anchor_tokens": "all"}, "anchor_tokens=all has no effect on loss 'sepo_nll'"),
    ({"loss": "sdpo", "margin": 0.1}, "margin=0.1 has no effect on loss 'sdpo'"),
    ({"loss": "dpo", "sdpo_quantile": 0.5}, "sdpo_quantile=0.5 has no effect on loss 'dpo'"),
    ({"loss": "ipo", "rrhf_sft_reduction": "sum"}, "rrhf_sft_reduction=sum has no effect on loss 'ipo'"),
    ({"loss": "sepo_dpo", "gamma": 0.0}, "gamma scales sepo_dpo's reward and must be > 0"),
    ({"loss": "sepo_margin", "gamma": -1.0}, "gamma scales sepo_margin's reward"),
    ({"loss": "sepo_kl", "anchor_weight": -1.0}, "anchor_weight must be >= 0"),
    ({"loss": "sepo_margin", "margin": -0.1}, "margin must be >= 0"),
    ({"loss": "sdpo", "sdpo_quantile": 1.5}, r"sdpo_quantile must be in \[0, 1\]"),
    ({"loss": "sparsepo", "sparsepo_mask_dropout": 1.0}, r"sparsepo_mask_dropout must be in \[0, 1\)"),
    ({"loss": "sparsepo", "sparsepo_l1_kl": -0.1}, "sparsepo_l1_kl must be >= 0"),
    ({"loss": "tgdpo", "alpha": -0.5}, "alpha must be >= 0"),
])
def test_token_loss_settings_that_reach_nothing_or_cannot_work_fail_at_config_time(settings, message):
    from sepo.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="m", data="d", **settings)


def _recording(monkeypatch, loss: str) -> list[dict]:
    """Every call of loss ``loss`` during training: its four positional arguments (by name) and its keywords."""
    import functools

    real, calls = ALL_LOSSES[loss], []

    @functools.wraps(real)
    def recording(*args, **kwargs):
        calls.append({**dict(zip(("chosen_logps", "rejected_logps", "chosen_weights", "rejected_weights"), args)),
                      **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setitem(ALL_LOSSES, loss, recording)
    return calls


def _ramp(n: int) -> list[float]:
    """Soft weights (j + 1) / (n + 1) of an n-token response: none 0 or 1, so they cannot pass for a mask."""
    return [(j + 1) / (n + 1) for j in range(n)]


def _assert_ramp(grid: torch.Tensor, response: torch.Tensor) -> None:
    for values, real in zip(grid, response):
        n = int((real > 0).sum())
        assert_close(values[:n], torch.tensor(_ramp(n)))
        assert not values[n:].any()


def test_soft_selection_weights_reach_the_losses_and_masks_remain_a_fallback(micro, toy, tmp_path, monkeypatch):
    """A `sepo select` folder with soft ``*_weights``: the SePO variants get them as their selection (their own
    weights stay the whole response) and sepo trains on them as its weights; a folder with only the boolean masks
    (selected before the weights existed) gives its masks. An all-zero soft selection is refused, naming its row."""
    soft = _variant(toy, tmp_path / "soft", lambda r, i: {f"{side}_weights": _ramp(len(r[f"{side}_input_ids"]))
                                                          for side in ("chosen", "rejected")})
    calls = _recording(monkeypatch, "sepo_dpo")
    train.run(cfg(micro, soft, tmp_path / "a", loss="sepo_dpo", max_steps=1))
    (call,) = calls
    _assert_ramp(call["chosen_selection"], call["chosen_weights"])
    _assert_ramp(call["rejected_selection"], call["rejected_weights"])
    assert set(call["chosen_weights"].unique().tolist()) == {0.0, 1.0}  # the whole response

    calls = _recording(monkeypatch, "sepo")
    train.run(cfg(micro, soft, tmp_path / "b", loss="sepo", max_steps=1))
    _assert_ramp(calls[0]["chosen_weights"], calls[0]["chosen_weights"])

    calls = _recording(monkeypatch, "sepo_kl")
    train.run(cfg(micro, toy, tmp_path / "c", loss="sepo_kl", max_steps=1))
    assert set(calls[0]["chosen_selection"].unique().tolist()) == {0.0, 1.0}  # the masks, as 0/1
    assert calls[0]["chosen_selection"].sum() < calls[0]["chosen_weights"].sum()

    empty = _variant(soft, tmp_path / "empty", lambda r, i: {"rejected_weights": [0.0] * len(r["rejected_weights"])}
                     if i == 5 else {})
    with pytest.raises(DataError, match="row 6, field 'rejected_weights': no token of the rejected response is "
                                        "selected"):
        train.run(cfg(micro, empty, tmp_path / "d", loss="sepo_kl"))
    assert not (tmp_path / "d").exists()


def test_tgdpo_reads_the_token_rewards_and_says_when_they_are_missing(micro, toy, tmp_path, monkeypatch, caplog):
    from sepo.io import load_dataset_dir

    ds, meta = load_dataset_dir(toy)
    calls = _recording(monkeypatch, "tgdpo")
    train.run(cfg(micro, toy, tmp_path / "a", loss="tgdpo", max_steps=1))
    rewards = calls[0]["chosen_token_rewards"]  # (B, R): the rows' chosen_rewards, in batch order
    assert sorted(round(float(r[0]), 5) for r in rewards) == sorted(round(r[0], 5) for r in ds["chosen_rewards"])

    unscored = save_dataset(ds.remove_columns(["chosen_rewards", "rejected_rewards"]), tmp_path / "unscored", meta)
    with pytest.raises(SepoError, match=r"has no token rewards \(chosen_rewards, rejected_rewards\).*run `sepo score`"):
        train.run(cfg(micro, unscored, tmp_path / "b", loss="tgdpo"))
    broken = _variant(toy, tmp_path / "nan", lambda r, i: {"rejected_rewards": [float("nan")] * len(r["rejected_rewards"])}
                      if i == 2 else {})
    with pytest.raises(DataError, match="row 3, field 'rejected_rewards': a non-finite token reward"):
        train.run(cfg(micro, broken, tmp_path / "c", loss="tgdpo"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    with caplog.at_level("WARNING"):  # the toy was "scored" with beta 0.1
        train.run(cfg(micro, toy, tmp_path / "d", loss="tgdpo", beta=0.3, max_steps=1))
    assert "scored with beta=0.1 but tgdpo trains with beta=0.3" in caplog.text


def test_sparsepo_activation_masks_are_fixed_and_in_the_unit_interval(micro, toy, tmp_path, monkeypatch):
    """MaPO's masks come from the reference's activations: no gradient, 1 at each response's most active token, 0 on
    padding, the same for a row at every step, and nothing to save."""
    calls = _recording(monkeypatch, "sparsepo")
    out = tmp_path / "activation"
    train.run(cfg(micro, toy, out, loss="sparsepo", sparsepo_mask="activation", max_steps=2))
    for call in calls:
        mask, real = call["chosen_reward_mask"], call["chosen_weights"] > 0
        assert not mask.requires_grad and "chosen_kl_mask" not in call
        assert float(mask.min()) >= 0 and float(mask[real].max()) == 1.0 and not mask[~real].any()
    # both steps see the same 12 rows in the same (length-sorted) order: the policy moved, the masks did not
    assert not torch.equal(calls[0]["chosen_logps"], calls[1]["chosen_logps"])
    assert_close(calls[0]["chosen_reward_mask"], calls[1]["chosen_reward_mask"])
    assert not (out / "sparsepo_masks.safetensors").exists()


def test_sparsepo_learned_masks_train_are_saved_and_resume_bitwise(micro, toy, tmp_path, caplog):
    """Independent reward and KL masks with dropout: the heads are in the checkpoint (model_1.safetensors, beside the
    policy's model.safetensors) and in the final folder; a run resumed from step 2 ends with exactly the policy,
    masks and loss of the uninterrupted one. The masks learned (they changed after step 2)."""
    import shutil

    from sepo.core.token_masks import MASKS_FILE, load_sparse_masks

    args = {"loss": "sparsepo", "sparsepo_mask": "learned_independent", "sparsepo_l1_reward": 0.01,
            "sparsepo_mask_dropout": 0.2, "batch_size": 4, "max_steps": 4, "save_steps": 2, "save_total_limit": None,
            "lr_scheduler": "cosine", "warmup_ratio": 0.25}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = train.run(cfg(micro, toy, tmp_path / "straight", **args))
        shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
        with caplog.at_level("INFO"):
            resumed = train.run(cfg(micro, toy, tmp_path / "resumed", resume=True, **args))
    finally:
        torch.set_num_threads(threads)
    assert "checkpoint-2 (step 2 of 4)" in caplog.text  # it resumed (a fresh start would end the same way)
    checkpoint = tmp_path / "straight" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "model_1.safetensors").is_file()
    assert resumed.metrics["final_loss"] == straight.metrics["final_loss"]
    for name in ("model.safetensors", MASKS_FILE):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    final, at_step_2 = load_file(str(tmp_path / "resumed" / MASKS_FILE)), load_file(str(checkpoint / "model_1.safetensors"))
    assert final.keys() == at_step_2.keys() and any(not torch.equal(final[k], at_step_2[k]) for k in final)
    masks = load_sparse_masks(tmp_path / "resumed" / MASKS_FILE)
    assert masks.kl is not None and masks.settings["dropout"] == 0.2 and not masks.training
    meta = json.loads((tmp_path / "resumed" / METADATA_FILE).read_text())
    assert meta["sparsepo_masks"] == MASKS_FILE


def _nomask(toy: Path, tmp_path: Path) -> Path:
    from sepo.io import load_dataset_dir

    ds, meta = load_dataset_dir(toy)
    return save_dataset(ds.remove_columns(["chosen_mask", "rejected_mask"]), tmp_path / "nomask", meta)


def test_nan_loss_stops_with_step_and_rows_and_keeps_the_last_checkpoint(micro, toy, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SepoError, match=r"non-finite loss at step \d+, micro-batch \d+ \(dataset rows index=\["
                                        r".*the last good checkpoint is .*checkpoint-\d+") as caught:
        train.run(cfg(micro, toy, out, loss="simpo", learning_rate=1e30, max_grad_norm=None, save_steps=1,
                      save_total_limit=None))
    bad_step = int(str(caught.value).split(" at step ")[1].split(",")[0])
    last = str(caught.value).rsplit("checkpoint-", 1)[1]
    assert int(last) == bad_step - 1  # every step before the bad one was checkpointed; nothing after it
    assert (out / "checkpoints" / f"checkpoint-{last}" / "train_state.json").is_file()
    assert not (out / "checkpoints" / f"checkpoint-{bad_step}").exists() and not (out / METADATA_FILE).exists()


@pytest.mark.parametrize(("loss", "settings"), [
    ("dpo", {}), ("simpo", {}), ("sepo", {}), ("tdpo", {}),
    ("sepo", {"lora": True, "lora_r": 4, "lora_dropout": 0.0, "gradient_checkpointing": True}),
])
def test_prefix_sharing_trains_like_plain_rows(loss, settings, micro, toy, tmp_path, monkeypatch):
    """Each prompt computed once (one packed row per pair) or twice (plain rows): the same loss at every step, the
    same eval metrics and the same final weights, to 1e-5 (fp32; only the summation order differs). The packed
    forward runs exactly once per training step with sharing on (tdpo: the policy's; the reference's runs without
    a gradient), and never with it off. (LoRA dropout is 0: dropout draws differ with the batch's shape.)"""
    import sepo.prefix_sharing as ps

    real, trained_packed = ps.packed_forward, []
    monkeypatch.setattr(ps, "packed_forward", lambda *a, **k: (
        trained_packed.append(1) if torch.is_grad_enabled() else None) or real(*a, **k))
    runs = {}
    for sharing in (True, False):
        trained_packed.clear()
        out = tmp_path / f"sharing-{sharing}"
        runs[sharing] = train.run(cfg(micro, toy, out, loss=loss, max_steps=3, eval_data=str(toy),
                                      prefix_sharing=sharing, **settings))
        assert len(trained_packed) == (3 if sharing else 0)
    logs = [[r["train/loss"] for r in read_log(tmp_path / f"sharing-{s}") if "train/loss" in r] for s in (True, False)]
    assert len(logs[0]) == 3 and max(abs(a - b) for a, b in zip(*logs)) <= 1e-5, logs
    on, off = runs[True].metrics, runs[False].metrics
    assert max(abs(on[k] - off[k]) for k in on if k.startswith("eval/")) <= 1e-5, (on, off)
    a, b = _weights(tmp_path / "sharing-True"), _weights(tmp_path / "sharing-False")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert any(not torch.equal(a[k], w) for k, w in _weights(micro).items())  # ... and the runs did train


def test_reference_cache_is_the_same_with_and_without_prefix_sharing(micro, toy):
    from sepo.io import load_dataset_dir
    from sepo.models import load_causal_lm
    from sepo.stages.reference_cache import compute_reference_logps

    ds, _ = load_dataset_dir(toy)
    reference = load_causal_lm(str(micro), trainable=False)
    with torch.inference_mode():
        on, off = (compute_reference_logps(reference, ds, 0, "cpu", batch_size=5, chunk_size=7, prefix_sharing=s)
                   for s in (True, False))
    assert reference._sepo_prefix_sharing_ok  # the reference passed the probe, so the packed rows ran
    for column in on:
        assert len(on[column]) == len(ds)
        for got, want in zip(on[column], off[column]):
            torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), atol=1e-5, rtol=0)
