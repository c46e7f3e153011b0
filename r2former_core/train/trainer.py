"""The training loop of the three stages (global retrieval, reranker, joint fine-tuning).

* `global`: triplet margin loss on the global descriptors, partial mining refreshed every
  `refresh_steps` steps; every parameter the global descriptor depends on is trained.
* `rerank`: the backbone is frozen (eval mode); `local_head` and the reranker learn to classify
  (query, positive) = 1 and (query, negative) = 0, negatives drawn at random from each query's
  100 hardest global neighbours (computed once, soft positives excluded).
* `finetune`: both losses, all parameters, partial mining; `end_to_end` lets the reranker's
  gradient reach the backbone through the local tokens (the official `finetune=1`).
* `dense` (ours, for training from scratch on synthetic worlds): pairs of pixel-aligned images of one
  pose under two conditions, the second shifted by whole patches; every patch token's local feature
  must find its counterpart (token InfoNCE) and every pair's global descriptors must find each other
  among the batch's (InfoNCE). Backbone and `local_head` learn; the reranker is untouched.

One code path for 1 or N processes (torchrun): every rank mines the same triplets from the same
seeded samples (descriptors are computed shard-wise and gathered) and trains on its own share;
gradients are averaged by DDP; only rank 0 validates, logs and saves.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..features import images_to_tensor
from ..model import R2FormerModel, save_model
from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD
from .checkpointing import load_training_state, save_training_state
from .datasets import ImageList, PlaceDataset, extract_descriptors
from .distributed import DistInfo, all_reduce_mean, barrier, gather_rows
from .losses import dense_correspondence_loss, infonce_loss, rerank_loss, triplet_loss
from .mining import POS_RADIUS_M, SOFT_RADIUS_M, Triplet, hardest_negatives, neighbours_within, select_triplets
from .validation import ValResult, validate

log = logging.getLogger(__name__)

STAGES = ("global", "rerank", "finetune", "dense")
RERANKER_INITS = ("keep", "xavier", "xavier_reranker")
METRIC_FIELDS = ["epoch", "step", "lr", "loss", "triplet_loss", "infonce_loss", "rerank_loss", "dense_loss", "val_R@1", "val_R@5", "val_R@10",
                 "val_rerank_R@1", "val_rerank_R@5", "val_rerank_R@10", "selection", "seconds"]


@dataclass
class TrainConfig:
    stage: str
    out: Path
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 8                 # queries per step and process
    negs: int = 2                       # negatives per query
    optimizer: str = "adamw"            # adam | adamw
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0          # linear warm-up, factor 0.1 -> 1
    schedule: str = "constant"          # constant | cosine
    grad_clip: float = 0.0              # 0 = off
    refresh_steps: int = 50             # partial mining: new triplets every this many steps
    db_sample: int = 1000               # partial mining: random database images per refresh
    neg_pool: int = 0                   # >negs: negatives drawn at random among this many nearest
    mining_groups: int = 0              # >0: per refresh, mine within this many random groups (worlds)
    rerank_top: int = 100               # rerank stage: negatives from this many hardest
    pos_radius: float = POS_RADIUS_M
    soft_radius: float = SOFT_RADIUS_M
    end_to_end: bool = False            # finetune: reranker gradient into the backbone
    global_loss: str = "triplet"        # triplet (the paper) | infonce (in-batch negatives, from scratch)
    reranker_init: str = "keep"         # keep | xavier (local_head + reranker linears) | xavier_reranker (reranker only)
    augment: str = "none"               # none | photometric: random lighting/colour/fog/noise on training images
    dense_shift: int = 3                # dense: the second view is shifted by up to this many patches sideways
    dense_global_weight: float = 1.0    # dense: weight of the pairs' global InfoNCE next to the token loss
    val_threshold_m: float = 25.0
    val_rerank_top: int = 20
    val_max_queries: int = 300
    val_every: int = 1                  # epochs
    patience: int = 0                   # epochs without improvement before stopping; 0 = never
    seed: int = 0
    amp: bool = True                    # fp16 autocast + grad scaling on CUDA (ignored on CPU)
    extract_batch: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {self.stage!r}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "refresh_steps", "db_sample", "rerank_top"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.negs < 1:
            raise ValueError("negs must be at least 1")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, not {self.optimizer!r}")
        if self.global_loss not in ("triplet", "infonce"):
            raise ValueError(f"global_loss must be triplet or infonce, not {self.global_loss!r}")
        if self.reranker_init not in RERANKER_INITS:
            raise ValueError(f"reranker_init must be one of {RERANKER_INITS}, not {self.reranker_init!r}")
        if self.augment not in ("none", "photometric"):
            raise ValueError(f"augment must be none or photometric, not {self.augment!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, not {self.schedule!r}")
        if self.dense_shift < 0 or self.dense_global_weight < 0:
            raise ValueError("dense_shift and dense_global_weight must not be negative")
        if self.soft_radius < self.pos_radius:
            raise ValueError("soft_radius must not be smaller than pos_radius")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class TrainResult:
    epochs_done: int
    global_step: int
    best_score: float
    best_epoch: int
    best_path: Path | None
    last_path: Path
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------- nets
class _TrainNet(nn.Module):
    """What DDP wraps: images of B groups [query, positive, negatives...] -> (loss, parts)."""

    def __init__(self, model: R2FormerModel, stage: str, global_loss: str = "triplet",
                 dense_global_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.stage = stage
        self.global_loss = global_loss
        self.dense_global_weight = dense_global_weight

    def forward(self, images: torch.Tensor, group: int, valid: torch.Tensor | None = None,
                shift: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`valid` (B, B*(group-1)): for InfoNCE, which of the batch's database images may be negatives
        of each query (besides its own positive). `shift` (rows, cols): dense stage, the patch shift of
        the second half of `images` relative to the first."""
        if self.stage == "dense":
            return self._dense(images, shift)
        feats = self.model.forward_features(images)
        b = images.shape[0] // group
        parts: dict[str, torch.Tensor] = {}
        loss = images.new_zeros(())
        if self.stage in ("global", "finetune"):
            g = feats.global_desc.float().view(b, group, -1)
            if self.global_loss == "infonce":
                cands = g[:, 1:].reshape(b * (group - 1), -1)
                target = torch.arange(b, device=images.device) * (group - 1)
                parts["infonce_loss"] = infonce_loss(g[:, 0], cands, target, valid)
                loss = loss + parts["infonce_loss"]
            else:
                parts["triplet_loss"] = triplet_loss(g[:, 0], g[:, 1], g[:, 2:])
                loss = loss + parts["triplet_loss"]
        if self.stage in ("rerank", "finetune"):
            g = feats.global_desc.view(b, group, -1)
            loc = feats.local.view(b, group, *feats.local.shape[1:])
            k = group - 1
            xg = g[:, :1].expand(-1, k, -1).reshape(b * k, -1)
            xl = loc[:, :1].expand(-1, k, -1, -1).reshape(b * k, *loc.shape[2:])
            yg = g[:, 1:].reshape(b * k, -1)
            yl = loc[:, 1:].reshape(b * k, *loc.shape[2:])
            labels = torch.zeros(b, k, dtype=torch.long, device=images.device)
            labels[:, 0] = 1
            out = self.model.reranker(xg, xl, yg, yl)
            parts["rerank_loss"] = rerank_loss(out.logits, labels.reshape(-1))
            loss = loss + parts["rerank_loss"]
        return loss, parts

    def _dense(self, images: torch.Tensor, shift: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = self.model
        p = images.shape[0] // 2
        out = model.backbone(images)
        gh, gw = out.grid
        tokens = model.local_head(out.tokens[:, 2:])              # every patch token (not only the selected)
        tokens = torch.nn.functional.normalize(tokens.float(), dim=-1)
        dy, dx = shift
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        keep = ((rows + dy >= 0) & (rows + dy < gh) & (cols + dx >= 0) & (cols + dx < gw)).reshape(-1)
        src = torch.arange(gh * gw)[keep].to(images.device)
        dst = ((rows + dy) * gw + (cols + dx)).reshape(-1)[keep].to(images.device)
        parts = {"dense_loss": dense_correspondence_loss(tokens[:p], tokens[p:], src, dst)}
        g = model.global_descriptor(out.global_tokens).float()
        target = torch.arange(p, device=images.device)
        parts["infonce_loss"] = 0.5 * (infonce_loss(g[:p], g[p:], target) + infonce_loss(g[p:], g[:p], target))
        loss = parts["dense_loss"] + self.dense_global_weight * parts["infonce_loss"]
        return loss, parts


def photometric_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random lighting changes of ImageNet-normalised images (B, 3, H, W), one draw per image.

    In [0, 1] RGB: brightness x0.3-1.3, per-channel gain x0.8-1.2, gamma e^U(-0.5, 0.5), grey with p 0.2,
    a fog-like blend towards a grey level with p 0.3 (weight <= 0.6), Gaussian noise (sigma <= 0.05).
    Geometry is untouched (positions stay valid). Teaches the global descriptor that a place seen at
    another time of day or weather is the same place.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    n = x.shape[0]

    def u(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=generator).to(x.device) * (hi - lo) + lo

    y = (x * std + mean).clamp(0, 1)
    y = (y * u(n, 1, 1, 1, lo=0.3, hi=1.3) * u(n, 3, 1, 1, lo=0.8, hi=1.2)).clamp(0, 1)
    y = y.clamp_min(1e-6) ** torch.exp(u(n, 1, 1, 1, lo=-0.5, hi=0.5))
    grey = (u(n, 1, 1, 1) < 0.2).to(y.dtype)
    y = grey * y.mean(1, keepdim=True).expand_as(y) + (1 - grey) * y
    fog = u(n, 1, 1, 1, hi=0.6) * (u(n, 1, 1, 1) < 0.3).to(y.dtype)
    y = y * (1 - fog) + fog * u(n, 1, 1, 1, lo=0.5, hi=0.9)
    noise = torch.randn(y.shape, generator=generator).to(x.device) * u(n, 1, 1, 1, hi=0.05)
    y = (y + noise).clamp(0, 1)
    return (y - mean) / std


def reinit_reranker_xavier(model: R2FormerModel, local_head: bool = True) -> None:
    """Xavier-uniform weights (zero biases) for every linear layer of the reranker (and of `local_head`
    unless `local_head` is False: keep a local head the `dense` stage trained).

    Why: with the ViT-style init (truncated normal, std 0.02) every residual branch of the reranker starts
    near zero, so its class-token outputs barely depend on the pairs and a fresh reranker needs many
    epochs before the cross-entropy moves (the official recipe trains 50 epochs). With Xavier weights a
    fresh reranker starts learning within tens of steps, which matters for short CPU trainings.
    """
    for module in [*([model.local_head] if local_head else []), *model.reranker.modules()]:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------- trainer
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
        self.model.detach_local = not (cfg.stage == "finetune" and cfg.end_to_end)
        if cfg.reranker_init != "keep":
            reinit_reranker_xavier(self.model, local_head=cfg.reranker_init == "xavier")
        self._configure_trainable()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        net = _TrainNet(self.model, cfg.stage, cfg.global_loss, cfg.dense_global_weight)
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                      find_unused_parameters=True)
        self.net = net
        self.epoch = 0
        self.global_step = 0
        self.best_score = -1.0
        self.best_epoch = -1
        self.not_improved = 0
        self.history: list[dict] = []
        # Positions -> positives, once.
        self.hard_pos = neighbours_within(data.database.xy, data.queries.xy, cfg.pos_radius)
        self.soft_pos = neighbours_within(data.database.xy, data.queries.xy, cfg.soft_radius)
        self.trainable_queries = np.array([i for i, h in enumerate(self.hard_pos) if len(h)], np.int64)
        if cfg.stage == "dense" and (data.aligned is None or data.aligned.ndim != 2 or data.aligned.shape[1] < 2
                                     or len(data.aligned) < cfg.batch_size):
            raise ValueError(f"{data.name}: the dense stage needs at least {cfg.batch_size} poses seen by two or more "
                             "pixel-aligned database images (synthetic worlds with --map-drives >= 2); this dataset "
                             "has none")
        if len(self.trainable_queries) == 0:
            raise ValueError(f"{data.name}: no query has a database image within {cfg.pos_radius} m")
        self._triplets: list[Triplet] = []
        self._aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist_info.rank)
        self._hardest: np.ndarray | None = None
        self._best_pos: np.ndarray | None = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------------ set-up
    def _configure_trainable(self) -> None:
        m = self.model
        for p in m.parameters():
            p.requires_grad_(True)
        m.reranker.decoder_pos_embed.requires_grad_(False)   # unused by the forward pass
        if self.cfg.stage == "global":
            for p in list(m.local_head.parameters()) + list(m.reranker.parameters()):
                p.requires_grad_(False)
        elif self.cfg.stage == "dense":
            for p in m.reranker.parameters():
                p.requires_grad_(False)
        elif self.cfg.stage == "rerank":
            for p in m.backbone.parameters():
                p.requires_grad_(False)
            m.reranker.ratio.requires_grad_(False)            # never in a loss (see R2FORMER.md 4)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.stage == "rerank":
            self.model.backbone.eval()

    def _resume(self) -> None:
        from ..model import load_model
        last = self.out / "last.safetensors"
        if not last.is_file():
            raise FileNotFoundError(f"--resume: {last} does not exist (nothing to resume in {self.out})")
        saved = load_model(last)
        if saved.cfg != self.model.cfg:
            raise ValueError(f"--resume: {last} has another model configuration than this run")
        self.model.load_state_dict(saved.state_dict())
        scalars = load_training_state(self.out, self.optimizer, self.param_names)
        if scalars.get("stage") != self.cfg.stage:
            raise ValueError(f"--resume: {self.out} holds a {scalars.get('stage')!r} run, not {self.cfg.stage!r}")
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

    # ---------------------------------------------------------------------- mining
    def _shard_descriptors(self, images: ImageList, ids: np.ndarray, desc: str) -> np.ndarray:
        """Descriptors of `ids`, each rank computing every W-th, gathered on every rank."""
        mine = ids[self.info.rank::self.info.world_size]
        rows = extract_descriptors(self.model, images, mine, self.cfg.extract_batch,
                                   progress=self.cfg.progress and self.info.is_main, desc=desc)
        return gather_rows(self.info, rows, len(ids))

    def _mine_partial(self, refresh: int, attempt: int = 0) -> None:
        cfg, info = self.cfg, self.info
        rng = np.random.default_rng([cfg.seed, self.epoch, refresh, 17])
        wanted = int(math.ceil(cfg.refresh_steps * cfg.batch_size * info.world_size * 1.1))
        n_db = len(self.data.database)
        if cfg.mining_groups > 0 and self.data.db_groups is not None:
            # Grouped partial mining: whole groups (worlds) at a time, so every query's negatives come from
            # its own world - the confusers a single-world map presents at test time.
            chosen = self._choose_groups(rng)
            pool = self.trainable_queries[np.isin(self.data.q_groups[self.trainable_queries], chosen)]
            q_ids = np.sort(rng.choice(pool, min(len(pool), wanted), replace=False))
            cand = np.flatnonzero(np.isin(self.data.db_groups, chosen))
        else:
            q_ids = np.sort(rng.choice(self.trainable_queries, min(len(self.trainable_queries), wanted), replace=False))
            cand = np.sort(rng.choice(n_db, min(cfg.db_sample, n_db), replace=False))
        need = np.unique(np.concatenate([cand] + [self.hard_pos[q] for q in q_ids]))
        q_desc = self._shard_descriptors(self.data.queries, q_ids, "mining: queries")
        db_rows = self._shard_descriptors(self.data.database, need, "mining: database")
        db_desc = {int(j): db_rows[k] for k, j in enumerate(need)}
        triplets = select_triplets(q_ids, q_desc, [self.hard_pos[q] for q in q_ids],
                                   [self.soft_pos[q] for q in q_ids], db_desc, cand, cfg.negs, cfg.neg_pool, rng)
        order = rng.permutation(len(triplets))
        # Equal shares on every rank, so all ranks reach the next (collective) mining at the same step.
        per_rank = len(triplets) // info.world_size
        self._triplets = [triplets[k] for k in order][info.rank::info.world_size][:per_rank]
        if info.is_main:
            log.debug("mined %d triplets from %d queries and %d database images", len(triplets), len(q_ids), len(cand))
        if len(self._triplets) < cfg.batch_size:
            if cfg.mining_groups > 0 and attempt < 3:
                return self._mine_partial(refresh + 1000, attempt + 1)
            raise ValueError(f"mining gave only {len(triplets)} triplets for {info.world_size} process(es) x batch "
                             f"{cfg.batch_size}; the dataset is too small (need queries with database images within "
                             f"{cfg.pos_radius} m and at least {cfg.negs} database images beyond {cfg.soft_radius} m)")

    def _choose_groups(self, rng: np.random.Generator) -> np.ndarray:
        """`mining_groups` random groups (worlds) of the database."""
        groups = np.unique(self.data.db_groups)
        return rng.choice(groups, min(self.cfg.mining_groups, len(groups)), replace=False)

    def _prepare_rerank(self) -> None:
        """Hardest global negatives (top `rerank_top`) and best positive of every trainable query, once."""
        cfg = self.cfg
        q_ids = self.trainable_queries
        q_desc = self._shard_descriptors(self.data.queries, q_ids, "hard negatives: queries")
        db_ids = np.arange(len(self.data.database))
        db_desc = self._shard_descriptors(self.data.database, db_ids, "hard negatives: database")
        self._hardest = hardest_negatives(q_desc, db_desc, [self.soft_pos[q] for q in q_ids], cfg.rerank_top)
        best = []
        for row, q in enumerate(q_ids):
            hard = self.hard_pos[q]
            best.append(int(hard[int(np.argmax(db_desc[hard] @ q_desc[row]))]))
        self._best_pos = np.asarray(best, np.int64)

    def _rerank_groups(self, rng: np.random.Generator, rows: np.ndarray) -> list[Triplet]:
        out = []
        for r in rows:
            negs = self._hardest[r]
            negs = negs[negs >= 0]
            if len(negs) == 0:
                continue
            pick = rng.choice(negs, self.cfg.negs, replace=len(negs) < self.cfg.negs)
            out.append(Triplet(int(self.trainable_queries[r]), int(self._best_pos[r]), [int(j) for j in pick]))
        return out

    # ------------------------------------------------------------------------ step
    def _batch_images(self, groups: list[Triplet]) -> torch.Tensor:
        imgs = []
        for t in groups:
            imgs.append(self.data.queries.image(t.query))
            imgs.append(self.data.database.image(t.positive))
            imgs.extend(self.data.database.image(n) for n in t.negatives)
        x = images_to_tensor(imgs, self.model.cfg.image_size)
        if self.cfg.augment == "photometric" and self.cfg.stage != "rerank":
            x = photometric_augment(x, self._aug_gen)
        return x.to(self.device, non_blocking=True)

    def _infonce_mask(self, groups: list[Triplet]) -> torch.Tensor:
        """(B, B*(1+negs)) True where a batch database image may serve as a negative of a query: its own
        positive, or any image beyond the soft radius (other queries' positives may show the same place)."""
        db = [j for t in groups for j in [t.positive, *t.negatives]]
        q_xy = self.data.queries.xy[[t.query for t in groups]]
        d = np.linalg.norm(q_xy[:, None, :] - self.data.database.xy[db][None], axis=-1)
        valid = d > self.cfg.soft_radius
        per = 1 + self.cfg.negs
        valid[np.arange(len(groups)), np.arange(len(groups)) * per] = True
        return torch.from_numpy(valid).to(self.device)

    def _dense_batch(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """P pixel-aligned pairs (two different images of one pose, from `mining_groups` random worlds when
        set) as [A_1..A_P, B_1..B_P], B rolled by a random whole-patch shift; returns (images, shift).
        Drawn from the step number and the rank: every rank its own pairs, the same again on resume."""
        cfg, aligned = self.cfg, self.data.aligned
        rng = np.random.default_rng([cfg.seed, self.global_step, self.info.rank, 31])
        rows = np.arange(len(aligned))
        if cfg.mining_groups > 0 and self.data.db_groups is not None:
            in_groups = rows[np.isin(self.data.db_groups[aligned[:, 0]], self._choose_groups(rng))]
            rows = in_groups if len(in_groups) else rows
        picked = rng.choice(rows, cfg.batch_size, replace=len(rows) < cfg.batch_size)
        pairs = [rng.choice(aligned[r], 2, replace=False) for r in picked]
        db = self.data.database
        x = images_to_tensor([db.image(int(a)) for a, _ in pairs] + [db.image(int(b)) for _, b in pairs],
                              self.model.cfg.image_size)
        p = self.model.cfg.patch_size
        dy, dx = int(rng.integers(-1, 2)), int(rng.integers(-cfg.dense_shift, cfg.dense_shift + 1))
        x[len(pairs):] = torch.roll(x[len(pairs):], shifts=(dy * p, dx * p), dims=(2, 3))
        return x.to(self.device, non_blocking=True), (dy, dx)

    def _step(self, groups: list[Triplet] | None) -> dict[str, float]:
        lr = self.lr_at(self.global_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else contextlib.nullcontext()
        if self.cfg.stage == "dense":
            images, shift = self._dense_batch()
            with autocast:
                loss, parts = self.net(images, 2, None, shift)
        else:
            images = self._batch_images(groups)
            valid = self._infonce_mask(groups) if self.cfg.global_loss == "infonce" else None
            with autocast:
                loss, parts = self.net(images, 2 + self.cfg.negs, valid)
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
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            log.info("training stage %s: world size %d, device %s, %d database images, %d queries (%d with a "
                     "positive within %g m), %d trainable tensors", cfg.stage, info.world_size, self.device,
                     len(self.data.database), len(self.data.queries), len(self.trainable_queries), cfg.pos_radius,
                     len(self.param_names))
        writer = self._tensorboard() if info.is_main else None
        if cfg.stage == "rerank":
            self._prepare_rerank()
        best_path = self.out / "best.safetensors"
        start_epoch = self.epoch
        try:
            for epoch in range(start_epoch, cfg.epochs):
                self.epoch = epoch
                t0 = time.time()
                sums: dict[str, float] = {}
                self._set_train_mode()
                rng = np.random.default_rng([cfg.seed, epoch, 23])
                if cfg.stage == "rerank":
                    perm = rng.permutation(len(self.trainable_queries))[info.rank::info.world_size]
                    cursor = 0
                steps = range(cfg.steps_per_epoch)
                bar = None
                if cfg.progress and info.is_main:
                    from tqdm import tqdm
                    bar = tqdm(steps, desc=f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=None)
                    steps = bar
                refresh, pos = 0, 0
                for step in steps:
                    if cfg.stage == "dense":
                        groups = None
                    elif cfg.stage == "rerank":
                        if cursor + cfg.batch_size > len(perm):
                            perm, cursor = rng.permutation(perm), 0
                        groups = self._rerank_groups(rng, perm[cursor:cursor + cfg.batch_size])
                        cursor += cfg.batch_size
                    else:
                        if step % cfg.refresh_steps == 0 or pos + cfg.batch_size > len(self._triplets):
                            self._mine_partial(refresh)
                            self._set_train_mode()
                            refresh, pos = refresh + 1, 0
                        groups = self._triplets[pos:pos + cfg.batch_size]
                        pos += cfg.batch_size
                    values = self._step(groups)
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if bar is not None:
                        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
                    if writer is not None:
                        for k, v in values.items():
                            writer.add_scalar(f"train/{k}", v, self.global_step)
                row = {k: all_reduce_mean(info, v / cfg.steps_per_epoch) for k, v in sums.items()}
                row.update(epoch=epoch + 1, step=self.global_step, lr=values["lr"])
                stop = self._end_epoch(row, t0, writer, best_path)
                stop = bool(_broadcast_flag(info, stop))
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

    def _end_epoch(self, row: dict, t0: float, writer, best_path: Path) -> bool:
        """Validate, save and log on rank 0; returns whether to stop early."""
        cfg, info = self.cfg, self.info
        stop = False
        if info.is_main:
            epoch = row["epoch"]
            val: ValResult | None = None
            if self.val is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
                val = validate(self.model, self.val, rerank=cfg.stage in ("rerank", "finetune"),
                               threshold_m=cfg.val_threshold_m,
                               rerank_top=cfg.val_rerank_top, max_queries=cfg.val_max_queries,
                               batch=cfg.extract_batch, progress=cfg.progress)
                self._set_train_mode()
                for n, v in val.global_recall.items():
                    row[f"val_R@{n}"] = v
                for n, v in (val.rerank_recall or {}).items():
                    row[f"val_rerank_R@{n}"] = v
                score = val.selection
                row["selection"] = score
            else:
                score = None
            row["seconds"] = time.time() - t0
            self.history.append(row)
            extra = {"stage": cfg.stage, "epoch": epoch, "global_step": self.global_step}
            save_model(self.model, self.out / "last.safetensors", extra=extra)
            improved = False
            if score is not None and score > self.best_score:
                self.best_score, self.best_epoch, self.not_improved, improved = score, epoch, 0, True
                save_model(self.model, best_path, extra={**extra, "selection_recall@5": score})
            elif score is None and self.val is None:
                save_model(self.model, best_path, extra=extra)   # no validation: the latest is the best we know
                self.best_epoch = epoch
            elif score is not None:
                self.not_improved += 1
                stop = cfg.patience > 0 and self.not_improved >= cfg.patience
            save_training_state(self.out, self.optimizer, self.param_names, {
                "stage": cfg.stage, "epoch": epoch, "global_step": self.global_step, "best_score": self.best_score,
                "best_epoch": self.best_epoch, "not_improved": self.not_improved})
            self._write_metrics(row, writer)
            msg = " ".join(f"{k}={row[k]:.4g}" for k in METRIC_FIELDS if k in row and k not in ("epoch", "step"))
            log.info("epoch %d/%d step %d: %s%s", epoch, cfg.epochs, self.global_step, msg,
                     " (best)" if improved else "")
        barrier(info)
        return stop

    # ----------------------------------------------------------------------- logging
    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency, but keep training without it
            log.warning("tensorboard is not installed: no TensorBoard logs")
            return None
        return SummaryWriter(log_dir=str(self.out / "tb"), purge_step=self.global_step or None)

    def _write_metrics(self, row: dict, writer) -> None:
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
        from .plots import plot_curves
        try:
            plot_curves(path, self.out / "curves.png")
        except Exception as exc:  # a plot must never stop a training run
            log.warning("could not plot %s: %s", path, exc)


def _broadcast_flag(info: DistInfo, flag: bool) -> bool:
    from .distributed import broadcast_object
    return broadcast_object(info, flag)
