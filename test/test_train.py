"""Training pipeline: datasets (synthetic, VG, MSLS), mining rules, losses, the stages end to end, resume,
and a 2-process torchrun run. The config, the stages as data, the batch sources, device choice and the
gradient scaler's state: test/test_train_structure.py."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from r2former_core.cli.main import main as cli_main
from r2former_core.errors import ConfigError
from r2former_core.model import build_model, load_model, save_model
from r2former_core.train.augment import photometric_augment
from r2former_core.train.batches import GroupBatch
from r2former_core.train.checkpointing import load_training_state, save_training_state
from r2former_core.train.config import TrainConfig
from r2former_core.train.datasets import (
    SyntheticSpec,
    drive_conditions,
    msls_dataset,
    open_dataset,
    parse_seeds,
    synthetic_dataset,
    vg_dataset,
)
from r2former_core.train.losses import (
    TripletTerm,
    dense_correspondence_loss,
    infonce_loss,
    rerank_loss,
    triplet_loss,
)
from r2former_core.train.mining import (
    hardest_negatives,
    neighbours_within,
    select_triplets,
)
from r2former_core.train.stages import StageNet, reinit_reranker_xavier

REPO = Path(__file__).resolve().parents[1]
SPACING = 6.0           # metres between synthetic frames: ~70 frames per drive, fast to render
DATA = "synthetic:11,12:day,night,fog"
VAL = "synthetic:13:day,dusk"


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic_cache")


@pytest.fixture(scope="module")
def init_model(tmp_path_factory, tiny_config):
    path = tmp_path_factory.mktemp("init") / "tiny.safetensors"
    save_model(build_model(tiny_config, seed=0), path)
    return path


def _common(cache_dir) -> list[str]:
    # --device cpu: these runs assume the CPU (a GPU machine would otherwise pick CUDA).
    return ["--device", "cpu", "--cache-dir", str(cache_dir), "--spacing", str(SPACING), "--no-progress",
            "--threads", "2", "--val-max-queries", "24", "--val-rerank-top", "5", "--extract-batch", "16"]


def _train(*args: str) -> int:
    return cli_main(["--log-level", "WARNING", "train", *args])


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ mining
def test_neighbours_and_mining_respect_10m_25m_rules():
    # Database along a line; one query at x=0.
    db_x = np.array([0.0, 5.0, 12.0, 20.0, 30.0, 50.0, 100.0, 9.9])
    db_xy = np.stack([db_x, np.zeros_like(db_x)], 1) + [500_000.0, 4_000_000.0]   # UTM-sized numbers
    q_xy = np.array([[500_000.0, 4_000_000.0]])
    hard = neighbours_within(db_xy, q_xy, 10.0)
    soft = neighbours_within(db_xy, q_xy, 25.0)
    assert sorted(hard[0].tolist()) == [0, 1, 7]
    assert sorted(soft[0].tolist()) == [0, 1, 2, 3, 7]
    # Descriptors: the query looks most like the soft positives 12 m and 20 m away (never negatives), then 50 m.
    g = 4
    desc = np.zeros((len(db_x), g), np.float32)
    q = np.array([[1, 0, 0, 0]], np.float32)
    desc[0] = [0, 1, 0, 0]          # true place, far in descriptor space
    desc[1] = [0.6, 0.8, 0, 0]      # hard positive nearest in descriptor space -> best positive
    desc[7] = [0, 0, 1, 0]
    desc[2] = desc[3] = [1, 0, 0, 0]
    desc[5] = [0.9, 0.43589, 0, 0]
    desc[4] = [0.5, 0, 0.866, 0]
    desc[6] = [0, 0, 0, 1]
    trip = select_triplets(np.array([0]), q, hard, soft, desc, np.arange(len(db_x)), negs=2)
    assert len(trip) == 1
    assert trip[0].positive == 1
    assert trip[0].negatives == [5, 4]
    assert not set(trip[0].negatives) & set(soft[0].tolist())
    # Not enough candidates beyond 25 m -> the query is skipped; no hard positive -> skipped.
    assert select_triplets(np.array([0]), q, hard, soft, desc, np.array([0, 1, 2, 3, 5]), negs=2) == []
    assert select_triplets(np.array([0]), q, [np.array([], np.int64)], soft, desc, np.arange(8), negs=1) == []
    # Hardest global negatives: most similar first, soft positives removed, -1 padded.
    top = hardest_negatives(q, desc, soft, top=4)
    assert top[0].tolist() == [5, 4, 6, -1]


def test_parse_seeds_and_condition_rotation():
    assert parse_seeds("3") == (3,)
    assert parse_seeds("1,10-12") == (1, 10, 11, 12)
    for bad in ("5-3", "a", "1,,x-2", ""):
        with pytest.raises(ConfigError):
            parse_seeds(bad)
    maps, queries = drive_conditions(0, ["day", "night", "fog"], 1, 2)
    assert maps == ["day"] and queries == ["night", "fog"]
    maps, queries = drive_conditions(1, ["day", "night", "fog"], 1, 2)
    assert maps == ["night"] and set(queries) == {"fog", "day"}


# ------------------------------------------------------------------------------------ losses
def test_triplet_loss_decreases_when_overfitting_four_triplets(tiny_config):
    """The global stage's net and loss learn 4 fixed (q, p, n) groups."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    h, w = tiny_config.image_size
    places = rng.integers(0, 255, (8, h, w, 3), dtype=np.uint8)
    groups = []
    for k in range(4):
        # Adversarial on purpose: the negative is a noisy copy of the query, the positive another image,
        # so an untrained model gets them wrong and must learn them.
        n = np.clip(places[k].astype(int) + rng.integers(-20, 20, places[k].shape), 0, 255).astype(np.uint8)
        groups += [places[k], places[4 + k], n]
    from r2former_core.model.preprocess import preprocess_batch
    images = preprocess_batch(np.stack(groups), tiny_config.image_size)
    model = build_model(tiny_config, seed=1).train()
    net = StageNet(model, [TripletTerm()])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, parts = net(GroupBatch(images, 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(parts["triplet_loss"].detach()))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_reranker_ce_decreases_on_toy_pairs(tiny_config):
    """Reranker + CE learn 8 positive pairs (query tokens + noise) against 8 negative pairs (other tokens)."""
    torch.manual_seed(0)
    n, c = tiny_config.local_tokens, tiny_config.local_dim

    def tokens(b):
        return torch.cat([torch.rand(b, n, 2) * 0.8, torch.rand(b, n, 1), torch.randn(b, n, c)], -1)
    q = tokens(8)
    pos = q.clone()
    pos[..., 3:] += 0.3 * torch.randn(8, n, c)
    xl, yl = torch.cat([q, q]), torch.cat([pos, tokens(8)])
    g = torch.nn.functional.normalize(torch.randn(16, tiny_config.global_dim), dim=-1)
    labels = torch.cat([torch.ones(8), torch.zeros(8)]).long()
    model = build_model(tiny_config, seed=1)
    reinit_reranker_xavier(model)   # as `--reranker-init xavier`: a fresh reranker starts learning at once
    model.train()
    opt = torch.optim.Adam(model.reranker.parameters(), lr=3e-4)
    losses = []
    for _ in range(40):
        loss = rerank_loss(model.reranker(g, xl, g, yl).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_infonce_loss_and_mask():
    q = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    cands = torch.cat([q[:1], -q[:1], q[1:], -q[1:]])            # query i's positive at 2 * i
    target = torch.tensor([0, 2])
    good = float(infonce_loss(q, cands, target, temperature=0.05))
    bad = float(infonce_loss(q, cands, torch.tensor([1, 3]), temperature=0.05))
    assert good < bad
    # Masking a candidate removes it from the softmax: masking everything but the positive gives 0.
    valid = torch.zeros(2, 4, dtype=torch.bool)
    valid[0, 0] = valid[1, 2] = True
    assert float(infonce_loss(q, cands, target, valid)) == pytest.approx(0.0, abs=1e-6)


def test_loss_functions_basic():
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert float(triplet_loss(q, q, q[:, None].clone())) == pytest.approx(0.1)   # d(q,p)=d(q,n)=0 -> margin
    assert float(triplet_loss(q, q, -q[:, None])) == 0.0
    logits = torch.tensor([[0.0, 10.0], [10.0, 0.0]])
    assert float(rerank_loss(logits, torch.tensor([1, 0]))) < 1e-3


# ---------------------------------------------------------------------------------- datasets
def test_synthetic_dataset_renders_once_and_groups_worlds(cache_dir):
    spec = SyntheticSpec((11, 12), ("day", "night", "fog"), (96, 128), SPACING, map_drives=1, query_drives=1)
    data = synthetic_dataset(spec, cache_dir)
    files = sorted(p.name for p in Path(cache_dir).rglob("*.npy"))
    assert len(files) == 8   # 2 worlds x (1 map + 1 query) x (images + poses)
    assert len(data.database) == len(data.db_groups) and set(data.db_groups.tolist()) == {0, 1}
    img = data.queries.image(0)
    assert img.shape == (96, 128, 3) and img.dtype == np.uint8
    # Worlds far apart: no database image of world 1 within 25 m of a world-0 query.
    soft = neighbours_within(data.database.xy, data.queries.xy, 25.0)
    for qi in np.flatnonzero(data.q_groups == 0):
        assert set(data.db_groups[soft[qi]].tolist()) <= {0}
    # Same spec again: no re-rendering (files untouched).
    mtimes = {p: p.stat().st_mtime_ns for p in Path(cache_dir).rglob("*.npy")}
    synthetic_dataset(spec, cache_dir)
    assert mtimes == {p: p.stat().st_mtime_ns for p in Path(cache_dir).rglob("*.npy")}


def _write_jpg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((24, 32, 3), value, np.uint8))


def test_vg_adapter_on_fake_folder(tmp_path):
    root = tmp_path / "pitts_fake"
    for split in ("train", "val"):
        for part, offset in (("database", 0.0), ("queries", 3.0)):
            for k in range(3):
                east, north = 584000.0 + 20 * k + offset, 4477000.0 + 5 * k
                _write_jpg(root / "images" / split / part / f"@{east:.2f}@{north:.2f}@17@T@@@@@@@@@@@.jpg", 10 * k)
    data = vg_dataset(root, "train")
    assert len(data.database) == 3 and len(data.queries) == 3
    assert np.allclose(data.database.xy[1], [584020.0, 4477005.0])
    assert data.queries.image(2).shape == (24, 32, 3)
    assert open_dataset(f"vg:{root}", "val", tmp_path).name.endswith("/val")
    with pytest.raises(Exception, match="split"):
        vg_dataset(root, "test")


def test_msls_adapter_on_fake_folder(tmp_path):
    root = tmp_path / "msls"
    cities = {"melbourne": 0, "london": 1, "cph": 2, "sf": 3}
    for city, c in cities.items():
        for part in ("database", "query"):
            folder = root / "train_val" / city / part
            rows = []
            for k in range(2 + c % 2):
                key = f"{city}_{part}_{k}"
                _write_jpg(folder / "images" / f"{key}.jpg", 40 * k)
                rows.append((k, key, 300000.0 + 10 * k + (2.0 if part == "query" else 0.0), 5000000.0 + k))
            name = "postprocessed.csv" if city != "london" else "raw.csv"
            with open(folder / name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["", "key", "easting", "northing", "ca", "night"])
                w.writerows([(i, key, e, n, 0.0, False) for i, key, e, n in rows])
    train = msls_dataset(root, "train")
    assert train.info["cities"] == ["london", "melbourne"]
    assert len(train.database) == 3 + 2 and len(train.queries) == 5
    val = open_dataset(f"msls:{root}", "val", tmp_path)
    assert val.info["cities"] == ["cph", "sf"]
    # Cities are kept apart even though their UTM numbers coincide.
    soft = neighbours_within(val.database.xy, val.queries.xy, 25.0)
    assert all(len(s) and np.all(np.abs(val.database.xy[s, 0] - val.queries.xy[i, 0]) < 25) for i, s in enumerate(soft))
    assert val.queries.image(0).shape == (24, 32, 3)
    (root / "train_val" / "cph" / "query" / "images" / "cph_query_0.jpg").unlink()
    with pytest.raises(Exception, match="missing"):
        msls_dataset(root, "val")


# ------------------------------------------------------------------------------ checkpointing
def test_training_state_round_trip_without_pickle(tmp_path, tiny_config):
    model = build_model(tiny_config, seed=0)
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.03)
    model.forward_features(torch.randn(2, 3, *tiny_config.image_size)).global_desc.sum().backward()
    opt.step()
    # A gradient scaler (the CPU one: same state_dict as the CUDA one) that has backed off once and counted
    # two good steps since: a resumed run must continue from exactly there.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=5)
    for bad in (True, False, False):
        p = torch.nn.Parameter(torch.ones(2))
        sgd = torch.optim.SGD([p], lr=0.1)
        scaler.scale(p.sum() * (float("inf") if bad else 1.0)).backward()
        scaler.step(sgd)
        scaler.update()
    saved_scaler = scaler.state_dict()
    assert saved_scaler["scale"] == 512.0 and saved_scaler["_growth_tracker"] == 2
    save_training_state(tmp_path, opt, names, {"stage": "global", "epoch": 3}, scaler)
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert load_training_state(tmp_path, opt2, names, scaler2) == {"stage": "global", "epoch": 3}
    assert scaler2.state_dict() == saved_scaler
    assert json.loads((tmp_path / "train_state.json").read_text())["grad_scaler"] == saved_scaler
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for key in a["state"][k]:
            assert torch.equal(a["state"][k][key], b["state"][k][key])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pth"))


