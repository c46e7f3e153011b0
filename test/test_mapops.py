"""Map operations: merge, append and prune (sessions, bit-for-bit copies, refusals, SIGKILL at any point)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from r2former_core import mapdb
from r2former_core.cli.main import main
from r2former_core.data.poses import quat_from_yaw
from r2former_core.mapdb import MapDatabase, MapError
from r2former_core.mapops import merge_maps, open_append, prune_indices, prune_map

REPO = Path(__file__).resolve().parents[1]
G, N, C = 16, 6, 5
FP = "fp-mapops"


def drive(n: int, seed: int, x0: float = 0.0, step: float = 2.0) -> dict:
    """A drive along +x: random features, `step` metres apart, every third entry with a thumbnail."""
    rng = np.random.default_rng(seed)
    glob = rng.standard_normal((n, G)).astype(np.float32)
    poses = np.zeros((n, 7))
    poses[:, 0] = x0 + step * np.arange(n)
    poses[:, 3:] = quat_from_yaw(rng.uniform(-0.1, 0.1, n))
    thumbs = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) if i % 3 == 0 else None for i in range(n)]
    return dict(glob=glob / np.linalg.norm(glob, axis=1, keepdims=True), local=rng.standard_normal((n, N, C)),
                poses=poses, stamps=1.7e9 + seed * 1e4 + np.arange(n), names=[f"s{seed}/{i:04d}.png" for i in range(n)],
                thumbs=thumbs)


def write_map(path: Path, *drives: dict, fingerprint: str = FP, frame_id: str = "map", child_frame: str = "camera",
              names: tuple[str, ...] = (), conditions: tuple[tuple[str, ...], ...] = (), **kw) -> Path:
    with MapDatabase.create(path, fingerprint=fingerprint, model_config={"t": 1}, image_size=(24, 32), global_dim=G,
                            num_local=N, local_values=C, frame_id=frame_id, child_frame=child_frame,
                            source=f"test {path.name}", **kw) as w:
        for i, d in enumerate(drives):
            w.begin_session(names[i] if i < len(names) else f"drive {i}", f"drive source {i}",
                            conditions[i] if i < len(conditions) else ())
            w.add_batch(d["glob"], d["local"], d["poses"], d["stamps"], d["names"], d["thumbs"])
    w.database.close()
    return path


def contents(path: Path) -> dict:
    """Every entry's data as stored, plus the sessions, for comparisons."""
    with MapDatabase.load(path, verify="full") as db:
        return dict(glob=np.array(db.global_desc), local=db.local(np.arange(len(db))), poses=np.array(db.poses),
                    stamps=np.array(db.stamps), names=list(db.names), sessions=np.array(db.sessions),
                    thumbs=[db.thumbnail_jpeg(i) for i in range(len(db))],
                    table=[(s.name, s.source, s.conditions, s.count, s.created) for s in db.info.sessions])


def concat(*parts: dict) -> dict:
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("glob", "local", "poses", "stamps")}
    out["names"] = [n for p in parts for n in p["names"]]
    out["thumbs"] = [t for p in parts for t in p["thumbs"]]
    return out


