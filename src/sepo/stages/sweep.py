"""`sepo sweep CONFIG.yaml [key=value ...]`: reward–KL frontiers of methods x strengths x seeds, compared at
matched KL with bootstrap confidence intervals.

    sepo sweep configs/sweep_demo.yaml jobs=2

What every point shares is computed once, by `sepo pipeline` runs (their stages and ``.done.json`` markers):

    output/
      task/train, task/eval      a known-answer task's generated pairs (``task: NAME``); else ``data:`` is read
      base/                      pipeline with stages [] or [sft]: data/train, data/eval (held out), sft/
      variants/<name>/           pipeline with stages [(sft,) oracle, score, select]: one per shared variant
                                 (oracle settings, k, a weak oracle base...); selected/, selected-random/
      points/<method>/<strength>/seed-<s>/
                                 policy/ (deleted once evaluated unless keep_policies), eval/, log.txt, and
                                 result.json, written last: the point is done
      points/reference/          the untrained policy, evaluated once: every method's KL-0 point
      sweep.jsonl                one row per point: its configs and metrics
      summary.md, summary.json, frontier.png   (sepo.stages.sweep_report)

A point = a method (a ``sepo train`` loss on a selection: a variant's oracle selection, its random control,
or all tokens), one value of each of its strength axes (any train key given as a list), and a training
seed. The data and the SFT are made in this process; the variants and the points run in ``jobs`` worker
processes, each as soon as what it reads exists (sepo.stages.sweep_jobs), under one progress bar; a killed
sweep resumes point by point. docs/sweep.md documents the config and the outputs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepo import __version__
from sepo.config import from_dict, option, to_dict
from sepo.data.options import DataOptions
from sepo.errors import ConfigError, SepoError
from sepo.io import atomic_write_json, atomic_write_text, fingerprint, owns_output

log = logging.getLogger(__name__)
SELECTIONS = ("oracle", "random", "none")
METHOD_KEYS = ("loss", "selection", "variant")  # the rest of a method's mapping are train keys
VARIANT_KEYS = ("reference", "sft", "oracle_fraction", "seed", "oracle", "score", "select")
OWNED_TRAIN_KEYS = ("model", "data", "output", "reference", "seed", "resume", "overwrite")
OWNED_EVAL_KEYS = ("model", "reference", "data", "output", "reward", "seed", "overwrite", "vocabulary_data",
                   "generator_name", "accuracy_metric")


@dataclass
class SweepConfig:
    """Reward-KL frontiers: methods x strengths x seeds on shared data, oracles and selections."""

    output: str = option("runs/sweep", "run folder; rerunning the same command resumes point by point")
    # ---- the data: a known-answer task's generated pairs, or any preference data
    task: str | None = option(None, "known-answer task whose pairs are generated (sepo.tasks, e.g. sentiment): "
                              "gold reward and key tokens known; none: read data")
    task_options: dict[str, Any] = option({}, "the task's own knobs (sentiment: bt_temperature)")
    num_prompts: int = option(1800, "task: training prompts, two samples each -> labelled pairs", unit="prompts")
    eval_prompts: int = option(340, "task: held-out prompts -> eval pairs; every point generates for their prompts",
                               unit="prompts")
    max_new_tokens: int = option(40, "task: length of the sampled responses (and of eval samples unless "
                                 "eval.max_new_tokens)", unit="tokens")
    label_noise: float = option(0.0, "task: probability of flipping a pair's label")
    data: str | None = option(None, "preference data when there is no task: a hub id, a local file/folder or a sepo "
                              "dataset folder")
    eval_data: str | None = option(None, "held-out pairs (none: eval_size rows are split off data)")
    eval_size: int = option(200, "pairs split off data for eval when eval_data is none", unit="pairs")
    max_pairs: int | None = option(None, "use at most this many training pairs (a seeded random subset)", unit="pairs")
    data_options: DataOptions = option(default_factory=DataOptions, help="reading and tokenizing data")
    reward: str | None = option(None, "reward of the eval samples: module:function or a reward model (none: the "
                                "task's gold reward; without a task and a reward there is no frontier)")
    # ---- models
    reference: str = option("stories260k", "reference model: base of the SFT and of the oracle, scoring reference "
                            "(kit:ARCH:PRESET:TOKENIZER builds a random-init kit model); a task samples its pairs "
                            "from policy, else from it")
    policy: str | None = option(None, "model every point starts from and is compared with (none: the reference "
                                "after SFT)")
    sft: dict[str, Any] | None = option(None, "train keys of an SFT of the reference on the chosen responses, run "
                                        "once before anything else (none: no SFT)")
    # ---- shared selections
    oracle_fraction: float = option(0.5, "share (<= 1) or number (> 1) of training pairs the oracle is trained on")
    oracle: dict[str, Any] = option({}, "train keys of the oracle (loss defaults to dpo)")
    score: dict[str, Any] = option({}, "score keys (beta, batch_size, ...)")
    select: dict[str, Any] = option({}, "select keys (strategy, chosen_ratio, rejected_ratio, ...)")
    variants: dict[str, dict[str, Any]] = option(
        {"oracle": {}}, "shared oracles and selections, name -> overrides of reference (+ its sft), "
        "oracle_fraction, seed (the oracle's subset and data order, the random control), oracle, score, select; a "
        "list value is an axis (one variant per value)")
    # ---- points
    methods: dict[str, dict[str, Any]] = option(
        {"dpo": {"loss": "dpo"}, "sepo": {"loss": "sepo"}},
        "name -> {loss, selection: oracle|random|none, variant, any train key}; a list value is a strength axis")
    train: dict[str, Any] = option({}, "train keys shared by every method (a list value: an axis of every method)")
    seeds: list[int] = option([0], "training seeds: each strength of each method is trained once per seed")
    seed: int = option(0, "seed of the task's prompts and labels (or the data split), the oracle's subset and the "
                       "random control")
    eval: dict[str, Any] = option({}, "eval keys (num_prompts: none = every held-out prompt, max_new_tokens, "
                                  "batch_size, temperature, ...)")
    # ---- statistics
    budgets: list[float] = option([1.0, 3.0, 10.0], "KL budgets at which methods are compared", unit="nats")
    bootstrap: int = option(1000, "paired bootstrap resamples (seeds and prompts) for the confidence intervals")
    contrasts: list[str] = option([], "method pairs 'A - B' whose paired difference at each budget summary.md "
                                  "tabulates, with its CI (summary.json holds every pair's); '* - B': every "
                                  "method against B")
    # ---- execution
    jobs: int = option(1, "worker processes running points in parallel")
    threads: int | None = option(None, "torch threads of each worker (and of the shared stages); none: CPU cores "
                                 "// jobs, at least 1")
    keep_policies: bool = option(False, "keep every point's trained weights (deleted once evaluated otherwise)")

    def __post_init__(self):
        from sepo.stages.pipeline import parse_kit

        if (self.task is None) == (self.data is None):
            raise ConfigError("give exactly one of task (a known-answer task of sepo.tasks: its pairs are generated) "
                              "and data (preference data to read)")
        if self.task is not None:
            from sepo.tasks import get_task

            known = get_task(self.task).options
            unknown = [k for k in self.task_options if k not in known]
            if unknown:
                raise ConfigError(f"task_options.{unknown[0]} is not an option of task {self.task} (it takes: "
                                  f"{', '.join(known) or 'none'})")
            if self.num_prompts < 2 or self.eval_prompts < 2 or self.max_new_tokens < 1:
                raise ConfigError("num_prompts and eval_prompts must be >= 2, max_new_tokens >= 1")
            if not 0 <= self.label_noise < 0.5:
                raise ConfigError("label_noise must be in [0, 0.5)")
            if parse_kit(self.policy or self.reference):
                raise ConfigError("a task samples its pairs from policy (none: reference): set one of them to a "
                                  "trained model, not a kit: spec")
        parse_kit(self.reference)
        if not self.variants:
            raise ConfigError("variants needs at least one entry (e.g. oracle: {})")
        if not self.methods:
            raise ConfigError("methods needs at least one entry")
        if "reference" in self.methods:
            raise ConfigError("'reference' names the untrained policy, which every sweep evaluates; give the method "
                              "another name")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds must be a non-empty list of distinct integers")
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise ConfigError("budgets must be a non-empty list of KL values > 0 (nats)")
        if self.bootstrap < 100:
            raise ConfigError("bootstrap must be >= 100 resamples")
        if self.jobs < 1 or (self.threads is not None and self.threads < 1):
            raise ConfigError("jobs and threads must be >= 1")


# --------------------------------------------------------------------------- the plan: variants and points


@dataclass
class Variant:
    """One shared oracle + selection: a `sepo pipeline` run in its own folder."""

    name: str  # the configured name, plus [axis=value,...] for a swept one
    folder: Path
    pipeline: Any  # PipelineConfig
    settings: dict  # what it was made with (its points' keys depend on it)
    task: str | None = None  # the known-answer task whose key tokens judge its selections
    tokenizer: str | None = None  # what its selections are tokenized with


@dataclass
class Point:
    """One train + eval (or, for the reference, one eval): everything a worker needs to run it."""

    id: str  # method/strength/seed-N, also its folder under points/
    method: str  # the curve it belongs to (a method, or method[variant axes] for a swept variant)
    loss: str | None
    selection: str
    variant: str | None
    strength: dict[str, Any]  # its axis values
    strength_label: str
    seed: int
    key: str  # fingerprint of everything it depends on: a result with another key is stale
    train: Any | None  # TrainConfig; None for the reference
    eval: Any  # EvalConfig
    keep_policy: bool

    @property
    def folder(self) -> Path:
        return Path(self.eval.output).parent

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"


@dataclass
class Plan:
    out: Path
    base: Any  # PipelineConfig of the data (and SFT) run
    policy: str  # what every point starts from and is compared with
    variants: dict[str, Variant]
    points: list[Point]  # the reference first
    data_key: str


def _list_typed(cls) -> set[str]:
    hints = typing.get_type_hints(cls)
    out = set()
    for name, tp in hints.items():
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
        if any(typing.get_origin(a) is list or a is list for a in [tp, *inner]):
            out.add(name)
    return out


def _literal(value: Any) -> Any:
    """A ``[a, b]`` string (a list written on the command line) as a list."""
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        import yaml

        return yaml.safe_load(value)
    return value


def split_axes(section: dict[str, Any], cls, where: str) -> tuple[dict[str, Any], dict[str, list]]:
    """(fixed keys, axes): a list where ``cls`` takes one value is an axis, as is a list of lists where it takes a
    list (``lora_target_modules``)."""
    listy = _list_typed(cls)
    fixed, axes = {}, {}
    for key, value in section.items():
        value = _literal(value)
        if isinstance(value, list) and (key not in listy or (value and all(isinstance(v, list) for v in value))):
            if not value:
                raise ConfigError(f"{where}.{key} is an empty list: an axis needs at least one value")
            axes[key] = value
        else:
            fixed[key] = value
    return fixed, axes


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, str):
        try:
            return f"{float(value):g}"
        except ValueError:
            return value
    return json.dumps(value)


def axis_label(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in values.items())


def _grid(axes: dict[str, list]) -> list[dict[str, Any]]:
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else [{}]


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+\-\[\]]", "_", text) or "_"


def _data_settings(cfg: SweepConfig) -> dict:
    """What the data and the starting models are made from: another value means another sweep."""
    keys = ["task", "task_options", "num_prompts", "eval_prompts", "max_new_tokens", "label_noise", "data",
            "eval_data", "eval_size", "max_pairs", "data_options", "reference", "policy", "sft", "seed"]
    values = to_dict(cfg)
    if cfg.task is None:
        keys = [k for k in keys if k not in ("task_options", "num_prompts", "eval_prompts", "max_new_tokens",
                                             "label_noise")]
    return {k: values[k] for k in keys}


def base_pipeline(cfg: SweepConfig, out: Path):
    """The pipeline run that makes data/train, data/eval and (with sft) the SFT reference."""
    from sepo.stages.pipeline import PipelineConfig

    data, eval_data = (str(out / "task" / "train"), str(out / "task" / "eval")) if cfg.task else (cfg.data, cfg.eval_data)
    return from_dict(PipelineConfig, {
        "output": str(out / "base"), "data": data, "eval_data": eval_data, "eval_size": cfg.eval_size,
        "max_pairs": cfg.max_pairs if not cfg.task else None, "reference": cfg.reference,
        "stages": ["sft"] if cfg.sft is not None else [], "sft": cfg.sft or {}, "seed": cfg.seed,
        "data_options": to_dict(cfg.data_options), "methods": {}})


def _starting_models(cfg: SweepConfig, out: Path, base) -> tuple[str, str]:
    """(reference after the SFT, policy): the strong oracle's base and scoring reference, and every point's start."""
    from sepo.stages.pipeline import base_reference

    reference = str(out / "base" / "sft") if cfg.sft is not None else base_reference(base, out / "base")
    return reference, cfg.policy or reference


def expand_variants(cfg: SweepConfig, out: Path, randomised: set[str]) -> dict[str, Variant]:
    """Every shared variant (a swept one once per value of its axes), as the pipeline config that makes it.
    ``randomised``: the configured variants some method trains on the random control of."""
    from sepo.stages.pipeline import PipelineConfig
    from sepo.stages.score import ScoreConfig
    from sepo.stages.select import SelectConfig
    from sepo.stages.train import TrainConfig

    base = base_pipeline(cfg, out)
    reference, policy = _starting_models(cfg, out, base)
    oracle_data = None
    if cfg.task is not None:
        from sepo.tasks import get_task

        if get_task(cfg.task).oracle_options is not None:
            oracle_data = str(out / "task" / "oracle")  # the oracle's pairs; it selects on the task's own
    variants: dict[str, Variant] = {}
    for name, spec in cfg.variants.items():
        where = f"variants.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping (its keys: {', '.join(VARIANT_KEYS)})")
        unknown = [k for k in spec if k not in VARIANT_KEYS]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]} is not a variant key; a variant sets {', '.join(VARIANT_KEYS)}")
        if "sft" in spec and "reference" not in spec:
            raise ConfigError(f"{where}.sft fine-tunes the variant's own reference: set {where}.reference too (the "
                              "sweep's SFT is the top-level sft key)")
        axes: dict[str, list] = {}
        fixed: dict[str, Any] = {}
        for key in ("reference", "oracle_fraction", "seed"):  # seed: the oracle's subset and order, the random control
            value = _literal(spec.get(key, cfg.oracle_fraction if key == "oracle_fraction" else None))
            if isinstance(value, list):
                axes[key] = value
            elif value is not None:
                fixed[key] = value
        for key, cls, top in (("oracle", TrainConfig, cfg.oracle), ("score", ScoreConfig, cfg.score),
                              ("select", SelectConfig, cfg.select), ("sft", TrainConfig, {})):
            section = {**top, **(spec.get(key) or {})}
            values, section_axes = split_axes(section, cls, f"{where}.{key}")
            fixed[key] = values
            axes.update({f"{key}.{k}": v for k, v in section_axes.items()})
        for values in _grid(axes):
            settings = json.loads(json.dumps(fixed))
            for key, value in values.items():
                if "." in key:
                    section, sub = key.split(".", 1)
                    settings[section][sub] = value
                else:
                    settings[key] = value
            full = f"{name}[{axis_label(values)}]" if values else name
            folder = out / "variants" / _folder_name(full)
            own_reference = settings.get("reference")
            stages = (["sft"] if own_reference and "sft" in spec else []) + ["oracle", "score", "select"]
            pipeline_cfg = from_dict(PipelineConfig, {
                "output": str(folder), "data": oracle_data or str(out / "base" / "data" / "train"),
                "score_data": str(out / "base" / "data" / "train") if oracle_data else None,
                "eval_data": str(out / "base" / "data" / "eval"), "reference": own_reference or reference,
                "policy": policy if (own_reference or policy != reference) else None, "stages": stages,
                "oracle_fraction": settings["oracle_fraction"], "seed": settings.get("seed", cfg.seed),
                "methods": {"control": {"loss": "sepo", "selection": "random"}} if name in randomised else {},
                "sft": settings["sft"], "oracle": settings["oracle"], "score": settings["score"],
                "select": settings["select"], "data_options": to_dict(cfg.data_options)})
            variants[full] = Variant(full, folder, pipeline_cfg, {"configured": name, "axes": values, **settings},
                                     task=cfg.task, tokenizer=policy)
    return variants


def _method_specs(cfg: SweepConfig) -> dict[str, dict[str, Any]]:
    from sepo.core.objectives import reads_selection, reads_token_rewards

    first = next(iter(cfg.variants))
    out = {}
    for name, spec in cfg.methods.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"methods.{name} must be a mapping (loss, selection, variant, train keys)")
        loss = spec.get("loss", name)
        selection = spec.get("selection", "oracle" if reads_selection(loss) or reads_token_rewards(loss) else "none")
        if selection not in SELECTIONS:
            raise ConfigError(f"methods.{name}.selection must be one of {', '.join(SELECTIONS)}")
        if selection == "none" and "variant" in spec:
            raise ConfigError(f"methods.{name}.variant has no effect: selection none trains on every token (set "
                              "selection: oracle or random to train on a variant's selection)")
        variant = spec.get("variant", first)
        if selection != "none" and variant not in cfg.variants:
            raise ConfigError(f"methods.{name}.variant is {variant!r}; the variants are {', '.join(cfg.variants)}")
        owned = [k for k in spec if k in OWNED_TRAIN_KEYS]
        if owned:
            raise ConfigError(f"methods.{name}.{owned[0]} is set by the sweep (seeds: the seeds key; the model: "
                              "policy)")
        out[name] = {"loss": loss, "selection": selection, "variant": variant if selection != "none" else None,
                     "train": {k: v for k, v in spec.items() if k not in METHOD_KEYS}}
    owned = [k for k in cfg.train if k in OWNED_TRAIN_KEYS]
    if owned:
        raise ConfigError(f"train.{owned[0]} is set by the sweep; use the top-level keys instead")
    owned = [k for k in cfg.eval if k in OWNED_EVAL_KEYS]
    if owned:
        raise ConfigError(f"eval.{owned[0]} is set by the sweep; use the top-level keys instead")
    return out


def plan(cfg: SweepConfig, out: Path, *, num_eval_prompts: int | None = None) -> Plan:
    """Every variant and point, each config built and validated (nothing runs). ``num_eval_prompts`` is known
    once the held-out split exists; before, a placeholder stands in."""
    from sepo.core.objectives import is_reference_free
    from sepo.stages.pipeline import _build, stage_configs
    from sepo.stages.train import TrainConfig

    specs = _method_specs(cfg)
    randomised = {m["variant"] for m in specs.values() if m["selection"] == "random"}
    variants = expand_variants(cfg, out, randomised)
    for v in variants.values():
        try:
            stage_configs(v.pipeline, v.folder)
        except ConfigError as e:
            raise ConfigError(f"variants.{v.settings['configured']}: {e}") from None
    base = base_pipeline(cfg, out)
    stage_configs(base, out / "base")
    _, policy = _starting_models(cfg, out, base)
    data_key = fingerprint(_data_settings(cfg))
    train_dir, eval_dir = str(out / "base" / "data" / "train"), str(out / "base" / "data" / "eval")
    reward = cfg.reward
    if reward is None and cfg.task is not None:
        from sepo.tasks import get_task

        reward = get_task(cfg.task).gold_reward
    eval_fixed = {"max_new_tokens": cfg.max_new_tokens} if cfg.task else {}
    eval_fixed["num_prompts"] = num_eval_prompts or 1
    eval_fixed.update({k: v for k, v in cfg.eval.items() if v is not None or k != "num_prompts"})

    def eval_config(model: str, folder: Path, seed: int, metric: str, name: str):
        return _build("evaluate", "EvalConfig", {
            "model": model, "reference": policy, "data": eval_dir, "reward": reward, "output": str(folder / "eval"),
            "accuracy_metric": metric, "seed": seed, "generator_name": name, "overwrite": True,
            "vocabulary_data": train_dir}, ("data_options", {"data_options": to_dict(cfg.data_options)}),
            ("eval", eval_fixed), where="eval")

    points_dir = out / "points"
    ref_eval = eval_config(policy, points_dir / "reference", cfg.seeds[0], "logprob", "reference")
    points = [Point(id="reference", method="reference", loss=None, selection="none", variant=None, strength={},
                    strength_label="", seed=cfg.seeds[0], key=fingerprint(data_key, to_dict(ref_eval), __version__),
                    train=None, eval=ref_eval, keep_policy=cfg.keep_policies)]
    shared_fixed, shared_axes = split_axes(cfg.train, TrainConfig, "train")
    for name, m in specs.items():
        own_fixed, own_axes = split_axes(m["train"], TrainConfig, f"methods.{name}")
        axes = {**{k: v for k, v in shared_axes.items() if k not in own_fixed}, **own_axes}
        shared = {k: v for k, v in shared_fixed.items() if k not in axes and k not in own_fixed}
        own = [v for v in variants.values() if v.settings["configured"] == m["variant"]] if m["variant"] else [None]
        for variant in own:
            curve = name if variant is None or not variant.settings["axes"] else \
                f"{name}[{axis_label(variant.settings['axes'])}]"
            data = {"oracle": lambda v: str(v.folder / "selected"), "random": lambda v: str(v.folder / "selected-random"),
                    "none": lambda v: train_dir}[m["selection"]](variant)
            for values in _grid(axes):
                label = axis_label(values) or "default"
                for seed in cfg.seeds:
                    folder = points_dir / _folder_name(curve) / _folder_name(label) / f"seed-{seed}"
                    train_cfg = _build("train", "TrainConfig", {
                        "model": policy, "data": data, "loss": m["loss"], "output": str(folder / "policy"),
                        "seed": seed}, ("train", shared), (f"methods.{name}", {**own_fixed, **values}),
                        where=f"methods.{name}")
                    metric = "logprob" if is_reference_free(m["loss"]) else "implicit"
                    eval_cfg = eval_config(str(folder / "policy"), folder, seed, metric, curve)
                    key = fingerprint(data_key, variant.settings if variant else None, to_dict(train_cfg),
                                      to_dict(eval_cfg), __version__)
                    strength = {k: getattr(train_cfg, k) for k in values}
                    points.append(Point(id=f"{curve}/{label}/seed-{seed}", method=curve, loss=m["loss"],
                                        selection=m["selection"], variant=variant.name if variant else None,
                                        strength=strength, strength_label=axis_label(strength) or "default",
                                        seed=seed, key=key, train=train_cfg, eval=eval_cfg,
                                        keep_policy=cfg.keep_policies))
    curves = list(dict.fromkeys(p.method for p in points[1:]))
    for contrast in expand_contrasts(cfg.contrasts, curves):
        unknown = [m for m in parse_contrast(contrast) if m not in curves]
        if unknown:
            raise ConfigError(f"contrasts: {unknown[0]!r} is not a method of this sweep (its curves: "
                              f"{', '.join(sorted(curves))})")
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError("two points get the same name; give the methods names that differ after "
                          f"{_folder_name('x')!r}-style sanitising ({sorted({i for i in ids if ids.count(i) > 1})[0]})")
    # the order points run in: seed by seed, so that a sweep stopped half-way holds whole seeds
    order = {s: i for i, s in enumerate(cfg.seeds)}
    points[1:] = sorted(points[1:], key=lambda p: order[p.seed])
    return Plan(out, base, policy, variants, points, data_key)


# --------------------------------------------------------------------------- run


def parse_contrast(text: str) -> tuple[str, str]:
    """'sepo - dpo' -> ('sepo', 'dpo')."""
    parts = [t.strip() for t in str(text).split(" - ")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"contrasts: {text!r} must read 'A - B' (two method names, ' - ' between them)")
    return parts[0], parts[1]


def expand_contrasts(texts: list[str], curves: list[str]) -> list[str]:
    """The contrasts as written, with '* - B' (or 'A - *') standing for one contrast per other curve -- every
    method against a baseline -- in the sweep's order, without repeats."""
    out = []
    for text in texts:
        a, b = parse_contrast(text)
        if a == "*" and b == "*":
            raise ConfigError(f"contrasts: {text!r}: at most one side may be '*'")
        if a == "*":
            out += [f"{m} - {b}" for m in curves if m != b]
        elif b == "*":
            out += [f"{a} - {m}" for m in curves if m != a]
        else:
            out.append(f"{a} - {b}")
    return list(dict.fromkeys(out))