# ------------------------------------------------------------------------------- end to end
def test_three_stages_end_to_end_and_resume(tmp_path, cache_dir, init_model, capsys):
    common = _common(cache_dir)
    g = tmp_path / "global"
    assert _train("global", "--data", DATA, "--val", VAL, "--out", str(g), "--model", str(init_model),
                  "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "4", "--refresh-steps", "3",
                  "--db-sample", "60", "--lr", "1e-4", *common) == 0
    for name in ("last.safetensors", "best.safetensors", "metrics.csv", "curves.png", "train_state.json",
                 "train_state.safetensors", "train.log"):
        assert (g / name).is_file(), name
    assert list((g / "tb").glob("events.out.tfevents.*"))
    rows = _metrics(g)
    assert len(rows) == 1 and rows[0]["step"] == "3" and float(rows[0]["val_R@5"]) >= 0
    # A second run into the same directory without --resume is refused; so is resuming it as another stage.
    assert _train("global", "--data", DATA, "--out", str(g), "--model", str(init_model), *common) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _train("rerank", "--data", DATA, "--out", str(g), "--resume", "--epochs", "2", *common) == 2
    assert "holds a 'global' run" in capsys.readouterr().err
    # Resume: continues at epoch 2 from step 3, with the optimizer state.
    assert _train("global", "--data", DATA, "--val", VAL, "--out", str(g), "--model", str(init_model),
                  "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "4", "--refresh-steps", "3",
                  "--db-sample", "60", "--lr", "1e-4", "--resume", *common) == 0
    rows = _metrics(g)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["step"] == "6"
    state = json.loads((g / "train_state.json").read_text())["scalars"]
    assert state["global_step"] == 6 and state["epoch"] == 2
    opt_step = [v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(g / "train_state.safetensors")).items() if k.endswith("/step")]
    assert opt_step and all(float(v) == 6 for v in opt_step)

    r = tmp_path / "rerank"
    before = load_model(g / "best.safetensors")
    assert _train("rerank", "--data", DATA, "--val", VAL, "--out", str(r), "--model", str(g / "best.safetensors"),
                  "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--rerank-top", "10",
                  *common) == 0
    after = load_model(r / "best.safetensors")
    rows = _metrics(r)
    assert rows[0]["val_rerank_R@5"] != "" and float(rows[0]["rerank_loss"]) > 0
    # Backbone frozen, local head and reranker trained.
    assert torch.equal(before.backbone.blocks[0].attn.qkv.weight, after.backbone.blocks[0].attn.qkv.weight)
    assert not torch.equal(before.local_head.weight, after.local_head.weight)
    assert float(after.reranker.ratio.detach()) == pytest.approx(0.5)

    f = tmp_path / "finetune"
    assert _train("finetune", "--end-to-end", "--global-loss", "infonce", "--data", DATA, "--val", VAL, "--out",
                  str(f), "--model", str(r / "best.safetensors"), "--epochs", "1", "--steps-per-epoch", "2",
                  "--batch-size", "3", "--refresh-steps", "2", "--mining-groups", "1", *common) == 0
    tuned = load_model(f / "best.safetensors")
    rows = _metrics(f)
    assert float(rows[0]["infonce_loss"]) > 0 and float(rows[0]["rerank_loss"]) > 0
    assert not torch.equal(after.backbone.blocks[0].attn.qkv.weight, tuned.backbone.blocks[0].attn.qkv.weight)
    assert (f / "curves.png").stat().st_size > 1000


