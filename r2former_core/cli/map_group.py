"""`r2former map merge|prune|info`: operations on whole maps (atomic, like every map write).

`r2former map-info` stays a command of its own; `r2former map info` is the same command in this group.
"""
from __future__ import annotations

import argparse

from . import map_info
from .build_map import INDEX_CHOICES
from .common import nonneg_float, positive_float

MERGE_EPILOG = """\
The maps must come from the same model (fingerprint) and hold poses of the same frames (frame_id and
child_frame, shown by `r2former map-info`); otherwise the merge is refused and nothing is written.
Entries keep their name, pose, stamp, thumbnail and features bit for bit, and their session: the merged
map holds every input's sessions in input order. --out may be one of the inputs with --overwrite: it is
replaced atomically once the merged map is complete.
"""

PRUNE_EPILOG = """\
Within each session, in map order, an entry is dropped when a kept entry of the same session lies closer
than --min-distance and faces within --min-angle of it (a stop, a slow stretch, a revisit). Entries of
different sessions never drop each other: a place seen by day and by night keeps both.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    from ..mapdb import VERIFY_MODES
    p = sub.add_parser("map", help="operations on whole maps: merge sessions, prune near-duplicates, info",
                       description="Operations on whole maps. Every command writes its output atomically: a "
                                   "killed command leaves no half map, and the old map stays loadable.")
    group = p.add_subparsers(dest="map_command", metavar="MAP_COMMAND")

    m = group.add_parser("merge", help="merge maps of one model and frames into one multi-session map",
                         description="Merge maps (drives of one place in different conditions, or neighbouring "
                                     "areas) into one map with one session per input drive.",
                         epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("maps", nargs="+", metavar="MAP", help="maps to merge (at least two), in the order they are stored")
    m.add_argument("--out", required=True, help="the merged map's directory")
    m.add_argument("--index", default=None, choices=INDEX_CHOICES,
                   help="index of the merged map (default: the first map's)")
    m.add_argument("--verify", default="auto", choices=VERIFY_MODES,
                   help="how the inputs are checked when loaded (default auto; local features are CRC-checked as "
                        "they are copied in every mode)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing map at --out (atomically)")
    m.set_defaults(func=run_merge)

    r = group.add_parser("prune", help="drop near-duplicate entries within each session of a map",
                         description="Write a copy of a map without near-duplicate entries within a session.",
                         epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("map", help="the map to prune (left as it is unless --out names it with --overwrite)")
    r.add_argument("--out", required=True, help="the pruned map's directory")
    r.add_argument("--min-distance", type=positive_float, default=1.0,
                   help="metres: an entry this close to a kept entry of its session is a duplicate (default 1.0)")
    r.add_argument("--min-angle", type=nonneg_float, default=15.0,
                   help="degrees: ... when it also faces within this angle of it; 0 = position alone decides "
                        "(default 15)")
    r.add_argument("--index", default=None, choices=INDEX_CHOICES,
                   help="index of the pruned map (default: the input's)")
    r.add_argument("--verify", default="auto", choices=VERIFY_MODES, help="how the input is checked (default auto)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing map at --out (atomically)")
    r.set_defaults(func=run_prune)

    i = group.add_parser("info", help=map_info.HELP + " (same as r2former map-info)",
                         description=map_info.DESCRIPTION)
    map_info.add_arguments(i)
    from .main import add_logging_options
    for sp in (m, r, i):
        sp.set_defaults(command=f"map {sp.prog.split()[-1]}")
        add_logging_options(sp, top_level=False)
    p.set_defaults(func=lambda args: _usage(p))
    return p


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _sessions_line(db) -> str:
    n = len(db.info.sessions)
    return f"{len(db)} entries in {n} session{'s' if n != 1 else ''}, index {db.info.index}"


def run_merge(args) -> int:
    from ..errors import CliError
    from ..mapops import merge_maps
    if len(args.maps) < 2:
        raise CliError("give at least two maps to merge (r2former map merge A B ... --out C)")
    db = merge_maps(args.maps, args.out, index=args.index, overwrite=args.overwrite, verify=args.verify)
    print(f"merged map {db.path}: {_sessions_line(db)}")
    return 0


def run_prune(args) -> int:
    from ..mapops import prune_map
    db = prune_map(args.map, args.out, min_distance=args.min_distance, min_angle=args.min_angle, index=args.index,
                   overwrite=args.overwrite, verify=args.verify)
    print(f"pruned map {db.path}: {_sessions_line(db)}")
    return 0
