"""The evaluation's pose statistics: covariance calibration and the min_confidence table."""
import numpy as np

from r2former_core.evaluation import ModeResult, format_confidence_table, format_table, plot_confidence


def _pose(xy):
    return np.array([xy[0], xy[1], 0.0, 0.0, 0.0, 0.0, 1.0])


def test_covariance_calibration_counts_errors_inside_the_95_ellipse():
    rng = np.random.default_rng(0)
    cov = np.zeros((6, 6))
    cov[:2, :2] = [[4.0, 1.5], [1.5, 1.0]]
    cov[2:, 2:] = np.eye(4)
    errors = rng.multivariate_normal([0, 0], cov[:2, :2], size=4000)
    good = ModeResult()
    for e in errors:
        good.add_pose(_pose(e), cov, 0.9, _pose((0, 0)))
    assert abs(good.summary()["inside_95_ellipse"] - 0.95) < 0.015
    # A covariance four times too small (half the std): the 95 % ellipse holds only
    # P(chi2_2 <= 5.991 / 4) = 1 - exp(-5.991 / 8) = 53 % of the errors.
    tight = ModeResult()
    small = cov.copy()
    small[:2, :2] /= 4
    for e in errors:
        tight.add_pose(_pose(e), small, 0.9, _pose((0, 0)))
    assert abs(tight.summary()["inside_95_ellipse"] - (1 - np.exp(-5.991 / 8))) < 0.03


def test_confidence_table_precision_and_coverage():
    r = ModeResult(pose_threshold_m=5.0)
    cov = np.eye(6)
    # Five confident correct results, three unconfident wrong ones, two unconfident correct ones.
    for conf, err in [(0.9, 1.0)] * 5 + [(0.2, 40.0)] * 3 + [(0.25, 2.0)] * 2:
        r.add_pose(_pose((err, 0)), cov, conf, _pose((0, 0)))
    rows = {row["min_confidence"]: row for row in r.confidence_table()}
    assert rows[0.0]["accepted"] == 1.0 and rows[0.0]["correct_of_accepted"] == 0.7
    assert rows[0.3]["accepted"] == 0.5 and rows[0.3]["correct_of_accepted"] == 1.0
    assert rows[0.3]["correct_of_all"] == 0.5
    assert rows[0.9]["accepted"] == 0.5   # 0.9 >= 0.9: the confident results are still accepted
    assert ModeResult().confidence_table() and all(row["correct_of_accepted"] is None
                                                   for row in ModeResult().confidence_table())
    s = r.summary()
    assert s["pose_correct"] == 0.7 and s["pose_median_error_m"] == 1.5
    accepted = [row["accepted"] for row in s["confidence_table"]]
    assert accepted == sorted(accepted, reverse=True)
    pooled = ModeResult(pose_threshold_m=5.0)
    pooled.extend(r)
    pooled.extend(r)
    assert pooled.confidence_table() == r.confidence_table() and len(pooled.confidences) == 20
    text = format_confidence_table({"r2former": r})
    assert "within 5 m" in text and "100.0%" in text
    assert "pose <5 m" in format_table({"r2former": r})


def test_confidence_plot_is_written(tmp_path):
    r = ModeResult()
    for i in range(20):
        r.add_pose(_pose((i * 0.5, 0)), np.eye(6), i / 20, _pose((0, 0)))
    path = plot_confidence({"r2former": r}, tmp_path / "c.png")
    assert path.stat().st_size > 1000
