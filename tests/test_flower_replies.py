"""What the Flower server believes of a node's reply: nothing it can check otherwise. Replies
are built as Flower messages here and read by the server's own functions (no SuperLink): an
inflated example count, a DP bit other than 0 or 1, a clip norm other than the round's, an
array that does not decode and a site's malformed scores are each rejected with a reason that
names the value, and never stop the ServerApp; honest replies still count."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedhello.core.aggregation import ClientUpdate, accept
from fedhello.core.config import load_config
from fedhello.core.heads import ClassSums, class_means_head, sums_problem
from fedhello.core.layers import AllocationPlan, ClientAllocation
from fedhello.core.privacy.server import PrivateAggregator
from fedhello.engine.flower import messages as wire
from fedhello.engine.flower import node_messages as node_wire
from fedhello.engine.flower.arrays import to_record
from fedhello.engine.flower.engine import FlowerEngine
from fedhello.engine.flower.sites import site_scores
from fedhello.engine.rounds import RoundPlan
from fedhello.model.report import ClientResult

# a 2-block adapter: LoRA factors of blocks 0 and 1, and the head
LAYER_OF: dict[str, int | None] = {
    f"enc.layer.{i}.q.lora_{ab}.weight": i for i in range(2) for ab in "AB"
} | {"classifier.modules_to_save.weight": None}
SHARD = {0: 37, 1: 12}  # partition clients 0 and 1: the rows the server sent each
SITE, SITE_EXAMPLES = 2, 20  # client 2 trains on its own file of 20 examples
NODE = {0: 100, 1: 101, SITE: 102}  # client id -> Flower node id


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages (here: called directly)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=(2, 3)).astype(np.float32) for k in LAYER_OF}


def _engine(grid: Any = None) -> FlowerEngine:
    engine = FlowerEngine(grid)
    engine.node_of = dict(NODE)
    engine.shards = [np.arange(SHARD[0]), np.arange(SHARD[0], SHARD[0] + SHARD[1]), np.arange(0)]
    engine.sites = {SITE: "/site.csv"}
    engine.declared = {SITE: {"data": "/site.csv", "site-examples": SITE_EXAMPLES,
                              "site-validation": 4}}  # fmt: skip
    return engine


def _plan(clients: list[int], clip_norm: float | None = None) -> RoundPlan:
    allocs = tuple(ClientAllocation(c, 1, (1,)) for c in clients)
    return RoundPlan(1, clients, AllocationPlan(1, 2, allocs), 0.01, {}, 0.0, clip_norm=clip_norm)


def _reply(client: int, num_examples: int, **report: Any) -> Message:
    """Client ``client``'s train reply: layer 1 and the head, with ``report``'s fields."""
    upload = {k: v for k, v in _state(client + 1).items() if LAYER_OF[k] in (None, 1)}
    update = ClientUpdate(client, (1,), num_examples, upload, 0.7, None, "AB", 32)
    result = ClientResult(update, seconds=1.0, peak_memory_mb=10.0, train_memory_mb=1.0,
                          trainable_params=18, bytes_up=0, bytes_down=0, steps=2,
                          device="cpu", precision="fp32", step_seconds=0.5, **report)  # fmt: skip
    request = wire.train_message(NODE[client], to_record(_state()), 1, client,
                                 update.spec, 0.01, "x = 1", ["a"])  # fmt: skip
    return node_wire.train_reply(request, result)


def _collect(replies: list[Message], clip_norm: float | None = None) -> dict[int, str | None]:
    """client -> why aggregation rejects its update (None: accepted)."""
    clients = sorted({c for c, n in NODE.items() for m in replies if m.metadata.src_node_id == n})
    outcome = _engine().collect(_plan(clients, clip_norm), replies, _state())
    assert not outcome.failed
    _, report = accept(_state(), [r.update for r in outcome.results], LAYER_OF, 2)
    return {c: report.rejected.get(c) for c in clients}


def test_an_inflated_example_count_is_rejected_and_an_honest_one_counts() -> None:
    """``num_examples`` is the update's weight under ``weighting = "shard"``: the server holds
    it to the shard it sent (a partition node) or the count the site declared at discovery."""
    verdict = _collect([
        _reply(0, SHARD[0]), _reply(1, 10 * SHARD[1]), _reply(SITE, SITE_EXAMPLES),
    ])  # fmt: skip
    assert verdict == {
        0: None,
        1: f"num_examples = {10 * SHARD[1]}: the server knows {SHARD[1]} for this client",
        SITE: None,
    }
    n = SITE_EXAMPLES + 1
    assert _collect([_reply(SITE, n)]) == {
        SITE: f"num_examples = {n}: the server knows {SITE_EXAMPLES} for this client"
    }


@pytest.mark.parametrize("bit", [-1_000_000, 2, 1_000_000])
def test_a_dp_bit_other_than_0_or_1_is_rejected(bit: int) -> None:
    verdict = _collect(
        [_reply(0, SHARD[0], dp_clip_norm=0.5, unclipped=bit),
         _reply(1, SHARD[1], dp_clip_norm=0.5, unclipped=0)], clip_norm=0.5,
    )  # fmt: skip
    assert verdict[1] is None
    assert verdict[0] is not None and verdict[0].startswith(f"unclipped = {bit}; allowed: 0 or 1")


@pytest.mark.parametrize("bit", [0, 1])
def test_a_dp_bit_of_0_or_1_with_the_round_s_clip_norm_counts(bit: int) -> None:
    assert _collect([_reply(0, SHARD[0], dp_clip_norm=0.5, unclipped=bit)], 0.5) == {0: None}


@pytest.mark.parametrize(
    ("reported", "round_norm", "why"),
    [(50.0, 0.5, "dp_clip_norm = 50.0; allowed: the round's clip norm 0.5"),
     (0.25, 0.5, "dp_clip_norm = 0.25; allowed: the round's clip norm 0.5"),
     (0.5, None, "dp_clip_norm = 0.5, but this round asked for no clipping")],
)  # fmt: skip
def test_a_clip_norm_other_than_the_round_s_is_rejected(
    reported: float, round_norm: float | None, why: str
) -> None:
    assert _collect([_reply(0, SHARD[0], dp_clip_norm=reported, unclipped=1)], round_norm) == {
        0: why
    }


def test_the_dp_server_rejects_a_bad_bit_instead_of_overflowing() -> None:
    """Another engine's bits meet the same check: -10**6 would overflow ``exp`` in the next
    clip norm (OverflowError), +10**6 would drive it to 0 for the rest of the run."""
    cfg = load_config(None, ["privacy.noise_multiplier=1", "privacy.clip_norm=1.0",
                             'privacy.clipping="adaptive"', "privacy.count_noise=1.0",
                             'privacy.noise="seeded"', "clients.num_clients=4",
                             "clients.per_round=2"])  # fmt: skip
    g = {"l0": np.zeros(4, np.float32), "head": np.zeros(2, np.float32)}
    layer_of = {"l0": 0, "head": None}
    upload = {"l0": np.full(4, 0.01, np.float32), "head": np.zeros(2, np.float32)}
    updates = [ClientUpdate(c, (0,), 10, upload) for c in range(3)]
    plan = AllocationPlan(1, 1, tuple(ClientAllocation(c, 1, (0,)) for c in range(4)))
    for bad in (-(10**6), 10**6, 2):
        agg = PrivateAggregator(cfg)
        _, rejected, record = agg.aggregate(g, updates, {0: bad, 1: 1, 2: 0}, plan, layer_of, 1)
        assert rejected == {0: f"unclipped = {bad}; allowed: 0 or 1 (clipped, or within the "
                                "clip norm)"}  # fmt: skip
        # the two honest bits moved the norm: by exp(-clip_lr * (share - quantile)), near 1
        assert 0.1 < agg.clip_norm < 10 and math.isfinite(record["unclipped_share"])


def _with_array(reply: Message, key: str, array: Array) -> Message:
    reply.content.array_records["arrays"][key] = array
    return reply


HEAD = "classifier.modules_to_save.weight"


@pytest.mark.parametrize(
    ("array", "why"),
    [(Array(dtype="float32", shape=(2, 3), stype="torch.Tensor", data=b"\0" * 200),
      "stype 'torch.Tensor'; allowed: 'numpy.ndarray'"),
     (Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"\x07garbage" * 25),
      "its bytes do not decode as a numpy array"),
     (Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b""),
      "declares float32 [2, 3], more than its 0 bytes hold"),
     (Array(dtype="no-such-dtype", shape=(2, 3), stype="numpy.ndarray", data=b"\0" * 200),
      "declares dtype 'no-such-dtype'"),
     (Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
            data=Array(np.zeros((3, 2), np.float32)).data),
      "decodes to float32 [3, 2], but declares float32 [2, 3]")],
    ids=["torch-stype", "garbage-bytes", "no-bytes", "bad-dtype", "shape-lie"],
)  # fmt: skip
def test_an_unreadable_array_marks_the_update_malformed(array: Array, why: str) -> None:
    """Each used to raise (TypeError or ValueError) out of ``read_train_reply``: the
    ServerApp stopped. Now the update is malformed, naming the key; the others count."""
    bad = _with_array(_reply(0, SHARD[0]), HEAD, array)
    result = wire.read_train_reply(bad, 0, _plan([0]).plan.clients[0].spec, 0)
    assert result.update.malformed is not None
    assert result.update.malformed.startswith(f"malformed reply: array {HEAD!r} is unreadable: ")
    assert why in result.update.malformed
    verdict = _collect([bad, _reply(1, SHARD[1])])
    assert verdict[1] is None and verdict[0] == result.update.malformed


class Grid:
    """Hands back prepared replies (one per node asked)."""

    def __init__(self, edit: dict[int, Any]) -> None:
        self.edit = edit

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list:
        replies = []
        for msg in messages:
            client = {n: c for c, n in NODE.items()}[msg.metadata.dst_node_id]
            sums = np.full((3, 5), float(client + 1))
            reply = node_wire.class_means_reply(msg, sums, np.array([1, 2, 3]))
            if client in self.edit:
                reply.content.array_records["arrays"]["sums"] = self.edit[client]
            replies.append(reply)
        return replies


def test_unreadable_or_string_class_sums_fail_their_client_only() -> None:
    """FedNCM's round 0: sums whose bytes do not decode fail that client (they raised a
    ValueError the engine caught, a TypeError it did not); string sums decode, and are left
    out by ``sums_problem`` (np.isfinite raised a TypeError on them)."""
    from types import SimpleNamespace

    garbage = Array(dtype="float64", shape=(3, 5), stype="numpy.ndarray", data=b"x" * 400)
    torch_ = Array(dtype="float64", shape=(3, 5), stype="torch.Tensor", data=b"x" * 400)
    strings = Array(np.full((3, 5), "1.0"))
    engine = _engine(Grid({0: garbage, 1: torch_, SITE: strings}))
    exp: Any = SimpleNamespace(cfg=SimpleNamespace(clients=SimpleNamespace(num_clients=3),
                               federation=SimpleNamespace(round_timeout=1.0)))  # fmt: skip
    sums, failed = engine.class_sums(exp, _state())
    assert failed[0].startswith("malformed class-means reply: array 'sums': its bytes do not")
    assert failed[1].startswith("malformed class-means reply: array 'sums': stype")
    assert [s.client for s in sums] == [SITE] and sums[0].sums.dtype.kind == "U"
    assert sums_problem(sums[0], (3, 5)) == "sums have dtype <U3; allowed: floating point"
    state = {"head.weight": np.zeros((3, 5), np.float32), "head.bias": np.zeros(3, np.float32)}
    good = ClassSums(1, np.ones((3, 5)), np.array([1, 1, 1]))
    _, info = class_means_head(state, {"head.weight": None, "head.bias": None}, [good, sums[0]])
    assert info["rejected"] == {str(SITE): "sums have dtype <U3; allowed: floating point"}
    assert sums_problem(ClassSums(0, np.ones((3, 5), np.int64), np.ones(3, np.int64)), (3, 5))


GOOD = {"num_examples": 3, "accuracy": 0.75, "macro_f1": 0.5, "loss": 0.9}


@pytest.mark.parametrize(
    ("scores", "why"),
    [({**GOOD, "num_examples": [1, 2]}, "num_examples = [1, 2]; allowed: an integer in 0..3"),
     ({k: v for k, v in GOOD.items() if k != "accuracy"}, "accuracy is missing"),
     ({k: v for k, v in GOOD.items() if k != "loss"}, "loss is missing"),
     ({**GOOD, "num_examples": -5}, "num_examples = -5; allowed: an integer in 0..3"),
     ({**GOOD, "num_examples": 4000}, "num_examples = 4000; allowed: an integer in 0..3"),
     ({**GOOD, "accuracy": math.nan}, "accuracy = nan; allowed: a number"),
     ({**GOOD, "loss": math.inf}, "loss = inf; allowed: a finite number"),
     ({**GOOD, "accuracy": 7.0}, "accuracy = 7.0; allowed: 0..1")],
    ids=["list-count", "no-accuracy", "no-loss", "negative", "above-declared", "nan", "inf",
         "above-1"],
)  # fmt: skip
def test_a_site_s_malformed_scores_are_its_error_and_the_others_count(
    scores: dict[str, Any], why: str
) -> None:
    """Site 1 declared 3 held-out rows, site 2 four; site 1's reply is broken: its entry is an
    error naming the value, and the mean is site 2's alone (a list count crashed the
    ServerApp after its last round; a missing accuracy switched the mean to the loss; a
    negative count or a NaN corrupted it)."""
    node_of = {1: 201, 2: 202}
    declared = {1: {"site-validation": 3}, 2: {"site-validation": 4}}
    good = {"num_examples": 4, "accuracy": 0.5, "macro_f1": 0.25, "loss": 1.5}
    replies = []
    for client, s in ((1, scores), (2, good)):
        request = wire.evaluate_message(node_of[client], ArrayRecord(), client, "x = 1", ["a"])
        replies.append(node_wire.evaluate_reply(request, s))
    out = site_scores(replies, node_of, {1: "/a.csv", 2: "/b.csv"}, declared, generative=False)
    assert out["site_validation"]["2"] == good and list(out["site_validation"]) == ["1", "2"]
    assert out["site_validation"]["1"] == {"error": out["site_validation"]["1"]["error"]}
    assert out["site_validation"]["1"]["error"].startswith(f"malformed scores: {why}")
    assert out["site_validation_accuracy"] == 0.5
    assert out["site_validation_examples"] == 4


def test_honest_sites_are_averaged_by_their_examples() -> None:
    """The check lets honest replies through: a site without held-out rows (count 0, no
    scores) and a language model's sites (loss and perplexity, which may be infinite)."""
    node_of = {1: 201, 2: 202, 3: 203}
    declared = {c: {"site-validation": 5} for c in node_of}
    sent = {1: {"num_examples": 0}, 2: {"num_examples": 1, "loss": 2.0, "perplexity": math.inf},
            3: {"num_examples": 3, "loss": 1.0, "perplexity": math.e}}  # fmt: skip
    replies = [
        node_wire.evaluate_reply(wire.evaluate_message(node_of[c], ArrayRecord(), c, "", []), s)
        for c, s in sent.items()
    ]
    out = site_scores(replies, node_of, dict.fromkeys(node_of, "/x.csv"), declared, True)
    assert out["site_validation"] == {str(c): s for c, s in sent.items()}
    assert out["site_validation_loss"] == pytest.approx((2.0 * 1 + 1.0 * 3) / 4)
    assert out["site_validation_examples"] == 4
