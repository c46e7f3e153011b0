"""`r2former train global|rerank|finetune|dense`: train R2Former models (single process or torchrun DDP)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..device import DEVICE_CHOICES
from ..errors import CliError

log = logging.getLogger("r2former.train")

# Per-stage defaults (the official recipes, R2FORMER.md section 4). A value given on the command line wins.
STAGE_DEFAULTS = {
    "global": dict(optimizer="adam", lr=1e-5, weight_decay=0.0, schedule="constant", warmup_epochs=0.0, negs=2,
                   batch_size=16),
    "rerank": dict(optimizer="adamw", lr=5e-4, weight_decay=0.03, schedule="cosine", warmup_epochs=5.0, negs=1,
                   batch_size=64),
    "finetune": dict(optimizer="adamw", lr=1e-5, weight_decay=0.03, schedule="cosine", warmup_epochs=0.0, negs=2,
                     batch_size=48),
    # Ours (not in the paper): from-scratch pre-training on pixel-aligned synthetic pairs.
    "dense": dict(optimizer="adamw", lr=2e-4, weight_decay=0.05, schedule="cosine", warmup_epochs=0.5, negs=1,
                  batch_size=16),
}
DEFAULT_CACHE = os.environ.get("R2FORMER_CACHE", str(Path.home() / ".cache" / "r2former_ros"))

EPILOG = """\
stages:
  global    triplet margin loss (m=0.1) on the global descriptors, partial mining (best positive within
            --pos-radius, negatives the nearest in descriptor space beyond --soft-radius)
  rerank    backbone frozen; local_head + reranker trained with cross-entropy on (query, positive)=1 and
            (query, negative)=0, negatives drawn from each query's --rerank-top hardest global neighbours
  finetune  both losses, all parameters (--end-to-end: reranker gradient also through the local tokens)
  dense     ours, for training from scratch on synthetic worlds: --batch-size pairs of one pose under two
            conditions (the map drives), the second shifted by up to --dense-shift patches; every patch token's
            local feature must find its counterpart and every pair's global descriptors each other (InfoNCE);
            backbone + local_head learn. Run it before `rerank` (docs/TRAINING.md)

data specs (--data / --val):
  synthetic:SEEDS[:CONDITIONS]  procedural worlds, e.g. synthetic:100-139 or synthetic:900,901:night,fog,rain
                                (rendered once into --cache-dir)
  vg:ROOT                       VG-benchmark layout ROOT/images/{train,val,test}/{database,queries}/
  msls:ROOT                     Mapillary SLS ROOT/train_val/<city>/{database,query}/ (+ postprocessed.csv)

distributed:
  torchrun --nproc_per_node=N -m r2former_core.cli.main train global ...   (gloo on CPU, NCCL on CUDA);
  --batch-size is per process; only rank 0 validates, logs and writes files.

