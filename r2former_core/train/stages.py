"""A training stage in code: `StageSpec` names (config.STAGES) turned into a batch source, loss terms
and the model set-up they need.

`build_stage(cfg, model, data, info)` prepares the model as the stage says (optional Xavier re-init of
the reranker, which parameters learn, whether the reranker's gradient reaches the backbone) and
returns a `Stage`: `net` (the module DDP wraps: batch -> loss, parts), `source` (its batches) and
`set_train_mode()`.

To add a stage: a `StageSpec` in `config.STAGES` (its defaults, batch source, loss terms, frozen
parameters). Only when no existing batch source or loss term fits, write one (`batches.py`,
`losses.py`) and register it in `BATCH_SOURCES` / `LOSS_TERMS` below. The trainer needs no change.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..model import Features, R2FormerModel
from .batches import AlignedPairs, Batch, BatchSource, HardNegativePairs, TripletMining
from .config import StageSpec, TrainConfig
from .datasets import PlaceDataset
from .distributed import DistInfo
from .losses import DenseTerm, InfoNCETerm, LossTerm, RerankTerm, TripletTerm

BATCH_SOURCES: dict[str, type[BatchSource]] = {
    "triplets": TripletMining,
    "rerank_pairs": HardNegativePairs,
    "aligned_pairs": AlignedPairs,
}
LOSS_TERMS: dict[str, Callable[[TrainConfig], LossTerm]] = {
    "global": lambda cfg: InfoNCETerm() if cfg.global_loss == "infonce" else TripletTerm(),
    "rerank": lambda cfg: RerankTerm(),
    "dense": lambda cfg: DenseTerm(cfg.dense_global_weight),
}
# Never trained: the reranker's decoder position embedding is not used by its forward pass.
ALWAYS_FROZEN = ("reranker.decoder_pos_embed",)


class StageNet(nn.Module):
    """What DDP wraps: a batch -> (the sum of the stage's loss terms, their parts by name)."""

    def __init__(self, model: R2FormerModel, terms: Sequence[LossTerm]):
        super().__init__()
        self.model = model
        self.terms = list(terms)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        computed: list[Features] = []

        def features() -> Features:
            if not computed:
                computed.append(self.model.forward_features(batch.images))
            return computed[0]

        loss = batch.images.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            value, named = term(self.model, batch, features)
            loss = loss + value
            parts.update(named)
        return loss, parts


@dataclass
class Stage:
    spec: StageSpec
    model: R2FormerModel
    net: StageNet
    source: BatchSource

    def set_train_mode(self) -> None:
        """Train mode, except the submodules the stage keeps in eval mode (a frozen backbone)."""
        self.model.train()
        for name in self.spec.eval_modules:
            self.model.get_submodule(name).eval()


def build_stage(cfg: TrainConfig, model: R2FormerModel, data: PlaceDataset, info: DistInfo) -> Stage:
    """Prepare `model` for `cfg.stage` and build its batch source and loss terms (DataError when the data
    cannot feed the stage)."""
    spec = cfg.spec
    model.detach_local = not cfg.end_to_end
    if cfg.reranker_init != "keep":
        reinit_reranker_xavier(model, local_head=cfg.reranker_init == "xavier")
    set_trainable(model, spec.frozen + ALWAYS_FROZEN)
    source = BATCH_SOURCES[spec.batches](cfg, data, model, info)
    return Stage(spec, model, StageNet(model, [LOSS_TERMS[name](cfg) for name in spec.losses]), source)


def set_trainable(model: nn.Module, frozen: Sequence[str]) -> None:
    """Every parameter learns except those named by a prefix in `frozen` ("backbone", "reranker.ratio")."""
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name == f or name.startswith(f + ".") for f in frozen))


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