def assert_same_entries(a: dict, b: dict) -> None:
    for k in ("glob", "local", "poses", "stamps"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["names"] == b["names"] and a["thumbs"] == b["thumbs"]


@pytest.fixture()
def day_night(tmp_path):
    day = write_map(tmp_path / "day", drive(12, 1), names=("day",), conditions=(("day",),))
    night = write_map(tmp_path / "night", drive(9, 2, x0=1.0), drive(4, 3, x0=30.0), names=("night", "night 2"),
                      conditions=(("night",), ("night", "rain")))
    return day, night


# ------------------------------------------------------------------------------------------------ merge


def test_merge_keeps_every_entry_bit_for_bit_and_its_session(day_night, tmp_path):
    day, night = day_night
    a, b = contents(day), contents(night)
    merged = merge_maps([day, night], tmp_path / "both", progress=False)
    assert len(merged) == 25 and merged.info.source.startswith("merge of day (1 session), night (2 sessions)")
    merged.close()
    m = contents(tmp_path / "both")                       # loads with verify="full": every checksum holds
    assert_same_entries(m, concat(a, b))
    assert m["sessions"].tolist() == [0] * 12 + [1] * 9 + [2] * 4
    assert m["table"] == a["table"] + b["table"]           # name, source, conditions, count, creation kept
    assert [t[2] for t in m["table"]] == [("day",), ("night",), ("night", "rain")]
    # merging a merged map renumbers its sessions after the others
    again = merge_maps([night, tmp_path / "both"], tmp_path / "again", progress=False)
    assert again.sessions.tolist() == [0] * 9 + [1] * 4 + [2] * 12 + [3] * 9 + [4] * 4
    assert again.keyframe_spacing() == pytest.approx(2.0)   # no jumps between drives counted as spacing


def test_merge_refusals_write_nothing(day_night, tmp_path):
    day, night = day_night
    other_model = write_map(tmp_path / "other_model", drive(3, 4), fingerprint="fp-other")
    odom = write_map(tmp_path / "odom", drive(3, 5), frame_id="odom")
    base = write_map(tmp_path / "base", drive(3, 6), child_frame="base_link")
    f16 = write_map(tmp_path / "f16", drive(3, 7), global_dtype="float16")
    out = tmp_path / "out"
    cases = [(other_model, "built with model fp-other.*rebuild one of them with the other's model"),
             (odom, r"camera in odom, the other's the pose of camera in map"),
             (base, "base_link in map"),
             (f16, "global_dtype 'float16' differs")]
    for bad, message in cases:
        with pytest.raises(MapError, match=message):
            merge_maps([day, bad], out, progress=False)
    with pytest.raises(MapError, match="given twice"):
        merge_maps([day, tmp_path / "." / "day"], out, progress=False)
    with pytest.raises(MapError, match="already exists"):
        merge_maps([day, night], night, progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))
    assert len(MapDatabase.load(night)) == 13


