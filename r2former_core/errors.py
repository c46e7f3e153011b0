"""Every expected failure of r2former: one base class, one subclass per kind.

An *expected* error is one a user can cause and fix (a missing file, a map built with another model,
an option out of range, a camera that sends garbage). Its message says what is wrong and what to do.
Entry points (the `r2former` CLI, the nodes) catch `R2FormerError` and `OSError`, print or log one
line and go on or exit with status 2; anything else is a bug and keeps its traceback.

Each kind keeps the built-in base that callers relied on before (`except ValueError` around a
checkpoint load still works), so a subclass is both an `R2FormerError` and a `ValueError` or a
`RuntimeError`.

This module imports nothing, so the CLI can catch these errors before torch is loaded.
"""
from __future__ import annotations


class R2FormerError(Exception):
    """Base of every expected error."""


class ConfigError(R2FormerError, ValueError):
    """An option, parameter or configuration value that is not allowed (out of range, unknown mode)."""


class CliError(R2FormerError, RuntimeError):
    """A command line that cannot be carried out (missing source, conflicting options)."""


class DataError(R2FormerError, ValueError):
    """Input data that cannot be used (sources, poses, bags, images)."""


class ImageDecodeError(DataError):
    """An image message or file that cannot be decoded (bad encoding, size or bytes)."""


class MapError(R2FormerError, RuntimeError):
    """A map that cannot be loaded, written or used with this model."""


class CheckpointError(R2FormerError, ValueError):
    """A weights file that cannot be loaded (missing, unsafe, truncated or mismatched)."""


class DeviceError(R2FormerError, RuntimeError):
    """A device that does not exist here (e.g. `cuda` without a GPU)."""


#: What entry points treat as a user's error: one line, no traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (R2FormerError, OSError)

__all__ = ["CheckpointError", "CliError", "ConfigError", "DataError", "DeviceError", "EXPECTED_ERRORS",
           "ImageDecodeError", "MapError", "R2FormerError"]
