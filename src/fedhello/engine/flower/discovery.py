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

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedhello.core.budgets import tier_layers
from fedhello.core.errors import ConfigError, RunDirError, UserError
from fedhello.core.fit import ResourceLimit
from fedhello.core.profile import CostProfile
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower import messages as wire
from fedhello.engine.resources import upload_only_profile

logger = logging.getLogger(__name__)

# Error replies that say the node's ClientApp failed on the query itself: it would fail again
# (the query reads only the node's --node-config and the run's config), so the run stops at
# once with the reason instead of asking again until federation.node_wait. Any other error (a
# node gone, a message lost) is asked again, like a node that has not answered yet.
FATAL_REPLY_ERRORS = {
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "its ClientApp raised",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "its ClientApp did not load",
}
SITES_ABOUT = (
    "client id -> data path of each SuperNode that declared data= without partition-id, "
    "given on the run's first start; a resume gives every site the same id"
)


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


def assigned_sites(declared: Mapping[int, Mapping[str, Any]]) -> dict[int, str]:
    """Client id -> data path of the sites the server gave an id (they declared only
    ``data=``): what a resume must give the same ids (``sites.json``)."""
    return {
        client: str(info["data"])
        for client, info in sorted(declared.items())
        if "data" in info and "partition-id" not in info
    }


def read_site_ids(path: Path) -> dict[int, str] | None:
    """The site ids a run fixed on its first start (``write_site_ids``), or None where it
    has none (a run started before fedhello kept them, or one stopped before round 1)."""
    if not path.is_file():
        return None
    allowed = 'allowed: the JSON object fedhello writes there, {"sites": {"<client id>": "<path>"}}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunDirError(f"{str(path)!r} is not valid JSON ({err.msg}); {allowed}") from None
    except UnicodeDecodeError as err:
        raise RunDirError(
            f"{str(path)!r} is not UTF-8 text (byte {err.start}); {allowed}"
        ) from None
    sites = data.get("sites") if isinstance(data, dict) else None
    if not isinstance(sites, dict) or not all(
        isinstance(c, str) and c.isdigit() and isinstance(p, str) for c, p in sites.items()
    ):
        raise RunDirError(f"{str(path)!r} holds no client id -> data path map; {allowed}")
    return {int(c): p for c, p in sites.items()}


def write_site_ids(path: Path, sites: Mapping[int, str]) -> None:
    """Record the sites' ids in the run (atomically: a crash leaves the old file or none)."""
    data = {"about": SITES_ABOUT, "sites": {str(c): p for c, p in sorted(sites.items())}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def who(info: Mapping[str, Any]) -> str:
    """A node as its operator knows it: its partition id, else its data path."""
    pid = info.get("partition-id")
    if is_int(pid):
        return f"partition {pid}"
    if "data" in info:
        return f"the SuperNode with data={str(info['data'])!r}"
    if pid is not None:
        return f"the SuperNode that declared partition-id={short(pid)}"
    return "a SuperNode"


def node_config_allowed() -> str:
    """What a --node-config may declare, by type (the retired keys left out)."""
    ints = ", ".join(wire.DECLARED_INT)
    floats = ", ".join(k for k in wire.DECLARED_FLOAT if k not in RETIRED_DECLARATIONS)
    strs = ", ".join(wire.DECLARED_STR)
    return f"integers {ints}; positive numbers {floats}; strings {strs}"


def refuse_error_reply(node: int, reply: Message) -> None:
    """Stop the run on an error reply that will not go away by asking again (the node's
    ClientApp raised on the query, or did not load), with its reason in one line."""
    what = FATAL_REPLY_ERRORS.get(reply.error.code)
    if what is None:
        return
    reason = reply.error.reason or "no reason given"
    # Flower's format: "<class 'ValueError'>:<'invalid literal for int() ...'>"
    m = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason, re.DOTALL)
    text = " ".join((f"{m[1]}: {m[2]}" if m else reason).split())
    raise ConfigError(
        f"the SuperNode with Flower node id {node} could not answer the query: {what} {text}; "
        f"check the values of its --node-config (allowed: {node_config_allowed()})"
    )


def read_reply(node: int, reply: Message) -> dict[str, Any]:
    """A node's query reply as a dict, or one line when it is not a fedhello reply."""
    if "config" not in reply.content.config_records:
        raise UserError(
            f"the SuperNode with Flower node id {node} answered the query without a 'config' "
            "record; allowed: the reply of fedhello's ClientApp (is the node running another "
            "app?)"
        )
    return wire.read_query_reply(reply)


