"""The sites' own evaluation of the final model: each site scores it on the held-out rows of
its own file (the data never leaves the site), and the server reports the scores per site
and their example-weighted mean accuracy.

A site's scores are its claims: each reply is checked (an integer count within the held-out
rows the site declared at discovery, the task's scores present and finite) before it counts,
and a reply that fails is recorded as that site's error, so one bad site neither stops the run
after its last round nor skews the mean."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from flwr.app import Message
from flwr.serverapp import Grid

from fedhello.core.aggregation import State
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower import messages as wire
from fedhello.engine.flower.arrays import to_record

logger = logging.getLogger(__name__)

# What a site's evaluate reply holds besides ``num_examples`` (``client_app.evaluate``).
CLASSIFIER_SCORES = ("accuracy", "macro_f1", "loss")
LM_SCORES = ("loss", "perplexity")  # a language model's sites score no classes
SHARES = ("accuracy", "macro_f1")  # in [0, 1]


def evaluate_sites(
    grid: Grid, exp: Experiment, state: State, node_of: dict[int, int], sites: dict[int, str],
    declared: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``site_validation`` (per-site scores or errors) and, if any site scored,
    ``site_validation_accuracy`` and ``site_validation_examples``; ``declared``: client id
    -> its node's query reply (a site's ``site-validation``: its held-out rows)."""
    arrays, config_toml = to_record(state), exp.cfg.to_toml()
    messages = [
        wire.evaluate_message(node_of[c], arrays, c, config_toml, exp.raw.label_names)
        for c in sorted(sites)
        if c in node_of
    ]
    replies = grid.send_and_receive(messages, timeout=exp.cfg.federation.round_timeout)
    return site_scores(replies, node_of, sites, declared or {}, exp.task.generative)


def site_scores(
    replies: Iterable[Message], node_of: Mapping[int, int], sites: Mapping[int, str],
    declared: Mapping[int, Mapping[str, Any]], generative: bool,
) -> dict[str, Any]:  # fmt: skip
    """``evaluate_sites``'s result from the sites' replies (each checked by
    ``scores_problem``)."""
    client_of = {node: client for client, node in node_of.items()}
    scores: dict[str, dict[str, Any]] = {}
    for reply in replies:
        client = client_of.get(reply.metadata.src_node_id)
        if client is None:
            continue
        if reply.has_error():
            scores[str(client)] = {"error": reply.error.reason}
            continue
        s = wire.read_evaluate_reply(reply)
        validation = declared.get(client, {}).get("site-validation")
        problem = scores_problem(s, validation, generative)
        scores[str(client)] = (
            {"error": f"malformed scores: {problem}"} if problem else kept_scores(s, generative)
        )
    for site in sites:
        scores.setdefault(str(site), {"error": "no reply before federation.round_timeout"})
    for name, s in sorted(scores.items()):
        if "error" in s:
            logger.warning("site %s could not evaluate the final model: %s", name, s["error"])
    scored = [s for s in scores.values() if s.get("num_examples")]
    total = sum(int(s["num_examples"]) for s in scored)
    out: dict[str, Any] = {
        "site_validation": dict(sorted(scores.items(), key=lambda kv: int(kv[0])))
    }
    if total:  # a classifier's accuracy; a language model's loss
        metric = "loss" if generative else "accuracy"
        mean = sum(float(s[metric]) * int(s["num_examples"]) for s in scored) / total
        out |= {f"site_validation_{metric}": mean, "site_validation_examples": total}
    return out


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def scores_problem(scores: Mapping[str, Any], validation: Any, generative: bool) -> str | None:
    """Why a site's scores cannot count (None: they can): ``num_examples`` must be an integer
    in ``[0, validation]`` (the held-out rows it declared; unchecked above where it declared
    none), and where it is positive every score of the task a finite number (accuracy and
    macro-F1 within [0, 1], the loss non-negative; the perplexity, the loss's exp, may be
    infinite)."""
    n = scores.get("num_examples")
    top = validation if _is_int(validation) else None
    if not _is_int(n) or n < 0 or (top is not None and n > top):
        allowed = "a non-negative integer"
        if top is not None:
            allowed = f"an integer in 0..{top} (the held-out rows it declared)"
        return f"num_examples = {n!r}; allowed: {allowed}"
    if n == 0:
        return None
    for key in LM_SCORES if generative else CLASSIFIER_SCORES:
        value = scores.get(key)
        if value is None:
            return f"{key} is missing"
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return f"{key} = {value!r}; allowed: a number"
        if key != "perplexity" and not math.isfinite(value):
            return f"{key} = {value!r}; allowed: a finite number"
        if key in SHARES and not 0 <= value <= 1:
            return f"{key} = {value!r}; allowed: 0..1"
        if value < 0:
            return f"{key} = {value!r}; allowed: a non-negative number"
    return None


def kept_scores(scores: Mapping[str, Any], generative: bool) -> dict[str, Any]:
    """The checked scores the run records (nothing else the reply may carry)."""
    n = int(scores["num_examples"])
    if not n:
        return {"num_examples": 0}
    names = LM_SCORES if generative else CLASSIFIER_SCORES
    return {"num_examples": n, **{k: float(scores[k]) for k in names}}
