#!/usr/bin/env python3
"""Map indexes at scale: build time, size, memory, recall of the top 100 against the exact search, latency.

For each map size M, synthetic 256-d unit global descriptors are generated (below), written into a
map per index type through the real `MapWriter` (`--index flat|ivfpq|hnsw`: the index is built at
commit exactly as `r2former build-map` builds it) with a minimal local feature (1 x 3 values: the
index does not depend on local features), and each map is loaded and queried in a fresh process
(`MapDatabase.load` + `search`, one query at a time, as the localizer does), so its resident memory
is its own. Ground truth: the exact inner-product top 100 (faiss IndexFlatIP over the same
descriptors).

Descriptors are synthetic but shaped like a map's, not isotropic noise: drives of 200 keyframes
are random walks on the sphere (consecutive keyframes cos ~0.99, first and last of a drive ~0.2), and
each drive's places are stored twice (two sessions, the second perturbed as another condition would,
cos ~0.91 with the first). Queries are random entries plus noise (cos ~0.96). Isotropic random
vectors would make the exact top 100 of a query its source plus 99 arbitrary points, whose order
no index can (or needs to) reproduce; here the top 100 is a drive's neighbourhood, as in a real map.
`--data isotropic` measures that worst case anyway (uniform random unit vectors). `--data street`
chains the drives (each starts where the previous one ended), as the streets of one city connect;
`maplike` leaves them as isolated stretches far apart in descriptor space.

    python bench/index_scale.py --sizes 100000,1000000 --indexes flat,ivfpq,hnsw --queries 200 \\
        [--data maplike|isotropic] [--threads 1] [--workdir /tmp/r2former_index_scale]
        [--out bench/results/index_scale.json] [--keep]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from benchlib import machine_info, write_report  # noqa: E402

G = 256
K = 100
FRAMES_PER_DRIVE = 200
FINGERPRINT = "bench-index-scale"
# search settings measured per index type (the defaults stored in new maps: nprobe 16, ef_search 512)
SETTINGS = {"flat": [{}], "ivfpq": [{"nprobe": 16}, {"nprobe": 64}],
            "hnsw": [{"ef_search": 128}, {"ef_search": 256}, {"ef_search": 512}]}
log = logging.getLogger("index_scale")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def map_like_descriptors(m: int, seed: int, connected: bool = False) -> np.ndarray:
    """(m, 256) unit descriptors: drives of 200 keyframes (random walks on the sphere), each stored in two
    sessions (the second a perturbed copy). `connected`: each drive starts where the previous one ended
    (one street network) instead of at a random point (isolated stretches)."""
    rng = np.random.default_rng(seed)
    out = np.empty((m, G), np.float32)
    i = 0
    start = rng.standard_normal(G) / np.sqrt(G)
    while i < m:
        if not connected:
            start = rng.standard_normal(G) / np.sqrt(G)
        walk = start * np.linalg.norm(start) ** -1 + np.cumsum(
            0.3 / np.sqrt(G) * rng.standard_normal((FRAMES_PER_DRIVE, G)), axis=0)
        walk = unit(walk)
        start = walk[-1]
        for noise in (0.0, 0.45):          # session 1, session 2 in another condition
            take = min(FRAMES_PER_DRIVE, m - i)
            if take <= 0:
                break
            out[i:i + take] = unit(walk[:take] + noise / np.sqrt(G) * rng.standard_normal((take, G)))
            i += take
    return out


def isotropic_descriptors(m: int, seed: int) -> np.ndarray:
    """(m, 256) uniform random unit vectors: no structure at all (the hardest case for an approximate index)."""
    rng = np.random.default_rng(seed)
    out = np.empty((m, G), np.float32)
    for s in range(0, m, 65536):
        out[s:s + 65536] = unit(rng.standard_normal((min(65536, m - s), G), dtype=np.float32))
    return out


def queries_for(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    src = rng.choice(len(x), n, replace=False)
    return unit(x[src] + 0.3 / np.sqrt(G) * rng.standard_normal((n, G)))


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss
    index = faiss.IndexFlatIP(G)
    for s in range(0, len(x), 262144):
        index.add(x[s:s + 262144])
    return index.search(q, k)[1]


def proc_status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


# ------------------------------------------------------------------------------ building


def build(path: Path, x: np.ndarray, index: str) -> dict:
    """A map of `x` with `index`, through MapWriter (minimal local features, no thumbnails)."""
    from r2former_core.mapdb import MapDatabase
    writer = MapDatabase.create(path, fingerprint=FINGERPRINT, model_config={"bench": "index_scale"},
                                image_size=(480, 640), global_dim=G, num_local=1, local_values=3,
                                source=f"bench/index_scale.py M={len(x)}", index=index, overwrite=True)
    t0 = time.perf_counter()
    loc = np.zeros((65536, 1, 3), np.float16)
    poses = np.zeros((65536, 7))
    poses[:, 6] = 1.0
    for s in range(0, len(x), 65536):
        b = min(65536, len(x) - s)
        writer.add_batch(x[s:s + b], loc[:b], poses[:b], np.arange(s, s + b, dtype=np.float64),
                         [f"{i}" for i in range(s, s + b)])
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.commit()
    t_commit = time.perf_counter() - t0
    writer.database.close()
    index_file = path / "index.faiss"
    return {"add_s": round(t_add, 1), "commit_s": round(t_commit, 1),
            "index_file_bytes": index_file.stat().st_size if index_file.exists() else 0,
            "global_file_bytes": (path / "global.npy").stat().st_size}


# ------------------------------------------------------------------------------ measuring (subprocess)


def measure(args) -> dict:
    """In a fresh process: load the map, search every query one at a time per setting, compare with the truth."""
    import faiss

    from r2former_core.mapdb import MapDatabase
    faiss.omp_set_num_threads(args.threads)
    queries = np.load(args.queries_file, allow_pickle=False)
    truth = np.load(args.truth_file, allow_pickle=False)
    rss0 = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    db = MapDatabase.load(args.measure, expected_fingerprint=FINGERPRINT, verify="quick")
    res = {"load_s": round(time.perf_counter() - t0, 2), "rss_map_mib": round(proc_status()["VmRSS"] - rss0, 1),
           "loadavg_1min_start": os.getloadavg()[0], "settings": []}
    for setting in SETTINGS[db.info.index]:
        for key, value in setting.items():
            setattr(db, key, value)
        for q in queries[:5]:
            db.search(q, K)           # warm-up
        rows = {}
        for threads in (1, None):     # one OpenMP thread, then the map's default choice
            db.search_threads = threads
            times, found = [], []
            for q in queries:
                t = time.perf_counter()
                _, idx = db.search(q, K)
                times.append((time.perf_counter() - t) * 1000)
                found.append(idx[0])
            rows["1thread" if threads == 1 else "default"] = times
        found = np.stack(found)
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
        res["settings"].append({**setting, "recall_at_100": round(recall, 4),
                                "top1_equal": float(np.mean(found[:, 0] == truth[:, 0])),
                                "p50_ms_1thread": round(pct(rows["1thread"], 50), 3),
                                "p95_ms_1thread": round(pct(rows["1thread"], 95), 3),
                                "p50_ms_default": round(pct(rows["default"], 50), 3),
                                "mean_ms_1thread": round(statistics.mean(rows["1thread"]), 3)})
    res["loadavg_1min_end"] = os.getloadavg()[0]
    return res


def run_measure(path: Path, queries: np.ndarray, truth: np.ndarray, args) -> dict:
    qfile, tfile = path.parent / f"{path.name}.q.npy", path.parent / f"{path.name}.t.npy"
    np.save(qfile, queries, allow_pickle=False)
    np.save(tfile, truth, allow_pickle=False)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--queries-file", str(qfile),
                          "--truth-file", str(tfile), "--threads", str(args.threads)],
                         env=env, capture_output=True, text=True)
    qfile.unlink()
    tfile.unlink()
    if out.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main


def print_table(rows: list[dict]) -> None:
    head = (f"{'data':>9} {'M':>8} {'index':>6} {'setting':>14} {'build s':>8} {'index MB':>9} {'RSS MB':>7} "
            f"{'recall@100':>10} {'top1=':>6} {'p50 ms (1 thr)':>15} {'p95 ms':>7} {'p50 ms (default)':>17}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for s in r["settings"]:
            setting = ", ".join(f"{k} {v}" for k, v in s.items() if k in ("nprobe", "ef_search")) or "exact"
            print(f"{r.get('data', 'maplike'):>9} {r['count']:>8} {r['index']:>6} {setting:>14} {r['commit_s']:>8.1f} "
                  f"{r['index_file_bytes'] / 1e6:>9.1f} {r['rss_map_mib']:>7.0f} {s['recall_at_100']:>10.4f} "
                  f"{s['top1_equal']:>6.3f} {s['p50_ms_1thread']:>15.3f} {s['p95_ms_1thread']:>7.3f} "
                  f"{s['p50_ms_default']:>17.3f}")
    print("build s = MapWriter.commit (index training and building); RSS = resident memory of the loaded map")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated map sizes (default 100000,1000000)")
    p.add_argument("--indexes", default="flat,ivfpq,hnsw", help="index types to measure (default all)")
    p.add_argument("--queries", type=int, default=200, help="queries per size (default 200)")
    p.add_argument("--data", default="maplike", choices=["maplike", "street", "isotropic"],
                   help="maplike (default): isolated drives of two sessions as random walks; street: the same, "
                        "each drive starting where the previous one ended; isotropic: uniform random")
    p.add_argument("--threads", type=int, default=2, help="faiss threads for building and the default search")
    p.add_argument("--workdir", default="/tmp/r2former_index_scale", help="where the maps are built (deleted after)")
    p.add_argument("--out", default=str(ROOT / "bench/results/index_scale.json"),
                   help="JSON output; rows of earlier runs with other sizes or indexes are kept")
    p.add_argument("--keep", action="store_true", help="keep the built maps")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--queries-file", help=argparse.SUPPRESS)
    p.add_argument("--truth-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.measure:
        print(json.dumps(measure(args)))
        return 0

    import faiss
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    previous = json.loads(out.read_text())["results"] if out.is_file() else []
    rows: list[dict] = []
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for m in [int(s) for s in args.sizes.split(",") if s.strip()]:
        if args.data == "isotropic":
            x = isotropic_descriptors(m, seed=m)
        else:
            x = map_like_descriptors(m, seed=m, connected=args.data == "street")
        queries = queries_for(x, args.queries, seed=m + 1)
        t0 = time.perf_counter()
        truth = exact_top(x, queries, K)
        log.info("M=%d: exact top-%d of %d queries in %.1f s", m, K, len(queries), time.perf_counter() - t0)
        for index in [s.strip() for s in args.indexes.split(",") if s.strip()]:
            path = workdir / f"map_{m}_{index}"
            try:
                log.info("M=%d: building a %s map", m, index)
                built = build(path, x, index)
                log.info("M=%d %s: commit %.1f s; measuring", m, index, built["commit_s"])
                row = {"count": m, "index": index, "data": args.data, **built,
                       **run_measure(path, queries, truth, args)}
            finally:
                if not args.keep:
                    shutil.rmtree(path, ignore_errors=True)
            rows.append(row)
            print_table([row])
        del x
    def key(r: dict) -> tuple:
        return r.get("data", "maplike"), r["count"], r["index"]

    kept = [r for r in previous if key(r) not in {key(r2) for r2 in rows}]
    rows = sorted(kept + rows, key=lambda r: (r.get("data", "maplike") != "maplike", r["count"],
                                              ["flat", "ivfpq", "hnsw"].index(r["index"])))
    print()
    print_table(rows)
    result = {"benchmark": "index_scale", "global_dim": G, "k": K, "queries": args.queries, "threads": args.threads,
              "machine": machine_info(args.threads),
              "notes": ["synthetic descriptors: maplike = drives as random walks on the sphere, two sessions each; "
                        "isotropic = uniform random unit vectors (worst case); real descriptors may differ",
                        "recall_at_100: |index top-100 & exact top-100| / 100 averaged over the queries; top1_equal: "
                        "the index's first result is the exact first",
                        "latency: one query at a time through MapDatabase.search (IVF-PQ includes the exact "
                        "re-scoring of refine_factor x k candidates); the CPUs are shared (loadavg fields)"],
              "results": rows}
    write_report(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
