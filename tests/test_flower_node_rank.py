"""A Flower node trains exactly the spec the server sends: after its HetLoRA client pruned its
rank, a message at the higher rank (the server rejected the pruned update, so it never
recorded the pruning) is trained and uploaded at that rank, as a node without any history
(and the embedded engine's client) trains it. Driven through the ClientApp's train handler
with the server's own message builder; a tiny BERT, a few steps."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from flwr.app import Context, Message, RecordDict

from fedhello.core.config import build_config, load_config
from fedhello.core.layers import AdapterSpec, keys_for_spec
from fedhello.core.ranks import rank_of, truncate
from fedhello.engine.experiment import build_experiment
from fedhello.engine.flower import client_app
from fedhello.engine.flower import messages as wire
from fedhello.engine.flower.arrays import from_record, to_record

R = 4  # the tiny model's LoRA rank (lora.r): the spec's rank in both rounds
CLIENT = 1


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages (here: called directly)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": CLIENT}, state=RecordDict(),
                   run_config={})  # fmt: skip


def test_a_node_that_pruned_trains_the_higher_rank_the_server_sends_again(
    tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    # a strong regulariser on a non-zero tail: HetLoRA's client prunes 4 -> floor(0.5 * 4) = 2
    overrides = tiny_overrides(
        tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
        data__label_column='"topic"', clients__num_clients=3, lora__r=R,
        allocation__strategy='"hetlora"', allocation__rank_penalty=50.0,
        allocation__rank_decay=0.5, train__local_steps=3,
    )  # fmt: skip
    config_toml = load_config(None, overrides).to_toml()
    exp = build_experiment(build_config(tomllib.loads(config_toml)), encode_data=False)
    labels = list(exp.raw.label_names)
    rng = np.random.default_rng(1)
    state = {  # non-zero B: a tail that starts at zero cannot shrink (nothing would prune)
        k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in exp.init_state.items()
    }
    spec = AdapterSpec(tuple(range(exp.num_layers)), R)

    def message(round_: int) -> Message:
        """The server's train message of ``round_``: the global adapter at ``spec``'s rank."""
        return wire.train_message(5, to_record(truncate(state, R)), round_, CLIENT, spec, 5e-2,
                                  config_toml, labels, exp.shards[CLIENT])  # fmt: skip

    node = _context()
    first = client_app.train(message(1), node)
    assert rank_of(from_record(first.content.array_records["arrays"])) == 2  # it pruned

    # round 2: the server rejected that update, so it hands the node rank 4 again
    again = client_app.train(message(2), node)
    fresh = client_app.train(message(2), _context())  # a node without history
    got = from_record(again.content.array_records["arrays"])
    want = from_record(fresh.content.array_records["arrays"])
    assert got.keys() == want.keys() == set(keys_for_spec(exp.layer_of, spec))
    assert rank_of(got) == rank_of(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # it trained every component of rank 4 (the old node trained rank 2: fewer parameters)
    trained = truncate(state, R)
    expected = sum(trained[k].size for k in keys_for_spec(exp.layer_of, spec, trained=True))
    metrics = again.content.metric_records["metrics"]
    assert metrics["trainable-params"] == expected
    assert expected > sum(
        truncate(state, 2)[k].size for k in keys_for_spec(exp.layer_of, spec, trained=True)
    )
