"""Retry timing: exponential backoff with full jitter.

Attempts are numbered from 1. After attempt ``n`` failed transiently, the build waits
``backoff_delay(n, ...)`` seconds before attempt ``n + 1``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable


def backoff_ceiling(attempt: int, *, base: float, cap: float) -> float:
    """``min(cap, base * 2**(attempt - 1))``, exact for any ``attempt >= 1`` (no overflow).

    Raises ValueError for ``attempt < 1`` or a negative or non-finite ``base``/``cap``.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    for name, value in (("base", base), ("cap", cap)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if base == 0 or cap == 0:
        return 0.0
    exponent = attempt - 1
    # base * 2**exponent >= cap  <=>  exponent >= log2(cap) - log2(base); both logs are finite here
    if exponent >= math.log2(cap) - math.log2(base):
        return float(cap)
    return min(float(cap), math.ldexp(base, exponent))


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt ``attempt`` (from 1) before the next one.

    Full jitter (AWS style): ``rand() * min(cap, base * 2**(attempt - 1))``, so the result is
    always in ``[0, min(cap, base * 2**(attempt - 1))]``; ``rand`` must return a value in [0, 1]
    (``random.random`` by default; inject a constant in tests). Base 0 or cap 0 gives 0. Huge
    attempt numbers give the cap times ``rand()``. Raises ValueError for ``attempt < 1``, a
    negative or non-finite ``base``/``cap``, or ``rand()`` outside [0, 1].
    """
    ceiling = backoff_ceiling(attempt, base=base, cap=cap)
    r = rand()
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"rand() must return a number in [0, 1], got {r!r}")
    return r * ceiling
