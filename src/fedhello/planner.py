"""``fedhello plan``: the allocation alone, before spending compute on training.

Non-Fisher strategies with layer budgets and no limits need neither torch nor the model
weights: the layer count comes from the model's ``config.json``. Fisher-based strategies build the
experiment and score the initial global adapter at their refresh rounds (in a real run the
scores come from the trained one), except for a hub model, which is not downloaded to plan:
there the Fisher rounds show the prior shape, and the plan says so. Limits in real units build
it for the cost profile (stored, or measured once) and show every set as the fit policy leaves
it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedhello.core.allocation import strategy_class
from fedhello.core.budgets import strategy_for
from fedhello.core.config import Config
from fedhello.core.heads import AUTO, auto_head, head_mode
from fedhello.core.privacy.server import PrivateAggregator, expected_layer_counts, json_number
from fedhello.core.schedule import sample_clients
from fedhello.model.source import model_shape, resolve_model_source


def make_plan(cfg: Config, rounds: int | None = None) -> dict[str, Any]:
    """Every round's allocation as plain data (the ``--json`` output). A ``target-epsilon``
    that stops the run early stops the plan at the same round (``fedhello.engine.privacy``:
    the run is then that many rounds long), so that its rounds and its per-layer noise are
    those of the run."""
    configured = cfg.federation.rounds
    private: PrivateAggregator | None = None
    last = configured
    if cfg.privacy.enabled:  # refused here, as by ``fedhello run``, if round 1 exceeds it
        from fedhello.engine.privacy import shortened, start

        private, last = start(cfg)
        cfg = shortened(cfg, last)
    rounds = rounds or cfg.federation.rounds
    if last < configured:
        rounds = min(rounds, last)  # the budget's last round: the run trains none after it
    uses_fisher = strategy_class(cfg.allocation.strategy).uses_fisher
    limited = cfg.clients.real_limits or cfg.clients.upload_mb is not None
    exp = None
    source = resolve_model_source(cfg.model.name, cfg.model.allow_download)
    # a hub model is not downloaded to plan: its Fisher rounds show the prior shape
    on_hub = not Path(source).exists()
    scores_from = None
    if uses_fisher:
        scores_from = (
            "none: a hub model, Fisher rounds show the prior" if on_hub else "initial adapter"
        )
    # scores need the model and the proxy data, limits the cost profile: torch from here on
    if (uses_fisher and not on_hub) or limited:
        from fedhello.engine.experiment import build_experiment

        exp = build_experiment(cfg)
        strategy, num_layers = exp.strategy, exp.num_layers
    else:
        num_layers = model_shape(source, cfg.model.task)[1]
        strategy = strategy_for(cfg, num_layers)
    out_rounds = []
    coverage = np.zeros(num_layers, dtype=np.int64)
    expected: np.ndarray | None = np.zeros(num_layers)
    for r in range(1, rounds + 1):
        sampled = sample_clients(cfg.run.seed, r, cfg.clients.num_clients, cfg.clients.per_round)
        entry: dict[str, Any] = {"round": r}
        if exp is not None:
            entry |= exp.refresh_fisher(r, exp.init_state)
        plan = exp.allocate(r, sampled) if exp is not None else strategy.allocate(r, sampled)
        coverage += np.asarray(plan.coverage())
        step = strategy.expected_coverage(r, sampled)
        expected = None if expected is None or step is None else expected + np.asarray(step)
        entry["clients"] = [a.as_dict() for a in plan.clients]
        entry["coverage"] = plan.coverage()
        if private is not None:  # DP's public denominators: every client's allocation
            everyone = range(cfg.clients.num_clients)
            population = exp.allocate_everyone(r) if exp else strategy.allocate(r, everyone)
            entry["dp_contributors"] = expected_layer_counts(population, cfg.clients.per_round)
        out_rounds.append(entry)
    target = strategy.target()
    privacy = privacy_plan(cfg, private, last, configured, out_rounds, num_layers)
    return {
        "strategy": cfg.allocation.strategy,
        "shape": cfg.allocation.options.model_dump().get("shape"),
        "num_layers": num_layers,
        "budgets": strategy.budgets,
        "rounds": out_rounds,
        "coverage": coverage.tolist(),
        "target": target,
        # randomized strategies: expected coverage given the budgets (a full-budget client
        # trains every layer whatever the shape, so the shape is the target of the rest)
        "expected_coverage": None if expected is None else np.round(expected, 4).tolist(),
        "fisher_scores_from": scores_from,
        **({"privacy": privacy} if privacy else {}),
    }


def privacy_plan(
    cfg: Config,
    private: PrivateAggregator | None,
    last: int,
    configured: int,
    rounds: list[dict[str, Any]],
    num_layers: int,
) -> dict[str, Any] | None:
    """What a DP configuration would spend (None without ``[privacy]``): epsilon at delta after
    each planned round and at the end, and per layer the noise on its mean in units of the
    clip norm, ``z / expected contributors`` (every client's allocation, whoever is sampled:
    ``expected_layer_counts``), averaged over the rounds that train it (the head last).
    Each round's entry gets its ``epsilon``. ``cfg`` is the run as ``start`` and ``shortened``
    make it (``last`` rounds long, ``rounds`` none after it); ``configured``: the rounds the
    config asked for."""
    if private is None:
        return None
    z, t = private.update_multiplier, cfg.train
    noise: list[list[float]] = [[] for _ in range(num_layers + 1)]
    # auto under DP: the averaged head whatever the task (the one rule, auto_head)
    policy = auto_head(True, private=True)[0] if t.head == AUTO else t.head
    for entry in rounds:
        *layers, trainers = entry["dp_contributors"]
        for layer, count in enumerate(layers):
            if count:
                noise[layer].append(z / count)
        head = head_mode(policy, entry["round"], last, t.finetune_rounds(last))
        if trainers and head == "federated":  # a frozen or local head is neither sent nor noised
            noise[num_layers].append(z / trainers)
        entry["epsilon"] = json_number(private.accounting.epsilon(min(entry["round"], last)))
    return {
        "epsilon": json_number(private.accounting.epsilon(last)),
        "delta": private.accounting.delta,
        "rounds_trained": last,
        "rounds_configured": configured,
        "noise_multiplier": cfg.privacy.noise_multiplier,
        "noise": cfg.privacy.noise,
        "update_noise_multiplier": z,
        "sampling": f"{cfg.clients.per_round} of {cfg.clients.num_clients} clients per round, "
        "without replacement (replace-one adjacency)",
        "noise_on_mean_per_layer": [round(float(np.mean(v)), 4) if v else None for v in noise],
    }


# more layers than this: each client's layers as one strip of characters, not a column each
STRIP_ABOVE = 16


def render_plan(plan: dict[str, Any], console: Any, show_rounds: int = 3) -> None:
    """Readable tables: the first rounds' layer sets, then coverage against the target."""
    from rich.table import Table

    L = plan["num_layers"]
    for entry in plan["rounds"][:show_rounds]:
        table = Table(title=f"round {entry['round']}: who trains which layer (shallow -> deep)")
        ranked = any("rank" in c for c in entry["clients"])  # rank methods: a rank column
        table.add_column("client", justify="right")
        table.add_column("budget", justify="right")
        if ranked:
            table.add_column("rank", justify="right")
        # a deep model (a decoder's 30 blocks) gets one strip per client, one character a layer
        strip = L > STRIP_ABOVE
        if strip:
            table.add_column(f"layers 0..{L - 1}", justify="left", no_wrap=True)
        else:
            for i in range(L):
                table.add_column(str(i), justify="center")
        for c in entry["clients"]:
            # x: trains the layer (b: its B factor alone, FFA-LoRA), .: does not
            mark = "b" if c.get("factors") == "B" else "x"
            marks = [mark if i in c["layers"] else "." for i in range(L)]
            rank = [str(c.get("rank", "-"))] if ranked else []
            table.add_row(str(c["client"]), str(c["budget"]), *rank,
                          *(["".join(marks)] if strip else marks))  # fmt: skip
        cover = [str(n) if n < 10 else "+" for n in entry["coverage"]] if strip else None
        table.add_row("", "cover", *([""] if ranked else []),
                      *(["".join(cover)] if cover else map(str, entry["coverage"])))  # fmt: skip
        console.print(table)
    if len(plan["rounds"]) > show_rounds:
        console.print(f"... {len(plan['rounds']) - show_rounds} more rounds (--json for all)")
    total = max(1, sum(plan["coverage"]))
    table = Table(title=f"{plan['strategy']}: coverage over {len(plan['rounds'])} rounds")
    for col in ("layer", "clients", "expected", "realized share", "shape share"):
        table.add_column(col, justify="right")
    target = plan["target"] or [None] * L
    expected = plan["expected_coverage"] or [None] * L
    for i in range(L):
        t = "-" if target[i] is None else f"{target[i]:.3f}"
        e = "-" if expected[i] is None else f"{expected[i]:.1f}"
        cov = plan["coverage"][i]
        table.add_row(str(i), str(cov), e, f"{cov / total:.3f}", t)
    console.print(table)
    dp = plan.get("privacy")
    if dp:
        console.print(privacy_text(dp, plan["rounds"]))
    if (plan.get("fisher_scores_from") or "").startswith("none"):
        console.print(
            "Fisher scores need the model's weights, which are not downloaded to plan: the "
            "Fisher rounds above show the prior shape (plan with a local copy to see them)."
        )


