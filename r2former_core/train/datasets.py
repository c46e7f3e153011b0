"""Training data: a database and a query set of images with UTM-like positions (metres).

Three adapters, selected by a spec string (`open_dataset`):
  * ``synthetic:SEEDS[:CONDITIONS]``: procedural worlds (`r2former_core.synthetic`), rendered once
    into a cache folder as memory-mapped uint8 arrays (one `.npy` per drive; processes share them
    through the page cache). SEEDS: ``3``, ``1,2,5`` or ``100-119``; CONDITIONS: comma separated
    (default all). Per world, `map_drives` map drives and `query_drives` query drives cycle through
    the conditions so that a world's queries never share the condition of its map drives when
    there are enough conditions. Worlds are placed 100 km apart so no two worlds share a place.
  * ``vg:ROOT``: the VG-benchmark layout ``ROOT/images/{train,val,test}/{database,queries}/`` with
    ``@UTM_east@UTM_north@...`` file names.
  * ``msls:ROOT``: Mapillary SLS, ``ROOT/train_val/<city>/{database,query}/images/<key>.jpg`` with the
    positions in ``postprocessed.csv`` (else ``raw.csv``) of each folder (columns key, easting,
    northing). The val split is the paper's (cph, sf); train is every other city.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.sources import read_image_file
from ..errors import ConfigError, DataError
from ..features import extract_all
from ..model import R2FormerModel

log = logging.getLogger(__name__)

WORLD_SPACING_M = 100_000.0          # synthetic worlds are laid out this far apart (no shared places)
CITY_SPACING_M = 10_000_000.0        # MSLS cities: UTM zones may overlap numerically; keep them apart
MSLS_VAL_CITIES = ("cph", "sf")
MSLS_TEST_CITIES = ("miami", "athens", "buenosaires", "stockholm", "bengaluru", "kampala")


class ImageList:
    """Images with positions: `xy` (N, 2) metres and `image(i)` -> HxWx3 uint8 RGB."""

    xy: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError


class FileImageList(ImageList):
    """Image files on disk (decoded on access)."""

    def __init__(self, paths: Sequence[Path], xy: np.ndarray):
        if len(paths) != len(xy):
            raise ValueError(f"{len(paths)} paths but {len(xy)} positions")
        self.paths = [Path(p) for p in paths]
        self.xy = np.asarray(xy, np.float64).reshape(-1, 2)

    def image(self, i: int) -> np.ndarray:
        return read_image_file(self.paths[i])


class ArrayImageList(ImageList):
    """Images held in (memory-mapped) uint8 arrays, several arrays concatenated."""

    def __init__(self, arrays: Sequence[np.ndarray], xy: np.ndarray):
        self.arrays = list(arrays)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if self.offsets[-1] != len(self.xy):
            raise ValueError(f"{self.offsets[-1]} images but {len(self.xy)} positions")

    def image(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return np.asarray(self.arrays[k][i - self.offsets[k]])


@dataclass
class PlaceDataset:
    """A database and queries; positives of a query are database images within a radius."""
    name: str
    database: ImageList
    queries: ImageList
    info: dict = field(default_factory=dict)
    # Optional group (e.g. world) of every image: mining may then search one group at a time.
    db_groups: np.ndarray | None = None
    q_groups: np.ndarray | None = None
    # Optional (A, D) database indices: row a holds D images taken from the *same pose* under different
    # conditions (pixel-aligned; the synthetic worlds' map drives). Needed by the `dense` stage only.
    aligned: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.database) == 0 or len(self.queries) == 0:
            raise DataError(f"dataset {self.name}: {len(self.database)} database images and {len(self.queries)} "
                            "queries; both must be non-empty")


# --------------------------------------------------------------------------------- synthetic
@dataclass(frozen=True)
class SyntheticSpec:
    seeds: tuple[int, ...]
    conditions: tuple[str, ...]
    size: tuple[int, int] = (128, 160)
    spacing_m: float = 2.5
    map_drives: int = 2
    query_drives: int = 2


def parse_seeds(text: str) -> tuple[int, ...]:
    """'3', '1,2,5', '100-119' or a mix ('1,10-12') -> seeds in order; ConfigError when malformed."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise ConfigError(f"seeds {text!r}: {part!r} is neither a seed (e.g. 3) nor a range (e.g. 100-119)")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ConfigError(f"seeds {text!r}: the range {part!r} is empty")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise ConfigError(f"no seeds in {text!r}")
    return tuple(seeds)


def drive_conditions(index: int, conditions: Sequence[str], map_drives: int, query_drives: int
                     ) -> tuple[list[str], list[str]]:
    """Conditions of the map and query drives of the index-th world (rotating through the list)."""
    c = list(conditions)
    n = len(c)
    maps = [c[(index + j) % n] for j in range(map_drives)]
    queries = [c[(index + map_drives + j) % n] for j in range(query_drives)]
    return maps, queries


