"""`r2former train global|rerank|finetune|dense`: train R2Former models (single process or torchrun DDP).

Every option is built from the fields of `TrainConfig` and `RunOptions` (r2former_core/train/config.py):
their flag, help, choices, range and default, per stage where the stage decides (`STAGES`). An option not
given keeps the stage's default. `r2former train STAGE --help` shows that stage's defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CliError
from ..train.config import (
    GROUPS,
    STAGES,
    OptionField,
    RunOptions,
    TrainConfig,
    option_fields,
)

log = logging.getLogger("r2former.train")

EPILOG = """\
data specs (--data / --val):
  synthetic:SEEDS[:CONDITIONS]  procedural worlds, e.g. synthetic:100-139 or synthetic:900,901:night,fog,rain
                                (rendered once into --cache-dir)
  vg:ROOT                       VG-benchmark layout ROOT/images/{train,val,test}/{database,queries}/
  msls:ROOT                     Mapillary SLS ROOT/train_val/<city>/{database,query}/ (+ postprocessed.csv)

distributed:
  torchrun --nproc_per_node=N -m r2former_core.cli.main train global ...   (gloo on CPU, NCCL on CUDA: one
  GPU per process, rank r on cuda:LOCAL_RANK); --batch-size is per process; only rank 0 validates, logs and
  writes files.

outputs in --out: last.safetensors, best.safetensors (best validation recall@5), train_state.{json,safetensors}
(resume: optimizer and gradient-scaler state), metrics.csv, curves.png, tb/ (TensorBoard), train.log,
train_config.json
"""


def _stages_text(only: str | None = None) -> str:
    lines = ["stages:"]
    for spec in STAGES.values():
        if only is None or spec.name == only:
            lines.append(textwrap.fill(spec.summary, 110, initial_indent=f"  {spec.name:<9} ",
                                       subsequent_indent=" " * 12, break_on_hyphens=False))
    return "\n".join(lines)


def _default_text(of: OptionField, stage: str | None) -> str:
    if of.kind is bool or of.required or of.default in (None, ()) and not of.per_stage:
        return ""
    if of.per_stage and stage is not None:
        return f" (default for {stage}: {of.default_for(stage)})"
    if of.per_stage:
        return " (default: " + ", ".join(f"{s} {of.default_for(s)}" for s in STAGES) + ")"
    return f" (default {of.default})"


def _help(of: OptionField, stage: str | None) -> str:
    """The option's help with its default: for `stage`, or for every stage when None."""
    if stage is None:
        return of.option.help + _default_text(of, None) + (f" [{', '.join(of.stages)}]" if of.stages else "")
    if not of.applies_to(stage):
        return f"{of.option.help} [not used by {stage}; {', '.join(of.stages)} only]"
    return of.option.help + _default_text(of, stage)


def _value_type(of: OptionField) -> Callable[[str], Any]:
    """argparse `type=`: the value parsed and checked against the field's Option (one-line usage error)."""
    def parse(text: str) -> Any:
        try:
            value = of.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if of.kind is int else ''} "
                                             f"{'number' if of.kind is float else of.kind.__name__}") from None
        reason = of.option.problem(value, value)
        if reason:
            raise argparse.ArgumentTypeError(reason)
        return value
    return parse


class _StageHelp(argparse.Action):
    """-h/--help: after a stage (`r2former train dense --help`) every option shows that stage's default
    and whether the stage uses it; before one, the defaults of every stage."""

    def __init__(self, option_strings: list[str], dest: str, actions: dict[str, tuple[OptionField, argparse.Action]],
                 **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.actions = actions

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        stage = getattr(namespace, "stage", None)
        if stage in STAGES:
            for of, action in self.actions.values():
                action.help = _help(of, stage)
            parser.epilog = _stages_text(stage) + "\n\n" + EPILOG
        parser.print_help()
        parser.exit()


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model: global retrieval, reranker, joint fine-tuning, dense pre-training",
                       description="Train R2Former on synthetic worlds, a VG-benchmark dataset or MSLS. Runs as one "
                                   "process or under torchrun (DDP). Options not given take the stage's defaults; "
                                   "`r2former train STAGE --help` lists them for that stage.",
                       usage="%(prog)s {" + ",".join(STAGES) + "} --data SPEC --out DIR [options]",
                       epilog=_stages_text() + "\n\n" + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       add_help=False)
    actions: dict[str, tuple[OptionField, argparse.Action]] = {}
    p.add_argument("-h", "--help", action=_StageHelp, actions=actions,
                   help="show this help (after STAGE: with that stage's defaults) and exit")
    p.add_argument("stage", choices=list(STAGES), help="what to train (see below)")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups["data"].add_argument("--out", required=True,
                                help="run directory (created; holds checkpoints, metrics and logs)")
    for cls in (RunOptions, TrainConfig):
        for of in option_fields(cls):
            actions[of.name] = (of, _add_option(groups[of.group], of))
    p.set_defaults(func=run)
    return p


