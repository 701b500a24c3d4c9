"""The rlimits of a test's process: one NamedTuple, read by the C side in its field order.

csrc/executor.cc parses it in one place (`parse_rlimits`) into a struct with the same fields in
the same order, and exports their names as `_executor.RLIMIT_FIELDS`; tests/test_sandbox.py
holds the two together. Build it by field name, never by position.
"""

from __future__ import annotations

from typing import NamedTuple

from rlef_hpc.sandbox.types import Limits


class Rlimits(NamedTuple):
    address_space: int  # bytes (RLIMIT_AS)
    cpu_s: int  # seconds (RLIMIT_CPU): SIGXCPU, then SIGKILL a second later
    file_size: int  # bytes (RLIMIT_FSIZE)
    open_files: int  # RLIMIT_NOFILE
    processes: int  # RLIMIT_NPROC, threads included
    stack: int  # bytes (RLIMIT_STACK)


def rlimits_for(limits: Limits, *, native: bool, inherited_vm_bytes: int) -> Rlimits:
    """The rlimits that enforce `limits` on one test.

    A forked Python test starts with the server's address space (`inherited_vm_bytes`) mapped:
    the solution's budget comes on top of it. Half the memory goes to the stack: deep recursion
    works, and a runaway one on the C stack (C++, or Python recursing through C) ends as a stack
    overflow (RUNTIME_ERROR) before it could pass for memory exhaustion. Python's own frames live
    on the heap: its runaway recursion runs out of memory (csrc/executor.cc:
    end_when_out_of_memory)."""
    memory = limits.memory_mb << 20
    return Rlimits(
        address_space=memory + (0 if native else inherited_vm_bytes),
        cpu_s=int(limits.time_s) + 2,  # a backstop: the wall clock ends a test earlier
        file_size=limits.file_size_mb << 20,
        open_files=limits.open_files,
        processes=limits.processes,
        stack=memory // 2,
    )


# For measuring what an empty Python test costs: room enough that nothing limits it.
BASELINE = Rlimits(
    address_space=1 << 40,
    cpu_s=10,
    file_size=1 << 20,
    open_files=64,
    processes=64,
    stack=8 << 20,
)