def _atomic_save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def render_drive_cached(seed: int, kind: str, condition: str, spec: SyntheticSpec, cache_dir: Path,
                        world=None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,H,W,3) uint8 memory-mapped, poses (N,7)) of one full-loop drive, rendered once."""
    h, w = spec.size
    folder = Path(cache_dir) / f"synthetic_{h}x{w}_sp{spec.spacing_m:g}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"seed{seed}_{kind}_{condition}"
    img_path, pose_path = folder / f"{stem}.images.npy", folder / f"{stem}.poses.npy"
    if not (img_path.is_file() and pose_path.is_file()):
        from ..synthetic import SyntheticWorld
        world = world or SyntheticWorld(seed)
        frames = max(2, int(math.floor(world.route_length / spec.spacing_m)))
        drive = list(world.drive(kind, (condition,), frames=frames, size=(h, w), spacing=spec.spacing_m))
        _atomic_save(img_path, np.stack([f.image for f in drive]))
        _atomic_save(pose_path, np.stack([f.pose for f in drive]))
    return np.load(img_path, mmap_mode="r"), np.load(pose_path)


def synthetic_dataset(spec: SyntheticSpec, cache_dir: str | Path, show_progress: bool = False) -> PlaceDataset:
    """Render (or reuse) the drives of every world of `spec` and assemble database + queries."""
    from ..synthetic import CONDITIONS, parse_conditions
    conditions = parse_conditions(spec.conditions) if spec.conditions else CONDITIONS
    db_arrays: list[np.ndarray] = []
    q_arrays: list[np.ndarray] = []
    db_xy: list[np.ndarray] = []
    q_xy: list[np.ndarray] = []
    db_groups: list[np.ndarray] = []
    q_groups: list[np.ndarray] = []
    aligned: list[np.ndarray] = []
    n_db = 0
    seeds = spec.seeds
    if show_progress:
        from tqdm import tqdm
        seeds = tqdm(seeds, desc="synthetic worlds", unit="world", disable=None)
    for k, seed in enumerate(seeds):
        offset = np.array([k * WORLD_SPACING_M, 0.0])
        maps, queries = drive_conditions(k, conditions, spec.map_drives, spec.query_drives)
        world = None
        for kind, conds, arrays, xys, groups in (("map", maps, db_arrays, db_xy, db_groups),
                                                 ("query", queries, q_arrays, q_xy, q_groups)):
            for cond in conds:
                images, poses = render_drive_cached(seed, kind, cond, spec, Path(cache_dir), world)
                arrays.append(images)
                xys.append(poses[:, :2] + offset)
                groups.append(np.full(len(poses), k, np.int64))
        # The map drives of a world follow the same lane at the same spacing: frame i of each is one pose
        # (pixel-aligned pairs when their conditions differ).
        lengths = [len(a) for a in db_arrays[len(db_arrays) - len(maps):]]
        if len(maps) >= 2 and len(set(maps)) == len(maps) and len(set(lengths)) == 1:
            starts = n_db + np.arange(len(maps)) * lengths[0]
            aligned.append(starts[None, :] + np.arange(lengths[0])[:, None])
        n_db += sum(lengths)
    info = {"seeds": list(spec.seeds), "conditions": list(conditions), "size": list(spec.size),
            "spacing_m": spec.spacing_m}
    return PlaceDataset(f"synthetic:{len(spec.seeds)} worlds", ArrayImageList(db_arrays, np.concatenate(db_xy)),
                        ArrayImageList(q_arrays, np.concatenate(q_xy)), info, np.concatenate(db_groups),
                        np.concatenate(q_groups), np.concatenate(aligned) if aligned else None)


# -------------------------------------------------------------------------------------- VG
def vg_dataset(root: str | Path, split: str) -> PlaceDataset:
    """VG-benchmark split (`train`, `val` or `test`) of a dataset root (or of `ROOT/images`)."""
    from ..data.sources import VGFolderSource
    root = Path(root)
    base = root / "images" / split if (root / "images").is_dir() else root / split
    if not base.is_dir():
        raise DataError(f"VG dataset {root}: no split folder {base} (expected ROOT/images/{{train,val,test}}/"
                        "{database,queries}/ with @UTM_east@UTM_north@ file names)")
    lists = []
    for part in ("database", "queries"):
        src = VGFolderSource(base / part)
        _, poses = src.poses()
        if not np.all(np.isfinite(poses[:, :2])):
            raise DataError(f"{base / part}: some file names carry no UTM position")
        lists.append(FileImageList(src.paths, poses[:, :2]))
    return PlaceDataset(f"vg:{root.name}/{split}", lists[0], lists[1], {"root": str(root), "split": split})


# ------------------------------------------------------------------------------------ MSLS
def _read_msls_csv(folder: Path) -> dict[str, tuple[float, float]]:
    for name in ("postprocessed.csv", "raw.csv"):
        path = folder / name
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            missing = [c for c in ("key", "easting", "northing") if c not in cols]
            if missing:
                if name == "postprocessed.csv" and (folder / "raw.csv").is_file():
                    continue
                raise DataError(f"{path}: missing column(s) {missing}; MSLS csv files hold key, easting, northing")
            return {row[cols["key"]].strip(): (float(row[cols["easting"]]), float(row[cols["northing"]]))
                    for row in reader}
    raise DataError(f"MSLS folder {folder} has neither postprocessed.csv nor raw.csv")


def msls_dataset(root: str | Path, split: str = "train", cities: Sequence[str] | None = None) -> PlaceDataset:
    """MSLS `train` (all cities but cph/sf and the test cities) or `val` (cph, sf) of `ROOT/train_val`."""
    root = Path(root)
    base = root / "train_val" if (root / "train_val").is_dir() else root
    if not base.is_dir():
        raise DataError(f"MSLS root {root} does not exist")
    available = sorted(p.name for p in base.iterdir() if (p / "database").is_dir() and (p / "query").is_dir())
    if cities is None:
        if split == "val":
            cities = [c for c in available if c in MSLS_VAL_CITIES]
        elif split == "train":
            cities = [c for c in available if c not in MSLS_VAL_CITIES and c not in MSLS_TEST_CITIES]
        else:
            raise ConfigError(f"MSLS split must be 'train' or 'val', not {split!r}")
    if not cities:
        raise DataError(f"MSLS root {base}: no city folders with database/ and query/ for split {split!r} "
                        f"(found {available})")
    lists: dict[str, tuple[list[Path], list[np.ndarray]]] = {"database": ([], []), "query": ([], [])}
    for k, city in enumerate(cities):
        for part in ("database", "query"):
            folder = base / city / part
            positions = _read_msls_csv(folder)
            images = folder / "images"
            paths, xys = lists[part]
            for key in sorted(positions):
                path = images / f"{key}.jpg"
                if not path.is_file():
                    raise DataError(f"MSLS {folder}: image {path.name} listed in the csv is missing")
                paths.append(path)
                xys.append(np.asarray(positions[key]) + [k * CITY_SPACING_M, 0.0])
    db = FileImageList(lists["database"][0], np.asarray(lists["database"][1]).reshape(-1, 2))
    q = FileImageList(lists["query"][0], np.asarray(lists["query"][1]).reshape(-1, 2))
    return PlaceDataset(f"msls:{split}({','.join(cities)})", db, q, {"root": str(root), "cities": list(cities)})


# ------------------------------------------------------------------------------------ spec
def open_dataset(spec: str, split: str, cache_dir: str | Path, size: tuple[int, int] = (128, 160),
                 spacing_m: float = 2.5, map_drives: int = 2, query_drives: int = 2,
                 show_progress: bool = False) -> PlaceDataset:
    """Dataset from a command-line spec (see the module docstring); `split` is train or val.
    ConfigError for a malformed spec, DataError for data that is missing or cannot be used."""
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ConfigError(f"dataset spec {spec!r}: expected synthetic:SEEDS[:CONDITIONS], vg:PATH or msls:PATH")
    if kind == "synthetic":
        from ..synthetic import CONDITIONS
        seeds_text, _, cond_text = rest.partition(":")
        conditions = tuple(c.strip().lower() for c in cond_text.split(",") if c.strip())
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise ConfigError(f"dataset spec {spec!r}: unknown condition(s) {', '.join(unknown)}; allowed: "
                              f"{', '.join(CONDITIONS)}")
        return synthetic_dataset(SyntheticSpec(parse_seeds(seeds_text), conditions, (size[0], size[1]), spacing_m,
                                               map_drives, query_drives), cache_dir, show_progress)
    if kind == "vg":
        return vg_dataset(rest, split)
    if kind == "msls":
        return msls_dataset(rest, split)
    raise ConfigError(f"dataset spec {spec!r}: unknown kind {kind!r}; use synthetic:, vg: or msls:")


def extract_descriptors(model: R2FormerModel, images: ImageList, ids: np.ndarray, batch: int, local: bool = False,
                        progress: bool = False, desc: str = "descriptors") -> Any:
    """Global descriptors (len(ids), G) float32 of `images[ids]`; with `local`, also their local features
    (len(ids), N, C) float16 (as maps store them): `(global, local)`."""
    feats = extract_all(model, (images.image(int(i)) for i in ids), batch, count=len(ids), local=local,
                        local_dtype=np.float16, progress=progress, desc=desc)
    return (feats.global_desc, feats.local) if local else feats.global_desc
