"""The CLI's live display of a run (rich): rounds, clients, loss, accuracy, time left."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedhello.core.layers import AllocationPlan
from fedhello.engine.core import Observer
from fedhello.engine.experiment import Experiment
from fedhello.model.report import ClientResult


class RichObserver(Observer):
    """Renders engine events; a plain line per round when output is not a terminal."""

    def __init__(self, console: Console, rounds: int, done: int = 0, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet  # one line per run instead of per round (comparisons)
        self.rounds = rounds
        self.done = done  # rounds finished before a resume
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
        self.progress.start()
        self._rounds_task = self.progress.add_task(
            "rounds", total=self.rounds, completed=self.done, status=""
        )
        self._clients_task = self.progress.add_task("clients", total=1, status="")

    def on_round_start(self, round_: int, plan: AllocationPlan) -> None:
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
            self.progress.console.print(line)

    def on_final_eval(self) -> None:
        self.progress.stop()
        if not self.quiet:
            self.console.print("evaluating the global model on the whole test split ...")


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


def summary_table(summary: dict[str, Any], run_dir: str) -> Table:
    table = Table(title=f"run {run_dir}", show_header=False)
    rows = [
        ("strategy", summary["strategy"]),
        *score_rows(summary),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("client compute", f"{summary['client_seconds']:.1f} s"),
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
