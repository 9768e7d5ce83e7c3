"""The config system: precedence, type conversion, nested sections, helpful errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sepo.config import from_dict, load, option, parse_cli, reference_markdown, validate_choices
from sepo.data.options import DataOptions
from sepo.errors import ConfigError


@dataclass
class Inner:
    learning_rate: float = option(1e-4, "step size", unit="1")
    tags: list[str] = option([], "labels")


@dataclass
class Toy:
    data: str | None = option(None, "input", positional=True)
    beta: float = option(0.1, "temperature")
    steps: int = option(10, "how many", unit="steps")
    quick: bool = option(False, "fast mode")
    mode: str = option("a", "which", choices=("a", "b"))
    train: Inner = option(default_factory=Inner, help="training section")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading")

    def __post_init__(self):
        validate_choices(self)


def test_precedence_defaults_yaml_overrides_flags(tmp_path):
    """defaults < YAML < key=value < --flags."""
    yml = tmp_path / "c.yaml"
    yml.write_text("beta: 0.2\nsteps: 5\ntrain:\n  learning_rate: 0.5\n")
    cfg = parse_cli(Toy, ["--config", str(yml), "steps=7", "--beta", "0.3", "train.learning_rate=1e-3"], "t")
    assert (cfg.beta, cfg.steps, cfg.train.learning_rate) == (0.3, 7, 1e-3)
    assert cfg.mode == "a" and cfg.train.tags == []


def test_positional_flags_and_nested_flat_flags():
    cfg = parse_cli(Toy, ["in.jsonl", "--quick", "--max-length", "64", "data_options.columns=prompt=q,chosen=a"], "t")
    assert cfg.data == "in.jsonl" and cfg.quick is True
    assert cfg.data_options.max_length == 64 and cfg.data_options.max_prompt_length == 32
    assert cfg.data_options.columns == {"prompt": "q", "chosen": "a"}
    assert parse_cli(Toy, ["--no-quick"], "t").quick is False


def test_a_section_field_by_its_bare_key_when_unambiguous():
    """`max_length=64` reaches data_options.max_length (only that section has it), as --max-length does."""
    cfg = parse_cli(Toy, ["max_length=64", "learning_rate=0.5"], "t")
    assert cfg.data_options.max_length == 64 and cfg.train.learning_rate == 0.5
    with pytest.raises(ConfigError, match="max_lenght"):
        parse_cli(Toy, ["max_lenght=64"], "t")


def test_yaml_as_first_positional(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("steps: 3\n")
    assert parse_cli(Toy, [str(yml)], "t").steps == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bta=1"], "did you mean 'beta'"),
        (["steps=1.5"], "'steps' must be of type int"),
        (["quick=maybe"], "'quick' must be of type bool"),
        (["mode=c"], "choose one of: a, b"),
        (["train.learning_rat=1"], "did you mean 'train.learning_rate'"),
        (["beta.x=1"], "is not a section"),
        (["--max-length", "8", "--max-prompt-length", "8"], "must be smaller than"),
    ],
)
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_cli(Toy, argv, "t")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load(Toy, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("betta: 1\n")
    with pytest.raises(ConfigError, match=r"'betta' in .*unknown.yaml; did you mean 'beta'"):
        load(Toy, unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load(Toy, tmp_path / "missing.yaml")


def test_list_and_bool_conversions():
    cfg = from_dict(Toy, {"train": {"tags": "x, y"}, "quick": "yes"})
    assert cfg.train.tags == ["x", "y"] and cfg.quick is True
    assert from_dict(Toy, {"steps": 4.0}).steps == 4


def test_a_list_written_in_brackets_on_the_command_line_is_a_list():
    """`seeds=[0,1]` / `budgets=[1,3,6]`: brackets as in YAML (and as the sweep's axes are written), not a
    one-element list holding the string '[0'."""
    from sepo.stages.sweep import SweepConfig

    cfg = parse_cli(SweepConfig, ["task=sentiment", "seeds=[0, 1]", "budgets=[1,3,6]", "contrasts=[a - b]"], "sepo sweep")
    assert cfg.seeds == [0, 1] and cfg.budgets == [1.0, 3.0, 6.0] and cfg.contrasts == ["a - b"]
    assert parse_cli(SweepConfig, ["task=sentiment", "seeds=0,2"], "sepo sweep").seeds == [0, 2]


def test_reference_documents_every_field():
    md = reference_markdown(Toy, "Toy")
    for key in ("`beta`", "`steps`", "`train.learning_rate`", "`data_options.max_length`", "steps |", "One of: `a`, `b`"):
        assert key in md
