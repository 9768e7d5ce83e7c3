"""Every configs/*.yaml parses into its stage's config exactly as its first line would run it (nothing runs).

A pipeline config is also expanded into every stage's config (sft, oracle, score, select, each method's
train, eval), so a misspelt key in any section fails here rather than an hour into a run."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import pytest

from sepo.cli import COMMANDS
from sepo.config import parse_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "claims").glob("*.yaml")])


def command_of(path: Path) -> tuple[str, list[str]]:
    """'# sepo pipeline configs/x.yaml k=v' -> ('pipeline', ['configs/x.yaml', 'k=v'])."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{path.name}: the first line must be '# <the command that runs it>'"
    words = shlex.split(first[2:])
    if words[:2] == ["accelerate", "launch"]:
        words = words[words.index("sepo"):] if "sepo" in words else words
    assert words[0] == "sepo", f"{path.name}: the first line must start with '# sepo <command>'"
    rest = words[1:]
    name = " ".join(rest[:2]) if " ".join(rest[:2]) in COMMANDS else rest[0]
    assert name in COMMANDS, f"{path.name}: unknown command {name!r}"
    args = rest[len(name.split()):]
    assert any(a.endswith(path.name) for a in args), f"{path.name}: the first line must name the file itself"
    return name, args


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_file_is_valid(path, monkeypatch, tmp_path):
    name, args = command_of(path)
    module_name, config_name, _, _ = COMMANDS[name]
    monkeypatch.chdir(ROOT)  # paths in the first line are relative to the repository root
    cls = getattr(importlib.import_module(module_name), config_name)
    cfg = parse_cli(cls, args, prog=f"sepo {name}")
    if name == "pipeline":
        from sepo.stages.pipeline import stage_configs

        configs = stage_configs(cfg, tmp_path / "run")
        assert {"oracle", "score", "select"} <= set(configs) and any(k.startswith("train:") for k in configs)
    if name == "demo":
        from sepo.stages.demo import sweep_config

        cfg = sweep_config(cfg)
        name = "sweep"
    if name == "sweep":
        from sepo.stages.sweep import plan

        points = plan(cfg, tmp_path / "sweep").points  # every variant, train and eval config built
        assert points[0].method == "reference" and len(points) > 1


def test_there_are_configs_for_the_paper_the_demo_and_hh_rlhf():
    names = {p.name for p in CONFIGS}
    assert {"pipeline_paper_gpu.yaml", "hh_rlhf_cpu.yaml", "demo.yaml", "demo_quick.yaml", "sweep_demo.yaml",
            "sweep_hh_cpu.yaml"} <= names


def test_kit_reference_spec():
    from sepo.errors import ConfigError
    from sepo.stages.pipeline import PipelineConfig, parse_kit

    assert parse_kit("kit:llama:small:gpt2") == {"arch": "llama", "preset": "small", "tokenizer": "gpt2", "seed": 0}
    assert parse_kit("stories260k") is None
    with pytest.raises(ConfigError, match="kit:ARCH:PRESET"):
        PipelineConfig(data="x", reference="kit:llama:huge:gpt2")
    with pytest.raises(ConfigError, match="pipeline order"):
        PipelineConfig(data="x", stages=["score", "oracle"])
    with pytest.raises(ConfigError, match="set by the pipeline"):
        PipelineConfig(data="x", train={"model": "other"})


def test_demo_yaml_writes_out_every_default_of_sepo_demo():
    """configs/demo.yaml says it is `sepo demo`'s defaults written out: every key, each at its default."""
    import dataclasses

    from sepo.config import load_yaml
    from sepo.stages.demo import FULL, DemoConfig

    written = load_yaml(ROOT / "configs" / "demo.yaml")
    defaults = {f.name: FULL.get(f.name, getattr(DemoConfig(), f.name)) for f in dataclasses.fields(DemoConfig)}
    assert set(written) == set(defaults)
    assert {k: written[k] for k in defaults} == defaults


def test_sweep_demo_yaml_is_the_demos_sweep_with_three_seeds():
    """configs/sweep_demo.yaml says `sepo demo` runs the same sweep with two seeds: everything else is equal."""
    from sepo.config import load, to_dict
    from sepo.stages.demo import DemoConfig, sweep_config
    from sepo.stages.sweep import SweepConfig

    written = to_dict(load(SweepConfig, ROOT / "configs" / "sweep_demo.yaml"))
    demo = to_dict(sweep_config(DemoConfig()))
    assert written.pop("seeds") == [0, 1, 2] and demo.pop("seeds") == [0, 1]
    written.pop("output"), demo.pop("output")
    assert written == demo


def test_claim_sweeps_cover_every_task_with_three_seeds_and_each_claims_contrasts():
    """configs/claims/TASK.yaml (docs/claims.md): one sweep per task, >= 3 training seeds, three oracle seeds for
    the concentration, a weak oracle, k as 10/30/50/100%, and the paired differences each claim reads."""
    from sepo.config import load
    from sepo.stages.sweep import SweepConfig

    paths = sorted((ROOT / "configs" / "claims").glob("*.yaml"))
    assert {p.stem for p in paths} == {"sentiment", "minimal_pairs", "noisy_chosen"}
    for path in paths:
        cfg = load(SweepConfig, path)
        assert cfg.task == path.stem and cfg.output == f"runs/claims/{path.stem}"
        assert len(cfg.seeds) >= 3 and cfg.budgets == [1.0, 3.0, 10.0] and cfg.bootstrap >= 1000
        assert sorted({cfg.seed, *cfg.variants["oracle_seeds"]["seed"]}) == [0, 1, 2]
        assert "reference" in cfg.variants["weak"]
        ks = {v["select"]["chosen_ratio"] for n, v in cfg.variants.items() if n.startswith("k")}
        assert ks | {cfg.select["chosen_ratio"]} == {0.1, 0.3, 0.5, 1.0}
        assert {"sepo - dpo", "sepo - simpo", "sepo - sepo_random", "sepo_weak - dpo", "sepo_k10 - sepo"} <= \
            set(cfg.contrasts)
        assert (cfg.jobs, cfg.threads) == (2, 1)  # both cores of the 2-core machine the run time was measured on