def check_reply(info: Mapping[str, Any]) -> None:
    """Stop at once on a node that cannot take part (unusable data or settings, no identity):
    every ``*-error`` key of its reply is a reason the node gives for itself."""
    for key in sorted(k for k in info if k.endswith("-error")):
        raise UserError(f"{who(info)}: {info[key]}")
    if "device" in info:
        logger.info("%s trains on %s in %s", who(info), info["device"], info.get("precision"))
    if "partition-id" not in info and "data" not in info:
        raise UserError(
            "a SuperNode declared neither partition-id nor data in its --node-config; "
            'allowed: partition-id=N (a share of the configured dataset) or data="/path/file"'
        )
    if "data" in info and not (isinstance(info["data"], str) and info["data"]):
        node = who({k: v for k, v in info.items() if k != "data"})
        raise ConfigError(
            f"{node} declared data={short(info['data'])}; allowed: the path of its own data "
            'file, as a string (data="/path/file")'
        )


def check_known_site(info: Mapping[str, Any], known: Mapping[int, str]) -> None:
    """On a resume, refuse a site that gives only ``data=`` and that the run never had: it
    would take a client id the run so far trained without."""
    if "partition-id" in info or str(info.get("data")) in known.values():
        return
    raise UserError(
        f"{who(info)} is not a site of this run: the run's sites.json, written on its first "
        f"start, records {sorted(set(known.values()))}, and a resume gives no new site a "
        "client id; allowed: those sites (a new site needs a new run)"
    )


def assign_clients(
    exp: Experiment, infos: dict[int, dict[str, Any]], known: Mapping[int, str] | None = None
) -> dict[int, int]:
    """Client ids: declared partition ids first, then the sites that gave only ``data``:
    the ids ``known`` recorded for their paths (a resume), else the free ids in the order of
    their data paths (node id breaks ties)."""
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
    if known is None:
        free = [c for c in range(k) if c not in node_of]
        if len(sites) > len(free):
            raise UserError(
                f"{len(sites)} SuperNodes gave data= without partition-id, but only {len(free)} "
                f"of the clients.num_clients = {k} client ids are free; allowed: at most {k} nodes"
            )
        ids = list(zip(free, sites, strict=False))
    else:
        ids = known_ids(infos, node_of, sites, known)
    for client, (path, node) in ids:
        name = f"client {client} (the SuperNode with data={path!r})"
        register_node(exp, node_of, node, {**infos[node], "partition-id": client}, name)
    return node_of


def known_ids(
    infos: Mapping[int, Mapping[str, Any]], node_of: Mapping[int, int],
    sites: list[tuple[str, int]], known: Mapping[int, str],
) -> list[tuple[int, tuple[str, int]]]:  # fmt: skip
    """On a resume: each site's id as the first start recorded it (sites sharing a path take
    that path's ids in node-id order). A declared partition id may not take a recorded site's
    id, and a site the record does not hold is refused."""
    free: dict[str, list[int]] = {}
    for client, path in sorted(known.items()):
        free.setdefault(path, []).append(client)
    for pid, node in sorted(node_of.items()):
        if pid not in known:
            continue
        if str(infos[node].get("data")) != known[pid]:
            raise UserError(
                f"{who(infos[node])}: partition-id={pid}, but this run gave client {pid} to the "
                f"site with data={known[pid]!r} on its first start (the run's sites.json); "
                f"allowed: an id no site of the run holds (not {sorted(known)})"
            )
        free[known[pid]].remove(pid)  # the site pinned the id it had
    out = []
    for path, node in sites:
        if not free.get(path):  # check_known_site let it in: more sites with it than recorded
            count, recorded = sum(p == path for p, _ in sites), list(known.values()).count(path)
            raise UserError(
                f"{count} SuperNodes gave data={path!r} without partition-id, but the run's "
                f"sites.json, written on its first start, records {recorded} with that path, "
                f"and a resume gives no new site a client id; allowed: at most {recorded}"
            )
        out.append((free[path].pop(0), (path, node)))
    return out


# Retired declarations: fractions of an analytic cost fitted once on one model (not checked
# against anything), and the limit in real units that replaces each.
RETIRED_DECLARATIONS = {
    "budget-cost": "budget-step-seconds=S (seconds per local step)",
    "budget-memory": "budget-memory-mb=M (MB of training memory)",
}


LIMIT_KEYS = ("budget-memory-mb", "budget-step-seconds", "budget-upload-mb")


