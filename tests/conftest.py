"""Fixtures only; what tests import (launchers, tiny configs, `require`) is in helpers.py. A
test that needs something this machine lacks fails under CI (CI=true) and is skipped, with
the reason printed, on a developer's machine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import require

# Set before any executor starts: the hostile suite checks that no test can read it.
os.environ["RLEF_TEST_SECRET"] = "hunter2-do-not-leak"


@pytest.fixture(scope="session")
def executor() -> Iterator[object]:
    from rlef_hpc import sandbox

    caps = sandbox.capabilities()
    require(caps["seccomp"], "seccomp filters are unavailable on this kernel")
    with sandbox.Executor(workers=2) as ex:
        yield ex
