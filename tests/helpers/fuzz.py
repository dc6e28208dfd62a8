"""Hypothesis settings and shared strategies for the fuzz tier (``tests/fuzz``).

The fuzz run is bounded: ``max_examples`` per test comes from the
``LOCKSTEP_FUZZ_EXAMPLES`` environment variable (default 200), no per-example
deadline (the RPC fuzz talks to a real server), and a fixed seed is not used,
so each run explores anew; ``@example`` keeps every bug found as a regression.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = ["BAD_NAMES", "FUZZ", "names"]

settings.register_profile(
    "lockstep-fuzz",
    max_examples=int(os.environ.get("LOCKSTEP_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("lockstep-fuzz")

# Names an attacker or a careless caller would try: traversal, separators, shell
# metacharacters, control characters, look-alikes, and sizes far off the limit.
BAD_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "a/../../b",
    "/",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "\x00",
    "$(reboot)",
    "`id`",
    ";rm -rf /",
    "a|b",
    "a&&b",
    "a b",
    "a\tb",
    "a\nb",
    "s1\n",
    "s1\r",
    "-rf",
    "--help",
    "~",
    "*",
    "é",
    "\u202eevil",
    "s\u2028",
    "\uff53\uff11",  # full-width look-alikes of "s1"
    "x" * 64,
    "x" * 100_000,
]


def names(good: list[str]) -> st.SearchStrategy[str]:
    """Names from ``good`` (so calls meet each other), bad ones, and arbitrary text."""
    return st.one_of(
        st.sampled_from(good),
        st.sampled_from(BAD_NAMES),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True),
        st.text(max_size=80),
    )
