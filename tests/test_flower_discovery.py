"""Discovery, driven with a fake grid (no SuperLink): a resumed run gives every site that
declared only ``data=`` the client id its first start gave it (``sites.json``), whichever
sites answer, and refuses a site it never had; a node whose ClientApp raises on the query, or
whose reply holds values the server cannot use, stops the run at once with one line that
names the node, the key and the value."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_overrides
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError, RunDirError, UserError
from fedhello.core.layers import AllocationPlan
from fedhello.engine.core import Observer
from fedhello.engine.experiment import Experiment, build_experiment
from fedhello.engine.flower import client_app
from fedhello.engine.flower import node_messages as node_wire
from fedhello.engine.flower.discovery import discover_nodes
from fedhello.engine.flower.engine import FlowerEngine
from fedhello.engine.flower.site_ids import read_site_ids
from fedhello.engine.rounds import RoundPlan
from fedhello.store.runs import RunDir

Node = Callable[[Message], Message]
# three sites that give only their data path, each with its own budget (the tiny BERT has 4
# blocks), so that a client's budget tells which site holds its id
SITES = {"/srv/a.csv": 1, "/srv/b.csv": 2, "/srv/c.csv": 3}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages (here: called directly)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def experiment(model: Path, data: Path, node_wait: float) -> Experiment:
    """A fresh 3-client experiment (registering nodes changes its budgets)."""
    overrides = tiny_overrides(
        model, data, data__text_column='"sentence"', data__label_column='"topic"',
        clients__num_clients=3, clients__per_round=2, federation__node_wait=node_wait,
    )  # fmt: skip
    return build_experiment(load_config(None, overrides), encode_data=False)


@pytest.fixture
def make_exp(tiny_bert_dir: Path, tiny_text_csv: Path) -> Callable[[float], Experiment]:
    return lambda node_wait: experiment(tiny_bert_dir, tiny_text_csv, node_wait)


class FakeGrid:
    """The grid as discovery sees it: these nodes are connected, each answers a query with
    its own function; counts the queries each node got."""

    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes = nodes
        self.queries: Counter[int] = Counter()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.queries[node] += 1
            replies.append(self.nodes[node](msg))
        return replies


def answers(info: dict[str, Any]) -> Node:
    """A node whose ClientApp answers the query with ``info``."""
    return lambda msg: node_wire.query_reply(msg, info)


def runs_client_app(**node_config: Any) -> Node:
    """A node running fedhello's ClientApp with this --node-config; an exception becomes the
    error reply Flower's SuperNode runtime sends (flwr/supernode/runtime/run_clientapp.py)."""
    ctx = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                  run_config={})  # fmt: skip

    def node(msg: Message) -> Message:
        try:
            return client_app.query(msg, ctx)
        except Exception as ex:
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    return node


def site_nodes(paths: Iterable[str], first_node: int) -> dict[int, Node]:
    """The sites, as Flower nodes with ids of their own (random per run in Flower)."""
    return {
        first_node + i: answers({"data": p, "budget-layers": SITES.get(p, 4)})
        for i, p in enumerate(paths)
    }


def empty_round() -> RoundPlan:
    return RoundPlan(1, [], AllocationPlan(1, 4, ()), 0.01, {}, 0.0)


def first_start(exp: Experiment, run: RunDir, nodes: dict[int, Node]) -> FlowerEngine:
    """A new run's start as the run loop makes it: start, create the run, round 1."""
    engine = FlowerEngine(FakeGrid(nodes), run)  # type: ignore[arg-type]
    engine.start(exp)
    run.create()  # the run loop creates a new run only after the engine started
    engine.train_round(exp, empty_round(), exp.init_state, Observer())
    return engine


