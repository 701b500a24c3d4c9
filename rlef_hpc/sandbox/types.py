"""The executor's vocabulary: verdicts, limits, tests, results, jobs."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

LANGUAGES = ("python", "cpp")
COMPARE_MODES = ("tokens", "exact")


class Verdict(enum.StrEnum):
    OK = "OK"
    WRONG_ANSWER = "WRONG_ANSWER"
    TIME_LIMIT = "TIME_LIMIT"
    MEMORY_LIMIT = "MEMORY_LIMIT"
    RUNTIME_ERROR = "RUNTIME_ERROR"
    OUTPUT_LIMIT = "OUTPUT_LIMIT"
    COMPILE_ERROR = "COMPILE_ERROR"
    SANDBOX_VIOLATION = "SANDBOX_VIOLATION"
    # Not a verdict on the solution: the sandbox could not run the test (its worker failed
    # twice). A caller must not reward or punish it (see episodes.runner).
    SANDBOX_ERROR = "SANDBOX_ERROR"


@dataclass(frozen=True)
class Limits:
    """Per-test resource limits. The defaults are RLEF's (10 s, 1 GiB) for problems without
    their own; the rest bound what a hostile program can do to the machine."""

    time_s: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 32 << 20
    processes: int = 64  # threads included (RLIMIT_NPROC)
    open_files: int = 64
    file_size_mb: int = 64
    # Extra wall-clock time past `time_s` before the test is killed: a CPU-bound solution
    # on a loaded machine takes longer on the wall than on the CPU, a sleeping one must not.
    wall_slack_s: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"limits.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0 or (value == 0 and f.name != "wall_slack_s"):
                raise ValueError(f"limits.{f.name} must be positive, got {value!r}")

    @classmethod
    def for_problem(
        cls, time_s: float | None = None, memory_bytes: int | None = None, **overrides: Any
    ) -> Limits:
        """The problem's own limits where it has them (CodeContests stores 0 when it has none)."""
        if time_s:
            overrides.setdefault("time_s", float(time_s))
        if memory_bytes:
            overrides.setdefault("memory_mb", max(1, int(memory_bytes) >> 20))
        return cls(**overrides)

    @property
    def wall_s(self) -> float:
        return self.time_s + self.wall_slack_s


@dataclass(frozen=True)
class TestCase:
    input: str | bytes
    output: str | bytes | None = None  # None: run only, no comparison

    __test__ = False  # not a pytest class

    @classmethod
    def coerce(cls, value: TestCase | Mapping[str, Any] | Sequence[Any], where: str) -> TestCase:
        if isinstance(value, TestCase):
            test = value
        elif isinstance(value, Mapping):
            if "input" not in value:
                raise ValueError(f"{where}: missing field 'input'")
            test = cls(value["input"], value.get("output"))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            test = cls(value[0], value[1])
        else:
            raise ValueError(f"{where}: expected {{'input': ..., 'output': ...}}, got {value!r}")
        for name in ("input", "output"):
            v = getattr(test, name)
            if not (isinstance(v, (str, bytes)) or (name == "output" and v is None)):
                raise ValueError(
                    f"{where}: field '{name}' must be a string, got {type(v).__name__}"
                )
        return test


@dataclass(frozen=True)
class TestResult:
    verdict: Verdict
    time_s: float  # CPU time of the test's process (user + system)
    wall_s: float
    memory_kb: int  # peak resident memory the solution used (see docs/sandbox.md, Verdicts)
    output: str  # what the program printed, truncated to the executor's keep_bytes
    stderr: str  # the tail of stderr: for Python, the traceback without sandbox frames
    exit_code: int  # negative: killed by that signal
    output_truncated: bool = False

    __test__ = False

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.OK

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "time_s": round(self.time_s, 6),
            "wall_s": round(self.wall_s, 6),
            "memory_kb": self.memory_kb,
            "exit_code": self.exit_code,
            "output": self.output,
            "output_truncated": self.output_truncated,
            "stderr": self.stderr,
        }


@dataclass(frozen=True)
class Job:
    """One solution run on a list of tests, the unit of `Executor.run_many`."""

    language: str
    source: str
    tests: Sequence[TestCase]
    limits: Limits = field(default_factory=Limits)
    stop_on_first_failure: bool = False
    compare: str = "tokens"

    @classmethod
    def build(
        cls,
        language: str,
        source: str,
        tests: Iterable[TestCase | Mapping[str, Any] | Sequence[Any]],
        limits: Limits | None = None,
        stop_on_first_failure: bool = False,
        compare: str = "tokens",
    ) -> Job:
        """Validates everything a caller can get wrong, naming what is wrong."""
        if language not in LANGUAGES:
            raise ValueError(
                f"unknown language {language!r}; expected one of {', '.join(LANGUAGES)}"
            )
        if not isinstance(source, str):
            raise ValueError(f"source must be a string, got {type(source).__name__}")
        if compare not in COMPARE_MODES:
            raise ValueError(
                f"unknown compare mode {compare!r}; expected one of {', '.join(COMPARE_MODES)}"
            )
        if limits is not None and not isinstance(limits, Limits):
            raise ValueError(f"limits must be a Limits, got {type(limits).__name__}")
        checked = tuple(TestCase.coerce(t, f"test {i}") for i, t in enumerate(tests))
        return cls(
            language, source, checked, limits or Limits(), bool(stop_on_first_failure), compare
        )
