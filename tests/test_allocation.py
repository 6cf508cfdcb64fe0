"""Allocation strategies: golden tables, properties, sampler statistics, k-means mapping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from fedhello.core.allocation import build_strategy, strategy_class, strategy_names
from fedhello.core.allocation.fed_hello import cluster_levels
from fedhello.core.allocation.randomized_geometric import draw_layers
from fedhello.core.allocation.shapes import (
    AUTHORS_BOTTLENECK_12,
    SHAPES,
    capped_targets,
    inclusion_probabilities,
    shape_weights,
    systematic_sample,
)
from fedhello.core.errors import ConfigError

BUDGET_RESPECTING = ["geometric", "randomized-geometric", "fedra", "fisher", "fed-hello"]


def make(name: str, num_layers: int, budgets: list[int], seed: int, **options: object):
    """The strategy with those of ``options`` that it declares (fedra has no shape)."""
    own = strategy_class(name).Options.model_fields
    return build_strategy(
        name, num_layers, budgets, seed, **{k: v for k, v in options.items() if k in own}
    )


GOLDEN_8 = {  # 8 layers, budgets 2 / 4 / 6
    "triangle": [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]],
    "inverted-triangle": [[6, 7], [4, 5, 6, 7], [2, 3, 4, 5, 6, 7]],
    "bottleneck": [[0, 7], [0, 1, 6, 7], [0, 1, 2, 5, 6, 7]],
    "uniform": [[0, 1], [2, 3, 4, 5], [0, 1, 2, 3, 6, 7]],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_geometric_golden_tables(shape: str) -> None:
    strategy = make("geometric", 8, [2, 4, 6], 0, shape=shape)
    for round_ in (1, 7):  # fixed across rounds
        plan = strategy.allocate(round_, [0, 1, 2])
        assert [list(a.layers) for a in plan.clients] == GOLDEN_8[shape]


def test_geometric_uniform_covers_every_layer_equally_up_to_one() -> None:
    budgets = [3, 3, 3, 3, 5, 5, 5, 5, 6, 6, 6, 6]
    plan = make("geometric", 6, budgets, 0, shape="uniform").allocate(1, range(12))
    assert max(plan.coverage()) - min(plan.coverage()) <= 1


def test_geometric_triangle_and_inverted_triangle_are_mirror_images() -> None:
    budgets = [2, 3, 5, 7, 8]
    cov = {
        shape: make("geometric", 8, budgets, 0, shape=shape).allocate(1, range(5)).coverage()
        for shape in ("triangle", "inverted-triangle")
    }
    assert cov["triangle"] == cov["inverted-triangle"][::-1]
    assert cov["triangle"] == sorted(cov["triangle"], reverse=True)  # widest at the shallow end


def test_shapes() -> None:
    np.testing.assert_allclose(shape_weights("bottleneck", 12), AUTHORS_BOTTLENECK_12)
    for L in (1, 2, 5, 6, 12, 24):
        for shape in SHAPES:
            w = shape_weights(shape, L)
            assert len(w) == L and (w > 0).all() and w.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(
            shape_weights("triangle", L), shape_weights("inverted-triangle", L)[::-1]
        )
    b = shape_weights("bottleneck", 6)
    assert b[0] > b[1] > b[2] and np.allclose(b, b[::-1])  # wide ends, thin middle


@settings(max_examples=60, deadline=None)
@given(
    strategy=st.sampled_from(BUDGET_RESPECTING),
    shape=st.sampled_from(SHAPES),
    sampler=st.sampled_from(["exact", "numpy"]),
    num_layers=st.integers(1, 16),
    budgets=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    seed=st.integers(0, 2**31),
    round_=st.integers(1, 50),
    with_scores=st.booleans(),
)
def test_every_allocation_has_exactly_min_budget_layers_distinct_in_range(
    strategy: str, shape: str, sampler: str, num_layers: int, budgets: list[int], seed: int,
    round_: int, with_scores: bool,
) -> None:  # fmt: skip
    s = make(strategy, num_layers, budgets, seed, shape=shape, sampler=sampler)
    if with_scores and s.uses_fisher:
        s.observe_scores(1, np.random.default_rng(seed).random(num_layers).tolist())
    plan = s.allocate(round_, range(len(budgets)))
    for alloc, budget in zip(plan.clients, budgets, strict=True):
        assert len(alloc.layers) == min(budget, num_layers)
        assert len(set(alloc.layers)) == len(alloc.layers)
        assert all(0 <= x < num_layers for x in alloc.layers)
    again = make(strategy, num_layers, budgets, seed, shape=shape, sampler=sampler)
    if with_scores and again.uses_fisher:
        again.observe_scores(1, np.random.default_rng(seed).random(num_layers).tolist())
    assert again.allocate(round_, range(len(budgets))) == plan  # same (seed, round) replays


@pytest.mark.parametrize("strategy", ["randomized-geometric", "fedra", "fed-hello"])
def test_different_seeds_give_different_allocations(strategy: str) -> None:
    plans = [make(strategy, 12, [6] * 10, seed).allocate(1, range(10)) for seed in (0, 1)]
    assert plans[0] != plans[1]


def test_baselines() -> None:
    budgets = [3, 3, 5, 6]
    full = make("full", 6, budgets, 0).allocate(1, range(4))
    assert all(a.layers == tuple(range(6)) for a in full.clients)
    excl = make("exclusive", 6, budgets, 0).allocate(1, range(4))
    assert [a.layers for a in excl.clients] == [(), (), (), tuple(range(6))]
    strag = make("straggler", 6, budgets, 0).allocate(1, range(4))
    assert all(a.layers == (3, 4, 5) for a in strag.clients)


def test_inclusion_probabilities_cap_and_redistribute() -> None:
    pi = inclusion_probabilities(AUTHORS_BOTTLENECK_12, 9)
    np.testing.assert_allclose(pi, AUTHORS_BOTTLENECK_12 * 9, atol=1e-12)  # 1, 2/3, 1/3
    pi = inclusion_probabilities(np.array([0.7, 0.1, 0.1, 0.1]), 2)
    np.testing.assert_allclose(pi, [1.0, 1 / 3, 1 / 3, 1 / 3])
    assert pi.sum() == pytest.approx(2)


def test_exact_sampler_hits_targets_while_numpy_draw_is_flatter() -> None:
    """12-layer bottleneck, budget 9: middle layers should be drawn with probability 1/3."""
    w = AUTHORS_BOTTLENECK_12
    target = inclusion_probabilities(w, 9)
    draws = 20000
    freq = {"exact": np.zeros(12), "numpy": np.zeros(12)}
    for sampler in freq:
        rng = np.random.default_rng(123)
        for _ in range(draws):
            freq[sampler][draw_layers(w, 9, sampler, rng)] += 1
        freq[sampler] /= draws
    # binomial std at p=1/3 over 20000 draws is 0.0033: 0.015 is > 4 sigma
    np.testing.assert_allclose(freq["exact"], target, atol=0.015)
    middle = [5, 6, 7]
    assert freq["numpy"][middle].mean() > target[middle].mean() + 0.1  # ~0.5 instead of 1/3
    assert np.abs(freq["numpy"] - target).max() > 0.1


@pytest.mark.parametrize(
    "num_layers,budgets",
    [(6, [3] * 4 + [5] * 4 + [6] * 4), (8, [2] * 4 + [4] * 4 + [6] * 4),
     (12, [6] * 4 + [9] * 4 + [12] * 4), (12, [6] * 33 + [9] * 33 + [12] * 34),
     (6, [1] * 6 + [3] * 3 + [6])],
)  # fmt: skip
def test_geometric_bottleneck_is_within_one_slot_of_its_target(
    num_layers: int, budgets: list[int]
) -> None:
    """The target: the shape's share of all layer-slots, held between what the clients force
    and allow (at 6 layers with 3/5/6 the end layers' uncapped share, 14 of 56 slots, exceeds
    12 clients; 34 full-budget clients of 100 train every middle layer).
    Half from each end gave [12, 12, 8, 4, 8, 12] there against [12, 10.7, 5.3, 5.3, 10.7, 12]."""
    strategy = make("geometric", num_layers, budgets, 0, shape="bottleneck")
    plan = strategy.allocate(1, range(len(budgets)))
    target = capped_targets(shape_weights("bottleneck", num_layers), budgets)
    assert np.abs(np.asarray(plan.coverage()) - target).max() <= 1 + 1e-9
    assert [len(a.layers) for a in plan.clients] == [min(b, num_layers) for b in budgets]
    assert strategy.allocate(9, range(len(budgets))) == plan.__class__(
        round=9, num_layers=num_layers, clients=plan.clients
    )  # fixed across rounds
    if num_layers == 12 and len(budgets) == 12:  # the authors' vector, exactly
        cover = np.asarray(plan.coverage())
        np.testing.assert_allclose(cover / cover.sum(), AUTHORS_BOTTLENECK_12)


@pytest.mark.parametrize("sampler", ["exact", "numpy"])
def test_logged_expected_coverage_is_the_realized_mean(sampler: str) -> None:
    """Over many rounds the realized coverage averages to the logged expectation, for the
    sampler actually used (the numpy sampler's expectation was logged as the exact one's:
    middle layers 6.22 logged, ~7.0 realized, at 12 layers 6/9/12)."""
    budgets = [6] * 4 + [9] * 4 + [12] * 4
    strategy = make("randomized-geometric", 12, budgets, 0, shape="bottleneck", sampler=sampler)
    rounds = 3000
    total = np.zeros(12)
    for r in range(1, rounds + 1):
        total += strategy.allocate(r, range(12)).coverage()
    expected = np.asarray(strategy.expected_coverage(1, range(12)))
    # per-round coverage of a layer has std <= 1.5: the mean of 3000 rounds has se < 0.03
    np.testing.assert_allclose(total / rounds, expected, atol=0.12)


def test_pure_fisher_logs_its_top_n_allocation_as_target_and_expectation() -> None:
    budgets = [2] * 3 + [4] * 3
    s = make("fisher", 6, budgets, 0)
    prior_target = s.target()
    s.observe_scores(3, [0.1, 9.0, 0.2, 5.0, 0.3, 7.0])
    plan = s.allocate(4, range(6))
    assert s.expected_coverage(4, range(6)) == [float(c) for c in plan.coverage()]
    assert plan.coverage() == [0, 6, 0, 3, 3, 6]  # top-2: {1, 5}; top-4: {1, 3, 4, 5}
    np.testing.assert_allclose(s.target(), np.asarray(plan.coverage()) / 18)
    assert s.target() != prior_target


def test_systematic_sample_returns_exactly_n_distinct() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.random(10) + 0.01
        n = int(rng.integers(1, 10))
        layers = systematic_sample(inclusion_probabilities(w, n), rng)
        assert len(layers) == n == len(set(layers))


@pytest.mark.parametrize("seed", range(8))
def test_kmeans_puts_the_highest_scores_on_the_highest_level(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(100, 1, 4), rng.normal(50, 1, 4), rng.normal(1, 0.1, 4)])
    perm = rng.permutation(12)
    levels = cluster_levels(scores[perm], [1 / 9, 2 / 27, 1 / 27], seed=seed)
    expected = np.array([1 / 9] * 4 + [2 / 27] * 4 + [1 / 27] * 4)[perm]
    np.testing.assert_allclose(levels, expected)


def test_fed_hello_uses_prior_until_scores_then_fisher_weights() -> None:
    s = make("fed-hello", 6, [3] * 4, 0, fisher_warmup=2, fisher_every=5)
    assert [r for r in range(1, 15) if s.needs_scores(r)] == [3, 8, 13]
    np.testing.assert_allclose(s.weights(1), shape_weights("bottleneck", 6))
    s.observe_scores(3, [0.1, 0.1, 5.0, 5.0, 9.0, 9.0])
    w = s.weights(4)
    assert w[4] > w[2] > w[0]
    state = s.state_dict()
    other = make("fed-hello", 6, [3] * 4, 0)
    other.load_state_dict(state)
    assert other.allocate(4, range(4)) == s.allocate(4, range(4))


@pytest.mark.parametrize("name", ["fisher", "fed-hello"])
def test_a_checkpoint_without_strategy_state_loads_as_no_scores_yet(name: str) -> None:
    s = make(name, 6, [3] * 4, 0)
    s.load_state_dict({})
    assert s.layer_scores() is None
    assert s.allocate(1, range(4)) == make(name, 6, [3] * 4, 0).allocate(1, range(4))


def test_pure_fisher_gives_top_scoring_layers() -> None:
    s = make("fisher", 6, [2, 4], 0)
    s.observe_scores(3, [0.5, 0.1, 0.9, 0.3, 0.8, 0.2])
    plan = s.allocate(3, [0, 1])
    assert [a.layers for a in plan.clients] == [(2, 4), (0, 2, 3, 4)]


def test_every_strategy_is_registered() -> None:
    assert set(strategy_names()) == {
        "full", "exclusive", "straggler", "fedra", "geometric", "randomized-geometric",
        "fisher", "fed-hello", "deepest-fit", "hetlora", "flexlora", "ffa-lora",
    }  # fmt: skip


def test_a_strategy_is_built_in_python_without_a_config() -> None:
    s = build_strategy("geometric", num_layers=8, budgets=[2, 4, 6], seed=0, shape="uniform")
    assert [list(a.layers) for a in s.allocate(1, [0, 1, 2]).clients] == GOLDEN_8["uniform"]
    with pytest.raises(ConfigError, match=r"strategy 'geometric' has no option 'sampler'"):
        build_strategy("geometric", 8, [2, 4, 6], sampler="exact")
    with pytest.raises(ConfigError, match=r"allocation.shape = 'round'"):
        build_strategy("geometric", 8, [2, 4, 6], shape="round")
    with pytest.raises(
        ConfigError, match=r"unknown strategy; choose one of: deepest-fit, exclusive"
    ):
        build_strategy("nope", 8, [2])


def test_capabilities_come_from_the_classes() -> None:
    fisher_based = {n for n in strategy_names() if strategy_class(n).uses_fisher}
    assert fisher_based == {"fisher", "fed-hello"}
    geometric = make("geometric", 6, [3], 0)
    assert geometric.expected_coverage(1, [0]) is None and not geometric.needs_scores(5)
    assert geometric.layer_scores() is None and geometric.layer_probabilities(1) is None
    with pytest.raises(TypeError, match="does not use Fisher scores"):
        geometric.observe_scores(1, [1.0] * 6)
    assert make("fedra", 6, [3, 6], 0).expected_coverage(1, [0, 1]) == pytest.approx([1.5] * 6)


def test_a_user_strategy_registers_and_runs_through_the_config() -> None:
    from fedhello.core.allocation import AllocationStrategy, StrategyOptions, register
    from fedhello.core.budgets import strategy_for
    from fedhello.core.config import load_config

    class TopOptions(StrategyOptions):
        skip_top: int = Field(0, ge=0, description="deepest layers to leave out")

    @register
    class TopDown(AllocationStrategy):
        name = "test-top-down"
        Options = TopOptions
        options: TopOptions

        def layers_for(self, round: int, client: int) -> list[int]:
            top = self.num_layers - self.options.skip_top
            return list(range(max(0, top - self.budgets[client]), top))

    try:
        cfg = load_config(None, ["allocation.strategy=test-top-down", "allocation.skip-top=1"])
        plan = strategy_for(cfg, 6).allocate(1, [0, 8])
        assert [a.layers for a in plan.clients] == [(2, 3, 4), (0, 1, 2, 3, 4)]
        with pytest.raises(ConfigError, match=r"allocation.skip_top = -1"):
            load_config(None, ["allocation.strategy=test-top-down", "allocation.skip-top=-1"])
    finally:
        from fedhello.core.allocation import base

        base._REGISTRY.pop("test-top-down")
