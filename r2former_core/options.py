"""Settings users choose: their names, choices, defaults and allowed ranges, defined once.

The localizer's settings are the fields of `LocalizerConfig` (and `PoseConfig`); each field carries
an `Option` (help text, choices, range) in its metadata. The `r2former` command line builds its
options from them (`add_config_option`), the `localize` node builds its ROS parameters from them
(`r2former_ros.parameters.ParamSpec.from_config`), and a test checks `config/localize.yaml`
against both, so a default or a range cannot drift between the three.

This module imports nothing heavy (no torch, numpy or faiss): `r2former --help` stays fast.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from .data.image_limits import DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_CEILING
from .errors import ConfigError

RERANK_MODES = ("r2former", "ransac", "none")
R2FORMER_SCORES = ("match_prob", "final_score")   # match_prob: the official test-time ranking
POSE_MODES = ("best", "weighted")
DEVICE_CHOICES = ("auto", "cpu", "cuda")           # and cuda:N
# Numeric precision of extraction and reranking (r2former_core.model.precision): fp32 is exact (parity with
# the official code), auto = the fastest mode this machine accelerates and that keeps the ranking.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
TIMING_STAGES = ("decode", "extract", "search", "rerank", "pose", "total")   # milliseconds, per frame
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Option:
    """What a setting means and which values it accepts."""
    help: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    pattern: str = ""          # a regular expression the (string) value must match fully
    pattern_help: str = ""     # how to say the pattern to a user

    def allowed(self, default: Any = None) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.pattern_help:
            return self.pattern_help
        if self.min is not None or self.max is not None:
            kind = "an integer" if isinstance(default, int) and not isinstance(default, bool) else "a number"
            lo = "-inf" if self.min is None else _number_text(self.min)
            hi = "inf" if self.max is None else _number_text(self.max)
            return f"{kind} in [{lo}, {hi}]"
        return f"a {type(default).__name__}" if default is not None else "any value"

    def problem(self, value: Any, default: Any = None) -> str | None:
        """None when `value` is allowed, else why not."""
        if self.choices and value not in self.choices:
            return f"{value!r} is not {self.allowed(default)}"
        if self.pattern and not re.fullmatch(self.pattern, str(value)):
            return f"{value!r} is not {self.allowed(default)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or (self.min is not None and value < self.min) or (
                    self.max is not None and value > self.max):
                return f"{value!r} is not {self.allowed(default)}"
        return None


def _number_text(value: float) -> str:
    """A range bound as people write it: 1000 and 1073741824 in full, 0.5 and 1e-06 as %g does."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def option(default: Any, help: str, *, choices: tuple[str, ...] = (), min: float | None = None,  # noqa: A002
           max: float | None = None, pattern: str = "", pattern_help: str = "") -> Any:  # noqa: A002
    """A dataclass field with an `Option` in its metadata."""
    return field(default=default, metadata={"option": Option(help, tuple(choices), min, max, pattern, pattern_help)})


def config_options(cls: type) -> dict[str, tuple[Any, Option]]:
    """{field name: (default, Option)} of a config dataclass (fields without an Option are left out)."""
    out: dict[str, tuple[Any, Option]] = {}
    for f in fields(cls):
        opt = f.metadata.get("option")
        if opt is not None:
            out[f.name] = (_default(f), opt)
    return out


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ConfigError(f"option {f.name} has no default")


def check_config(obj: Any) -> None:
    """ConfigError naming the first field whose value its Option does not allow."""
    for name, (default, opt) in config_options(type(obj)).items():
        reason = opt.problem(getattr(obj, name), default)
        if reason:
            raise ConfigError(f"{name}: {reason}")


