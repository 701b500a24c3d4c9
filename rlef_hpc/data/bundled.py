"""The bundled problem set: small competitive-programming problems written for this project,
shipped as package data (bundled/problems.jsonl, CodeContests schema).

Each problem here has a statement, an accepted reference solution, a deliberately wrong one,
and an input generator; `build()` draws 2 small public and 8 private inputs per problem and
computes the outputs with the reference. `python -m rlef_hpc.data.bundled` rewrites the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlef_hpc.data.problem import Problem, Solution
from rlef_hpc.sandbox import TestCase

BUNDLED = Path(__file__).with_name("bundled") / "problems.jsonl"
PUBLIC, PRIVATE = 2, 8


@dataclass(frozen=True)
class Spec:
    name: str
    statement: str
    reference: str
    wrong: str
    generate: Callable[[random.Random, bool], str]  # (rng, small) -> one input


def _ints(rng: random.Random, n: int, lo: int, hi: int) -> str:
    return " ".join(str(rng.randint(lo, hi)) for _ in range(n))


def _list(lo: int, hi: int, nmax: int) -> Callable[[random.Random, bool], str]:
    def gen(rng: random.Random, small: bool) -> str:
        n = rng.randint(1, 5 if small else nmax)
        return f"{n}\n{_ints(rng, n, lo, hi)}\n"

    return gen


def _word(rng: random.Random, n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _words(rng: random.Random, small: bool) -> str:
    return " ".join(
        _word(rng, rng.randint(1, 7)) for _ in range(rng.randint(1, 4 if small else 30))
    )


def _one(lo: int, hi: int, small_hi: int | None = None) -> Callable[[random.Random, bool], str]:
    return lambda rng, small: f"{rng.randint(lo, small_hi if small and small_hi else hi)}\n"


def _two(lo: int, hi: int) -> Callable[[random.Random, bool], str]:
    return lambda rng, small: f"{_ints(rng, 2, lo, 20 if small else hi)}\n"


LIST_HEADER = "The first line holds n, the second n integers."
SPECS = [
    Spec(
        "sum-of-two",
        "Read two integers a and b (|a|, |b| <= 10^18) on one line and print a + b.",
        "a, b = map(int, input().split())\nprint(a + b)\n",
        "a, b = map(int, input().split())\nprint(abs(a) + abs(b))\n",
        _two(-(10**18), 10**18),
    ),
    Spec(
        "maximum",
        f"{LIST_HEADER} Print the largest of them.",
        "input()\nprint(max(map(int, input().split())))\n",
        "input()\nprint(max(map(abs, map(int, input().split()))))\n",
        _list(-1000, 1000, 200),
    ),
    Spec(
        "min-and-max",
        f"{LIST_HEADER} Print the smallest and the largest, separated by a space.",
        "input()\na = list(map(int, input().split()))\nprint(min(a), max(a))\n",
        "input()\na = list(map(int, input().split()))\nprint(a[0], a[-1])\n",
        _list(-99, 99, 100),
    ),
    Spec(
        "count-vowels",
        "Read a line of lowercase letters and print how many are vowels (a, e, i, o, u).",
        "print(sum(c in 'aeiou' for c in input().strip()))\n",
        "print(sum(c in 'aeiouy' for c in input().strip()))\n",
        lambda rng, small: _word(rng, rng.randint(1, 8 if small else 200)) + "\n",
    ),
    Spec(
        "reverse-string",
        "Read a word and print it reversed.",
        "print(input().strip()[::-1])\n",
        "s = input().strip()\nprint(s[-1:0:-1])\n",
        lambda rng, small: _word(rng, rng.randint(1, 6 if small else 100)) + "\n",
    ),
    Spec(
        "palindrome",
        "Read a word. Print YES if it reads the same backwards, NO otherwise.",
        "s = input().strip()\nprint('YES' if s == s[::-1] else 'NO')\n",
        "s = input().strip()\nprint('YES' if s[0] == s[-1] else 'NO')\n",
        lambda rng, small: (
            (
                lambda w: (
                    w + w[::-1][rng.randint(0, 1) :]
                    if rng.random() < 0.5
                    else w + _word(rng, 2, "ab")
                )
            )(_word(rng, rng.randint(1, 4 if small else 30), "abc"))
            + "\n"
        ),
    ),
    Spec(
        "sort-ascending",
        f"{LIST_HEADER} Print them in non-decreasing order.",
        "input()\nprint(*sorted(map(int, input().split())))\n",
        "input()\nprint(*sorted(input().split()))\n",
        _list(-50, 150, 100),
    ),
    Spec(
        "sort-descending",
        f"{LIST_HEADER} Print them in non-increasing order.",
        "input()\nprint(*sorted(map(int, input().split()), reverse=True))\n",
        "input()\nprint(*sorted(map(int, input().split()))[::-1][1:], min(map(int, '0'.split())))\n",
        _list(-50, 50, 100),
    ),
    Spec(
        "second-largest",
        f"{LIST_HEADER} Print the second largest distinct value, or -1 if there is none.",
        "input()\na = sorted(set(map(int, input().split())))\nprint(a[-2] if len(a) > 1 else -1)\n",
        "input()\na = sorted(map(int, input().split()))\nprint(a[-2] if len(a) > 1 else -1)\n",
        _list(1, 6, 12),
    ),
    Spec(
        "fibonacci",
        "Read n (0 <= n <= 100000). Print F(n) modulo 1000000007, where F(0)=0, F(1)=1.",
        "n = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, (a + b) % 1000000007\nprint(a)\n",
        "n = int(input())\na, b = 1, 1\nfor _ in range(n):\n    a, b = b, (a + b) % 1000000007\nprint(a)\n",
        _one(0, 100000, 10),
    ),
    Spec(
        "factorial",
        "Read n (0 <= n <= 100000). Print n! modulo 1000000007.",
        "n = int(input())\nr = 1\nfor i in range(2, n + 1):\n    r = r * i % 1000000007\nprint(r)\n",
        "n = int(input())\nr = 1\nfor i in range(2, n):\n    r = r * i % 1000000007\nprint(r)\n",
        _one(0, 100000, 8),
    ),
    Spec(
        "gcd",
        "Read two positive integers (at most 10^12) and print their greatest common divisor.",
        "import math\na, b = map(int, input().split())\nprint(math.gcd(a, b))\n",
        "a, b = map(int, input().split())\nprint(min(a, b))\n",
        _two(1, 10**12),
    ),
    Spec(
        "lcm",
        "Read two positive integers (at most 10^9) and print their least common multiple.",
        "import math\na, b = map(int, input().split())\nprint(a * b // math.gcd(a, b))\n",
        "a, b = map(int, input().split())\nprint(a * b)\n",
        _two(1, 10**9),
    ),
    Spec(
        "is-prime",
        "Read n (1 <= n <= 10^9). Print YES if n is prime, NO otherwise.",
        "n = int(input())\nprint('YES' if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)) else 'NO')\n",
        "n = int(input())\nprint('YES' if n % 2 == 1 or n == 2 else 'NO')\n",
        lambda rng, small: (
            f"{rng.choice([rng.randint(1, 30), rng.randint(1, 10**9), 999999937, 1000000000])}\n"
        ),
    ),
    Spec(
        "count-primes",
        "Read n (1 <= n <= 200000). Print how many primes are at most n.",
        "n = int(input())\ns = bytearray([1]) * (n + 1)\ns[0:2] = b'\\x00\\x00'[: n + 1]\n"
        "for i in range(2, int(n ** 0.5) + 1):\n    if s[i]:\n        s[i * i :: i] = bytearray(len(s[i * i :: i]))\nprint(sum(s))\n",
        "n = int(input())\nprint(sum(all(k % d for d in range(2, k)) for k in range(2, min(n, 300))))\n",
        _one(1, 200000, 30),
    ),
    Spec(
        "digit-sum",
        "Read a non-negative integer with up to 1000 digits and print the sum of its digits.",
        "print(sum(map(int, input().strip())))\n",
        "print(sum(map(int, input().strip()[1:])))\n",
        lambda rng, small: (
            str(rng.randint(1, 9))
            + _word(rng, rng.randint(0, 5 if small else 999), "0123456789")
            + "\n"
        ),
    ),
    Spec(
        "to-binary",
        "Read n (0 <= n <= 10^18) and print it in binary, without leading zeros.",
        "print(bin(int(input()))[2:])\n",
        "print(bin(int(input()))[3:] or '0')\n",
        _one(0, 10**18, 40),
    ),
    Spec(
        "count-words",
        "Read a line of words separated by spaces and print how many words it has.",
        "print(len(input().split()))\n",
        "print(input().count(' '))\n",
        _words,
    ),
    Spec(
        "capitalize",
        "Read a line of lowercase words separated by single spaces. Print it with every word capitalised.",
        "print(' '.join(w.capitalize() for w in input().split()))\n",
        "s = input()\nprint(s[:1].upper() + s[1:])\n",
        _words,
    ),
    Spec(
        "prefix-sums",
        f"{LIST_HEADER} Print the n prefix sums.",
        "input()\nt = 0\nout = []\nfor x in map(int, input().split()):\n    t += x\n    out.append(t)\nprint(*out)\n",
        "input()\na = list(map(int, input().split()))\nprint(*[sum(a[:i]) for i in range(len(a))])\n",
        _list(-100, 100, 100),
    ),
    Spec(
        "distinct-count",
        f"{LIST_HEADER} Print how many distinct values there are.",
        "input()\nprint(len(set(input().split())))\n",
        "print(len(set(input().split())))\n",
        _list(1, 10, 50),
    ),
    Spec(
        "most-frequent",
        f"{LIST_HEADER} Print the value occurring most often; on a tie, the smallest such value.",
        "from collections import Counter\ninput()\nc = Counter(map(int, input().split()))\nprint(min(c, key=lambda v: (-c[v], v)))\n",
        "from collections import Counter\ninput()\nc = Counter(map(int, input().split()))\nprint(c.most_common(1)[0][0])\n",
        _list(1, 8, 40),
    ),
    Spec(
        "balanced-brackets",
        "Read a string of the characters ()[]{}. Print YES if the brackets are balanced, NO otherwise.",
        "s = input().strip()\nst = []\npair = {')': '(', ']': '[', '}': '{'}\nok = True\nfor ch in s:\n"
        "    if ch in '([{':\n        st.append(ch)\n    elif not st or st.pop() != pair[ch]:\n        ok = False\n"
        "        break\nprint('YES' if ok and not st else 'NO')\n",
        "s = input().strip()\nprint('YES' if all(s.count(a) == s.count(b) for a, b in ['()', '[]', '{}']) else 'NO')\n",
        lambda rng, small: (
            rng.choice(
                [
                    "([]{})",
                    "([)]",
                    "(((",
                    _word(rng, rng.randint(1, 4 if small else 40), "()[]{}"),
                    "{[()()]}",
                    "())(",
                ]
            )
            + "\n"
        ),
    ),
    Spec(
        "anagrams",
        "Read two words on separate lines. Print YES if one is an anagram of the other, NO otherwise.",
        "print('YES' if sorted(input().strip()) == sorted(input().strip()) else 'NO')\n",
        "print('YES' if set(input().strip()) == set(input().strip()) else 'NO')\n",
        lambda rng, small: (
            lambda w: (
                f"{w}\n{''.join(rng.sample(w, len(w))) if rng.random() < 0.5 else w + w[:1]}\n"
            )
        )(_word(rng, rng.randint(1, 8), "abcd")),
    ),
    Spec(
        "transpose",
        "Read r and c, then r lines of c integers. Print the transposed c x r matrix.",
        "r, c = map(int, input().split())\nm = [input().split() for _ in range(r)]\nfor col in zip(*m):\n    print(*col)\n",
        "r, c = map(int, input().split())\nm = [input().split() for _ in range(r)]\nfor row in m:\n    print(*row)\n",
        lambda rng, small: (
            lambda r, c: f"{r} {c}\n" + "".join(f"{_ints(rng, c, 0, 9)}\n" for _ in range(r))
        )(rng.randint(1, 3 if small else 8), rng.randint(2, 3 if small else 8)),
    ),
    Spec(
        "max-subarray",
        f"{LIST_HEADER} Print the largest sum of a non-empty contiguous subarray.",
        "input()\nbest = cur = None\nfor x in map(int, input().split()):\n    cur = x if cur is None or cur < 0 else cur + x\n"
        "    best = cur if best is None else max(best, cur)\nprint(best)\n",
        "input()\nprint(sum(x for x in map(int, input().split()) if x > 0))\n",
        _list(-20, 20, 200),
    ),
    Spec(
        "two-sum",
        "The first line holds n and a target t, the second n integers. Print YES if two different positions hold values summing to t, NO otherwise.",
        "n, t = map(int, input().split())\nseen = set()\nok = False\nfor x in map(int, input().split()):\n"
        "    ok = ok or t - x in seen\n    seen.add(x)\nprint('YES' if ok else 'NO')\n",
        "n, t = map(int, input().split())\na = set(map(int, input().split()))\nprint('YES' if any(t - x in a for x in a) else 'NO')\n",
        lambda rng, small: (lambda n: f"{n} {rng.randint(0, 20)}\n{_ints(rng, n, 0, 10)}\n")(
            rng.randint(1, 4 if small else 20)
        ),
    ),
    Spec(
        "longest-increasing-run",
        f"{LIST_HEADER} Print the length of the longest strictly increasing contiguous run.",
        "input()\na = list(map(int, input().split()))\nbest = cur = 1\nfor i in range(1, len(a)):\n"
        "    cur = cur + 1 if a[i] > a[i - 1] else 1\n    best = max(best, cur)\nprint(best)\n",
        "input()\na = list(map(int, input().split()))\nprint(sum(a[i] > a[i - 1] for i in range(1, len(a))) + 1)\n",
        _list(0, 9, 60),
    ),
    Spec(
        "triangle",
        "Read three positive integers. Print YES if they are the sides of a triangle of positive area, NO otherwise.",
        "a, b, c = sorted(map(int, input().split()))\nprint('YES' if a + b > c else 'NO')\n",
        "a, b, c = sorted(map(int, input().split()))\nprint('YES' if a + b >= c else 'NO')\n",
        lambda rng, small: rng.choice(
            ["1 2 3\n", "2 2 3\n", "1 1 2\n", f"{_ints(rng, 3, 1, 10)}\n"]
        ),
    ),
    Spec(
        "leap-year",
        "Read a year (1 <= y <= 10^9). Print YES if it is a leap year in the Gregorian calendar, NO otherwise.",
        "y = int(input())\nprint('YES' if y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) else 'NO')\n",
        "y = int(input())\nprint('YES' if y % 4 == 0 else 'NO')\n",
        lambda rng, small: f"{rng.choice([1900, 2000, 2024, 2023, 2100, rng.randint(1, 10**9)])}\n",
    ),
    Spec(
        "fahrenheit",
        "Read a temperature in Celsius (a real number) and print it in Fahrenheit; answers within 10^-5 are accepted.",
        "print(float(input()) * 9 / 5 + 32)\n",
        "print(float(input()) * 2 + 30)\n",
        lambda rng, small: f"{rng.uniform(-100, 100):.3f}\n",
    ),
    Spec(
        "average",
        f"{LIST_HEADER} Print their average; answers within 10^-5 are accepted.",
        "n = int(input())\nprint(sum(map(int, input().split())) / n)\n",
        "n = int(input())\nprint(sum(map(int, input().split())) // n)\n",
        _list(-1000, 1000, 100),
    ),
    Spec(
        "inversions",
        f"{LIST_HEADER} (n <= 2000) Print the number of pairs i < j with a[i] > a[j].",
        "input()\na = list(map(int, input().split()))\nprint(sum(a[i] > a[j] for i in range(len(a)) for j in range(i + 1, len(a))))\n",
        "input()\na = list(map(int, input().split()))\nprint(sum(a[i] > a[i + 1] for i in range(len(a) - 1)))\n",
        _list(0, 50, 300),
    ),
    Spec(
        "rotate",
        "The first line holds n and k, the second n integers. Print the array rotated right by k positions.",
        "n, k = map(int, input().split())\na = input().split()\nk %= n\nprint(*(a[-k:] + a[:-k] if k else a))\n",
        "n, k = map(int, input().split())\na = input().split()\nprint(*(a[-k:] + a[:-k]))\n",
        lambda rng, small: (lambda n: f"{n} {rng.randint(0, 3 * n)}\n{_ints(rng, n, 0, 99)}\n")(
            rng.randint(1, 4 if small else 30)
        ),
    ),
    Spec(
        "dedupe",
        f"{LIST_HEADER} Print the values with repeats removed, keeping first occurrences in order.",
        "input()\nprint(*dict.fromkeys(input().split()))\n",
        "input()\nprint(*sorted(set(map(int, input().split()))))\n",
        _list(1, 9, 40),
    ),
    Spec(
        "power-mod",
        "Read a, b, m (0 <= a, b <= 10^18, 1 <= m <= 10^9). Print a^b modulo m.",
        "a, b, m = map(int, input().split())\nprint(pow(a, b, m))\n",
        "a, b, m = map(int, input().split())\nprint(pow(a, b % m, m))\n",
        lambda rng, small: (
            f"{rng.randint(0, 10 if small else 10**18)} {rng.randint(0, 10 if small else 10**18)} {rng.randint(1, 10**9)}\n"
        ),
    ),
    Spec(
        "digital-root",
        "Read a non-negative integer n (at most 10^18). Repeatedly replace n by the sum of its digits until it has one digit; print it.",
        "n = int(input())\nwhile n >= 10:\n    n = sum(map(int, str(n)))\nprint(n)\n",
        "n = int(input())\nprint(n % 9)\n",
        _one(0, 10**18, 100),
    ),
    Spec(
        "caesar",
        "Read k (0 <= k <= 25) and a lowercase word on the next line. Print the word with every letter shifted k places forward, wrapping z to a.",
        "k = int(input())\nprint(''.join(chr((ord(c) - 97 + k) % 26 + 97) for c in input().strip()))\n",
        "k = int(input())\nprint(''.join(chr(ord(c) + k) for c in input().strip()))\n",
        lambda rng, small: (
            f"{rng.randint(0, 25)}\n{_word(rng, rng.randint(1, 6 if small else 50))}\n"
        ),
    ),
    Spec(
        "run-length",
        "Read a lowercase word. Print its run-length encoding: each maximal run as the letter followed by its length.",
        "import itertools\nprint(''.join(f'{k}{len(list(g))}' for k, g in itertools.groupby(input().strip())))\n",
        "from collections import Counter\nprint(''.join(f'{k}{v}' for k, v in Counter(input().strip()).items()))\n",
        lambda rng, small: _word(rng, rng.randint(1, 6 if small else 60), "aab") + "\n",
    ),
    Spec(
        "set-bits",
        "Read n (0 <= n <= 10^18) and print how many 1 bits its binary representation has.",
        "print(bin(int(input())).count('1'))\n",
        "print(int(input()).bit_length())\n",
        _one(0, 10**18, 64),
    ),
    Spec(
        "grid-paths",
        "Read r and c (1 <= r, c <= 1000). Print the number of monotone lattice paths from the top-left to the bottom-right cell of an r x c grid, modulo 1000000007.",
        "import math\nr, c = map(int, input().split())\nprint(math.comb(r + c - 2, r - 1) % 1000000007)\n",
        "import math\nr, c = map(int, input().split())\nprint(math.comb(r + c, r) % 1000000007)\n",
        lambda rng, small: (
            f"{rng.randint(1, 4 if small else 1000)} {rng.randint(1, 4 if small else 1000)}\n"
        ),
    ),
    Spec(
        "common-prefix",
        "Read n, then n lowercase words on one line. Print their longest common prefix, or - if it is empty.",
        "import os\ninput()\nprint(os.path.commonprefix(input().split()) or '-')\n",
        "input()\nw = input().split()\nprint(w[0][:1] if all(x[:1] == w[0][:1] for x in w) else '-')\n",
        lambda rng, small: (
            lambda p, n: (
                f"{n}\n"
                + " ".join(p + _word(rng, rng.randint(0, 3), "ab") for _ in range(n))
                + "\n"
            )
        )(_word(rng, rng.randint(0, 4), "ab"), rng.randint(1, 3 if small else 10)),
    ),
]


def _run(source: str, stdin: str) -> str:
    """Runs a reference solution of ours (trusted) in-process to compute an expected output."""
    out, saved = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, "reference.py", "exec"), {"__name__": "__main__"})
    finally:
        sys.stdin = saved
    return out.getvalue()


def build(seed: int = 2024) -> list[Problem]:
    problems = []
    for index, spec in enumerate(SPECS):
        rng = random.Random(f"{seed}-{spec.name}")
        inputs: list[str] = []
        while len(inputs) < PUBLIC + PRIVATE:
            candidate = spec.generate(rng, len(inputs) < PUBLIC)
            if candidate not in inputs:
                inputs.append(candidate)
        tests = [TestCase(i, _run(spec.reference, i)) for i in inputs]
        problems.append(
            Problem(
                name=spec.name,
                description=spec.statement,
                public_tests=tests[:PUBLIC],
                private_tests=tests[PUBLIC:],
                time_limit_s=2.0,
                memory_limit_bytes=256 << 20,
                difficulty=1,
                solutions=[Solution("python", spec.reference)],
                incorrect_solutions=[Solution("python", spec.wrong)],
                source=f"rlef_hpc bundled #{index}",
            )
        )
    return problems


def load_bundled() -> list[Problem]:
    from rlef_hpc.data.codecontests import load_problems

    return load_problems(BUNDLED)


def write(path: Path = BUNDLED) -> None:
    from rlef_hpc.data.codecontests import problem_record

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for problem in build():
            f.write(json.dumps(problem_record(problem)) + "\n")


if __name__ == "__main__":
    write()
    print(f"wrote {len(SPECS)} problems to {BUNDLED}")
