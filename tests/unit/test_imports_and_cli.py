"""Every module imports; every command has --help listing its options with defaults; errors exit 2."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sepo
from sepo.cli import COMMANDS, main


def _modules():
    return sorted(m.name for m in pkgutil.walk_packages(sepo.__path__, prefix="sepo."))


@pytest.mark.parametrize("name", _modules())
def test_every_module_imports(name):
    importlib.import_module(name)


def test_core_has_no_transformers_or_datasets_imports():
    """core/ is pure torch: it must stay testable and reusable without the HF stack."""
    core = Path(sepo.__file__).parent / "core"
    for f in core.glob("*.py"):
        text = f.read_text()
        assert "import transformers" not in text and "from transformers" not in text, f
        assert "import datasets" not in text and "from datasets" not in text, f


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_options_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"sepo {command}" in out and "--config" in out and "default:" in out


def test_top_level_help_and_unknown_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_config_errors_are_one_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "sepo", "score", "betaa=1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown config key 'betaa'" in proc.stderr and "did you mean 'beta'" in proc.stderr


def test_config_reference_is_up_to_date():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gen_config_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
