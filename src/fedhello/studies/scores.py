"""What a comparison ranks runs by, per task kind: one :class:`Scoring` for classifiers
(accuracy) and one for generative tasks (``causal-lm``: ROUGE-L of greedy answers).

A classifier's round records accuracy on the fixed evaluation subsets, so the curves, the
last-5 mean and the validation-selected round all read accuracy. A language model's round
records the response-token loss on the same subsets every round, but ROUGE-L only in the
rounds it generated (every ``federation.generate-every`` rounds; generation is the costly
part), so its curves plot the loss, and its validation-selected score is the test ROUGE-L of
the *generated* round with the lowest validation loss: the validation split still chooses,
the test split is only read. The summary's ROUGE-L (the headline, paired between strategies)
is the final model's on the fixed generation subset, the same prompts for every strategy and
seed of a comparison.

Nothing here trains or needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedhello.core.errors import RunDirError

if TYPE_CHECKING:
    from fedhello.studies.results import RunData


@dataclass(frozen=True)
class Scoring:
    """How one task kind's runs are scored and compared."""

    kind: str  # "classification" | "generation"
    final: str  # summary key of the headline score: ranked, paired, plotted against cost
    label: str  # its name in tables, e.g. "acc" or "ROUGE-L"
    curve: str  # per-round key plotted over rounds
    curve_label: str  # its axis label
    curve_scale: float  # 100 for a fraction shown in percent, 1 for a loss
    select: str  # validation key that picks the val-selected round
    select_highest: bool  # accuracy: the highest; loss: the lowest

    def val_selected(self, records: list[dict[str, Any]]) -> tuple[int, float] | None:
        """(round, test score) of the round the validation split picks among the rounds that
        recorded the headline score; without validation scores, the last such round; None
        when no round recorded it (a generative run with ``generate-every = 0``)."""
        scored = [r for r in records if r.get(self.final) is not None]
        if not scored:
            return None
        judged = [r for r in scored if r.get(self.select) is not None]
        if not judged:
            return scored[-1]["round"], scored[-1][self.final]
        sign = 1 if self.select_highest else -1
        # ties go to the earliest round: the one that reached the score with the fewest steps
        best = max(judged, key=lambda r: (sign * r[self.select], -r["round"]))
        return best["round"], best[self.final]


ACCURACY = Scoring(
    kind="classification", final="test_accuracy", label="acc", curve="test_accuracy",
    curve_label="test accuracy (%)", curve_scale=100.0, select="val_accuracy",
    select_highest=True,
)  # fmt: skip
ROUGE_L = Scoring(
    kind="generation", final="test_rouge_l", label="ROUGE-L", curve="test_loss",
    curve_label="test loss (response tokens, nats)", curve_scale=1.0, select="val_loss",
    select_highest=False,
)  # fmt: skip


def scoring_of_summary(summary: dict[str, Any]) -> Scoring:
    """A generative run's summary holds ``test_rouge_l``; a classifier's ``test_accuracy``."""
    return ROUGE_L if "test_rouge_l" in summary else ACCURACY


def scoring_of(runs: list[RunData]) -> Scoring:
    """The one scoring every run of a comparison shares; a folder mixing classifier and
    generative runs has no common score and is refused, naming one run of each."""
    kinds: dict[str, RunData] = {}
    for run in runs:
        kinds.setdefault(scoring_of_summary(run.summary).kind, run)
    if len(kinds) > 1:
        named = "; ".join(
            f"{kind}: {r.partition}/{r.strategy}/seed{r.seed}" for kind, r in sorted(kinds.items())
        )
        raise RunDirError(
            f"the runs mix task kinds ({named}): a table compares one kind; allowed: a folder "
            "of classifier runs or of generative (causal-lm) runs"
        )
    return ROUGE_L if "generation" in kinds else ACCURACY
