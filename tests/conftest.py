"""Shared fixtures. A test that needs something this machine lacks fails under CI (CI=true)
and is skipped, with the reason printed, on a developer's machine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Set before any executor starts: the hostile suite checks that no test can read it.
os.environ["RLEF_TEST_SECRET"] = "hunter2-do-not-leak"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI requires: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def executor() -> Iterator[object]:
    from rlef_hpc import sandbox

    caps = sandbox.capabilities()
    require(caps["seccomp"], "seccomp filters are unavailable on this kernel")
    with sandbox.Executor(workers=2) as ex:
        yield ex
