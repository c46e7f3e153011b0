"""`make demo` / `python -m r2former_ros.demo`: the whole pipeline on a synthetic street, end to end.

Steps, each its own process (logs in OUT/logs/):

1. `r2former synth`: a map drive (day) as rosbag2, camera images + /odom ground truth;
2. `r2former synth`: a query drive of the same world in other conditions (dusk), shifted sideways
   and with yaw jitter;
3. `build_map --bag`: the localization map of the map drive, with the demo model;
4. `localize` (the same command line `r2former launch localize` runs, with a parameters file
   derived from config/localize.yaml: tracking on, as by default) and `demo_evaluator`, in their own
   processes;
5. `bag_player`: the query bag at its recorded rate (10 Hz, best-effort like a camera driver);
6. the evaluator compares `~/pose` with ground truth and writes OUT/summary.json,
   OUT/trajectory.png and OUT/matches_*.png; this script adds the run's settings and timings;
7. `r2former_core.demo_compare` (unless --compare-every 0): single frames against tracking on every
   n-th query frame, offline with the node's parameters (OUT/comparison.json, OUT/comparison.png); the
   numbers go into summary.json ("comparison") and the printed table.

The ROS graph is private: localhost-only discovery and a random domain id (`--domain-id` to choose).
Ctrl-C or a failed step stops every child (SIGINT, then SIGTERM, then SIGKILL) and exits non-zero
with one line saying which step failed and where its log is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from r2former_core.resources import find_file, resolve_model_path
from r2former_ros import launcher

from .processes import Child, stop_children

QUERY_TOPIC = "/camera/image_raw"
ODOM_TOPIC = "/odom"
LOCALIZER = "/r2former_localizer"
DEFAULT_SIZE = (256, 320)


class StepFailed(RuntimeError):
    """A step of the demo failed; str() is the one line to print."""


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.work = self.out / "work"
        self.logs = self.out / "logs"
        self.children: list[Child] = []
        self.deferring = False       # a child is being started: SIGINT/SIGTERM wait until it is tracked
        self.interrupted = False
        self.timings: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.domain_id = args.domain_id if args.domain_id is not None else random.SystemRandom().randint(1, 100)
        env = dict(os.environ)
        env.update(ROS_DOMAIN_ID=str(self.domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                   ROS_LOG_DIR=str((self.logs / "ros").resolve()), PYTHONUNBUFFERED="1")
        env.pop("ROS_STATIC_PEERS", None)
        try:   # big shared-memory segment: best-effort camera images reach the other processes
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(find_file("config/fastdds_shm.xml"))
        except FileNotFoundError:
            pass
        self.env = env

    # ----------------------------------------------------------------- helpers
    def say(self, text: str, end: str = "\n") -> None:
        print(text, end=end, flush=True)

    def start(self, name: str, cmd: Sequence[str]) -> Child:
        # A Ctrl-C while Popen runs would leave a started child untracked: defer it until the child is listed.
        self.deferring = True
        try:
            child = Child(name, cmd, self.logs / f"{name}.log", self.env)
            self.children.append(child)
        finally:
            self.deferring = False
        if self.interrupted:
            raise KeyboardInterrupt
        return child

    def on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.interrupted = True
        if not self.deferring:
            raise KeyboardInterrupt

    def run_step(self, name: str, cmd: Sequence[str], timeout: float) -> float:
        t = time.monotonic()
        child = self.start(name, cmd)
        code = child.wait(timeout)
        if code is None:
            child.stop()
            raise StepFailed(f"demo: step {name!r} did not finish within {timeout:.0f} s; log: {child.log_path}")
        child.stop()
        if code != 0:
            raise StepFailed(f"demo: step {name!r} failed (exit {code}): {child.last_line()} "
                             f"(log: {child.log_path})")
        return time.monotonic() - t

    def stop_all(self) -> None:
        stop_children(self.children)

    @staticmethod
    def python(module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def prepare(self) -> None:
        """Remove what an earlier run wrote (only the demo's own files)."""
        for path in (self.work, self.logs):
            if path.exists():
                shutil.rmtree(path)
        for pattern in ("summary.json", "trajectory.png", "matches_*.png", "comparison.json", "comparison.png",
                        "comparison_frames.csv"):
            for path in self.out.glob(pattern):
                path.unlink()
        self.work.mkdir(parents=True)
        self.logs.mkdir(parents=True)

    def localize_params(self, model: Path) -> Path:
        """config/localize.yaml with the demo's changes (only those given on the command line)."""
        source = find_file("config/localize.yaml")
        params = yaml.safe_load(source.read_text())
        node = params["/**"]["ros__parameters"]
        node["device"] = self.args.device
        if self.args.min_confidence is not None:
            node["min_confidence"] = float(self.args.min_confidence)
        if self.args.top_k is not None:
            node["top_k"] = int(self.args.top_k)
        node["tracking"] = self.args.tracking == "on"
        node.update(self.args.set)
        path = self.work / "localize.yaml"
        path.write_text(f"# Generated by the demo from {source}\n" + yaml.safe_dump(params, sort_keys=False))
        return path

    # -------------------------------------------------------------------- run
    def run(self) -> dict:
        a = self.args
        model = Path(resolve_model_path(a.model)).resolve()
        if not model.is_file():
            raise StepFailed(f"demo: model {model} does not exist")
        self.prepare()
        height, width = a.size or image_size_for(model)
        steps = 7 if a.compare_every > 0 else 6
        self.say(f"r2former demo: seed {a.seed}, map {a.map_conditions} ({a.map_frames} frames), query "
                 f"{a.query_conditions} ({a.query_frames} frames), {width}x{height} images, model {model}, "
                 f"ROS_DOMAIN_ID {self.domain_id} (localhost only); output {self.out}/")

        synth = ["r2former_core.cli.main", "synth", "--seed", str(a.seed), "--width", str(width),
                 "--height", str(height), "--bag"]
        self.say(f"[1/{steps}] synthetic map drive ({a.map_conditions}) ...", end=" ")
        dt = self.run_step("synth_map", self.python(*synth, "--drive", "map", "--conditions", a.map_conditions,
                                                    "--frames", str(a.map_frames), "--out", str(self.work / "map")),
                           timeout=600)
        self.timings["synth_map"] = dt
        self.say(f"{dt:.1f} s")
        self.say(f"[2/{steps}] synthetic query drive ({a.query_conditions}) ...", end=" ")
        dt = self.run_step("synth_query", self.python(*synth, "--drive", "query", "--conditions",
                                                      a.query_conditions, "--frames", str(a.query_frames),
                                                      "--out", str(self.work / "query")), timeout=600)
        self.timings["synth_query"] = dt
        self.say(f"{dt:.1f} s")

        map_dir = Path(a.map) if a.map else self.work / "map_db"
        self.say(f"[3/{steps}] build_map from the map bag ...", end=" ")
        dt = self.run_step("build_map", self.python(
            "r2former_ros.build_map_node", "--bag", str(self.work / "map" / "bag"), "--image-topic", QUERY_TOPIC,
            "--pose-topic", ODOM_TOPIC, "--out", str(map_dir), "--model", str(model), "--device", a.device,
            "--overwrite"),
            timeout=1200)
        self.timings["build_map"] = dt
        map_size = _map_size(map_dir)
        self.say(f"{dt:.1f} s, {map_size} map images")

        self.say(f"[4/{steps}] starting localize and demo_evaluator ...", end=" ")
        t = time.monotonic()
        params = self.localize_params(model)
        inv = launcher.localize_invocations(str(params), map_path=str(map_dir.resolve()), model=str(model),
                                              image_topic=QUERY_TOPIC)[0]
        localize = self.start("localize", launcher.executable_command(inv.node) + inv.ros_args())
        ready_file = self.work / "evaluator.ready"
        title = (f"seed {a.seed}: map {a.map_conditions}, query {a.query_conditions}; model {model.name} "
                 f"({_sha256(model)[:12]})")
        loc_values = yaml.safe_load(params.read_text())["/**"]["ros__parameters"]
        evaluator = self.start("demo_evaluator", self.python(
            "r2former_ros.demo_evaluator", "--out", str(self.out), "--image-topic", QUERY_TOPIC,
            "--odom-topic", ODOM_TOPIC, "--localizer", LOCALIZER, "--frames-published", str(a.query_frames),
            "--qos-reliability", str(loc_values["qos_reliability"]), "--qos-depth", str(loc_values["qos_depth"]),
            "--max-matches", str(a.max_matches), "--idle-timeout", str(a.idle_timeout),
            "--ready-file", str(ready_file), "--title", title))
        deadline = time.monotonic() + a.startup_timeout
        while not ready_file.exists():
            for child in (localize, evaluator):
                if not child.alive():
                    raise StepFailed(f"demo: {child.name} exited during start-up (exit {child.proc.returncode}): "
                                     f"{child.last_line()} (log: {child.log_path})")
            if time.monotonic() > deadline:
                raise StepFailed(f"demo: localize was not ready within {a.startup_timeout:.0f} s "
                                 f"(log: {localize.log_path})")
            time.sleep(0.2)
        self.timings["start_nodes"] = time.monotonic() - t
        self.say(f"{self.timings['start_nodes']:.1f} s")

        play_sec = a.query_frames / 10.0 / a.rate
        self.say(f"[5/{steps}] playing the query bag ({a.query_frames} frames, {play_sec:.1f} s at rate "
                 f"{a.rate:g}) ...", end=" ")
        dt = self.run_step("bag_player", self.python(
            "r2former_ros.bag_player", str(self.work / "query" / "bag"), "--topics", QUERY_TOPIC, ODOM_TOPIC,
            "--rate", str(a.rate), "--qos-reliability", "best_effort", "--wait-for-subscribers", "30",
            "--subscribers", f"{QUERY_TOPIC}=2",            # the localizer and the evaluator
            "--start-delay", "1.0"), timeout=play_sec + 120)
        self.timings["play"] = dt
        self.say(f"{dt:.1f} s")

        self.say(f"[6/{steps}] evaluating ...", end=" ")
        t = time.monotonic()
        code = evaluator.wait(4 * a.idle_timeout + 120)
        if code is None:   # still waiting for the localizer: take what arrived
            code = evaluator.stop()
        if not localize.alive():
            raise StepFailed(f"demo: localize exited while the query played (exit {localize.proc.returncode}): "
                             f"{localize.last_line()} (log: {localize.log_path})")
        localize_code = localize.stop()
        if code != 0:
            raise StepFailed(f"demo: step 'demo_evaluator' failed (exit {code}): {evaluator.last_line()} "
                             f"(log: {evaluator.log_path})")
        self.timings["evaluate"] = time.monotonic() - t
        self.say(f"{self.timings['evaluate']:.1f} s")

        summary_path = self.out / "summary.json"
        summary = json.loads(summary_path.read_text())
        if a.compare_every > 0:
            summary["comparison"] = self.compare(model, map_dir, params, steps)
            summary["files"] = [*summary.get("files", []), "comparison.png"]
        self.timings["total"] = time.monotonic() - self.t0
        summary["demo"] = {
            "seed": a.seed, "map_conditions": a.map_conditions, "query_conditions": a.query_conditions,
            "map_frames": a.map_frames, "query_frames": a.query_frames, "image_size": [height, width],
            "rate": a.rate, "map_images": map_size, "model": str(model), "model_sha256": _sha256(model),
            "model_fingerprint": summary.get("diagnostics", {}).get("model_fingerprint"),
            "localize_params": loc_values, "localize_exit": localize_code, "ros_domain_id": self.domain_id,
            "seconds": {k: round(v, 2) for k, v in self.timings.items()},
        }
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        from r2former_core.demo_report import format_table
        self.say("\n" + format_table(summary))
        files = ", ".join(summary.get("files", []))
        self.say(f"\ndemo finished in {self.timings['total']:.0f} s; wrote {summary_path} and {files} "
                 f"in {self.out}/ (logs in {self.logs}/)")
        return summary


    def compare(self, model: Path, map_dir: Path, params: Path, steps: int) -> dict:
        """Step 7: single frames against tracking on every n-th query frame, offline (r2former_core.demo_compare)."""
        every = self.args.compare_every
        self.say(f"[7/{steps}] single frames vs tracking, offline on 1 of every {every} query frames ...", end=" ")
        out = self.out / "comparison.json"
        dt = self.run_step("compare", self.python(
            "r2former_core.demo_compare", "--map", str(map_dir), "--bag", str(self.work / "query" / "bag"),
            "--image-topic", QUERY_TOPIC, "--pose-topic", ODOM_TOPIC, "--model", str(model),
            "--device", self.args.device, "--params", str(params), "--every", str(every), "--out", str(out)),
            timeout=1800)
        self.timings["compare"] = dt
        self.say(f"{dt:.1f} s")
        data = json.loads(out.read_text())
        meta = data.get("_meta", {})
        return {"single": data["single"], "tracking": data["tracking"], "every": every,
                "frames": meta.get("frames"), "method": "offline on the query bag with the node's parameters "
                "(r2former_core.demo_compare): within_5m and gross_error_rate are fractions of all compared "
                "frames", "files": ["comparison.json", "comparison.png", "comparison_frames.csv"]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _map_size(map_dir: Path) -> int | None:
    try:
        from r2former_core.mapdb import MapDatabase
        return len(MapDatabase.load(map_dir))
    except Exception:  # noqa: BLE001 - only for the progress line
        return None


def image_size_for(model: Path) -> tuple[int, int]:
    """(H, W) to render: the model's input size from a project safetensors file, doubled when small (so the
    ~/matches images are legible); 256x320 when the file does not say (e.g. an official .pth)."""
    try:
        from safetensors import safe_open
        with safe_open(str(model), framework="np") as f:
            h, w = (int(v) for v in json.loads((f.metadata() or {})["config"])["image_size"])
    except Exception:  # noqa: BLE001 - not a project safetensors file: the default
        return DEFAULT_SIZE
    scale = 2 if max(h, w) <= 320 else 1
    return h * scale, w * scale


def _size(text: str) -> tuple[int, int] | None:
    if text == "auto":
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 320x256, not {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError("width and height must be at least 16")
    return h, w


def _param(text: str) -> tuple[str, object]:
    """NAME=VALUE of a localize parameter (VALUE as YAML: 0.8, true, [1.0, 2.0], text), checked against the
    node's parameter table."""
    from r2former_ros.localize_node import SPECS
    name, sep, raw = text.partition("=")
    if not sep or name not in SPECS:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME a localize parameter, not {text!r}")
    value = yaml.safe_load(raw)
    spec = SPECS[name]
    if isinstance(spec.default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(spec.default):
        raise argparse.ArgumentTypeError(f"{name} must be a {type(spec.default).__name__}, not {raw!r}")
    reason = spec.check(value)
    if reason:
        raise argparse.ArgumentTypeError(reason)
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r2former_ros.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--map", default="maps/demo",
                   help="where the localization map is written (default maps/demo, replaced when it exists; "
                        "'' = inside --out/work)")
    p.add_argument("--seed", type=int, default=7, help="synthetic world (default 7; not a training or "
                   "evaluation seed of the demo model)")
    p.add_argument("--map-conditions", default="day", help="conditions of the map drive (default day)")
    p.add_argument("--query-conditions", default="dusk", help="conditions of the query drive (default dusk)")
    p.add_argument("--map-frames", type=int, default=220,
                   help="map drive images (default 220: once around the loop, ~1.9 m apart)")
    p.add_argument("--query-frames", type=int, default=200, help="query drive images at 10 Hz (default 200 = 20 s)")
    p.add_argument("--size", type=_size, default=None, metavar="WIDTHxHEIGHT|auto",
                   help="rendered image size (default auto: twice the model's input size, 320x256 for the demo "
                   "model, so that the aspect ratio is the model's)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1 = real time)")
    p.add_argument("--model", default="", help="model file (default: models/r2former_tiny_demo.safetensors or "
                   "$R2FORMER_MODEL)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto")
    p.add_argument("--tracking", choices=("on", "off"), default="on",
                   help="the localizer's tracking parameter (default on, as config/localize.yaml)")
    p.add_argument("--set", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="any other localize parameter for this run, e.g. --set track_min_mass=0.8 (repeatable)")
    p.add_argument("--compare-every", type=int, default=4, metavar="N",
                   help="step 7: single frames against tracking on every N-th query frame, offline with the node's "
                        "parameters (default 4: 50 of the 200 frames, a 2.5 Hz camera; 1 = all; 0 = skip)")
    p.add_argument("--min-confidence", type=float, help="localizer min_confidence (default: config/localize.yaml)")
    p.add_argument("--top-k", type=int, help="localizer top_k (default: config/localize.yaml)")
    p.add_argument("--max-matches", type=int, default=4, help="matches_*.png images to save (default 4)")
    p.add_argument("--idle-timeout", type=float, default=3.0,
                   help="the evaluator finishes this long after the last image, once the localizer is idle")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for localize to load (default 300)")
    p.add_argument("--domain-id", type=int, help="ROS_DOMAIN_ID of the demo's graph (default: random 1-100)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.map_frames < 2 or args.query_frames < 1 or args.rate <= 0 or args.compare_every < 0:
        print("demo: error: --map-frames >= 2, --query-frames >= 1, --rate > 0 and --compare-every >= 0 are "
              "required", file=sys.stderr)
        return 2
    demo = Demo(args)
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM should clean up too.
    old_int = signal.signal(signal.SIGINT, demo.on_signal)
    old_term = signal.signal(signal.SIGTERM, demo.on_signal)
    try:
        demo.run()
        return 0
    except StepFailed as exc:
        print(f"\n{exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping the nodes", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C must not cut the clean-up short
        demo.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


if __name__ == "__main__":
    sys.exit(main())
