"""Batch sources: what every training step learns from, behind one interface.

A source is built from the run's config, the training data, the model and the process's place in
the run (`DistInfo`); the trainer calls

    source.prepare()                          once, before the first epoch (after a resume too)
    source.start_epoch(epoch)                 at the start of every epoch
    batch = source.next_batch(step, global_step)   before every optimizer step

on every rank at the same steps: mining computes descriptors shard-wise and gathers them, a
collective operation under DDP. Batches are already on the training device.

* `TripletMining` (global, finetune): partial mining -> `GroupBatch` of [query, positive, negatives].
* `HardNegativePairs` (rerank): each query's best positive and negatives drawn from its hardest
  global neighbours, computed once -> `GroupBatch`.
* `AlignedPairs` (dense): pixel-aligned pairs of one pose under two conditions -> `PairBatch`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from ..features import images_to_tensor
from ..model import R2FormerModel
from .augment import photometric_augment
from .config import TrainConfig
from .datasets import ImageList, PlaceDataset, extract_descriptors
from .distributed import DistInfo, gather_rows
from .mining import (
    Positives,
    Triplet,
    choose_groups,
    hardest_negatives,
    select_triplets,
)

log = logging.getLogger(__name__)

MINING_ATTEMPTS = 3   # grouped mining: tries with other random worlds before giving up on too few triplets


@dataclass
class GroupBatch:
    """Groups of `group` images [query, positive, negative_1 .. negative_K], concatenated: (B * group, 3, H, W).
    `valid` (B, B * (group - 1)): which of the batch's database images may serve as negatives of each query
    (InfoNCE): its own positive, and any image beyond the soft radius."""
    images: torch.Tensor
    group: int
    valid: torch.Tensor | None = None

    @property
    def queries(self) -> int:
        return self.images.shape[0] // self.group


@dataclass
class PairBatch:
    """P pixel-aligned pairs as [A_1 .. A_P, B_1 .. B_P]; every B is rolled by `shift` (rows, cols) whole patches."""
    images: torch.Tensor
    shift: tuple[int, int]


Batch = GroupBatch | PairBatch


class BatchSource:
    """Feeds one stage (see the module docstring). Subclasses implement `next_batch`; `prepare` and
    `start_epoch` do nothing unless a source needs them."""

    def __init__(self, cfg: TrainConfig, data: PlaceDataset, model: R2FormerModel, info: DistInfo):
        self.cfg = cfg
        self.data = data
        self.model = model
        self.info = info

    def prepare(self) -> None:
        """Work done once before the first epoch."""

    def start_epoch(self, epoch: int) -> None:
        """Reset per-epoch state."""

    def next_batch(self, step: int, global_step: int) -> Batch:
        """The batch of step `step` of the current epoch (`global_step` counts steps over all epochs)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- helpers
    def _positives(self) -> Positives:
        cfg, data = self.cfg, self.data
        pos = Positives.around(data.database.xy, data.queries.xy, cfg.pos_radius, cfg.soft_radius, data.name)
        if self.info.is_main:
            log.info("%d of %d queries have a database image within %g m", len(pos.trainable), len(data.queries),
                     cfg.pos_radius)
        return pos

    def _descriptors(self, images: ImageList, ids: np.ndarray, desc: str) -> np.ndarray:
        """Global descriptors of `images[ids]`: each rank computes every W-th, all ranks get all."""
        info = self.info
        rows = extract_descriptors(self.model, images, ids[info.rank::info.world_size], self.cfg.extract_batch,
                                   progress=self.cfg.progress and info.is_main, desc=desc)
        return gather_rows(info, rows, len(ids))

    def _group_batch(self, groups: list[Triplet], augment: torch.Generator | None = None,
                     with_mask: bool = False) -> GroupBatch:
        imgs = []
        for t in groups:
            imgs.append(self.data.queries.image(t.query))
            imgs.append(self.data.database.image(t.positive))
            imgs.extend(self.data.database.image(n) for n in t.negatives)
        x = images_to_tensor(imgs, self.model.cfg.image_size)
        if augment is not None:
            x = photometric_augment(x, augment)
        device = self.info.device
        valid = torch.from_numpy(self._negative_mask(groups)).to(device) if with_mask else None
        return GroupBatch(x.to(device, non_blocking=True), 2 + len(groups[0].negatives), valid)

    def _negative_mask(self, groups: list[Triplet]) -> np.ndarray:
        """(B, B*(1+negs)) True where a batch database image may serve as a negative of a query: its own
        positive, or any image beyond the soft radius (other queries' positives may show the same place)."""
        db = [j for t in groups for j in [t.positive, *t.negatives]]
        q_xy = self.data.queries.xy[[t.query for t in groups]]
        d = np.linalg.norm(q_xy[:, None, :] - self.data.database.xy[db][None], axis=-1)
        valid = d > self.cfg.soft_radius
        per = 1 + len(groups[0].negatives)
        valid[np.arange(len(groups)), np.arange(len(groups)) * per] = True
        return valid


