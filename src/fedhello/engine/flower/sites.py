"""The sites' own evaluation of the final model: each site scores it on the held-out rows of
its own file (the data never leaves the site), and the server reports the scores per site
and their example-weighted mean accuracy."""

from __future__ import annotations

import logging
from typing import Any

from flwr.serverapp import Grid

from fedhello.core.aggregation import State
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower import messages as wire

logger = logging.getLogger(__name__)


def evaluate_sites(
    grid: Grid, exp: Experiment, state: State, node_of: dict[int, int], sites: dict[int, str]
) -> dict[str, Any]:
    """``site_validation`` (per-site scores or errors) and, if any site scored,
    ``site_validation_accuracy`` and ``site_validation_examples``."""
    arrays, config_toml = wire.to_record(state), exp.cfg.to_toml()
    messages = [
        wire.evaluate_message(node_of[c], arrays, c, config_toml, exp.raw.label_names)
        for c in sorted(sites)
        if c in node_of
    ]
    client_of = {node: client for client, node in node_of.items()}
    scores: dict[str, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages, timeout=exp.cfg.federation.round_timeout):
        client = client_of.get(reply.metadata.src_node_id)
        if client is None:
            continue
        if reply.has_error():
            scores[str(client)] = {"error": reply.error.reason}
            continue
        scores[str(client)] = wire.read_evaluate_reply(reply)
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
    if total:  # a classifier's accuracy; a language model's loss (its sites score no classes)
        metric = "accuracy" if all("accuracy" in s for s in scored) else "loss"
        mean = sum(float(s[metric]) * int(s["num_examples"]) for s in scored) / total
        out |= {f"site_validation_{metric}": mean, "site_validation_examples": total}
    return out