def _add_option(group: Any, of: OptionField) -> argparse.Action:
    """Every option defaults to None ("not given"): the config dataclass then supplies its default."""
    kwargs: dict[str, Any] = {"dest": of.name, "default": None, "help": _help(of, None)}
    if of.kind is bool:
        kwargs["action"] = "store_false" if of.default is True else "store_true"
        kwargs["default"] = None
    else:
        if of.option.choices:
            kwargs["choices"] = of.option.choices
        else:
            kwargs["type"] = _value_type(of)
        if of.repeat:
            kwargs["action"] = "append"
        if not of.option.choices:
            kwargs["metavar"] = of.metavar or of.flag.lstrip("-").upper().replace("-", "_")
    if of.required:
        kwargs["required"] = True
    return group.add_argument(of.flag, **kwargs)


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, RunOptions, list[str]]:
    """TrainConfig and RunOptions from the options given (the others keep their defaults), and the names of
    the given options the stage does not use. ConfigError for values that are not allowed together."""
    given: dict[type, dict[str, Any]] = {TrainConfig: {}, RunOptions: {}}
    unused = []
    for cls in given:
        for of in option_fields(cls):
            value = getattr(args, of.name, None)
            if value is None:
                continue
            given[cls][of.name] = tuple(value) if of.repeat else value
            if not of.applies_to(args.stage):
                unused.append(of.flag)
    cfg = TrainConfig(stage=args.stage, out=Path(args.out), **given[TrainConfig])
    return cfg, RunOptions(**given[RunOptions]), unused


def _model_config(run: RunOptions) -> Any:
    """The preset with the --config KEY=VALUE overrides."""
    from ..model import ModelConfig, preset
    base = dataclasses.asdict(preset(run.preset))
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for item in run.config:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise CliError(f"--config {item!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        base[key] = _config_value(key, value.strip(), base[key])
    return ModelConfig.from_dict(base)


def _config_value(key: str, text: str, current: Any) -> Any:
    """`text` as the type of the preset's value `current` (CliError when it is not one)."""
    if isinstance(current, bool):
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise CliError(f"--config {key}={text}: expected true or false")
        return text.lower() in ("1", "true", "yes", "on")
    parts = text.replace("x", ",").split(",") if isinstance(current, tuple) else [text]
    kind = type(current[0]) if isinstance(current, tuple) else type(current)
    if isinstance(current, tuple) and len(parts) != len(current):
        raise CliError(f"--config {key}={text}: expected {len(current)} comma-separated values")
    try:
        values = [kind(v) for v in parts]
    except ValueError:
        raise CliError(f"--config {key}={text}: expected {kind.__name__} value(s), like {current!r}") from None
    return tuple(values) if isinstance(current, tuple) else values[0]


def _add_file_log(path: Path) -> logging.Handler:
    from ..logging_setup import _TextFormatter
    handler = logging.FileHandler(path)
    handler.setFormatter(_TextFormatter())
    logging.getLogger().addHandler(handler)
    return handler


def run(args: argparse.Namespace) -> int:
    import torch

    from ..model import build_model, load_model
    from ..resources import resolve_model_path
    from ..train.datasets import open_dataset
    from ..train.distributed import barrier, init_distributed, shutdown
    from ..train.trainer import Trainer

    cfg, run_opts, unused = configs_from_args(args)
    out = cfg.out
    last = out / "last.safetensors"
    if run_opts.resume and not last.is_file():
        raise CliError(f"--resume: {out} holds no run to continue (no last.safetensors)")
    if not run_opts.resume and last.exists():
        raise CliError(f"{out} already holds a run (last.safetensors); pass --resume to continue it or choose "
                       "another --out")
    if run_opts.model and run_opts.config and not run_opts.resume:
        raise CliError("--config applies to a model built from scratch; it cannot change --model's config")
    info = init_distributed(run_opts.device)
    handler = None
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if run_opts.threads > 0:
            torch.set_num_threads(run_opts.threads)
        elif local_world > 1 and info.device.type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            handler = _add_file_log(out / "train.log")
            for flag in unused:
                log.warning("%s does not apply to stage %s: ignored", flag, cfg.stage)
        barrier(info)

        if run_opts.resume:
            model = load_model(last, device="cpu")   # weights replaced again by the trainer
        elif run_opts.model:
            model = load_model(resolve_model_path(run_opts.model), device="cpu")
        else:
            model = build_model(_model_config(run_opts), seed=cfg.seed)
        size = run_opts.render_hw or model.cfg.image_size
        show = info.is_main and cfg.progress

        def open_sets() -> tuple[Any, Any]:
            data = open_dataset(run_opts.data, "train", run_opts.cache_dir, size, run_opts.spacing,
                                run_opts.map_drives, run_opts.query_drives, show_progress=show)
            val_spec = run_opts.val_spec()
            val = None
            if val_spec:
                val = open_dataset(val_spec, "val", run_opts.cache_dir, size, run_opts.spacing,
                                   run_opts.val_map_drives, run_opts.val_query_drives, show_progress=show)
            return data, val

        # Rank 0 renders synthetic drives into the cache first; the others then read them.
        if info.is_main:
            data, val = open_sets()
        barrier(info)
        if not info.is_main:
            data, val = open_sets()
        if info.is_main:
            log.info("model config %s; data %s; validation %s", model.cfg.to_json(), data.name,
                     val.name if val else "none")
        result = Trainer(cfg, model, data, val, info, resume=run_opts.resume).train()
        if info.is_main:
            log.info("done: %d epochs, %d steps; best selection recall@5 %.4f at epoch %d -> %s", result.epochs_done,
                     result.global_step, result.best_score, result.best_epoch, result.best_path)
        return 0
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        shutdown(info)