def check_values(exp: Experiment, info: Any, name: str | None = None) -> CostProfile | None:
    """Every value of a node's reply that the server reads, checked as the reply arrives (not
    once every node has answered or ``federation.node_wait`` has run out): one line naming
    the node (``name``, else ``who``), the key, the value and what is allowed. Returns the
    cost profile the node measured, if it sent one."""
    k = exp.cfg.clients.num_clients
    pid = info.get("partition-id")
    if pid is not None and (not is_int(pid) or not 0 <= pid < k):
        node_name = who({key: v for key, v in info.items() if key != "partition-id"})
        raise ConfigError(
            f"{node_name} declared partition-id={short(pid)}; allowed: an integer 0..{k - 1} "
            f"(clients.num_clients = {k})"
        )
    name = name or who(info)
    for key in ("site-examples", "site-validation"):
        if key in info:
            declared_int(info, key, name, 0, None)
    if "budget-tier" in info:  # a tier of clients.tiers, as in the embedded engine
        declared_int(info, "budget-tier", name, 0, len(exp.cfg.clients.tiers) - 1)
    for retired, replacement in RETIRED_DECLARATIONS.items():
        if retired in info:
            raise UserError(
                f"{name}: {retired}={info[retired]} is retired: declare "
                f"{replacement}, a limit in real units checked against the cost profile the "
                "node measures on its own device"
            )
    if "budget-layers" in info:
        declared_int(info, "budget-layers", name, 1, exp.num_layers)
    for key in LIMIT_KEYS:
        if key in info:
            declared_limit(info, key, name)
    if "cost-profile" not in info:
        return None
    profile = read_cost_profile(info["cost-profile"], name)
    if profile.num_layers != exp.num_layers:
        raise UserError(
            f"{name}: its cost profile has {profile.num_layers} blocks, the "
            f"model {exp.num_layers}; allowed: a profile of the run's model"
        )
    return profile


def register_node(
    exp: Experiment, node_of: dict[int, int], node: int, info: Any, name: str | None = None
) -> None:
    """Record ``node`` as client ``info["partition-id"]`` with the budget, tier or limit it
    declares; ``name``: the node in messages (default ``partition N``, as it declared)."""
    profile = check_values(exp, info, name)
    pid = int(info["partition-id"])
    name = name or f"partition {pid}"
    if pid in node_of and node_of[pid] != node:
        raise UserError(f"two SuperNodes declared partition-id={pid}")
    node_of[pid] = node
    if "data-error" in info:  # the node's own data file is unusable: stop before round 1
        raise UserError(f"{name}: {info['data-error']}")
    if "site-examples" in info:
        logger.info("client %d trains on its own data %s: %d examples",
                    pid, info.get("data", ""), info["site-examples"])  # fmt: skip
    if "budget-tier" in info:  # a tier of clients.tiers, as in the embedded engine
        tier = int(info["budget-tier"])
        exp.strategy.set_budget(pid, tier_layers(exp.cfg.clients.tiers[tier], exp.num_layers))
        exp.tiers[pid] = tier
    if "budget-layers" in info:
        exp.strategy.set_budget(pid, int(info["budget-layers"]))
    register_limit(exp, pid, info, name, profile)


def declared_int(info: Any, key: str, name: str, low: int, high: int | None) -> int:
    """``info[key]``, an integer in ``low..high`` (no upper bound where ``high`` is None),
    or one line naming the node, the key, the value and what is allowed."""
    value = info[key]
    if not is_int(value) or value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}: {key}={short(value)}; allowed: an integer {allowed}")
    return int(value)


def declared_limit(info: Any, key: str, name: str) -> float:
    """``info[key]``, a positive finite limit, or one line naming node, key and value."""
    value = info[key]
    if (is_int(value) or isinstance(value, float)) and math.isfinite(value) and value > 0:
        return float(value)
    raise ConfigError(f"{name}: {key}={short(value)}; allowed: a positive limit (a number)")


def register_limit(
    exp: Experiment, pid: int, info: Any, name: str, profile: CostProfile | None
) -> None:
    """A node's limits in real units (checked: ``check_values``), checked with the cost
    profile it measured itself (``profile``)."""
    values = {key: float(info[key]) for key in LIMIT_KEYS if key in info}
    if not values:
        return
    limit = ResourceLimit(values.get("budget-memory-mb"), values.get("budget-step-seconds"),
                          values.get("budget-upload-mb"))  # fmt: skip
    if profile is None and exp.resources.profile is None:  # an upload limit alone
        profile = upload_only_profile(exp.init_state, exp.layer_of, exp.num_layers)
    exp.resources.set_client(exp.strategy, pid, limit, profile, name)
    logger.info("client %d: %s -> %d layers from block %d", pid, limit,
                exp.strategy.budgets[pid], exp.strategy.floors[pid])  # fmt: skip


def read_cost_profile(value: Any, name: str) -> CostProfile:
    """The cost profile a node measured (its reply's ``cost-profile``, JSON), or one line."""
    try:
        return CostProfile.from_json(json.loads(str(value)))
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # untrusted: any shape
        why = " ".join(f"{type(err).__name__}: {err}".split())
        raise ConfigError(
            f"{name}: cost-profile={short(value)} is unreadable ({why}); allowed: the JSON "
            "cost profile fedhello's ClientApp measures on the node"
        ) from None
