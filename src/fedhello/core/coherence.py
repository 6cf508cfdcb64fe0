"""Whether a profile's step times deserve storing (pure python: no torch).

A profile is stored and reused by every later run on the machine, so a step-time limit
(``budget-step-seconds``) rests on it: times measured while something else ran must not be
stored. Each entry's time is the median of ``k >= MIN_STEPS`` steps timed in turns with the
other entries' after a warm-up (``fedhello.model.probe``); its spread is their median absolute
deviation (MAD), and ``MAD_TO_SD x MAD`` estimates one step's standard deviation (exact for
normal noise, and robust to the few steps something else interrupted, which the median
ignores too). Three checks:

* **the steps agree**: in the median entry the MAD is at most ``SPREAD_MAX`` of the step.
  Where they spread more, every median is about as uncertain and, since other work only ever
  adds time, too high, however well the medians happen to line up;
* **times rise with depth**, within the noise the probe saw: at the same count an entry one
  block deeper (backward goes one block further) may not be faster than the shallower one,
  and at the same lowest block one more trained layer (one more LoRA block to differentiate
  and update) may not make a step faster, by more than the tolerance;
* **the linear model fits**: its largest relative error on a measured entry is at most
  ``FIT_MAX_ERROR``.

The tolerance between two entries is ``SPREAD_Z`` standard errors of the difference of their
medians plus ``DRIFT`` of the larger time. A median of ``k`` steps has a standard error of
``MEDIAN_SE x sd / sqrt(k)`` (for normal noise); the probe takes its steps in turns, one of
each entry per round, so an entry's steps are seconds apart and a burst of other work reaches
at most one or two of them, as independent draws do. The drift term: a machine's speed drifts
over a probe in a way no entry's spread shows. On the tiny test models (50 probes on this
project's shared 2-core machine) every profile passed at once: the worst pair came to 0.59 of
its tolerance, the worst fit error to 16%, the worst median-entry spread to 11%; the default
experiment's profile on the same machine came to 0.71 of its tolerance at worst.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedhello.core.profile import Cost, fit_analytic

MIN_STEPS = 5  # timed steps per entry that a stored profile needs
MAD_TO_SD = 1.4826  # a normal distribution's standard deviation is 1.4826 x its MAD
MEDIAN_SE = 1.2533  # sqrt(pi / 2): the median's standard error is this x sd / sqrt(k)
SPREAD_Z = 3.0
DRIFT = 0.10
# A MiniLM-L6 profile of 3 consecutive steps per entry (docs/results-memory) fits within 18%;
# the noisy one of issue 29 missed by 633%.
FIT_MAX_ERROR = 0.5
SPREAD_MAX = 0.25


def tolerance(a: Cost, b: Cost, steps: int) -> float:
    """How far apart two entries' times (medians of ``steps`` steps) may be against the
    expected order (s)."""
    sd = MAD_TO_SD * math.hypot(a.step_mad_seconds or 0.0, b.step_mad_seconds or 0.0)
    se = MEDIAN_SE * sd / math.sqrt(max(steps, 1))
    return SPREAD_Z * se + DRIFT * max(a.step_seconds, b.step_seconds)


def _layers(n: int) -> str:
    return f"{n} layer" + ("s" if n > 1 else "")


def order_violations(table: Mapping[tuple[int, int], Cost], steps: int) -> list[tuple[float, str]]:
    """Each pair of measured entries out of order by more than the tolerance, as (how many
    tolerances out, what) with the worst first."""
    measured = {k: c for k, c in table.items() if c.measured}
    out = []
    for (b, n), deep in measured.items():
        # one block less deep with the same count must not be slower; nor one layer more
        # from the same lowest block faster
        for cheap, costly, what in (
            ((b + 1, n), (b, n), f"faster than {{other}} s from block {b + 1} (less deep)"),
            ((b, n), (b, n + 1), f"slower than {{other}} s with {_layers(n + 1)}"),
        ):
            low, high = measured.get(cheap), measured.get(costly)
            if low is None or high is None:
                continue
            gap, tol = low.step_seconds - high.step_seconds, tolerance(high, low, steps)
            if gap > tol:
                other = (low if costly == (b, n) else high).step_seconds
                out.append((gap / tol, (
                    f"lowest block {b}, {_layers(n)}: {deep.step_seconds:.3f} s, "
                    + what.format(other=f"{other:.3f}")
                    + f" by more than the noise allows ({tol:.3f} s)"
                )))  # fmt: skip
    return sorted(out, key=lambda v: -v[0])


def step_time_problem(
    table: Mapping[tuple[int, int], Cost], num_layers: int, steps: int
) -> str | None:
    """Why ``table``'s step times (medians of ``steps`` timed steps) are not a profile, in one
    line (None: they are)."""
    problems = []
    spread = typical_spread(table)
    if spread is not None and spread > SPREAD_MAX:
        problems.append(
            f"the timed steps spread {spread:.0%} of the step in the median entry (at most "
            f"{SPREAD_MAX:.0%} allowed): the machine was busy"
        )
    violations = order_violations(table, steps)
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        problems.append(f"times do not rise with depth and count: {violations[0][1]}{more}")
    if any(c.measured for c in table.values()):
        error = fit_analytic(table, num_layers).seconds_max_error
        if error > FIT_MAX_ERROR:
            problems.append(
                f"the linear model misses a step time by {error:.0%} (at most "
                f"{FIT_MAX_ERROR:.0%} allowed)"
            )
    return "; ".join(problems) or None


def _shares(table: Mapping[tuple[int, int], Cost]) -> list[tuple[float, tuple[int, int]]]:
    """Each measured entry's MAD as a share of its median step, smallest first."""
    return sorted(
        ((c.step_mad_seconds / c.step_seconds, k) for k, c in table.items()
         if c.measured and c.step_mad_seconds is not None and c.step_seconds > 0),
        key=lambda v: v[0],
    )  # fmt: skip


def typical_spread(table: Mapping[tuple[int, int], Cost]) -> float | None:
    """The median entry's MAD as a share of its step (None: no spread measured)."""
    shares = _shares(table)
    return shares[len(shares) // 2][0] if shares else None


def spread_summary(table: Mapping[tuple[int, int], Cost]) -> str | None:
    """The spread the probe saw, in one phrase: the entries' MAD as a share of their median
    step (typical and largest), or None where no spread was measured."""
    shares = _shares(table)
    if not shares:
        return None
    median = shares[len(shares) // 2][0]
    worst, (b, n) = shares[-1]
    return (
        f"spread (MAD of the timed steps) {median:.1%} of the step in the median entry, at most "
        f"{worst:.1%} (lowest block {b}, {_layers(n)})"
    )
