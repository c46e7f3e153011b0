"""Map database: posed map images' features on disk, built once and queried many times.

A map is a directory (format spec: docs/MAP_FORMAT.md)::

    map.json               format name/version, model fingerprint + config, dims, checksums
    global.npy             (M, G) float32 or float16 global descriptors
    local.f16              (M, N, C) float16, raw C-order; read per entry, never loaded whole
    local_crc32.npy        (M,) uint32 CRC32 of each entry's local block
    poses.npy              (M, 7) float64 x y z qx qy qz qw
    stamps.npy             (M,) float64 seconds
    names.json             list of M source names
    thumbnails.bin         concatenated JPEG thumbnails
    thumbnails_index.npy   (M, 2) int64 (offset, length); length 0 = no thumbnail
    sessions.npy           (M,) int32 session id of each entry (the drive it came from); optional
    index.faiss            optional prebuilt IVF-PQ or HNSW index

Writing goes into a temporary sibling directory that is renamed to the final name once
everything (map.json last) is on disk, so a killed writer never leaves a loadable half map.
No pickle anywhere: numpy files are read with ``allow_pickle=False``.

Usage::

    with MapDatabase.create("maps/campus", fingerprint=model.fingerprint, model_config=cfg,
                            image_size=(480, 640), global_dim=256, num_local=500,
                            local_values=131, source="bag campus_2024") as writer:
        for f in features:
            writer.add(f.global_desc, f.local, f.pose, f.stamp, f.name, thumbnail=f.rgb)
    db = MapDatabase.load("maps/campus", expected_fingerprint=model.fingerprint)
    scores, idx = db.search(query_global, k=100)
    cand_local = db.local(idx[0])          # (100, 500, 131) float16, only these are read
"""
from __future__ import annotations

import array
import ctypes
import datetime as _dt
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import stat
import time
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import faiss
import numpy as np

from . import __version__
from .data.image_limits import check_encoded
from .errors import ConfigError, DeviceError, ImageDecodeError, MapError

log = logging.getLogger(__name__)

FORMAT_NAME = "r2former_ros.map"
FORMAT_VERSION = 1

MAP_JSON = "map.json"
GLOBAL_FILE = "global.npy"
LOCAL_FILE = "local.f16"
LOCAL_CRC_FILE = "local_crc32.npy"
POSES_FILE = "poses.npy"
STAMPS_FILE = "stamps.npy"
NAMES_FILE = "names.json"
THUMBS_FILE = "thumbnails.bin"
THUMBS_INDEX_FILE = "thumbnails_index.npy"
INDEX_FILE = "index.faiss"
SESSIONS_FILE = "sessions.npy"    # optional: maps written before sessions hold one session (docs/MAP_FORMAT.md)
DATA_FILES = (GLOBAL_FILE, LOCAL_FILE, LOCAL_CRC_FILE, POSES_FILE, STAMPS_FILE, NAMES_FILE,
              THUMBS_FILE, THUMBS_INDEX_FILE)
# What this writer writes: the required files plus the optional per-entry session ids.
WRITTEN_FILES = DATA_FILES + (SESSIONS_FILE,)
# Files that may be too big to hash at every load under verify="auto" (see docs/MAP_FORMAT.md).
BIG_FILES = (LOCAL_FILE, THUMBS_FILE)

AUTO_FULL_VERIFY_BYTES = 2 * 1024**3   # verify="auto": full sha256 below this total size
MAP_JSON_MAX_BYTES = 16 * 1024**2      # map.json is a few kB; anything this big is not one
JSON_CHECKSUM_KEY = "json_sha256"      # map.json's first key: sha256 of the rest of the file (map_json_text)
# How map.json begins: signed (this writer) or as written before it was signed (accepted, not verifiable).
_SIGNED_MAP_JSON = re.compile(rb'\{"' + JSON_CHECKSUM_KEY.encode() + rb'": "([0-9a-f]{64})",')
_UNSIGNED_MAP_JSON = b'{\n  "format": "r2former_ros.map",\n  "format_version": 1,\n'
THUMBNAIL_MAX_SIDE = 160
THUMBNAIL_JPEG_QUALITY = 80
POSE_LAYOUT = "x y z qx qy qz qw"
GLOBAL_DTYPES = ("float32", "float16")
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
VERIFY_MODES = ("auto", "full", "quick")
IVFPQ_MIN_COUNT = 1000             # below this an IVF-PQ index is pointless: a flat index is stored
IVFPQ_REFINE_FACTOR = 4            # IVF-PQ candidates re-scored exactly per requested neighbour
HNSW_M = 32                        # HNSW graph: neighbours per node (faiss's M)
HNSW_EF_CONSTRUCTION = 64          # HNSW build: candidate list size while linking a new node
HNSW_EF_SEARCH = 512              # HNSW search: candidate list size (at least k is used); stored in map.json
SMALL_SEARCH_WORK = 1 << 25        # multiply-adds below which a CPU search runs on one thread
GPU_MAX_K = 2048                   # faiss GPU's largest k (and nprobe) per search
GPU_SHARED_MEMORY_BYTES = 48 * 1024   # IVF-PQ lookup tables (m x 2^nbits floats per query) must fit here
_NPY_HEADER_BYTES = 128            # global.npy header is reserved up front and filled at commit
_HASH_CHUNK = 16 * 1024**2
_REBUILD = "rebuild the map with `r2former build-map`"


@dataclass(frozen=True)
class SessionInfo:
    """One drive of a map (map.json `sessions`): where its entries came from and in what conditions."""
    id: int
    name: str
    source: str
    count: int
    conditions: tuple[str, ...] = ()     # e.g. ("night", "rain"); () = not known
    created: str = ""                    # ISO 8601 UTC time the session was built
    host: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "source": self.source, "count": self.count,
                "conditions": list(self.conditions), "created": self.created, "host": self.host}


@dataclass(frozen=True)
class MapInfo:
    """What map.json says about a map (everything except checksums)."""
    path: Path
    format_version: int
    fingerprint: str
    model_config: dict
    image_size: tuple[int, int]
    global_dim: int
    num_local: int
    local_values: int
    count: int
    frame_id: str               # parent frame: the frame the poses are expressed in (e.g. map)
    created: str
    source: str
    global_dtype: str = "float32"
    index: str = "flat"
    host: str = ""
    package_version: str = ""
    child_frame: str = ""       # the frame whose pose each entry holds (camera or base); "" = not recorded
    sessions: tuple[SessionInfo, ...] = ()   # the drives of the map, by id; maps without a table: one session

    @property
    def parent_frame(self) -> str:
        return self.frame_id

    @property
    def local_entry_bytes(self) -> int:
        """Bytes of one entry's local features in local.f16."""
        return self.num_local * self.local_values * 2


# ============================================================================ helpers


def _sha256_file(path: Path, hasher: Any = None) -> str:
    h = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _sibling_pattern(name: str, kind: str) -> re.Pattern:
    return re.compile(re.escape(name) + r"\." + kind + r"-(\d+)-[0-9a-f]+$")


def _stale_siblings(final: Path, kind: str) -> list[Path]:
    """`<name>.<kind>-<pid>-<hex>` siblings of `final` whose writer process is gone."""
    if not final.parent.is_dir():
        return []
    pattern = _sibling_pattern(final.name, kind)
    stale = []
    for entry in final.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(m.group(1))):
            stale.append(entry)
    return sorted(stale)


def _cleanup_stale(final: Path) -> None:
    """Remove temporary directories of dead writers; put back a map an interrupted overwrite moved away."""
    for old in _stale_siblings(final, "old"):
        if not final.exists():
            log.warning("restoring map %s from %s (an overwrite was interrupted before the new map was in place)",
                        final, old.name)
            os.rename(old, final)
        else:
            log.info("removing %s (previous map of an interrupted overwrite)", old)
            _remove_tree(old)
    for tmp in _stale_siblings(final, "tmp"):
        log.info("removing %s (temporary directory of an interrupted map build)", tmp)
        _remove_tree(tmp)


