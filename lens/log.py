"""lens's messages: the ``lens`` logger, written to stderr as ``lens: message``.

Library code reports what it does about a fault (a cache rebuilt, a unit redone) at INFO or
WARNING; the CLI's ``--quiet`` keeps only errors (and turns progress bars off), ``--verbose``
adds DEBUG.  Another program embedding lens can attach its own handlers to ``lens``."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("lens")


class _Stderr(logging.StreamHandler):
    """To whatever sys.stderr is at the time (a test's capture, a redirected stream)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


if not log.handlers:
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter("lens: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


def show_progress() -> bool:
    """Whether progress bars are drawn (not under --quiet)."""
    return log.isEnabledFor(logging.INFO)
