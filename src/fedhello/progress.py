"""The CLI's live display of a run (rich): rounds, clients, loss, accuracy, time left."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedhello.core.layers import AllocationPlan
from fedhello.engine.core import Observer
from fedhello.engine.experiment import Experiment
from fedhello.model.report import ClientResult


class RichObserver(Observer):
    """Renders engine events; a plain line per round when output is not a terminal (a log, a
    batch job, ``nohup``), which carries the run's elapsed time and the time left, as the bar
    would on a terminal.

    ``clock``: seconds on a monotonic clock (tests pass a fake one)."""

    def __init__(
        self, console: Console, rounds: int, done: int = 0, quiet: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.console = console
        self.quiet = quiet  # one line per run instead of per round (comparisons)
        self.rounds = rounds
        self.done = done  # rounds finished before a resume (its first round says which)
        self._first_round: int | None = None
        self.clock = clock
        self._started: float | None = None  # when this process's rounds began (on_start)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self._rounds_task: Any = None
        self._clients_task: Any = None

    def on_start(self, exp: Experiment) -> None:
        if not self.quiet:
            self.console.print(
                f"{exp.cfg.model.name} ({exp.task.name}, {exp.num_layers} LoRA layers) on "
                f"{exp.cfg.data.name}: {len(exp.budgets)} clients, budgets {exp.budgets}, "
                f"strategy {exp.cfg.allocation.strategy}, partition {exp.cfg.data.partition}"
            )
        self._started = self.clock()
        self.progress.start()
        self._rounds_task = self.progress.add_task(
            "rounds", total=self.rounds, completed=self.done, status=""
        )
        self._clients_task = self.progress.add_task("clients", total=1, status="")

    def on_round_start(self, round_: int, plan: AllocationPlan) -> None:
        if self._first_round is None:  # a resume starts after its checkpoint, which may be
            self._first_round = round_  # older than the metrics written (checkpoint-every)
            if round_ - 1 != self.done:
                self.progress.update(self._rounds_task, completed=round_ - 1)
            self.done = round_ - 1
        active = sum(1 for c in plan.clients if c.layers)
        self.progress.reset(self._clients_task, total=max(1, active), status="")

    def on_client_end(self, round_: int, result: ClientResult) -> None:
        u = result.update
        self.progress.update(
            self._clients_task,
            advance=1,
            status=f"client {u.client} layers {list(u.layers)} loss {u.train_loss:.3f}",
        )

    def on_round_end(self, record: dict[str, Any]) -> None:
        loss = record.get("train_loss")
        line = (
            f"round {record['round']}/{self.rounds}  loss "
            f"{'-' if loss is None else f'{loss:.3f}'}  {round_score(record)}  coverage "
            f"{record['coverage']}"
            + (f"  rejected {record['num_rejected']}" if record["num_rejected"] else "")
        )
        self.progress.update(self._rounds_task, advance=1, status=line.split("  ", 1)[1])
        if not self.quiet or record["round"] == self.rounds:
            self.progress.console.print(line + self._timing(record["round"]))

    def _timing(self, round_: int) -> str:
        """``  elapsed 0:03:12, ~5 min left``: this process's time since the run started, and
        the rounds still to run at the mean round time so far (the rounds before a resume
        ran in another process: they count neither way). The first round's mean includes
        the setup before it (the proxy set, FedNCM's head), so an early estimate errs long."""
        if self._started is None:
            return ""
        elapsed = self.clock() - self._started
        text = f"  elapsed {clock_time(elapsed)}"
        ran, left = round_ - self.done, self.rounds - round_
        if ran > 0 and left > 0:
            text += f", {about(elapsed / ran * left)} left"
        return text

    def on_final_eval(self) -> None:
        self.progress.stop()
        if not self.quiet:
            self.console.print("evaluating the global model on the whole test split ...")


def clock_time(seconds: float) -> str:
    """``h:mm:ss``, as rich's time columns write it."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def about(seconds: float) -> str:
    """An estimate, rounded to what it can promise: ``~40 s`` (to 10 s), ``~7 min`` (to the
    minute), ``~2 h 10 min`` (to 10 minutes)."""
    if seconds < 55:
        return f"~{max(10, round(seconds / 10) * 10)} s"
    if seconds < 3570:
        return f"~{max(1, round(seconds / 60))} min"
    tens = round(seconds / 600)  # tens of minutes
    hours, minutes = divmod(tens * 10, 60)
    return f"~{hours} h" + (f" {minutes} min" if minutes else "")


def round_score(record: dict[str, Any]) -> str:
    """The round's headline score: a classifier's test accuracy, a language model's test
    perplexity (and ROUGE-L in the rounds it generates); "-" in a round without evaluation."""
    if "test_perplexity" in record:
        rouge = record.get("test_rouge_l")
        return f"test ppl {record['test_perplexity']:.2f}" + (
            "" if rouge is None else f"  ROUGE-L {rouge:.3f}"
        )
    accuracy = record.get("test_accuracy")
    if accuracy is None:  # a round without evaluation (federation.eval_every), any task
        return "test -"
    return f"test acc {accuracy:.3f}"


def score_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's scores as table rows: accuracy for a classifier; for a causal language
    model perplexity, and ROUGE-L and exact match beside the base model's zero-shot ones."""
    if "test_perplexity" in summary:
        rows = [
            ("test perplexity",
             f"{summary['test_perplexity']:.3f} ({summary['test_examples']} examples)"),
            ("test ROUGE-L", f"{summary['test_rouge_l']:.4f} "
             f"({summary['generated_examples']} answers; zero-shot "
             f"{summary['zero_shot_rouge_l']:.4f})"),
            ("test exact match", f"{summary['test_exact_match']:.4f} "
             f"(zero-shot {summary['zero_shot_exact_match']:.4f})"),
        ]  # fmt: skip
        return rows
    return [
        ("test accuracy", f"{summary['test_accuracy']:.4f} ({summary['test_examples']} examples)"),
        ("test macro-F1", f"{summary['test_macro_f1']:.4f}"),
        ("chance level", f"{1 / summary['num_classes']:.4f}"),
    ]


def client_compute(summary: dict[str, Any]) -> str:
    """The clients' wall seconds and, where measured, their CPU seconds (which a paused or
    starved process does not inflate)."""
    wall = f"{summary['client_seconds']:.1f} s"
    cpu = summary.get("client_cpu_seconds")
    return wall if cpu is None else f"{wall} ({cpu:.1f} s of CPU)"


def summary_table(summary: dict[str, Any], run_dir: str) -> Table:
    table = Table(title=f"run {run_dir}", show_header=False)
    rows = [
        ("strategy", summary["strategy"]),
        *score_rows(summary),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("client compute", client_compute(summary)),
        (
            "bytes up / down",
            f"{summary['bytes_up'] / 1e6:.1f} MB / {summary['bytes_down'] / 1e6:.1f} MB",
        ),
        ("rejected updates", str(summary["rejected_updates"])),
    ]
    if "precision" in summary:  # runs finished before fedhello had devices lack it
        rows.insert(1, ("device / precision", f"{summary['device']} / {summary['precision']}"))
    for k, v in rows:
        table.add_row(k, v)
    return table
