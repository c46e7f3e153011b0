"""The training loop, the same for every stage: a batch from the stage's source, its loss terms, an
optimizer step; per epoch validation, checkpoints, metrics.csv, TensorBoard and curves.

What a stage trains and how is data (`config.STAGES`) turned into code by `stages.build_stage`:
the loop has no stage branches. One code path for 1 or N processes (torchrun): every rank mines the
same triplets from the same seeded samples (descriptors are computed shard-wise and gathered) and
trains on its own share; gradients are averaged by DDP; only rank 0 validates, logs and saves.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import CheckpointError
from ..model import R2FormerModel, load_model, save_model
from .batches import Batch
from .checkpointing import (
    load_training_state,
    read_training_scalars,
    save_training_state,
)
from .config import TrainConfig
from .datasets import PlaceDataset
from .distributed import DistInfo, all_reduce_mean, barrier, broadcast_object
from .plots import plot_curves
from .stages import build_stage
from .validation import ValResult, validate

log = logging.getLogger(__name__)

METRIC_FIELDS = ["epoch", "step", "lr", "loss", "triplet_loss", "infonce_loss", "rerank_loss", "dense_loss",
                 "val_R@1", "val_R@5", "val_R@10", "val_rerank_R@1", "val_rerank_R@5", "val_rerank_R@10",
                 "selection", "seconds"]

# The largest gradient-scaler scale whose first fp16 backward pass had no inf/nan, measured for the four
# losses (triplet, InfoNCE, rerank CE, dense; batch 16) with fp16 autocast on the CPU for the tiny test model,
# a freshly initialised r2former_demo and the packaged demo model (docs/TRAINING.md section 6.1): worst
# case 2**13 (the packaged model's rerank CE, the tiny model's dense loss). torch's default initial scale,
# 2**16, overflowed in 4 of the 12 cases: their first optimizer step was skipped, so Adam's step count
# lagged the global step, and every --resume started at 2**16 again.
MEASURED_SAFE_SCALE = 2.0 ** 13
GRAD_SCALE_HEADROOM = 8.0    # three powers of two below it: room for larger models, batches and other data


def initial_grad_scale(safe_scale: float = MEASURED_SAFE_SCALE, headroom: float = GRAD_SCALE_HEADROOM) -> float:
    """The initial scale of the fp16 gradient scaler: the largest power of two at most safe_scale / headroom
    (2**10 with the defaults). The scaler doubles it after every 2000 steps without overflow, so a low start
    costs nothing later, while an overflowing start skips optimizer steps."""
    return 2.0 ** math.floor(math.log2(safe_scale / headroom))


@dataclass
class TrainResult:
    epochs_done: int
    global_step: int
    best_score: float
    best_epoch: int
    best_path: Path | None
    last_path: Path
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: TrainConfig, model: R2FormerModel, data: PlaceDataset, val: PlaceDataset | None,
                 dist_info: DistInfo, resume: bool = False):
        self.cfg = cfg
        self.info = dist_info
        self.data = data
        self.val = val
        self.out = Path(cfg.out)
        self.device = dist_info.device
        self.model = model.to(self.device)
        self.stage = build_stage(cfg, self.model, data, dist_info)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        # Mining and validation run through model.extract/rerank: fp16 with AMP on CUDA, exact fp32 otherwise.
        self.model.set_precision("fp16" if self.use_amp else "fp32")
        self.scaler = torch.amp.GradScaler("cuda", init_scale=initial_grad_scale(), enabled=self.use_amp)
        net: torch.nn.Module = self.stage.net
        if dist_info.enabled:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                          find_unused_parameters=True)
        self.net = net
        self.epoch = 0
        self.global_step = 0
        self.best_score = -1.0
        self.best_epoch = -1
        self.not_improved = 0
        self.history: list[dict] = []
        if resume:
            self._resume()

    def _resume(self) -> None:
        last = self.out / "last.safetensors"
        if not last.is_file():
            raise CheckpointError(f"--resume: {last} does not exist (nothing to resume in {self.out})")
        scalars = read_training_scalars(self.out)
        if scalars.get("stage") != self.cfg.stage:
            raise CheckpointError(f"--resume: {self.out} holds a {scalars.get('stage')!r} run, not "
                                  f"{self.cfg.stage!r}; resume it with that stage or choose another --out")
        saved = load_model(last)
        if saved.cfg != self.model.cfg:
            raise CheckpointError(f"--resume: {last} has another model configuration than this run")
        self.model.load_state_dict(saved.state_dict())
        scalars = load_training_state(self.out, self.optimizer, self.param_names, self.scaler)
        self.epoch = int(scalars["epoch"])
        self.global_step = int(scalars["global_step"])
        self.best_score = float(scalars["best_score"])
        self.best_epoch = int(scalars["best_epoch"])
        self.not_improved = int(scalars.get("not_improved", 0))
        if self.info.is_main:
            log.info("resumed %s at epoch %d, step %d (best selection %.4f at epoch %d)", self.out, self.epoch,
                     self.global_step, self.best_score, self.best_epoch)

    # -------------------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        total = cfg.epochs * cfg.steps_per_epoch
        warm = cfg.warmup_epochs * cfg.steps_per_epoch
        factor = 1.0
        if warm > 0 and step < warm:
            factor = 0.1 + 0.9 * step / warm
        if cfg.schedule == "cosine":
            factor *= 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return cfg.lr * factor

    # ------------------------------------------------------------------------ step
    def _step(self, batch: Batch) -> dict[str, float]:
        lr = self.lr_at(self.global_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.stage.set_train_mode()          # mining and validation extract in eval mode
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else contextlib.nullcontext()
        with autocast:
            loss, parts = self.net(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        out = {"loss": float(loss.detach()), "lr": lr}
        out.update({k: float(v.detach()) for k, v in parts.items()})
        return out

    # ------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        cfg, info, source = self.cfg, self.info, self.stage.source
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            log.info("training stage %s: world size %d, device %s, %d database images, %d queries, "
                     "%d trainable tensors", cfg.stage, info.world_size, self.device, len(self.data.database),
                     len(self.data.queries), len(self.param_names))
        writer = self._tensorboard() if info.is_main else None
        source.prepare()
        best_path = self.out / "best.safetensors"
        values: dict[str, float] = {}
        try:
            for epoch in range(self.epoch, cfg.epochs):
                self.epoch = epoch
                t0 = time.time()
                sums: dict[str, float] = {}
                source.start_epoch(epoch)
                bar = tqdm(range(cfg.steps_per_epoch), desc=f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}", unit="step",
                           disable=None if cfg.progress and info.is_main else True)
                for step in bar:
                    values = self._step(source.next_batch(step, self.global_step))
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                    if writer is not None:
                        for k, v in values.items():
                            writer.add_scalar(f"train/{k}", v, self.global_step)
                bar.close()
                row: dict[str, Any] = {k: all_reduce_mean(info, v / cfg.steps_per_epoch) for k, v in sums.items()}
                row.update(epoch=epoch + 1, step=self.global_step, lr=values["lr"])
                stop = bool(broadcast_object(info, self._end_epoch(row, t0, writer, best_path)))
                if stop:
                    if info.is_main:
                        log.info("no improvement for %d epochs: stopping early", cfg.patience)
                    break
        finally:
            if writer is not None:
                writer.close()
        barrier(info)
        if info.enabled:
            # Every rank reports its weights: under DDP they must be identical (checked by the tests).
            log.info("rank %d final model fingerprint %s", info.rank, self.model.fingerprint)
        return TrainResult(self.epoch + 1, self.global_step, self.best_score, self.best_epoch,
                           best_path if best_path.is_file() else None, self.out / "last.safetensors", self.history)

    def _end_epoch(self, row: dict[str, Any], t0: float, writer: Any, best_path: Path) -> bool:
        """Validate, save and log on rank 0; returns whether to stop early."""
        cfg, info = self.cfg, self.info
        stop = False
        if info.is_main:
            epoch = row["epoch"]
            val: ValResult | None = None
            score = None
            if self.val is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
                val = validate(self.model, self.val, rerank=self.stage.spec.reranks, threshold_m=cfg.val_threshold_m,
                               rerank_top=cfg.val_rerank_top, max_queries=cfg.val_max_queries,
                               batch=cfg.extract_batch, progress=cfg.progress)
                for n, v in val.global_recall.items():
                    row[f"val_R@{n}"] = v
                for n, v in (val.rerank_recall or {}).items():
                    row[f"val_rerank_R@{n}"] = v
                score = val.selection
                row["selection"] = score
            row["seconds"] = time.time() - t0
            self.history.append(row)
            extra = {"stage": cfg.stage, "epoch": str(epoch), "global_step": str(self.global_step)}
            save_model(self.model, self.out / "last.safetensors", extra=extra)
            improved = False
            if score is not None and score > self.best_score:
                self.best_score, self.best_epoch, self.not_improved, improved = score, epoch, 0, True
                save_model(self.model, best_path, extra={**extra, "selection_recall@5": str(score)})
            elif score is None and self.val is None:
                save_model(self.model, best_path, extra=extra)   # no validation: the latest is the best we know
                self.best_epoch = epoch
            elif score is not None:
                self.not_improved += 1
                stop = cfg.patience > 0 and self.not_improved >= cfg.patience
            save_training_state(self.out, self.optimizer, self.param_names, {
                "stage": cfg.stage, "epoch": epoch, "global_step": self.global_step, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "not_improved": self.not_improved}, self.scaler)
            self._write_metrics(row, writer)
            msg = " ".join(f"{k}={row[k]:.4g}" for k in METRIC_FIELDS if k in row and k not in ("epoch", "step"))
            log.info("epoch %d/%d step %d: %s%s", epoch, cfg.epochs, self.global_step, msg,
                     " (best)" if improved else "")
        barrier(info)
        return stop

    # ----------------------------------------------------------------------- logging
    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a run must not need it
            log.warning("tensorboard is not installed: no TensorBoard logs")
            return None
        return SummaryWriter(log_dir=str(self.out / "tb"), purge_step=self.global_step or None)

    def _write_metrics(self, row: dict[str, Any], writer: Any) -> None:
        path = self.out / "metrics.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        if writer is not None:
            for k in METRIC_FIELDS[3:]:
                if k in row and k != "seconds":
                    writer.add_scalar(("val/" if k.startswith("val") or k == "selection" else "epoch/") + k, row[k],
                                      self.global_step)
            writer.flush()
        try:
            plot_curves(path, self.out / "curves.png")
        except Exception as exc:  # noqa: BLE001 - a plot must never stop a training run
            log.warning("could not plot %s: %s", path, exc)


