"""Output comparison as in CodeContests: whitespace-split tokens, reals equal within 1e-5
absolute or relative, integers exact; and an exact mode for problems whose checker is strict.

The program's output is hostile: the comparison never raises on it (a 4,301-digit integer is
beyond `int()`'s default limit, a real beyond float's range), and reads no more of it than the
expected answer has tokens (a 32 MiB output of one-byte tokens split at once would cost the
trainer hundreds of megabytes).
"""

from __future__ import annotations

import decimal
import math
import re

FLOAT_TOLERANCE = 1e-5

# Only plain decimal numbers are compared numerically: Python's float() also accepts "1_000",
# "nan" and "infinity", which a judge must compare as text.
_NUMBER = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(rb"[+-]?\d+")
_TOKEN = re.compile(rb"\S+")  # bytes patterns: \s is ASCII whitespace, as bytes.split() splits
# Reals past float's range are compared exactly as decimals, in a context wide enough for any
# exponent a number can be written with here.
_WIDE = decimal.Context(prec=64, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def as_bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _integer_digits(token: bytes) -> bytes:
    """The integer's canonical text ("+05" -> "5", "-0" -> "0"), without int(): that refuses
    more than 4,300 digits, and converting is quadratic in them."""
    digits = token.lstrip(b"+-").lstrip(b"0") or b"0"
    return b"-" + digits if token.startswith(b"-") and digits != b"0" else digits


def _reals_close(expected: bytes, actual: bytes, tol: float) -> bool:
    a, b = float(expected), float(actual)
    if not (math.isinf(a) or math.isinf(b)):
        return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
    # Written as finite numbers but past float's range: equal only as decimals (inf == inf
    # would accept 1e400 for 2e400).
    try:
        x, y = _WIDE.create_decimal(expected.decode()), _WIDE.create_decimal(actual.decode())
        diff = _WIDE.abs(_WIDE.subtract(x, y))
        bound = _WIDE.multiply(_WIDE.abs(_WIDE.max_mag(x, y)), decimal.Decimal(tol))
        return diff <= max(bound, decimal.Decimal(tol))
    except (decimal.DecimalException, ValueError):
        return False


def tokens_equal(expected: bytes, actual: bytes, tol: float = FLOAT_TOLERANCE) -> bool:
    if expected == actual:
        return True
    if _INTEGER.fullmatch(expected):
        # An integer answer takes an integer, exactly: no "1e12" for 1000000000001 (within the
        # real tolerance), no "5.0" for 5. The same number may be written differently ("+5",
        # "05").
        return bool(_INTEGER.fullmatch(actual)) and _integer_digits(expected) == _integer_digits(
            actual
        )
    if not (_NUMBER.fullmatch(expected) and _NUMBER.fullmatch(actual)):
        return False
    return _reals_close(expected, actual, tol)


def outputs_match(expected: str | bytes, actual: str | bytes, mode: str = "tokens") -> bool:
    """True when `actual` is an accepted answer for `expected` under `mode`.

    tokens: both split on whitespace (any amount, any kind, leading and trailing ignored) into
        the same number of tokens, each equal as text, as integers (an integer expected takes an
        integer), or (when the expected one is written with a point or an exponent) as reals
        within 1e-5 absolute or relative.
    exact: identical bytes, except whitespace at the very end of the output.
    """
    exp, act = as_bytes(expected), as_bytes(actual)
    if mode == "exact":
        return exp.rstrip() == act.rstrip()
    if mode != "tokens":
        raise ValueError(f"unknown compare mode {mode!r}; expected 'tokens' or 'exact'")
    if exp == act:
        return True
    exp_tokens = exp.split()
    n = 0
    for match in _TOKEN.finditer(act):
        if n == len(exp_tokens) or not tokens_equal(exp_tokens[n], match.group()):
            return False  # one token too many, or a wrong one: stop reading there
        n += 1
    return n == len(exp_tokens)
