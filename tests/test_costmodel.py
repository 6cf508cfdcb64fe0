from __future__ import annotations

import pytest

from fedhello.core.budgets import client_budgets
from fedhello.core.costmodel import layers_for_cost, relative_activation_memory, relative_step_cost
from fedhello.core.errors import ConfigError


def test_cost_depends_on_the_lowest_trained_block() -> None:
    assert relative_step_cost([5], 6, beta=1.0) == pytest.approx(7 / 12)
    assert relative_step_cost(range(6), 6) == pytest.approx(1.0)
    assert relative_step_cost([0], 6) == pytest.approx(1.0)  # one shallow layer: full backward
    assert relative_step_cost([0, 5], 6) == relative_step_cost([0], 6)
    costs = [relative_step_cost([low], 6) for low in range(6)]
    assert costs == sorted(costs, reverse=True)
    assert relative_activation_memory([3, 4, 5], 6) == pytest.approx(0.5)
    assert relative_step_cost([], 6) == 0.0


def test_budget_as_cost_or_memory_gives_the_layer_count_that_fits() -> None:
    assert layers_for_cost(0.75, 6, beta=1.0) == 3  # (6 + k) / 12 <= 0.75
    assert layers_for_cost(1.0, 6) == 6
    assert layers_for_cost(0.5, 6) == 0
    # beta 0.65: top k costs (6 + 0.65 k) / 9.9: 1 layer 0.672, 3 layers 0.803, 6 layers 1.0
    assert client_budgets(6, 6, [0.7, 0.81, 1.0], kind="cost") == [1, 1, 3, 3, 6, 6]
    assert client_budgets(3, 12, [0.25, 0.5, 1.0], kind="memory") == [3, 6, 12]
    with pytest.raises(ConfigError, match=r"fits no layer of 6"):
        client_budgets(3, 6, [0.6], kind="cost")
