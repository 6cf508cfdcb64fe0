"""What a Flower node keeps between messages, and its examples: the per-process cache (one
model, the configured dataset a partition node's rows refer to, the encoded examples) and the
readers that fill it (a site's own file; a partition node's rows, the positions the server
sent).

Apart from the ClientApp's handlers (``client_app``) because this is the node's data, not its
protocol: it reads files and encodes rows, and never sees a message or a Flower context. The
model is built by ``client_app.node_model_for`` (into this cache), since building it sets up
the process (threads, deterministic mode), which only the ClientApp's own module does.

The cache is process state on purpose: in Flower's simulation a Ray actor serves many
messages and keeps it; in a deployment each message starts a fresh process and rebuilds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from fedhello.core.errors import DataError
from fedhello.data.encoding import ModelInputs, encode, encode_positions
from fedhello.data.loading import RawData, load_raw
from fedhello.data.site import load_site_raw
from fedhello.engine.node import NodeModel
from fedhello.model.training import Shard


class NodeCache:
    """One model per process (bounded memory), the configured dataset a partition node's
    rows refer to (read once), and the node's encoded examples with their splits, keyed by
    (client, file) for a site and (client, digest of the rows) for a partition node."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.model: Any = None
        self.raw: RawData | None = None
        self.encoded: dict[tuple[int, str], tuple[ModelInputs, dict[str, np.ndarray]]] = {}

    def get(self, key: str, build: Callable[[], NodeModel]) -> NodeModel:
        if key != self.key:
            self.key, self.model, self.raw, self.encoded = None, None, None, {}
            self.model, self.key = build(), key
        return self.model


CACHE = NodeCache()


def configured_data(node: NodeModel) -> RawData:
    """The configured dataset as the server read it, once per process: a partition node's
    rows are positions in it. A copy whose classes differ from the server's is refused (its
    positions would name other examples)."""
    if CACHE.raw is None:
        cfg = node.cfg
        raw = load_raw(cfg.data, node.task, cfg.model.allow_download)
        if raw.label_names != node.label_names:
            raise DataError(
                f"data.name = {cfg.data.name!r}: this node's copy has {len(raw.label_names)} "
                f"classes ({', '.join(raw.label_names[:3])}, ...), the server's "
                f"{len(node.label_names)} ({', '.join(node.label_names[:3])}, ...); allowed: "
                "the same dataset on every partition node"
            )
        CACHE.raw = raw
    return CACHE.raw


def site_data_for(site: NodeModel, path: str) -> tuple[ModelInputs, dict[str, np.ndarray]]:
    """The node's own file and its train / validation rows, read and encoded once."""
    key = (-1, path)
    if key not in CACHE.encoded:
        raw = load_site_raw(path, site.cfg.data, site.task, site.label_names)
        CACHE.encoded[key] = (
            encode(raw, site.processor, site.cfg.model.max_length, site.cfg.data.augment),
            raw.splits,
        )
    return CACHE.encoded[key]


def partition_shard(node: NodeModel, client: int, rows: np.ndarray) -> Shard:
    """A partition node's shard alone, encoded (row i is the server's shard position i, so
    batches are the embedded engine's), with every row to train on; ``rows``: the positions
    the server sent."""
    key = (client, hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest())
    if key not in CACHE.encoded:
        raw = configured_data(node)
        train = raw.splits["train"]
        outside = np.setdiff1d(rows, train)
        if outside.size:
            raise DataError(
                f"data.name = {node.cfg.data.name!r}: the server sent client {client} rows "
                f"that are not training rows of this node's copy (e.g. {int(outside[0])}); "
                "allowed: the same dataset and data settings on every partition node"
            )
        cfg = node.cfg
        encoded = encode_positions(raw, rows, node.processor, cfg.model.max_length,
                                   cfg.data.augment)  # fmt: skip
        CACHE.encoded[key] = encoded, {"train": np.arange(len(encoded))}
    data, splits = CACHE.encoded[key]
    return Shard(data, splits["train"])
