"""``FlowerEngine``: the run loop's engine over a Flower grid (Message API).

It implements :class:`fedhello.engine.core.Engine`: ``start`` learns who is in the
deployment (``discovery``), ``train_round`` sends one train message per allocated client and
turns the replies into client results, ``final_scores`` has the sites evaluate the final
model on their own held-out rows. The messages and the client contract are in
``fedhello.engine.flower.messages``.

Why not a subclass of Flower's ``FedAvg``: the loop that owns checkpoints, resume, metrics
and evaluation is the shared core (so the embedded and Flower engines cannot drift), and
what differs from stock FedAvg is exactly what it would have to override: one message per
node with its own ``train-layers`` (stock FedAvg sends one record to all), nodes sampled by
client id with the run's seeded generator (Flower's node ids are random per run), and partial
per-layer updates aggregated by ``fedhello.core.aggregation.aggregate_masked``, which
validates every update and carries forward the layers nobody trained (stock FedAvg refuses
replies whose arrays differ in keys).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedhello.core.aggregation import State
from fedhello.core.heads import ClassSums
from fedhello.core.ranks import truncate
from fedhello.engine.core import Observer
from fedhello.engine.experiment import Experiment
from fedhello.engine.flower import messages as wire
from fedhello.engine.flower.arrays import to_record
from fedhello.engine.flower.discovery import discover_nodes
from fedhello.engine.flower.site_ids import assigned_sites, read_site_ids, write_site_ids
from fedhello.engine.flower.sites import evaluate_sites
from fedhello.engine.rounds import RoundPlan, RoundResults
from fedhello.model.lora import state_nbytes
from fedhello.model.report import ClientResult
from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)


class FlowerEngine:
    """Clients reached as Flower messages over ``grid``."""

    name = "flower"

    def __init__(self, grid: Grid, run: RunDir | None = None, resume: bool = False) -> None:
        """``run``: the run directory, where the sites' client ids are kept between starts
        (``sites.json``; None: not kept); ``resume``: this start continues ``run``."""
        self.grid = grid
        self.run, self.resume = run, resume
        # the sites' ids this start handed out, for the run's sites.json (None: nothing to write)
        self.unrecorded: dict[int, str] | None = None
        self.node_of: dict[int, int] = {}  # client id -> Flower node id
        self.sites: dict[int, str] = {}  # client id -> its own data file
        self.config_toml = ""
        self.label_names: list[str] = []
        self.shards: list[np.ndarray] = []  # client id -> its rows of the configured dataset
        self.declared: dict[int, dict[str, Any]] = {}  # client id -> its node's query reply

    @property
    def client_of(self) -> dict[int, int]:
        return {node: client for client, node in self.node_of.items()}

    def start(self, exp: Experiment) -> None:
        self.config_toml = exp.cfg.to_toml()
        self.label_names = list(exp.raw.label_names)  # a site has no other way to know them
        # a resume gives every site the client id the first start gave it (its seeds, budget)
        known = read_site_ids(self.run.sites_path) if self.run and self.resume else None
        self.node_of, self.sites, self.declared = discover_nodes(self.grid, exp, known)
        if self.run is not None and known is None:
            self.unrecorded = assigned_sites(self.declared)
            if self.resume and self.unrecorded and any(self.run.checkpoint_dir.glob("round-*")):
                logger.warning(
                    "%s has no sites.json (started before fedhello kept the sites' client ids): "
                    "the sites got ids in the order of the data paths of those answering now, "
                    "%s; they match the first start only if the same sites answered then",
                    self.run.path, self.unrecorded,
                )  # fmt: skip
        # a partition node is sent its rows with each train message: it reads the dataset but
        # never partitions it (a light node); a site trains on its own file
        self.shards = list(exp.shards)

    def record_sites(self) -> None:
        """Write the sites' ids into the run before its first round (``start`` runs before
        the run loop creates a new run's directory, so it cannot write them there)."""
        if self.run is not None and self.unrecorded is not None:
            write_site_ids(self.run.sites_path, self.unrecorded)
            self.unrecorded = None

    def known_examples(self, client: int) -> int | None:
        """The size of ``client``'s shard as the server knows it: the rows it sent a
        partition node, or the train count a site declared at discovery (None: unknown)."""
        if client in self.sites:
            count = self.declared.get(client, {}).get("site-examples")
            return count if isinstance(count, int) and not isinstance(count, bool) else None
        return len(self.shards[client]) if 0 <= client < len(self.shards) else None

    def train_round(
        self, exp: Experiment, rp: RoundPlan, state: State, observer: Observer
    ) -> RoundResults:
        self.record_sites()
        messages, failed = self.messages_for(rp, state)
        timeout = exp.cfg.federation.round_timeout
        replies = self.grid.send_and_receive(messages, timeout=timeout) if messages else []
        outcome = self.collect(rp, replies, state)
        outcome.failed = failed | outcome.failed
        # federation.min_replies is judged on the valid updates, after validation (rounds.py)
        for r in outcome.results:
            observer.on_client_end(rp.round, r)
        return outcome

    def final_scores(self, exp: Experiment, state: State) -> dict[str, Any]:
        if not self.sites:
            return {}
        return evaluate_sites(self.grid, exp, state, self.node_of, self.sites, self.declared)

    def class_sums(self, exp: Experiment, state: State) -> tuple[list[ClassSums], dict[int, str]]:
        """FedNCM's round 0: every node's class sums (``query.class_means``), in client order;
        a client without a node, with an error reply or silent past the round timeout fails."""
        self.record_sites()
        arrays = to_record(state)
        messages, failed = [], {}
        for client in range(exp.cfg.clients.num_clients):
            node = self.node_of.get(client)
            if node is None:
                failed[client] = "no SuperNode declared this partition-id"
                continue
            messages.append(wire.class_means_message(
                node, arrays, client, self.config_toml, self.label_names,
                None if client in self.sites else self.shards[client],
            ))  # fmt: skip
        timeout = exp.cfg.federation.round_timeout
        replies = self.grid.send_and_receive(messages, timeout=timeout) if messages else []
        out = []
        for sender, msg in self.answers(replies, failed):
            try:
                out.append(ClassSums(sender, *wire.read_class_means_reply(msg)))
            except (TypeError, ValueError) as err:  # an unreadable reply fails its client
                failed[sender] = str(err)
        answered = {s.client for s in out} | set(failed)
        for client in range(exp.cfg.clients.num_clients):
            if client not in answered:
                failed[client] = "no reply before the round's timeout"
        for client, reason in sorted(failed.items()):
            logger.warning("round 0: client %d failed: %s", client, reason)
        return sorted(out, key=lambda s: s.client), failed

    def answers(
        self, replies: Iterable[Message], failed: dict[int, str]
    ) -> Iterator[tuple[int, Message]]:
        """(client, reply) of every reply from a known node; an error reply is recorded in
        ``failed`` as the client's failure instead (replies from unknown nodes are ignored)."""
        client_of = self.client_of
        for msg in replies:
            client = client_of.get(msg.metadata.src_node_id)
            if client is None:
                continue
            if msg.has_error():
                failed[client] = f"node error: {msg.error.reason}"
                continue
            yield client, msg

    def messages_for(self, rp: RoundPlan, state: State) -> tuple[list[Message], dict[int, str]]:
        """One train message per allocated client; clients without a node are failures."""
        by_rank: dict[int | None, ArrayRecord] = {}  # one record per rank handed out
        messages, missing = [], {}
        for alloc in rp.plan.clients:
            if not alloc.layers:
                continue
            node = self.node_of.get(alloc.client)
            if node is None:
                missing[alloc.client] = "no SuperNode declared this partition-id"
                continue
            if alloc.rank not in by_rank:
                by_rank[alloc.rank] = to_record(truncate(state, alloc.rank))
            messages.append(wire.train_message(
                node, by_rank[alloc.rank], rp.round, alloc.client, alloc.spec, rp.lr,
                self.config_toml, self.label_names,
                None if alloc.client in self.sites else self.shards[alloc.client],
                rp.clip_norm,
            ))  # fmt: skip
        return messages, missing

    def collect(self, rp: RoundPlan, replies: Iterable[Message], state: State) -> RoundResults:
        """Replies -> client results; error replies and silent nodes -> failures. A result
        whose report claims what the server knows otherwise (``misreported``) is marked
        malformed: aggregation rejects it with that reason."""
        replies = list(replies)
        logger.debug(
            "round %d: %d replies from nodes %s",
            rp.round, len(replies), [m.metadata.src_node_id for m in replies],
        )  # fmt: skip
        spec_of = {a.client: a.spec for a in rp.plan.clients}
        results: list[ClientResult] = []
        failed: dict[int, str] = {}
        for client, msg in self.answers(replies, failed):
            spec = spec_of[client]
            bytes_down = state_nbytes(truncate(state, spec.rank))
            result = wire.read_train_reply(msg, client, spec, bytes_down)
            if result.update.malformed is None:
                result.update.malformed = misreported(
                    result, self.known_examples(client), rp.clip_norm
                )
            results.append(result)
        answered = {r.update.client for r in results} | set(failed)
        for alloc in rp.plan.clients:
            if alloc.layers and alloc.client not in answered:
                failed.setdefault(alloc.client, "no reply before the round's timeout")
        for client, reason in failed.items():
            logger.warning("round %d: client %d failed: %s", rp.round, client, reason)
        results.sort(key=lambda r: r.update.client)  # replies arrive in any order
        return RoundResults(results, failed)


def misreported(result: ClientResult, examples: int | None, clip_norm: float | None) -> str | None:
    """Why a node's report is not to be believed, or None. A node's claims that steer the
    aggregate are checked against what the server knows: ``num_examples`` is the update's
    weight (``federation.weighting = "shard"``, FlexLoRA's), and the server knows the shard
    (``examples``: None where it does not); client-side DP's ``unclipped`` is one bit that
    moves the next round's clip norm (any other value would overflow it or drive it to 0), and
    ``dp_clip_norm`` must be the norm the round asked for (``clip_norm``)."""
    n = result.num_examples
    if examples is not None and n != examples:
        return f"num_examples = {n!r}: the server knows {examples} for this client"
    if result.unclipped is not None and result.unclipped not in (0, 1):
        return f"unclipped = {result.unclipped!r}; allowed: 0 or 1 (clipped, or within the norm)"
    reported = result.dp_clip_norm
    if reported is not None and clip_norm is None:
        return f"dp_clip_norm = {reported!r}, but this round asked for no clipping"
    if reported is not None and reported != clip_norm:
        return f"dp_clip_norm = {reported!r}; allowed: the round's clip norm {clip_norm!r}"
    return None
