"""R2Former model: DeiT distilled backbone, attention-selected local tokens, reranker.

Public API (a contract: tests and other packages use it):
    load_model(path, device="cpu", precision="fp32") -> R2FormerModel
    R2FormerModel.set_precision(name) -> resolved name; .precision, .rerank_precision, .autocast()
    preprocess(image) -> (1, 3, 480, 640) tensor
    R2FormerModel.extract(images) -> Features(.global_desc, .local, ...)
    R2FormerModel.rerank(q_global, q_local, c_global, c_local) -> RerankOutput(.match_prob, .final_score, ...)
    R2FormerModel.fingerprint
"""
from .checkpoint import CheckpointError, imagenet_backbone_from_timm, load_model, save_model, save_official_checkpoint
from .config import PRESETS, ModelConfig, preset
from .precision import RANKING_EQUIVALENT, resolve_precision
from .preprocess import preprocess, preprocess_batch
from .r2former import Features, R2FormerModel, build_model
from .reranker import RerankOutput

__all__ = ["CheckpointError", "Features", "ModelConfig", "PRESETS", "R2FormerModel", "RANKING_EQUIVALENT",
           "RerankOutput",
           "build_model", "imagenet_backbone_from_timm", "load_model", "preprocess", "preprocess_batch",
           "preset", "resolve_precision", "save_model", "save_official_checkpoint"]
