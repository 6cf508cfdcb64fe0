"""fedhello's one cost model: a measured profile, and the linear model fitted to it that fills
the entries a probe did not measure, and the checks its step times pass before it is stored
(pure python). The retired relative tiers are refused."""

from __future__ import annotations

import pytest

from fedhello.core.coherence import spread_summary, step_time_problem
from fedhello.core.errors import ConfigError
from fedhello.core.profile import Cost, CostProfile, fit_analytic

L = 6


def linear(b: int, n: int) -> Cost:
    """memory = 5 + 20 MB per block of depth + 3 MB per layer; time = 0.3 + 0.02 s per block
    of depth + 0.003 s per layer: backward stops at the lowest trained block ``b``."""
    depth = L - b
    return Cost(5.0 + 20.0 * depth + 3.0 * n, 0.3 + 0.02 * depth + 0.003 * n)


def test_the_fit_recovers_a_linear_cost_exactly() -> None:
    table = {(b, n): linear(b, n) for b in range(L) for n in range(1, L - b + 1)}
    fit = fit_analytic(table, L)
    assert fit.memory == pytest.approx((5.0, 20.0, 3.0))
    assert fit.seconds == pytest.approx((0.3, 0.02, 0.003))
    assert fit.memory_max_error == pytest.approx(0, abs=1e-9)
    assert fit.seconds_max_error == pytest.approx(0, abs=1e-9)


def test_unmeasured_sets_are_bounded_by_measured_ones_and_cost_grows_with_depth() -> None:
    # a partial probe: the top block alone, the whole model, and one set in between
    measured = {(5, 1): linear(5, 1), (0, 6): linear(0, 6), (2, 2): linear(2, 2)}
    profile = CostProfile({"test": True}, L, dict(measured), [1000] * L, 500)
    assert profile.cost([5]) == measured[5, 1]  # a measured entry is used as it is
    filled = profile.cost([0])  # one shallow layer: not measured, bounded by the whole model
    assert not filled.measured and filled.device_peak_mb is None
    assert filled.memory_mb == pytest.approx(linear(0, 6).memory_mb)
    assert filled.memory_mb > linear(0, 1).memory_mb
    assert filled.step_seconds == pytest.approx(linear(0, 6).step_seconds)
    # an entry nothing measured bounds (wider than any measured set that deep) is the fit's
    fitted = CostProfile({"test": True}, L, {(5, 1): linear(5, 1), (2, 2): linear(2, 2),
                                             (3, 1): linear(3, 1)}, [1000] * L, 500)  # fmt: skip
    assert fitted.dominating(0, 3) == []
    assert fitted.cost([0, 1, 2]).memory_mb == pytest.approx(linear(0, 3).memory_mb)
    # one shallow layer costs nearly the whole model, one deep layer far less; a set's cost is
    # set by its lowest block, whatever else it trains above it
    singles = [profile.cost([b]).step_seconds for b in range(L)]
    assert singles == sorted(singles, reverse=True)
    assert profile.cost([0, 5]).memory_mb > profile.cost([4, 5]).memory_mb
    assert profile.top(3) == profile.cost([3, 4, 5])


def test_a_profile_with_too_few_measurements_predicts_their_mean() -> None:
    table = {(5, 1): Cost(10.0, 1.0), (0, 6): Cost(30.0, 3.0)}
    fit = fit_analytic(table, L)
    assert fit.predict(3, 2, L) == pytest.approx((20.0, 2.0))


def test_the_fit_survives_the_json_round_trip_from_measured_entries_only() -> None:
    measured = {(5, 1): linear(5, 1), (0, 6): linear(0, 6), (2, 2): linear(2, 2)}
    profile = CostProfile({"k": 1}, L, dict(measured), [1000] * L, 500, probe_steps=3)
    profile.table[1, 1] = Cost(1e6, 1e6, measured=False)  # a filled entry: not refitted on
    again = CostProfile.from_json(profile.to_json())
    assert again.fit is not None and profile.fit is not None
    assert again.fit.memory == pytest.approx(profile.fit.memory)
    assert again.table[1, 1] == profile.table[1, 1]


