"""What a round's record holds beyond the aggregate: each client's entry (who it is, what it
was allocated, its report, the verdict on its update), the round's repairs, and the global
model's scores on the fixed evaluation subsets. The record is written by the run loop
(``fedhello.engine.core``) for every engine alike.
"""

from __future__ import annotations

from typing import Any

from fedhello.core.aggregation import ClientUpdate, State
from fedhello.core.layers import AllocationPlan
from fedhello.engine import generative
from fedhello.engine.experiment import Experiment
from fedhello.model.evaluation import evaluate
from fedhello.model.lora import set_state
from fedhello.model.report import ClientResult, record_fields


def client_record(
    exp: Experiment, result: ClientResult, rejected: dict[int, str], plan: AllocationPlan
) -> dict[str, Any]:
    """A client's entry in the round's record: who it is and what it was allocated (the
    server's), its report (``fedhello.model.report.REPORT``, in its declared order and
    rounding) with its limits after what they limit, and the verdict on its update."""
    u = result.update
    rec: dict[str, Any] = {
        "client": u.client,
        "tier": exp.tiers[u.client],
        "budget": exp.budgets[u.client],
        "layers": list(u.layers),
        **rank_field(u),
        **record_fields(result, "training"),
        **exp.resources.record(u.client),
        **record_fields(result, "device"),
        **record_fields(result, "traffic"),
        "accepted": u.client not in rejected,
    }
    repaired = next((a.repaired_from for a in plan.clients if a.client == u.client), None)
    if repaired is not None:
        rec["repaired_from"] = list(repaired)
    if u.client in rejected:
        rec["rejected_reason"] = rejected[u.client]
    return rec


def rank_field(u: ClientUpdate) -> dict[str, Any]:
    """``rank`` of a rank method's upload (absent for layer strategies: always full)."""
    if u.rank is None:
        return {}
    try:
        return {"rank": u.upload_rank}
    except ValueError:  # a malformed upload (rejected, with its reason)
        return {"rank": None}


def repairs_field(exp: Experiment, plan: AllocationPlan) -> dict[str, Any]:
    """``num_repairs`` of a round, where clients have limits (absent without limits)."""
    if all(limit is None for limit in exp.resources.limits):
        return {}
    return {"num_repairs": sum(a.repaired_from is not None for a in plan.clients)}


def evaluate_global(exp: Experiment, state: State, round_: int = 0) -> dict[str, Any]:
    """The global model on the fixed per-round evaluation subsets; after the historical keys,
    ``predicted_classes`` and ``prediction_entropy`` on the test subset (where the task scores
    them, ``fedhello.tasks.base.prediction_spread``), and a warning in the run log when the
    model answers (nearly) one class there (``fedhello.model.evaluation.warn_if_collapsed``).
    A generative task records its own scores (``fedhello.engine.generative.round_scores``)."""
    set_state(exp.model, state)
    if generative.is_generative(exp):
        return generative.round_scores(exp, round_)
    bs, accelerator = exp.cfg.train.eval_batch_size, exp.accelerator
    test = evaluate(
        exp.model, exp.encoded, exp.eval_test, bs, accelerator, exp.task,
        label_names=exp.raw.label_names, collapse_check="the round's evaluation subset",
    )  # fmt: skip
    val = (
        evaluate(exp.model, exp.encoded, exp.eval_val, bs, accelerator, exp.task)
        if len(exp.eval_val)
        else None
    )
    out: dict[str, Any] = {
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"],
        "eval_examples": test["examples"],
        "eval_subset": test["examples"] < len(exp.raw.splits["test"]),
    }
    if val:
        out |= {"val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"]}
    out |= {k: test[k] for k in ("predicted_classes", "prediction_entropy") if k in test}
    return out
