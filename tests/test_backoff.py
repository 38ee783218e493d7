"""buildq.engine.backoff: full-jitter exponential backoff and the retry budget."""

from __future__ import annotations

import math
import random
import sys
from fractions import Fraction

import pytest

from buildq.engine.backoff import backoff_ceiling, backoff_delay


def one() -> float:
    return 1.0


def zero() -> float:
    return 0.0


def _exact_ceiling(attempt: int, base: float, cap: float) -> Fraction:
    return min(Fraction(cap), Fraction(base) * 2 ** (attempt - 1))


@pytest.mark.parametrize("base", [0.0, 0.001, 0.5, 1.0, 3.7])
@pytest.mark.parametrize("cap", [0.0, 0.01, 1.0, 60.0, 1e6])
def test_delay_stays_within_bounds(base: float, cap: float) -> None:
    rng = random.Random(f"{base}-{cap}")
    for attempt in range(1, 80):
        ceiling = _exact_ceiling(attempt, base, cap)
        delay = backoff_delay(attempt, base=base, cap=cap, rand=rng.random)
        assert 0.0 <= delay <= float(ceiling)
        assert backoff_ceiling(attempt, base=base, cap=cap) == pytest.approx(float(ceiling), rel=1e-15)


def test_rand_one_gives_the_ceiling_and_zero_gives_zero() -> None:
    got = [backoff_delay(n, base=1.0, cap=60.0, rand=one) for n in range(1, 9)]
    assert got == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert [backoff_delay(n, base=1.0, cap=60.0, rand=zero) for n in range(1, 9)] == [0.0] * 8
    assert backoff_delay(3, base=0.5, cap=60.0, rand=one) == 2.0


def test_full_jitter_uses_the_injected_rand_once() -> None:
    calls: list[float] = []

    def rand() -> float:
        calls.append(0.25)
        return 0.25

    assert backoff_delay(4, base=2.0, cap=100.0, rand=rand) == 0.25 * 16.0
    assert len(calls) == 1


def test_cap_is_respected() -> None:
    for attempt in (7, 8, 50, 1000):
        assert backoff_delay(attempt, base=1.0, cap=60.0, rand=one) == 60.0
    assert backoff_delay(1, base=10.0, cap=3.0, rand=one) == 3.0  # a cap below the base wins


@pytest.mark.parametrize("attempt", [1024, 1075, 2200, 10**6, 10**100, sys.maxsize])
def test_huge_attempt_numbers_give_the_cap(attempt: int) -> None:
    assert backoff_delay(attempt, base=1.0, cap=60.0, rand=one) == 60.0
    assert backoff_delay(attempt, base=1.0, cap=60.0, rand=lambda: 0.5) == 30.0
    assert backoff_delay(attempt, base=1e300, cap=1e308, rand=one) == 1e308


@pytest.mark.parametrize("attempt", [2200, 10**6, 10**100, sys.maxsize])
def test_huge_attempt_numbers_with_extreme_floats(attempt: int) -> None:
    # 5e-324 is 2**-1074 and 1e308 is about 2**1023.2: the ceiling reaches the cap at attempt 2099
    assert backoff_delay(attempt, base=5e-324, cap=1e308, rand=one) == 1e308


def test_tiny_base_grows_without_overflow() -> None:
    assert backoff_ceiling(1, base=5e-324, cap=1.0) == 5e-324
    assert backoff_ceiling(1075, base=5e-324, cap=1e308) == 1.0
    assert backoff_ceiling(1125, base=5e-324, cap=1e308) == 2.0**50
    assert backoff_ceiling(2097, base=5e-324, cap=1e308) == 2.0**1022
    assert backoff_ceiling(2098, base=5e-324, cap=1e308) == 2.0**1023  # the largest power of two
    assert backoff_ceiling(2099, base=5e-324, cap=1e308) == 1e308


@pytest.mark.parametrize("attempt", [1, 2, 30, 10**9])
def test_base_zero_gives_zero(attempt: int) -> None:
    assert backoff_delay(attempt, base=0.0, cap=60.0, rand=one) == 0.0
    assert backoff_delay(attempt, base=1.0, cap=0.0, rand=one) == 0.0


def test_ceiling_never_decreases() -> None:
    values = [backoff_ceiling(n, base=0.3, cap=45.0) for n in range(1, 40)]
    assert values == sorted(values) and values[-1] == 45.0


def test_default_rand_is_random_random() -> None:
    for attempt in range(1, 12):
        delay = backoff_delay(attempt, base=1.0, cap=60.0)
        assert 0.0 <= delay < min(60.0, 2.0 ** (attempt - 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempt": 0, "base": 1.0, "cap": 1.0},
        {"attempt": -3, "base": 1.0, "cap": 1.0},
        {"attempt": 1, "base": -1.0, "cap": 1.0},
        {"attempt": 1, "base": 1.0, "cap": -0.5},
        {"attempt": 1, "base": math.inf, "cap": 1.0},
        {"attempt": 1, "base": 1.0, "cap": math.inf},
        {"attempt": 1, "base": math.nan, "cap": 1.0},
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        backoff_delay(int(kwargs["attempt"]), base=kwargs["base"], cap=kwargs["cap"], rand=one)


@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, math.inf])
def test_rand_outside_unit_interval_raises(value: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(2, base=1.0, cap=60.0, rand=lambda: value)