def timed(b: int, n: int, mad: float = 0.004) -> Cost:
    """``linear``'s entry as the probe keeps it: the median of 5 timed steps and their MAD."""
    return Cost(linear(b, n).memory_mb, linear(b, n).step_seconds, step_mad_seconds=mad)


def coherent() -> dict[tuple[int, int], Cost]:
    return {(b, n): timed(b, n) for b in range(L) for n in range(1, L - b + 1)}


def test_times_that_rise_with_depth_pass_and_the_spread_is_summarised() -> None:
    table = coherent()
    assert step_time_problem(table, L, 5) is None
    table[2, 2] = timed(2, 2, mad=0.1 * linear(2, 2).step_seconds)  # its steps spread 10%
    summary = spread_summary(table)
    assert summary is not None and "1.0% of the step in the median entry" in summary
    assert "at most 10.0% (lowest block 2, 2 layers)" in summary


def test_the_issues_profile_is_named_incoherent() -> None:
    """Issue 29 (2026-12-02): the deepest one-layer entry at 5.589 s beside 0.17-0.39 s."""
    table = coherent()
    table[0, 1] = Cost(table[0, 1].memory_mb, 5.589, step_mad_seconds=0.01)
    problem = step_time_problem(table, L, 5)
    assert problem is not None and "\n" not in problem
    assert "lowest block 0, 1 layer: 5.589 s, slower than 0.426 s with 2 layers" in problem
    assert "the linear model misses a step time by" in problem


def test_an_inversion_is_judged_against_the_spread_the_probe_saw() -> None:
    """Every entry from block 1 measured 25% slower than block 0's (less deep, so it should be
    faster): beyond the noise when the steps agreed (MAD 1%), within it when they spread 10%."""
    table = coherent()
    for n in range(1, L):
        table[1, n] = Cost(0.0, table[0, n].step_seconds * 1.25, step_mad_seconds=0.004)
    problem = step_time_problem(table, L, 5)
    assert problem is not None and "times do not rise with depth" in problem
    assert "faster than" in problem and "from block 1 (less deep)" in problem
    noisy = {k: Cost(c.memory_mb, c.step_seconds, step_mad_seconds=0.1 * c.step_seconds)
             for k, c in table.items()}  # fmt: skip
    assert step_time_problem(noisy, L, 5) is None


def test_steps_that_spread_widely_are_no_profile() -> None:
    table = {k: Cost(c.memory_mb, c.step_seconds, step_mad_seconds=0.3 * c.step_seconds)
             for k, c in coherent().items()}  # fmt: skip
    problem = step_time_problem(table, L, 5)
    assert problem is not None and "the timed steps spread 30% of the step" in problem


def test_the_json_keeps_the_spread_and_reads_a_version_1_file_as_measured_then() -> None:
    profile = CostProfile({"k": 1}, L, coherent(), [1000] * L, 500, probe_steps=5)
    again = CostProfile.from_json(profile.to_json())
    assert again.table == profile.table and again.version == 2
    old = profile.to_json() | {"version": 1}
    for k in ("memory_measure", "warmup_steps", "step_time_problem"):
        del old[k]
    v1 = CostProfile.from_json(old)
    assert (v1.version, v1.memory_measure, v1.warmup_steps) == (1, "meter", 1)
    with pytest.raises(ValueError, match="profile version 3"):
        CostProfile.from_json(profile.to_json() | {"version": 3})


@pytest.mark.parametrize(
    ("kind", "replacement"),
    [("cost", 'budget_kind = "step-seconds"'), ("memory", 'budget_kind = "memory-mb"')],
)
def test_the_retired_relative_tiers_name_what_replaces_them(kind: str, replacement: str) -> None:
    from fedhello.core.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [f'clients.tier-kind="{kind}"', "clients.tiers=[0.7, 1.0]"])
    line = str(err.value)
    assert "\n" not in line and f"clients.tier_kind = {kind!r} is retired" in line
    assert replacement in line and "measured" in line
