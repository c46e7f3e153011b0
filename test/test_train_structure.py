"""The training package's structure: no import cycle in r2former_core, the config and the stages as data
(defaults per stage, ConfigError for bad values, the command line built from the fields), the batch sources
behind one interface, each stage = its spec + batch source + loss terms, device choice under torchrun, and the
fp16 gradient scaler (initial scale, state restored on resume)."""
from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from r2former_core.cli.main import build_parser
from r2former_core.cli.main import main as cli_main
from r2former_core.cli.train import configs_from_args
from r2former_core.errors import ConfigError, DataError, DeviceError
from r2former_core.features import images_to_tensor
from r2former_core.model import build_model
from r2former_core.train.batches import (
    AlignedPairs,
    GroupBatch,
    HardNegativePairs,
    PairBatch,
    TripletMining,
)
from r2former_core.train.checkpointing import restore_grad_scaler
from r2former_core.train.config import STAGES, RunOptions, TrainConfig, option_fields
from r2former_core.train.datasets import ArrayImageList, PlaceDataset
from r2former_core.train.distributed import DistInfo, select_device
from r2former_core.train.losses import InfoNCETerm
from r2former_core.train.stages import (
    ALWAYS_FROZEN,
    BATCH_SOURCES,
    LOSS_TERMS,
    StageNet,
    build_stage,
)
from r2former_core.train.trainer import GRAD_SCALE_HEADROOM, MEASURED_SAFE_SCALE, initial_grad_scale

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "r2former_core"
CPU = DistInfo()          # one process on the CPU


# ------------------------------------------------------------------------------ import graph
def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _import_graph() -> dict[str, set[str]]:
    """module -> the r2former_core modules it imports (at module level or inside functions; not under
    `if TYPE_CHECKING:`), from the source with `ast`."""
    modules = dict(_module_name(p) for p in PACKAGE.rglob("*.py"))

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in PACKAGE.rglob("*.py"):
        module, is_package = _module_name(path)
        package = module if is_package else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                found = known(t) if t.startswith("r2former_core") else None
                if found and found != module:
                    graph[module].add(found)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_r2former_core_has_no_import_cycle():
    graph = _import_graph()
    # The graph sees relative, absolute and in-function imports.
    assert {"r2former_core.train.validation", "r2former_core.train.stages"} <= graph["r2former_core.train.trainer"]
    assert "r2former_core.train.trainer" in graph["r2former_core.cli.train"]         # imported inside run()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # The checker finds a cycle when there is one (validation importing the trainer back, as it once did).
    graph["r2former_core.train.validation"].add("r2former_core.train.trainer")
    assert _cycle(graph) is not None


def test_every_module_of_r2former_core_imports_in_a_fresh_interpreter():
    code = ("import importlib, pkgutil, r2former_core\n"
            "names = ['r2former_core'] + [m.name for m in\n"
            "                             pkgutil.walk_packages(r2former_core.__path__, 'r2former_core.')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "print(len(names))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == len(_import_graph())


# ---------------------------------------------------------------------------- config as data
def test_stage_defaults_come_from_the_stage_specs(tmp_path):
    per_stage = {of.name for of in option_fields(TrainConfig) if of.per_stage}
    assert per_stage == {"optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "negs", "batch_size"}
    for name, spec in STAGES.items():
        assert set(spec.defaults) == per_stage, name
        cfg = TrainConfig(stage=name, out=tmp_path)
        for key, value in spec.defaults.items():
            assert getattr(cfg, key) == value, (name, key)
        assert TrainConfig(stage=name, out=tmp_path, lr=0.123, negs=3).lr == 0.123    # a given value wins
    assert TrainConfig(stage="rerank", out=tmp_path).lr == 5e-4 and TrainConfig(stage="global", out=tmp_path).lr == 1e-5
    assert TrainConfig(stage="global", out=tmp_path).optimizer == "adam"


def test_stage_specs_name_existing_sources_losses_and_parameters(tiny_config):
    names = [n for n, _ in build_model(tiny_config, seed=0).named_parameters()]
    for spec in STAGES.values():
        assert spec.batches in BATCH_SOURCES and all(loss in LOSS_TERMS for loss in spec.losses), spec.name
        for prefix in spec.frozen + ALWAYS_FROZEN + spec.eval_modules:
            assert any(n == prefix or n.startswith(prefix + ".") for n in names), (spec.name, prefix)
    for cls in (TrainConfig, RunOptions):
        for of in option_fields(cls):
            assert set(of.stages) <= set(STAGES), of.name


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage="pretrain"), "unknown training stage"),
    (dict(lr=-1.0), "lr"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(batch_size=0), "batch_size"),
    (dict(epochs="3"), "epochs"),
    (dict(amp="yes"), "amp"),
    (dict(negs=1.5), "negs"),
    (dict(soft_radius=5.0), "soft_radius"),
    (dict(schedule="step"), "schedule"),
])
def test_train_config_raises_config_error(tmp_path, kwargs, match):
    kwargs = {"stage": "global", "out": tmp_path, **kwargs}
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="gpu"), "device"), (dict(device="cuda:x"), "device"), (dict(render_size="128"), "render_size"),
    (dict(spacing=0.0), "spacing"), (dict(map_drives=0), "map_drives"), (dict(config=("depth=2", 3)), "config"),
])
def test_run_options_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RunOptions(data="synthetic:1", **kwargs)


