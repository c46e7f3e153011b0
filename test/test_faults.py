"""Faults while writing maps (docs/RELIABILITY.md §2): SIGKILL at 20 seeded points of `r2former build-map` and
of `build_map --bag`, and a full disk (RLIMIT_FSIZE) while a map is written.

Each killed build is a fresh process running the command line's `main()`. To spend the suite's time on the
builds rather than on importing torch twenty times, the processes are forked from a "zygote" that has
imported the modules and started nothing else (no thread, no model): the child then runs exactly what the
console script runs. The kills are spread over the build by polling its progress (the entries in the
temporary map directory, then the files its commit writes), never by sleeping.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from r2former_core.data.poses import quat_from_yaw, write_tum
from r2former_core.errors import MapError
from r2former_core.mapdb import MapDatabase

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
KILLS = 20
IMAGE_TOPIC = "/camera/image_raw"
# The files commit() writes, in order (global.npy, local.f16 and thumbnails.bin exist from the start).
COMMIT_FILES = ("local_crc32.npy", "poses.npy", "stamps.npy", "thumbnails_index.npy", "names.json", "map.json")

ZYGOTE = textwrap.dedent(r"""
    import json, os, sys
    import cv2, faiss, numpy, rosbags.highlevel, torch            # what a build imports, imported once
    import r2former_core.cli.main as cli
    import r2former_core.mapping, r2former_core.model, r2former_core.data.sources, r2former_core.mapdb
    try:
        import r2former_ros.build_map_node as build_map_node
    except ImportError:
        build_map_node = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            try:
                if cmd["tool"] == "r2former":
                    rc = cli.main(cmd["argv"])
                else:
                    rc = build_map_node.main(["build_map", *cmd["argv"]])
            except BaseException:
                import traceback
                traceback.print_exc()
                rc = 99
            os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), flush=True)
