"""A client's report, declared once (``fedhello.model.report.REPORT``): it survives the Flower
wire field for field, a reply missing or mistyping a required field is rejected naming it, and
the run's record of a client keeps its historical keys, order and rounding."""

from __future__ import annotations

import dataclasses
import typing
from types import SimpleNamespace

import numpy as np
import pytest

from fedhello.core.aggregation import ClientUpdate
from fedhello.core.allocation import build_strategy
from fedhello.core.layers import AdapterSpec, AllocationPlan
from fedhello.engine.flower import messages as wire
from fedhello.engine.flower import node_messages, report_wire
from fedhello.engine.flower.arrays import to_record
from fedhello.engine.records import client_record
from fedhello.model.report import REPORT, ClientResult

# a 2-block adapter: LoRA factors of blocks 0 and 1, and the head
LAYER_OF: dict[str, int | None] = {
    f"enc.layer.{i}.q.lora_{ab}.weight": i for i in range(2) for ab in "AB"
} | {"classifier.modules_to_save.weight": None}
SPEC = AdapterSpec((1,))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages (here: called directly)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(2, 3)).astype(np.float32) for k in LAYER_OF}


def _result(device_peak: float | None = 123.456) -> ClientResult:
    upload = {k: v for k, v in _state(1).items() if LAYER_OF[k] in (None, 1)}
    update = ClientUpdate(4, SPEC.layers, 37, upload, 1.2345678901234567, None, "AB", 160)
    return ClientResult(
        update, seconds=1.23456789, peak_memory_mb=612.345, train_memory_mb=0.1234567,
        trainable_params=644, bytes_up=72, bytes_down=168, steps=5, device="cuda:0",
        precision="bf16", device_peak_memory_mb=device_peak, step_seconds=0.0123456789,
        cpu_seconds=2.3456789,
    )  # fmt: skip


def _round_trip(result: ClientResult, edit: typing.Callable[[typing.Any], None] | None = None):
    request = wire.train_message(9, to_record(_state(0)), 3, 4, SPEC, 0.01, "x = 1", ["a"])
    reply = node_messages.train_reply(request, result)
    if edit is not None:
        edit(reply.content)
    return wire.read_train_reply(reply, 4, SPEC, bytes_down=168)


def test_the_declaration_is_the_result_s_fields() -> None:
    """Every declared field is a ClientResult attribute (or its update's) of that type."""
    own = typing.get_type_hints(ClientResult)
    upd = typing.get_type_hints(ClientUpdate)
    declared = {f.name for f in REPORT}
    assert declared == set(own) - {"update"} | {"num_examples", "examples_seen", "train_loss"}
    for f in REPORT:
        hint = own.get(f.name, upd.get(f.name))
        allowed = typing.get_args(hint) or (hint,)
        assert f.type in allowed, (f.name, hint)
        assert f.required == (type(None) not in allowed), f.name


@pytest.mark.parametrize("device_peak", [123.456, None], ids=["cuda", "cpu"])
def test_every_field_survives_the_wire(device_peak: float | None) -> None:
    sent = _result(device_peak)
    back = _round_trip(sent)
    assert back.update.malformed is None
    for f in REPORT:
        assert getattr(back, f.name) == getattr(sent, f.name), f.name
        assert type(getattr(back, f.name)) is type(getattr(sent, f.name)), f.name
    assert back.update.tensors.keys() == sent.update.tensors.keys()
    assert all(np.array_equal(back.update.tensors[k], v) for k, v in sent.update.tensors.items())
    assert (back.update.client, back.update.layers, back.update.rank, back.update.factors) == (
        4, SPEC.layers, SPEC.rank, SPEC.factors,
    )  # fmt: skip


def test_the_wire_keys_are_the_client_contract() -> None:
    """The keys the ClientApp sends, as the messages module's docstring states them."""
    metrics, config = report_wire.encode_report(_result())
    assert list(metrics) == [
        "num-examples", "steps", "examples-seen", "train-loss", "trainable-params", "seconds",
        "peak-memory-mb", "train-memory-mb", "step-seconds", "cpu-seconds", "device-peak-memory-mb",
    ]  # fmt: skip
    assert config == {"device": "cuda:0", "precision": "bf16"}
    assert all(f"``{k}``" in (wire.__doc__ or "") for k in [*metrics, *config])