outputs in --out: last.safetensors, best.safetensors (best validation recall@5), train_state.{json,safetensors}
(resume), metrics.csv, curves.png, tb/ (TensorBoard), train.log, train_config.json
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model: global retrieval, reranker, or joint fine-tuning",
                       description="Train R2Former on synthetic worlds, a VG-benchmark dataset or MSLS. Runs as one "
                                   "process or under torchrun (DDP).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["global", "rerank", "finetune", "dense"], help="what to train (see below)")
    p.add_argument("--data", required=True, help="training data spec (see below)")
    p.add_argument("--out", required=True, help="run directory (created; holds checkpoints, metrics and logs)")
    p.add_argument("--val", default=None,
                   help="validation data spec; for vg:/msls: the val split of that root (default: the val split of a "
                        "vg:/msls: --data; none for synthetic, then best.safetensors is the last epoch)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="initial weights (any file `load_model` reads: a run's best.safetensors, DeiT ImageNet "
                        "weights, the official checkpoint). Default: random initialisation from --preset (from scratch)")
    g.add_argument("--preset", default="r2former_tiny",
                   help="model configuration preset when starting from scratch: r2former_tiny (default), "
                        "r2former_demo (the packaged demo model's configuration: 128x160, 6 blocks, conv stem, "
                        "instance normalisation) or r2former_deits (the released DeiT-S configuration)")
    g.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the preset, e.g. --config depth=6 --config image_size=128,160 "
                        "(repeatable; only without --model)")
    g.add_argument("--end-to-end", action="store_true",
                   help="finetune: let the reranker's gradient reach the backbone through the local tokens "
                        "(official finetune=1); default: local tokens detached")
    g.add_argument("--global-loss", choices=["triplet", "infonce"], default="triplet",
                   help="global/finetune: triplet margin loss (m=0.1, the paper; default) or InfoNCE (temperature "
                        "0.07) over every database image of the batch (positives of the other queries too, except "
                        "those within --soft-radius); InfoNCE trains a model from scratch where the triplet loss "
                        "collapses all descriptors to one point")
    g.add_argument("--reranker-init", choices=["keep", "xavier", "xavier_reranker"], default="keep",
                   help="keep the given local_head/reranker weights (default), or re-initialise their linear layers "
                        "with Xavier-uniform before training (xavier: local_head and reranker; xavier_reranker: the "
                        "reranker only, keeping a local_head trained by the dense stage): a freshly initialised "
                        "reranker then starts learning much sooner than with the ViT-style std-0.02 init")
    g.add_argument("--augment", choices=["none", "photometric"], default="none",
                   help="global/finetune: random lighting changes of every training image (brightness, colour gain, "
                        "gamma, grey, fog-like blend, noise; geometry untouched) so the descriptor learns that a place "
                        "at dusk, in fog or in snow is the same place (default none: the paper's images as they are)")
    g.add_argument("--dense-shift", type=int, default=3,
                   help="dense: the second view of a pair is shifted by up to this many whole patches sideways (and "
                        "one up or down), so a token must be found by its content, not its position (default 3)")
    g.add_argument("--dense-global-weight", type=float, default=1.0,
                   help="dense: weight of the pairs' global-descriptor InfoNCE next to the token loss (default 1)")
    g = p.add_argument_group("optimisation (defaults per stage: the official recipes)")
    g.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    g.add_argument("--steps-per-epoch", type=int, default=100, help="optimizer steps per epoch (default 100)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="queries (dense: pairs) per step and process (default: global 16, rerank 64, finetune 48, dense 16)")
    g.add_argument("--negs", type=int, default=None, help="negatives per query (default: global 2, rerank 1, finetune 2)")
    g.add_argument("--optimizer", choices=["adam", "adamw"], default=None,
                   help="default: global adam, rerank/finetune adamw")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: global 1e-5, rerank 5e-4, "
                                                         "finetune 1e-5)")
    g.add_argument("--weight-decay", type=float, default=None, help="default: 0 (global), 0.03 (rerank, finetune)")
    g.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                   help="learning-rate schedule over all epochs (default: global constant, others cosine)")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up (factor 0.1 -> 1) in epochs (default: rerank 5, others 0)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (default 0: off)")
    g.add_argument("--seed", type=int, default=0, help="random seed (initialisation, mining, sampling; default 0)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.safetensors + train_state.* (same stage; --model, --preset "
                        "and --config are then ignored; --epochs may be raised)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after this many validations without improvement (default 0: never)")
    g = p.add_argument_group("mining")
    g.add_argument("--refresh-steps", type=int, default=50,
                   help="global/finetune: mine new triplets every this many steps (default 50)")
    g.add_argument("--db-sample", type=int, default=1000,
                   help="global/finetune: random database images searched for negatives per refresh (default 1000)")
    g.add_argument("--neg-pool", type=int, default=0,
                   help="global/finetune: draw each query's negatives at random among its this many nearest valid "
                        "candidates instead of taking the nearest (default 0: the nearest, as the paper); softer "
                        "negatives keep a model trained from scratch from collapsing")
    g.add_argument("--mining-groups", type=int, default=0,
                   help="global/finetune, synthetic data: per refresh, mine within this many random worlds (all their "
                        "database images are the negative pool) instead of --db-sample random database images; cheaper "
                        "and harder negatives (default 0: the official uniform sampling)")
    g.add_argument("--rerank-top", type=int, default=100,
                   help="rerank: negatives drawn from each query's this many hardest global neighbours (default 100)")
    g.add_argument("--pos-radius", type=float, default=10.0,
                   help="metres: database images this close are positives (default 10)")
    g.add_argument("--soft-radius", type=float, default=25.0,
                   help="metres: database images this close are never negatives (default 25)")
    g = p.add_argument_group("validation")
    g.add_argument("--val-threshold", type=float, default=25.0, help="recall distance threshold, metres (default 25)")
    g.add_argument("--val-rerank-top", type=int, default=20,
                   help="rerank/finetune: candidates reranked per validation query (default 20; the paper uses 100)")
    g.add_argument("--val-max-queries", type=int, default=300,
                   help="validate on at most this many queries, evenly spread (default 300)")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default 1; always the last)")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help=f"where synthetic drives are rendered once (default $R2FORMER_CACHE or {DEFAULT_CACHE})")
    g.add_argument("--render-size", default=None, metavar="H,W",
                   help="rendered image size (default: the model's input size)")
    g.add_argument("--spacing", type=float, default=2.5, help="metres between frames of a drive (default 2.5)")
    g.add_argument("--map-drives", type=int, default=2, help="database drives per training world (default 2)")
    g.add_argument("--query-drives", type=int, default=2, help="query drives per training world (default 2)")
    g.add_argument("--val-map-drives", type=int, default=1, help="database drives per validation world (default 1)")
    g.add_argument("--val-query-drives", type=int, default=2, help="query drives per validation world (default 2)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="auto (CUDA when available), cpu or cuda (default auto); under torchrun each rank uses "
                        "cuda:LOCAL_RANK")
    g.add_argument("--no-amp", action="store_true", help="disable fp16 autocast on CUDA")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (default 0: torch's choice divided by the local world size)")
    g.add_argument("--extract-batch", type=int, default=32, help="images per batch when computing descriptors")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=run)
    return p