class TripletMining(BatchSource):
    """global, finetune: partial mining. Every `refresh_steps` steps (and whenever the triplets run out)
    sampled queries get their best positive (nearest in descriptor space within `pos_radius`) and the
    `negs` nearest negatives beyond `soft_radius` among `db_sample` random database images, or among every
    database image of `mining_groups` random worlds. Every rank mines the same triplets from the same
    seeded samples and trains on its own equal share. `--augment photometric` applies here."""

    def __init__(self, cfg: TrainConfig, data: PlaceDataset, model: R2FormerModel, info: DistInfo):
        super().__init__(cfg, data, model, info)
        self.positives = self._positives()
        self.augment = (torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
                        if cfg.augment == "photometric" else None)
        self.epoch = 0
        self.refresh = 0
        self.pos = 0
        self.triplets: list[Triplet] = []

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.refresh, self.pos, self.triplets = epoch, 0, 0, []

    def next_batch(self, step: int, global_step: int) -> Batch:
        b = self.cfg.batch_size
        if step % self.cfg.refresh_steps == 0 or self.pos + b > len(self.triplets):
            self.triplets = self._mine(self.refresh)
            self.refresh, self.pos = self.refresh + 1, 0
        groups = self.triplets[self.pos:self.pos + b]
        self.pos += b
        return self._group_batch(groups, self.augment, with_mask=True)

    def _mine(self, refresh: int) -> list[Triplet]:
        """This rank's share of the triplets of refresh `refresh` (DataError when there are too few)."""
        cfg, info = self.cfg, self.info
        for attempt in range(MINING_ATTEMPTS + 1):
            rng = np.random.default_rng([cfg.seed, self.epoch, refresh + 1000 * attempt, 17])
            found, total = self._mine_once(rng)
            if len(found) >= cfg.batch_size or cfg.mining_groups == 0:
                break
        if len(found) < cfg.batch_size:
            raise DataError(
                f"{self.data.name}: mining gave only {total} triplets for {info.world_size} process(es) x batch "
                f"{cfg.batch_size}; the dataset is too small (it needs queries with database images within "
                f"{cfg.pos_radius:g} m and at least {cfg.negs} database images beyond {cfg.soft_radius:g} m); use a "
                "smaller --batch-size or --negs, or more data")
        return found

    def _mine_once(self, rng: np.random.Generator) -> tuple[list[Triplet], int]:
        cfg, info, data, pos = self.cfg, self.info, self.data, self.positives
        wanted = int(math.ceil(cfg.refresh_steps * cfg.batch_size * info.world_size * 1.1))
        if cfg.mining_groups > 0 and data.db_groups is not None and data.q_groups is not None:
            # Grouped partial mining: whole groups (worlds) at a time, so every query's negatives come from
            # its own world - the confusers a single-world map presents at test time.
            chosen = choose_groups(data.db_groups, cfg.mining_groups, rng)
            pool = pos.trainable[np.isin(data.q_groups[pos.trainable], chosen)]
            q_ids = np.sort(rng.choice(pool, min(len(pool), wanted), replace=False))
            cand = np.flatnonzero(np.isin(data.db_groups, chosen))
        else:
            q_ids = np.sort(rng.choice(pos.trainable, min(len(pos.trainable), wanted), replace=False))
            n_db = len(data.database)
            cand = np.sort(rng.choice(n_db, min(cfg.db_sample, n_db), replace=False))
        need = np.unique(np.concatenate([cand] + [pos.hard[q] for q in q_ids]))
        q_desc = self._descriptors(data.queries, q_ids, "mining: queries")
        db_rows = self._descriptors(data.database, need, "mining: database")
        db_desc = {int(j): db_rows[k] for k, j in enumerate(need)}
        triplets = select_triplets(q_ids, q_desc, [pos.hard[q] for q in q_ids], [pos.soft[q] for q in q_ids],
                                   db_desc, cand, cfg.negs, cfg.neg_pool, rng)
        order = rng.permutation(len(triplets))
        # Equal shares on every rank, so all ranks reach the next (collective) mining at the same step.
        per_rank = len(triplets) // info.world_size
        if info.is_main:
            log.debug("mined %d triplets from %d queries and %d database images", len(triplets), len(q_ids), len(cand))
        return [triplets[k] for k in order][info.rank::info.world_size][:per_rank], len(triplets)