def resolved_threads(cfg: SweepConfig) -> int:
    if cfg.threads is not None:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.jobs)


@dataclass
class SweepResult:
    out: Path
    plan: Plan
    rows: list[dict]
    summary: dict
    markdown: str
    seconds: float


def run(cfg: SweepConfig) -> SweepResult:
    result = execute(cfg)
    print(result.markdown)
    return result


@owns_output()
def execute(cfg: SweepConfig) -> SweepResult:
    """The sweep without printing its summary (``sepo demo`` prints its own)."""
    import torch

    from sepo.stages import sweep_jobs, sweep_report

    out = Path(cfg.output)
    plan(cfg, out)  # every config validated before anything runs
    threads = resolved_threads(cfg)
    threads_before = torch.get_num_threads()
    started = time.time()
    _check_same_sweep(cfg, out)
    torch.set_num_threads(threads)
    try:
        num_eval_prompts = _prepare_base(cfg, out)
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves global state as it was
    full = plan(cfg, out, num_eval_prompts=num_eval_prompts)
    sweep_jobs.run_jobs(full, cfg.jobs, threads)
    rows = _collect(full)
    summary = sweep_report.write(cfg, full, rows, seconds=time.time() - started)
    return SweepResult(out, full, rows, summary, summary["markdown"], round(time.time() - started, 1))


