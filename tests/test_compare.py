"""The comparator's whitespace and number rules, as properties."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from rlef_hpc.sandbox import outputs_match

token = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs",), blacklist_characters=" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"
    ),
    min_size=1,
    max_size=8,
)
whitespace = st.text(alphabet=" \t\n\r", min_size=1, max_size=4)
finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(st.lists(token, max_size=10), st.data())
def test_any_whitespace_between_tokens_is_equal(tokens, data):
    seps = [data.draw(whitespace) for _ in range(len(tokens) + 1)]
    spaced = seps[0] + "".join(t + s for t, s in zip(tokens, seps[1:], strict=True))
    assert outputs_match(" ".join(tokens) + "\n", spaced)


@given(st.text())
def test_every_output_matches_itself(text):
    assert outputs_match(text, text)
    assert outputs_match(text, text, mode="exact")


@given(st.lists(token, min_size=1, max_size=6), token)
def test_a_missing_or_extra_token_fails(tokens, extra):
    assert not outputs_match(" ".join(tokens), " ".join(tokens[:-1]))
    assert not outputs_match(" ".join(tokens), " ".join([*tokens, extra]))


@given(finite, st.integers(min_value=6, max_value=12))
def test_reals_printed_to_any_sufficient_precision_match(x, digits):
    assert outputs_match(f"{x:.12f}", f"{x:.{digits}f}")
    assert outputs_match(f"{x:.9f}", f"{x:.6e}")


@given(finite, st.floats(min_value=1e-4, max_value=1e3))
def test_reals_further_apart_than_the_tolerance_fail(x, rel):
    y = x + max(abs(x), 1.0) * rel
    assume(abs(y - x) > 2e-5 * max(1.0, abs(x)))
    assert not outputs_match(f"{x:.10f}", f"{y:.10f}")


@given(
    st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=1, max_value=10**6)
)
def test_integers_are_exact(n, delta):
    assert outputs_match(str(n), str(n))
    assert not outputs_match(str(n), str(n + delta))


@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_an_integer_answer_takes_an_integer(n):
    """Issue 27: a real within the tolerance is not an integer answer ("1e12" for
    1000000000001); an integer written differently ("+5", "005") is."""
    assert not outputs_match(str(n), f"{n}.000000")
    assert not outputs_match(str(n), f"{n:e}")
    assert outputs_match(str(n), f"{n:+d}") and outputs_match(str(n), f"{n:+06d}")


@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_a_real_answer_takes_an_integer_written_as_one(n):
    assert outputs_match(f"{n}.000000", str(n))


def test_words_that_float_parses_compare_as_text():
    assert outputs_match("nan inf", "nan inf")
    assert not outputs_match("1000", "1_000")
    assert not outputs_match("inf", "infinity")
    assert not outputs_match("1", "nan")
    assert not outputs_match("YES", "yes")


def test_exact_mode_ignores_only_trailing_whitespace():
    assert outputs_match("1 2\n", "1 2", mode="exact")
    assert outputs_match("1 2\n", "1 2\n\n  ", mode="exact")
    assert not outputs_match("1 2\n", "1  2\n", mode="exact")
    assert not outputs_match("1\n2\n", "1 2\n", mode="exact")
