#!/usr/bin/env python3
"""Set up and run, in one command, on a machine with only Python >= 3.10 and git.

    python3 dev.py demo [sepo demo options]     # `sepo demo`
    python3 dev.py test [pytest options]        # the test suite, as CI runs it

Each command makes its own environment first: ``.venv`` beside this file is created when missing (another
folder: SEPO_VENV), torch is installed into it when it has none (SEPO_TORCH, default ``torch==2.13.0``; a
bare ``torch`` from PyPI is a multi-GB CUDA build, so on a CPU-only machine pass e.g.
SEPO_TORCH="torch --index-url https://download.pytorch.org/whl/cpu"), and sepo itself is installed
(editable, with the test extras for ``test``) when it is not, or when pyproject.toml changed since. A second
run goes straight to the command. Standard library only: this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_TORCH = "torch==2.13.0"
USAGE = "usage: python3 dev.py {demo,test} [options passed on to `sepo demo` / pytest]"


def say(message: str) -> None:
    print(f"dev.py: {message}", flush=True)


def run(argv: list[str], **kwargs) -> None:
    say("$ " + shlex.join(argv))
    done = subprocess.run(argv, **kwargs)
    if done.returncode:
        raise SystemExit(done.returncode)


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(folder: Path) -> Path:
    python = venv_python(folder)
    if python.is_file():
        return python
    say(f"creating {folder}")
    try:
        venv.EnvBuilder(with_pip=True).create(folder)
    except (subprocess.CalledProcessError, OSError) as e:
        raise SystemExit(f"dev.py: could not create {folder} ({e}). On Debian/Ubuntu install the venv module "
                         "first: apt install python3-venv") from None
    return python


def has_module(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_installed(python: Path, extras: str) -> None:
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if not has_module(python, "torch"):
        run([*pip, *shlex.split(os.environ.get("SEPO_TORCH", DEFAULT_TORCH))])
    # reinstall sepo only when its declared dependencies (or the extras asked for) changed
    stamp = python.parent.parent / f".sepo-installed{extras}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and has_module(python, "sepo"):
        return
    run([*pip, "-e", f"{ROOT}{extras}"])
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 (this file runs on whatever python3 is there)
        raise SystemExit(f"dev.py: sepo needs Python >= 3.10; this is {sys.version.split()[0]}")
    if not argv or argv[0] not in ("demo", "test"):
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_venv(Path(os.environ.get("SEPO_VENV", ROOT / ".venv")))
    ensure_installed(python, "[dev]" if command == "test" else "")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    if command == "demo":
        argv = [str(python), "-m", "sepo", "demo", *rest]
    else:  # exactly what .ci/run runs (without installing Chromium, whose one test then says why it skips)
        env["HF_HUB_OFFLINE"] = "1"
        argv = [str(python), "-m", "pytest", "-q", *rest]
    say("$ " + shlex.join(argv))
    return subprocess.run(argv, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
