"""`sepo <command>`: parse a stage's config from the command line and call its ``run``. Nothing else."""

from __future__ import annotations

import importlib
import logging
import sys

from sepo import __version__
from sepo.config import parse_cli
from sepo.errors import SepoError
from sepo.io import storage_error

# command -> (module, config class, function, summary). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "data inspect": ("sepo.stages.data", "DataInspectConfig", "inspect", "detect a preference dataset's format; counts, token lengths, examples"),
    "data prepare": ("sepo.stages.data", "DataPrepareConfig", "prepare", "write the canonical tokenized pairs (Arrow) with metadata"),
    "score": ("sepo.stages.score", "ScoreConfig", "run", "token-level rewards r_t = beta*(log pi_oracle - log pi_ref) for every response token"),
    "select": ("sepo.stages.select", "SelectConfig", "run", "choose key tokens (ratio / threshold / mass), optionally in another tokenizer"),
    "inspect": ("sepo.stages.inspect", "InspectConfig", "run", "reward statistics, concentration curve and an HTML view of selected tokens"),
    "train": ("sepo.stages.train", "TrainConfig", "run", "one accelerate loop: sft, dpo, ipo, rdpo, rpo, simpo, rrhf, tdpo, sepo"),
    "eval": ("sepo.stages.evaluate", "EvalConfig", "run", "preference accuracy, generation, reward, win rate and KL against a reference"),
    "pipeline": ("sepo.stages.pipeline", "PipelineConfig", "run", "sft -> oracle -> score -> select -> train -> eval from one YAML, resumable"),
    "demo": ("sepo.stages.demo", "DemoConfig", "run", "SePO end to end on the embedded task with known key tokens"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, _, _, summary) in COMMANDS.items())
    return (
        f"sepo {__version__}: selective token-level preference optimization\n\n"
        f"usage: sepo <command> [--config YAML] [args] [key=value ...] [--flags]\n\ncommands:\n{rows}\n\n"
        "`sepo <command> --help` lists every option with its default."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"sepo {__version__}")
        return 0
    name = argv[0]
    rest = argv[1:]
    if name == "data":
        if not rest or rest[0] not in ("inspect", "prepare"):
            print("usage: sepo data {inspect,prepare} ...  (`sepo data inspect --help`)", file=sys.stderr)
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        name, rest = f"data {rest[0]}", rest[1:]
    if name not in COMMANDS:
        print(f"sepo: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, config_name, fn_name, summary = COMMANDS[name]
    configure_logging()
    cfg = None
    try:
        module = importlib.import_module(module_name)
        cfg = parse_cli(getattr(module, config_name), rest, prog=f"sepo {name}", description=summary,
                        examples=docstring_examples(module, name))
        getattr(module, fn_name)(cfg)
    except SepoError as e:
        print(f"sepo {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sepo {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # a full or read-only disk met outside a stage's own output (a cache, a log): still one line
        fault = storage_error(e, getattr(cfg, "output", None) or ".")
        if fault is None:
            raise
        print(f"sepo {name}: error: {fault}", file=sys.stderr)
        return 2
    return 0


def docstring_examples(module, name: str) -> list[str]:
    """The ``sepo <name> ...`` lines of a stage module's docstring (a trailing backslash continues a line)."""
    lines, current = [], ""
    for raw in (module.__doc__ or "").splitlines():
        text = " ".join(raw.split())  # a backslash-newline in the docstring already joined two lines
        if current:
            current += " " + text
        elif text.startswith(f"sepo {name} "):
            current = text
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        lines.append(current)
        current = ""
    return lines


def configure_logging() -> None:
    """sepo's own progress at INFO, one plain line each; other libraries only from WARNING (matplotlib's
    first-run "generated new fontManager", accelerate's and datasets' INFO chatter stay out)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("sepo").setLevel(logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
