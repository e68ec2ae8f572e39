"""ctcscan acquisition controller: drives the scanner, stores fields, runs scans."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from controller.heap import limit_arenas

# glibc settles how many malloc arenas the process may have once and for all,
# the first time it needs more than a few: so here, before numpy's or an
# instrument's or a run's threads exist (see controller.heap)
limit_arenas()

try:
    __version__ = version("ctcscan")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
