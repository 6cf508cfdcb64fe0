"""A SuperNode's own data file: read with the run's columns, labels mapped onto the
federation's classes, trained on instead of the partition; bad files named at the start."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_texts, tiny_overrides
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from fedhello.core.config import build_config, load_config
from fedhello.core.errors import DataError, UserError
from fedhello.data.site import site_label_ids
from fedhello.engine.experiment import Experiment, build_experiment
from fedhello.engine.flower import client_app, node_data
from fedhello.engine.flower.arrays import to_record
from fedhello.engine.flower.declarations import check_reply, register_node
from fedhello.engine.flower.site_ids import assign_clients
from fedhello.model.accelerator import resolve


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages (here: called directly)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def test_labels_map_by_name_or_index_and_unknown_ones_are_named() -> None:
    names = ["animal", "food", "plant"]
    assert site_label_ids(["plant", "animal", 1, "food"], names, "s.csv").tolist() == [2, 0, 1, 1]
    with pytest.raises(DataError) as err:
        site_label_ids(["plant", "mineral"], names, "s.csv")
    msg = str(err.value)
    assert "'s.csv'" in msg and "row 1" in msg and "'mineral'" in msg
    assert "allowed: animal, food, plant" in msg
    with pytest.raises(DataError, match=r"index 0\.\.2"):
        site_label_ids([3], names, "s.csv")


@pytest.fixture(scope="module")
def config_toml(tiny_bert_dir: Path, tiny_text_csv: Path) -> str:
    overrides = tiny_overrides(
        tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"', data__label_column='"topic"'
    )
    return load_config(None, overrides).to_toml()


@pytest.fixture(scope="module")
def site_toml(tiny_bert_dir: Path) -> str:
    """The run's config as a site sees it: the coordinator's dataset is not on the site."""
    overrides = tiny_overrides(
        tiny_bert_dir, "/coordinator/only/tickets.csv", data__text_column='"sentence"',
        data__label_column='"topic"',
    )  # fmt: skip
    return load_config(None, overrides).to_toml()


@pytest.fixture(scope="module")
def labels(config_toml: str) -> list[str]:
    """The federation's classes, which the server sends to every node."""
    cfg = build_config(tomllib.loads(config_toml))
    return list(build_experiment(cfg, encode_data=False).raw.label_names)


def _experiment(config_toml: str) -> Experiment:
    """The server's experiment of ``config_toml`` (its initial adapter and shards)."""
    return build_experiment(build_config(tomllib.loads(config_toml)), encode_data=False)


@pytest.fixture
def fresh_exp(config_toml: str) -> Experiment:
    """An experiment of its own: registering nodes changes its budgets."""
    return build_experiment(build_config(tomllib.loads(config_toml)), encode_data=False)


def _site_csv(path: Path, n: int, seed: int = 7) -> Path:
    texts, labels = make_texts(n, seed)
    pd.DataFrame({"sentence": texts, "topic": labels, "extra": range(n)}).to_csv(path, index=False)
    return path


def _context(**node_config: object) -> Context:
    return Context(run_id=1, node_id=5, node_config=dict(node_config), state=RecordDict(),
                   run_config={})  # fmt: skip


def _query(config_toml: str, ctx: Context, labels: list[str]) -> dict[str, object]:
    config = ConfigRecord({"fedhello-config": config_toml, "label-names": labels})
    msg = Message(RecordDict({"config": config}), dst_node_id=5, message_type=MessageType.QUERY)
    return dict(client_app.query(msg, ctx).content.config_records["config"])


def _train_msg(
    config_toml: str, labels: list[str], state: dict, client: int, rows: object = None
) -> Message:
    config = ConfigRecord({
        "server-round": 1, "client": client, "train-layers": [1, 2], "lr": 1e-2,
        "fedhello-config": config_toml, "label-names": labels,
    })  # fmt: skip
    content = RecordDict({"arrays": to_record(state), "config": config})
    if rows is not None:  # a partition node's shard, as the server sends it
        content["rows"] = ArrayRecord({"rows": Array(np.asarray(rows, dtype=np.int64))})
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)


