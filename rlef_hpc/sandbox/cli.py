"""rlef-sandbox: run one solution on a JSON-lines file of tests, in the sandbox.

    rlef-sandbox --lang python --source sol.py --tests tests.jsonl [--time-limit S]
                 [--memory-limit MB] [--stop-on-first-failure] [--allow-missing NAME,...]

Prints one JSON line per test; exits 0 when every test passes, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlef_hpc.jsonl import JsonLinesError, iter_jsonl
from rlef_hpc.sandbox.types import COMPARE_MODES, LANGUAGES, Limits, TestCase


class UsageError(Exception):
    pass


def _positive(kind: type) -> object:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlef-sandbox",
        description="Run a solution on tests inside the RLEF sandbox; one JSON line per test.",
    )
    p.add_argument("--lang", required=True, choices=LANGUAGES, help="language of the solution")
    p.add_argument("--source", required=True, type=Path, help="solution source file")
    p.add_argument(
        "--tests", required=True, type=Path, help='JSON lines: {"input": ..., "output": ...}'
    )
    p.add_argument(
        "--time-limit",
        type=_positive(float),
        default=Limits.time_s,
        metavar="S",
        help=f"seconds per test (default {Limits.time_s:g})",
    )
    p.add_argument(
        "--memory-limit",
        type=_positive(int),
        default=Limits.memory_mb,
        metavar="MB",
        help=f"megabytes per test (default {Limits.memory_mb})",
    )
    p.add_argument("--stop-on-first-failure", action="store_true")
    p.add_argument(
        "--compare",
        choices=COMPARE_MODES,
        default="tokens",
        help="tokens: CodeContests rules (default); exact: byte-identical",
    )
    p.add_argument("--workers", type=_positive(int), default=1)
    p.add_argument(
        "--allow-missing",
        default="",
        metavar="NAME,...",
        help="isolations this machine may lack (of: seccomp, namespaces, minimal_root, landlock,"
        " unprivileged, cpu_pinned); without it the sandbox refuses to run where one is missing",
    )
    p.add_argument(
        "--unsafe", action="store_true", help="run whatever isolation is missing (rlimits only)"
    )
    return p


def read_tests(path: Path) -> list[TestCase]:
    tests = []
    try:
        records = list(iter_jsonl(path))
    except JsonLinesError as e:
        raise UsageError(str(e)) from None
    for where, record in records:
        try:
            tests.append(TestCase.coerce(record, where))
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not tests:
        raise UsageError(f"{path}: no tests")
    return tests


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            source = args.source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read source {args.source}: {e}") from None
        tests = read_tests(args.tests)
    except UsageError as e:
        parser.exit(2, f"rlef-sandbox: error: {e}\n")

    from rlef_hpc.sandbox.executor import REQUIRED, Executor, SandboxUnavailableError

    allow_missing = [name for name in args.allow_missing.split(",") if name]
    if unknown := [name for name in allow_missing if name not in REQUIRED]:
        parser.exit(
            2,
            f"rlef-sandbox: error: --allow-missing: unknown {', '.join(unknown)}; expected "
            f"some of {', '.join(REQUIRED)}\n",
        )
    limits = Limits(time_s=args.time_limit, memory_mb=args.memory_limit)
    try:
        with Executor(workers=args.workers, unsafe=args.unsafe, allow_missing=allow_missing) as ex:
            results = ex.run(
                args.lang, source, tests, limits, args.stop_on_first_failure, args.compare
            )
    except SandboxUnavailableError as e:
        parser.exit(2, f"rlef-sandbox: error: {e}\n")
    for index, result in enumerate(results):
        print(json.dumps({"test": index, **result.to_json()}), flush=True)
    return 0 if len(results) == len(tests) and all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