""")


class Zygote:
    """A process that has imported the build's modules and forks one child per command."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(REPO))
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.running: set[int] = set()

    def start(self, tool: str, argv: list[str], log: Path) -> int:
        self.proc.stdin.write(json.dumps({"tool": tool, "argv": argv, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        self.running.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        reply = json.loads(self.proc.stdout.readline())
        assert reply["pid"] == pid
        self.running.discard(pid)
        return reply["status"]

    def close(self) -> None:
        """Ends the zygote; a child a failed test left running is killed first (the zygote waits for it)."""
        for pid in self.running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def file_size(path: Path) -> int:
    """The size of a file a live writer owns, 0 while it is absent: a writer may remove its temporary directory
    between an exists() and a stat() (build_map's start-up probe creates one and aborts it at once)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model):
    """40 posed 96 x 128 images as a folder and as an mcap bag, and the tiny model."""
    from bagtools import write_image_pose_bag

    from r2former_core.model import save_model
    root = tmp_path_factory.mktemp("faults")
    n = 40
    rng = np.random.default_rng(3)
    images = [cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (128, 96), interpolation=cv2.INTER_CUBIC)
              for _ in range(n)]
    stamps = T0 + np.arange(n) * 0.5
    poses = np.zeros((n, 7))
    poses[:, 0] = np.arange(n) * 3.0
    poses[:, 3:] = quat_from_yaw(np.zeros(n))
    (root / "images").mkdir()
    for s, im in zip(stamps, images):
        cv2.imwrite(str(root / "images" / f"{s:.6f}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    write_tum(root / "poses.txt", stamps, poses)
    bag = write_image_pose_bag(root / "bag", images, list(stamps), poses, list(stamps), storage="mcap")
    model = save_model(tiny_model, root / "tiny.safetensors")
    return {"root": root, "n": n, "bag": bag, "model": str(model),
            "entry_bytes": tiny_model.cfg.local_tokens * tiny_model.cfg.local_values * 2}


def command(kind: str, inputs: dict, out: Path) -> tuple[str, list[str]]:
    if kind == "r2former":
        return "r2former", ["build-map", "--images", str(inputs["root"] / "images"), "--poses",
                            str(inputs["root"] / "poses.txt"), "--out", str(out), "--model", inputs["model"],
                            "--device", "cpu", "--batch-size", "1", "--overwrite"]
    return "build_map", ["--bag", str(inputs["bag"]), "--image-topic", IMAGE_TOPIC, "--pose-topic", "/odom", "--out",
                         str(out), "--model", inputs["model"], "--device", "cpu", "--min-distance", "0",
                         "--min-angle", "0", "--overwrite"]


def kill_points(seed: int, n: int) -> list[tuple[str, float | str]]:
    """20 seeded points: 14 at a random fraction of the entries written, 6 after a random file of the commit."""
    rng = np.random.default_rng(seed)
    points: list[tuple[str, float | str]] = [("entries", float(f)) for f in rng.uniform(0.0, 1.0, KILLS - 6)]
    points += [("commit", str(f)) for f in rng.choice(COMMIT_FILES, 6)]
    order = rng.permutation(len(points))
    return [points[i] for i in order]


def reached(point: tuple[str, float | str], tmp_dirs: list[Path], entry_bytes: int, n: int) -> bool:
    kind, where = point
    for tmp in tmp_dirs:
        if kind == "entries":
            if file_size(tmp / "local.f16") >= where * n * entry_bytes > 0:
                return True
        elif (tmp / where).exists():
            return True
    return False


def alive(pid: int) -> bool:
    """The zygote's child still runs (a zombie waiting to be reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def state_after_kill(out: Path, pid: int, n: int, entry_bytes: int) -> str:
    """Where the kill landed, from what the killed process left."""
    tmp = sorted(out.parent.glob(f"{out.name}.tmp-{pid}-*"))
    if not tmp:
        if sorted(out.parent.glob(f"{out.name}.old-{pid}-*")):
            return "between the two renames of the overwrite"
        return "with no temporary directory (before the writer started, or after its rename)"
    written = [f for f in COMMIT_FILES if (tmp[0] / f).exists()]
    if written:
        return f"in the commit ({len(written)} of {len(COMMIT_FILES)} files written)"
    local = tmp[0] / "local.f16"
    return f"writing entries ({local.stat().st_size // entry_bytes if local.exists() else 0} of {n} written)"


def check_complete(path: Path, reference: MapDatabase) -> None:
    db = MapDatabase.load(path, verify="full")
    try:
        assert len(db) == len(reference) and db.names == reference.names
        np.testing.assert_allclose(db.global_desc, reference.global_desc, atol=1e-5)
        np.testing.assert_array_equal(db.poses, reference.poses)
    finally:
        db.close()


def run_kills(kind: str, zygote: Zygote, inputs: dict, tmp_path: Path, caplog) -> list[str]:
    """Reference build, then 20 builds (each overwriting the last) killed at seeded points; the invariants are
    checked after every kill; a last build completes and leaves only the map."""
    out = tmp_path / "maps" / "m"
    out.parent.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    tool, argv = command(kind, inputs, out)
    pid = zygote.start(tool, argv, logs / "reference.log")
    assert zygote.wait(pid) == 0, (logs / "reference.log").read_text()[-3000:]
    reference = MapDatabase.load(out)
    landed = []
    for i, point in enumerate(kill_points(12 if kind == "r2former" else 13, inputs["n"])):
        if i % 2 == 0 and out.exists():     # half the kills hit a first build, half an overwrite
            shutil.rmtree(out)
        had_map = out.exists()
        pid = zygote.start(tool, argv, logs / f"kill{i}.log")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            tmp_dirs = list(out.parent.glob(f"{out.name}.tmp-{pid}-*"))
            if reached(point, tmp_dirs, inputs["entry_bytes"], inputs["n"]) or not alive(pid):
                break
            time.sleep(0.001)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        status = zygote.wait(pid)
        landed.append(f"{point[0]} {point[1] if isinstance(point[1], str) else round(point[1], 2)}: "
                      + (f"killed {state_after_kill(out, pid, inputs['n'], inputs['entry_bytes'])}" if status == -9
                         else f"finished (exit {status})"))
        # No half map under the final name: it is absent or complete (the old one or the new one).
        if out.exists():
            check_complete(out, reference)
        elif had_map:               # killed between the overwrite's two renames: the old map waits beside it
            olds = sorted(out.parent.glob(f"{out.name}.old-*"))
            assert olds, "the map vanished without an .old-* copy"
            with pytest.raises(MapError, match="rename it back"):
                MapDatabase.load(out)
            check_complete(olds[0], reference)
        else:
            with pytest.raises(MapError, match="does not exist"):
                MapDatabase.load(out)
        assert status in (-signal.SIGKILL, 0), (logs / f"kill{i}.log").read_text()[-3000:]
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "m"]
    if leftovers and out.exists():
        with caplog.at_level(logging.WARNING):
            MapDatabase.load(out).close()
        if any(".tmp-" in name for name in leftovers):
            assert "temporary director" in caplog.text              # reported when the map is loaded
    pid = zygote.start(tool, argv, logs / "rerun.log")
    assert zygote.wait(pid) == 0, (logs / "rerun.log").read_text()[-3000:]
    check_complete(out, reference)
    assert [p.name for p in out.parent.iterdir()] == ["m"], "the rerun must remove the dead writers' leftovers"
    reference.close()
    killed_mid_build = sum("writing entries" in x or "in the commit" in x or "renames" in x for x in landed)
    print(f"\n{kind}: {KILLS} kills, {killed_mid_build} while the map was being written; leftovers before the "
          f"rerun: {len(leftovers)}\n  " + "\n  ".join(landed))
    assert killed_mid_build >= KILLS // 2, landed
    return landed


def test_build_map_killed_at_20_points_never_leaves_a_half_map(zygote, inputs, tmp_path, caplog):
    run_kills("r2former", zygote, inputs, tmp_path, caplog)


def test_build_map_bag_node_offline_killed_at_20_points(zygote, inputs, tmp_path, caplog):
    pytest.importorskip("rclpy")
    run_kills("build_map", zygote, inputs, tmp_path, caplog)


# ----------------------------------------------------------------------------- disk full

def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_while_writing_entries_keeps_the_old_map(inputs, tmp_path):
    """`r2former build-map --overwrite` with files limited to 60 kB (RLIMIT_FSIZE; thumbnails.bin reaches it
    after ~12 entries): one error line, exit 2, no temporary directory left, the older map intact."""
    from r2former_core.cli.main import main
    out = tmp_path / "m"
    argv = command("r2former", inputs, out)[1]
    assert main(argv) == 0
    before = MapDatabase.load(out, verify="full")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "r2former_core.cli.main", *argv], capture_output=True, text=True,
                       env=env, cwd=str(REPO), preexec_fn=_limit_file_size(60_000), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("r2former build-map: error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and "nothing was written under" in errors[0], errors
    print(f"\n{errors[0]}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    after = MapDatabase.load(out, verify="full")
    np.testing.assert_array_equal(after.global_desc, before.global_desc)
    assert after.info.created == before.info.created


COMMIT_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from r2former_core.errors import MapError
    from r2former_core.mapdb import MapDatabase
    w = MapDatabase.create(sys.argv[1], fingerprint="fp-disk", model_config={}, image_size=(8, 8), global_dim=4,
                           num_local=2, local_values=3, overwrite=True)
    for i in range(50):                      # small entries; names.json (written at commit) is the big file
        w.add(np.ones(4), np.zeros((2, 3)), [i, 0, 0, 0, 0, 0, 1], float(i), f"{i:04d}-" + "n" * 2000)
    try:
        w.commit()
    except MapError as e:
        print(e)
        sys.exit(2)
""")


def test_disk_full_during_commit_keeps_the_old_map(tmp_path):
    """The limit is reached by names.json, written by commit(): MapError naming the failure, nothing new under
    the name, the older map intact, no temporary directory left."""
    path = tmp_path / "m"
    with MapDatabase.create(path, fingerprint="fp-old", model_config={}, image_size=(8, 8), global_dim=4, num_local=2,
                            local_values=3) as w:
        w.add(np.ones(4), np.zeros((2, 3)), [0, 0, 0, 0, 0, 0, 1], 0.0, "old")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", COMMIT_WRITER, str(path)], capture_output=True, text=True, env=env,
                       preexec_fn=_limit_file_size(50_000), timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "File too large" in r.stdout and "nothing was written under that name" in r.stdout, r.stdout
    print(f"\n{r.stdout.strip()}")
    db = MapDatabase.load(path, verify="full")
    assert db.info.fingerprint == "fp-old" and db.names == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