def test_a_site_trains_on_its_own_file_without_the_configured_dataset(
    config_toml: str, site_toml: str, labels: list[str], tmp_path: Path
) -> None:
    site = _site_csv(tmp_path / "site.csv", 37)
    ctx = _context(**{"partition-id": 1, "data": str(site)})
    info = _query(site_toml, ctx, labels)  # data.name does not exist here: never read
    # 5% (2 rows) held out for the site's evaluation of the final model
    here = resolve()  # the run's auto settings, resolved on this node: what it reports
    assert info == {"partition-id": 1, "data": str(site), "site-examples": 35,
                    "site-validation": 2, "device": "cpu", "precision": here.precision}  # fmt: skip

    exp = _experiment(config_toml)
    own = client_app.train(_train_msg(site_toml, labels, exp.init_state, 1), ctx)
    own_metrics = own.content.metric_records["metrics"]
    assert own_metrics["num-examples"] == 35
    assert set(own.content.array_records["arrays"]) < set(exp.init_state)  # layers 1, 2 + head
    # without data= the same node trains its partition of the configured dataset
    msg = _train_msg(config_toml, labels, exp.init_state, 1, exp.shards[1])
    part = client_app.train(msg, _context(**{"partition-id": 1})).content.metric_records["metrics"]
    assert part["num-examples"] == len(exp.shards[1]) != 35
    assert own_metrics["train-loss"] != part["train-loss"]
    with pytest.raises(DataError, match=r"/coordinator/only/tickets\.csv"):  # it is not there
        client_app.train(_train_msg(site_toml, labels, exp.init_state, 1, exp.shards[1]),
                         _context(**{"partition-id": 1}))  # fmt: skip


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("missing", "no such file or folder"),
        ("no-label-column", "data.label_column = 'topic'"),
        ("unknown-label", "row 2 has label 'class-99'"),
        ("empty", "has no examples"),
    ],
)
def test_a_bad_site_file_stops_the_run_at_discovery(
    site_toml: str, labels: list[str], fresh_exp: Experiment, tmp_path: Path, content: str,
    expected: str,
) -> None:  # fmt: skip
    site = tmp_path / "site.csv"
    if content == "no-label-column":
        pd.DataFrame({"sentence": ["a b"], "label": ["class-0"]}).to_csv(site, index=False)
    elif content == "unknown-label":
        topics = ["class-0", "class-1", "class-99"]
        pd.DataFrame({"sentence": ["a", "b", "c"], "topic": topics}).to_csv(site, index=False)
    elif content == "empty":
        pd.DataFrame({"sentence": [], "topic": []}).to_csv(site, index=False)
    info = _query(site_toml, _context(**{"partition-id": 0, "data": str(site)}), labels)
    assert expected in str(info["data-error"]) and "site.csv" in str(info["data-error"])

    node_of: dict[int, int] = {}
    with pytest.raises(UserError) as err:
        register_node(fresh_exp, node_of, 5, info)
    assert str(err.value).startswith("partition 0: ") and expected in str(err.value)
    assert "\n" not in str(err.value)
    # a site without a partition id is named by its file
    del info["partition-id"]
    with pytest.raises(UserError) as err:
        check_reply(info)
    assert str(err.value).startswith(f"the SuperNode with data='{site}': ")
    assert expected in str(err.value)


def test_site_labels_use_the_federations_class_ids(
    site_toml: str, labels: list[str], tmp_path: Path
) -> None:
    site_model = client_app.node_model_for(site_toml, labels, {})
    site = _site_csv(tmp_path / "site.csv", 20, seed=3)
    data, _ = node_data.site_data_for(site_model, str(site))
    names = pd.read_csv(site)["topic"].tolist()
    assert [labels[i] for i in data.labels.tolist()] == names
    assert data.features["input_ids"].shape == (20, site_model.cfg.model.max_length)


def test_sites_without_partition_id_get_the_free_ids_in_data_path_order(
    fresh_exp: Experiment,
) -> None:
    exp = fresh_exp  # 6 clients
    infos = {
        40: {"data": "/srv/c.csv"}, 10: {"data": "/srv/a.csv", "budget-layers": 1},
        30: {"partition-id": 1}, 20: {"data": "/srv/b.csv"},
    }  # fmt: skip
    node_of = assign_clients(exp, infos)
    assert node_of == {1: 30, 0: 10, 2: 20, 3: 40}
    assert exp.budgets[0] == 1  # the site's declared budget follows it to its assigned id
    too_many = {n: {"data": f"/srv/{n}.csv"} for n in range(7)}
    with pytest.raises(UserError, match="7 SuperNodes gave data= without partition-id, but only 6"):
        assign_clients(exp, too_many)
    with pytest.raises(UserError, match="neither partition-id nor data"):
        check_reply({"budget-layers": 2})