def _parse_size(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    if len(parts) != 2:
        raise ValueError(f"expected H,W, got {text!r}")
    return parts[0], parts[1]


def _model_config(args):
    from ..model import ModelConfig, preset
    import dataclasses
    base = dataclasses.asdict(preset(args.preset))
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for item in args.config:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise CliError(f"--config {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        current = base[key]
        if isinstance(current, bool):
            base[key] = value.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(current, tuple):
            base[key] = _parse_size(value)
        else:
            base[key] = type(current)(value)
    return ModelConfig.from_dict(base)


def _add_file_log(path: Path) -> logging.Handler:
    from ..logging_setup import _TextFormatter
    handler = logging.FileHandler(path)
    handler.setFormatter(_TextFormatter())
    logging.getLogger().addHandler(handler)
    return handler


def run(args) -> int:
    import torch

    from ..device import resolve_device
    from ..model import build_model, load_model
    from ..train.datasets import open_dataset
    from ..train.distributed import barrier, init_distributed, shutdown
    from ..train.trainer import TrainConfig, Trainer

    info = init_distributed(resolve_device(args.device))
    out = Path(args.out)
    handler = None
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        elif local_world > 1 and info.device.type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            handler = _add_file_log(out / "train.log")
            if not args.resume and (out / "last.safetensors").exists():
                raise CliError(f"{out} already holds a run (last.safetensors); pass --resume to continue it or "
                               "choose another --out")
        barrier(info)

        if args.resume and (out / "last.safetensors").is_file():
            model = load_model(out / "last.safetensors", device="cpu")   # weights replaced again by the trainer
        elif args.model:
            if args.config:
                raise CliError("--config applies to a model built from scratch; it cannot change --model's config")
            from ..resources import resolve_model_path
            model = load_model(resolve_model_path(args.model), device="cpu")
        else:
            model = build_model(_model_config(args), seed=args.seed)
        cfg_model = model.cfg
        size = _parse_size(args.render_size) if args.render_size else cfg_model.image_size

        def open_sets():
            data = open_dataset(args.data, "train", args.cache_dir, size, args.spacing, args.map_drives,
                                args.query_drives, show_progress=info.is_main and not args.no_progress)
            val = None
            val_spec = args.val
            if val_spec is None and not args.data.startswith("synthetic:"):
                val_spec = args.data
            if val_spec:
                val = open_dataset(val_spec, "val", args.cache_dir, size, args.spacing, args.val_map_drives,
                                   args.val_query_drives, show_progress=info.is_main and not args.no_progress)
            return data, val

        # Rank 0 renders synthetic drives into the cache first; the others then read them.
        if info.is_main:
            data, val = open_sets()
        barrier(info)
        if not info.is_main:
            data, val = open_sets()

        d = STAGE_DEFAULTS[args.stage]
        pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
        cfg = TrainConfig(stage=args.stage, out=out, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                          batch_size=pick("batch_size"), negs=pick("negs"), optimizer=pick("optimizer"),
                          lr=pick("lr"), weight_decay=pick("weight_decay"), warmup_epochs=pick("warmup_epochs"),
                          schedule=pick("schedule"), grad_clip=args.grad_clip, refresh_steps=args.refresh_steps,
                          db_sample=args.db_sample, mining_groups=args.mining_groups, neg_pool=args.neg_pool, rerank_top=args.rerank_top, pos_radius=args.pos_radius,
                          soft_radius=args.soft_radius, end_to_end=args.end_to_end, reranker_init=args.reranker_init, global_loss=args.global_loss,
                          augment=args.augment, dense_shift=args.dense_shift,
                          dense_global_weight=args.dense_global_weight,
                          val_threshold_m=args.val_threshold, val_rerank_top=args.val_rerank_top,
                          val_max_queries=args.val_max_queries, val_every=args.val_every, patience=args.patience,
                          seed=args.seed, amp=not args.no_amp, extract_batch=args.extract_batch,
                          progress=not args.no_progress)
        if info.is_main:
            log.info("model config %s; data %s; validation %s", cfg_model.to_json(), data.name,
                     val.name if val else "none")
        trainer = Trainer(cfg, model, data, val, info, resume=args.resume)
        result = trainer.train()
        if info.is_main:
            log.info("done: %d epochs, %d steps; best selection recall@5 %.4f at epoch %d -> %s", result.epochs_done,
                     result.global_step, result.best_score, result.best_epoch, result.best_path)
        return 0
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        shutdown(info)
