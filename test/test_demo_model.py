"""The packaged demo model (models/r2former_tiny_demo.safetensors): its file, its configuration, and that it
localizes a synthetic street it has never seen, in another condition than the map's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from r2former_core.data.sources import open_source
from r2former_core.evaluation import evaluate
from r2former_core.localizer import Localizer, LocalizerConfig
from r2former_core.mapping import build_map
from r2former_core.model import load_model, preset
from r2former_core.resources import DEMO_MODEL, default_model_path
from r2former_core.synthetic import write_drive

HELD_OUT_SEED = 961          # not a training (100-139), validation (900, 901) or documented test (950-952) world


@pytest.fixture(scope="module")
def demo_model():
    path = default_model_path()
    assert path is not None and path.name == Path(DEMO_MODEL).name, "the demo model must be packaged under models/"
    return path, load_model(path)


def test_demo_model_file_and_configuration(demo_model):
    path, model = demo_model
    assert path.stat().st_size <= 25 * 1024 * 1024
    assert model.cfg == preset("r2former_demo")
    assert not model.training


def test_demo_model_localizes_an_unseen_street_at_dusk(demo_model, tmp_path):
    """Map: a day drive of an unseen world; queries: a dusk drive of it, shifted sideways and yaw-jittered.
    Most queries must come out within 25 m with R2Former reranking, better than global retrieval alone."""
    _, model = demo_model
    size = model.cfg.image_size
    map_dir = write_drive(HELD_OUT_SEED, tmp_path / "map", kind="map", conditions="day", frames=80, size=size,
                          spacing=2.5)
    query_dir = write_drive(HELD_OUT_SEED, tmp_path / "query", kind="query", conditions="dusk", frames=24, size=size,
                            spacing=2.5)
    mapdb = build_map(open_source(images=map_dir / "images", poses=map_dir / "poses.txt"), model, tmp_path / "m",
                      progress=False)
    queries = open_source(images=query_dir / "images", poses=query_dir / "poses.txt")
    results = evaluate(Localizer(model, mapdb, LocalizerConfig(top_k=50, device="cpu")), queries,
                       modes=("none", "r2former"), progress=False)
    r2 = results["r2former"].recall(1)
    print({m: r.summary() for m, r in results.items()})
    assert r2 >= 0.75
    assert r2 >= results["none"].recall(1)
    assert results["none"].recall(1) >= 0.6      # the global descriptor alone finds most places too (stage 3)
    assert np.median(results["r2former"].errors_m) < 10.0
    mapdb.close()