def _reject(result: ClientResult) -> str:
    strategy = build_strategy("fedra", num_layers=2, budgets=[1] * 5)
    _, report, _ = strategy.aggregate(_state(0), [result.update], dict(LAYER_OF), "shard")
    assert report.accepted == []
    return report.rejected[result.update.client]


def test_a_reply_without_num_examples_is_rejected_naming_it() -> None:
    def drop(content):
        del content.metric_records["metrics"]["num-examples"]

    back = _round_trip(_result(), drop)
    reason = _reject(back)
    assert "'num-examples'" in reason and "missing" in reason, reason
    assert "must be a positive integer" not in reason  # not the wrong reason (a silent 0)
    # the round's record of that client says why, with the historical keys
    exp = SimpleNamespace(tiers=[0] * 5, budgets=[1] * 5, resources=SimpleNamespace(
        record=lambda c: {}))  # fmt: skip
    plan = AllocationPlan(round=3, num_layers=2, clients=())
    rec = client_record(exp, back, {4: reason}, plan)  # type: ignore[arg-type]
    assert rec["accepted"] is False and rec["rejected_reason"] == reason


@pytest.mark.parametrize(
    "where,key,value",
    [("metrics", "train-loss", None), ("metrics", "steps", 2.5), ("config", "device", None),
     ("metrics", "num-examples", 12.0), ("config", "precision", 16)],
)  # fmt: skip
def test_a_missing_or_mistyped_required_field_is_named(where: str, key: str, value) -> None:
    def edit(content):
        record = content.metric_records if where == "metrics" else content.config_records
        if value is None:
            del record[where][key]
        else:
            record[where][key] = value

    reason = _reject(_round_trip(_result(), edit))
    assert f"{where} '{key}'" in reason, reason


def test_an_optional_field_may_be_absent() -> None:
    back = _round_trip(_result(device_peak=None))
    assert back.update.malformed is None and back.device_peak_memory_mb is None


def test_a_node_that_does_not_measure_cpu_seconds_is_accepted() -> None:
    """A node of a fedhello from before ``cpu-seconds`` sends none: its update is accepted and
    its record has no ``cpu_seconds`` (the summary's total is then None, not a partial sum)."""

    def drop(content):
        del content.metric_records["metrics"]["cpu-seconds"]

    back = _round_trip(_result(), drop)
    assert back.update.malformed is None and back.cpu_seconds is None
    exp = SimpleNamespace(tiers=[0] * 5, budgets=[2] * 5, resources=SimpleNamespace(
        record=lambda c: {}))  # fmt: skip
    plan = AllocationPlan(round=1, num_layers=2, clients=())
    assert "cpu_seconds" not in client_record(exp, back, {}, plan)  # type: ignore[arg-type]
    assert client_record(exp, _result(), {}, plan)["cpu_seconds"] == 2.3457  # type: ignore[arg-type]


def test_the_record_keeps_its_keys_order_and_rounding() -> None:
    """metrics.jsonl's client entry, derived from the declaration: the keys and order it had
    before the declaration existed (``cpu_seconds`` added after them), each value rounded as
    before."""
    exp = SimpleNamespace(tiers=[0] * 5, budgets=[2] * 5, resources=SimpleNamespace(
        record=lambda c: {"memory_limit_mb": 1.5}))  # fmt: skip
    plan = AllocationPlan(round=1, num_layers=2, clients=())
    r = _result()
    rec = client_record(exp, r, {}, plan)  # type: ignore[arg-type]
    assert list(rec) == [
        "client", "tier", "budget", "layers", "num_examples", "steps", "examples_seen",
        "train_loss", "trainable_params", "seconds", "peak_memory_mb", "train_memory_mb",
        "step_seconds", "cpu_seconds",  # the last one added since
        "memory_limit_mb", "device_peak_memory_mb", "device", "precision", "bytes_up",
        "bytes_down", "accepted",
    ]  # fmt: skip
    assert rec["seconds"] == round(r.seconds, 4) and rec["step_seconds"] == round(r.step_seconds, 5)
    assert rec["peak_memory_mb"] == round(r.peak_memory_mb, 1)
    assert rec["train_memory_mb"] == round(r.train_memory_mb, 3)
    assert rec["device_peak_memory_mb"] == round(123.456, 1)
    assert rec["train_loss"] == r.update.train_loss  # as measured
    on_cpu = dataclasses.replace(r, device_peak_memory_mb=None)
    assert client_record(exp, on_cpu, {}, plan)["device_peak_memory_mb"] is None  # type: ignore[arg-type]