def test_torchrun_two_processes(tmp_path, cache_dir, init_model):
    # Render first in this process (the cache is shared), so the subprocess run is quick.
    open_dataset(DATA, "train", cache_dir, (96, 128), SPACING, 2, 2)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "r2former_core.cli.main", "train", "global", "--data", DATA, "--out", str(out),
           "--model", str(init_model), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "3",
           "--refresh-steps", "2", "--db-sample", "60", "--lr", "1e-4", "--cache-dir", str(cache_dir),
           "--spacing", str(SPACING), "--no-progress", "--threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log_text = (out / "train.log").read_text()
    assert "world size 2" in log_text
    saved = load_model(out / "last.safetensors")
    # Both ranks end with the same weights, and they are the ones rank 0 saved.
    prints = [line.split("fingerprint ")[-1].strip() for line in (proc.stdout + proc.stderr).splitlines()
              if "final model fingerprint" in line]
    assert len(prints) == 2 and set(prints) == {saved.fingerprint}, prints
    init = load_model(init_model)
    assert not torch.equal(saved.backbone.blocks[0].attn.qkv.weight, init.backbone.blocks[0].attn.qkv.weight)
    assert (out / "best.safetensors").is_file()
    # Rank 0 wrote one row per epoch; the other rank wrote nothing of its own.
    assert len(_metrics(out)) == 1
    assert _metrics(out)[0]["step"] == "2"


