"""Who is in a deployment: each SuperNode's client id, budget (or limit) and data, learned once.

The server sends every node a query carrying the run's config; a node answers with what its
``--node-config`` declares (``partition-id``, a budget, tier or limit, ``data``) and, when it
holds its own data file, the file's size or why it is unusable. A simulation node, or a site
that wants a fixed client id, declares ``partition-id``; a real site may give only ``data=``
and gets one of the ids nobody declared, in the order of the sites' data paths, so that the
same sites get the same ids in every run (Flower's node ids are random per run, and client
sampling follows client ids). Sites that share a path are ordered by node id, so not
reproducibly: a warning says so, and ``partition-id`` fixes it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flwr.serverapp import Grid

from fedhello.core.budgets import tier_layers
from fedhello.core.errors import UserError
from fedhello.core.fit import ResourceLimit
from fedhello.core.profile import CostProfile
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower import messages as wire
from fedhello.engine.resources import upload_only_profile

logger = logging.getLogger(__name__)


def discover_nodes(
    grid: Grid, exp: Experiment
) -> tuple[dict[int, int], dict[int, str], dict[int, dict[str, Any]]]:
    """Ask every node what it declares; returns client id -> Flower node id, client id ->
    data path for the nodes that train on their own file (the sites), and client id -> what
    its node declared (its query reply: a site's ``site-examples`` and ``site-validation``
    are the counts the server holds its train and evaluate replies to).

    Waits up to ``federation.node_wait`` seconds for ``clients.num_clients`` nodes to connect
    and answer (a node's ClientApp may take a while to start). A node whose own data file is
    unusable stops the run here, before any training."""
    cfg = exp.cfg
    config_toml, labels = cfg.to_toml(), list(exp.raw.label_names)
    deadline = time.monotonic() + cfg.federation.node_wait
    infos: dict[int, dict[str, Any]] = {}  # node id -> its query reply
    while len(infos) < cfg.clients.num_clients and time.monotonic() < deadline:
        pending = [n for n in grid.get_node_ids() if n not in infos]
        if not pending:
            time.sleep(0.5)
            continue
        queries = [wire.query_message(n, config_toml, labels) for n in pending]
        timeout = max(1.0, deadline - time.monotonic())
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("node %d did not answer the query: %s", node, reply.error.reason)
                continue
            info = wire.read_query_reply(reply)
            check_reply(info)
            infos[node] = info
    if not infos:
        raise UserError(
            f"no SuperNode answered within federation.node_wait = {cfg.federation.node_wait} s"
        )
    node_of = assign_clients(exp, infos)
    missing = sorted(set(range(cfg.clients.num_clients)) - set(node_of))
    if missing:
        logger.warning("no SuperNode for clients %s: they will be recorded as failed", missing)
    logger.info("nodes by client id: %s; budgets %s", sorted(node_of), exp.budgets)
    client_of = {node: client for client, node in node_of.items()}
    sites = {client_of[n]: str(i["data"]) for n, i in infos.items() if "data" in i}
    declared = {client_of[n]: info for n, info in infos.items() if n in client_of}
    return node_of, sites, declared


def who(info: dict[str, Any]) -> str:
    if "partition-id" in info:
        return f"partition {int(info['partition-id'])}"
    return f"the SuperNode with data={info.get('data', '?')!r}"


def check_reply(info: dict[str, Any]) -> None:
    """Stop at once on a node that cannot take part (unusable data, no identity)."""
    for key in ("device-error", "data-error", "profile-error"):
        if key in info:
            raise UserError(f"{who(info)}: {info[key]}")
    if "device" in info:
        logger.info("%s trains on %s in %s", who(info), info["device"], info.get("precision"))
    if "partition-id" not in info and "data" not in info:
        raise UserError(
            "a SuperNode declared neither partition-id nor data in its --node-config; "
            'allowed: partition-id=N (a share of the configured dataset) or data="/path/file"'
        )


def assign_clients(exp: Experiment, infos: dict[int, dict[str, Any]]) -> dict[int, int]:
    """Client ids: declared partition ids first, then the free ids to the sites that gave
    only ``data``, in the order of their data paths (node id breaks ties)."""
    k = exp.cfg.clients.num_clients
    node_of: dict[int, int] = {}
    for node, info in sorted(infos.items()):
        if "partition-id" in info:
            register_node(exp, node_of, node, info)
    sites = sorted((str(info["data"]), node) for node, info in infos.items()
                   if "partition-id" not in info)  # fmt: skip
    paths = [path for path, _ in sites]
    if len(set(paths)) < len(paths):
        logger.warning(
            "several sites gave the same data path %s: their client ids may differ between "
            "runs; give each a partition-id to fix them",
            sorted({p for p in paths if paths.count(p) > 1}),
        )
    free = [c for c in range(k) if c not in node_of]
    if len(sites) > len(free):
        raise UserError(
            f"{len(sites)} SuperNodes gave data= without partition-id, but only {len(free)} of "
            f"the clients.num_clients = {k} client ids are free; allowed: at most {k} nodes"
        )
    for client, (_, node) in zip(free, sites, strict=False):
        register_node(exp, node_of, node, {**infos[node], "partition-id": client})
    return node_of


# Retired declarations: fractions of an analytic cost fitted once on one model (not checked
# against anything), and the limit in real units that replaces each.
RETIRED_DECLARATIONS = {
    "budget-cost": "budget-step-seconds=S (seconds per local step)",
    "budget-memory": "budget-memory-mb=M (MB of training memory)",
}


def register_node(exp: Experiment, node_of: dict[int, int], node: int, info: Any) -> None:
    """Record ``node`` as client ``info["partition-id"]`` with the budget, tier or limit it
    declares."""
    k = exp.cfg.clients.num_clients
    pid = int(info["partition-id"])
    if not 0 <= pid < k:
        raise UserError(
            f"a SuperNode declared partition-id={pid}; allowed: 0..{k - 1} "
            f"(clients.num_clients = {k})"
        )
    if pid in node_of and node_of[pid] != node:
        raise UserError(f"two SuperNodes declared partition-id={pid}")
    node_of[pid] = node
    if "data-error" in info:  # the node's own data file is unusable: stop before round 1
        raise UserError(f"partition {pid}: {info['data-error']}")
    if "site-examples" in info:
        logger.info(
            "client %d trains on its own data %s: %d examples",
            pid, info.get("data", ""), info["site-examples"],
        )  # fmt: skip
    if "budget-tier" in info:  # a tier of clients.tiers, as in the embedded engine
        tier = int(info["budget-tier"])
        tiers = exp.cfg.clients.tiers
        if not 0 <= tier < len(tiers):
            raise UserError(f"partition {pid}: budget-tier={tier}; allowed: 0..{len(tiers) - 1}")
        budget = tier_layers(tiers[tier], exp.num_layers)
        exp.strategy.set_budget(pid, budget)
        exp.tiers[pid] = tier
    for retired, replacement in RETIRED_DECLARATIONS.items():
        if retired in info:
            raise UserError(
                f"partition {pid}: {retired}={info[retired]} is retired: declare "
                f"{replacement}, a limit in real units checked against the cost profile the "
                "node measures on its own device"
            )
    if "budget-layers" in info:
        budget = int(info["budget-layers"])
        if not 1 <= budget <= exp.num_layers:
            raise UserError(
                f"partition {pid}: budget-layers={budget}; allowed: 1..{exp.num_layers}"
            )
        exp.strategy.set_budget(pid, budget)
    register_limit(exp, pid, info)


def register_limit(exp: Experiment, pid: int, info: Any) -> None:
    """A node's limits in real units, checked with the cost profile it measured itself."""
    values = {}
    for key in ("budget-memory-mb", "budget-step-seconds", "budget-upload-mb"):
        if key in info:
            values[key] = float(info[key])
            if not values[key] > 0:
                raise UserError(
                    f"partition {pid}: {key}={values[key]:g}; allowed: a positive limit"
                )
    if not values:
        return
    limit = ResourceLimit(values.get("budget-memory-mb"), values.get("budget-step-seconds"),
                          values.get("budget-upload-mb"))  # fmt: skip
    profile = None
    if "cost-profile" in info:
        profile = CostProfile.from_json(json.loads(str(info["cost-profile"])))
        if profile.num_layers != exp.num_layers:
            raise UserError(
                f"partition {pid}: its cost profile has {profile.num_layers} blocks, the "
                f"model {exp.num_layers}; allowed: a profile of the run's model"
            )
    elif exp.resources.profile is None:  # an upload limit alone: tensor sizes suffice
        profile = upload_only_profile(exp.init_state, exp.layer_of, exp.num_layers)
    exp.resources.set_client(exp.strategy, pid, limit, profile, f"partition {pid}")
    logger.info("client %d: %s -> %d layers from block %d", pid, limit,
                exp.strategy.budgets[pid], exp.strategy.floors[pid])  # fmt: skip
