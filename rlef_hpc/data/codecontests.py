"""Problems in the CodeContests schema, as DeepMind published them (JSON lines or parquet).

    for problem in iter_problems("code_contests/", split="train", stats=stats): ...

Streaming: a record at a time (parquet: a batch at a time), so the 13k-problem train split
never sits in memory. A malformed record raises ProblemFormatError naming the file, the line
(or row) and the field. Problems without any test are dropped, counted in `stats` and logged,
as in the paper (669 of the train split).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlef_hpc.data.problem import LANGUAGE_CODES, Problem, Solution
from rlef_hpc.jsonl import JsonLinesError, iter_jsonl
from rlef_hpc.sandbox import TestCase

log = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
SUFFIXES = (".jsonl", ".json", ".parquet")


class ProblemFormatError(ValueError):
    """A record that does not follow the schema; the message says where and what."""


@dataclass
class LoadStats:
    loaded: int = 0
    dropped_without_tests: list[str] = field(default_factory=list)
    # Private tests only: nothing to run an answer on before the final judgment, so no
    # feedback, and the first answer would "pass" the empty public tests: a one-turn problem
    # in a multi-turn experiment. Dropped, as the paper drops problems it cannot run.
    dropped_without_public_tests: list[str] = field(default_factory=list)


def problem_files(path: str | Path, split: str | None = None) -> list[Path]:
    """`path` itself if it is a file; else the files of `split` in the directory (names
    containing the split, as in `train-00000-of-00039.parquet` or `valid.jsonl`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no problem file or directory at {path}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    files = sorted(
        p for p in path.rglob("*") if p.suffix in SUFFIXES and split in (None, _split_of(p.name))
    )
    if not files:
        raise FileNotFoundError(f"no {split or ''} problem files ({', '.join(SUFFIXES)}) in {path}")
    return files


def _split_of(filename: str) -> str | None:
    """train.jsonl, train-00000-of-00039.parquet, code_contests_valid.jsonl -> the split."""
    stem = filename.split(".")[0]
    for split in SPLITS:
        if (
            stem == split
            or stem.startswith((split + "-", split + "_"))
            or stem.endswith("_" + split)
        ):
            return split
    return None


def iter_problems(
    path: str | Path, split: str | None = None, stats: LoadStats | None = None
) -> Iterator[Problem]:
    """Every problem with public tests (the feedback's) and a test to judge by, in file order;
    what was dropped is counted in `stats` and logged."""
    stats = stats if stats is not None else LoadStats()
    for file in problem_files(path, split):
        for where, record in _records(file):
            problem = parse_problem(record, where)
            if not problem.public_tests and not problem.private_tests:
                stats.dropped_without_tests.append(problem.name)
                continue
            if not problem.public_tests:
                stats.dropped_without_public_tests.append(problem.name)
                continue
            stats.loaded += 1
            yield problem
    if stats.dropped_without_tests:
        log.info("dropped %d problems without tests", len(stats.dropped_without_tests))
    if stats.dropped_without_public_tests:
        log.info(
            "dropped %d problems without public tests (no feedback to give)",
            len(stats.dropped_without_public_tests),
        )


def load_problems(path: str | Path, split: str | None = None) -> list[Problem]:
    return list(iter_problems(path, split))


def _records(file: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=64):
            for record in batch.to_pylist():
                row += 1
                yield f"{file}: row {row}", record
        return
    try:
        for where, record in iter_jsonl(file):
            if not isinstance(record, dict):
                raise ProblemFormatError(f"{where}: expected an object, got {_kind(record)}")
            yield where, record
    except JsonLinesError as e:
        raise ProblemFormatError(str(e)) from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require_field(
    record: Mapping[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    where: str,
    default: Any = ...,
) -> Any:
    if name not in record or record[name] is None:
        if default is ...:
            raise ProblemFormatError(f"{where}: missing field '{name}'")
        return default
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = (
            kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        )
        raise ProblemFormatError(
            f"{where}: field '{name}': expected {expected}, got {_kind(value)}"
        )
    return value


def _strings(value: Any, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        got = _kind(value) if not isinstance(value, list) else "a list with non-strings"
        raise ProblemFormatError(f"{where}: field '{name}': expected a list of strings, got {got}")
    return value


def _tests(record: Mapping[str, Any], name: str, where: str) -> list[TestCase]:
    tests = require_field(record, name, dict, where, default={})
    inputs = _strings(tests.get("input", []), f"{name}.input", where)
    outputs = _strings(tests.get("output", []), f"{name}.output", where)
    if len(inputs) != len(outputs):
        raise ProblemFormatError(
            f"{where}: field '{name}': {len(inputs)} inputs but {len(outputs)} outputs"
        )
    return [TestCase(i, o) for i, o in zip(inputs, outputs, strict=True)]


def _solutions(record: Mapping[str, Any], name: str, where: str) -> list[Solution]:
    block = require_field(record, name, dict, where, default={})
    languages = block.get("language", [])
    sources = _strings(block.get("solution", []), f"{name}.solution", where)
    if not isinstance(languages, list) or len(languages) != len(sources):
        raise ProblemFormatError(
            f"{where}: field '{name}.language': expected one language code per solution"
        )
    out = []
    for code, source in zip(languages, sources, strict=True):
        if code not in LANGUAGE_CODES and code not in LANGUAGE_CODES.values():
            raise ProblemFormatError(
                f"{where}: field '{name}.language': unknown language {code!r}; expected one of "
                f"{sorted(LANGUAGE_CODES)} or {sorted(LANGUAGE_CODES.values())}"
            )
        out.append(Solution(LANGUAGE_CODES.get(code, code), source))
    return out


def parse_problem(record: Mapping[str, Any], where: str = "<record>") -> Problem:
    """One CodeContests record (as published) to a Problem; `where` prefixes every error."""
    name = require_field(record, "name", str, where)
    time_limit = require_field(record, "time_limit", dict, where, default=None)
    seconds = None
    if time_limit:
        s = require_field(time_limit, "seconds", int, f"{where}: field 'time_limit'", default=0)
        ns = require_field(time_limit, "nanos", int, f"{where}: field 'time_limit'", default=0)
        seconds = s + ns * 1e-9 or None
    return Problem(
        name=name,
        description=require_field(record, "description", str, where),
        public_tests=_tests(record, "public_tests", where),
        private_tests=_tests(record, "private_tests", where),
        generated_tests=_tests(record, "generated_tests", where),
        time_limit_s=seconds,
        memory_limit_bytes=require_field(record, "memory_limit_bytes", int, where, default=0)
        or None,
        difficulty=require_field(record, "difficulty", int, where, default=0),
        solutions=_solutions(record, "solutions", where),
        incorrect_solutions=_solutions(record, "incorrect_solutions", where),
        source=where,
        tags=tuple(_strings(record.get("cf_tags") or [], "cf_tags", where)),
    )


def problem_record(problem: Problem) -> dict[str, Any]:
    """The inverse of parse_problem: a record in the published schema."""
    codes = {v: k for k, v in LANGUAGE_CODES.items()}

    def tests(ts: Any) -> dict[str, list[str]]:
        return {"input": [t.input for t in ts], "output": [t.output for t in ts]}

    def solutions(ss: Any) -> dict[str, list[Any]]:
        return {"language": [codes[s.language] for s in ss], "solution": [s.source for s in ss]}

    seconds = problem.time_limit_s or 0
    return {
        "name": problem.name,
        "description": problem.description,
        "public_tests": tests(problem.public_tests),
        "private_tests": tests(problem.private_tests),
        "generated_tests": tests(problem.generated_tests),
        "difficulty": problem.difficulty,
        "time_limit": {"seconds": int(seconds), "nanos": round((seconds % 1) * 1e9)},
        "memory_limit_bytes": problem.memory_limit_bytes or 0,
        "solutions": solutions(problem.solutions),
        "incorrect_solutions": solutions(problem.incorrect_solutions),
        "cf_tags": list(problem.tags),
    }
