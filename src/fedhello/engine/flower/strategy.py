"""``HelloFedAvg``: FedAvg with heterogeneous LoRA allocation, on Flower's Message API.

Client contract (``fedhello.engine.flower.records`` has the exact keys):

* train message: ``arrays`` = the full global adapter (every LoRA tensor and the head);
  ``config`` = ``server-round``, ``client`` (partition id), ``train-layers`` (list of block
  indices), ``lr``, ``fedhello-config`` (the resolved config as TOML), ``label-names``.
* train reply: ``arrays`` = exactly the LoRA tensors of ``train-layers`` and the head;
  ``metrics`` = ``num-examples``, ``train-loss`` and cost measurements.
* query (once, at start; ``fedhello.engine.flower.discovery``): ``config`` =
  ``fedhello-config``; reply ``config`` = ``partition-id`` and/or ``data``, optionally
  ``budget-layers`` / ``budget-tier``, and ``site-examples`` / ``data-error``.

Differences from stock FedAvg: one message per node with its own ``train-layers`` (stock
FedAvg sends one record to all), nodes sampled by partition id with the run's seeded
generator (Flower's node ids are random per run), and partial per-layer updates aggregated by
``fedhello.aggregation.aggregate_masked``, the embedded engine's function, which validates every
update and carries forward the layers nobody trained (stock FedAvg refuses replies whose
arrays differ in keys).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedhello.aggregation import ServerMomentum
from fedhello.engine.core import RoundPlan, State, close_round, open_round
from fedhello.engine.flower.records import from_record, reply_to_result, to_record
from fedhello.experiment import Experiment
from fedhello.lora import state_nbytes
from fedhello.training import ClientResult

logger = logging.getLogger(__name__)


class HelloFedAvg(FedAvg):
    def __init__(self, exp: Experiment, node_of: dict[int, int], min_replies: int = 1) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1)
        self.exp = exp
        self.node_of = node_of  # partition id -> Flower node id
        self.client_of = {node: pid for pid, node in node_of.items()}
        self.min_replies = min_replies
        self.config_toml = exp.cfg.to_toml()
        self.label_names = list(exp.raw.label_names)  # a site has no other way to know them
        self.momentum = ServerMomentum(
            exp.cfg.federation.server_momentum, exp.cfg.federation.server_lr
        )
        self.round_plan: RoundPlan | None = None
        self._state: State = {}  # the global state of the round in flight (Strategy.start)

    def messages_for(self, rp: RoundPlan, state: State) -> tuple[list[Message], dict[int, str]]:
        """One train message per allocated client; clients without a node are failures."""
        arrays = to_record(state)
        messages, missing = [], {}
        for alloc in rp.plan.clients:
            if not alloc.layers:
                continue
            node = self.node_of.get(alloc.client)
            if node is None:
                missing[alloc.client] = "no SuperNode declared this partition-id"
                continue
            config = ConfigRecord({
                "server-round": rp.round, "client": alloc.client,
                "train-layers": list(alloc.layers), "lr": rp.lr,
                "fedhello-config": self.config_toml, "label-names": self.label_names,
            })  # fmt: skip
            content = RecordDict({"arrays": arrays, "config": config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages, missing

    def collect(
        self, rp: RoundPlan, replies: Iterable[Message], state: State
    ) -> tuple[list[ClientResult], dict[int, str]]:
        """Replies -> client results; error replies and silent nodes -> failures."""
        replies = list(replies)
        logger.debug(
            "round %d: %d replies from nodes %s",
            rp.round, len(replies), [m.metadata.src_node_id for m in replies],
        )  # fmt: skip
        layers_of = {a.client: a.layers for a in rp.plan.clients}
        bytes_down = state_nbytes(state)
        results, failed = [], {}
        for msg in replies:
            client = self.client_of.get(msg.metadata.src_node_id)
            if client is None:
                continue
            if msg.has_error():
                failed[client] = f"node error: {msg.error.reason}"
                continue
            metrics = dict(msg.content.metric_records.get("metrics", {}))
            arrays = msg.content.array_records.get("arrays", ArrayRecord())
            results.append(reply_to_result(client, layers_of[client], arrays, metrics, bytes_down))
        answered = {r.update.client for r in results} | set(failed)
        for alloc in rp.plan.clients:
            if alloc.layers and alloc.client not in answered:
                failed.setdefault(alloc.client, "no reply before the round's timeout")
        for client, reason in failed.items():
            logger.warning("round %d: client %d failed: %s", rp.round, client, reason)
        results.sort(key=lambda r: r.update.client)  # replies arrive in any order
        return results, failed

    # Flower's Strategy interface, for use with ``Strategy.start``.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        state = from_record(arrays)
        self.round_plan = open_round(self.exp, server_round, state)
        self._state = state
        return self.messages_for(self.round_plan, state)[0]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.round_plan is not None and self.round_plan.round == server_round
        results, failed = self.collect(self.round_plan, replies, self._state)
        new_state, record = close_round(
            self.exp, self.round_plan, self._state, results, self.momentum, failed
        )
        metrics: dict[str, Any] = {"num-accepted": len(results) - record["num_rejected"]}
        if "test_accuracy" in record:
            metrics["test-accuracy"] = record["test_accuracy"]
        return to_record(new_state), MetricRecord(metrics)
