"""Reranking budget: the margin rule and the time budget rerank a best-global-first subset exactly."""
from __future__ import annotations

import numpy as np
import pytest

from r2former_core.errors import ConfigError
from r2former_core.localizer import Localizer, LocalizerConfig
from r2former_core.mapdb import MapDatabase
from r2former_core.model import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_config):
    model = build_model(tiny_config, seed=4)
    rng = np.random.default_rng(3)
    m, cfg = 24, tiny_config
    glob = rng.standard_normal((m, cfg.global_dim)).astype(np.float32)
    glob /= np.linalg.norm(glob, axis=1, keepdims=True)
    local = rng.random((m, cfg.local_tokens, cfg.local_values)).astype(np.float32)
    path = tmp_path_factory.mktemp("budget") / "map"
    poses = np.zeros((m, 7))
    poses[:, 0] = np.arange(m) * 3.0
    poses[:, 6] = 1.0
    with MapDatabase.create(path, fingerprint=model.fingerprint, model_config={}, image_size=cfg.image_size,
                            global_dim=cfg.global_dim, num_local=cfg.local_tokens,
                            local_values=cfg.local_values) as writer:
        writer.add_batch(glob, local, poses, np.arange(m, dtype=float), [f"{i}.png" for i in range(m)])
    query_g = glob[5] + 0.3 * rng.standard_normal(cfg.global_dim).astype(np.float32)
    query_g /= np.linalg.norm(query_g)
    return model, MapDatabase.load(path), query_g, local[5] + 0.05 * rng.random(local[5].shape).astype(np.float32)


def localize(setup, **cfg):
    model, mapdb, qg, ql = setup
    loc = Localizer(model, mapdb, LocalizerConfig(top_k=20, device="cpu", precision="fp32", **cfg))
    return loc, loc.localize_features(qg, ql, with_matches=False)


def test_no_budget_reranks_everything(setup):
    loc, res = localize(setup)
    assert loc.last_reranked == 20 and len(res.candidates) == 20


def test_margin_reranks_the_confident_few_exactly(setup):
    _, full = localize(setup)
    by_index = {c.index: c for c in full.candidates}
    glob = np.array([c.global_score for c in full.candidates])
    margin = float(np.sort(glob)[::-1][0] - np.sort(glob)[::-1][7]) + 1e-6     # the best 8 by global score
    loc, res = localize(setup, rerank_margin=margin, rerank_min=3)
    assert loc.last_reranked == loc.rerank_count(np.sort(glob)[::-1]) == 8
    head, tail = res.candidates[:8], res.candidates[8:]
    assert all(abs(c.rerank_score - by_index[c.index].rerank_score) < 1e-6 for c in head)   # same scores
    assert [c.rerank_score for c in head] == sorted((c.rerank_score for c in head), reverse=True)
    assert [c.global_score for c in tail] == sorted((c.global_score for c in tail), reverse=True)
    assert all(c.rerank_score == 0.0 for c in tail)
    assert min(c.global_score for c in head) >= max(c.global_score for c in tail)
    loc, _ = localize(setup, rerank_margin=1e-9, rerank_min=3)
    assert loc.last_reranked == 3                                              # rerank_min is a floor


def test_time_budget_follows_the_measured_cost(setup):
    loc, _ = localize(setup, rerank_budget_ms=1e-3, rerank_min=4)             # nothing fits: rerank_min only
    assert loc.last_reranked == 4 and loc.rerank_ms_per_candidate["r2former"] > 0
    model, mapdb, qg, ql = setup
    loc = Localizer(model, mapdb, LocalizerConfig(top_k=20, device="cpu", precision="fp32", rerank_budget_ms=1e6,
                                                  rerank_min=4))
    loc.localize_features(qg, ql, with_matches=False)
    assert loc.last_reranked == 20                                             # everything fits
    loc.rerank_ms_per_candidate["r2former"] = 1e9                              # as if the CPU became very slow
    loc.config = LocalizerConfig(top_k=20, device="cpu", precision="fp32", rerank_budget_ms=1e6, rerank_min=4)
    loc.localize_features(qg, ql, with_matches=False)
    assert loc.last_reranked < 20


def test_budget_settings_are_validated():
    for bad in ({"rerank_budget_ms": -1.0}, {"rerank_margin": 3.0}, {"rerank_min": 0}):
        with pytest.raises(ConfigError):
            LocalizerConfig(**bad).validate()
