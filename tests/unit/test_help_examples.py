"""Every example `sepo <command> --help` shows is a command line that parses (parse only: nothing runs)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from sepo.cli import COMMANDS, docstring_examples, main
from sepo.config import parse_cli

REPO = Path(__file__).resolve().parents[2]


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*name.split(), "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def shown_examples(text: str) -> list[str]:
    """The lines of the help's `examples:` block, without trailing comments."""
    if "\nexamples:\n" not in text:
        return []
    block = text.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split(" # ", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_help_example_parses(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # examples name configs/*.yaml relative to the checkout
    module_name, config_name, _, _ = COMMANDS[name]
    cls = getattr(importlib.import_module(module_name), config_name)
    text = help_text(name, capsys)
    examples = shown_examples(text)
    assert examples, f"`sepo {name} --help` shows no example"
    documented = docstring_examples(importlib.import_module(module_name), name)
    assert examples == [e.split(" # ", 1)[0].strip() for e in documented]
    override = re.search(r"with a dot \(e\.g\. (\S+=\S+)\)", text)
    assert override, "the help names one key=value example"
    lines = [*examples, f"{examples[0]} {override.group(1)}"]
    for line in lines:
        argv = shlex.split(line)
        assert argv[: 1 + len(name.split())] == ["sepo", *name.split()], line
        cfg = parse_cli(cls, argv[1 + len(name.split()):], prog=f"sepo {name}")
        assert isinstance(cfg, cls)
    key, value = override.group(1).split("=", 1)
    node = parse_cli(cls, [*shlex.split(examples[0])[1 + len(name.split()):], override.group(1)], prog="t")
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    assert str(node).lower() == value.lower()


def test_the_old_train_example_is_gone_and_would_still_be_refused(capsys):
    """`sepo train --help` once showed train.learning_rate=1e-5, which train refuses; only pipeline takes it."""
    from sepo.errors import ConfigError
    from sepo.stages.pipeline import PipelineConfig
    from sepo.stages.train import TrainConfig

    assert "train.learning_rate" not in help_text("train", capsys)
    with pytest.raises(ConfigError, match="unknown config key 'train'"):
        parse_cli(TrainConfig, ["train.learning_rate=1e-5"], prog="sepo train")
    assert parse_cli(PipelineConfig, ["train.learning_rate=1e-5"], prog="t").train == {"learning_rate": "1e-5"}