def test_photometric_augment_changes_lighting_only():
    from r2former_core.model.preprocess import preprocess_batch
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 16, 20, 3), dtype=np.uint8)
    x = preprocess_batch(imgs, (16, 20))
    y = photometric_augment(x, torch.Generator().manual_seed(1))
    y2 = photometric_augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.equal(y, y2)                      # seeded: reproducible
    assert not torch.allclose(y, x)                # lighting changed
    # Still in the normalised range of [0, 1] RGB images.
    lo = (0 - 0.485) / 0.229 - 1e-4
    hi = (1 - 0.406) / 0.225 + 1e-4
    assert float(y.min()) >= lo - 1.2 and float(y.max()) <= hi + 1.2
    # Geometry untouched: per-image spatial structure stays strongly correlated with the original.
    for i in range(len(x)):
        a, b = x[i].mean(0).flatten(), y[i].mean(0).flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.5


def test_train_config_rejects_unknown_augment(tmp_path):
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig(stage="global", out=tmp_path, augment="mixup")


# ------------------------------------------------------------------------------ dense stage
def test_dense_correspondence_loss_rewards_matching_tokens():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(2, 12, 128, generator=g), dim=-1)
    src = torch.arange(2, 10)
    dst = src + 2                                     # B is A shifted by two tokens
    b = torch.zeros_like(a)
    b[:, dst] = a[:, src]
    b[:, :2], b[:, 2:4] = a[:, 10:], a[:, :2]         # the tokens outside the overlap
    good = dense_correspondence_loss(a, b, src, dst)
    shuffled = dense_correspondence_loss(a, b[:, torch.randperm(12, generator=g)], src, dst)
    assert good < 0.1 and shuffled > 1.0