def test_a_resume_gives_every_site_its_first_id_while_a_site_is_missing(
    make_exp: Callable[[float], Experiment], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir(tmp_path / "run")
    first = first_start(make_exp(1.0), run, site_nodes(sorted(SITES), 100))
    assert first.node_of == {0: 100, 1: 101, 2: 102}
    recorded = json.loads(run.sites_path.read_text())["sites"]
    assert recorded == {"0": "/srv/a.csv", "1": "/srv/b.csv", "2": "/srv/c.csv"}

    # the resume: site b is not there, the others come back as new Flower nodes (c first)
    exp = make_exp(1.0)
    grid = FakeGrid(site_nodes(["/srv/c.csv", "/srv/a.csv"], 200))
    engine = FlowerEngine(grid, run, resume=True)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        engine.start(exp)
    assert time.monotonic() - t0 >= 1.0  # b was waited for, federation.node_wait
    # c keeps client 2 (its seeds, its budget), it does not move into b's id
    assert engine.node_of == {0: 201, 2: 200}
    assert engine.sites == {0: "/srv/a.csv", 2: "/srv/c.csv"}
    assert exp.budgets[0] == SITES["/srv/a.csv"] and exp.budgets[2] == SITES["/srv/c.csv"]
    assert "clients 1 (the site with data='/srv/b.csv')" in caplog.text
    assert "recorded as failed" in caplog.text
    engine.train_round(exp, empty_round(), exp.init_state, Observer())
    assert json.loads(run.sites_path.read_text())["sites"] == recorded  # kept, not rewritten


@pytest.mark.parametrize(
    ("resumed", "node_wait", "expected"),
    [
        # a site the run never had, while a recorded one is missing: refused when it answers
        # (not after federation.node_wait), not given b's id
        ({300: answers({"data": "/srv/a.csv"}), 301: answers({"data": "/srv/new.csv"})}, 30.0,
         "the SuperNode with data='/srv/new.csv' is not a site of this run: the run's "
         "sites.json, written on its first start, records ['/srv/a.csv', '/srv/b.csv', "
         "'/srv/c.csv'], and a resume gives no new site a client id; allowed: those sites"),
        # one more site with a recorded path than the first start had
        (site_nodes(["/srv/a.csv", "/srv/a.csv", "/srv/b.csv"], 300), 30.0,
         "2 SuperNodes gave data='/srv/a.csv' without partition-id, but the run's sites.json, "
         "written on its first start, records 1 with that path"),
        # a partition node that takes a recorded site's id
        ({300: answers({"data": "/srv/a.csv"}), 301: answers({"partition-id": 1})}, 1.0,
         "partition 1: partition-id=1, but this run gave client 1 to the site with "
         "data='/srv/b.csv' on its first start"),
    ],
)  # fmt: skip
def test_a_resume_refuses_a_site_it_never_had(
    make_exp: Callable[[float], Experiment], tmp_path: Path, resumed: dict[int, Node],
    node_wait: float, expected: str,
) -> None:  # fmt: skip
    run = RunDir(tmp_path / "run")
    first_start(make_exp(1.0), run, site_nodes(sorted(SITES), 100))
    engine = FlowerEngine(FakeGrid(resumed), run, resume=True)  # type: ignore[arg-type]
    exp = make_exp(node_wait)
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        engine.start(exp)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 10


def test_a_damaged_sites_json_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "sites.json"
    assert read_site_ids(path) is None  # a run started before fedhello kept the ids
    path.write_text('{"sites": {"0": "/srv/a.csv"}}')
    assert read_site_ids(path) == {0: "/srv/a.csv"}
    for text in ("{", '{"sites": {"zero": "/srv/a.csv"}}', "[1]"):
        path.write_text(text)
        with pytest.raises(RunDirError, match=r"sites\.json.*allowed: the JSON object"):
            read_site_ids(path)


def test_a_node_whose_client_app_raises_on_the_query_stops_the_run_at_once(
    make_exp: Callable[[float], Experiment],
) -> None:
    """A node whose ClientApp raises on the query stops the run with the reason after one
    query, not after federation.node_wait with the node left out, and fedhello's ClientApp
    answers ``budget-layers="three"`` with the key named; a node whose query was lost (a
    transient error) is asked again."""
    lost: list[int] = []

    def flaky(msg: Message) -> Message:  # lost once, then answers
        if not lost:
            lost.append(1)
            error = Error(ErrorCode.MESSAGE_UNAVAILABLE, "gone")
            return Message(error, reply_to=msg)
        return node_wire.query_reply(msg, {"partition-id": 0})

    grid = FakeGrid({7: flaky, 8: runs_client_app(**{"partition-id": 2})})
    node_of, _, _ = discover_nodes(grid, make_exp(5.0))  # type: ignore[arg-type]
    assert node_of == {0: 7, 2: 8} and grid.queries[7] == 2

    def raises(msg: Message) -> Message:  # Flower's error reply for a ClientApp that raised
        reason = "<class 'ValueError'>:<'invalid literal for int() with base 10: 'three''>"
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    grid, exp = FakeGrid({7: answers({"partition-id": 0}), 9: raises}), make_exp(5.0)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        discover_nodes(grid, exp)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 2.5 and grid.queries[9] == 1
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "the SuperNode with Flower node id 9 could not answer the query: its ClientApp raised "
        "ValueError: invalid literal for int() with base 10: 'three'; check the values of its "
        "--node-config (allowed: integers partition-id, budget-layers, budget-tier;"
    )
    # fedhello's own ClientApp names the key: the line says which node and which value
    bad = runs_client_app(**{"partition-id": 1, "budget-layers": "three"})
    grid = FakeGrid({7: answers({"partition-id": 0}), 9: bad})
    with pytest.raises(UserError) as err:
        discover_nodes(grid, make_exp(5.0))  # type: ignore[arg-type]
    assert str(err.value) == "partition 1: --node-config budget-layers='three'; allowed: an integer"
    assert grid.queries[9] == 1


