"""Reranking modes: RANSAC baseline on mutual nearest neighbours, none, r2former."""
import numpy as np
import pytest

from r2former_core.rerank import RERANK_MODES, mutual_nearest_matches, ransac_inliers, rerank_candidates


def _tokens(xy, feats):
    return np.concatenate([xy, np.ones((len(xy), 1)), feats], axis=1).astype(np.float32)


def _scene(seed=0, n=60, dim=16):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.05, 0.7, (n, 2))
    feats = rng.normal(size=(n, dim))
    return xy, feats


def test_mutual_nearest_matches_finds_permuted_tokens():
    xy, f = _scene()
    q = _tokens(xy, f)
    perm = np.random.default_rng(1).permutation(len(q))
    c = q[perm]
    qi, ci, sim = mutual_nearest_matches(q, c)
    assert len(qi) == len(q)
    assert np.all(perm[ci] == qi)
    assert np.allclose(sim, 1.0, atol=1e-5) and np.all(np.diff(sim) <= 1e-7)


def test_ransac_counts_geometrically_consistent_matches():
    xy, f = _scene(2)
    q = _tokens(xy, f)
    shifted = _tokens(xy + [0.05, 0.02], f + 0.05 * np.random.default_rng(3).normal(size=f.shape))
    scrambled = _tokens(np.random.default_rng(4).uniform(0.05, 0.7, xy.shape), f)
    good, n_good = ransac_inliers(q, shifted, scale=640)
    bad, n_bad = ransac_inliers(q, scrambled, scale=640)
    assert n_good == n_bad == len(q)          # the features match either way
    assert good >= 0.9 * len(q)               # a translation is a homography
    assert bad < 0.3 * len(q)                 # random geometry is not


def test_modes_rank_candidates(tiny_model):
    xy, f = _scene(5, n=24, dim=16)
    q = _tokens(xy, f)
    rng = np.random.default_rng(6)
    cands = np.stack([_tokens(rng.uniform(0.05, 0.7, xy.shape), f), _tokens(xy + 0.03, f),
                      _tokens(rng.uniform(0.05, 0.7, xy.shape), rng.normal(size=f.shape))])
    qg = rng.normal(size=32).astype(np.float32)
    cg = np.stack([qg + 0.1 * rng.normal(size=32), qg + 0.5 * rng.normal(size=32), rng.normal(size=32)])
    none = rerank_candidates(tiny_model, "none", qg, q, cg, cands)
    assert np.argmax(none.score) == 0
    ransac = rerank_candidates(tiny_model, "ransac", qg, q, cg, cands)
    assert np.argmax(ransac.score) == 1       # geometry wins over the global score
    r2 = rerank_candidates(tiny_model, "r2former", qg, q, cg, cands)
    assert r2.score.shape == (3,) and np.all((r2.score >= 0) & (r2.score <= 1))
    assert np.allclose(none.global_score, r2.global_score)
    with pytest.raises(ValueError, match="choose one of"):
        rerank_candidates(tiny_model, "magic", qg, q, cg, cands)
    for mode in RERANK_MODES:       # every advertised mode runs and scores every candidate
        out = rerank_candidates(tiny_model, mode, qg, q, cg, cands)
        assert out.score.shape == out.rerank_score.shape == out.global_score.shape == (3,)
        assert np.all(np.isfinite(out.score))