def test_merge_into_one_of_its_inputs_replaces_it_atomically(day_night, tmp_path):
    day, night = day_night
    a, b = contents(day), contents(night)
    merge_maps([day, night], day, overwrite=True, progress=False).close()
    assert_same_entries(contents(day), concat(a, b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day", "night"]   # no leftovers


def test_map_written_before_sessions_loads_as_one_session(tmp_path):
    path = write_map(tmp_path / "old", drive(5, 1), drive(4, 2, x0=50.0))
    doc = json.loads((path / "map.json").read_text())
    for key in ("sessions", "json_sha256"):
        doc.pop(key, None)
    doc["files"].pop("sessions.npy")
    (path / "sessions.npy").unlink()
    (path / "map.json").write_text(json.dumps(doc, indent=2) + "\n")    # exactly as the old writer wrote it
    db = MapDatabase.load(path, verify="full")
    assert db.sessions.tolist() == [0] * 9
    assert [(s.id, s.source, s.count) for s in db.info.sessions] == [(0, "test old", 9)]
    # its one "session" spans both drives: the 42 m step between them is one step of eight
    assert db.keyframe_spacing() == pytest.approx(2.0)
    merged = merge_maps([path, write_map(tmp_path / "new", drive(3, 3))], tmp_path / "m", progress=False)
    assert merged.sessions.tolist() == [0] * 9 + [1] * 3


def test_damaged_session_records_are_refused(tmp_path):
    path = write_map(tmp_path / "m", drive(5, 1), drive(4, 2))
    ids = np.load(path / "sessions.npy")
    ids[0] = 1
    np.save(path / "sessions.npy", ids)
    with pytest.raises(MapError, match="counts \\[4, 5\\] entries per session"):
        MapDatabase.load(path, verify="quick")
    ids[0] = 7
    np.save(path / "sessions.npy", ids)
    with pytest.raises(MapError, match="session ids outside 0..1"):
        MapDatabase.load(path, verify="quick")


# ------------------------------------------------------------------------------------------------ append


def test_append_adds_a_session_in_place(day_night, tmp_path):
    day, _ = day_night
    before = contents(day)
    new = drive(6, 9, x0=0.5)
    writer = open_append(day, fingerprint=FP, frame_id="map", child_frame="camera", source="bag night_run",
                         session_name="night", conditions=["night"], progress=False)
    old = MapDatabase.load(day)              # until the commit, the old map is the one under its name
    assert len(old) == 12
    writer.add_batch(new["glob"], new["local"], new["poses"], new["stamps"], new["names"], new["thumbs"])
    db = writer.commit()
    assert len(db) == 18 and db.sessions.tolist() == [0] * 12 + [1] * 6
    assert [(s.name, s.source, s.conditions) for s in db.info.sessions] == [
        ("day", "drive source 0", ("day",)), ("night", "bag night_run", ("night",))]
    after = contents(day)
    for k in ("glob", "local", "poses", "stamps"):
        np.testing.assert_array_equal(after[k][:12], before[k])
    assert np.array_equal(np.asarray(old.global_desc), before["glob"])   # a loaded old map keeps working
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day", "night"]


def test_append_refusals_leave_the_map_untouched(day_night):
    day, _ = day_night
    sha = hashlib.sha256((day / "map.json").read_bytes()).hexdigest()
    with pytest.raises(MapError, match="built with model fp-mapops, this model is fp-x; append with the map's model"):
        open_append(day, fingerprint="fp-x", frame_id="map", child_frame="camera", source="s")
    with pytest.raises(MapError, match="its poses are the pose of camera in map, the new drive's are the pose of "
                                       "base_link in map"):
        open_append(day, fingerprint=FP, frame_id="map", child_frame="base_link", source="s")
    assert hashlib.sha256((day / "map.json").read_bytes()).hexdigest() == sha
    assert not list(day.parent.glob("*.tmp-*"))


# ------------------------------------------------------------------------------------------------ prune


def test_prune_drops_duplicates_within_a_session_only():
    # session 0 drives x = 0, 0.3, 0.6 (a stop), 3, then turns around at x = 3 (same place, facing back)
    # and revisits x = 0.2; session 1 passes the same places
    xy = [[0, 0], [0.3, 0], [0.6, 0], [3, 0], [3.1, 0], [0.2, 0.1], [0, 0.5], [3, 0.5]]
    yaw = [0, 0, 0, 0, np.pi, 0, 0, 0]
    poses = np.zeros((8, 7))
    poses[:, :2] = xy
    poses[:, 3:] = quat_from_yaw(np.array(yaw))
    sessions = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert prune_indices(poses, sessions, 1.0, 15.0).tolist() == [0, 3, 4, 6, 7]
    assert prune_indices(poses, sessions, 1.0, 0.0).tolist() == [0, 3, 6, 7]    # position alone: the turn goes
    with pytest.raises(ValueError, match="min_distance must be > 0"):
        prune_indices(poses, sessions, 0.0)


def test_prune_map_writes_the_kept_entries_and_sessions(tmp_path):
    dense = drive(20, 1, step=0.25)                       # 5 m in 0.25 m steps
    path = write_map(tmp_path / "m", dense, drive(20, 2, step=0.25))
    before = contents(path)
    pruned = prune_map(path, tmp_path / "p", min_distance=1.0, min_angle=0.0, progress=False)
    keep = prune_indices(before["poses"], before["sessions"], 1.0, 0.0)
    assert len(pruned) == len(keep) == 10 and pruned.sessions.tolist() == [0] * 5 + [1] * 5
    after = contents(tmp_path / "p")
    for k in ("glob", "local", "poses", "stamps"):
        np.testing.assert_array_equal(after[k], before[k][keep])
    assert [s.count for s in pruned.info.sessions] == [5, 5]


# ------------------------------------------------------------------------------------------------ SIGKILL

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from r2former_core import mapdb, mapops
    op, point, a, b, out = sys.argv[1:6]

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def after(obj, name, when=lambda: True):
        original = getattr(obj, name)
        def wrapped(*args, **kw):
            result = original(*args, **kw)
            if when():
                die()
            return result
        setattr(obj, name, wrapped)

    calls = []
    if point == "copying":        # after the first chunk of entries went into the temporary map
        after(mapdb.MapWriter, "add_encoded", lambda: calls.append(1) is None and len(calls) == 1)
    elif point == "committed":    # map.json written and synced in the temporary directory, nothing renamed
        after(mapdb.MapWriter, "_write_map_json")
    elif point == "swapped":      # the atomic exchange happened, the old map is not yet deleted
        after(mapdb, "_exchange")
    mapops.COPY_CHUNK = 4
    if op == "merge":
        mapops.merge_maps([a, b], out, overwrite=True, progress=False)
    elif op == "prune":
        mapops.prune_map(a, out, min_distance=3.0, overwrite=True, progress=False)
    else:
        w = mapops.open_append(a, fingerprint=sys.argv[6], frame_id="map", child_frame="camera",
                               source="appended", progress=False)
        rng = np.random.default_rng(0)
        pose = np.array([[100.0, 0, 0, 0, 0, 0, 1]])
        w.add_batch(rng.standard_normal((1, 16)), rng.standard_normal((1, 6, 5)), pose, [1.0], ["new"])
        w.commit()
    print("FINISHED")
""")


def run_killed(op: str, point: str, a: Path, b: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILLER, op, point, str(a), str(b), str(out), FP], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: rc {proc.returncode}\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("op", ["merge", "append", "prune"])
@pytest.mark.parametrize("point", ["copying", "committed", "swapped"])
def test_sigkill_leaves_the_old_map_loadable_and_no_half_map(day_night, tmp_path, op, point):
    """Kill the operation while it copies entries, after the new map is complete in its temporary
    directory, and right after the atomic swap. The map under the output name is always a complete one:
    the old map before the swap, the new one after; the next write of that name removes the leftovers."""
    day, night = day_night
    out = {"merge": tmp_path / "out", "append": day, "prune": tmp_path / "out"}[op]
    if op != "append":
        write_map(out, drive(3, 8))                       # an existing map that the result replaces
    old = contents(out)
    run_killed(op, point, day, night, out)
    now = contents(out)                                   # loadable, every checksum holds
    if point == "swapped":
        assert len(now["names"]) == {"merge": 25, "append": 13, "prune": 6}[op]
    else:
        assert_same_entries(now, old)
    leftovers = list(out.parent.glob(f"{out.name}.tmp-*"))
    assert len(leftovers) == 1                            # the killed writer's (holding the old map if swapped)
    # the next write under that name removes the dead writer's directory and succeeds
    if op == "append":
        w = open_append(day, fingerprint=FP, frame_id="map", child_frame="camera", source="again", progress=False)
        w.add_encoded(np.zeros((1, G), np.float32), np.zeros((1, N, C), np.float16), [[0, 0, 0, 0, 0, 0, 1]], [0.0],
                      ["x"], [b""])
        w.commit().close()
    else:
        merge_maps([day, night], out, overwrite=True, progress=False).close()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))


def test_sigkill_of_a_new_merge_leaves_nothing(day_night, tmp_path):
    day, night = day_night
    out = tmp_path / "fresh"
    run_killed("merge", "committed", day, night, out)
    assert not out.exists()
    with pytest.raises(MapError, match="does not exist"):
        MapDatabase.load(out)


# ------------------------------------------------------------------------------------------------ CLI


def test_map_commands(day_night, tmp_path, capsys):
    day, night = day_night
    assert main(["map", "merge", str(day), str(night), "--out", str(tmp_path / "both")]) == 0
    assert "25 entries in 3 sessions" in capsys.readouterr().out
    assert main(["map", "prune", str(tmp_path / "both"), "--out", str(tmp_path / "p"), "--min-distance", "3"]) == 0
    assert "entries in 3 sessions" in capsys.readouterr().out
    for cmd in (["map-info"], ["map", "info"]):
        assert main([*cmd, str(tmp_path / "both")]) == 0
        out = capsys.readouterr().out
        assert "3 sessions:" in out and "night,rain" in out and "drive source 1" in out
    assert main(["map", "info", str(tmp_path / "both"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(s["count"], s["conditions"]) for s in info["sessions"]] == [(12, ["day"]), (9, ["night"]),
                                                                         (4, ["night", "rain"])]
    assert info["sessions"][2]["extent_m"]["x"] == [30.0, 36.0]
    other = write_map(tmp_path / "other", drive(3, 4), fingerprint="fp-other")
    capsys.readouterr()
    assert main(["map", "merge", str(day), str(other), "--out", str(tmp_path / "x"), "--log-level", "ERROR"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r2former map merge: error: cannot merge") and "fp-other" in err[0]
    assert main(["map", "merge", str(day), "--out", str(tmp_path / "x")]) == 2
    assert "at least two maps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_index_choices_are_the_map_formats(tmp_path):
    from r2former_core.cli.build_map import INDEX_CHOICES
    from r2former_core.options import INDEX_TYPES
    assert INDEX_CHOICES == mapdb.INDEX_TYPES == INDEX_TYPES