def no_config_record(msg: Message) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=msg)


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (answers({"partition-id": "x"}),
         "a SuperNode declared partition-id='x'; allowed: an integer 0..2"),
        (answers({"partition-id": 1, "budget-layers": "x"}),
         "partition 1: budget-layers='x'; allowed: an integer 1..4"),
        (answers({"partition-id": 1, "budget-tier": 1.5}),
         "partition 1: budget-tier=1.5; allowed: an integer 0..2"),
        (answers({"data": "/srv/a.csv", "budget-memory-mb": "lots"}),
         "the SuperNode with data='/srv/a.csv': budget-memory-mb='lots'; allowed: a positive "
         "limit"),
        (answers({"partition-id": 1, "budget-upload-mb": float("inf")}),
         "partition 1: budget-upload-mb=inf; allowed: a positive limit"),
        (answers({"partition-id": 1, "budget-upload-mb": 5.0, "cost-profile": "{not json"}),
         "partition 1: cost-profile='{not json' is unreadable (JSONDecodeError: "),
        (answers({"partition-id": 1, "budget-step-seconds": 1.0, "cost-profile": "[]"}),
         "partition 1: cost-profile='[]' is unreadable (AttributeError: "),
        (answers({"data": 3}), "a SuperNode declared data=3; allowed: the path of its own"),
        (answers({"data": "/srv/a.csv", "config-error": "budget-layers='three'; allowed: N"}),
         "the SuperNode with data='/srv/a.csv': budget-layers='three'; allowed: N"),
        (no_config_record,
         "the SuperNode with Flower node id 9 answered the query without a 'config' record"),
    ],
)  # fmt: skip
def test_a_reply_the_server_cannot_use_is_one_line_naming_node_key_and_value(
    make_exp: Callable[[float], Experiment], node: Node, expected: str
) -> None:
    grid, exp = FakeGrid({7: answers({"partition-id": 0}), 9: node}), make_exp(5.0)
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        discover_nodes(grid, exp)  # type: ignore[arg-type]
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 2.5
