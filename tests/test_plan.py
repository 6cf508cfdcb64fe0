from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedhello.core.allocation import strategy_names


def plan_json(*overrides: str, rounds: int = 4) -> tuple[dict, set[str]]:
    code = (
        "import json, sys\n"
        "from fedhello.cli import main\n"
        f"rc = main(['plan', '--json', '--rounds', '{rounds}'] + {list(overrides)!r})\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "print(json.dumps(sorted(heavy)), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), set(json.loads(proc.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "strategy", [s for s in strategy_names() if s not in ("fisher", "fed-hello")]
)
def test_plan_json_without_torch(strategy: str) -> None:
    plan, imported = plan_json("--set", f"allocation.strategy={strategy}")
    assert not imported, f"plan imported {sorted(imported)[:3]}"
    assert plan["strategy"] == strategy and plan["num_layers"] == 6
    assert [r["round"] for r in plan["rounds"]] == [1, 2, 3, 4]
    total = [0] * 6
    for r in plan["rounds"]:
        assert len(r["clients"]) == 6
        for c in r["clients"]:
            assert c["budget"] in (3, 5, 6)
            if strategy in ("hetlora", "flexlora"):  # every layer, at the budget's rank
                assert c["layers"] == list(range(6))
                assert c["rank"] == {3: 8, 5: 13, 6: 16}[c["budget"]]
            elif strategy not in ("full", "exclusive", "straggler"):
                assert len(c["layers"]) == c["budget"]
            for layer in c["layers"]:
                total[layer] += 1
    assert plan["coverage"] == total
    assert len(plan["target"]) == 6 and sum(plan["target"]) == pytest.approx(1.0)


def test_plan_same_clients_for_every_strategy() -> None:
    a, _ = plan_json("--set", "allocation.strategy=fedra")
    b, _ = plan_json("--set", "allocation.strategy=geometric")
    assert [[c["client"] for c in r["clients"]] for r in a["rounds"]] == [
        [c["client"] for c in r["clients"]] for r in b["rounds"]
    ]


def test_plan_unknown_strategy_lists_the_valid_names() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedhello.cli", "plan", "--set", "allocation.strategy=magic"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    for name in strategy_names():
        assert name in proc.stderr


def test_a_deep_model_s_plan_shows_one_strip_per_client() -> None:
    """30 blocks (a decoder): each client's layers in one column, one character a layer."""
    from rich.console import Console

    from fedhello.planner import render_plan

    clients = [{"client": 0, "budget": 8, "layers": list(range(22, 30))},
               {"client": 1, "budget": 30, "layers": list(range(30))}]  # fmt: skip
    coverage = [1] * 22 + [2] * 8
    plan = {"num_layers": 30, "strategy": "fedra", "rounds": [
        {"round": 1, "clients": clients, "coverage": coverage}], "coverage": coverage,
        "target": None, "expected_coverage": None}  # fmt: skip
    console = Console(record=True, width=120)
    render_plan(plan, console)
    text = console.export_text()
    assert "." * 22 + "x" * 8 in text and "x" * 30 in text
    assert "1" * 22 + "2" * 8 in text  # the coverage row, one digit a layer