def _eps(value: float | None) -> str:
    return "infinite (no noise)" if value is None else f"{value:.3f}"


def privacy_text(dp: dict[str, Any], rounds: list[dict[str, Any]]) -> str:
    """What ``render_plan`` says of DP: the epsilon after the planned rounds (``--rounds`` may
    plan fewer than the run trains: then also the run's), after each planned round, and the
    noise on each layer's mean."""
    planned, trained, configured = len(rounds), dp["rounds_trained"], dp["rounds_configured"]
    per_round = [r.get("epsilon") for r in rounds]
    if planned < trained:  # --rounds planned fewer than the run trains
        stops = f"; privacy.target_epsilon stops it there, of {configured}"
        run = f" (the run's {trained} rounds spend {_eps(dp['epsilon'])}"
        run += f"{stops if trained < configured else ''})"
    elif trained < configured:
        run = f" (privacy.target_epsilon stops the run and this plan there, of {configured})"
    else:
        run = ""
    eps = per_round[-1] if per_round else dp["epsilon"]
    each = ", ".join("inf" if e is None else f"{e:.3f}" for e in per_round)
    return (
        f"client-level DP: epsilon {_eps(eps)} at delta {dp['delta']:.3g} after {planned} "
        f"rounds{run} (noise multiplier {dp['noise_multiplier']:g}; {dp['sampling']}; "
        f"{dp['noise']} noise"
        + (
            ": the run samples from its own key, so its sites differ from the plan's"
            if dp["noise"] == "secret"
            else ""
        )
        + f"). Epsilon after each round: {each}. Noise on each layer's mean, in clip norms "
        "(z / contributors, mean over the planned rounds; the head last): "
        + ", ".join("-" if x is None else f"{x:.2f}" for x in dp["noise_on_mean_per_layer"])
    )
