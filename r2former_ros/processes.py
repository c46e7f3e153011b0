"""Child processes of a launch: started in their own session, stopped together with escalation.

Used by `r2former launch` and `make demo` (r2former_ros/demo.py). A child runs in its own session so that a
terminal's Ctrl-C reaches it only through us (once); stopping sends SIGINT to every child, waits up to a grace
period for all of them, then SIGTERM (5 s), then SIGKILL, the escalation `ros2 launch` uses. This module
never imports rclpy.
"""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

STOP_GRACE_SEC = 10.0
TERM_GRACE_SEC = 5.0


class Child:
    """A child process in its own session, its output to a log file (or inherited when `log_path` is None)."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path | None, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.log_path = name, list(cmd), log_path
        self._log: IO[bytes] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "wb")
            self._log.write(("$ " + " ".join(self.cmd) + "\n").encode())
            self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
                                     env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = STOP_GRACE_SEC) -> int | None:
        """SIGINT, wait `grace` s; SIGTERM, wait 5 s; SIGKILL. Returns the exit status."""
        return stop_children([self], grace)[0]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def last_line(self) -> str:
        if self.log_path is None:
            return ""
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        useful = [ln for ln in lines if not ln.startswith("$ ")]
        return useful[-1] if useful else ""


def stop_children(children: Sequence[Child], grace: float = STOP_GRACE_SEC) -> list[int | None]:
    """Stop all at once: SIGINT to each, wait up to `grace` s for all; then SIGTERM (5 s); then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, TERM_GRACE_SEC), (signal.SIGKILL, TERM_GRACE_SEC)):
        running = [c for c in children if c.proc.poll() is None]
        if not running:
            break
        for child in running:
            child.signal(sig)
        deadline = time.monotonic() + wait
        for child in running:
            child.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        child.close()
    return [c.proc.poll() for c in children]
