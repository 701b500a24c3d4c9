"""Output comparison as in CodeContests: whitespace-split tokens, numbers equal within 1e-5
absolute or relative; and an exact mode for problems whose checker is strict."""

from __future__ import annotations

import math
import re

FLOAT_TOLERANCE = 1e-5

# Only plain decimal numbers are compared numerically: Python's float() also accepts "1_000",
# "nan" and "infinity", which a judge must compare as text.
_NUMBER = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(rb"[+-]?\d+")


def as_bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def tokens_equal(expected: bytes, actual: bytes, tol: float = FLOAT_TOLERANCE) -> bool:
    if expected == actual:
        return True
    if not (_NUMBER.fullmatch(expected) and _NUMBER.fullmatch(actual)):
        return False
    if _INTEGER.fullmatch(expected) and _INTEGER.fullmatch(actual):
        # Integers are exact ("1000000000001" is not within 1e-5 of "999999999999"), but the
        # same number may be written differently ("+5", "05").
        return int(expected) == int(actual)
    a, b = float(expected), float(actual)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def outputs_match(expected: str | bytes, actual: str | bytes, mode: str = "tokens") -> bool:
    """True when `actual` is an accepted answer for `expected` under `mode`.

    tokens: both split on whitespace (any amount, any kind, leading and trailing ignored) into
        the same number of tokens, each equal as text, as integers, or (when either is written
        with a point or an exponent) as reals within 1e-5 absolute or relative.
    exact: identical bytes, except whitespace at the very end of the output.
    """
    exp, act = as_bytes(expected), as_bytes(actual)
    if mode == "exact":
        return exp.rstrip() == act.rstrip()
    if mode != "tokens":
        raise ValueError(f"unknown compare mode {mode!r}; expected 'tokens' or 'exact'")
    exp_tokens, act_tokens = exp.split(), act.split()
    if exp_tokens == act_tokens:
        return True
    return len(exp_tokens) == len(act_tokens) and all(
        tokens_equal(e, a) for e, a in zip(exp_tokens, act_tokens, strict=True)
    )