class HardNegativePairs(BatchSource):
    """rerank: every query with a positive, its best positive (nearest in descriptor space within
    `pos_radius`) and `negs` negatives drawn at random from its `rerank_top` hardest global neighbours
    (soft positives removed), computed once with the frozen backbone. Queries come in a new random
    order every epoch, each rank its share."""

    def __init__(self, cfg: TrainConfig, data: PlaceDataset, model: R2FormerModel, info: DistInfo):
        super().__init__(cfg, data, model, info)
        self.positives = self._positives()
        self.hardest = np.zeros((0, cfg.rerank_top), np.int64)
        self.best_positive = np.zeros(0, np.int64)
        self.usable = np.zeros(0, np.int64)
        self.rng = np.random.default_rng(0)
        self.order = np.zeros(0, np.int64)
        self.cursor = 0

    def prepare(self) -> None:
        q_ids = self.positives.trainable
        q_desc = self._descriptors(self.data.queries, q_ids, "hard negatives: queries")
        db_desc = self._descriptors(self.data.database, np.arange(len(self.data.database)),
                                    "hard negatives: database")
        self.hardest = hardest_negatives(q_desc, db_desc, [self.positives.soft[q] for q in q_ids],
                                         self.cfg.rerank_top)
        # Rows (queries) with at least one negative: the others cannot form a pair.
        self.usable = np.flatnonzero((self.hardest >= 0).any(axis=1))
        if len(self.usable) < self.info.world_size:
            raise DataError(f"{self.data.name}: {len(self.usable)} queries have a database image beyond --soft-radius "
                            f"{self.cfg.soft_radius:g} m to serve as a negative; {self.info.world_size} process(es) "
                            "need at least one each")
        best = []
        for row, q in enumerate(q_ids):
            hard = self.positives.hard[q]
            best.append(int(hard[int(np.argmax(db_desc[hard] @ q_desc[row]))]))
        self.best_positive = np.asarray(best, np.int64)

    def start_epoch(self, epoch: int) -> None:
        self.rng = np.random.default_rng([self.cfg.seed, epoch, 23])
        self.order = self.rng.permutation(self.usable)[self.info.rank::self.info.world_size]
        self.cursor = 0

    def next_batch(self, step: int, global_step: int) -> Batch:
        b = self.cfg.batch_size
        if self.cursor + b > len(self.order):
            self.order, self.cursor = self.rng.permutation(self.order), 0
        rows = self.order[self.cursor:self.cursor + b]
        self.cursor += b
        groups = []
        for r in rows:
            negs = self.hardest[r]
            negs = negs[negs >= 0]
            pick = self.rng.choice(negs, self.cfg.negs, replace=len(negs) < self.cfg.negs)
            groups.append(Triplet(int(self.positives.trainable[r]), int(self.best_positive[r]),
                                  [int(j) for j in pick]))
        return self._group_batch(groups)


class AlignedPairs(BatchSource):
    """dense: `batch_size` pixel-aligned pairs (two map drives of one pose in two conditions, from
    `mining_groups` random worlds when set), the second view rolled by a random whole-patch shift (up to
    `dense_shift` sideways, one up or down). Drawn from the step number and the rank: every rank its own
    pairs, the same again after a resume."""

    def __init__(self, cfg: TrainConfig, data: PlaceDataset, model: R2FormerModel, info: DistInfo):
        super().__init__(cfg, data, model, info)
        aligned = data.aligned
        if aligned is None or aligned.ndim != 2 or aligned.shape[1] < 2 or len(aligned) < cfg.batch_size:
            raise DataError(f"{data.name}: the dense stage needs at least {cfg.batch_size} poses seen by two or more "
                            "pixel-aligned database images (synthetic worlds with --map-drives >= 2); this dataset "
                            f"has {0 if aligned is None else len(aligned)}")
        self.aligned = aligned

    def next_batch(self, step: int, global_step: int) -> Batch:
        cfg, data = self.cfg, self.data
        rng = np.random.default_rng([cfg.seed, global_step, self.info.rank, 31])
        rows = np.arange(len(self.aligned))
        if cfg.mining_groups > 0 and data.db_groups is not None:
            chosen = choose_groups(data.db_groups, cfg.mining_groups, rng)
            in_groups = rows[np.isin(data.db_groups[self.aligned[:, 0]], chosen)]
            rows = in_groups if len(in_groups) else rows
        picked = rng.choice(rows, cfg.batch_size, replace=len(rows) < cfg.batch_size)
        pairs = [rng.choice(self.aligned[r], 2, replace=False) for r in picked]
        db = data.database
        x = images_to_tensor([db.image(int(a)) for a, _ in pairs] + [db.image(int(b)) for _, b in pairs],
                             self.model.cfg.image_size)
        p = self.model.cfg.patch_size
        dy, dx = int(rng.integers(-1, 2)), int(rng.integers(-cfg.dense_shift, cfg.dense_shift + 1))
        x[len(pairs):] = torch.roll(x[len(pairs):], shifts=(dy * p, dx * p), dims=(2, 3))
        return PairBatch(x.to(self.info.device, non_blocking=True), (dy, dx))