def add_config_option(parser: Any, cls: type, name: str, flag: str | None = None, help_suffix: str = "") -> None:
    """An argparse option for field `name` of `cls`: same default, range checked by argparse, help from
    the Option (with the default appended)."""
    default, opt = config_options(cls)[name]
    flag = flag or "--" + name.replace("_", "-")
    kwargs: dict[str, Any] = {"default": default}
    if opt.choices:
        kwargs["choices"] = opt.choices
    elif isinstance(default, bool):
        raise ConfigError(f"{name}: boolean options are flags; add them by hand")
    elif isinstance(default, (int, float)):
        kwargs["type"] = _ranged(type(default), opt, default)
    elif opt.pattern:
        kwargs["type"] = _matching(opt, default)
    parser.add_argument(flag, help=f"{opt.help}{help_suffix} (default {default})", **kwargs)


def _ranged(kind: type, opt: Option, default: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        reason = opt.problem(value, default)
        if reason:
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {opt.allowed(default)}")
        return value
    return parse


def _matching(opt: Option, default: Any) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if opt.problem(text, default):
            raise argparse.ArgumentTypeError(f"{text!r} is not {opt.allowed(default)}")
        return text
    return parse


def device_type(text: str) -> str:
    """argparse `type=` of a device option: auto, cpu, cuda or cuda:N."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    return text


def device_option(default: str = "auto") -> Any:
    return option(default, "where the model runs: auto (CUDA when available), cpu, cuda or cuda:N (GPU N)",
                  pattern=DEVICE_PATTERN.pattern, pattern_help="auto, cpu, cuda or cuda:N")


# ------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class PoseConfig:
    """How reranked candidates become a pose with covariance (`r2former_core.pose`)."""
    mode: str = option("weighted", "best: the best candidate's pose; weighted: the score-weighted position of "
                       "the candidates that agree with it", choices=POSE_MODES)
    top: int = option(10, "candidates that shape the weights, the agreement and the covariance", min=1)
    temperature: float = option(0.1, "softmax temperature over the normalised scores", min=1e-6)
    agree_radius: float = option(0.0, "metres within which candidates agree with the best; 0 = max(5 m, "
                                 "3 x keyframe spacing)", min=0.0)
    min_position_std: float = option(0.5, "metres, floor of the position standard deviation", min=0.0)
    min_yaw_std_deg: float = option(3.0, "degrees, floor of the yaw standard deviation", min=0.0)
    roll_pitch_std_deg: float = option(10.0, "degrees, roll and pitch standard deviation (not observed)", min=0.0)

    def validate(self) -> PoseConfig:
        check_config(self)
        return self


@dataclass(frozen=True)
class LocalizerConfig:
    """Everything that decides what `Localizer.localize` returns for an image."""
    top_k: int = option(100, "map images retrieved by the global descriptor and reranked", min=1, max=1000)
    rerank: str = option("r2former", "reranking of the top_k candidates: r2former (transformer), ransac "
                         "(homography inliers on token matches) or none (global score only)", choices=RERANK_MODES)
    r2former_score: str = option("match_prob", "what r2former ranks by: match_prob (the official ranking) or "
                                 "final_score (mixed with the global cosine)", choices=R2FORMER_SCORES)
    min_confidence: float = option(0.3, "results below this confidence are not accepted (not published)",
                                   min=0.0, max=1.0)
    num_matches: int = option(40, "matched token pairs kept in the result for drawing", min=0, max=500)
    device: str = device_option()
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, "largest image accepted, in pixels (width x height, "
                                   "read from the message or the PNG/JPEG header before decoding; larger images "
                                   "are refused unread). The default, 16 MP (4096 x 4096), fits every usual camera",
                                   min=1, max=MAX_IMAGE_PIXELS_CEILING)
    precision: str = option("auto", "numeric precision of extraction and reranking: fp32 (exact, parity with the "
                            "official code), bf16 (CPUs with AMX or AVX512-BF16, and GPUs), fp16 (CUDA), int8 "
                            "(dynamic int8 backbone linears, CPU) or auto (the fastest mode the device accelerates "
                            "among those that keep the ranking: fp16 on CUDA, fp32 on CPUs today; "
                            "docs/BENCHMARKS.md section 5)",
                            choices=PRECISIONS)
    rerank_budget_ms: float = option(0.0, "time budget of the reranking stage per frame in milliseconds: "
                                     "candidates are reranked best-global-first while the measured cost per "
                                     "candidate fits; the rest keep their global order (0 = rerank all top_k)",
                                     min=0.0)
    rerank_margin: float = option(0.0, "rerank only candidates whose global cosine is within this margin of the "
                                  "best one (a confident retrieval needs fewer); 0 = no margin rule", min=0.0,
                                  max=2.0)
    rerank_min: int = option(10, "candidates always reranked, whatever rerank_budget_ms and rerank_margin say",
                             min=1, max=1000)
    pose: PoseConfig = field(default_factory=PoseConfig)

    def validate(self) -> LocalizerConfig:
        check_config(self)
        self.pose.validate()
        return self


@dataclass(frozen=True)
class TrackingConfig:
    """The tracker (`r2former_core.tracking`): a recursive Bayes filter over the map's entries and the robot's
    speed that follows the robot between frames, reranks only where the robot can be, notices a kidnap and
    publishes only when one place holds most of the belief. Defaults fitted for the demo model on validation
    worlds (docs/TRACKING.md)."""
    enabled: bool = option(True, "filter the localization over time (off: every frame is localized on its own)")
    max_speed: float = option(25.0, "m/s, the fastest the robot moves along the map; bounds the motion the "
                              "filter predicts without odometry", min=0.1, max=100.0)
    speed_resolution: float = option(0.0, "m/s, step between the filter's speed states; 0 = max_speed / 10",
                                     min=0.0, max=10.0)
    accel_std: float = option(4.0, "m/s^2, standard deviation of the change of speed between frames "
                              "(without odometry)", min=0.0, max=100.0)
    position_std: float = option(1.0, "m, position noise of one prediction step; 0 = the map's keyframe spacing",
                                 min=0.0, max=50.0)
    heading_std_deg: float = option(30.0, "degrees, how far the heading of the next map entry may differ from the "
                                    "predicted one", min=1.0, max=180.0)
    odom_noise: float = option(0.1, "odometry error per step as a fraction of the distance driven",
                               min=0.0, max=2.0)
    kidnap_rate: float = option(0.2, "1/s, rate at which the belief is mixed with the prior (anywhere on the map "
                                "or elsewhere): how fast a new place can take over after a kidnap", min=0.0,
                                max=100.0)
    kidnap_speed: float = option(20.0, "m/s; > 0: below this speed the return to the prior is proportionally "
                                 "slower, kidnap_rate / kidnap_speed per metre driven (the speed from the odometry, "
                                 "else the filter's), so that a slow robot does not lose its place by the second; "
                                 "0 = kidnap_rate per second at any speed", min=0.0, max=100.0)
    elsewhere_prior: float = option(0.2, "prior probability that the robot is not on the map (its observations "
                                    "are explained by no map entry)", min=0.001, max=0.999)
    min_mass: float = option(0.9, "publish only when the most probable place holds at least this probability; "
                             "a belief split between places is not published", min=0.0, max=1.0)
    track_mass: float = option(0.5, "while the most probable place holds at least this probability the tracker "
                               "reranks only the belief's entries (plus kidnap_candidates); below it for lost_frames "
                               "frames, the global top (global_candidates) again", min=0.0, max=1.0)
    mode_radius: float = option(0.0, "m, map entries within this of the most probable one form the published "
                                "place; 0 = max(10 m, 4 x keyframe spacing)", min=0.0, max=500.0)
    spread_weight: float = option(0.0, "weight of the belief's spread over the published place's map entries in the "
                                  "covariance (besides the floor of half the keyframe spacing); 1 = all of it (the "
                                  "first versions), which measured ~3.4 x the error along the drive", min=0.0, max=1.0)
    speed_horizon: float = option(2.0, "s; without odometry the covariance along the heading grows by the variance "
                                  "of the place's speed times this squared: the distance an uncertain speed can put "
                                  "the robot ahead of or behind the place (0 = off)", min=0.0, max=60.0)
    track_candidates: int = option(20, "map entries of the belief reranked per frame while tracking (with the "
                                   "kidnap candidates at most top_k)", min=1, max=1000)
    kidnap_candidates: int = option(20, "global top candidates reranked as well while tracking, to notice a kidnap "
                                    "(at most half of top_k)", min=0, max=1000)
    global_candidates: int = option(50, "global top candidates reranked per frame while there is no place to track "
                                    "(global search, lost): the best of the global retrieval, not chosen by the "
                                    "belief; at most top_k (0 = all of top_k)", min=0, max=1000)
    lost_frames: int = option(5, "frames below track_mass after which tracking is lost and global search "
                              "(global_candidates) starts again", min=1, max=1000)
    max_support: int = option(200, "most map entries the belief keeps (the least probable are dropped)",
                              min=10, max=100000)
    score_gain: float = option(0.9, "calibration of the rerank score: log likelihood ratio = score_gain x "
                               "logit(score) + score_bias", min=0.0, max=100.0)
    score_bias: float = option(2.5, "see score_gain", min=-100.0, max=100.0)
    global_gain: float = option(4.8, "calibration of the global cosine for entries not reranked: log likelihood "
                                "ratio = global_gain x cosine + global_bias", min=0.0, max=1000.0)
    global_bias: float = option(-2.1, "see global_gain", min=-1000.0, max=1000.0)
    normalise_window: int = option(50, "observations over which each map entry's typical score is learned, so "
                                   "that entries scoring high against every query count less; 0 = off", min=0,
                                   max=100000)
    max_log_lr: float = option(4.0, "bound of one observation's log likelihood ratio (no single frame decides)",
                               min=0.1, max=50.0)
    max_gap: float = option(5.0, "s, a longer gap between frames restarts global search", min=0.01, max=3600.0)
    reset_jump: float = option(1.0, "s, a frame stamped this much before the last one resets the filter (e.g. a "
                               "replayed bag); older frames within it are ignored", min=0.0, max=3600.0)
    still_view_change: float = option(0.13, "a frame whose global descriptor differs from the last frame the filter "
                                      "used by less than this fraction of the map's median change between "
                                      "neighbouring entries (1 - cosine) shows the robot standing: it is not "
                                      "reranked and adds no evidence (a repeated view is not a new observation), "
                                      "its result is repeated and, after 1.5 s, the filter's speed goes to zero; "
                                      "with odometry only when it moved < 5 cm and turned < 0.2 rad "
                                      "as well; 0 = every frame is evidence",
                                      min=0.0, max=1.0)
    update_spacing: float = option(0.75, "a moving robot's frame is used by the filter only once it has moved this "
                                   "fraction of the map's keyframe spacing since the last used frame (by odometry; "
                                   "without odometry, while tracking: once its view differs by this fraction of the "
                                   "map's median change between neighbouring entries or the filter's speed says it "
                                   "may have moved that far), or after max_update_interval; the frames between are "
                                   "coasted (not reranked, no evidence; the last result republished, moved by the "
                                   "odometry since): evidence per metre, not per frame, for robots that move less "
                                   "than a keyframe spacing per frame; 0 = every frame", min=0.0, max=10.0)
    max_update_interval: float = option(1.0, "s, the longest a moving robot's frames are coasted (update_spacing)",
                                        min=0.01, max=60.0)

    def validate(self) -> TrackingConfig:
        check_config(self)
        return self


__all__ = ["DEVICE_CHOICES", "DEVICE_PATTERN", "INDEX_TYPES", "LocalizerConfig", "Option", "POSE_MODES",
           "PRECISIONS", "PoseConfig", "R2FORMER_SCORES", "RERANK_MODES", "TIMING_STAGES", "TrackingConfig",
           "add_config_option", "check_config",
           "config_options", "device_option", "device_type", "option"]