def _check_same_sweep(cfg: SweepConfig, out: Path) -> None:
    """An output folder holds one sweep's data: points of another data or model setup would be compared with
    stale ones (the shared stages' markers key on settings, not on the content of the data they copy)."""
    path = out / "sweep_data.json"
    settings = json.loads(json.dumps(_data_settings(cfg)))
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in set(before) | set(settings) if before.get(k) != settings.get(k)]
        if changed:
            raise ConfigError(f"{out} holds a sweep made from other data or models (changed: {', '.join(sorted(changed))}); "
                              "choose another output folder, or delete this one to start again")
    else:
        atomic_write_json(path, settings)


# --------------------------------------------------------------------------- phase 1: data and the starting models


def _prepare_base(cfg: SweepConfig, out: Path) -> int:
    """The task's pairs (or the data read), the held-out split and the SFT, in this process: everything else
    depends on them. -> the number of held-out prompts every point generates for."""
    from sepo.io import load_dataset_dir
    from sepo.stages import pipeline

    if cfg.task is not None:
        _generate_task_pairs(cfg, out)
    pipeline.run(base_pipeline(cfg, out))
    eval_pairs, _ = load_dataset_dir(out / "base" / "data" / "eval", ("prompt",))
    return cfg.eval.get("num_prompts") or len(set(eval_pairs["prompt"]))


