"""Regenerate docs/config-reference.md from the stage config dataclasses (the single source of truth).

    python scripts/gen_config_reference.py          # rewrite the file
    python scripts/gen_config_reference.py --check  # exit 1 if the file is stale (used by the tests)
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from sepo.cli import COMMANDS
from sepo.config import reference_markdown

TARGET = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def render() -> str:
    parts = [
        "# Config reference",
        "",
        "Generated from the config dataclasses by `python scripts/gen_config_reference.py`; do not edit by hand.",
        "Every key can be set in a YAML file (`--config`), as `key=value` (nested: `section.key=value`) or as a",
        "`--flag`. Precedence: defaults < YAML < key=value < flags.",
        "",
    ]
    for command, (module, cls_name, _, summary) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        parts += [f"## `sepo {command}`", "", summary[0].upper() + summary[1:] + ".", "",
                  reference_markdown(cls), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not TARGET.is_file() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is stale: run python scripts/gen_config_reference.py")
            sys.exit(1)
    else:
        TARGET.write_text(text, encoding="utf-8")
        print(f"wrote {TARGET}")