def test_sites_sharing_a_data_path_are_warned_about(
    fresh_exp: Experiment, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        assign_clients(fresh_exp, {8: {"data": "/d.csv"}, 9: {"data": "/d.csv"}})
    assert "same data path ['/d.csv']" in caplog.text and "partition-id" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedhello"):
        assign_clients(fresh_exp, {8: {"data": "/a.csv"}, 9: {"data": "/b.csv"}})
    assert "same data path" not in caplog.text


def test_a_site_without_partition_id_trains_as_the_client_it_was_assigned(
    config_toml: str, site_toml: str, labels: list[str], tmp_path: Path
) -> None:
    site = _site_csv(tmp_path / "site.csv", 23)
    exp = _experiment(config_toml)
    msg = _train_msg(site_toml, labels, exp.init_state, 4)
    reply = client_app.train(msg, _context(data=str(site)))
    assert reply.content.metric_records["metrics"]["num-examples"] == 22  # 1 of 23 held out
    with pytest.raises(ValueError, match="reached partition 3"):
        client_app.train(msg, _context(**{"partition-id": 3, "data": str(site)}))


def test_the_retired_relative_limits_are_refused_naming_their_replacement(
    config_toml: str, fresh_exp: Experiment
) -> None:
    """budget-cost / budget-memory (fractions of a fixed analytic cost, never checked) reach
    the server, which stops before round 1 naming the real-unit limit that replaces each."""
    exp = fresh_exp
    node_of: dict[int, int] = {}
    with pytest.raises(UserError, match=r"^partition 0: budget-memory=0.5 is retired: declare "
                       r"budget-memory-mb=M .*cost profile"):  # fmt: skip
        register_node(exp, node_of, 1, {"partition-id": 0, "budget-memory": 0.5})
    with pytest.raises(UserError, match=r"^partition 1: budget-cost=1.0 is retired: declare "
                       r"budget-step-seconds=S"):  # fmt: skip
        register_node(exp, node_of, 2, {"partition-id": 1, "budget-cost": 1.0})
    ctx = _context(**{"partition-id": 0, "budget-memory": 0.5})  # passed on, not dropped
    assert _query(config_toml, ctx, []) == {
        "partition-id": 0, "budget-memory": 0.5, "device": "cpu", "precision": resolve().precision
    }  # fmt: skip


def test_a_site_evaluates_the_model_on_its_held_out_rows_only(
    config_toml: str, site_toml: str, labels: list[str], tmp_path: Path
) -> None:
    from fedhello.data.site import site_splits
    from fedhello.model.evaluation import evaluate
    from fedhello.model.lora import set_state

    site = _site_csv(tmp_path / "site.csv", 80, seed=5)
    exp = _experiment(config_toml)
    splits = site_splits(80, exp.cfg.data.validation_fraction, exp.cfg.data.split_seed)
    assert len(splits["validation"]) == 4
    assert sorted([*splits["train"], *splits["validation"]]) == list(range(80))
    rng = np.random.default_rng(0)  # a global state that is not the initial one
    state = {k: v + rng.normal(0, 0.5, v.shape).astype(v.dtype) for k, v in exp.init_state.items()}
    config = ConfigRecord({"fedhello-config": site_toml, "client": 0, "label-names": labels})
    msg = Message(RecordDict({"arrays": to_record(state), "config": config}),
                  dst_node_id=5, message_type=MessageType.EVALUATE)  # fmt: skip
    got = client_app.evaluate(msg, _context(data=str(site))).content.metric_records["metrics"]

    # independently: the same state in the server's own model, on the same held-out rows
    data, _ = node_data.site_data_for(client_app.node_model_for(site_toml, labels, {}), str(site))
    set_state(exp.model, state)
    want = evaluate(
        exp.model, data, splits["validation"], 64, exp.accelerator
    )  # the node's precision
    assert got["num-examples"] == 4
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    on_train = evaluate(exp.model, data, splits["train"][:4], 64, exp.accelerator)
    assert on_train["loss"] != pytest.approx(want["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="only a node with its own data file evaluates"):
        client_app.evaluate(msg, _context(**{"partition-id": 0}))


def test_a_partition_node_is_light_it_never_partitions_and_trains_the_rows_it_is_sent(
    config_toml: str, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partition node builds the model and tokenises the rows the server sent: no
    experiment, no split of the whole dataset, no strategy (each costs every deployed
    ClientApp process its start-up); rows that are not training rows of its copy are refused."""
    exp = _experiment(config_toml)
    node_data.CACHE.__init__()  # a fresh ClientApp process

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a partition node split the whole dataset")

    import fedhello.engine.experiment as experiment

    monkeypatch.setattr(experiment, "split_data", forbidden)
    monkeypatch.setattr(experiment, "build_experiment", forbidden)
    monkeypatch.setattr(experiment, "partition_indices", forbidden)
    ctx = _context(**{"partition-id": 2})
    msg = _train_msg(config_toml, labels, exp.init_state, 2, exp.shards[2])
    metrics = client_app.train(msg, ctx).content.metric_records["metrics"]
    assert metrics["num-examples"] == len(exp.shards[2])
    (key,) = [k for k in node_data.CACHE.encoded if k[0] == 2]
    data, _ = node_data.CACHE.encoded[key]
    assert len(data) == len(exp.shards[2]) < len(exp.raw.labels) // 2  # only its shard encoded
    assert np.array_equal(data.labels.numpy(), exp.raw.labels[exp.shards[2]])  # the same rows
    with pytest.raises(ValueError, match="must carry its rows"):
        client_app.train(_train_msg(config_toml, labels, exp.init_state, 2), ctx)
    held_out = exp.raw.splits["test"][:3]  # not training rows: another copy of the data?
    with pytest.raises(DataError, match=r"not training rows of this node's copy \(e.g. \d+\)"):
        client_app.train(_train_msg(config_toml, labels, exp.init_state, 2, held_out), ctx)


def test_a_declared_tier_brings_its_limits_and_a_declared_count_stays_capped(
    tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """``budget-tier`` carries everything the tier holds in the embedded engine, its upload
    limit included (client 5 is tier 2 by default, declares tier 0); a ``budget-layers``
    with the node's own upload limit keeps the count, capped by the upload, under fit auto."""
    overrides = tiny_overrides(
        tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"', data__label_column='"topic"',
        clients__tiers="[0.5, 0.75, 1.0]", clients__upload_mb="[0.05, 1.0, 1.0]",
    )  # fmt: skip
    exp = build_experiment(load_config(None, overrides), encode_data=False)
    assert exp.resources.limits[5] is not None and exp.resources.limits[5].upload_mb == 1.0
    node_of: dict[int, int] = {}
    register_node(exp, node_of, 9, {"partition-id": 5, "budget-tier": 0})
    assert exp.tiers[5] == 0 and exp.resources.limits[5].upload_mb == 0.05
    assert exp.strategy.budgets[5] <= 2  # the tier's 2 of 4 layers, capped by its upload
    plain = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                           data__label_column='"topic"')  # fmt: skip
    exp = build_experiment(load_config(None, plain), encode_data=False)
    assert exp.resources.policy == "off"  # no limit in the config
    register_node(exp, {}, 9, {"partition-id": 1, "budget-layers": 2, "budget-upload-mb": 100.0})
    assert exp.strategy.budgets[1] == 2 and exp.resources.policy == "repair"


def test_a_nodes_own_limit_keeps_its_tiers_other_limits(
    fresh_exp: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node in a tier of real-unit limits that declares its own upload limit keeps the
    tier's memory limit: its value replaces only the tier's of the same kind."""
    from fedhello.core.fit import ResourceLimit
    from fedhello.engine.flower.declarations import register_limit

    exp = fresh_exp
    set_to: list[ResourceLimit] = []
    monkeypatch.setattr(exp.resources, "set_client", lambda s, c, limit, *a: set_to.append(limit))
    exp.resources.limits[2] = ResourceLimit(memory_mb=300.0, upload_mb=1.0)  # the tier's
    register_limit(exp, 2, {"budget-tier": 1, "budget-upload-mb": 0.5}, "partition 2", None)
    assert set_to == [ResourceLimit(memory_mb=300.0, upload_mb=0.5)]
    register_limit(exp, 2, {"budget-upload-mb": 0.5}, "partition 2", None)  # no tier: its own
    assert set_to[-1] == ResourceLimit(upload_mb=0.5)
