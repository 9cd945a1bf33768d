"""Skip-or-fail for tests that need a real component (Dovecot, PostgreSQL, ...).

On a developer's machine a missing component skips the test with the reason. In CI
(`BULKSEND_REQUIRE_SERVERS=1`, set by `.ci/run`) the same condition fails the test, so a
missing install step can never turn into a silently green run.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "BULKSEND_REQUIRE_SERVERS"


def components_required() -> bool:
    """True when missing real components must fail tests instead of skipping them."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false", "no")


def unavailable(component: str, why: str) -> None:
    """Skip (locally) or fail (in CI) the running test because `component` is missing."""
    message = f"{component} unavailable: {why}"
    if components_required():
        pytest.fail(f"{message} ({REQUIRE_ENV} is set)", pytrace=False)
    pytest.skip(message)
