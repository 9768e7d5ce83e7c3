"""`sepo pipeline CONFIG.yaml [key=value ...]`: sft -> oracle -> score -> select -> train -> eval, resumable.

    sepo pipeline configs/hh_rlhf_cpu.yaml train.learning_rate=1e-5 --output runs/hh

Every stage writes its own folder under ``output`` and, when it finished, a marker ``<folder>.done.json``
holding the settings it ran with. A rerun skips stages whose marker matches, so after a crash the same
command continues with the stage that did not finish (a training stage resumes from its last checkpoint).

    output/
      data/train, data/eval      canonical pairs (the held-out split is never trained or scored on)
      sft/                       optional: the reference, fine-tuned on the chosen responses
      oracle/                    DPO of the reference on a random subset of the training pairs
      scores/  selected/         token rewards r_t and key-token masks of the (possibly other) scored data
      selected-random/           the control: as many tokens per response as selected/, at random positions
      policy-<method>/           one trained policy per method, same data and budget
      eval-<method>/, eval-reference/
      results.json, results.md

The oracle/reference pair and the policy may be different models (weak-to-strong): ``reference`` is the
oracle's base and the scoring reference, ``policy`` the model every method starts from (and is compared
with in eval). ``score_data`` may differ from ``data`` (out-of-distribution selection).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepo import __version__
from sepo.config import from_dict, option, to_dict
from sepo.core.losses import is_reference_free
from sepo.data.columns import MASK_COLUMNS, SOFT_WEIGHT_COLUMNS
from sepo.data.options import DataOptions
from sepo.errors import ConfigError, SepoError
from sepo.io import (
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    load_dataset_dir,
    owns_output,
    save_dataset,
)

log = logging.getLogger(__name__)
STAGES = ("sft", "oracle", "score", "select", "train", "eval")
METHOD_KEYS = ("loss", "selection", "model")  # the rest of a method's mapping are TrainConfig keys
SELECTIONS = ("oracle", "random", "none")
# pipeline-owned keys of each stage config (a section may not set them)
OWNED = {"train": ("model", "data", "output", "loss", "reference"), "score": ("oracle", "reference", "data", "output"),
         "select": ("scores", "output"), "eval": ("model", "reference", "data", "output", "reward")}


@dataclass
class PipelineConfig:
    """SePO end to end from one YAML: sft (optional) -> oracle -> score -> select -> train -> eval."""

    output: str = option("runs/pipeline", "run folder; each stage writes a sub-folder and is skipped when complete")
    data: str | None = option(None, "target preference data: a hub id, a local file/folder or a sepo dataset folder")
    eval_data: str | None = option(None, "held-out pairs for eval; none: eval_size rows are split off data")
    eval_size: int = option(200, "pairs split off data for eval when eval_data is none", unit="pairs")
    score_data: str | None = option(None, "data scored, selected and trained on (none: data's training split); "
                                    "another dataset gives out-of-distribution selection")
    max_pairs: int | None = option(None, "use at most this many training pairs (a seeded random subset)", unit="pairs")
    reference: str = option("stories260k", "reference model: base of the SFT and of the oracle, and scoring reference; "
                            "kit:ARCH:PRESET:TOKENIZER (e.g. kit:llama:small:gpt2) builds a random-init kit model first")
    policy: str | None = option(None, "model every method starts from (none: the reference after SFT)")
    stages: list[str] = option(["oracle", "score", "select", "train", "eval"], "stages to run, in pipeline order",
                               unit=", ".join(STAGES))
    oracle_fraction: float = option(0.5, "share (<= 1) or number (> 1) of training pairs the oracle is trained on")
    methods: dict[str, dict[str, Any]] = option(
        {"sepo": {"loss": "sepo"}},
        "policies to train, name -> {loss, selection: oracle|random|none, any train key}; loss defaults to the name")
    reward: str | None = option(None, "reward for eval generations (module:function or a classifier); none: no "
                                "reward/win rate")
    seed: int = option(0, "seed for splits, subsets and the random-selection control")
    rerun: list[str] = option([], "stages to run again even if complete")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading and tokenizing data")
    sft: dict[str, Any] = option({}, "train keys for the SFT stage (loss sft)")
    oracle: dict[str, Any] = option({}, "train keys for the oracle (loss defaults to dpo)")
    score: dict[str, Any] = option({}, "score keys (beta, batch_size, ...)")
    select: dict[str, Any] = option({}, "select keys (strategy, chosen_ratio, rejected_ratio, ...)")
    train: dict[str, Any] = option({}, "train keys shared by every method (learning_rate, num_epochs, ...)")
    eval: dict[str, Any] = option({}, "eval keys (max_new_tokens, num_prompts, temperature, ...)")

    def __post_init__(self):
        unknown = [s for s in [*self.stages, *self.rerun] if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        if list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise ConfigError(f"stages must be listed in pipeline order: {', '.join(STAGES)}")
        parse_kit(self.reference)
        if self.oracle_fraction <= 0:
            raise ConfigError("oracle_fraction must be > 0")
        for name, spec in self.methods.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"methods.{name} must be a mapping (loss, selection, train keys)")
            if spec.get("selection", "oracle") not in SELECTIONS:
                raise ConfigError(f"methods.{name}.selection must be one of {', '.join(SELECTIONS)}")
        for section in ("sft", "oracle", "train", "score", "select", "eval"):
            owned = OWNED.get("train" if section in ("sft", "oracle") else section, ())
            clash = [k for k in getattr(self, section) if k in owned and not (section == "oracle" and k == "loss")]
            if clash:
                raise ConfigError(f"{section}.{clash[0]} is set by the pipeline; use the top-level keys instead")


# --------------------------------------------------------------------------- helpers


def _stage_class(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"sepo.stages.{module}"), name)
    except (ImportError, AttributeError) as e:
        raise SepoError(f"stage sepo.stages.{module} is not available ({e})") from None


def _command(module: str) -> str:
    """The `sepo <command>` that runs stage module ``module`` (from cli.COMMANDS)."""
    from sepo.cli import COMMANDS

    return next(name for name, (mod, *_) in COMMANDS.items() if mod == f"sepo.stages.{module}")


def _build(module: str, cls_name: str, owned: dict, *sections: tuple[str, dict], where: str):
    """A stage config from the pipeline-owned values and the named YAML sections (later sections win). A key the
    stage does not know is reported under the section it was written in (``train.learning_rat``)."""
    cls = _stage_class(module, cls_name)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for section, entries in sections:
        for key in entries:
            if key not in names:
                close = difflib.get_close_matches(str(key), sorted(names), n=1)
                hint = f"did you mean {section}.{close[0]}?" if close else f"`sepo {_command(module)} --help` lists them"
                raise ConfigError(f"{section}.{key} is not a `sepo {_command(module)}` key; {hint}")
        values.update(entries)
    values.update({k: v for k, v in owned.items() if k in names or k in ("model", "data", "output")})
    try:
        return from_dict(cls, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def method_specs(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """name -> {loss, selection, model, train: {...}} with defaults filled in."""
    out = {}
    for name, spec in cfg.methods.items():
        loss = spec.get("loss", name)
        sel = spec.get("selection", "oracle" if loss == "sepo" else "none")
        out[name] = {"loss": loss, "selection": sel, "model": spec.get("model"),
                     "train": {k: v for k, v in spec.items() if k not in METHOD_KEYS}}
    return out


def parse_kit(spec: str) -> dict[str, Any] | None:
    """``kit:llama:small:gpt2[:SEED]`` -> build_tiny_model arguments; None for an ordinary model name."""
    if not spec.startswith("kit:"):
        return None
    from sepo.testing import ARCHITECTURES, PRESETS

    parts = spec.split(":")[1:]
    if len(parts) not in (3, 4) or parts[0] not in ARCHITECTURES or parts[1] not in PRESETS:
        raise ConfigError(f"reference '{spec}': write kit:ARCH:PRESET:TOKENIZER[:SEED] with ARCH one of "
                          f"{', '.join(ARCHITECTURES)} and PRESET one of {', '.join(PRESETS)}")
    return {"arch": parts[0], "preset": parts[1], "tokenizer": parts[2], "seed": int(parts[3]) if len(parts) == 4 else 0}


def base_reference(cfg: PipelineConfig, run_dir: Path) -> str:
    """The reference before SFT: the kit model's folder for a kit: spec, else the name as given."""
    return str(run_dir / "kit-model") if parse_kit(cfg.reference) else cfg.reference