def _parse(*argv: str):
    return build_parser().parse_args(["train", *argv])


def test_cli_builds_the_configs_from_the_fields(tmp_path):
    out = str(tmp_path / "run")
    cfg, run, unused = configs_from_args(_parse("rerank", "--data", "synthetic:1-3", "--out", out))
    assert cfg == TrainConfig(stage="rerank", out=Path(out)) and unused == []
    assert run == RunOptions(data="synthetic:1-3")
    cfg, run, unused = configs_from_args(_parse(
        "rerank", "--data", "synthetic:1", "--out", out, "--lr", "1e-3", "--no-amp", "--end-to-end",
        "--val-threshold", "10", "--no-progress", "--device", "cuda:1", "--config", "depth=2", "--config",
        "image_size=64,80", "--render-size", "64x80", "--resume", "--dense-shift", "2"))
    assert (cfg.lr, cfg.amp, cfg.end_to_end, cfg.val_threshold_m, cfg.progress) == (1e-3, False, True, 10.0, False)
    assert cfg.batch_size == STAGES["rerank"].defaults["batch_size"]          # not given: the stage's default
    assert (run.device, run.config, run.render_hw, run.resume) == ("cuda:1", ("depth=2", "image_size=64,80"),
                                                                     (64, 80), True)
    assert unused == ["--end-to-end", "--dense-shift"]                         # not used by rerank: warned

def test_every_config_field_is_a_documented_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    for cls in (TrainConfig, RunOptions):
        for of in option_fields(cls):
            assert of.flag in help_text, of.flag
    assert {f.name for f in fields(TrainConfig)} - {of.name for of in option_fields(TrainConfig)} == {"stage", "out"}


@pytest.mark.parametrize("argv", [["--lr", "-1"], ["--batch-size", "0"], ["--device", "gpu"], ["--negs", "two"],
                                  ["--optimizer", "sgd"], ["--render-size", "big"]])
