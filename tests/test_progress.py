"""``fedhello run``'s progress where stdout is no terminal (a log, a batch job, ``nohup``): one
plain line per round that says how long the run has taken and about how long it has left,
from the mean round time so far. Driven by a fake clock: no training."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

from rich.console import Console

from fedhello.progress import RichObserver, about, clock_time


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _record(round_: int) -> dict[str, Any]:
    return {"round": round_, "train_loss": 0.5, "test_accuracy": 0.75,
            "coverage": [1, 2, 3], "num_rejected": 0}  # fmt: skip


def _experiment() -> Any:
    return SimpleNamespace(
        cfg=SimpleNamespace(
            model=SimpleNamespace(name="tiny"), data=SimpleNamespace(name="d", partition="iid"),
            allocation=SimpleNamespace(strategy="fedra"),
        ),
        task=SimpleNamespace(name="text"), num_layers=2, budgets=[1, 2],
    )  # fmt: skip


def _lines(out: io.StringIO) -> list[str]:
    return [x for x in out.getvalue().splitlines() if x.startswith("round ")]


def test_a_logged_round_line_says_elapsed_and_about_how_long_is_left() -> None:
    out, clock = io.StringIO(), FakeClock()
    console = Console(file=out, force_terminal=False, width=200)
    assert not console.is_terminal  # the plain path: no live bar
    obs = RichObserver(console, rounds=10, clock=clock)
    obs.on_start(_experiment())
    clock.now += 95  # setup and round 1: 95 s; 9 rounds at 95 s left = 855 s ~ 14 min
    obs.on_round_end(_record(1))
    clock.now += 65  # 160 s over 2 rounds: 80 s a round; 8 left = 640 s ~ 11 min
    obs.on_round_end(_record(2))
    clock.now += 3600 * 2 + 40  # 7400 s over 3 rounds; 7 left = 17267 s = 4 h 47.8 min
    obs.on_round_end(_record(3))
    lines = _lines(out)
    assert len(lines) == 3  # still one line per round
    assert lines[0].startswith("round 1/10  loss 0.500  test acc 0.750  coverage [1, 2, 3]")
    assert lines[0].endswith("  elapsed 0:01:35, ~14 min left")
    assert lines[1].endswith("  elapsed 0:02:40, ~11 min left")
    assert lines[2].endswith("  elapsed 2:03:20, ~4 h 50 min left")


def test_a_resumed_run_estimates_from_its_own_rounds_and_the_last_round_has_none_left() -> None:
    out, clock = io.StringIO(), FakeClock()
    obs = RichObserver(Console(file=out, force_terminal=False, width=200), rounds=4, done=2,
                       clock=clock)  # fmt: skip
    obs.on_start(_experiment())
    clock.now += 42  # round 3 alone ran in this process: 1 left at 42 s
    obs.on_round_end(_record(3))
    clock.now += 40
    obs.on_round_end(_record(4))
    lines = _lines(out)
    assert lines[0].endswith("  elapsed 0:00:42, ~40 s left")
    assert lines[1].endswith("  elapsed 0:01:22")  # finished: nothing left to estimate


def test_a_quiet_comparison_cell_prints_its_last_round_with_its_time() -> None:
    out, clock = io.StringIO(), FakeClock()
    obs = RichObserver(Console(file=out, force_terminal=False, width=200), rounds=2,
                       quiet=True, clock=clock)  # fmt: skip
    obs.on_start(_experiment())
    for r in (1, 2):
        clock.now += 30
        obs.on_round_end(_record(r))
    assert _lines(out) == [
        "round 2/2  loss 0.500  test acc 0.750  coverage [1, 2, 3]  elapsed 0:01:00"
    ]


def test_estimates_are_rounded_to_what_they_can_promise() -> None:
    assert clock_time(0) == "0:00:00" and clock_time(3725.9) == "1:02:05"
    assert [about(s) for s in (3, 44, 54)] == ["~10 s", "~40 s", "~50 s"]
    assert [about(s) for s in (56, 90, 600, 3540)] == ["~1 min", "~2 min", "~10 min", "~59 min"]
    assert [about(s) for s in (3600, 5400, 7200 + 14 * 60)] == ["~1 h", "~1 h 30 min",
                                                                 "~2 h 10 min"]  # fmt: skip


def test_the_final_evaluation_stops_the_live_display_and_says_so() -> None:
    """On a terminal the per-round bar is a live display: it must be stopped when the rounds
    end (a stray module-level function had swallowed ``on_final_eval``, so it never was)."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    obs = RichObserver(console, rounds=2, clock=FakeClock())
    assert "on_final_eval" in vars(RichObserver)  # its own, not the base's no-op
    obs.on_start(_experiment())
    assert obs.progress.live.is_started
    obs.on_final_eval()
    assert not obs.progress.live.is_started
    assert "evaluating the global model on the whole test split" in out.getvalue()


def test_a_resume_from_an_older_checkpoint_counts_from_the_round_it_starts_at() -> None:
    """5 rounds in metrics.jsonl but the checkpoint of round 3 (checkpoint-every 3): the
    resumed process runs rounds 4-6 of 6, so after round 4 in 30 s two are left, ~1 min
    (counting from the 5 rows written, it said nothing: no round of its own yet)."""
    from fedhello.core.layers import AllocationPlan

    out, clock = io.StringIO(), FakeClock()
    obs = RichObserver(Console(file=out, force_terminal=False, width=200), rounds=6, done=5,
                       clock=clock)  # fmt: skip
    obs.on_start(_experiment())
    obs.on_round_start(4, AllocationPlan(4, 2, ()))
    clock.now += 30
    obs.on_round_end(_record(4))
    assert _lines(out)[0].endswith("  elapsed 0:00:30, ~1 min left")
