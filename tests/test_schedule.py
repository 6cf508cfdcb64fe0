"""The server's schedule: learning rate per round, clients per round."""

from __future__ import annotations

import pytest

from fedhello.core.config import load_config
from fedhello.core.schedule import lr_at, sample_clients


def test_decays_end_where_they_say() -> None:
    assert lr_at(1, 15, 5e-3, "cosine", 0.1) == pytest.approx(5e-3)
    assert lr_at(8, 15, 5e-3, "cosine", 0.1) == pytest.approx(2.75e-3)
    assert lr_at(15, 15, 5e-3, "cosine", 0.1) == pytest.approx(5e-4)
    assert lr_at(15, 15, 5e-3, "linear", 0.1) == pytest.approx(5e-4)
    assert lr_at(9, 15, 5e-3, "constant", 0.1) == 5e-3


def test_exponential_is_the_authors_per_round_factor_applied_every_round() -> None:
    """x0.99 per round from 0.01: round r has 0.01 * 0.99^(r-1), whatever the run length
    (the authors' code decayed once, by an operator-precedence slip)."""
    assert lr_at(1, 500, 0.01, "exponential", 0.1, 0.99) == pytest.approx(0.01)
    assert lr_at(2, 500, 0.01, "exponential", 0.1, 0.99) == pytest.approx(0.0099)
    assert lr_at(500, 500, 0.01, "exponential", 0.1, 0.99) == pytest.approx(0.01 * 0.99**499)
    short, long = (lr_at(500, n, 0.01, "exponential", 0.1, 0.99) for n in (10, 500))
    assert short == long  # the run's length does not matter
    cfg = load_config(None, ['train.lr_schedule="exponential"', "train.lr_decay=0.95"])
    assert cfg.train.lr_decay == 0.95


def test_clients_of_a_round_depend_on_seed_and_round_only() -> None:
    assert sample_clients(0, 3, 12, 6) == sample_clients(0, 3, 12, 6)
    assert len(set(sample_clients(0, 3, 12, 6))) == 6
    assert any(sample_clients(0, r, 12, 6) != sample_clients(0, 3, 12, 6) for r in range(4, 9))
