"""The `r2former` command line (r2former_core.cli.main)."""
from ..openmp import prefer_sleeping_waiters

prefer_sleeping_waiters()      # before any command module imports torch
