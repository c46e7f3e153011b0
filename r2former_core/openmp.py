"""How torch's OpenMP threads wait for work, chosen for this package's programs (the nodes, `r2former`).

By default an OpenMP thread that has finished its share spins for a while before it sleeps. The reranker's
compiled kernels (`model.native`) run their own threads right after torch's parallel operations, and on a
2-core machine a spinning OpenMP thread then holds the core a kernel thread needs; when other processes keep
cores busy (a robot: drivers, SLAM, Nav2) spinning threads also take their partners' share. Measured
(docs/BENCHMARKS.md section 1.0, docs/ROBOT.md section 8): two-thread reranking 1.36x faster on an idle
machine with sleeping waiters, ~3.5x with a busy core; for torch-only work (extraction) the difference is
within run-to-run noise, so a frame is faster either way.
"""
from __future__ import annotations

import os

POLICY_ENV = "OMP_WAIT_POLICY"


def prefer_sleeping_waiters() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy. OpenMP reads it once, when torch loads, so this
    runs at the top of the programs' packages (r2former_ros, r2former_core.cli), before anything imports torch."""
    os.environ.setdefault(POLICY_ENV, "PASSIVE")
