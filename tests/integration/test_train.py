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
from transformers import AutoConfig

from sepo.core.losses import LOSSES, is_reference_free, needs_reference, needs_reference_model
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
    """12 story pairs with a random ~half selection (>= 1 token per response), ordered so that the untrained model
    prefers the REJECTED response (higher token-mean log-prob): every loss has something to learn."""
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
    import datasets

    ds = datasets.Dataset.from_list(rows)
    from sepo.models import tokenizer_fingerprint

    return save_dataset(ds, tmp_path_factory.mktemp("toy") / "pairs",
                        {"stage": "select", "num_rows": len(ds), "tokenizer_fingerprint": tokenizer_fingerprint(tok)})


def cfg(micro, toy, out, **kw) -> TrainConfig:
    values = {"model": str(micro), "data": str(toy), "output": str(out), "batch_size": 12, "learning_rate": 5e-3,
              "warmup_ratio": 0.0, "lr_scheduler": "constant", "max_steps": 20, "logging_steps": 1, **kw}
    return TrainConfig(**values)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", list(LOSSES))
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
    if needs_reference(loss) and not needs_reference_model(loss):
        assert list((toy.parent / "pairs.ref-logps").iterdir()), "reference log-probs are cached beside the data"
    if is_reference_free(loss):
        assert not frozen, "a reference-free loss loaded a reference"
    assert frozen or loss != "tdpo"  # tdpo keeps its reference in memory
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
    for name in "abcde":
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
])
def test_every_loss_hyper_parameter_reaches_the_loss(loss, settings, received, micro, toy, tmp_path, monkeypatch):
    """No silent knob: each TrainConfig hyper-parameter arrives at the loss function as its keyword, on every call."""
    import functools

    real, calls = LOSSES[loss], []

    @functools.wraps(real)  # keeps the signature loss_kwargs inspects
    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setitem(LOSSES, loss, recording)
    train.run(cfg(micro, toy, tmp_path / loss, loss=loss, max_steps=2, **settings))
    assert len(calls) == 2 and all({k: c[k] for k in received if k in c} == received for c in calls)


def test_hyper_parameter_values_a_loss_cannot_use_fail_at_config_time():
    from sepo.errors import ConfigError

    for bad in ({"loss": "rdpo", "label_smoothing": 0.6}, {"loss": "dpo", "beta": -1.0}, {"loss": "sepo", "gamma": 0.0},
                {"loss": "simpo", "gamma": -0.5}, {"loss": "rpo", "alpha": -1.0}):
        with pytest.raises(ConfigError, match=next(k for k in bad if k != "loss")):
            TrainConfig(model="m", data="d", **bad)
    TrainConfig(model="m", data="d", loss="simpo", gamma=0.0)  # a zero target margin is plain SimPO


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
