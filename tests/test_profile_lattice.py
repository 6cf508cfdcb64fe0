"""A deep model's cost profile: the probe measures a lattice (every top placement, and a few
lowest blocks at counts 1, 2, 4, ...) instead of all L(L+1)/2 entries, and an entry it did not
measure is bounded by one it did that costs at least as much, so a limit checked against the
profile still holds."""

from __future__ import annotations

import itertools

import pytest

from fedhello.core.profile import FULL_TABLE_LAYERS, Cost, CostProfile, probe_entries


@pytest.mark.parametrize("L", [1, 6, FULL_TABLE_LAYERS])
def test_up_to_twelve_blocks_every_entry_is_measured(L: int) -> None:
    entries = probe_entries(L)
    assert entries == [(b, n) for b in range(L) for n in range(1, L - b + 1)]
    assert len(entries) == L * (L + 1) // 2


@pytest.mark.parametrize("L", [13, 30, 32, 80])
def test_a_deep_model_gets_the_top_placements_and_a_lattice(L: int) -> None:
    entries = probe_entries(L)
    assert len(set(entries)) == len(entries) < L * (L + 1) // 2
    assert all(0 <= b < L and 1 <= n <= L - b for b, n in entries)
    assert {(L - c, c) for c in range(1, L + 1)} <= set(entries)  # every top placement
    assert {(0, 1), (0, 2), (0, 4)} <= set(entries)  # the deepest row, narrow counts
    assert len(entries) <= 2 * L + 6 * (L.bit_length() + 1)
    if L == 30:
        assert len(entries) == 56


def _true_cost(L: int, b: int, n: int) -> Cost:
    """A monotone step cost: deeper backward and more layers cost more (not linear)."""
    depth = L - b
    return Cost(5 + 3.0 * depth + 0.2 * depth**1.5 + 2.0 * n, 0.1 * depth + 0.01 * n * n,
                300 + 4.0 * depth + 1.5 * n)  # fmt: skip


def test_every_unmeasured_entry_is_bounded_from_above_and_measured_ones_are_exact() -> None:
    L = 30
    measured = {e: _true_cost(L, *e) for e in probe_entries(L)}
    p = CostProfile({"k": 1}, L, measured, [1000] * L, 500, memory_measure="allocator")
    worst = 0.0
    for b in range(L):
        for n in range(1, L - b + 1):
            got, true = p.cost(range(b, b + n)), _true_cost(L, b, n)
            if (b, n) in measured:
                assert got == true
                continue
            assert not got.measured
            assert got.memory_mb >= true.memory_mb and got.step_seconds >= true.step_seconds
            assert got.device_peak_mb is not None and got.device_peak_mb >= true.device_peak_mb
            worst = max(worst, got.memory_mb / true.memory_mb)
    # a bound, not a guess: how loose it may be on this cost (the lattice keeps it near)
    assert 1.0 < worst < 1.5


def test_the_bound_is_the_least_of_the_entries_at_least_as_deep_and_wide() -> None:
    L = 20
    table = {(0, 20): Cost(100, 2.0), (0, 4): Cost(60, 1.0), (5, 8): Cost(50, 1.5),
             (5, 15): Cost(70, 1.2)}  # fmt: skip
    p = CostProfile({"k": 1}, L, table, [1] * L, 1)
    # (7, 3): dominated by (0, 4), (0, 20), (5, 8), (5, 15): least memory 50, least time 1.0
    got = p.cost(range(7, 10))
    assert (got.memory_mb, got.step_seconds, got.measured) == (50, 1.0, False)
    assert sorted(c.memory_mb for c in p.dominating(7, 3)) == [50, 60, 70, 100]
    # wider than any entry from that deep: only (0, 20) and (5, 15) bound (5, 9)
    assert p.cost(range(5, 14)).memory_mb == 70
    assert list(itertools.islice(p.dominating(19, 1), 5))  # everything bounds the top layer


def test_calibrate_shows_a_lattice_as_its_measured_entries() -> None:
    """A 30-block profile is shown as the list of its 56 entries, not a 30 x 30 grid."""
    from rich.console import Console

    from fedhello.calibration import render_profile

    L = 30
    p = CostProfile({"model": "m", "device": "cpu", "precision": "bf16",
                     "base_precision": "fp32", "batch_size": 16, "max_length": 96}, L,
                    {e: _true_cost(L, *e) for e in probe_entries(L)}, [1000] * L, 500,
                    probe_steps=5, memory_measure="allocator")  # fmt: skip
    console = Console(record=True, width=200)
    render_profile({"profile": p.to_json(), "source": "measured", "path": "x.json",
                    "model_mb": 520.0, "spread": None, "allowances": []}, console)  # fmt: skip
    text = console.export_text()
    assert "the 56 measured entries" in text
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()
             if line.startswith("│")]  # fmt: skip
    rows = [c for c in cells if len(c) > 2 and c[1] == "16"]
    assert len(rows) == sum(1 for b, n in probe_entries(L) if n == 16)  # (0, 16), (5, 16) ...
    assert "lowest trained block x layers trained" not in text  # no grid
