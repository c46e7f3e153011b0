"""The model: official parameter contract, fast path == literal reference, checkpoint loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reference_r2former import reference_extract, reference_rerank

from r2former_core.model import (
    CheckpointError,
    ModelConfig,
    build_model,
    load_model,
    preprocess,
    save_model,
    save_official_checkpoint,
)
from r2former_core.model.checkpoint import official_state_dict

DATA = Path(__file__).parent / "data"


def randomized(model):
    """Random weights with clearly non-uniform attention (timm's init leaves it almost flat)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.12)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "token" in name or "pos_embed" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def deits():
    return randomized(build_model(ModelConfig(), seed=3))


def random_images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.randn(b, 3, h // 8, w // 8, generator=g), size=(h, w),
                                             mode="bilinear", align_corners=False)
    return smooth + 0.3 * torch.randn(b, 3, h, w, generator=g)


def test_state_dict_is_the_official_contract():
    contract = {}
    for line in (DATA / "official_state_dict_keys.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        contract[key[len("module."):]] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    ours = {k: tuple(v.shape) for k, v in official_state_dict(build_model(ModelConfig())).items()}
    assert ours == contract
    assert sum(int(np.prod(s)) for s in ours.values()) == 22433539


def test_attention_is_not_uniform(deits):
    feats = deits.extract(random_images(1, 224, 224))
    a = feats.local[0, :, 2]
    assert a[0] == 1.0 and a.min() < 0.8   # the selection really discriminates


@pytest.mark.parametrize("size", [(224, 224), (360, 480), (480, 640)])
def test_fast_extraction_equals_reference(deits, size):
    images = random_images(2, *size, seed=size[0])
    fast = deits.extract(images)
    sd = {k: v.detach() for k, v in deits.state_dict().items()}
    with torch.no_grad():
        g, local, index, score = reference_extract(sd, deits.cfg, images)
    n = min(500, (size[0] // 16) * (size[1] // 16))
    assert fast.local.shape == (2, n, 131)
    assert fast.global_desc.shape == (2, 256)
    assert torch.allclose(fast.global_desc, g, atol=1e-4, rtol=0)
    assert torch.allclose(fast.attention, score, atol=1e-4, rtol=0)
    for b in range(2):
        assert set(fast.token_index[b].tolist()) == set(index[b].tolist())
        ours = fast.local[b][torch.argsort(fast.token_index[b])]
        ref = local[b][torch.argsort(index[b])]
        assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


def test_local_rows_follow_official_layout(deits):
    feats = deits.extract(random_images(1, 480, 640))
    local, index = feats.local[0], feats.token_index[0]
    assert torch.all(local[:-1, 2] >= local[1:, 2])              # attention descending
    assert torch.allclose(local[:, 0], (16 * (index % 40) + 8) / 640.0)
    assert torch.allclose(local[:, 1], (16 * (index // 40) + 8) / 640.0)
    assert local[:, 1].max() <= 0.7375 + 1e-6


def test_offset_quirk_switch(deits):
    """Quirk on: feature of patch p comes from sequence position p (patch p-2); off: its own."""
    images = random_images(1, 224, 224, seed=5)
    on = deits.extract(images)
    deits.cfg.__dict__["offset_quirk"] = False   # frozen dataclass: flip for this check only
    try:
        off = deits.extract(images)
        sd = {k: v.detach() for k, v in deits.state_dict().items()}
        with torch.no_grad():
            _, local, index, _ = reference_extract(sd, deits.cfg, images)
    finally:
        deits.cfg.__dict__["offset_quirk"] = True
    assert torch.equal(on.token_index, off.token_index)
    assert not torch.allclose(on.local[..., 3:], off.local[..., 3:])
    assert torch.allclose(off.local[0][torch.argsort(off.token_index[0])], local[0][torch.argsort(index[0])],
                          atol=1e-4, rtol=0)


def test_fast_rerank_equals_reference(deits):
    feats = deits.extract(random_images(5, 240, 320, seed=11))
    q_g, q_l = feats.global_desc[0], feats.local[0]
    out = deits.rerank(q_g, q_l, feats.global_desc, feats.local)
    sd = {k: v.detach() for k, v in deits.state_dict().items()}
    with torch.no_grad():
        logits, prob, final = reference_rerank(sd, deits.cfg, q_g.expand(5, -1), q_l.expand(5, -1, -1),
                                               feats.global_desc, feats.local)
    assert torch.allclose(out.logits, logits, atol=1e-4, rtol=0)
    assert torch.allclose(out.match_prob, prob, atol=1e-4, rtol=0)
    assert torch.allclose(out.final_score, final, atol=1e-4, rtol=0)
    # Pair-wise (training) forward agrees with the single-query path.
    with torch.no_grad():
        pairs = deits.reranker(q_g.expand(5, -1), q_l.expand(5, -1, -1), feats.global_desc, feats.local)
    assert torch.allclose(pairs.match_prob, prob, atol=1e-4, rtol=0)


def test_rerank_is_independent_of_chunking_and_accepts_float16(tiny_model):
    feats = tiny_model.extract(random_images(7, 96, 128, seed=2))
    a = tiny_model.rerank(feats.global_desc[0], feats.local[0], feats.global_desc, feats.local, chunk=2)
    b = tiny_model.rerank(feats.global_desc[0], feats.local[0], feats.global_desc, feats.local, chunk=100)
    assert torch.allclose(a.match_prob, b.match_prob, atol=1e-6)
    half = tiny_model.rerank(feats.global_desc[0].numpy(), feats.local[0].numpy(),
                             feats.global_desc.numpy().astype(np.float16), feats.local.numpy().astype(np.float16))
    assert half.match_prob.shape == (7,) and half.match_prob.dtype == torch.float32
    assert torch.allclose(half.match_prob, a.match_prob, atol=2e-2)
    empty = tiny_model.rerank(feats.global_desc[0], feats.local[0], feats.global_desc[:0], feats.local[:0])
    assert empty.match_prob.shape == (0,)


def test_rerank_ranks_the_same_place_first(deits):
    """Identical images must beat unrelated ones on the global score and be self-consistent."""
    images = random_images(3, 224, 224, seed=9)
    feats = deits.extract(torch.cat([images[:1], images]))
    out = deits.rerank(feats.global_desc[0], feats.local[0], feats.global_desc[1:], feats.local[1:])
    assert torch.argmax(out.global_score) == 0
    assert abs(float(out.global_score[0]) - 1.0) < 1e-5


def test_preprocess_matches_the_official_pipeline():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    x = preprocess(image)
    assert x.shape == (1, 3, 480, 640)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((image / 255.0 - mean) / std).transpose(2, 0, 1)
    assert np.allclose(x[0].numpy(), expected, atol=1e-5)
    small = preprocess(image[::2, ::2])          # resized after normalisation
    assert small.shape == (1, 3, 480, 640)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(image.astype(np.float32))


def test_official_layout_round_trip(tmp_path, tiny_model):
    path = save_official_checkpoint(tiny_model, tmp_path / "official.pth")
    loaded = load_model(path, config=tiny_model.cfg)
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.fingerprint == tiny_model.fingerprint
    assert not loaded.training


def test_safetensors_round_trip_carries_config(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.cfg == tiny_model.cfg
    assert loaded.fingerprint == tiny_model.fingerprint
    images = random_images(2, 96, 128)
    assert torch.equal(loaded.extract(images).global_desc, tiny_model.extract(images).global_desc)


def test_fingerprint_changes_with_weights(tiny_config):
    a, b = build_model(tiny_config, seed=0), build_model(tiny_config, seed=0)
    assert a.fingerprint == b.fingerprint
    with torch.no_grad():
        b.local_head.bias[0] += 1e-3
    assert a.fingerprint != b.fingerprint


def test_mismatched_checkpoint_names_the_keys(tmp_path, tiny_model):
    state = {"module." + k: v for k, v in official_state_dict(tiny_model).items()}
    state.pop("module.Reranker.ratio")
    state["module.backbone.extra_thing"] = torch.zeros(2)
    state["module.local_head.bias"] = torch.zeros(7)
    torch.save({"model_state_dict": state, "epoch_num": 1}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth", config=tiny_model.cfg)
    msg = str(err.value)
    assert "missing keys: Reranker.ratio" in msg
    assert "unexpected keys: backbone.extra_thing" in msg
    assert "mis-shaped keys: local_head.bias (file (7,), model (16,))" in msg


def test_wrong_configuration_is_refused(tmp_path, tiny_model):
    path = save_official_checkpoint(tiny_model, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_model(path)          # default DeiT-S configuration does not fit


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupted_checkpoint_gives_a_clear_error(tmp_path, tiny_model, damage):
    for saver, name in ((save_official_checkpoint, "m.pth"), (save_model, "m.safetensors")):
        path = saver(tiny_model, tmp_path / name)
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "flip":
            data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
            data[:4] = b"\x00\x00\xff\xff"
        elif damage == "garbage":
            data = bytearray(b"this is not a checkpoint" * 10)
        else:
            data = bytearray()
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_model(path, config=tiny_model.cfg)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth")


def test_imagenet_deit_weights_load_backbone_only(tmp_path):
    """A DeiT-S distilled ImageNet file (224 grid, 1000 classes) initialises the backbone."""
    cfg = ModelConfig(image_size=(224, 320))
    donor = build_model(ModelConfig(image_size=(224, 224)), seed=4).backbone.state_dict()
    donor["head.weight"] = torch.randn(1000, 384)
    donor["head.bias"] = torch.randn(1000)
    donor["head_dist.weight"] = torch.randn(1000, 384)
    donor["head_dist.bias"] = torch.randn(1000)
    torch.save({"model": donor}, tmp_path / "deit_small_distilled.pth")
    model = load_model(tmp_path / "deit_small_distilled.pth", config=cfg)
    sd = model.backbone.state_dict()
    assert torch.equal(sd["blocks.3.mlp.fc1.weight"], donor["blocks.3.mlp.fc1.weight"])
    assert torch.equal(sd["head.weight"], donor["head.weight"][:256])
    assert sd["pos_embed"].shape == (1, 2 + 14 * 20, 384)
    assert torch.equal(sd["pos_embed"][:, :2], donor["pos_embed"][:, :2])
    assert model.extract(random_images(1, 224, 320)).local.shape == (1, 280, 131)


def _from_scratch_config(**kw) -> ModelConfig:
    return ModelConfig(image_size=(64, 96), embed_dim=48, depth=2, num_heads=2, num_local=12, offset_quirk=False,
                       **kw)


def test_instance_norm_makes_features_invariant_to_channel_gain_and_offset():
    """input_norm=instance: a per-channel affine change of the input (global lighting) changes nothing."""
    images = random_images(2, 64, 96)
    gain = torch.tensor([0.4, 0.6, 0.5]).view(1, 3, 1, 1)
    shift = torch.tensor([-0.8, -0.3, 0.2]).view(1, 3, 1, 1)
    relit = images * gain + shift
    inorm = build_model(_from_scratch_config(input_norm="instance"), seed=3)
    a, b = inorm.extract(images), inorm.extract(relit)
    assert torch.allclose(a.global_desc, b.global_desc, atol=1e-4)
    assert torch.equal(a.token_index, b.token_index)
    assert torch.allclose(a.local, b.local, atol=1e-3)
    plain = build_model(_from_scratch_config(), seed=3)
    assert (plain.extract(images).global_desc - plain.extract(relit).global_desc).abs().max() > 1e-2


def test_conv_stem_keeps_the_token_grid_and_round_trips(tmp_path):
    cfg = _from_scratch_config(stem="conv", input_norm="instance")
    model = build_model(cfg, seed=1)
    assert any(k.startswith("backbone.patch_embed.stem.") for k in model.state_dict())
    feats = model.extract(random_images(2, 64, 96))
    assert feats.attention.shape == (2, (64 // 16) * (96 // 16)) and feats.local.shape == (2, 12, 131)
    loaded = load_model(save_model(model, tmp_path / "conv.safetensors"))
    assert loaded.cfg == cfg and loaded.fingerprint == model.fingerprint
    assert torch.equal(loaded.extract(random_images(1, 64, 96)).global_desc,
                       model.extract(random_images(1, 64, 96)).global_desc)


@pytest.mark.parametrize("field, value", [("stem", "resnet"), ("input_norm", "batch")])
def test_unknown_stem_or_input_norm_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        _from_scratch_config(**{field: value})


def test_demo_preset_is_a_from_scratch_configuration():
    from r2former_core.model import preset
    cfg = preset("r2former_demo")
    assert (cfg.stem, cfg.input_norm, cfg.grid, cfg.local_tokens) == ("conv", "instance", (8, 10), 48)
    assert preset("r2former_deits") == ModelConfig()            # the official configuration keeps the defaults


def test_preprocess_takes_read_only_buffers_without_warnings():
    """Images decoded from ROS messages or bags are often read-only views; torch must not warn on them."""
    import warnings

    from r2former_core.model import preprocess
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = preprocess(image, size=(48, 64))
    assert x.shape == (1, 3, 48, 64) and torch.isfinite(x).all()


def test_model_path_that_is_missing_or_a_directory_is_named(tmp_path):
    from r2former_core.model import load_model
    from r2former_core.model.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth")
