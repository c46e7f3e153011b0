"""`r2former map-info` (also `r2former map info`): what a map holds (model, size, extent, spacing, sessions) and
whether its files are intact."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "print a map's metadata, extent and sessions, and verify its files"
DESCRIPTION = ("Load a map directory, checking its files (--verify), and print what it holds: entries, the model "
               "fingerprint and configuration it was built with, feature shapes, frame, source, index, disk size, "
               "the extent and length of its trajectory, keyframe spacing and time span, and its sessions (the drives "
               "it was built or merged from: source, conditions when known, entries, extent). A damaged or "
               "mismatched map fails with a message naming the problem (exit status 2).")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("map-info", help=HELP, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """map-info's arguments (shared with `r2former map info`)."""
    from ..mapdb import VERIFY_MODES
    p.add_argument("map", help="map directory built with `r2former build-map` or the build_map node")
    p.add_argument("--verify", default="full", choices=VERIFY_MODES,
                   help="full (default): sha256 of every file; auto: as the localizer loads it (full below 2 GiB, "
                        "else every file but the two largest); quick: file sizes only")
    p.add_argument("--model", default=None,
                   help="also check that the map was built with this weights file (compares fingerprints)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def summarize(db) -> dict:
    """Everything map-info prints, as plain values."""
    import numpy as np

    from ..mapops import session_summaries
    info = db.info
    files = sorted(Path(info.path).iterdir())
    xy = np.asarray(db.poses[:, :2], np.float64)
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1) if len(xy) > 1 else np.zeros(0)
    stamps = np.asarray(db.stamps, np.float64)
    cfg = info.model_config or {}
    return {
        "path": str(info.path), "format_version": info.format_version, "entries": info.count,
        "fingerprint": info.fingerprint, "created": info.created, "source": info.source, "frame_id": info.frame_id,
        "child_frame": info.child_frame,
        "index": info.index, "package_version": info.package_version,
        "model": {k: cfg.get(k) for k in ("image_size", "embed_dim", "depth", "num_local", "stem", "input_norm")
                  if k in cfg},
        "global": [info.global_dim, info.global_dtype], "local": [info.num_local, info.local_values, "float16"],
        "disk_bytes": int(sum(f.stat().st_size for f in files if f.is_file())),
        "files": {f.name: f.stat().st_size for f in files if f.is_file()},
        "extent_m": {"x": [float(xy[:, 0].min()), float(xy[:, 0].max())],
                     "y": [float(xy[:, 1].min()), float(xy[:, 1].max())]} if len(xy) else None,
        "trajectory_length_m": float(steps.sum()),
        "keyframe_spacing_m": float(db.keyframe_spacing()),
        "time_span_s": float(stamps.max() - stamps.min()) if len(stamps) else 0.0,
        "thumbnails": db.thumbnail_count,
        "sessions": session_summaries(db),
    }


def run(args) -> int:
    from ..mapdb import MapDatabase
    expected = None
    if args.model:
        from ..model import load_model
        expected = load_model(args.model).fingerprint
    db = MapDatabase.load(args.map, expected_fingerprint=expected, verify=args.verify)
    try:
        s = summarize(db)
    finally:
        db.close()
    s["verified"] = args.verify
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    ext = s["extent_m"]
    rows = [
        ("map", s["path"]),
        ("entries", f"{s['entries']} (format version {s['format_version']}, index {s['index']})"),
        ("model fingerprint", s["fingerprint"] + ("  (matches --model)" if expected else "")),
        ("model", ", ".join(f"{k} {v}" for k, v in s["model"].items()) or "-"),
        ("features", f"global {s['global'][0]} {s['global'][1]}, local {s['local'][0]} x {s['local'][1]} float16"),
        ("frames (parent -> child)", f"{s['frame_id']} -> {s['child_frame'] or '(not recorded)'}"),
        ("source", s["source"]),
        ("created", f"{s['created']}" + (f" (r2former_ros {s['package_version']})" if s["package_version"] else "")),
        ("disk", f"{s['disk_bytes'] / 1e6:.1f} MB ({s['disk_bytes'] / max(s['entries'], 1) / 1e3:.1f} kB per image)"),
        ("extent", f"x {ext['x'][0]:.1f} .. {ext['x'][1]:.1f} m, y {ext['y'][0]:.1f} .. {ext['y'][1]:.1f} m"
         if ext else "-"),
        ("trajectory", f"{s['trajectory_length_m']:.1f} m over {s['time_span_s']:.1f} s, keyframe spacing "
                       f"{s['keyframe_spacing_m']:.2f} m"),
        ("thumbnails", f"{s['thumbnails']} of {s['entries']}"),
        ("verified", {"full": "sha256 of every file", "auto": "as the localizer loads it",
                      "quick": "file sizes only"}[args.verify]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"\n{len(s['sessions'])} session{'s' if len(s['sessions']) != 1 else ''}:")
    print(format_sessions(s["sessions"]))
    return 0


def format_sessions(sessions: list[dict]) -> str:
    """The sessions as a table: id, name, entries, conditions, extent, length, created, source."""
    header = ("id", "name", "entries", "conditions", "extent x / y (m)", "length", "created", "source")
    rows = [header]
    for x in sessions:
        e = x["extent_m"]
        rows.append((str(x["id"]), x["name"] or "-", str(x["count"]), ",".join(x["conditions"]) or "unknown",
                     f"{e['x'][0]:.0f}..{e['x'][1]:.0f} / {e['y'][0]:.0f}..{e['y'][1]:.0f}",
                     f"{x['trajectory_length_m']:.0f} m", x["created"][:19] or "-", x["source"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(f"{c:<{w}}" for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)