def test_cli_rejects_bad_values_as_usage_errors(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("global", "--data", "synthetic:1", "--out", str(tmp_path), *argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_stage_help_shows_that_stages_defaults(capsys):
    for argv in (["train", "rerank", "--help"], ["train", "--help"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        if "rerank" in argv:
            assert "learning rate (default for rerank: 0.0005)" in text
            assert "(default for rerank: 64)" in text
            assert "[not used by rerank; dense only]" in text          # --dense-shift
            assert "dense ours, for training from scratch" not in text  # only this stage's summary
        else:
            assert "learning rate (default: global 1e-05, rerank 0.0005, finetune 1e-05, dense 0.0002)" in text
            assert "dense ours, for training from scratch" in text


@pytest.mark.parametrize("argv, message", [
    (["--data", "synthetic:abc"], "seeds"),
    (["--data", "synthetic:1:sunny"], "unknown condition"),
    (["--data", "folder:/tmp"], "unknown kind"),
    (["--data", "synthetic:1", "--config", "depth=deep"], "depth"),
    (["--data", "synthetic:1", "--device", "cuda:99"], "cuda:99"),
    (["--data", "vg:/nonexistent/root"], "no split folder"),
])
def test_train_cli_user_errors_are_one_line(tmp_path, argv, message, capsys):
    status = cli_main(["--log-level", "ERROR", "train", "global", "--out", str(tmp_path / "run"), "--cache-dir",
                       str(tmp_path / "cache"), "--preset", "r2former_tiny", "--config", "depth=1", *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------ devices
def test_select_device_under_torchrun():
    assert select_device("auto", 0, 1, 0) == torch.device("cpu")
    assert select_device("auto", 0, 1, 1) == torch.device("cuda", 0)
    assert select_device("cuda", 1, 2, 2) == torch.device("cuda", 1)           # rank r on cuda:LOCAL_RANK
    assert select_device("auto", 1, 2, 2) == torch.device("cuda", 1)
    assert select_device("cpu", 1, 2, 2) == torch.device("cpu")
    assert select_device("cuda:1", 0, 1, 2) == torch.device("cuda", 1)
    # Two processes on a one-GPU machine: a clear DeviceError instead of "invalid device ordinal".
    with pytest.raises(DeviceError, match=r"1 visible GPU.*--nproc_per_node <= 1.*--device cpu"):
        select_device("auto", 1, 2, 1)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        select_device("cuda", 0, 1, 0)
    with pytest.raises(DeviceError, match="2 visible GPU"):
        select_device("cuda:2", 0, 1, 2)
    with pytest.raises(DeviceError, match="LOCAL_RANK"):
        select_device("cuda:0", 0, 2, 2)                                        # one GPU for every rank: refused
    with pytest.raises(DeviceError, match="unknown device"):
        select_device("tpu", 0, 1, 0)


# ------------------------------------------------------------------------------- grad scaler
def test_initial_grad_scale_is_below_the_measured_safe_scale():
    scale = initial_grad_scale()
    assert scale == 2.0 ** 10 and math.log2(scale).is_integer()
    assert scale * GRAD_SCALE_HEADROOM <= MEASURED_SAFE_SCALE
    # torch's default initial scale is above what was measured safe (its first steps were skipped).
    assert torch.amp.GradScaler("cpu").get_scale() > MEASURED_SAFE_SCALE
    assert initial_grad_scale(2.0 ** 20) > scale > initial_grad_scale(2.0 ** 8)
    assert initial_grad_scale(3000.0, 1.0) == 2048.0


@pytest.mark.parametrize("init_scale, taken", [(initial_grad_scale(), True), (2.0 ** 16, False)])
def test_first_fp16_step_is_taken_with_the_initial_scale(tiny_config, init_scale, taken):
    """Real fp16 arithmetic (autocast on the CPU; the CPU GradScaler has the CUDA one's logic): one InfoNCE step
    of a fresh tiny model. With the trainer's initial scale the first optimizer step is taken; with torch's
    default, 2**16, its gradients overflow and the step is skipped (issue 13: Adam's step count lagged)."""
    rng = np.random.default_rng(0)
    images = images_to_tensor(list(rng.integers(0, 256, (24, *tiny_config.image_size, 3), dtype=np.uint8)),
                              tiny_config.image_size)
    model = build_model(tiny_config, seed=0).train()
    net = StageNet(model, [InfoNCETerm()])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _ = net(GroupBatch(images, 3))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert bool(opt.state) == taken                       # Adam keeps state only for a step it took
    assert scaler.get_scale() == (init_scale if taken else init_scale / 2)


def test_restore_grad_scaler_only_between_enabled_scalers():
    saved = {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}
    on = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert restore_grad_scaler(on, saved) and on.state_dict() == saved
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert not restore_grad_scaler(fresh, {})              # saved by a run without scaling: keep the initial scale
    assert fresh.get_scale() == 1024.0
    off = torch.amp.GradScaler("cuda", enabled=False)       # this run does not scale (CPU, --no-amp)
    assert not restore_grad_scaler(off, saved) and off.state_dict() == {}


# ------------------------------------------------------------------------------ batch sources
@pytest.fixture(scope="module")
def places(tiny_config) -> PlaceDataset:
    """Two worlds 100 km apart; per world two pixel-aligned map drives of 30 poses 2 m apart (a noisy copy of
    each image) and 30 queries 0.5 m beside them. Each place has its own random image."""
    rng = np.random.default_rng(0)
    h, w = tiny_config.image_size
    db_imgs, db_xy, q_imgs, q_xy, db_groups, q_groups, aligned = [], [], [], [], [], [], []
    for world in range(2):
        base = rng.integers(0, 256, (30, h, w, 3), dtype=np.uint8)
        xy = np.stack([np.arange(30) * 2.0 + world * 100_000.0, np.zeros(30)], 1)
        start = len(db_xy) * 30
        for _ in range(2):                      # two map drives
            noisy = np.clip(base.astype(int) + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
            db_imgs.append(noisy)
            db_xy.append(xy)
            db_groups.append(np.full(30, world))
        aligned.append(start + np.stack([np.arange(30), 30 + np.arange(30)], 1))
        q_imgs.append(base)
        q_xy.append(xy + [0.5, 0.0])
        q_groups.append(np.full(30, world))
    return PlaceDataset("two worlds", ArrayImageList(db_imgs, np.concatenate(db_xy)),
                        ArrayImageList(q_imgs, np.concatenate(q_xy)), {}, np.concatenate(db_groups),
                        np.concatenate(q_groups), np.concatenate(aligned))


def _cfg(tmp_path, stage: str, **kw) -> TrainConfig:
    return TrainConfig(stage=stage, out=tmp_path, extract_batch=20, progress=False, **kw)


def test_triplet_mining_source(tmp_path, tiny_config, places):
    model = build_model(tiny_config, seed=0)
    cfg = _cfg(tmp_path, "global", batch_size=3, negs=2, refresh_steps=2, db_sample=40, global_loss="infonce")
    source = TripletMining(cfg, places, model, CPU)
    source.prepare()
    source.start_epoch(0)
    batch = source.next_batch(0, 0)
    assert isinstance(batch, GroupBatch) and batch.group == 4 and batch.queries == 3
    assert batch.images.shape == (12, 3, *tiny_config.image_size)
    assert batch.valid is not None and batch.valid.shape == (3, 9)
    assert bool(batch.valid[np.arange(3), np.arange(3) * 3].all())            # its own positive: always allowed
    for t in source.triplets:      # the 10 m / 25 m rules
        q = places.queries.xy[t.query]
        assert np.linalg.norm(places.database.xy[t.positive] - q) <= 10.0
        assert all(np.linalg.norm(places.database.xy[n] - q) > 25.0 for n in t.negatives)
    first = list(source.triplets)
    source.next_batch(1, 1)
    assert source.refresh == 1
    source.next_batch(2, 2)                                                    # refresh_steps 2: mined again
    assert source.refresh == 2 and source.triplets != first
    again = TripletMining(cfg, places, model, CPU)                             # seeded: the same triplets
    again.start_epoch(0)
    again.next_batch(0, 0)
    assert again.triplets == first


def test_hard_negative_pairs_source(tmp_path, tiny_config, places):
    model = build_model(tiny_config, seed=0)
    source = HardNegativePairs(_cfg(tmp_path, "rerank", batch_size=4, negs=1, rerank_top=8), places, model, CPU)
    source.prepare()
    assert source.hardest.shape == (60, 8)
    for row, q in enumerate(source.positives.trainable):
        q_xy = places.queries.xy[q]
        negs = source.hardest[row][source.hardest[row] >= 0]
        assert len(negs) and np.all(np.linalg.norm(places.database.xy[negs] - q_xy, axis=1) > 25.0)
        assert np.linalg.norm(places.database.xy[source.best_positive[row]] - q_xy) <= 10.0
    source.start_epoch(0)
    batches = [source.next_batch(s, s) for s in range(16)]                   # 60 queries / 4: wraps around once
    assert all(isinstance(b, GroupBatch) and b.group == 3 and b.valid is None for b in batches)
    assert batches[0].images.shape == (12, 3, *tiny_config.image_size)


def test_aligned_pairs_source(tmp_path, tiny_config, places):
    model = build_model(tiny_config, seed=0)
    cfg = _cfg(tmp_path, "dense", batch_size=3, dense_shift=2, mining_groups=1)
    source = AlignedPairs(cfg, places, model, CPU)
    batch = source.next_batch(0, 5)
    assert isinstance(batch, PairBatch) and batch.images.shape == (6, 3, *tiny_config.image_size)
    dy, dx = batch.shift
    assert abs(dy) <= 1 and abs(dx) <= 2
    assert torch.equal(source.next_batch(0, 5).images, batch.images)          # drawn from the step: resumable
    # Every second view, rolled back, is the pixel-aligned partner of its first view.
    table = images_to_tensor([places.database.image(i) for i in range(len(places.database))], tiny_config.image_size)
    partner = {int(a): int(b) for a, b in places.aligned} | {int(b): int(a) for a, b in places.aligned}
    p = tiny_config.patch_size
    worlds = set()
    for i in range(3):
        a = int(np.flatnonzero((table == batch.images[i]).flatten(1).all(1))[0])
        back = torch.roll(batch.images[3 + i], shifts=(-dy * p, -dx * p), dims=(1, 2))
        keep = (slice(None), slice(max(0, dy * p), table.shape[2] + min(0, dy * p)),
                slice(max(0, dx * p), table.shape[3] + min(0, dx * p)))
        assert torch.equal(back[keep], table[partner[a]][keep])
        worlds.add(int(places.db_groups[a]))
    assert len(worlds) == 1                                                    # mining_groups 1: one world


def test_sources_refuse_data_they_cannot_use(tmp_path, tiny_config, places):
    model = build_model(tiny_config, seed=0)
    no_pairs = PlaceDataset("no pairs", places.database, places.queries)
    with pytest.raises(DataError, match="pixel-aligned"):
        AlignedPairs(_cfg(tmp_path, "dense"), no_pairs, model, CPU)
    far = PlaceDataset("far", places.database, ArrayImageList([np.zeros((2, 8, 8, 3), np.uint8)],
                                                                np.full((2, 2), 5e6)))
    with pytest.raises(DataError, match="no query has a database image within 10 m"):
        TripletMining(_cfg(tmp_path, "global"), far, model, CPU)
    tiny = PlaceDataset("tiny", places.database, places.queries, {}, places.db_groups, places.q_groups)
    source = TripletMining(_cfg(tmp_path, "global", batch_size=64, refresh_steps=1), tiny, model, CPU)
    source.start_epoch(0)
    with pytest.raises(DataError, match="too small"):
        source.next_batch(0, 0)


# ------------------------------------------------------------------------- stages = spec + code
@pytest.mark.parametrize("stage, extra, parts", [
    ("global", {}, {"triplet_loss"}),
    ("rerank", {}, {"rerank_loss"}),
    ("finetune", {"global_loss": "infonce"}, {"infonce_loss", "rerank_loss"}),
    ("dense", {}, {"dense_loss", "infonce_loss"}),
])
def test_each_stage_is_its_spec_a_source_and_its_losses(tmp_path, tiny_config, places, stage, extra, parts):
    model = build_model(tiny_config, seed=0)
    cfg = _cfg(tmp_path, stage, batch_size=2, rerank_top=8, db_sample=40, **extra)
    built = build_stage(cfg, model, places, CPU)
    spec = STAGES[stage]
    assert isinstance(built.source, BATCH_SOURCES[spec.batches])
    frozen = spec.frozen + ALWAYS_FROZEN
    for name, p in model.named_parameters():
        assert p.requires_grad != any(name == f or name.startswith(f + ".") for f in frozen), name
    built.source.prepare()
    built.source.start_epoch(0)
    batch = built.source.next_batch(0, 0)
    built.set_train_mode()
    assert model.training and all(not model.get_submodule(m).training for m in spec.eval_modules)
    loss, named = built.net(batch)
    assert set(named) == parts and torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(sum(float(v.detach()) for v in named.values()), rel=1e-5)
    loss.backward()
    learned = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learned == {"global": {"backbone"}, "rerank": {"local_head", "reranker"},
                       "finetune": {"backbone", "local_head", "reranker"}, "dense": {"backbone", "local_head"}}[stage]