def stage_configs(cfg: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """Every stage's config as the pipeline will run it (also how a YAML is validated without running)."""
    ref = str(run_dir / "sft") if "sft" in cfg.stages else base_reference(cfg, run_dir)
    policy = cfg.policy or ref
    train_dir, eval_dir = str(run_dir / "data" / "train"), str(run_dir / "data" / "eval")
    scored = str(run_dir / "data" / "score") if cfg.score_data else train_dir
    subset = cfg.oracle_fraction if cfg.oracle_fraction <= 1 else int(cfg.oracle_fraction)
    out: dict[str, Any] = {}
    if "sft" in cfg.stages:
        out["sft"] = _build("train", "TrainConfig", {"model": base_reference(cfg, run_dir), "data": train_dir, "loss": "sft",
                                                     "output": str(run_dir / "sft")}, ("sft", cfg.sft), where="sft")
    out["oracle"] = _build("train", "TrainConfig", {"model": ref, "data": train_dir, "output": str(run_dir / "oracle"),
                                                    "subset": subset, "seed": cfg.seed},
                           ("oracle", {"loss": "dpo"}), ("oracle", cfg.oracle), where="oracle")
    out["score"] = _build("score", "ScoreConfig", {"oracle": str(run_dir / "oracle"), "reference": ref,
                                                   "data": scored, "output": str(run_dir / "scores")},
                          ("score", cfg.score), where="score")
    sel_owned = {"scores": str(run_dir / "scores"), "output": str(run_dir / "selected")}
    if cfg.policy and _different_vocabulary(base_reference(cfg, run_dir), cfg.policy):
        sel_owned["policy_tokenizer"] = cfg.policy  # project the rewards onto the policy's tokens
    out["select"] = _build("select", "SelectConfig", sel_owned, ("select", cfg.select), where="select")
    for name, m in method_specs(cfg).items():
        data = {"oracle": str(run_dir / "selected"), "random": str(run_dir / "selected-random"), "none": scored}
        owned = {"model": m["model"] or policy, "data": data[m["selection"]], "loss": m["loss"],
                 "output": str(run_dir / f"policy-{name}"), "seed": cfg.seed}
        out[f"train:{name}"] = _build("train", "TrainConfig", owned, ("train", cfg.train), (f"methods.{name}", m["train"]),
                                       where=f"methods.{name}")
    for name in ["reference", *method_specs(cfg)]:
        spec = method_specs(cfg).get(name, {"loss": "sft", "model": None})
        model = (spec["model"] or policy) if name == "reference" else str(run_dir / f"policy-{name}")
        metric = "logprob" if is_reference_free(spec["loss"]) else "implicit"
        out[f"eval:{name}"] = _build("evaluate", "EvalConfig", {
            "model": model, "reference": spec["model"] or policy, "data": eval_dir, "reward": cfg.reward,
            "output": str(run_dir / f"eval-{name}"), "accuracy_metric": metric, "seed": cfg.seed,
            "generator_name": name, "overwrite": True}, ("data_options", {"data_options": to_dict(cfg.data_options)}),
            ("eval", cfg.eval), where=f"eval ({name})")
    return out


def _different_vocabulary(a: str, b: str) -> bool:
    """True unless both tokenizers load and have the same vocabulary (unloadable: assume different)."""
    if a == b:
        return False
    import warnings

    from sepo.models import load_tokenizer, tokenizer_fingerprint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tokenizer_fingerprint(load_tokenizer(a)) != tokenizer_fingerprint(load_tokenizer(b))
    except SepoError:
        return True


def check_stage_inputs(cfg: PipelineConfig, run_dir: Path) -> None:
    """Every stage in ``cfg.stages`` reads folders that an earlier stage of this run makes, or that a previous run
    finished (their ``.done.json`` marker): otherwise fail now, before hours of the stages ahead of it."""
    specs = method_specs(cfg)
    needs: list[tuple[str, str, str]] = []  # (stage, folder it reads, the stage that makes it)
    if "score" in cfg.stages:
        needs.append(("score", "oracle", "oracle"))
    if "select" in cfg.stages:
        needs.append(("select", "scores", "score"))
    if "train" in cfg.stages:
        for name, m in specs.items():
            if m["selection"] != "none":
                needs.append((f"train ({name})", "selected-random" if m["selection"] == "random" else "selected",
                              "select"))
    if "eval" in cfg.stages:
        needs += [(f"eval ({name})", f"policy-{name}", "train") for name in specs]
    for stage, folder, maker in needs:
        made_here = maker in cfg.stages and STAGES.index(maker) < STAGES.index(stage.split(" ")[0])
        if not made_here and not (run_dir / f"{folder}.done.json").is_file():
            raise ConfigError(f"stage {stage} reads {run_dir / folder}, which stage {maker} makes; it is not in "
                              f"stages ({', '.join(cfg.stages)}) and no earlier run in {run_dir} finished it. Add "
                              f"'{maker}' (and the stages before it) to stages, or point output at the run that has it")


def random_masks_like(selected, seed: int):
    """The control: per response, as many tokens as the oracle selected, at uniformly random positions. The
    per-token weights (``sepo select``'s ``*_weights``) move with the positions: the selected tokens' weights go
    to the drawn positions, the others' to the rest, so a soft selection keeps its weights too."""
    rng = random.Random(seed)
    has_weights = set(SOFT_WEIGHT_COLUMNS) <= set(selected.column_names)

    def redraw(row: dict, side: str) -> dict:
        mask = row[f"{side}_mask"]
        picked = rng.sample(range(len(mask)), sum(map(bool, mask)))
        kept = set(picked)
        out = {f"{side}_mask": [i in kept for i in range(len(mask))]}
        if has_weights:
            weights = row[f"{side}_weights"]
            moved = [0.0] * len(mask)
            for i, w in zip(picked, [w for w, m in zip(weights, mask) if m]):
                moved[i] = w
            for i, w in zip([i for i in range(len(mask)) if i not in kept], [w for w, m in zip(weights, mask) if not m]):
                moved[i] = w
            out[f"{side}_weights"] = moved
        return out

    return selected.map(lambda row: {**redraw(row, "chosen"), **redraw(row, "rejected")})


def token_fraction(selected) -> float:
    total = sum(len(m) for column in MASK_COLUMNS for m in selected[column])
    return sum(sum(m) for column in MASK_COLUMNS for m in selected[column]) / max(total, 1)


class _Runner:
    """Runs a stage unless its folder has a marker with the same settings and the same upstream stages;
    writes the marker afterwards. A stage whose upstream stage changed runs again."""

    def __init__(self, run_dir: Path, rerun: list[str]):
        self.run_dir, self.rerun, self.ran, self.skipped = run_dir, rerun, [], []
        self.digests: dict[str, str] = {}

    def __call__(self, key: str, folder: Path, settings: Any, fn, after: tuple[str, ...] = ()) -> None:
        marker = folder.parent / f"{folder.name}.done.json"
        digest = fingerprint(settings, [self.digests.get(k) for k in after])
        self.digests[key] = digest
        done = marker.is_file() and folder.exists() and key.split(":")[0] not in self.rerun
        if done and json.loads(marker.read_text()).get("fingerprint") == digest:
            log.info("== %s: complete in %s, skipped", key, folder)
            self.skipped.append(key)
            return
        log.info("== %s -> %s", key, folder)
        marker.unlink(missing_ok=True)
        started = time.time()
        fn()
        atomic_write_json(marker, {"stage": key, "fingerprint": digest, "seconds": round(time.time() - started, 1),
                                   "after": list(after), "settings": settings})
        self.ran.append(key)


def _resumable(stage_cfg, folder: Path):
    """A training config that continues an interrupted run in ``folder`` (or replaces a stale output)."""
    names = {f.name for f in dataclasses.fields(stage_cfg)}
    changes = {}
    if folder.exists():
        if "resume" in names:
            changes["resume"] = True
        if "overwrite" in names:
            changes["overwrite"] = True
    return dataclasses.replace(stage_cfg, **changes) if changes else stage_cfg


# --------------------------------------------------------------------------- run


@owns_output()
def run(cfg: PipelineConfig) -> dict:
    if not cfg.data:
        raise ConfigError("sepo pipeline needs data (a preference dataset)")
    run_dir = Path(cfg.output)
    configs = stage_configs(cfg, run_dir)  # every section validated before anything runs
    check_stage_inputs(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    step = _Runner(run_dir, cfg.rerun)
    specs = method_specs(cfg)

    # ------------------------------------------------------------------ kit reference (when asked for)
    kit = parse_kit(cfg.reference)
    if kit:
        from sepo.testing import build_tiny_model

        def build():
            from sepo.io import atomic_dir

            with atomic_dir(run_dir / "kit-model", overwrite=True) as tmp:
                build_tiny_model(tmp, **kit)

        step("kit", run_dir / "kit-model", kit, build)
        configs = stage_configs(cfg, run_dir)  # again, now that the kit's tokenizer exists (select's projection)

    # ------------------------------------------------------------------ data: train / eval split, tokenized once
    def prepare_data():
        from sepo.data import load_pairs, subset, train_eval_split
        from sepo.models import load_tokenizer, shortest_context, tokenizer_fingerprint

        tok = load_tokenizer(base_reference(cfg, run_dir))
        fit = dict(zip(("context", "whose"), shortest_context(reference=base_reference(cfg, run_dir), policy=cfg.policy)))
        train = load_pairs(cfg.data, tok, cfg.data_options, **fit)[0]
        if cfg.eval_data:
            held_out = load_pairs(cfg.eval_data, tok, cfg.data_options, **fit)[0]
        else:
            train, held_out = train_eval_split(train, min(cfg.eval_size, len(train) // 2), cfg.seed)
        if cfg.max_pairs is not None and cfg.max_pairs < len(train):
            train = subset(train, cfg.max_pairs, cfg.seed)
        meta = {"stage": "pipeline-data", "sepo_version": __version__, "source": cfg.data, "tokenizer": cfg.reference,
                "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
        save_dataset(train, run_dir / "data" / "train", {**meta, "num_rows": len(train)}, overwrite=True)
        save_dataset(held_out, run_dir / "data" / "eval", {**meta, "num_rows": len(held_out)}, overwrite=True)
        if cfg.score_data:
            other = load_pairs(cfg.score_data, tok, cfg.data_options, **fit)[0]
            save_dataset(other, run_dir / "data" / "score", {**meta, "source": cfg.score_data,
                                                               "num_rows": len(other)}, overwrite=True)

    step("data", run_dir / "data", {"data": cfg.data, "eval": cfg.eval_data, "eval_size": cfg.eval_size,
                                    "score_data": cfg.score_data, "max_pairs": cfg.max_pairs, "seed": cfg.seed,
                                    "reference": cfg.reference, "options": to_dict(cfg.data_options)}, prepare_data,
         after=("kit",))

    # ------------------------------------------------------------------ sft (optional) and the oracle
    train_mod = importlib.import_module("sepo.stages.train")
    for key in ("sft", "oracle"):
        if key in cfg.stages:
            folder = run_dir / key
            step(key, folder, to_dict(configs[key]), lambda f=folder, k=key: train_mod.run(_resumable(configs[k], f)),
                 after=("data", "sft"))

    # ------------------------------------------------------------------ token rewards and key tokens
    if "score" in cfg.stages:
        score_mod = importlib.import_module("sepo.stages.score")
        step("score", run_dir / "scores", to_dict(configs["score"]),
             lambda: score_mod.run(_resumable(configs["score"], run_dir / "scores")), after=("data", "sft", "oracle"))
    if "select" in cfg.stages:
        select_mod = importlib.import_module("sepo.stages.select")
        step("select", run_dir / "selected", to_dict(configs["select"]),
             lambda: select_mod.run(_resumable(configs["select"], run_dir / "selected")), after=("score",))
        if any(m["selection"] == "random" for m in specs.values()):
            def randomise():
                selected, meta = load_dataset_dir(run_dir / "selected", MASK_COLUMNS)
                save_dataset(random_masks_like(selected, cfg.seed), run_dir / "selected-random",
                             {**meta, "stage": "select-random", "seed": cfg.seed}, overwrite=True)

            step("select:random", run_dir / "selected-random", {"seed": cfg.seed, "of": to_dict(configs["select"])},
                 randomise, after=("select",))

    # ------------------------------------------------------------------ train one policy per method
    if "train" in cfg.stages:
        for name in specs:
            key, folder = f"train:{name}", run_dir / f"policy-{name}"
            upstream = {"oracle": "select", "random": "select:random", "none": "data"}[specs[name]["selection"]]
            step(key, folder, to_dict(configs[key]), lambda f=folder, k=key: train_mod.run(_resumable(configs[k], f)),
                 after=("data", "sft", upstream))

    # ------------------------------------------------------------------ eval: the untrained policy and every method
    results: dict[str, Any] = {"methods": {}}
    if "eval" in cfg.stages:
        eval_mod = importlib.import_module("sepo.stages.evaluate")
        for name in ["reference", *specs]:
            key = f"eval:{name}"
            folder = run_dir / f"eval-{name}"
            step(key, folder, to_dict(configs[key]), lambda k=key: eval_mod.run(configs[k]),
                 after=("data", "sft", f"train:{name}"))
            metrics = json.loads((folder / "metrics.json").read_text())
            sel = specs.get(name, {}).get("selection", "none")
            frac = token_fraction(load_dataset_dir(run_dir / ("selected" if sel == "oracle" else "selected-random"))[0]) \
                if sel != "none" else 1.0
            results["methods"][name] = {
                "loss": specs[name]["loss"] if name in specs else None, "selection": sel,
                "gold_reward": metrics.get("reward"), "win_rate": metrics.get("win_rate"), "kl": metrics.get("kl"),
                "pref_accuracy": metrics.get("pref_accuracy"), "pref_metric": metrics.get("pref_metric"),
                "token_fraction": 0.0 if name == "reference" else frac}

    # ------------------------------------------------------------------ results
    results.update(stages_run=step.ran, stages_skipped=step.skipped, seconds=round(time.time() - started, 1),
                   config=to_dict(cfg), sepo_version=__version__)
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.md", results_markdown(results, title=f"sepo pipeline: {run_dir}"))
    if results["methods"]:
        print(results_markdown(results, title=None))
    return results


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def results_markdown(results: dict, title: str | None) -> str:
    """The per-method table as Markdown."""
    cols = ["gold_reward", "win_rate", "kl", "pref_accuracy", "token_fraction"]
    lines = [f"# {title}", ""] if title else []
    lines += ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in results.get("methods", {}).items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
