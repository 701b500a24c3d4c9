"""Synthetic problems: seeded families of tiny parameterised tasks with generated tests and
reference solutions. What a small model on CPU can learn from, and what a new cluster uses to
check that RLEF learns at all.

    train = generate(200, split="train", seed=0)
    heldout = generate(50, split="heldout", seed=0)
    harder = generate(200, split="train", seed=0, curriculum="feedback")  # + "secret"

Every instance is a family and its parameters (e.g. affine with a=3, b=-2); an instance is in
the held-out split or not by a hash of those, so the two splits never share an instance,
whatever the seeds and sizes asked for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlef_hpc.data.problem import Problem, Solution
from rlef_hpc.sandbox import TestCase

HELDOUT_FRACTION = 0.2
SPLITS = ("train", "heldout")
PUBLIC, PRIVATE = 2, 8


@dataclass(frozen=True)
class Family:
    name: str
    params: Callable[[random.Random], dict[str, Any]]
    statement: str  # str.format'ed with the parameters
    solution: str  # likewise
    make_input: Callable[[random.Random, dict[str, Any]], str]
    answer: Callable[[str, dict[str, Any]], str]  # the expected output of an input


def _word(rng: random.Random, letters: str = "abcdefghij") -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(1, 8)))


def _numbers(rng: random.Random, p: dict[str, Any]) -> str:
    n = rng.randint(1, 6)
    return f"{n}\n{' '.join(str(rng.randint(-9, 9)) for _ in range(n))}\n"


def _values(text: str) -> list[int]:
    return [int(x) for x in text.split()[1:]]


LIST_OPS: dict[str, Callable[[list[int]], int]] = {"sum": sum, "maximum": max, "minimum": min}
CASES = {"upper case": "upper", "lower case": "lower", "title case": "title"}
SECRET_LETTERS = "ABCDEF"

FAMILIES = [
    Family(
        "affine",
        lambda r: {"a": r.randint(1, 9), "b": r.randint(-9, 9)},
        "Read an integer x and print {a} * x + {b}",
        "x = int(input())\nprint({a} * x + {b})\n",
        lambda r, p: f"{r.randint(-50, 50)}\n",
        lambda s, p: f"{p['a'] * int(s) + p['b']}\n",
    ),
    Family(
        "modulo",
        lambda r: {"m": r.randint(2, 12)},
        "Read a non-negative integer x and print the remainder of x divided by {m}",
        "x = int(input())\nprint(x % {m})\n",
        lambda r, p: f"{r.randint(0, 500)}\n",
        lambda s, p: f"{int(s) % p['m']}\n",
    ),
    Family(
        "repeat",
        lambda r: {"k": r.randint(2, 5)},
        "Read a word and print it {k} times, separated by spaces",
        "w = input().strip()\nprint(' '.join([w] * {k}))\n",
        lambda r, p: f"{_word(r)}\n",
        lambda s, p: " ".join([s.strip()] * p["k"]) + "\n",
    ),
    Family(
        "case",
        lambda r: {"case": r.choice(sorted(CASES))},
        "Read a line of words and print it in {case}",
        "print(input().{method}())\n",
        lambda r, p: " ".join(_word(r, "abcdeFGHIJ") for _ in range(r.randint(1, 3))) + "\n",
        lambda s, p: getattr(s.rstrip("\n"), CASES[p["case"]])() + "\n",
    ),
    Family(
        "count-letter",
        lambda r: {"c": r.choice("abcdefghij")},
        "Read a word and print how many times the letter {c} occurs in it",
        "print(input().count('{c}'))\n",
        lambda r, p: f"{_word(r)}\n",
        lambda s, p: f"{s.count(p['c'])}\n",
    ),
    Family(
        "list-op",
        lambda r: {"op": r.choice(sorted(LIST_OPS))},
        "Read n, then n integers on the next line, and print their {op}",
        "input()\nprint({function}(map(int, input().split())))\n",
        _numbers,
        lambda s, p: f"{LIST_OPS[p['op']](_values(s))}\n",
    ),
    Family(
        "sort",
        lambda r: {"order": r.choice(["increasing", "decreasing"])},
        "Read n, then n integers on the next line, and print them in {order} order",
        "input()\nprint(*sorted(map(int, input().split()){reverse}))\n",
        _numbers,
        lambda s, p: (
            " ".join(map(str, sorted(_values(s), reverse=p["order"] == "decreasing"))) + "\n"
        ),
    ),
    # Solvable only from the feedback, which quotes the expected output: what single-turn
    # training and an unrelated problem's feedback cannot teach (the paper's ablations). The
    # letter is one token, the same quoted in the feedback and in the code; the puzzle number
    # tells nothing.
    Family(
        "secret",
        lambda r: {"puzzle": r.randint(1, 60), "letter": r.choice(SECRET_LETTERS)},
        "Read a line and print the secret letter of puzzle {puzzle}, whatever the line",
        "input()\nprint('{letter}')\n",
        lambda r, p: f"{_word(r)}\n",
        lambda s, p: f"{p['letter']}\n",
    ),
    Family(
        "pick",
        lambda r: {"which": r.choice(["larger", "smaller"]), "offset": r.randint(0, 3)},
        "Read two integers and print the {which} one plus {offset}",
        "a, b = map(int, input().split())\nprint({function}(a, b) + {offset})\n",
        lambda r, p: f"{r.randint(-20, 20)} {r.randint(-20, 20)}\n",
        lambda s, p: (
            f"{(max if p['which'] == 'larger' else min)(map(int, s.split())) + p['offset']}\n"
        ),
    ),
]
# "basic": what a policy can learn to solve in one turn (the demo). "feedback": with "secret"
# too, where only the feedback tells the answer (close to half of the problems).
_BASIC = tuple(f.name for f in FAMILIES if f.name != "secret")
CURRICULA = {"basic": _BASIC, "feedback": (*_BASIC, "secret")}
_DERIVED = {  # names the solutions use for a parameter
    "case": lambda p: {"method": CASES[p["case"]]},
    "list-op": lambda p: {"function": {"sum": "sum", "maximum": "max", "minimum": "min"}[p["op"]]},
    "sort": lambda p: {"reverse": ", reverse=True" if p["order"] == "decreasing" else ""},
    "pick": lambda p: {"function": "max" if p["which"] == "larger" else "min"},
}


def split_of(family: str, params: dict[str, Any]) -> str:
    key = f"{family}:{sorted(params.items())}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "heldout" if bucket < HELDOUT_FRACTION else "train"


def instance_name(family: Family, params: dict[str, Any]) -> str:
    return f"{family.name}[{','.join(f'{k}={v}' for k, v in sorted(params.items()))}]"


def instance(family: Family, params: dict[str, Any], seed: int) -> Problem:
    rng = random.Random(f"{seed}:{family.name}:{sorted(params.items())}")
    inputs: list[str] = []
    for _ in range(200):
        candidate = family.make_input(rng, params)
        if candidate not in inputs:
            inputs.append(candidate)
        if len(inputs) == PUBLIC + PRIVATE:
            break
    tests = [TestCase(i, family.answer(i, params)) for i in inputs]
    names = {**params, **_DERIVED.get(family.name, lambda p: {})(params)}
    return Problem(
        name=instance_name(family, params),
        description=family.statement.format(**names),
        public_tests=tests[:PUBLIC],
        private_tests=tests[PUBLIC:],
        time_limit_s=2.0,
        memory_limit_bytes=256 << 20,
        solutions=[Solution("python", family.solution.format(**names))],
        source=f"synthetic {family.name} seed={seed}",
        tags=("synthetic", family.name),
    )


def generate(
    n: int, split: str = "train", seed: int = 0, curriculum: str = "basic"
) -> list[Problem]:
    """n distinct instances of `split`, drawn round-robin over the curriculum's families
    (seeded)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if curriculum not in CURRICULA:
        raise ValueError(
            f"unknown curriculum {curriculum!r}; expected one of {', '.join(CURRICULA)}"
        )
    families = [f for f in FAMILIES if f.name in CURRICULA[curriculum]]
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    attempts = misses = 0
    while len(problems) < n:
        attempts += 1
        misses += 1
        if misses > 20_000:  # no new instance in a long while: the families are exhausted
            raise ValueError(f"cannot draw {n} distinct {split} problems; the families have fewer")
        family = families[attempts % len(families)]
        params = family.params(rng)
        if split_of(family.name, params) != split:
            continue
        name = instance_name(family, params)
        if name not in problems:
            problems[name] = instance(family, params, seed)
            misses = 0
    return list(problems.values())
