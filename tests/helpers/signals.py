"""Signals for the commands the integration tests start."""

from __future__ import annotations

import signal

__all__ = ["sigint_default"]


def sigint_default() -> None:
    """A child's ``preexec_fn``: Ctrl-C (SIGINT) reaches it with its default action.

    A test session started as a background job runs with SIGINT ignored, and
    its children inherit that: a test that sends SIGINT to a command must give
    the command the default back, as a terminal's foreground job has it.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
