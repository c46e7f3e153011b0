"""Compare this implementation with reference outputs of the official R2Former code.

The reference folder (a development aid, not shipped) holds a checkpoint in the official
layout, four images and the official outputs for them. Protocol:
  1. load the checkpoint strictly;
  2. extract features of the images; compare global descriptors, the selection score over all
     patches, the selected patch set, and the local rows aligned by patch index;
  3. rerank the *saved* official features (query q against all references) and compare the
     match probability and the final score.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from .checkpoint import load_model
from .preprocess import preprocess


@dataclass
class ParityRow:
    output: str
    max_abs_diff: float
    ok: bool
    note: str = ""


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_parity(folder: str | Path, tolerance: float = 1e-4, device: str = "cpu",
                 precision: str = "fp32") -> list[ParityRow]:
    """Compare every output with the official arrays of `folder` (module docstring); fp32 on any device is
    the exact check (TF32 is off on CUDA)."""
    folder = Path(folder)
    ckpt = folder / "checkpoint_official_layout.pth"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{folder} is not an official reference folder (no {ckpt.name})")
    model = load_model(ckpt, device=device, precision=precision)
    images = sorted(folder.glob("img*.png"), key=lambda p: int(p.stem[3:]))
    x = torch.cat([preprocess(_read_rgb(p), size=model.cfg.image_size) for p in images])
    feats = model.extract(x)
    rows: list[ParityRow] = []

    def compare(name: str, ours: np.ndarray, ref: np.ndarray, note: str = "") -> None:
        if ours.shape != ref.shape:
            rows.append(ParityRow(name, float("inf"), False, f"shape {ours.shape} vs {ref.shape}"))
            return
        diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
        rows.append(ParityRow(name, diff, diff <= tolerance, note))

    compare("global_desc", feats.global_desc.numpy(), np.load(folder / "global_desc.npy"))
    compare("cls_attention_map", feats.attention.numpy(), np.load(folder / "cls_attention_map.npy"))
    ref_index = np.load(folder / "local_token_index.npy")
    ref_local = np.load(folder / "local_feats.npy")
    ours_index = feats.token_index.numpy()
    same_sets = all(set(a) == set(b) for a, b in zip(ours_index, ref_index))
    rows.append(ParityRow("local_token_set", 0.0 if same_sets else float("inf"), same_sets,
                          "selected patch sets equal" if same_sets else "selected patch sets differ"))
    if same_sets:
        ours_aligned = np.stack([feats.local.numpy()[b][np.argsort(ours_index[b])] for b in range(len(images))])
        ref_aligned = np.stack([ref_local[b][np.argsort(ref_index[b])] for b in range(len(images))])
        compare("local_feats", ours_aligned, ref_aligned, "rows aligned by patch index")

    g = torch.from_numpy(np.load(folder / "global_desc.npy"))
    loc = torch.from_numpy(ref_local)
    probs, finals = [], []
    for q in range(len(g)):
        out = model.rerank(g[q], loc[q], g, loc)
        probs.append(out.match_prob.numpy())
        finals.append(out.final_score.numpy())
    compare("pair_local_prob", np.stack(probs), np.load(folder / "pair_local_prob.npy"), "on the saved features")
    compare("pair_final_score", np.stack(finals), np.load(folder / "pair_final_score.npy"), "on the saved features")
    return rows
