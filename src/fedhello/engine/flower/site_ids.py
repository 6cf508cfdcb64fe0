"""The client id of each SuperNode: a declared ``partition-id``, else (a site that gives only
``data=``) one of the free ids in the order of the sites' data paths, fixed on the run's first
start in its ``sites.json`` so that a resume gives every site the id it had (its seeds, budget,
rank and scores stay its own), whichever sites answer, and refuses a site the run never had.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedhello.core.errors import RunDirError, UserError
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower.declarations import register_node, who

logger = logging.getLogger(__name__)

SITES_ABOUT = (
    "client id -> data path of each SuperNode that declared data= without partition-id, "
    "given on the run's first start; a resume gives every site the same id"
)


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
