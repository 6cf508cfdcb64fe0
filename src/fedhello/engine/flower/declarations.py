"""What a SuperNode declares about itself in its query reply, checked as it arrives: its
identity (``partition-id`` or ``data``), its budget, tier or limit, its cost profile, its own
data's size, and the reasons it gives for not taking part (``*-error``). Each problem stops
discovery at once with one line naming the node (its partition id or data path), the key, the
value and what is allowed: never after ``federation.node_wait``, never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode

from fedhello.core.budgets import tier_layers
from fedhello.core.errors import ConfigError, UserError
from fedhello.core.fit import ResourceLimit
from fedhello.core.profile import CostProfile
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower import messages as wire
from fedhello.engine.flower.node_messages import DECLARED_FLOAT, DECLARED_INT, DECLARED_STR
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
    ints = ", ".join(DECLARED_INT)
    floats = ", ".join(k for k in DECLARED_FLOAT if k not in RETIRED_DECLARATIONS)
    strs = ", ".join(DECLARED_STR)
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
        register_tier(exp, pid, int(info["budget-tier"]), name, profile)
    if "budget-layers" in info:
        exp.strategy.set_budget(pid, int(info["budget-layers"]))
    register_limit(exp, pid, info, name, profile)


def register_tier(
    exp: Experiment, pid: int, tier: int, name: str, profile: CostProfile | None
) -> None:
    """Client ``pid`` in ``tier`` of ``clients.tiers`` with everything the tier holds in the
    embedded engine: its layer budget, or its limit in real units (the tier's value is MB or
    seconds then, not a share of the layers), and its upload limit (``clients.upload_mb``)."""
    c = exp.cfg.clients
    exp.tiers[pid] = tier
    value = float(c.tiers[tier])
    count = None if c.real_limits else tier_layers(value, exp.num_layers)
    if count is not None:
        exp.strategy.set_budget(pid, count)
    if not c.real_limits and c.upload_mb is None:
        return
    limit = ResourceLimit(
        value if c.budget_kind == "memory-mb" else None,
        value if c.budget_kind == "step-seconds" else None,
        None if c.upload_mb is None else c.upload_mb[tier],
    )
    if profile is None and exp.resources.profile is None:  # an upload limit alone
        profile = upload_only_profile(exp.init_state, exp.layer_of, exp.num_layers)
    exp.resources.set_client(exp.strategy, pid, limit, profile, name, count)


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
    # over a declared tier's limit (register_tier): the node's own values replace the tier's
    # of the same kind, and the tier's others stay
    tier = exp.resources.limits[pid] if "budget-tier" in info else None
    limit = ResourceLimit(
        values.get("budget-memory-mb", tier.memory_mb if tier else None),
        values.get("budget-step-seconds", tier.step_seconds if tier else None),
        values.get("budget-upload-mb", tier.upload_mb if tier else None),
    )
    if profile is None and exp.resources.profile is None:  # an upload limit alone
        profile = upload_only_profile(exp.init_state, exp.layer_of, exp.num_layers)
    # a layer count the node declared (or its tier's) is capped by an upload limit, not
    # replaced by what the upload affords; a memory or time limit sets the count itself
    declared_count = "budget-layers" in info or (
        "budget-tier" in info and not exp.cfg.clients.real_limits
    )
    count = exp.strategy.budgets[pid] if declared_count and not limit.needs_profile else None
    exp.resources.set_client(exp.strategy, pid, limit, profile, name, count)
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