def test_synthetic_map_drives_are_pixel_aligned(cache_dir):
    spec = SyntheticSpec((11,), ("day", "night", "fog"), (96, 128), SPACING, map_drives=2, query_drives=1)
    data = synthetic_dataset(spec, cache_dir)
    assert data.aligned is not None and data.aligned.shape[1] == 2 and len(data.aligned) == len(data.database) // 2
    a, b = data.aligned[:, 0], data.aligned[:, 1]
    assert np.array_equal(data.database.xy[a], data.database.xy[b])            # one pose ...
    i = len(a) // 2
    assert not np.array_equal(data.database.image(int(a[i])), data.database.image(int(b[i])))   # two conditions
    one = synthetic_dataset(SyntheticSpec((11,), ("day", "night"), (96, 128), SPACING, 1, 1), cache_dir)
    assert one.aligned is None


def test_dense_stage_trains_backbone_and_local_head_only(tmp_path, cache_dir, init_model):
    out = tmp_path / "dense"
    assert _train("dense", "--data", DATA, "--val", VAL, "--out", str(out), "--model", str(init_model),
                  "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--mining-groups", "1",
                  *_common(cache_dir)) == 0
    before, after = load_model(init_model), load_model(out / "best.safetensors")
    rows = _metrics(out)
    assert float(rows[0]["dense_loss"]) > 0 and float(rows[0]["infonce_loss"]) > 0 and rows[0]["val_R@5"] != ""
    assert not torch.equal(before.backbone.blocks[0].attn.qkv.weight, after.backbone.blocks[0].attn.qkv.weight)
    assert not torch.equal(before.local_head.weight, after.local_head.weight)
    for (name, x), y in zip(before.reranker.state_dict().items(), after.reranker.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_dense_stage_refuses_data_without_aligned_pairs(tmp_path, cache_dir, init_model):
    assert _train("dense", "--data", DATA, "--map-drives", "1", "--out", str(tmp_path / "d"), "--model",
                  str(init_model), "--epochs", "1", "--steps-per-epoch", "1", *_common(cache_dir)) == 2


def test_xavier_reranker_keeps_the_local_head(tiny_config):
    model = build_model(tiny_config, seed=1)
    head, rr = model.local_head.weight.clone(), model.reranker.pair_head.weight.clone()
    reinit_reranker_xavier(model, local_head=False)              # --reranker-init xavier_reranker
    assert torch.equal(model.local_head.weight, head) and not torch.equal(model.reranker.pair_head.weight, rr)
    reinit_reranker_xavier(model)                                # --reranker-init xavier
    assert not torch.equal(model.local_head.weight, head)
