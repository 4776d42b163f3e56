"""Small timing helpers shared by the benchmarks in bench/.

The machine these run on is shared (other jobs run tests at the same time), so a single timing
means little: compared variants are interleaved inside one process, round after round, and the
medians are compared. The variant order is rotated every round so that no variant always runs
right after the same neighbour (cache warmth, turbo state, a co-tenant's burst).

Both wall time and process CPU time are recorded. With one intra-op thread, CPU time is the
better measure on a shared box: it leaves out the time the process sat descheduled while a
co-tenant ran, which wall time counts and which varies by tens of percent from step to step.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


class Timings:
    """Per-variant samples in seconds: ``wall[name]`` and ``cpu[name]`` (process CPU time)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.wall: dict[str, list[float]] = {k: [] for k in names}
        self.cpu: dict[str, list[float]] = {k: [] for k in names}

    def get(self, kind: str) -> dict[str, list[float]]:
        return self.cpu if kind == "cpu" else self.wall


def interleave(
    variants: dict[str, Callable[[int], object]],
    rounds: int,
    warmup: int = 0,
    setup: Callable[[str, int], object] | None = None,
) -> Timings:
    """Run every variant once per round, order rotated per round; return per-variant seconds.

    ``variants`` maps a name to ``fn(i)`` (``i`` the round index, warm-up rounds negative).
    ``setup(name, i)``, if given, runs untimed right before each call (e.g. restore a state).
    The first ``warmup`` rounds are run and discarded.
    """
    names = list(variants)
    out = Timings(names)
    for r in range(warmup + rounds):
        i = r - warmup
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if setup is not None:
                setup(name, i)
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name](i)
            t1, c1 = time.perf_counter(), time.process_time()
            if i >= 0:
                out.wall[name].append(t1 - t0)
                out.cpu[name].append(c1 - c0)
    return out


def paired_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """Per-round ratios num/den (both measured in the same round, so under similar load)."""
    return [a / b for a, b in zip(times[num], times[den])]


def fmt_s(x: float) -> str:
    if x >= 1.0:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} us"


def spread(xs: Sequence[float]) -> str:
    """'median [q1..q3]' of a sample, for a quick look at the noise."""
    if len(xs) < 4:
        return f"median {fmt_s(median(xs))}"
    q = statistics.quantiles(xs, n=4)
    return f"median {fmt_s(median(xs))} [IQR {fmt_s(q[0])}..{fmt_s(q[2])}]"


class Clock:
    """Wall time since construction, for the script's total runtime line."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