def _bytes_text(n: int) -> str:
    """A size for people: 1.2 GB, 340.5 MB, 12.0 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _is_map_dir(path: Path) -> bool:
    return (path / MAP_JSON).is_file()


def map_json_text(doc: dict) -> str:
    """map.json as written: the document (indented JSON) whose first key, `json_sha256`, is the sha256 of the
    bytes of the same text without that key, i.e. of ``"{" + text[len('{"json_sha256": "<hex>",'):]``.

    Checked on the bytes, so every changed byte of the file is found, including one in the checksum's own
    key (which a check of the parsed document would take for a map written before maps were signed)."""
    body = json.dumps({k: v for k, v in doc.items() if k != JSON_CHECKSUM_KEY}, indent=2, ensure_ascii=False) + "\n"
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f'{{"{JSON_CHECKSUM_KEY}": "{digest}",' + body[1:]


def _check_map_json_bytes(root: Path, raw: bytes) -> None:
    signed = _SIGNED_MAP_JSON.match(raw)
    if signed:
        if hashlib.sha256(b"{" + raw[signed.end():]).hexdigest() != signed.group(1).decode():
            raise MapError(f"{MAP_JSON} in {root} is corrupted: its content does not match its own checksum "
                           f"({JSON_CHECKSUM_KEY}); the file changed after the map was built: {_REBUILD} or restore "
                           "it from a backup")
    elif raw.startswith(_UNSIGNED_MAP_JSON):
        log.debug("%s in %s carries no checksum (written before maps were signed)", MAP_JSON, root)
    else:
        raise MapError(f"{MAP_JSON} in {root} is damaged or was edited: it does not begin with its checksum "
                       f"({JSON_CHECKSUM_KEY}); {_REBUILD} or restore it from a backup")


# What a map entry name must not contain: control characters, an absolute start, a '..' component. With
# re.M it also checks all names at once, joined by newlines (which the first class leaves out for that).
_BAD_NAME = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]|^(?:[/\\]|[A-Za-z]:[\\/])|(?:^|[\\/])\.\.(?:[\\/]|$)", re.M)


def entry_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a map entry name, or None. Names are labels (file names, bag stamps, relative
    paths such as 'seq/000013.png'); none is ever opened, but tools join them to folders, so a name must not
    leave one: no absolute path, no '..' component, no control characters."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if re.search(r"[\x00-\x1f\x7f]", name):
        return "contains control characters"
    if re.match(r"[/\\]|[A-Za-z]:[\\/]", name):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "has a '..' component (it would point outside a folder it is joined to)"
    return None


def _make_thumbnail(image: np.ndarray) -> bytes:
    """Resize an RGB uint8 image so its longest side is at most 160 px and JPEG-encode it."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"thumbnail must be a uint8 RGB image, got dtype {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"thumbnail must be an (H, W, 3) RGB image, got shape {img.shape}")
    img = img[:, :, :3]
    h, w = img.shape[:2]
    scale = THUMBNAIL_MAX_SIDE / max(h, w)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding of the thumbnail failed")
    return buf.tobytes()


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy version 1.0 header of exactly _NPY_HEADER_BYTES bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    header = buf.getvalue()
    if len(header) != _NPY_HEADER_BYTES:
        raise AssertionError(f"unexpected .npy header length {len(header)}")
    return header


