"""`r2former synth`: render a drive through the synthetic city (images + TUM poses, or a rosbag2)."""
from __future__ import annotations

import argparse

from ..errors import CliError, ConfigError

# Listed here so that building the parser does not import OpenCV; a test keeps it equal to synthetic.CONDITIONS.
CONDITION_NAMES = ("day", "dusk", "night", "winter", "autumn", "fog", "rain")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "synth", help="render a synthetic drive: images + TUM ground truth, or a rosbag2",
        description="Render a drive through a procedural city loop that is fully determined by --seed. A map and "
                    "a query drive of the same seed see the same buildings; the query drive is shifted sideways "
                    "(up to 2 m), has yaw jitter (up to 15 deg), frames between the map's, its own traffic and "
                    "usually other --conditions. Output: OUT/images/<stamp>.png and OUT/poses.txt (TUM: "
                    "timestamp tx ty tz qx qy qz qw), or with --bag a rosbag2 in OUT/bag with /camera/image_raw "
                    "(or /camera/image_raw/compressed) and /odom, plus OUT/poses.txt.")
    p.add_argument("--seed", type=int, required=True, help="world seed: the same seed gives the same city")
    p.add_argument("--drive", required=True, choices=["map", "query"],
                   help="map: right lane, exact heading; query: lateral offset, yaw jitter, frames in between")
    p.add_argument("--conditions", default="day",
                   help=f"comma-separated, combinable: {','.join(CONDITION_NAMES)} (default day)")
    p.add_argument("--frames", type=int, default=100, help="number of images (default 100), 10 Hz stamps")
    p.add_argument("--spacing", type=float, default=None,
                   help="metres between frames along the road (default: 2, or less so one loop is not exceeded)")
    p.add_argument("--width", type=int, default=640, help="image width in pixels (default 640)")
    p.add_argument("--height", type=int, default=480, help="image height in pixels (default 480)")
    p.add_argument("--out", required=True, help="output directory (created; must not already hold a drive)")
    p.add_argument("--bag", action="store_true", help="write a rosbag2 (OUT/bag) instead of PNG files")
    p.add_argument("--compressed", action="store_true",
                   help="with --bag: JPEG sensor_msgs/CompressedImage on /camera/image_raw/compressed")
    p.add_argument("--storage", choices=["sqlite3", "mcap"], default=None,
                   help="with --bag: rosbag2 storage plugin (default sqlite3)")
    # --- noisy wheel odometry (r2former_core.odometry; the tracker's --odometry input)
    p.add_argument("--odometry", action="store_true",
                   help="also write OUT/odometry.txt: the drive's wheel odometry (TUM, odom frame, at the frame "
                        "stamps) with seeded drift in yaw and scale and noise (r2former_core.odometry, seed --seed)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..synthetic import CONDITIONS, SyntheticWorld, parse_conditions, write_drive
    try:
        conditions = parse_conditions(args.conditions)
    except ConfigError:
        raise CliError(f"invalid --conditions {args.conditions!r}; allowed values (comma-separated): "
                       f"{', '.join(CONDITIONS)}") from None
    if args.frames < 1:
        raise CliError("--frames must be at least 1")
    if args.width < 16 or args.height < 16:
        raise CliError("--width and --height must be at least 16 pixels")
    if args.spacing is not None and args.spacing <= 0:
        raise CliError("--spacing must be positive")
    if (args.compressed or args.storage) and not args.bag:
        raise CliError("--compressed and --storage apply to rosbag2 output: add --bag")
    world = SyntheticWorld(args.seed)
    try:
        out = write_drive(world, args.out, args.drive, conditions, args.frames, (args.height, args.width),
                          bag=args.bag, compressed=args.compressed, storage=args.storage or "sqlite3",
                          spacing=args.spacing, progress=True)
    except FileExistsError as exc:
        raise CliError(str(exc)) from None
    what = f"rosbag2 {out / 'bag'} ({args.storage or 'sqlite3'}{', jpeg' if args.compressed else ''})" if args.bag \
        else f"{out / 'images'}"
    print(f"synth: {args.frames} frames, {args.drive} drive, {','.join(conditions)}, seed {args.seed}, "
          f"route {world.route_length:.1f} m -> {what}, poses {out / 'poses.txt'}")
    # --- noisy wheel odometry
    if args.odometry:
        from ..data.poses import write_tum
        from ..odometry import simulate_odometry
        traj = world.trajectory(args.drive, args.frames, args.spacing)
        write_tum(out / "odometry.txt", traj.stamps, simulate_odometry(traj.poses, seed=args.seed))
        print(f"synth: noisy wheel odometry (odom frame) -> {out / 'odometry.txt'}")
    return 0
