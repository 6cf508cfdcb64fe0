"""fedhello's one cost model: a measured profile, and the linear model fitted to it that fills
the entries a probe did not measure (pure python). The retired relative tiers are refused."""

from __future__ import annotations

import pytest

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


def test_unmeasured_sets_are_predicted_by_the_fit_and_cost_grows_with_depth() -> None:
    # a quick probe: the top block alone, the whole model, and one set in between
    measured = {(5, 1): linear(5, 1), (0, 6): linear(0, 6), (2, 2): linear(2, 2)}
    profile = CostProfile({"test": True}, L, dict(measured), [1000] * L, 500)
    assert profile.cost([5]) == measured[5, 1]  # a measured entry is used as it is
    filled = profile.cost([0])  # one shallow layer: not measured
    assert not filled.measured and filled.device_peak_mb is None
    assert filled.memory_mb == pytest.approx(linear(0, 1).memory_mb)
    assert filled.step_seconds == pytest.approx(linear(0, 1).step_seconds)
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
