"""The problem record every layer above shares: CodeContests' schema, typed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rlef_hpc.sandbox import Limits, TestCase

# CodeContests' Solution.Language enum.
LANGUAGE_CODES = {0: "unknown", 1: "python2", 2: "cpp", 3: "python", 4: "java"}
SANDBOX_LANGUAGES = {"python": "python", "cpp": "cpp"}


@dataclass(frozen=True)
class Solution:
    language: str  # "python" (3), "cpp", "python2", "java", "unknown"
    source: str


@dataclass(frozen=True)
class Problem:
    name: str
    description: str
    public_tests: Sequence[TestCase]
    private_tests: Sequence[TestCase]
    generated_tests: Sequence[TestCase] = ()
    time_limit_s: float | None = None
    memory_limit_bytes: int | None = None
    difficulty: int = 0
    solutions: Sequence[Solution] = ()
    incorrect_solutions: Sequence[Solution] = ()
    source: str = ""  # where it came from: a file and line, or a generator and seed
    tags: Sequence[str] = field(default=())
    # Code run after the solution's (function problems: it reads the test, calls the function
    # and prints the result); empty for stdin/stdout problems.
    harness: str = ""

    def program(self, code: str) -> str:
        """What runs for a test: the submitted code, then the harness if any."""
        return f"{code.rstrip()}\n\n{self.harness}" if self.harness else code

    @property
    def judge_tests(self) -> list[TestCase]:
        """What the final answer is judged on (RLEF: public and private must all pass)."""
        return [*self.public_tests, *self.private_tests]

    def limits(self, **overrides: float) -> Limits:
        """The problem's own limits where it has them, else RLEF's (10 s, 1 GiB)."""
        return Limits.for_problem(self.time_limit_s, self.memory_limit_bytes, **overrides)

    def reference(self, language: str = "python") -> Solution | None:
        return next((s for s in self.solutions if s.language == language), None)