def _generate_task_pairs(cfg: SweepConfig, out: Path) -> None:
    """task/train and task/eval: pairs of two samples of the policy per prompt, labelled by the task's gold reward."""
    from sepo.stages.pipeline import StageRunner
    from sepo.tasks import get_task

    task = get_task(cfg.task)
    sampler = cfg.policy or cfg.reference
    options = {**task.options, **cfg.task_options}
    settings = {"task": cfg.task, "options": options, "oracle_options": task.oracle_options,
                "num_prompts": cfg.num_prompts, "eval_prompts": cfg.eval_prompts, "max_new_tokens": cfg.max_new_tokens,
                "label_noise": cfg.label_noise, "seed": cfg.seed, "sampler": sampler}
    # (split, prompts, seed, options): with oracle_options the oracles train on other pairs of the same prompts
    # (noisy_chosen: without the junk) and select on the task's own -- out-of-distribution selection
    splits = [("train", slice(0, cfg.num_prompts), cfg.seed, options),
              ("eval", slice(cfg.num_prompts, None), cfg.seed + 1, options)]
    if task.oracle_options is not None:
        splits.append(("oracle", slice(0, cfg.num_prompts), cfg.seed, {**options, **task.oracle_options}))

    def generate():
        from sepo.io import save_dataset
        from sepo.models import load_causal_lm, load_tokenizer, tokenizer_fingerprint

        tok = load_tokenizer(sampler)
        model = load_causal_lm(sampler, trainable=False)
        prompts = task.prompts(cfg.num_prompts + cfg.eval_prompts, cfg.seed)
        meta = {"stage": "task", "sepo_version": __version__, "source": f"sepo.tasks:{cfg.task}", "tokenizer": sampler,
                "tokenizer_fingerprint": tokenizer_fingerprint(tok), "config": settings}
        for name, part, seed, split_options in splits:
            log.info("task %s: %d %s prompts from %s", cfg.task, len(prompts[part]), name, sampler)
            pairs = task.make_pairs(model, tok, prompts[part], max_new_tokens=cfg.max_new_tokens,
                                    label_noise=cfg.label_noise, seed=seed, **split_options)
            if len(pairs) < 2:
                raise SepoError(f"task {cfg.task} made {len(pairs)} {name} pair(s) from {len(prompts[part])} prompts; "
                                f"raise {'eval_prompts' if name == 'eval' else 'num_prompts'}")
            save_dataset(pairs, out / "task" / name, {**meta, "num_rows": len(pairs)}, overwrite=True)

    StageRunner(out, rerun=[])("task", out / "task", settings, generate)


# --------------------------------------------------------------------------- phase 3: rows


def _collect(plan_: Plan) -> list[dict]:
    """Every point's row (in plan order) into sweep.jsonl."""
    rows = [json.loads(p.result_path.read_text(encoding="utf-8")) for p in plan_.points]
    atomic_write_text(plan_.out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_generations(eval_dir: Path) -> list[dict]:
    path = eval_dir / "generations.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def points_with_data(rows: list[dict], plan_: Plan) -> list[tuple[dict, list[dict]]]:
    """Each finished point's row with its per-prompt generations (reward and KL per prompt)."""
    by_id = {p.id: p for p in plan_.points}
    return [(r, read_generations(Path(by_id[r["id"]].eval.output))) for r in rows if r.get("status") == "ok"]
