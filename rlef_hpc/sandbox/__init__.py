"""Sandboxed execution of untrusted solutions on tests.

    from rlef_hpc import sandbox
    with sandbox.Executor(workers=2) as ex:
        results = ex.run("python", source, tests, sandbox.Limits(time_s=2))

The isolation (namespaces, seccomp, uid drop, rlimits) lives in csrc/ as the `_executor`
extension; `sandbox.capabilities()` reports what this machine achieves.
"""

from typing import Any

from rlef_hpc.sandbox.compare import outputs_match
from rlef_hpc.sandbox.types import LANGUAGES, Job, Limits, TestCase, TestResult, Verdict

_LAZY = ("Executor", "SandboxError", "SandboxUnavailableError", "capabilities", "default_cache_dir")

__all__ = [
    *_LAZY,
    "LANGUAGES",
    "Job",
    "Limits",
    "TestCase",
    "TestResult",
    "Verdict",
    "outputs_match",
]


def __getattr__(name: str) -> Any:
    # The executor (threads, asyncio, subprocess) loads on first use, never in a worker: every
    # module a worker holds makes each fork of it slower.
    if name in _LAZY:
        from rlef_hpc.sandbox import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'rlef_hpc.sandbox' has no attribute {name!r}")
