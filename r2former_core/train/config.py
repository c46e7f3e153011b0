"""Training settings, defined once, and the training stages as data.

* `TrainConfig`: what the trainer does (optimisation, mining, losses, validation). Options whose
  default depends on the stage (the official recipes) default to None here and take their value from
  the stage's `StageSpec.defaults` when not given.
* `RunOptions`: what a run trains on and where (data specs, initial model, device, threads).
* `STAGES`: one `StageSpec` per stage: its defaults, the batch source that feeds it, its loss terms,
  which parameters stay frozen. `r2former_core.train.stages` turns those names into code.

Every field carries an `Option` (help, choices, range; `r2former_core.options`) and its place on
the command line (`flag`, `group`, the stages that use it). `r2former train` builds every option from
these fields (`r2former_core.cli.train`), so a flag, its default and its allowed values cannot drift
from what the trainer checks. Bad values raise `ConfigError`.

This module imports nothing heavy (no torch or numpy): `r2former train --help` stays fast.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from ..options import DEVICE_PATTERN, Option

POS_RADIUS_M = 10.0      # database images this close to a query are positives (the paper)
SOFT_RADIUS_M = 25.0     # ... and this close never negatives
DEFAULT_CACHE = os.environ.get("R2FORMER_CACHE", str(Path.home() / ".cache" / "r2former_ros"))
SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[,x]\s*(\d+)\s*$")

# Command-line groups, in the order `--help` shows them.
GROUPS = {
    "data": "data",
    "model": "model",
    "optimisation": "optimisation (defaults per stage: the official recipes)",
    "mining": "mining",
    "validation": "validation",
    "synthetic": "synthetic data",
    "runtime": "runtime",
}


@dataclass(frozen=True)
class StageSpec:
    """One training stage as data. `batches` and `losses` name entries of
    `r2former_core.train.stages.BATCH_SOURCES` / `LOSS_TERMS`."""
    name: str
    summary: str                          # what it trains and how (for --help)
    defaults: Mapping[str, Any]           # values of the stage-dependent options
    batches: str                          # the batch source that feeds every step
    losses: tuple[str, ...]               # loss terms, summed
    frozen: tuple[str, ...] = ()          # parameter-name prefixes that do not learn
    eval_modules: tuple[str, ...] = ()    # submodules kept in eval mode while training (frozen ones)

    @property
    def reranks(self) -> bool:
        """Whether the stage trains the reranker: validation then selects by reranked recall."""
        return "rerank" in self.losses


def _stage(name: str, summary: str, defaults: dict[str, Any], **kwargs: Any) -> StageSpec:
    return StageSpec(name, summary, MappingProxyType(defaults), **kwargs)


STAGES: Mapping[str, StageSpec] = MappingProxyType({s.name: s for s in (
    _stage("global",
           "triplet margin loss (m=0.1) on the global descriptors, partial mining (best positive within "
           "--pos-radius, negatives the nearest in descriptor space beyond --soft-radius); local_head and "
           "reranker frozen",
           dict(optimizer="adam", lr=1e-5, weight_decay=0.0, schedule="constant", warmup_epochs=0.0, negs=2,
                batch_size=16),
           batches="triplets", losses=("global",), frozen=("local_head", "reranker")),
    _stage("rerank",
           "backbone frozen (eval mode); local_head + reranker trained with cross-entropy on (query, positive)=1 "
           "and (query, negative)=0, negatives drawn from each query's --rerank-top hardest global neighbours",
           dict(optimizer="adamw", lr=5e-4, weight_decay=0.03, schedule="cosine", warmup_epochs=5.0, negs=1,
                batch_size=64),
           batches="rerank_pairs", losses=("rerank",), frozen=("backbone", "reranker.ratio"),
           eval_modules=("backbone",)),
    _stage("finetune",
           "both losses, all parameters, partial mining (--end-to-end: the reranker's gradient also reaches "
           "the backbone through the local tokens)",
           dict(optimizer="adamw", lr=1e-5, weight_decay=0.03, schedule="cosine", warmup_epochs=0.0, negs=2,
                batch_size=48),
           batches="triplets", losses=("global", "rerank")),
    # Ours (not in the paper): from-scratch pre-training on pixel-aligned synthetic pairs.
    _stage("dense",
           "ours, for training from scratch on synthetic worlds: --batch-size pairs of one pose under two "
           "conditions (the map drives), the second shifted by up to --dense-shift patches; every patch token's "
           "local feature must find its counterpart and every pair's global descriptors each other (InfoNCE); "
           "backbone + local_head learn, the reranker stays. Run it before `rerank` (docs/TRAINING.md)",
           dict(optimizer="adamw", lr=2e-4, weight_decay=0.05, schedule="cosine", warmup_epochs=0.5, negs=1,
                batch_size=16),
           batches="aligned_pairs", losses=("dense",), frozen=("reranker",)),
)})

QUERY_STAGES = ("global", "rerank", "finetune")   # stages that learn from queries with positives
MINING_STAGES = ("global", "finetune")            # stages with partial triplet mining


def stage_spec(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise ConfigError(f"unknown training stage {name!r}; choose one of {', '.join(STAGES)}") from None


# ------------------------------------------------------------------------------------ fields
def train_option(default: Any, help: str, *, group: str, flag: str = "", stages: tuple[str, ...] = (),  # noqa: A002
                 choices: tuple[str, ...] = (), min: float | None = None, max: float | None = None,  # noqa: A002
                 pattern: str = "", pattern_help: str = "", repeat: bool = False, metavar: str = "") -> Any:
    """A dataclass field with an `Option` and its command line: `flag` (default --field-name), `group`
    (a key of GROUPS), `stages` (the stages that read it; empty = all), `repeat` (a tuple, one value per
    occurrence), `metavar`. `default` MISSING: required; None in TrainConfig for a `STAGES` default."""
    if group not in GROUPS:
        raise ConfigError(f"unknown option group {group!r}")
    metadata = {"option": Option(help, tuple(choices), min, max, pattern, pattern_help), "group": group,
                "flag": flag, "stages": tuple(stages), "repeat": repeat, "metavar": metavar}
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionField:
    """A field of TrainConfig or RunOptions as the command line sees it."""
    name: str
    option: Option
    default: Any              # MISSING when required; None in TrainConfig when the stage decides
    kind: type                # bool, int, float, str (the type of its values)
    group: str
    flag: str
    stages: tuple[str, ...]
    repeat: bool
    metavar: str

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def per_stage(self) -> bool:
        """Its default comes from the stage (STAGES[stage].defaults)."""
        return self.default is None and all(self.name in s.defaults for s in STAGES.values())

    def default_for(self, stage: str) -> Any:
        return STAGES[stage].defaults[self.name] if self.per_stage else self.default

    def applies_to(self, stage: str) -> bool:
        return not self.stages or stage in self.stages


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}


def option_fields(cls: type) -> Iterator[OptionField]:
    """The fields of a config dataclass that carry an Option, in declaration order."""
    for f in fields(cls):
        if "option" not in f.metadata:
            continue
        meta = f.metadata
        yield OptionField(f.name, meta["option"], _field_default(f), _kind(f), meta["group"],
                          meta["flag"] or "--" + f.name.replace("_", "-"), meta["stages"], meta["repeat"],
                          meta["metavar"])


def _field_default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _kind(f: Field[Any]) -> type:
    """The value type from the annotation (a string under `from __future__ import annotations`)."""
    text = str(f.type)
    for name, kind in _KINDS.items():
        if re.match(rf"^(tuple\[)?{name}\b", text):
            return kind
    raise ConfigError(f"option {f.name}: unsupported type {text}")


def check_fields(obj: Any) -> None:
    """ConfigError naming the first field whose value has the wrong type or is not allowed."""
    for of in option_fields(type(obj)):
        value = getattr(obj, of.name)
        if value is None and (of.default is None or of.per_stage):
            continue
        if of.repeat and not isinstance(value, (tuple, list)):
            raise ConfigError(f"{of.name}: expected a tuple of values, not {value!r}")
        for item in (value if of.repeat else (value,)):
            _check_value(of, item)


def _check_value(of: OptionField, value: Any) -> None:
    kind = of.kind
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, kind))
    if not ok:
        raise ConfigError(f"{of.name}: {value!r} is not a{'n' if kind is int else ''} {kind.__name__}")
    reason = of.option.problem(value, value)
    if reason:
        raise ConfigError(f"{of.name}: {reason}")


# ------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class TrainConfig:
    """What the trainer does. Stage-dependent options left at None take the stage's default."""
    stage: str
    out: Path
    # model and losses
    end_to_end: bool = train_option(
        False, "let the reranker's gradient reach the backbone through the local tokens (official finetune=1); "
        "default: local tokens detached", group="model", stages=("finetune",))
    global_loss: str = train_option(
        "triplet", "triplet margin loss (m=0.1, the paper) or InfoNCE (temperature 0.07) over every database "
        "image of the batch (positives of the other queries too, except those within --soft-radius); InfoNCE "
        "trains a model from scratch where the triplet loss collapses all descriptors to one point",
        group="model", choices=("triplet", "infonce"), stages=MINING_STAGES)
    reranker_init: str = train_option(
        "keep", "keep the given local_head/reranker weights, or re-initialise their linear layers with "
        "Xavier-uniform before training (xavier: local_head and reranker; xavier_reranker: the reranker only, "
        "keeping a local_head trained by the dense stage): a fresh reranker then starts learning much sooner "
        "than with the ViT-style std-0.02 init", group="model", choices=("keep", "xavier", "xavier_reranker"))
    augment: str = train_option(
        "none", "random lighting changes of every training image (brightness, colour gain, gamma, grey, "
        "fog-like blend, noise; geometry untouched) so the descriptor learns that a place at dusk, in fog or in "
        "snow is the same place (none: the paper's images as they are)", group="model",
        choices=("none", "photometric"), stages=MINING_STAGES)
    dense_shift: int = train_option(
        3, "the second view of a pair is shifted by up to this many whole patches sideways (and one up or "
        "down), so a token must be found by its content, not its position", group="model", min=0,
        stages=("dense",))
    dense_global_weight: float = train_option(
        1.0, "weight of the pairs' global-descriptor InfoNCE next to the token loss", group="model", min=0.0,
        stages=("dense",))
    # optimisation
    epochs: int = train_option(10, "epochs", group="optimisation", min=1)
    steps_per_epoch: int = train_option(100, "optimizer steps per epoch", group="optimisation", min=1)
    batch_size: int = train_option(None, "queries (dense: image pairs) per step and process",
                                   group="optimisation", min=1)
    negs: int = train_option(None, "negatives per query", group="optimisation", min=1, stages=QUERY_STAGES)
    optimizer: str = train_option(None, "optimizer", group="optimisation", choices=("adam", "adamw"))
    lr: float = train_option(None, "learning rate", group="optimisation", min=0.0)
    weight_decay: float = train_option(None, "weight decay", group="optimisation", min=0.0)
    schedule: str = train_option(None, "learning-rate schedule over all epochs", group="optimisation",
                                 choices=("constant", "cosine"))
    warmup_epochs: float = train_option(None, "linear warm-up (factor 0.1 -> 1), in epochs", group="optimisation",
                                        min=0.0)
    grad_clip: float = train_option(0.0, "clip the gradient norm to this (0: off)", group="optimisation", min=0.0)
    seed: int = train_option(0, "random seed (initialisation, mining, sampling)", group="optimisation", min=0)
    patience: int = train_option(0, "stop after this many validations without improvement (0: never)",
                                 group="optimisation", min=0)
    # mining
    refresh_steps: int = train_option(50, "mine new triplets every this many steps", group="mining", min=1,
                                      stages=MINING_STAGES)
    db_sample: int = train_option(1000, "random database images searched for negatives per refresh",
                                  group="mining", min=1, stages=MINING_STAGES)
    neg_pool: int = train_option(
        0, "draw each query's negatives at random among its this many nearest valid candidates instead of taking "
        "the nearest (0: the nearest, as the paper); softer negatives keep a model trained from scratch from "
        "collapsing", group="mining", min=0, stages=MINING_STAGES)
    mining_groups: int = train_option(
        0, "synthetic data: per refresh (dense: per step), mine within this many random worlds (all their database "
        "images are the negative pool) instead of --db-sample random database images; cheaper and harder "
        "negatives (0: the official uniform sampling)", group="mining", min=0, stages=(*MINING_STAGES, "dense"))
    rerank_top: int = train_option(100, "negatives drawn from each query's this many hardest global neighbours",
                                   group="mining", min=1, stages=("rerank",))
    pos_radius: float = train_option(POS_RADIUS_M, "metres: database images this close are positives",
                                     group="mining", min=0.0, stages=QUERY_STAGES)
    soft_radius: float = train_option(SOFT_RADIUS_M, "metres: database images this close are never negatives",
                                      group="mining", min=0.0, stages=QUERY_STAGES)
    # validation
    val_threshold_m: float = train_option(25.0, "recall distance threshold, metres", group="validation", min=0.0,
                                          flag="--val-threshold")
    val_rerank_top: int = train_option(20, "candidates reranked per validation query (the paper uses 100)",
                                       group="validation", min=1, stages=("rerank", "finetune"))
    val_max_queries: int = train_option(300, "validate on at most this many queries, evenly spread",
                                        group="validation", min=1)
    val_every: int = train_option(1, "validate every N epochs (and always after the last)", group="validation",
                                  min=1)
    # runtime
    amp: bool = train_option(True, "disable fp16 autocast and gradient scaling on CUDA (ignored on the CPU)",
                             group="runtime", flag="--no-amp")
    extract_batch: int = train_option(32, "images per batch when computing descriptors (mining, validation)",
                                      group="runtime", min=1)
    progress: bool = train_option(True, "no tqdm progress bars", group="runtime", flag="--no-progress")

    def __post_init__(self) -> None:
        spec = stage_spec(self.stage)
        for name, value in spec.defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "out", Path(self.out))
        check_fields(self)
        if self.soft_radius < self.pos_radius:
            raise ConfigError(f"soft_radius ({self.soft_radius:g} m) must not be smaller than pos_radius "
                              f"({self.pos_radius:g} m)")

    @property
    def spec(self) -> StageSpec:
        return STAGES[self.stage]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What a run trains on and where (the command line's other options)."""
    data: str = train_option(MISSING, "training data spec (see below)", group="data")
    val: str | None = train_option(
        None, "validation data spec; for vg:/msls: the val split of that root (default: the val split of a "
        "vg:/msls: --data; none for synthetic, then best.safetensors is the last epoch)", group="data")
    model: str | None = train_option(
        None, "initial weights (any file `load_model` reads: a run's best.safetensors, DeiT ImageNet weights, the "
        "official checkpoint); default: random initialisation from --preset (from scratch)", group="model")
    preset: str = train_option(
        "r2former_tiny", "model configuration preset when starting from scratch: r2former_tiny, r2former_demo "
        "(the packaged demo model's configuration: 128x160, 6 blocks, conv stem, instance normalisation) or "
        "r2former_deits (the released DeiT-S configuration)", group="model")
    config: tuple[str, ...] = train_option(
        (), "override a field of the preset, e.g. --config depth=6 --config image_size=128,160 (repeatable; only "
        "without --model)", group="model", repeat=True, metavar="KEY=VALUE")
    resume: bool = train_option(
        False, "continue the run in --out from last.safetensors + train_state.* (same stage; --model, --preset and "
        "--config are then ignored; --epochs may be raised)", group="optimisation")
    cache_dir: str = train_option(DEFAULT_CACHE, "where synthetic drives are rendered once ($R2FORMER_CACHE)",
                                  group="synthetic")
    render_size: str | None = train_option(None, "rendered image size (default: the model's input size)",
                                           group="synthetic", pattern=SIZE_PATTERN.pattern, pattern_help="H,W",
                                           metavar="H,W")
    spacing: float = train_option(2.5, "metres between frames of a drive", group="synthetic", min=0.01)
    map_drives: int = train_option(2, "database drives per training world", group="synthetic", min=1)
    query_drives: int = train_option(2, "query drives per training world", group="synthetic", min=1)
    val_map_drives: int = train_option(1, "database drives per validation world", group="synthetic", min=1)
    val_query_drives: int = train_option(2, "query drives per validation world", group="synthetic", min=1)
    device: str = train_option(
        "auto", "auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each rank uses cuda:LOCAL_RANK",
        group="runtime", pattern=DEVICE_PATTERN.pattern, pattern_help="auto, cpu, cuda or cuda:N")
    threads: int = train_option(0, "torch CPU threads per process (0: torch's choice divided by the local world "
                                "size)", group="runtime", min=0)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def render_hw(self) -> tuple[int, int] | None:
        """--render-size as (H, W)."""
        if self.render_size is None:
            return None
        m = SIZE_PATTERN.match(self.render_size)
        assert m is not None    # checked in __post_init__
        return int(m.group(1)), int(m.group(2))

    def val_spec(self) -> str | None:
        """The validation spec: --val, else the val split of a vg:/msls: --data."""
        if self.val is not None:
            return self.val or None
        return None if self.data.startswith("synthetic:") else self.data


__all__ = ["DEFAULT_CACHE", "GROUPS", "OptionField", "POS_RADIUS_M", "RunOptions", "SOFT_RADIUS_M", "STAGES",
           "StageSpec", "TrainConfig", "check_fields", "option_fields", "stage_spec", "train_option"]
