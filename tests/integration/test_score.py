"""`sepo score`: rewards against a plain transformers forward, resumption, multi-shard merge, errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

import sepo.stages.score as score_stage
from conftest import make_story_pairs_dataset
from sepo.cli import main
from sepo.errors import SepoError
from sepo.io import load_dataset_dir, read_metadata, save_dataset
from sepo.stages.score import ScoreConfig
from sepo.testing import build_tiny_model


@pytest.fixture(scope="module")
def stories_pairs_dir(tmp_path_factory, stories260k):
    folder = tmp_path_factory.mktemp("pairs") / "stories"
    tok = AutoTokenizer.from_pretrained(str(stories260k))
    save_dataset(make_story_pairs_dataset(tok, n=12), folder, {"stage": "data", "tokenizer": str(stories260k)})
    return folder


def plain_rewards(oracle_path, reference_path, rows, beta: float) -> list[dict[str, torch.Tensor]]:
    """beta * (log pi_o - log pi_ref) from one full forward per sequence: response token i of a sequence
    with a P-token prompt is read from log_softmax(logits[P + i - 1])."""
    models = [AutoModelForCausalLM.from_pretrained(str(p)).eval() for p in (oracle_path, reference_path)]
    out = []
    for row in rows:
        item = {}
        for side in ("chosen", "rejected"):
            prompt, response = row["prompt_input_ids"], row[f"{side}_input_ids"]
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                lps = [torch.log_softmax(m(ids).logits[0].float(), dim=-1) for m in models]  # (T, V)
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
            target = torch.tensor(response)
            item[side] = beta * (lps[0][pos, target] - lps[1][pos, target])
        out.append(item)
    return out


def test_rewards_equal_plain_forward_on_stories260k(tmp_path, stories260k, tiny_llama_stories, stories_pairs_dir):
    """Real pretrained stories260K as oracle, a kit Llama as reference; first response token and EOS scored."""
    meta = score_stage.run(ScoreConfig(oracle=str(stories260k), reference=str(tiny_llama_stories),
                                       data=str(stories_pairs_dir), output=str(tmp_path / "scores"), beta=0.25,
                                       batch_size=5, shard_size=5, chunk_size=7))
    ds, saved = load_dataset_dir(tmp_path / "scores")
    assert saved["stage"] == "score" and saved["beta"] == 0.25 and meta["num_rows"] == len(ds) == 12
    assert {"oracle", "reference", "tokenizer", "tokenizer_fingerprint", "source", "sepo_version"} <= set(saved)
    assert ds.features["chosen_rewards"].feature.dtype == "float32"
    assert not (tmp_path / "scores.partial").exists()  # work folder removed after the merge
    expected = plain_rewards(stories260k, tiny_llama_stories, ds, 0.25)
    eos = AutoTokenizer.from_pretrained(str(stories260k)).eos_token_id
    for row, exp in zip(ds, expected):
        for side in ("chosen", "rejected"):
            got = torch.tensor(row[f"{side}_rewards"])
            assert len(got) == len(row[f"{side}_input_ids"]) and row[f"{side}_input_ids"][-1] == eos
            assert_close(got, exp[side], atol=1e-5, rtol=1e-4)
            assert got[0] != 0 and got[-1] != 0  # the first response token and the EOS carry a reward


@pytest.mark.parametrize("sharing", [True, False])
def test_rewards_equal_plain_forward_on_gpt2_vocab_kit_models(sharing, tmp_path, monkeypatch, tiny_llama_gpt2,
                                                              gpt2_tokenizer_path):
    """With prefix sharing (each pair one packed row, both models) and without it, the rewards are those of a plain
    forward per sequence."""
    import sepo.prefix_sharing as ps

    real, packed = ps.packed_forward, []
    monkeypatch.setattr(ps, "packed_forward", lambda model, shared, **k: packed.append(k) or real(model, shared, **k))
    reference = build_tiny_model(tmp_path / "ref", arch="qwen2", preset="micro", tokenizer="gpt2", seed=5)
    tok = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_path))
    save_dataset(make_story_pairs_dataset(tok, n=4), tmp_path / "pairs", {"stage": "data"})
    score_stage.run(ScoreConfig(oracle=str(tiny_llama_gpt2), reference=str(reference), data=str(tmp_path / "pairs"),
                                output=str(tmp_path / "scores"), batch_size=3, prefix_sharing=sharing))
    # two batches (3 + 1 pairs) x two models, and each model's probe once with the true layout (its other packed
    # forwards override the layout); with sharing off, no packed row and no probe
    assert len([k for k in packed if not k]) == (4 + 2 if sharing else 0)
    ds, _ = load_dataset_dir(tmp_path / "scores")
    for row, exp in zip(ds, plain_rewards(tiny_llama_gpt2, reference, ds, 0.1)):
        assert_close(torch.tensor(row["chosen_rewards"]), exp["chosen"], atol=1e-5, rtol=1e-4)
        assert_close(torch.tensor(row["rejected_rewards"]), exp["rejected"], atol=1e-5, rtol=1e-4)


def test_interrupted_run_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch, stories260k,
                                                                 tiny_llama_stories, stories_pairs_dir):
    """12 rows in shards of 3: the run dies while writing shard 3; the rerun scores only shards 3 and 4."""
    cfg = {"oracle": str(stories260k), "reference": str(tiny_llama_stories), "data": str(stories_pairs_dir),
           "batch_size": 2, "shard_size": 3}
    score_stage.run(ScoreConfig(**cfg, output=str(tmp_path / "straight")))

    score_rows, calls = score_stage.score_rows, []

    def dies_on_third_shard(rows, *a, **k):
        calls.append(len(rows))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return score_rows(rows, *a, **k)

    monkeypatch.setattr(score_stage, "score_rows", dies_on_third_shard)
    with pytest.raises(RuntimeError, match="killed"):
        score_stage.run(ScoreConfig(**cfg, output=str(tmp_path / "resumed")))
    assert not (tmp_path / "resumed").exists()
    partial = tmp_path / "resumed.partial"
    assert sorted(p.name for p in partial.iterdir() if p.name.startswith("piece-")) == ["piece-0000000000",
                                                                                       "piece-0000000003"]

    calls.clear()
    monkeypatch.setattr(score_stage, "score_rows", lambda rows, *a, **k: calls.append(len(rows)) or score_rows(rows, *a, **k))
    with pytest.raises(SepoError, match="different config"):
        score_stage.run(ScoreConfig(**{**cfg, "beta": 0.5}, output=str(tmp_path / "resumed")))
    score_stage.run(ScoreConfig(**cfg, output=str(tmp_path / "resumed")))
    assert calls == [3, 3]  # only the two unfinished shards were scored again
    a, _ = load_dataset_dir(tmp_path / "straight")
    b, _ = load_dataset_dir(tmp_path / "resumed")
    assert a.to_dict() == b.to_dict()
    assert not partial.exists()
    # shards read their rows through the selection: nothing (e.g. a datasets cache file) is written into the data
    assert sorted(p.name for p in stories_pairs_dir.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                                  "sepo_metadata.json", "state.json"]


def test_nan_reward_names_the_row(tmp_path, stories_pairs_dir, stories260k):
    path = build_tiny_model(tmp_path / "broken", preset="micro", tokenizer="stories260k")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every logit NaN
    model.save_pretrained(path)
    with pytest.raises(SepoError, match=r"non-finite reward .* dataset row index=\d+"):
        score_stage.run(ScoreConfig(oracle=str(path), reference=str(stories260k), data=str(stories_pairs_dir),
                                    output=str(tmp_path / "scores")))
    assert not (tmp_path / "scores").exists()


def test_cli_refuses_oracle_and_reference_with_different_vocabularies(tmp_path, capsys, stories_pairs_dir,
                                                                     tiny_llama_gpt2):
    rc = main(["score", "--oracle", "stories260k", "--reference", str(tiny_llama_gpt2), "--data",
               str(stories_pairs_dir), "--output", str(tmp_path / "scores")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("sepo score: error: oracle and reference have different vocabularies")
    assert "Traceback" not in err and not (tmp_path / "scores").exists()


def test_cli_scores_and_metadata_records_the_run(tmp_path, stories_pairs_dir, tiny_llama_stories):
    rc = main(["score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories), "--data",
               str(stories_pairs_dir), "--output", str(tmp_path / "scores"), "--beta", "0.2", "--batch-size", "4"])
    assert rc == 0
    meta = read_metadata(tmp_path / "scores")
    assert meta["oracle"] == "stories260k" and meta["config"]["batch_size"] == 4 and meta["num_rows"] == 12
    assert meta["stats"]["chosen_tokens"] > 0


def test_raw_jsonl_is_read_through_the_data_layer(tmp_path, stories260k, tiny_llama_stories):
    import json

    from conftest import STORY_PAIRS

    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in STORY_PAIRS))
    meta = score_stage.run(ScoreConfig(oracle=str(stories260k), reference=str(tiny_llama_stories), data=str(raw),
                                       output=str(tmp_path / "scores")))
    ds, _ = load_dataset_dir(tmp_path / "scores")
    assert len(ds) == meta["num_rows"] == len(STORY_PAIRS) and meta["source"] == str(raw)
    row = ds[len(ds) - 1]
    exp = plain_rewards(stories260k, tiny_llama_stories, [row], 0.1)[0]
    assert_close(torch.tensor(row["rejected_rewards"]), exp["rejected"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_processes_shard_the_rows_and_the_main_process_merges(tmp_path, stories_pairs_dir, tiny_llama_stories):
    """`torchrun --nproc_per_node 2 -m sepo score` (what `accelerate launch` does on GPUs): shards alternate
    between the processes, each writes its own, process 0 merges; equal to a single-process run."""
    import os
    import subprocess
    import sys

    args = ["score", "--oracle", "stories260k", "--reference", str(tiny_llama_stories), "--data",
            str(stories_pairs_dir), "--shard-size", "2", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "sepo", *args,
                           "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    two, meta = load_dataset_dir(tmp_path / "two")
    one, _ = load_dataset_dir(tmp_path / "one")
    assert meta["num_processes"] == 2 and list(two["index"]) == list(one["index"])
    for column in ("chosen_rewards", "rejected_rewards"):
        for a, b in zip(two[column], one[column]):
            assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


def _score_edited_pairs(tmp_path, capsys, stories260k, reference, column: str, row: int, edit) -> tuple[int, str]:
    """`sepo score` (oracle stories260K) on three story pairs whose ``column`` of row ``row`` (0-based) is
    ``edit``-ed: -> (exit code, stderr)."""
    tok = AutoTokenizer.from_pretrained(str(stories260k))
    pairs = make_story_pairs_dataset(tok, n=3)
    pairs = pairs.map(lambda r, i: {column: edit(r[column]) if i == row else r[column]}, with_indices=True)
    save_dataset(pairs, tmp_path / "pairs", {"stage": "data"})
    rc = main(["score", "--oracle", "stories260k", "--reference", str(reference), "--data",
               str(tmp_path / "pairs"), "--output", str(tmp_path / "scores")])
    return rc, capsys.readouterr().err


def test_pairs_longer_than_the_models_positions_are_refused_before_anything_is_written(tmp_path, capsys, stories260k,
                                                                                      tiny_llama_stories):
    """stories260k has 512 positions; the data layer's default max_length is 1024. Scoring such a pair used to
    read log-probs at positions the model never saw (or fail deep in the forward for learned positions)."""
    rc, err = _score_edited_pairs(tmp_path, capsys, stories260k, tiny_llama_stories, "prompt_input_ids", 1,
                                  lambda ids: ids * 60)
    assert rc == 2 and "1 pair(s) are longer than the oracle stories260k can take (512 positions" in err
    assert "dataset row 2 is the first" in err and "--max-length 512" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]  # no output, no .partial work folder


def test_token_ids_outside_the_models_vocabulary_are_refused_in_one_line(tmp_path, capsys, stories260k,
                                                                         tiny_llama_stories):
    """Pairs tokenized with a larger tokenizer (GPT-2 ids, up to 50256) scored with stories260K (512 tokens) used
    to fail with a torch IndexError inside the embedding."""
    rc, err = _score_edited_pairs(tmp_path, capsys, stories260k, tiny_llama_stories, "chosen_input_ids", 2,
                                  lambda ids: [*ids[:-1], 50256])
    assert rc == 2 and "token id 50256 in chosen_input_ids (dataset row 3 is the first) is outside the oracle" in err
    assert "(512 tokens)" in err and "Traceback" not in err and "IndexError" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]


def test_scoring_a_selected_folder_again_drops_its_old_masks(tmp_path, monkeypatch, stories_pairs_dir, stories260k,
                                                            tiny_llama_stories):
    """Masks chosen from other rewards must not survive into a new scores folder; a local oracle given as a
    relative path is recorded absolute, so select and inspect can load its tokenizer from anywhere."""
    import shutil

    ds, meta = load_dataset_dir(stories_pairs_dir)
    for side in ("chosen", "rejected"):
        ds = ds.add_column(f"{side}_mask", [[True] * len(ids) for ids in ds[f"{side}_input_ids"]])
    save_dataset(ds, tmp_path / "selected", meta)
    shutil.copytree(stories260k, tmp_path / "oracle")
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--oracle", "oracle", "--reference", str(tiny_llama_stories), "--data", "selected",
                 "--output", "scores"]) == 0
    scored, meta = load_dataset_dir(tmp_path / "scores")
    assert "chosen_mask" not in scored.column_names and "rejected_mask" not in scored.column_names
    assert meta["tokenizer"] == str((tmp_path / "oracle").resolve())
