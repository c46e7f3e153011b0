"""`r2former`: the offline command line (build maps, localize, evaluate, train, developer checks).

Each subcommand lives in its own module of this package exposing
    add_parser(subparsers) -> argparse.ArgumentParser   (sets `func=run` as default)
    run(args) -> int                                     (exit status)
Expected failures raise an `R2FormerError` (`CliError` for command-line problems) or an `OSError`
and print one line (exit status 2).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

from ..errors import EXPECTED_ERRORS
from ..logging_setup import setup_logging
from .common import apply_image_limit

# Subcommand modules, in the order `--help` lists them: names relative to this package, or absolute (`launch`
# starts ROS processes and lives with the nodes; it never imports rclpy).
SUBCOMMANDS = ["build_map", "localize", "eval", "map_info", "map_group", "synth", "train", "r2former_ros.launcher",
               "check_parity"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r2former",
        description="R2Former visual localization, offline: build maps from image folders or rosbag2 files, "
                    "localize images against them, evaluate recall, train models, check parity.")
    add_logging_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(name if "." in name else f"{__package__}.{name}")
        add_logging_options(module.add_parser(sub), top_level=False)
    return parser


def add_logging_options(p: argparse.ArgumentParser, top_level: bool) -> None:
    """--log-level / --log-json, before or after the command (`r2former --log-level ERROR eval ...` or
    `r2former eval ... --log-level ERROR`); a command's own copy only overrides when given."""
    unset: dict[str, Any] = {} if top_level else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("logging") if not top_level else p
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging verbosity (default INFO)", **({"default": "INFO"} if top_level else unset))
    g.add_argument("--log-json", action="store_true", help="log one JSON object per line (for log collectors)",
                   **unset)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, json_lines=args.log_json)
    apply_image_limit(args)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:          # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        logging.getLogger("r2former").error("interrupted")
        return 130
    except EXPECTED_ERRORS as exc:
        print(f"r2former {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