def _pq_params(count: int, dim: int) -> tuple[int, int, int]:
    """(nlist, m, nbits) for an IVF-PQ index over `count` vectors of `dim` dims.

    nlist ~ 4 sqrt(M), capped so every list gets >= 39 training points; m is the largest divisor of
    dim giving sub-vectors of at least 4 dims (at most 64 sub-quantizers); 8 bits per sub-code.
    The index is trained on the very vectors it encodes, so small maps with fewer than
    39 x 256 vectors still get 256 centroids per sub-quantizer (over-fitting cannot hurt here).
    """
    nlist = max(1, min(round(4 * math.sqrt(count)), count // 39))
    m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0 and (dim // d >= 4 or d == 1))
    return nlist, m, 8


def _faiss_gpu_available() -> bool:
    """True only when faiss was built with GPU support AND sees a GPU.

    On CPU-only machines index_cpu_to_all_gpus silently returns an empty index, so every GPU
    path must be guarded by this check.
    """
    return (hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus")
            and faiss.get_num_gpus() > 0)


def _gpu_id_for(device: str) -> int | None:
    """The faiss GPU to search on for a device string, or None for CPU."""
    name = str(device).strip().lower()
    if name == "cpu":
        return None
    if name not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise DeviceError(f"unknown device {device!r}; choose cpu, auto, cuda or cuda:N")
    if not _faiss_gpu_available():
        if name != "auto":
            log.warning("device %s requested but faiss has no GPU support or sees no GPU: searching on CPU", device)
        return None
    return int(name.split(":")[1]) if ":" in name else 0


def _gpu_index(cpu_index: Any, gpu_id: int, global_desc: np.ndarray) -> tuple[Any, Any]:
    """(resources, GPU index) searching the same vectors as `cpu_index` on GPU `gpu_id`.

    faiss GPU has no flat scalar-quantizer index, so a float16 flat map is searched through a float32
    flat copy; an IVF-PQ index whose float32 lookup tables (m x 2^nbits per query) exceed the 48 KiB of
    shared memory faiss GPU allows uses float16 lookup tables (`useFloat16LookupTables`) instead of
    silently falling back to a slow path. Raises whatever faiss raises; the caller falls back to CPU.
    """
    res = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    source = cpu_index
    if isinstance(cpu_index, faiss.IndexScalarQuantizer):
        source = faiss.IndexFlatIP(cpu_index.d)
        source.add(np.ascontiguousarray(global_desc, dtype=np.float32))
        log.info("float16 flat map: faiss GPU has no float16 flat index, searching a float32 copy of its %d "
                 "descriptors on the GPU (%.0f MB)", cpu_index.ntotal, cpu_index.ntotal * cpu_index.d * 4 / 2**20)
    elif isinstance(cpu_index, faiss.IndexIVFPQ):
        pq = cpu_index.pq
        table_bytes = pq.M * (1 << pq.nbits) * 4
        if table_bytes > GPU_SHARED_MEMORY_BYTES:
            options.useFloat16 = True    # IVF-PQ: float16 lookup tables
            log.info("IVF-PQ map with m=%d sub-quantizers: float32 lookup tables need %d KiB of GPU shared memory "
                     "(at most %d KiB), using float16 lookup tables", pq.M, table_bytes // 1024,
                     GPU_SHARED_MEMORY_BYTES // 1024)
    index = faiss.index_cpu_to_gpu(res, gpu_id, source, options)
    if index.ntotal != cpu_index.ntotal:
        raise RuntimeError(f"GPU index holds {index.ntotal} vectors, expected {cpu_index.ntotal}")
    return res, index


def _buffer_owned_by(index: Any, ptr_array: np.ndarray, dtype: np.dtype, shape: tuple[int, int]) -> np.ndarray:
    """A numpy view of faiss-owned memory that keeps `index` alive as long as the view exists."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_uint8 * nbytes).from_address(ptr_array.ctypes.data)
    raw._owner = index  # type: ignore[attr-defined]
    return np.frombuffer(raw, dtype=dtype).reshape(shape)  # type: ignore[call-overload]


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns False when the kernel, C library or filesystem does not support it (the caller then
    falls back to two renames); raises OSError for any other failure.
    """
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _rows(x: Any, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(x[start:stop], dtype=np.float32)


def build_ivfpq_index(x: Any) -> tuple[Any, dict]:
    """An IVF-PQ inner-product index over the (M, G) rows of `x` (array or memmap), trained on them.

    Returns (faiss index, the map.json `index` record). Parameters: see `_pq_params`.
    """
    M, G = x.shape
    nlist, m, nbits = _pq_params(M, G)
    n_train = min(M, max(64 * nlist, 39 * 2**nbits))
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(M, n_train, replace=False)) if n_train < M else np.arange(M)
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(G)
    index = faiss.IndexIVFPQ(quantizer, G, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.min_points_per_centroid = 1    # small maps: see _pq_params, silences faiss's warning
    index.train(np.ascontiguousarray(x[train], dtype=np.float32))
    for s in range(0, M, 65536):
        index.add(_rows(x, s, s + 65536))
    log.info("IVF-PQ index built: nlist=%d m=%d nbits=%d trained on %d vectors in %.1f s",
             nlist, m, nbits, n_train, time.perf_counter() - t0)
    return index, {"type": "ivfpq", "file": INDEX_FILE, "nlist": nlist, "m": m, "nbits": nbits,
                   "metric": "inner_product", "refine_factor": IVFPQ_REFINE_FACTOR}


def build_hnsw_index(x: Any, global_dtype: str = "float32", m: int = HNSW_M,
                     ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH) -> tuple[Any, dict]:
    """An HNSW inner-product graph over the (M, G) rows of `x`; returns (faiss index, map.json record).

    The graph's storage holds the descriptors exactly as the map stores them (float32 rows, or
    float16 through a QT_fp16 scalar quantizer), so its scores are the exact inner products of the
    vectors it visits and no re-scoring is needed; at load the storage is the map's `global_desc`.
    """
    M, G = x.shape
    t0 = time.perf_counter()
    index: Any
    if global_dtype == "float16":
        index = faiss.IndexHNSWSQ(G, faiss.ScalarQuantizer.QT_fp16, m,  # type: ignore[arg-type]
                                  faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWFlat(G, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        index.train(_rows(x, 0, min(M, 1000)))     # QT_fp16 needs no statistics; faiss wants the call
    # One add of all vectors (a float32 copy of them in RAM meanwhile): faiss links a batch's vertices level
    # by level, and adding in chunks of 65536 built a much worse graph (recall of the top 100 0.72 instead of
    # 0.99 on 300k map-like descriptors, bench/index_scale.py).
    index.add(_rows(x, 0, M))
    log.info("HNSW index built: %d vectors, M=%d efConstruction=%d in %.1f s", M, m, ef_construction,
             time.perf_counter() - t0)
    return index, {"type": "hnsw", "file": INDEX_FILE, "m": m, "ef_construction": ef_construction,
                   "ef_search": ef_search, "metric": "inner_product"}


# ============================================================================ writer


class MapWriter:
    """Streams map entries into a temporary directory; `commit` makes the map appear atomically.

    Returned by :meth:`MapDatabase.create`. As a context manager it commits on normal exit and
    aborts (removes the temporary directory) when the block raises. Not thread-safe.
    """

    def __init__(self, final: Path, *, fingerprint: str, model_config: dict, image_size: tuple[int, int],
                 global_dim: int, num_local: int, local_values: int, frame_id: str, source: str, index: str,
                 overwrite: bool, global_dtype: str, child_frame: str = "") -> None:
        self.path = final
        self._meta = dict(fingerprint=fingerprint, model_config=model_config, image_size=list(image_size),
                          frame_id=frame_id, child_frame=child_frame, source=source)
        self._G, self._N, self._C = global_dim, num_local, local_values
        self._index_type = index
        self._overwrite = overwrite
        self._gdtype = np.dtype(global_dtype)
        self._count = 0
        self._state = "open"
        self.database: MapDatabase | None = None

        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.parent / f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._tmp.mkdir()
        # An uncommitted writer that is garbage collected (or a process that exits without
        # committing) removes its temporary directory; a killed one is cleaned by the next writer.
        self._finalizer = weakref.finalize(self, _remove_tree, self._tmp)
        self._global_f = open(self._tmp / GLOBAL_FILE, "wb")
        self._global_f.write(b"\0" * _NPY_HEADER_BYTES)
        self._local_f = open(self._tmp / LOCAL_FILE, "wb")
        self._thumb_f = open(self._tmp / THUMBS_FILE, "wb")
        self._local_sha = hashlib.sha256()
        self._thumb_sha = hashlib.sha256()
        self._crc = array.array("I")
        self._poses = array.array("d")
        self._stamps = array.array("d")
        self._thumb_index = array.array("q")
        self._thumb_offset = 0
        self._names: list[str] = []
        self._session_ids = array.array("i")
        self._sessions: list[dict] = []
        log.debug("writing map into %s", self._tmp)

    # ----------------------------------------------------------------- adding entries
    @property
    def count(self) -> int:
        return self._count

    @property
    def session(self) -> int | None:
        """Id of the session that entries are added to now (None before the first one begins)."""
        return len(self._sessions) - 1 if self._sessions else None

    @property
    def session_count(self) -> int:
        """Entries added to the current session so far."""
        return self._sessions[-1]["count"] if self._sessions else 0

    @property
    def global_dtype(self) -> np.dtype:
        return self._gdtype

    @property
    def dims(self) -> tuple[int, int, int]:
        """(global_dim, num_local, local_values) of the map's entries."""
        return self._G, self._N, self._C

    def begin_session(self, name: str = "", source: str | None = None, conditions: Sequence[str] = (),
                      created: str | None = None, host: str | None = None) -> int:
        """Start a new session (one drive): the entries added from now on belong to it. Returns its id.

        A writer whose first entry comes before any `begin_session` starts one session named after
        the map's source. `created`/`host` default to now and this host (a merge passes the
        original session's). Sessions left without entries are dropped at commit.
        """
        self._require_open()
        conds = tuple(str(c).strip() for c in conditions if str(c).strip())
        self._sessions.append({"name": str(name), "source": self._meta["source"] if source is None else str(source),
                               "conditions": list(conds), "created": created or _utc_now(),
                               "host": socket.gethostname() if host is None else str(host), "count": 0})
        return len(self._sessions) - 1

    def add(self, global_desc: np.ndarray, local: np.ndarray, pose: Sequence[float] | np.ndarray, stamp: float,
            name: str, thumbnail: np.ndarray | None = None) -> int:
        """Append one entry: global (G,), local (N, C) any float dtype (stored float16), pose (7,).

        Returns the entry's index in the map.
        """
        local = np.asarray(local)
        if local.shape != (self._N, self._C):
            raise ValueError(f"local features must have shape ({self._N}, {self._C}), got {local.shape}")
        self.add_batch(np.asarray(global_desc)[None], local[None], np.asarray(pose, dtype=np.float64)[None],
                       [stamp], [name], None if thumbnail is None else [thumbnail])
        return self._count - 1

    def add_batch(self, global_descs: np.ndarray, locals_: np.ndarray, poses: np.ndarray,
                  stamps: Sequence[float] | np.ndarray, names: Sequence[str],
                  thumbnails: Sequence[np.ndarray | None] | None = None) -> None:
        """Append B entries: global (B, G), local (B, N, C), poses (B, 7), stamps (B,), names (B,)."""
        self._require_open()
        g = np.asarray(global_descs)
        B = len(names)
        if g.shape != (B, self._G):
            raise ValueError(f"global descriptors must have shape ({B}, {self._G}), got {g.shape}")
        loc = np.asarray(locals_)
        if loc.shape != (B, self._N, self._C):
            raise ValueError(f"local features must have shape ({B}, {self._N}, {self._C}), got {loc.shape}")
        p = np.asarray(poses, dtype=np.float64)
        if p.shape != (B, 7):
            raise ValueError(f"poses must have shape ({B}, 7) ({POSE_LAYOUT}), got {p.shape}")
        st = np.asarray(stamps, dtype=np.float64).reshape(-1)
        if st.shape != (B,):
            raise ValueError(f"expected {B} stamps, got {st.shape[0]}")
        if thumbnails is not None and len(thumbnails) != B:
            raise ValueError(f"expected {B} thumbnails (or None), got {len(thumbnails)}")
        for n in names:
            problem = entry_name_problem(n)
            if problem:
                raise ValueError(f"entry name {n!r} {problem}")
        if not np.issubdtype(g.dtype, np.floating) or not np.issubdtype(loc.dtype, np.floating):
            raise ValueError("global descriptors and local features must be floating point arrays")
        with np.errstate(over="ignore"):   # overflow shows up as inf and is refused just below
            g = np.ascontiguousarray(g, dtype=self._gdtype)
            loc = np.ascontiguousarray(loc, dtype=np.float16)
        if not np.isfinite(g).all():
            raise ValueError(f"global descriptors contain NaN/inf (or overflow {self._gdtype})")
        if not np.isfinite(loc).all():
            raise ValueError("local features contain NaN/inf (or values beyond the float16 range)")
        if not np.isfinite(p).all() or not np.isfinite(st).all():
            raise ValueError("poses and stamps must be finite")
        qn = np.linalg.norm(p[:, 3:], axis=1)
        if (qn < 1e-6).any():
            raise ValueError("pose quaternion (qx qy qz qw) has zero norm")
        p = p.copy()
        p[:, 3:] /= qn[:, None]
        jpegs = [b"" if t is None else _make_thumbnail(t) for t in (thumbnails or [None] * B)]
        self._append(g, loc, p, st, names, jpegs)

    def add_encoded(self, global_descs: np.ndarray, locals_: np.ndarray, poses: np.ndarray, stamps: np.ndarray,
                    names: Sequence[str], jpegs: Sequence[bytes]) -> None:
        """Append B entries exactly as another map stores them (merging, appending, sharded builds).

        global (B, G) in this map's global dtype and local (B, N, C) float16 are written bit for bit,
        poses (already unit quaternions) are not renormalised, `jpegs` are encoded thumbnails (b"" =
        none). Use `add_batch` for new features.
        """
        self._require_open()
        g, loc = np.asarray(global_descs), np.asarray(locals_)
        B = len(names)
        if g.shape != (B, self._G) or g.dtype != self._gdtype:
            raise ValueError(f"global descriptors must be {self._gdtype} ({B}, {self._G}), got {g.dtype} {g.shape}")
        if loc.shape != (B, self._N, self._C) or loc.dtype != np.float16:
            raise ValueError(f"local features must be float16 ({B}, {self._N}, {self._C}), got {loc.dtype} {loc.shape}")
        p = np.asarray(poses, dtype=np.float64)
        st = np.asarray(stamps, dtype=np.float64).reshape(-1)
        if p.shape != (B, 7) or st.shape != (B,) or len(jpegs) != B:
            raise ValueError(f"expected {B} poses (7 values), stamps and thumbnails, got {p.shape}, {st.shape}, "
                             f"{len(jpegs)}")
        self._append(np.ascontiguousarray(g), np.ascontiguousarray(loc), p, st, list(names),
                     [bytes(j) for j in jpegs])

    def _append(self, g: np.ndarray, loc: np.ndarray, p: np.ndarray, st: np.ndarray, names: Sequence[str],
                jpegs: list[bytes]) -> None:
        B = len(names)
        session = self.session if self.session is not None else self.begin_session()
        try:
            self._global_f.write(g.data.cast("B"))
            self._local_f.write(loc.data.cast("B"))
            for i in range(B):
                self._crc.append(zlib.crc32(loc[i]))
            self._local_sha.update(loc.data.cast("B"))
            for jpg in jpegs:
                self._thumb_index.extend((self._thumb_offset if jpg else 0, len(jpg)))
                if jpg:
                    self._thumb_f.write(jpg)
                    self._thumb_sha.update(jpg)
                    self._thumb_offset += len(jpg)
        except OSError as e:
            self.abort()
            raise MapError(f"writing map entries into {self._tmp} failed: {e}; the partial map was removed "
                           f"(check free disk space and permissions), nothing was written under {self.path}") from e
        self._poses.extend(p.reshape(-1).tolist())
        self._stamps.extend(st.tolist())
        self._names.extend(names)
        self._session_ids.extend([session] * B)
        self._sessions[-1]["count"] += B
        self._count += B

    # ----------------------------------------------------------------- finishing
    def commit(self) -> MapDatabase:
        """Write the remaining files and map.json (last), fsync, rename into place; return the loaded map."""
        self._require_open()
        if self._count == 0:
            self.abort()
            raise MapError(f"no entries were added to map {self.path}: nothing to commit "
                           "(check the image source and keyframe selection)")
        t0 = time.perf_counter()
        try:
            files = self._write_remaining_files()
            self._write_map_json(files)
            _fsync_dir(self._tmp)
            self._move_into_place()
        except MapError:
            self.abort()
            raise
        except OSError as e:
            self.abort()
            raise MapError(f"writing map {self.path} failed: {e}; nothing was written under that name "
                           "(check free disk space and permissions, then run the build again)") from e
        self._state = "committed"
        self._finalizer.detach()
        log.info("map written: %s (%d entries, %.1f MB, commit %.1f s)", self.path, self._count,
                 sum(f["bytes"] for f in files.values()) / 1e6, time.perf_counter() - t0)
        self.database = MapDatabase.load(self.path, expected_fingerprint=str(self._meta["fingerprint"]),
                                          verify="quick")
        return self.database

    def abort(self) -> None:
        """Discard everything written so far (removes the temporary directory)."""
        if self._state != "open":
            return
        self._state = "aborted"
        for f in (self._global_f, self._local_f, self._thumb_f):
            try:
                f.close()
            except OSError:     # closing flushes; on a full disk that fails too, and the data is discarded anyway
                pass
        self._finalizer()
        log.info("map build aborted, removed %s", self._tmp)

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()

    def _require_open(self) -> None:
        if self._state != "open":
            raise MapError(f"map writer for {self.path} was already {self._state}; create a new one")

    def _write_remaining_files(self) -> dict[str, dict]:
        M = self._count
        files: dict[str, dict] = {}

        def finish(f, name: str, sha: str | None = None) -> None:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            path = self._tmp / name
            files[name] = {"bytes": path.stat().st_size, "sha256": sha or _sha256_file(path)}

        # global.npy: fill the reserved header now that the count is known
        self._global_f.seek(0)
        self._global_f.write(_npy_header(self._gdtype, (M, self._G)))
        finish(self._global_f, GLOBAL_FILE)
        finish(self._local_f, LOCAL_FILE, self._local_sha.hexdigest())
        finish(self._thumb_f, THUMBS_FILE, self._thumb_sha.hexdigest())
        arrays = {LOCAL_CRC_FILE: np.frombuffer(self._crc, dtype=np.uint32),
                  POSES_FILE: np.frombuffer(self._poses, dtype=np.float64).reshape(M, 7),
                  STAMPS_FILE: np.frombuffer(self._stamps, dtype=np.float64),
                  THUMBS_INDEX_FILE: np.frombuffer(self._thumb_index, dtype=np.int64).reshape(M, 2)}
        arrays[SESSIONS_FILE] = self._finish_sessions()
        for name, arr in arrays.items():
            fb = open(self._tmp / name, "wb")
            np.save(fb, np.asarray(arr), allow_pickle=False)
            finish(fb, name)
        ft = open(self._tmp / NAMES_FILE, "w", encoding="utf-8")
        json.dump(self._names, ft, ensure_ascii=False)
        finish(ft, NAMES_FILE)
        self._index_params = self._build_index()
        if self._index_params["type"] != "flat":
            files[INDEX_FILE] = {"bytes": (self._tmp / INDEX_FILE).stat().st_size,
                                 "sha256": _sha256_file(self._tmp / INDEX_FILE)}
        return files

    def _finish_sessions(self) -> np.ndarray:
        """Session ids with empty sessions dropped (ids renumbered in order); fills in each count."""
        ids = np.frombuffer(self._session_ids, dtype=np.int32)
        counts = np.bincount(ids, minlength=len(self._sessions))
        used = np.flatnonzero(counts)
        renumber = np.full(len(self._sessions), -1, np.int32)
        renumber[used] = np.arange(len(used), dtype=np.int32)
        self._sessions = [dict(self._sessions[i], count=int(counts[i])) for i in used]   # counts as written
        return renumber[ids]

    def _build_index(self) -> dict:
        M = self._count
        if self._index_type == "flat":
            return {"type": "flat"}
        if self._index_type == "ivfpq" and M < IVFPQ_MIN_COUNT:
            log.warning("map has %d entries (< %d): storing no IVF-PQ index, exact search is used", M,
                        IVFPQ_MIN_COUNT)
            return {"type": "flat"}
        x = np.load(self._tmp / GLOBAL_FILE, mmap_mode="r", allow_pickle=False)
        if self._index_type == "ivfpq":
            index, params = build_ivfpq_index(x)
        else:
            index, params = build_hnsw_index(x, self._gdtype.name)
        del x
        faiss.write_index(index, str(self._tmp / INDEX_FILE))
        with open(self._tmp / INDEX_FILE, "rb+") as f:
            os.fsync(f.fileno())
        return params

    def _write_map_json(self, files: dict[str, dict]) -> None:
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": self._meta["fingerprint"],
            "model_config": self._meta["model_config"],
            "image_size": self._meta["image_size"],
            "global_dim": self._G,
            "num_local": self._N,
            "local_values": self._C,
            "count": self._count,
            "global_dtype": self._gdtype.name,
            "frame_id": self._meta["frame_id"],
            "child_frame": self._meta["child_frame"],
            "pose_layout": POSE_LAYOUT,
            "index": self._index_params,
            "created": {"time": _utc_now(), "host": socket.gethostname(), "package_version": __version__,
                        "source": self._meta["source"]},
            "sessions": [{"id": i, **rec} for i, rec in enumerate(self._sessions)],
            "files": files,
        }
        with open(self._tmp / MAP_JSON, "w", encoding="utf-8") as f:
            f.write(map_json_text(doc))
            f.flush()
            os.fsync(f.fileno())

    def _move_into_place(self) -> None:
        final = self.path
        if not final.exists():
            os.rename(self._tmp, final)
        elif not self._overwrite:
            raise MapError(f"map {final} appeared while this one was being built; nothing was overwritten. "
                           "Pass overwrite=True (--overwrite) or choose another name")
        else:
            _check_replaceable(final)
            if _exchange(self._tmp, final):
                # One atomic step: `final` is the new map and the temporary name holds the old one,
                # which a later writer removes if this process dies before it does.
                try:
                    _fsync_dir(final.parent)
                except OSError as e:
                    log.warning("fsync of %s after replacing map %s failed: %s", final.parent, final.name, e)
                _remove_tree(self._tmp)
                return
            old = final.parent / f"{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, old)
            try:
                os.rename(self._tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            _fsync_dir(final.parent)
            _remove_tree(old)
        _fsync_dir(final.parent)


def _check_replaceable(path: Path) -> None:
    if not path.is_dir():
        raise MapError(f"{path} exists and is not a directory: refusing to replace it with a map; "
                       "move it away or choose another map name")
    if not _is_map_dir(path) and any(path.iterdir()):
        raise MapError(f"{path} exists and is not a map (no {MAP_JSON}): refusing to delete it even with "
                       "overwrite=True; move it away or choose another map name")


# ============================================================================ database


class MapDatabase:
    """A loaded map: global descriptors in RAM, local features read per entry from disk.

    Attributes: ``info`` (MapInfo), ``global_desc`` (M, G) float32 (float16 for maps written with
    global_dtype="float16"; read-only), ``poses`` (M, 7) float64, ``stamps`` (M,) float64,
    ``names`` list[str], ``search_device`` ("cpu" or "cuda:N"), ``nprobe`` (IVF-PQ maps),
    ``verify_reads`` (check each local entry's CRC32 when read). Thread-safe for concurrent reads.
    """

    def __init__(self, info: MapInfo, global_desc: np.ndarray, poses: np.ndarray, stamps: np.ndarray,
                 names: list[str], local_crc: np.ndarray, thumb_index: np.ndarray, cpu_index: Any,
                 gpu_id: int | None, nprobe: int, verify_reads: bool, search_threads: int | None = None, *,
                 sessions: np.ndarray | None = None) -> None:
        self.info = info
        self.path = info.path
        self.global_desc = global_desc
        self.poses = poses
        self.stamps = stamps
        self.names = names
        self.sessions = np.zeros(len(names), np.int32) if sessions is None else sessions
        self.verify_reads = verify_reads
        self.search_threads = search_threads
        self._crc = local_crc
        self._thumb_index = thumb_index
        self._cpu_index = cpu_index
        self._is_ivf = info.index == "ivfpq"
        self._index = cpu_index
        self.search_device = "cpu"
        self._k_capped_logged = False
        if gpu_id is not None:
            try:
                self._gpu_res, self._index = _gpu_index(cpu_index, gpu_id, global_desc)
                self.search_device = f"cuda:{gpu_id}"
            except Exception as e:  # noqa: BLE001 - any faiss GPU failure falls back to the CPU index
                log.warning("faiss GPU index failed (%s): searching on CPU", e)
                self._index = cpu_index
        self.nprobe = nprobe
        self._spacing: float | None = None
        self._local_fd = os.open(self.path / LOCAL_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        self._thumb_fd = os.open(self.path / THUMBS_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        self._closer = weakref.finalize(self, _close_fds, (self._local_fd, self._thumb_fd))

    # ----------------------------------------------------------------- creation / loading
    @staticmethod
    def create(path: str | os.PathLike, *, fingerprint: str, model_config: dict, image_size: Sequence[int],
               global_dim: int, num_local: int, local_values: int, frame_id: str = "map", child_frame: str = "",
               source: str = "",
               index: str = "flat", overwrite: bool = False, global_dtype: str = "float32",
               expected_count: int | None = None) -> MapWriter:
        """Start writing a map at `path` (nothing appears there until the writer commits).

        `expected_count`, when known, is used to check free disk space before the build starts.
        """
        final = Path(path).absolute()
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string (the model's fingerprint)")
        if not isinstance(model_config, dict):
            raise ValueError(f"model_config must be a dict, got {type(model_config).__name__}")
        try:
            json.dumps(model_config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model_config must be JSON-serialisable: {e}") from e
        size = tuple(int(v) for v in image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive values, got {image_size!r}")
        for label, v in (("global_dim", global_dim), ("num_local", num_local), ("local_values", local_values)):
            if int(v) < 1:
                raise ValueError(f"{label} must be a positive integer, got {v!r}")
        if index not in INDEX_TYPES:
            raise ConfigError(f"index must be one of {INDEX_TYPES}, got {index!r}")
        if global_dtype not in GLOBAL_DTYPES:
            raise ConfigError(f"global_dtype must be one of {GLOBAL_DTYPES}, got {global_dtype!r}")
        if not isinstance(frame_id, str) or not frame_id:
            raise ValueError("frame_id must be a non-empty string")

        _cleanup_stale(final)
        if final.exists():
            if not overwrite:
                raise MapError(f"map {final} already exists: pass overwrite=True (--overwrite) to replace it, "
                               "or choose another name")
            _check_replaceable(final)
        if expected_count:
            need = MapDatabase.estimate_size(int(expected_count), int(global_dim), int(num_local), int(local_values),
                                             global_dtype=global_dtype)["disk_bytes"]
            final.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(final.parent).free
            log.info("map %s: %d images need about %s on disk (%s free)", final, expected_count, _bytes_text(need),
                     _bytes_text(free))
            if need > free:
                raise MapError(f"not enough disk space for map {final}: {expected_count} images need about "
                               f"{_bytes_text(need)}, {_bytes_text(free)} are free on {final.parent}; "
                               "free some space or write the map elsewhere")
        return MapWriter(final, fingerprint=fingerprint, model_config=model_config, image_size=size,
                         global_dim=int(global_dim), num_local=int(num_local), local_values=int(local_values),
                         frame_id=frame_id, child_frame=str(child_frame), source=str(source), index=index,
                         overwrite=overwrite,
                         global_dtype=global_dtype)

    @staticmethod
    def read_info(path: str | os.PathLike) -> MapInfo:
        """What map.json says about the map at `path` (format, model, dims, frames, sessions), without
        loading or verifying its data files."""
        root = Path(path).absolute()
        return _parse_info(root, _read_map_json(root))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None, verify: str = "auto",
             device: str = "cpu", *, nprobe: int = 16, verify_reads: bool = True,
             search_threads: int | None = None) -> MapDatabase:
        """Open a map, checking format, fingerprint, sizes and checksums (see docs/MAP_FORMAT.md).

        verify: "full" = sha256 of every file; "quick" = sizes only (local entries are still checked
        by CRC32 when read); "auto" = full below 2 GiB total, otherwise sha256 of every file except
        the big local.f16 and thumbnails.bin, whose sizes are checked.
        device: "cpu" searches on CPU; "auto"/"cuda"/"cuda:N" use a faiss GPU index when faiss has
        GPU support and sees a GPU, CPU otherwise.
        search_threads: OpenMP threads of a CPU search (in the calling thread only); None = one
        thread for small searches (< 2^25 multiply-adds, e.g. one query against 100k x 256, where
        OpenMP barriers cost more than they save, badly so on busy CPUs), faiss's default otherwise.
        """
        if verify not in VERIFY_MODES:
            raise ConfigError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        gpu_id = _gpu_id_for(device)
        t0 = time.perf_counter()
        root = Path(path).absolute()
        doc = _read_map_json(root)
        info = _parse_info(root, doc)
        if expected_fingerprint is not None and expected_fingerprint != info.fingerprint:
            raise MapError(f"map {root} was built with model {info.fingerprint}, the loaded model is "
                           f"{expected_fingerprint}: rebuild the map with this model or load the model it was "
                           "built with")
        files = _check_files(root, doc, info)
        total = sum(f["bytes"] for f in files.values())
        if verify == "full" or (verify == "auto" and total < AUTO_FULL_VERIFY_BYTES):
            to_hash = set(files)
        elif verify == "auto":
            to_hash = set(files) - set(BIG_FILES)
        else:
            to_hash = set()
        for name in sorted(to_hash - {GLOBAL_FILE}):
            _check_sha(root, name, files[name]["sha256"], _sha256_file(root / name))

        G, M = info.global_dim, info.count
        local_crc = _load_npy(root, LOCAL_CRC_FILE, np.uint32, (M,))
        poses = _load_npy(root, POSES_FILE, np.float64, (M, 7))
        stamps = _load_npy(root, STAMPS_FILE, np.float64, (M,))
        thumb_index = _load_npy(root, THUMBS_INDEX_FILE, np.int64, (M, 2))
        if ((thumb_index < 0).any() or (thumb_index[:, 0] + thumb_index[:, 1] > files[THUMBS_FILE]["bytes"]).any()):
            raise MapError(f"{THUMBS_INDEX_FILE} in {root} points outside {THUMBS_FILE}: the map is damaged; "
                           f"{_REBUILD}")
        names = _load_names(root, M)
        sessions = _load_sessions(root, doc, info)
        if info.index == "hnsw" and gpu_id is not None:
            log.info("map %s has an HNSW index, which faiss cannot search on a GPU: searching on CPU (build the map "
                     "with --index flat or ivfpq for GPU search)", root)
            gpu_id = None

        gdtype = np.dtype(info.global_dtype)
        if info.index == "ivfpq":
            global_desc = np.empty((M, G), dtype=gdtype)
            cpu_index = None
        elif info.index == "hnsw":
            # The graph's storage holds the (M, G) rows: global.npy is read into it (same bits, checked).
            cpu_index = _read_index_file(root, M, G)
            global_desc = _hnsw_storage(root, cpu_index, gdtype)
            cpu_index.hnsw.efSearch = int(doc["index"].get("ef_search", HNSW_EF_SEARCH))
        elif gdtype == np.float32:
            cpu_index = faiss.IndexFlatIP(G)
            cpu_index.codes.resize(M * G * 4)
            ptr = faiss.rev_swig_ptr(cpu_index.codes.data(), M * G * 4)
            global_desc = _buffer_owned_by(cpu_index, ptr, gdtype, (M, G))
        else:
            cpu_index = faiss.IndexScalarQuantizer(G, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            cpu_index.codes.resize(M * G * 2)
            ptr = faiss.rev_swig_ptr(cpu_index.codes.data(), M * G * 2)
            global_desc = _buffer_owned_by(cpu_index, ptr, gdtype, (M, G))
        # The faiss flat index stores exactly the (M, G) rows: read global.npy straight into it.
        _read_global_into(root, global_desc, files[GLOBAL_FILE]["sha256"] if GLOBAL_FILE in to_hash else None)
        global_desc.flags.writeable = False
        if cpu_index is None:
            cpu_index = _read_index_file(root, M, G)
        elif info.index != "hnsw":
            cpu_index.ntotal = M
        db = cls(info, global_desc, poses, stamps, names, local_crc, thumb_index, cpu_index, gpu_id,
                 nprobe, verify_reads, search_threads, sessions=sessions)
        log.info("map loaded: %s (%d entries, index %s on %s, verify=%s, %.2f s)", root, M, info.index,
                 db.search_device, verify, time.perf_counter() - t0)
        leftovers = _leftovers(root)
        if leftovers:
            log.warning("next to map %s: %d temporary director%s of interrupted builds (%s), removed by the next "
                        "build of this map or safe to delete", root, len(leftovers),
                        "y" if len(leftovers) == 1 else "ies", ", ".join(leftovers[:3]))
        return db

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return self.info.count

    @property
    def nprobe(self) -> int:
        """IVF lists visited per query (IVF-PQ maps only; ignored by exact search)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = max(1, int(value))
        if self._is_ivf:
            self._cpu_index.nprobe = self._nprobe
            if self._index is not self._cpu_index:
                self._index.nprobe = min(self._nprobe, GPU_MAX_K)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k map entries by inner product of global descriptors.

        queries (G,) or (Q, G); k is clipped to the map size. Returns scores (Q, k) float32 in
        descending order and indices (Q, k) int64. IVF-PQ candidates are re-scored exactly.
        """
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        G = self.info.global_dim
        if q.ndim != 2 or q.shape[1] != G:
            raise ValueError(f"queries must have shape ({G},) or (Q, {G}), got {np.shape(queries)}")
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(int(k), len(self))
        q = np.ascontiguousarray(q)
        if q.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        threads = self._threads_for(len(q))
        previous = faiss.omp_get_max_threads()
        if threads is not None:
            faiss.omp_set_num_threads(threads)   # OpenMP setting of the calling thread only
        try:
            if self.search_device != "cpu":
                try:
                    return self._search_index(self._index, q, k, gpu=True)
                except Exception as e:  # noqa: BLE001 - a failed GPU search must not fail the frame
                    log.warning("faiss GPU search failed (%s): searching on CPU from now on", e)
                    self._use_cpu_index()
            return self._search_index(self._index, q, k, gpu=False)
        finally:
            if threads is not None:
                faiss.omp_set_num_threads(previous)

    def _use_cpu_index(self) -> None:
        self._index = self._cpu_index
        self.search_device = "cpu"
        self._gpu_res = None
        self.nprobe = self._nprobe

    def _search_index(self, index: Any, q: np.ndarray, k: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
        if gpu and k > GPU_MAX_K:
            if not self._k_capped_logged:
                log.warning("k=%d exceeds faiss GPU's limit of %d: these searches run on the CPU", k, GPU_MAX_K)
                self._k_capped_logged = True
            return self._search_index(self._cpu_index, q, k, gpu=False)
        if not self._is_ivf:
            scores, idx = index.search(q, k)
            return scores.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)
        return self._search_ivf(index, q, k, max_k=GPU_MAX_K if gpu else None)

    def _threads_for(self, num_queries: int) -> int | None:
        if self.search_device != "cpu":
            return None
        if self.search_threads is not None:
            return max(1, int(self.search_threads))
        scanned = len(self) if not self._is_ivf else len(self) * min(1.0, self.nprobe / max(1, self._cpu_index.nlist))
        return 1 if num_queries * scanned * self.info.global_dim < SMALL_SEARCH_WORK else None

    def _search_ivf(self, index: Any, q: np.ndarray, k: int, max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ candidates (k x the refine factor, at most `max_k`: faiss GPU's limit) re-scored exactly."""
        kk = min(len(self), k * IVFPQ_REFINE_FACTOR, max_k or len(self))
        _, cand = index.search(q, kk)
        scores = np.empty((len(q), k), np.float32)
        idx = np.empty((len(q), k), np.int64)
        for i in range(len(q)):
            c = cand[i][cand[i] >= 0]
            if len(c) < k:      # too few vectors in the probed lists: exact search for this query
                scores[i], idx[i] = self._exact_search(q[i], k)
                continue
            s = self.global_desc[c].astype(np.float32) @ q[i]
            order = np.argsort(-s, kind="stable")[:k]
            scores[i], idx[i] = s[order], c[order]
        return scores, idx

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        best_s = np.zeros(0, np.float32)
        best_i = np.zeros(0, np.int64)
        for s in range(0, len(self), 262144):
            sc = self.global_desc[s:s + 262144].astype(np.float32) @ q
            top = np.argpartition(-sc, min(k, len(sc) - 1))[:k] if len(sc) > k else np.arange(len(sc))
            best_s = np.concatenate([best_s, sc[top]])
            best_i = np.concatenate([best_i, top + s])
        order = np.argsort(-best_s, kind="stable")[:k]
        return best_s[order], best_i[order]

    def local(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Local features (K, N, C) float16 of the given entries, in the given order.

        Only these K entries are read from local.f16. With ``verify_reads`` each entry's CRC32 is
        checked and a MapError names a corrupted entry.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        M, N, C = self.info.count, self.info.num_local, self.info.local_values
        if idx.size and (idx.min() < 0 or idx.max() >= M):
            bad = int(idx[(idx < 0) | (idx >= M)][0])
            raise IndexError(f"map entry {bad} out of range: map {self.path} has {M} entries")
        out = np.empty((len(idx), N, C), dtype=np.float16)
        entry = N * C * 2
        for j in np.argsort(idx, kind="stable"):   # file order: sequential-ish reads
            i = int(idx[j])
            buf = memoryview(out[j]).cast("B")
            got = os.preadv(self._local_fd, [buf], i * entry)
            if got != entry:
                raise MapError(f"{LOCAL_FILE} in {self.path} ends inside entry {i} (read {got} of {entry} bytes): "
                               f"the file is truncated; {_REBUILD}")
            if self.verify_reads and zlib.crc32(buf) != int(self._crc[i]):
                raise MapError(f"local features of map entry {i} ({self.names[i]!r}) in {self.path / LOCAL_FILE} "
                               f"are corrupted (CRC32 mismatch): {_REBUILD}; load with verify='full' to check "
                               "the whole map")
        return out

    def local_memmap(self) -> np.memmap:
        """The whole local.f16 as a read-only (M, N, C) float16 memmap (for inspection tools)."""
        return np.memmap(self.path / LOCAL_FILE, dtype=np.float16, mode="r",
                         shape=(self.info.count, self.info.num_local, self.info.local_values))

    def thumbnail(self, i: int) -> np.ndarray | None:
        """The entry's RGB uint8 thumbnail, or None when none was stored (or it cannot be decoded)."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"map entry {i} out of range: map {self.path} has {len(self)} entries")
        offset, length = (int(v) for v in self._thumb_index[i])
        if length == 0:
            return None
        data = os.pread(self._thumb_fd, length, offset)
        img = None
        if len(data) == length:
            try:    # a thumbnail is a JPEG of at most 160 x 160: never decode anything bigger
                check_encoded(data, f"thumbnail {i}", max_pixels=THUMBNAIL_MAX_SIDE * THUMBNAIL_MAX_SIDE)
                img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            except ImageDecodeError as e:
                log.debug("thumbnail %d refused: %s", i, e)
        if img is None:
            log.warning("thumbnail of map entry %d in %s cannot be decoded (damaged %s)", i, self.path, THUMBS_FILE)
            return None
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    @property
    def thumbnail_count(self) -> int:
        """How many entries have a stored thumbnail."""
        return int((np.asarray(self._thumb_index)[:, 1] > 0).sum())

    def keyframe_spacing(self) -> float:
        """Median distance (metres) between consecutive map poses of the same session (the step from
        one drive's last entry to the next drive's first is no spacing); 0.0 without such pairs."""
        if self._spacing is None:
            d = np.linalg.norm(np.diff(self.poses[:, :3], axis=0), axis=1)[self.sessions[1:] == self.sessions[:-1]]
            self._spacing = float(np.median(d)) if len(d) else 0.0
        return self._spacing

    def thumbnail_jpeg(self, i: int) -> bytes:
        """The entry's thumbnail exactly as stored (JPEG bytes; b"" = none), for copying it into another map."""
        offset, length = (int(v) for v in self._thumb_index[int(i)])
        data = os.pread(self._thumb_fd, length, offset) if length else b""
        if len(data) != length:
            raise MapError(f"{THUMBS_FILE} in {self.path} ends inside the thumbnail of entry {i}: {_REBUILD}")
        return data

    @property
    def ef_search(self) -> int | None:
        """HNSW maps: size of the search's candidate list (at least k is used); None for other indexes."""
        return int(self._cpu_index.hnsw.efSearch) if self.info.index == "hnsw" else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self.info.index != "hnsw":
            raise ConfigError(f"map {self.path} has a {self.info.index} index: ef_search applies to HNSW maps only")
        self._cpu_index.hnsw.efSearch = max(1, int(value))

    def close(self) -> None:
        """Close the open files (the arrays stay usable; local() and thumbnail() stop working)."""
        self._closer()

    def __enter__(self) -> MapDatabase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MapDatabase({str(self.path)!r}, count={len(self)}, fingerprint={self.info.fingerprint!r}, "
                f"index={self.info.index!r}, device={self.search_device!r})")

    # ----------------------------------------------------------------- sizing
    @staticmethod
    def estimate_size(count: int, global_dim: int, num_local: int, local_values: int, thumb_bytes: int = 4000,
                      global_dtype: str = "float32", name_bytes: int = 32) -> dict:
        """Bytes on disk and RAM when loaded, for a map of `count` images (before building it).

        thumb_bytes: mean JPEG thumbnail size (0 without thumbnails); name_bytes: mean name length.
        Returns {"disk_bytes", "disk_bytes_per_image", "ram_bytes", "files": {name: bytes}}.
        """
        M, G, N, C = int(count), int(global_dim), int(num_local), int(local_values)
        gsize = np.dtype(global_dtype).itemsize
        hdr = _NPY_HEADER_BYTES
        files = {GLOBAL_FILE: hdr + M * G * gsize,
                 LOCAL_FILE: M * N * C * 2,
                 LOCAL_CRC_FILE: hdr + 4 * M,
                 POSES_FILE: hdr + 56 * M,
                 STAMPS_FILE: hdr + 8 * M,
                 NAMES_FILE: 2 + M * (name_bytes + 4),
                 THUMBS_FILE: M * int(thumb_bytes),
                 THUMBS_INDEX_FILE: hdr + 16 * M,
                 SESSIONS_FILE: hdr + 4 * M,
                 MAP_JSON: 3000}
        disk = sum(files.values())
        # in RAM: global descriptors (held once, inside the faiss index), poses, stamps, CRCs,
        # thumbnail index, session ids, names as Python strings (~50 bytes overhead each)
        ram = M * G * gsize + M * (56 + 8 + 4 + 16 + 4) + M * (name_bytes + 50 + 8)
        return {"disk_bytes": disk, "disk_bytes_per_image": disk / max(M, 1), "ram_bytes": ram, "files": files}


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ============================================================================ load validation


def _read_map_json(root: Path) -> dict:
    if not root.exists():
        hint = ""
        olds = sorted(root.parent.glob(f"{root.name}.old-*")) if root.parent.is_dir() else []
        if olds:
            hint = f" ({olds[0].name} next to it holds the map an interrupted overwrite moved away: rename it back)"
        raise MapError(f"map directory {root} does not exist{hint}: check the path or build the map with "
                       "`r2former build-map`")
    if not root.is_dir():
        raise MapError(f"{root} is not a directory: a map is a directory containing {MAP_JSON}")
    mj = root / MAP_JSON
    if not mj.is_file() and not mj.is_symlink():
        raise MapError(f"{root} is not a complete map: {MAP_JSON} is missing (a build that was interrupted "
                       f"leaves no {MAP_JSON}); {_REBUILD}")
    size = _regular_file_size(root, MAP_JSON)
    if size > MAP_JSON_MAX_BYTES:
        raise MapError(f"{MAP_JSON} in {root} has {size} bytes, far more than a map.json holds: the map is damaged; "
                       f"{_REBUILD}")
    try:
        with open(mj, "rb") as f:
            raw = f.read(MAP_JSON_MAX_BYTES + 1)
        doc = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MapError(f"{MAP_JSON} in {root} is not valid JSON ({str(e)[:200]}): the map is damaged; "
                       f"{_REBUILD}") from e
    if not isinstance(doc, dict):
        raise MapError(f"{MAP_JSON} in {root} is not a JSON object: the map is damaged; {_REBUILD}")
    if doc.get("format") != FORMAT_NAME:
        raise MapError(f"{root} is not an r2former_ros map: {MAP_JSON} has format {doc.get('format')!r}, "
                       f"expected {FORMAT_NAME!r}")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise MapError(f"map {root} has format version {version!r}; this r2former_ros ({__version__}) reads format "
                       f"version {FORMAT_VERSION}: {_REBUILD} (or use the r2former_ros version that wrote it)")
    _check_map_json_bytes(root, raw)
    return doc


def _regular_file_size(root: Path, name: str) -> int:
    """Size of `root/name`, which must be a regular file (not a symbolic link, not a device or pipe)."""
    try:
        st = os.lstat(root / name)
    except FileNotFoundError:
        raise MapError(f"map {root} is incomplete: {name} is missing; {_REBUILD} (or restore the file)") from None
    if stat.S_ISLNK(st.st_mode):
        raise MapError(f"{name} in {root} is a symbolic link (to {os.readlink(root / name)!r}): a map's files must "
                       "be regular files inside the map directory; copy the map instead of linking its files")
    if not stat.S_ISREG(st.st_mode):
        raise MapError(f"{name} in {root} is not a regular file: the map is damaged; {_REBUILD}")
    return st.st_size


def _leftovers(root: Path) -> list[str]:
    """Temporary directories of dead writers of this map (removed by the next build of the same name)."""
    return [p.name for p in _stale_siblings(root, "tmp")]


def _field(root: Path, doc: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise MapError(f"{MAP_JSON} in {root} lacks field {key!r}: the map is damaged; {_REBUILD}")
        value = value[part]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MapError(f"{MAP_JSON} in {root}: field {key!r} has an invalid value {value!r}; {_REBUILD}")
    return value


def _parse_info(root: Path, doc: dict) -> MapInfo:
    dims = {}
    for key in ("global_dim", "num_local", "local_values", "count"):
        v = _field(root, doc, key, int)
        if v < 1:
            raise MapError(f"{MAP_JSON} in {root}: {key} = {v} must be positive; {_REBUILD}")
        dims[key] = v
    size = _field(root, doc, "image_size", list)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise MapError(f"{MAP_JSON} in {root}: image_size {size!r} is not [H, W]; {_REBUILD}")
    gdtype = _field(root, doc, "global_dtype", str)
    if gdtype not in GLOBAL_DTYPES:
        raise MapError(f"{MAP_JSON} in {root}: global_dtype {gdtype!r} is not one of {GLOBAL_DTYPES}; {_REBUILD}")
    index = _field(root, doc, "index.type", str)
    if index not in INDEX_TYPES:
        raise MapError(f"{MAP_JSON} in {root}: index type {index!r} is not one of {INDEX_TYPES}; {_REBUILD}")
    return MapInfo(path=root, format_version=doc["format_version"],
                   fingerprint=_field(root, doc, "fingerprint", str),
                   model_config=_field(root, doc, "model_config", dict), image_size=(size[0], size[1]),
                   frame_id=_field(root, doc, "frame_id", str),
                   created=_field(root, doc, "created.time", str),
                   source=_field(root, doc, "created.source", str), global_dtype=gdtype, index=index,
                   host=str(doc["created"].get("host", "")),
                   package_version=str(doc["created"].get("package_version", "")),
                   child_frame=str(doc.get("child_frame", "")),
                   sessions=_parse_sessions(root, doc, dims["count"]), **dims)


def _parse_sessions(root: Path, doc: dict, count: int) -> tuple[SessionInfo, ...]:
    """map.json's `sessions` table; a map written before sessions existed is one session (its build)."""
    raw = doc.get("sessions")
    if raw is None:
        created = doc["created"]
        return (SessionInfo(0, "", str(created.get("source", "")), count, (), str(created.get("time", "")),
                            str(created.get("host", ""))),)
    if not isinstance(raw, list) or not raw:
        raise MapError(f"{MAP_JSON} in {root}: field 'sessions' must be a non-empty list; {_REBUILD}")
    sessions = []
    for i, rec in enumerate(raw):
        ok = (isinstance(rec, dict) and rec.get("id") == i and isinstance(rec.get("count"), int)
              and not isinstance(rec.get("count"), bool) and rec["count"] >= 1
              and all(isinstance(rec.get(k, ""), str) for k in ("name", "source", "created", "host"))
              and isinstance(rec.get("conditions", []), list)
              and all(isinstance(c, str) for c in rec.get("conditions", [])))
        if not ok:
            raise MapError(f"{MAP_JSON} in {root}: session {i} of the 'sessions' table is invalid ({rec!r:.200}); "
                           f"{_REBUILD}")
        sessions.append(SessionInfo(i, rec.get("name", ""), rec.get("source", ""), rec["count"],
                                    tuple(rec.get("conditions", [])), rec.get("created", ""), rec.get("host", "")))
    if sum(x.count for x in sessions) != count:
        raise MapError(f"{MAP_JSON} in {root}: the sessions hold {sum(x.count for x in sessions)} entries, the map "
                       f"{count}; {_REBUILD}")
    return tuple(sessions)


def _check_files(root: Path, doc: dict, info: MapInfo) -> dict[str, dict]:
    """Every data file exists and has the size map.json records (and the size the dims imply)."""
    listed = _field(root, doc, "files", dict)
    outside = sorted(str(k) for k in listed if Path(k).name != k or k in ("", ".", ".."))
    if outside:
        raise MapError(f"{MAP_JSON} in {root} lists files outside the map directory ({', '.join(outside)[:200]}): "
                       f"the map is damaged or was not written by r2former; {_REBUILD}")
    if info.index != "flat" and doc["index"].get("file", INDEX_FILE) != INDEX_FILE:
        raise MapError(f"{MAP_JSON} in {root}: index file {doc['index'].get('file')!r} is not {INDEX_FILE!r}: the map "
                       f"is damaged or was not written by r2former; {_REBUILD}")
    needed = (DATA_FILES + ((INDEX_FILE,) if info.index != "flat" else ())
              + ((SESSIONS_FILE,) if "sessions" in doc else ()))
    M, G, N, C = info.count, info.global_dim, info.num_local, info.local_values
    implied = {LOCAL_FILE: (M * N * C * 2, f"{M} entries x {N} x {C} float16"),
               GLOBAL_FILE: (_NPY_HEADER_BYTES + M * G * np.dtype(info.global_dtype).itemsize,
                             f"{M} x {G} {info.global_dtype}")}
    files = {}
    for name in needed:
        entry = listed.get(name)
        if (not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int)
                or not isinstance(entry.get("sha256"), str)):
            raise MapError(f"{MAP_JSON} in {root} has no valid size/checksum record for {name}; {_REBUILD}")
        actual = _regular_file_size(root, name)
        if actual != entry["bytes"]:
            what = "truncated" if actual < entry["bytes"] else "longer than written"
            raise MapError(f"{name} in {root} has {actual} bytes but {MAP_JSON} records {entry['bytes']}: the file "
                           f"is {what} or was modified; {_REBUILD}")
        if name in implied and entry["bytes"] != implied[name][0]:
            raise MapError(f"{name} in {root} has {entry['bytes']} bytes, {implied[name][0]} expected for "
                           f"{implied[name][1]} ({MAP_JSON} is inconsistent); {_REBUILD}")
        files[name] = entry
    return files


def _check_sha(root: Path, name: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise MapError(f"{name} in {root} is corrupted: sha256 {actual[:16]}... does not match {expected[:16]}... "
                       f"recorded in {MAP_JSON} (the file changed after the map was built); {_REBUILD} or restore "
                       "it from a backup")


def _load_npy(root: Path, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(root / name, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError...
        raise MapError(f"{name} in {root} is not a readable .npy file ({type(e).__name__}: {str(e)[:120]}): "
                       f"{_REBUILD}") from e
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise MapError(f"{name} in {root} holds {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape} "
                       f"(see {MAP_JSON}): {_REBUILD}")
    arr.flags.writeable = False
    return arr


def _load_names(root: Path, count: int) -> list[str]:
    try:
        names = json.loads((root / NAMES_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MapError(f"{NAMES_FILE} in {root} is not valid JSON ({e}): {_REBUILD}") from e
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) for n in names):
        raise MapError(f"{NAMES_FILE} in {root} must be a list of {count} strings: {_REBUILD}")
    joined = "\n".join(names)      # one regular-expression pass over all names; per name only on a hit
    bad = (next(((i, p) for i, n in enumerate(names) if (p := entry_name_problem(n))), None)
           if joined.count("\n") != len(names) - 1 or _BAD_NAME.search(joined) else None)
    if bad:
        i, problem = bad
        raise MapError(f"{NAMES_FILE} in {root}: entry {i} {names[i]!r} {problem}; the map is damaged or was not "
                       f"written by r2former: {_REBUILD}")
    return names


def _load_sessions(root: Path, doc: dict, info: MapInfo) -> np.ndarray:
    """(M,) int32 session id per entry: sessions.npy, checked against the table; zeros for maps without one."""
    M = info.count
    if "sessions" not in doc:
        ids = np.zeros(M, np.int32)
        ids.flags.writeable = False
        return ids
    ids = _load_npy(root, SESSIONS_FILE, np.int32, (M,))
    S = len(info.sessions)
    if (ids < 0).any() or (ids >= S).any():
        raise MapError(f"{SESSIONS_FILE} in {root} holds session ids outside 0..{S - 1} ({MAP_JSON} lists {S} "
                       f"sessions): the map is damaged; {_REBUILD}")
    counts = np.bincount(ids, minlength=S)
    expected = [x.count for x in info.sessions]
    if counts.tolist() != expected:
        raise MapError(f"{SESSIONS_FILE} in {root} counts {counts.tolist()} entries per session, {MAP_JSON} "
                       f"{expected}: the map is damaged; {_REBUILD}")
    return ids


def _read_index_file(root: Path, count: int, dim: int) -> Any:
    try:
        index = faiss.read_index(str(root / INDEX_FILE))
    except RuntimeError as e:
        raise MapError(f"{INDEX_FILE} in {root} cannot be read by faiss ({str(e).splitlines()[0]}): "
                       f"delete the map and {_REBUILD}") from e
    if index.ntotal != count or index.d != dim:
        raise MapError(f"{INDEX_FILE} in {root} holds {index.ntotal} vectors of {index.d} dims, "
                       f"map.json says {count} x {dim}: {_REBUILD}")
    return index


def _hnsw_storage(root: Path, index: Any, dtype: np.dtype) -> np.ndarray:
    """A writable (M, G) view of an HNSW index's stored vectors (float32 flat or float16 scalar quantizer)."""
    M, G = index.ntotal, index.d
    storage = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else None
    if dtype == np.float32:
        ok = isinstance(storage, faiss.IndexFlat)
    else:
        ok = isinstance(storage, faiss.IndexScalarQuantizer) and storage.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    if not ok or storage is None or storage.codes.size() != M * G * dtype.itemsize:  # type: ignore[attr-defined]
        raise MapError(f"{INDEX_FILE} in {root} is not an HNSW index over {dtype.name} vectors as {MAP_JSON} says: "
                       f"{_REBUILD}")
    ptr = faiss.rev_swig_ptr(storage.codes.data(), M * G * dtype.itemsize)  # type: ignore[attr-defined]
    return _buffer_owned_by(index, ptr, dtype, (M, G))


def _read_global_into(root: Path, out: np.ndarray, expected_sha: str | None) -> None:
    """Fill `out` (M, G) from global.npy in chunks, hashing the bytes on the way when asked."""
    path = root / GLOBAL_FILE
    h = hashlib.sha256() if expected_sha else None
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as e:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError...
            raise MapError(f"{GLOBAL_FILE} in {root} has no valid .npy header ({type(e).__name__}: {str(e)[:120]}): "
                           f"{_REBUILD}") from e
        if shape != out.shape or fortran or dtype != out.dtype or f.tell() != _NPY_HEADER_BYTES:
            raise MapError(f"{GLOBAL_FILE} in {root} holds {dtype} {shape}, expected {out.dtype} {out.shape} "
                           f"(see {MAP_JSON}): {_REBUILD}")
        if h is not None:
            f.seek(0)
            h.update(f.read(_NPY_HEADER_BYTES))
        flat = out.reshape(-1).data.cast("B")
        pos = 0
        while pos < len(flat):
            n = f.readinto(flat[pos:pos + _HASH_CHUNK])
            if not n:
                raise MapError(f"{GLOBAL_FILE} in {root} is truncated: {_REBUILD}")
            if h is not None:
                h.update(flat[pos:pos + n])
            pos += n
    if h is not None and expected_sha is not None:
        _check_sha(root, GLOBAL_FILE, expected_sha, h.hexdigest())
