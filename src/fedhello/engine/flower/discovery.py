"""Who is in a deployment: each SuperNode's client id, budget (or limit) and data, learned once.

The server sends every node a query carrying the run's config; a node answers with what its
``--node-config`` declares (``partition-id``, a budget, tier or limit, ``data``) and, when it
holds its own data file, the file's size or why it is unusable. A simulation node, or a site
that wants a fixed client id, declares ``partition-id``; a real site may give only ``data=``
and gets one of the ids nobody declared, in the order of the sites' data paths, so that the
same sites get the same ids in every run (Flower's node ids are random per run, and client
sampling follows client ids). Sites that share a path are ordered by node id, so not
reproducibly: a warning says so, and ``partition-id`` fixes it.

Those ids are fixed on a run's first start (the run's ``sites.json``): a resume gives every
site the id it had, whichever sites answer (a missing one fails its rounds, as a missing node
does; it does not shift the others' ids, seeds and budgets), and refuses a site the run never
had. A node that cannot answer the query (its ClientApp raised, e.g. on a bad
``--node-config`` value) or answers with values the server cannot use stops the run at once
with one line, never after ``federation.node_wait``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.serverapp import Grid

from fedhello.core.errors import UserError
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower import messages as wire
from fedhello.engine.flower.declarations import (
    check_reply,
    check_values,
    read_reply,
    refuse_error_reply,
)
from fedhello.engine.flower.site_ids import assign_clients, check_known_site

logger = logging.getLogger(__name__)


def discover_nodes(
    grid: Grid, exp: Experiment, known: Mapping[int, str] | None = None
) -> tuple[dict[int, int], dict[int, str], dict[int, dict[str, Any]]]:
    """Ask every node what it declares; returns client id -> Flower node id, client id ->
    data path for the nodes that train on their own file (the sites), and client id -> what
    its node declared (its query reply: a site's ``site-examples`` and ``site-validation``
    are the counts the server holds its train and evaluate replies to).

    ``known``: the client id of each site that gave only ``data=``, as the run's first start
    fixed them (a resume; None on a first start, when they are handed out here).

    Waits up to ``federation.node_wait`` seconds for ``clients.num_clients`` nodes to connect
    and answer (a node's ClientApp may take a while to start). A node whose own data file is
    unusable, whose ClientApp fails on the query or whose reply is unusable stops the run
    here, at once, before any training."""
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
                refuse_error_reply(node, reply)
                logger.warning("node %d did not answer the query: %s", node, reply.error.reason)
                continue
            info = read_reply(node, reply)
            check_reply(info)
            check_values(exp, info)
            if known is not None:
                check_known_site(info, known)
            infos[node] = info
    if not infos:
        raise UserError(
            f"no SuperNode answered within federation.node_wait = {cfg.federation.node_wait} s"
        )
    node_of = assign_clients(exp, infos, known)
    missing = sorted(set(range(cfg.clients.num_clients)) - set(node_of))
    if missing:
        named = [
            f"{c} (the site with data={known[c]!r})" if known and c in known else str(c)
            for c in missing
        ]
        logger.warning(
            "no SuperNode for clients %s: they will be recorded as failed", ", ".join(named)
        )
    logger.info("nodes by client id: %s; budgets %s", sorted(node_of), exp.budgets)
    client_of = {node: client for client, node in node_of.items()}
    sites = {client_of[n]: str(i["data"]) for n, i in infos.items() if "data" in i}
    declared = {client_of[n]: info for n, info in infos.items() if n in client_of}
    return node_of, sites, declared
