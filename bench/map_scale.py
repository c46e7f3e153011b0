#!/usr/bin/env python3
"""Map scale: build time, bytes on disk per image, resident memory and query latency vs map size.

For each size M a map of random unit global descriptors (G=256) and random float16 local features
(N=500, C=131) is built under --workdir, then a fresh subprocess loads it (so VmRSS/VmHWM are that
size's own) and measures, per query (one query at a time, as the localizer does):

  (a) faiss search alone (exact inner product, k=--k)
  (b) search + reading the k candidates' local features (cold: local.f16 evicted from the page
      cache with posix_fadvise(DONTNEED) first; warm: the same queries again)
  (c) search + read + reranking with the real model reranker (random weights, DeiT-S default
      configuration) on only --rerank-queries queries (reranking is ~1-3 s per query on a CPU)

Maps too big for the disk (by default above --sparse-above images, i.e. 1M = 131 GB of local
features) are constructed directly in the documented format with a SPARSE local.f16: only the
entries the benchmark's queries retrieve hold real random data, everything else is a hole. Reads of
holes are not disk reads, so for those maps the JSON says "local_features": "sparse" and the
read latencies are those of the real (written) entries, which are the ones queried. Build time of
a sparse map is not MapWriter's and is reported separately.

This benchmark measures the exact (flat) index, the default; the approximate indexes (`--index
ivfpq|hnsw`: build time, recall of the top 100 against the exact search, latency) are compared by
bench/index_scale.py.

    python bench/map_scale.py [--sizes 10000,100000,1000000] [--k 100] [--queries 200]
                              [--rerank-queries 5] [--workdir /tmp/r2former_map_scale]
                              [--out bench/results/map_scale.json] [--quick] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from benchlib import machine_info, write_report  # noqa: E402

G, N, C = 256, 500, 131
ENTRY_BYTES = N * C * 2
FINGERPRINT = "bench-map-scale-random"
log = logging.getLogger("map_scale")


# ------------------------------------------------------------------------------ helpers


def proc_status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(ms, 50), 3), "p95_ms": round(pct(ms, 95), 3), "mean_ms": round(statistics.mean(ms), 3),
            "n": len(ms)}


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, G), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def trajectory(start: int, n: int) -> np.ndarray:
    """A drive along x with 1 m spacing and identity orientation."""
    p = np.zeros((n, 7))
    p[:, 0] = np.arange(start, start + n, dtype=np.float64)
    p[:, 6] = 1.0
    return p


def street_thumbnails(count: int, seed: int) -> list[np.ndarray]:
    """Street-like 120x160 RGB images (sky, facades, road): JPEG sizes like real camera thumbnails."""
    import cv2
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = np.zeros((120, 160, 3), np.uint8)
        img[:50] = np.linspace(200, 120, 50)[:, None, None] * np.array([0.6, 0.8, 1.0])
        img[80:] = 90
        for _ in range(6):
            x0, w = rng.integers(0, 150), rng.integers(15, 50)
            y0 = rng.integers(10, 50)
            color = tuple(int(c) for c in rng.integers(40, 220, 3))
            cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + w), 80), color, -1)
            for wy in range(int(y0) + 5, 75, 10):
                cv2.rectangle(img, (int(x0) + 3, wy), (int(x0) + 8, wy + 4), (30, 30, 40), -1)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        out.append(img)
    return out


def make_queries(glob: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of random map entries (the source stays the nearest neighbour)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(glob), size=n, replace=len(glob) < n)
    q = glob[src] + 0.03 * rng.standard_normal((n, G), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), src


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files in a map directory."""
    files = [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


# ------------------------------------------------------------------------------ building


def build_with_writer(path: Path, m: int, args) -> dict:
    """A real map through MapWriter: random data generated in batches, only writer calls timed."""
    from r2former_core.mapdb import MapDatabase
    rng = np.random.default_rng(m)
    glob = unit_rows(rng, m)
    thumbs = street_thumbnails(32, seed=1) if not args.no_thumbnails else None
    writer = MapDatabase.create(path, fingerprint=FINGERPRINT, model_config={"bench": "random"},
                                image_size=(480, 640), global_dim=G, num_local=N, local_values=C,
                                source=f"bench/map_scale.py random M={m}", overwrite=True, expected_count=m)
    t_write = 0.0
    for s in range(0, m, args.batch):
        b = min(args.batch, m - s)
        loc = rng.standard_normal((b, N, C), dtype=np.float32).astype(np.float16)
        names = [f"random/{i:07d}.png" for i in range(s, s + b)]
        th = None if thumbs is None else [thumbs[i % len(thumbs)] for i in range(s, s + b)]
        t0 = time.perf_counter()
        writer.add_batch(glob[s:s + b], loc, trajectory(s, b), 1.7e9 + np.arange(s, s + b) * 0.1, names, th)
        t_write += time.perf_counter() - t0
        if (s // args.batch) % 20 == 0:
            log.info("M=%d: %d/%d entries written", m, s + b, m)
    t0 = time.perf_counter()
    writer.commit()
    t_commit = time.perf_counter() - t0
    writer.database.close()
    queries, src = make_queries(glob, args.queries, seed=m + 1)
    return {"mode": "MapWriter", "local_features": "real", "build_s": round(t_write + t_commit, 2),
            "build_add_s": round(t_write, 2), "build_commit_s": round(t_commit, 2),
            "queries": queries, "query_src": src}


def build_sparse(path: Path, m: int, args) -> dict:
    """A map written directly in format v1 (docs/MAP_FORMAT.md) with a sparse local.f16.

    Real random local features only for the entries the benchmark's queries retrieve (their
    exact top-k), holes elsewhere. Every checksum is real, so MapDatabase.load validates it.
    """
    import cv2
    import faiss

    from r2former_core import __version__, mapdb
    t_start = time.perf_counter()
    rng = np.random.default_rng(m)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}-bench"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    glob = np.lib.format.open_memmap(tmp / mapdb.GLOBAL_FILE, mode="w+", dtype=np.float32, shape=(m, G))
    index = faiss.IndexFlatIP(G)
    for s in range(0, m, 65536):
        glob[s:s + 65536] = unit_rows(rng, min(65536, m - s))
        index.add(np.ascontiguousarray(glob[s:s + 65536]))
    glob.flush()
    queries, src = make_queries(np.asarray(glob), args.queries, seed=m + 1)
    _, cand = index.search(queries, args.k)
    del index
    real = np.unique(cand)
    log.info("M=%d sparse: %d entries get real local features (the queries' top-%d)", m, len(real), args.k)

    crc = np.full(m, zlib.crc32(bytes(ENTRY_BYTES)), dtype=np.uint32)
    lpath = tmp / mapdb.LOCAL_FILE
    with open(lpath, "wb") as f:
        f.truncate(m * ENTRY_BYTES)
        for e in real:
            block = rng.standard_normal((N, C), dtype=np.float32).astype(np.float16).tobytes()
            crc[e] = zlib.crc32(block)
            os.pwrite(f.fileno(), block, int(e) * ENTRY_BYTES)
        f.flush()
        os.fsync(f.fileno())
    # sha256 of the whole (mostly hole) file, fed in order without reading the holes from disk
    h = hashlib.sha256()
    zeros = bytes(64 * ENTRY_BYTES)
    fd = os.open(lpath, os.O_RDONLY)
    pos = 0
    for e in list(real) + [m]:
        gap = int(e) - pos
        while gap > 0:
            n = min(gap, 64)
            h.update(zeros[: n * ENTRY_BYTES])
            gap -= n
        if e < m:
            h.update(os.pread(fd, ENTRY_BYTES, int(e) * ENTRY_BYTES))
        pos = int(e) + 1
    os.close(fd)
    local_sha = h.hexdigest()

    pool = [] if args.no_thumbnails else [
        cv2.imencode(".jpg", cv2.cvtColor(t, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
        for t in street_thumbnails(32, seed=1)]
    tindex = np.zeros((m, 2), np.int64)
    with open(tmp / mapdb.THUMBS_FILE, "wb") as f:
        if pool:
            sizes = np.array([len(p) for p in pool], np.int64)
            lengths = sizes[np.arange(m) % len(pool)]
            tindex[:, 1] = lengths
            tindex[1:, 0] = np.cumsum(lengths)[:-1]
            for s in range(0, m, 4096):
                f.write(b"".join(pool[i % len(pool)] for i in range(s, min(m, s + 4096))))
    np.save(tmp / mapdb.THUMBS_INDEX_FILE, tindex, allow_pickle=False)
    np.save(tmp / mapdb.LOCAL_CRC_FILE, crc, allow_pickle=False)
    np.save(tmp / mapdb.POSES_FILE, trajectory(0, m), allow_pickle=False)
    np.save(tmp / mapdb.STAMPS_FILE, 1.7e9 + np.arange(m) * 0.1, allow_pickle=False)
    (tmp / mapdb.NAMES_FILE).write_text(json.dumps([f"random/{i:07d}.png" for i in range(m)]))
    files = {}
    for name in mapdb.DATA_FILES:
        p = tmp / name
        files[name] = {"bytes": p.stat().st_size,
                       "sha256": local_sha if name == mapdb.LOCAL_FILE else sha256_file(p)}
    doc = {"format": mapdb.FORMAT_NAME, "format_version": mapdb.FORMAT_VERSION, "fingerprint": FINGERPRINT,
           "model_config": {"bench": "random"}, "image_size": [480, 640], "global_dim": G, "num_local": N,
           "local_values": C, "count": m, "global_dtype": "float32", "frame_id": "map",
           "pose_layout": mapdb.POSE_LAYOUT, "index": {"type": "flat"},
           "created": {"time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "host": socket.gethostname(),
                       "package_version": __version__,
                       "source": f"bench/map_scale.py random M={m}, SPARSE local.f16 ({len(real)} real entries)"},
           "files": files}
    (tmp / mapdb.MAP_JSON).write_text(json.dumps(doc, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)
    return {"mode": "direct (sparse local.f16)", "local_features": "sparse", "real_local_entries": int(len(real)),
            "build_s": round(time.perf_counter() - t_start, 2), "queries": queries, "query_src": src}


# ------------------------------------------------------------------------------ measuring (subprocess)


def measure(args) -> dict:
    """Runs in a fresh process: load the map, then time search / read / rerank one query at a time."""
    import faiss

    from r2former_core.mapdb import LOCAL_FILE, MapDatabase
    faiss.omp_set_num_threads(args.threads)
    path = Path(args.measure)
    queries = np.load(args.queries_file, allow_pickle=False)
    src = np.load(args.src_file, allow_pickle=False)
    res: dict = {"rss_start_mib": proc_status(), "loadavg_1min_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    db = MapDatabase.load(path, expected_fingerprint=FINGERPRINT, verify="auto")
    res["load_s"] = round(time.perf_counter() - t0, 3)
    res["rss_after_load_mib"] = proc_status()
    k = min(args.k, len(db))

    def evict_local_cache() -> None:
        fd = os.open(path / LOCAL_FILE, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    for q in queries[:3]:   # warm-up (faiss threads, allocations)
        db.search(q, k)
    t_search = []
    top1 = 0
    for q, s in zip(queries, src):
        t0 = time.perf_counter()
        _, idx = db.search(q, k)
        t_search.append((time.perf_counter() - t0) * 1000)
        top1 += int(idx[0, 0] == s)
    db.search_threads = 1
    t_search_1 = []
    for q in queries:
        t0 = time.perf_counter()
        db.search(q, k)
        t_search_1.append((time.perf_counter() - t0) * 1000)
    db.search_threads = None
    res["search_default_threads"] = db._threads_for(1) or faiss.omp_get_max_threads()
    t0 = time.perf_counter()
    db.search(queries, k)
    res["search_batched_ms_per_query"] = round((time.perf_counter() - t0) * 1000 / len(queries), 3)
    res["search_top1_is_source"] = top1 / len(queries)

    def search_and_read(batch: np.ndarray) -> tuple[list[float], int]:
        times, real = [], 0
        for q in batch:
            t0 = time.perf_counter()
            _, idx = db.search(q, k)
            loc = db.local(idx[0])
            times.append((time.perf_counter() - t0) * 1000)
            real += int(np.count_nonzero(loc.reshape(len(loc), -1).any(axis=1)))
        return times, real

    evict_local_cache()
    t_cold, real_cold = search_and_read(queries)
    t_warm, _ = search_and_read(queries)
    res["real_local_reads_fraction"] = real_cold / (len(queries) * k)
    res["rss_after_queries_mib"] = proc_status()

    import torch

    from r2former_core.model import ModelConfig, build_model
    torch.set_num_threads(args.threads)
    model = build_model(ModelConfig(), seed=0)
    res["rss_with_model_mib"] = proc_status()
    rng = np.random.default_rng(0)
    q_local = rng.standard_normal((N, C), dtype=np.float32).astype(np.float16)
    warm_idx = db.search(queries[-1], k)[1][0]
    model.rerank(queries[-1], q_local, db.global_desc[warm_idx], db.local(warm_idx))   # warm-up, not timed
    evict_local_cache()
    t_full, t_rerank = [], []
    for q in queries[: args.rerank_queries]:
        t0 = time.perf_counter()
        _, idx = db.search(q, k)
        loc = db.local(idx[0])
        t1 = time.perf_counter()
        out = model.rerank(q, q_local, db.global_desc[idx[0]], loc)
        int(out.final_score.argmax())
        t_full.append((time.perf_counter() - t0) * 1000)
        t_rerank.append((time.perf_counter() - t1) * 1000)
    res["rss_final_mib"] = proc_status()
    # Why local() uses pread and not a memory map: RssFile growth when the same cold reads go
    # through np.memmap (pages stay mapped, and counted in VmRSS, as long as the map lives).
    evict_local_cache()
    before = proc_status()["RssFile"]
    mm = db.local_memmap()
    for q in queries:
        idx = db.search(q, k)[1][0]
        np.asarray(mm[np.sort(idx)])
    res["rss_file_growth_if_memmap_mib"] = round(proc_status()["RssFile"] - before, 1)
    del mm
    res["loadavg_1min_end"] = os.getloadavg()[0]   # the CPUs are shared: other work inflates latencies
    res["latency"] = {"search": summary(t_search), "search_read_cold": summary(t_cold),
                      "search_1thread": summary(t_search_1), "search_read_warm": summary(t_warm),
                      "search_read_rerank": summary(t_full),
                      "rerank_only": summary(t_rerank)}
    res["k"] = k
    return res


def run_measure(path: Path, built: dict, args) -> dict:
    qfile = path.parent / f"{path.name}.queries.npy"
    sfile = path.parent / f"{path.name}.src.npy"
    np.save(qfile, built["queries"], allow_pickle=False)
    np.save(sfile, built["query_src"], allow_pickle=False)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--measure", str(path), "--queries-file", str(qfile), "--src-file", str(sfile),
           "--k", str(args.k), "--rerank-queries", str(args.rerank_queries), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    qfile.unlink()
    sfile.unlink()
    if out.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main


def print_table(rows: list[dict]) -> None:
    head = (f"{'M':>9} {'local':>6} {'build s':>8} {'kB/img':>7} {'load s':>7} {'RSS load':>9} {'RSS final':>10} "
            f"{'search p50/p95':>15} {'1 thread':>11} {'+read cold':>15} {'+read warm':>15} "
            f"{'+rerank p50/p95 (n)':>22}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lat = r["latency"]

        def pp(key: str, lat: dict = lat) -> str:
            return f"{lat[key]['p50_ms']:.1f}/{lat[key]['p95_ms']:.1f}"

        rr = lat["search_read_rerank"]
        print(f"{r['count']:>9} {r['local_features']:>6} {r['build_s']:>8.1f} {r['disk_bytes_per_image'] / 1000:>7.1f} "
              f"{r['load_s']:>7.2f} {r['rss_after_load_mib']['VmRSS']:>7.0f}MB {r['rss_final_mib']['VmRSS']:>8.0f}MB "
              f"{pp('search'):>15} {pp('search_1thread'):>11} {pp('search_read_cold'):>15} "
              f"{pp('search_read_warm'):>15} "
              f"{rr['p50_ms']:>9.0f}/{rr['p95_ms']:.0f} ({rr['n']})")
    print("latencies in ms per query (one query at a time); RSS = VmRSS; 'final' includes the model and "
          "all queries")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated map sizes (images)")
    p.add_argument("--k", type=int, default=100, help="candidates per query (default 100)")
    p.add_argument("--queries", type=int, default=200, help="queries per size (default 200)")
    p.add_argument("--rerank-queries", type=int, default=5, help="queries that are also reranked (default 5)")
    p.add_argument("--out", default=str(ROOT / "bench/results/map_scale.json"), help="JSON output file")
    p.add_argument("--workdir", default="/tmp/r2former_map_scale", help="where the maps are built (deleted after)")
    p.add_argument("--quick", action="store_true", help="smoke run: only 10k images (overrides --sizes)")
    p.add_argument("--keep", action="store_true", help="keep the built maps")
    p.add_argument("--threads", type=int, default=2, help="torch/faiss threads (default 2)")
    p.add_argument("--batch", type=int, default=500, help="entries per add_batch while building")
    p.add_argument("--sparse-above", type=int, default=200_000,
                   help="build maps larger than this with a sparse local.f16 (default 200000)")
    p.add_argument("--no-thumbnails", action="store_true", help="build maps without thumbnails")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", help=argparse.SUPPRESS)
    p.add_argument("--src-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0

    import faiss

    from r2former_core.mapdb import MapDatabase
    faiss.omp_set_num_threads(args.threads)
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in sizes:
        path = workdir / f"map_{m}"
        est = MapDatabase.estimate_size(m, G, N, C, thumb_bytes=0 if args.no_thumbnails else 4000)
        free = shutil.disk_usage(workdir).free
        sparse = m > args.sparse_above or est["disk_bytes"] > 0.8 * free
        log.info("M=%d: estimated %.1f GB on disk, %.1f GB free -> %s build", m, est["disk_bytes"] / 1e9,
                 free / 1e9, "sparse" if sparse else "MapWriter")
        try:
            built = build_sparse(path, m, args) if sparse else build_with_writer(path, m, args)
            apparent, allocated = dir_bytes(path)
            log.info("M=%d built in %.1f s (%.2f GB apparent, %.2f GB allocated); measuring", m, built["build_s"],
                     apparent / 1e9, allocated / 1e9)
            meas = run_measure(path, built, args)
        finally:
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)
        row = {"count": m, **{k: v for k, v in built.items() if k not in ("queries", "query_src")},
               "disk_bytes": apparent, "disk_bytes_allocated": allocated, "disk_bytes_per_image": apparent / m,
               "estimated_disk_bytes": est["disk_bytes"], "estimated_ram_bytes": est["ram_bytes"], **meas}
        rows.append(row)
        log.info("M=%d done: search p50 %.2f ms, RSS final %.0f MiB", m, meas["latency"]["search"]["p50_ms"],
                 meas["rss_final_mib"]["VmRSS"])
    print_table(rows)
    targets = {"disk_bytes_per_image_max": 140_000, "rss_1m_max_mib": 3 * 1024, "search_100k_p50_max_ms": 20}
    result = {"benchmark": "map_scale", "global_dim": G, "num_local": N, "local_values": C, "k": args.k,
              "queries": args.queries, "rerank_queries": args.rerank_queries, "threads": args.threads,
              "machine": machine_info(args.threads) | {"numpy": np.__version__},
              "notes": ["cold reads: local.f16 evicted with posix_fadvise(POSIX_FADV_DONTNEED) before the pass; "
                        "a hypervisor-level cache below this VM may still serve some of them",
                        "warm reads: the same queries a second time (page cache)",
                        "sparse maps: local.f16 is a sparse file; only entries the queries retrieve hold real "
                        "data (written, then evicted), so every timed read of them is a real read; build_s of a "
                        "sparse map is the direct construction, not MapWriter",
                        "RSS: VmRSS from /proc/self/status of a fresh process per size; 'final' includes torch, "
                        "the model (random weights) and every query",
                        "the CPUs may be shared with other work: loadavg_1min_start/end per size say how busy "
                        "the machine was; OpenMP searches on 2 threads suffer most from a busy CPU "
                        "(compare search vs search_1thread)",
                        "rss_file_growth_if_memmap_mib: how much VmRSS would grow if the same cold candidate "
                        "reads went through a long-lived np.memmap instead of pread (why local() uses pread)"],
              "targets": targets, "results": rows}
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
