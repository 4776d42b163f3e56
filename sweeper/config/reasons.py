"""The comparison a prune or promotion reason states, true for the numbers it shows.

    >>> compared(4.734, 4.734)
    ('4.734', 'ties the cutoff 4.734')
    >>> compared(4.73412, 4.73398)       # 4 digits would show "4.734 > cutoff 4.734"
    ('4.7341', '> cutoff 4.734')
    >>> compared(float("nan"), 2.5)
    ('nan', '(not a number, ranked last) against the cutoff 2.5')

A reason reads ``f"{metric} {v} at step {step} {relation}"``.

The relation is the one between the two numbers, whatever the objective's direction: a reason
says ``>`` only when the value is greater, ``<`` only when it is smaller, and names a tie as a tie.
"""

from __future__ import annotations

import math


def shown(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` with ``digits`` significant digits, or as many more as it takes for two
    different numbers not to read alike."""
    for d in range(digits, 18):
        sa, sb = f"{a:.{d}g}", f"{b:.{d}g}"
        if sa != sb or a == b:
            return sa, sb
    return repr(a), repr(b)


def compared(value: float, cutoff: float, name: str = "cutoff") -> tuple[str, str]:
    """``value`` as shown, and its relation to ``cutoff``: ``'> cutoff C'``, ``'< cutoff C'``,
    ``'ties the cutoff C'``, or, for a NaN on either side, what it is (a NaN compares to nothing)."""
    value, cutoff = float(value), float(cutoff)
    v, c = shown(value, cutoff)
    if math.isnan(value):
        return v, f"(not a number, ranked last) against the {name} {c}"
    if math.isnan(cutoff):
        return v, f"against the {name} {c} (not a number)"
    if value == cutoff:
        return v, f"ties the {name} {c}"
    return v, f"{'>' if value > cutoff else '<'} {name} {c}"
