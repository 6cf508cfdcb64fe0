"""The wire format between the fedhello ServerApp and ClientApp (Flower records).

Keys are kebab-case. Train message: ``arrays`` (ArrayRecord: the full global adapter, which
the client needs for its forward pass) and ``config`` (ConfigRecord: ``server-round``,
``client``, ``train-layers``, ``lr``, ``fedhello-config``: the resolved config as TOML,
``label-names``: the classes, for sites that hold no copy of the configured dataset).
Train reply: ``arrays`` (only the allocated layers' tensors and the head) and ``metrics``
(MetricRecord: ``num-examples``, ``train-loss``, ``seconds``, ``peak-memory-mb``,
``train-memory-mb``, ``trainable-params``, ``steps``). Query message: ``config`` with
``fedhello-config`` and ``label-names``. Query reply: ``config`` with what the node declares:
``partition-id`` and/or ``data`` (its own file), a budget (``budget-layers``, ``budget-tier``,
``budget-cost``, ``budget-memory``); a node with its own file adds ``site-examples`` and
``site-validation`` (its train / held-out sizes) or ``data-error`` (why the file is unusable:
the server stops the run with it). Evaluate message (sites, after the last round): ``arrays``
and ``config`` as for training; reply ``metrics``: ``num-examples``, ``accuracy``,
``macro-f1``, ``loss`` on the site's held-out rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from fedhello.aggregation import ClientUpdate
from fedhello.lora import state_nbytes
from fedhello.training import ClientResult

METRIC_KEYS = ("seconds", "peak-memory-mb", "train-memory-mb")


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def result_to_reply(result: ClientResult) -> tuple[ArrayRecord, dict[str, float | int]]:
    u = result.update
    metrics = {
        "num-examples": u.num_examples,
        "train-loss": float(u.train_loss),
        "seconds": result.seconds,
        "peak-memory-mb": result.peak_memory_mb,
        "train-memory-mb": result.train_memory_mb,
        "trainable-params": result.trainable_params,
        "steps": result.steps,
    }
    return to_record(u.tensors), metrics


def reply_to_result(
    client: int, layers: tuple[int, ...], arrays: ArrayRecord, metrics: Mapping[str, float | int],
    bytes_down: int,
) -> ClientResult:  # fmt: skip
    """Rebuild a ClientResult from a reply; validation happens later, in aggregation."""
    tensors = from_record(arrays)
    update = ClientUpdate(
        client=client,
        layers=layers,
        num_examples=int(metrics.get("num-examples", 0)),
        tensors=tensors,
        train_loss=float(metrics.get("train-loss", float("nan"))),
    )
    return ClientResult(
        update=update,
        seconds=float(metrics.get("seconds", 0.0)),
        peak_memory_mb=float(metrics.get("peak-memory-mb", 0.0)),
        train_memory_mb=float(metrics.get("train-memory-mb", 0.0)),
        trainable_params=int(metrics.get("trainable-params", 0)),
        bytes_up=state_nbytes(tensors),
        bytes_down=bytes_down,
        steps=int(metrics.get("steps", 0)),
    )
