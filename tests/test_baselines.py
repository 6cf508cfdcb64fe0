"""The baselines on a tiny model: rank slices, HetLoRA's self-pruning, FFA-LoRA's frozen A,
FedRA's subnetwork client, and whole federations of each (reproducible, resumable, exported
adapters that plain PEFT loads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_after, peft_test_accuracy, tiny_overrides
from safetensors.numpy import load_file

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.core.hooks import HookSpec
from fedhello.core.layers import AdapterSpec, layer_of_keys, lora_factor
from fedhello.core.ranks import truncate
from fedhello.model.accelerator import resolve
from fedhello.model.lora import adapter_keys, build_lora_model, get_state, set_state
from fedhello.model.subnetwork import subnetwork
from fedhello.model.training import LocalTask, Shard, train_client
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

R = 4  # the tiny models' LoRA rank


def _setup(tiny_bert_dir: Path):
    from test_training import _model, _text_data

    loaded, model = _model(tiny_bert_dir, ["class-0", "class-1", "class-2", "class-3"])
    keys = adapter_keys(model)
    layer_of = layer_of_keys(keys, 4)
    rng = np.random.default_rng(1)
    state = {  # non-zero B, so that every factor has a gradient and a tail to shrink
        k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
        for k, v in get_state(model, keys).items()
    }
    return loaded, model, layer_of, state, _text_data(loaded)


def _train(model, layer_of, data, state, spec: AdapterSpec, hooks: tuple[HookSpec, ...] = (),
           steps: int = 3, lr: float = 1e-2):  # fmt: skip
    cfg = load_config(None, [f"train.local_steps={steps}", "train.batch_size=8"]).train
    task = LocalTask(0, 1, spec, lr, 0, hooks)
    shard = Shard(data, np.arange(len(data)))
    return train_client(model, layer_of, shard, task, state, cfg, resolve("cpu", "fp32", "fp32"))


def test_ffa_lora_never_changes_a(tiny_bert_dir: Path) -> None:
    _, model, layer_of, state, data = _setup(tiny_bert_dir)
    result = _train(model, layer_of, data, state, AdapterSpec((1, 3), None, "B"))
    params = dict(model.named_parameters())
    for key in layer_of:
        if lora_factor(key) == "A":
            np.testing.assert_array_equal(params[key].detach().numpy(), state[key])
    uploaded = set(result.update.tensors)
    assert not any(lora_factor(k) == "A" for k in uploaded)
    assert {layer_of[k] for k in uploaded} == {None, 1, 3}
    assert all(not np.array_equal(result.update.tensors[k], state[k]) for k in uploaded)


def test_a_rank_slice_trains_and_uploads_at_its_rank(tiny_bert_dir: Path) -> None:
    _, model, layer_of, state, data = _setup(tiny_bert_dir)
    kept = {k: v.copy() for k, v in state.items()}
    full = _train(model, layer_of, data, state, AdapterSpec((0, 1, 2, 3), R))
    sliced = _train(model, layer_of, data, state, AdapterSpec((0, 1, 2, 3), 2))
    # the slice's parameters never alias the global state handed in (A[:r] is a contiguous
    # view of it): training a client must leave the server's state as it was
    assert all(np.array_equal(state[k], kept[k]) for k in state)
    for key, value in sliced.update.tensors.items():
        want = truncate({key: state[key]}, 2)[key].shape
        assert value.shape == want
    # the lower rank has fewer trainable parameters and sends less both ways
    assert sliced.trainable_params < full.trainable_params
    assert sliced.bytes_up < full.bytes_up and sliced.bytes_down < full.bytes_down
    # scaling is rank-independent: a rank-2 slice whose tail was zero computes what the whole
    # adapter computes (alpha / r_max in both)
    zero_tail = {k: np.array(v) for k, v in state.items()}
    for k, v in zero_tail.items():
        if lora_factor(k) == "A":
            v[2:] = 0
    batch = {k: torch.as_tensor(v[:4]) for k, v in data.batch(np.arange(4)).items()}
    model.eval()
    set_state(model, zero_tail)
    whole = model(**batch).logits
    set_state(model, truncate(zero_tail, 2))
    torch.testing.assert_close(model(**batch).logits, whole)
    set_state(model, state)  # and back to the full rank
    assert dict(model.named_parameters())[next(iter(layer_of))].shape[0] in (R, 32)


def test_hetlora_prunes_when_its_tail_shrinks_and_not_otherwise(tiny_bert_dir: Path) -> None:
    _, model, layer_of, state, data = _setup(tiny_bert_dir)
    layers = (0, 1, 2, 3)
    spec = AdapterSpec(layers, R)
    strong = (HookSpec("rank-pruning", {"penalty": 50.0, "decay": 0.5, "min_rank": 1}),)
    pruned = _train(model, layer_of, data, state, spec, strong, lr=5e-2)
    assert pruned.update.upload_rank == 2  # floor(0.5 * 4)
    # the regulariser has a gradient: without it the same steps end elsewhere
    off = (HookSpec("rank-pruning", {"penalty": 0.0, "decay": 0.5, "min_rank": 1}),)
    plain = _train(model, layer_of, data, state, spec, off, lr=5e-2)
    key = next(k for k in layer_of if lora_factor(k) == "B")
    assert not np.allclose(plain.update.tensors[key][:, :2], pruned.update.tensors[key])
    # a tail that starts at zero cannot shrink: no pruning (the first round from B = 0)
    zero_b = {k: (np.zeros_like(v) if lora_factor(k) == "B" else v) for k, v in state.items()}
    kept = _train(model, layer_of, data, zero_b, spec, strong, lr=5e-2)
    assert kept.update.upload_rank == R


def test_a_subnetwork_client_is_the_model_without_its_other_blocks(tiny_bert_dir: Path) -> None:
    """Independent check: a 2-block BERT built from a config and given blocks 1 and 3's
    weights computes what the 4-block model does under ``subnetwork(model, [1, 3])``."""
    from transformers import AutoModel

    from fedhello.model.pooled import PooledForSequenceClassification

    _, model, _, state, data = _setup(tiny_bert_dir)
    set_state(model, state)
    model.eval()
    batch = {k: torch.as_tensor(v[:4]) for k, v in data.batch(np.arange(4)).items()}
    with subnetwork(model, [1, 3], 4):
        sub = model(**batch).logits
    full = model(**batch).logits
    assert not torch.allclose(sub, full)  # the blocks list is restored afterwards
    # the same head as the model under test (the tiny BERT's pooler is untrained: mean pooling)
    assert getattr(model.config, "fedhello_pooling", None) == "mean"
    encoder = AutoModel.from_pretrained(tiny_bert_dir, num_hidden_layers=2)
    small = PooledForSequenceClassification.from_encoder(encoder, "mean", list("abcd"))
    small_peft = build_lora_model(small, R, 8, 0.1, ["auto"])
    rename = {f".layer.{old}.": f".layer.{new}." for new, old in enumerate((1, 3))}
    src = model.state_dict()
    dst = small_peft.state_dict()
    for name in dst:
        origin = name
        for new_part, old_part in ((v, k) for k, v in rename.items()):
            origin = origin.replace(new_part, old_part) if new_part in name else origin
        dst[name] = src[origin]
    small_peft.load_state_dict(dst)
    small_peft.eval()
    torch.testing.assert_close(small_peft(**batch).logits, sub)


def test_a_subnetwork_client_keeps_less_for_backward(tiny_bert_dir: Path) -> None:
    _, model, layer_of, state, data = _setup(tiny_bert_dir)
    full = _train(model, layer_of, data, state, AdapterSpec((0,)))
    sub = _train(model, layer_of, data, state, AdapterSpec((0,)), (HookSpec("subnetwork"),))
    # block 0 alone: the full model also runs (and saves for backward) blocks 1-3 above it
    assert sub.train_memory_mb < 0.5 * full.train_memory_mb
    assert set(sub.update.tensors) == set(full.update.tensors)


# ---- whole federations -----------------------------------------------------------------------

METHODS = {
    "hetlora": {"allocation__strategy": '"hetlora"', "allocation__rank_penalty": 0.5},
    "flexlora": {"allocation__strategy": '"flexlora"'},
    "ffa-lora": {"allocation__strategy": '"ffa-lora"'},
    "fedra-subnetwork": {"allocation__strategy": '"fedra"',
                         "allocation__client_model": '"subnetwork"'},
}  # fmt: skip


def method_overrides(model: Path, data: Path, method: str, **extra: object) -> list[str]:
    settings: dict[str, object] = {
        "data__text_column": '"sentence"', "data__label_column": '"topic"',
        "clients__num_clients": 3, "clients__per_round": 3, "federation__rounds": 3,
        "lora__r": R, "train__lr": 0.02, "clients__tiers": "[0.25, 0.5, 1.0]",
    }  # fmt: skip
    return tiny_overrides(model, data, **(settings | METHODS[method] | extra))


def run(out: Path, overrides: list[str], *extra: str) -> int:
    args = ["run", "--out", str(out), *extra]
    for o in overrides:
        args += ["--set", o]
    return main(args)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_baseline_runs_and_exports_a_plain_peft_adapter(
    method: str, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """(That a run is reproducible, the Flower tests show: the simulation of each baseline
    equals its embedded run, metrics and adapter.)"""
    ov = method_overrides(tiny_bert_dir, tiny_text_csv, method)
    a = tmp_path / "a"
    assert run(a, ov) == 0
    records = RunDir(a).read_metrics()
    clients = [c for r in records for c in r["clients"]]
    assert all(c["accepted"] for c in clients)
    if method in ("hetlora", "flexlora"):  # tiers 1/4, 1/2, 1 of 4 layers at rank 4
        assert {c["client"]: c["layers"] for c in clients}[0] == [0, 1, 2, 3]
        first = {c["client"]: c["rank"] for c in records[0]["clients"]}
        assert first == {0: 1, 1: 2, 2: 4}
    if method == "flexlora":
        spectra = records[-1]["singular_values"]
        assert len(spectra) == 8 and all(len(s) == 2 * R for s in spectra.values())
    if method == "hetlora":
        # each weight is recorded rounded (6 decimals): their sum is 1 to within the rounding
        assert sum(records[-1]["sparsity_weights"].values()) == pytest.approx(1.0, abs=1e-5)
        # client ranks only shrink
        for c in range(3):
            ranks = [x["rank"] for r in records for x in r["clients"] if x["client"] == c]
            assert ranks == sorted(ranks, reverse=True)
    if method == "ffa-lora":  # A stays at its shared initialisation
        ckpt = load_file(str(sorted((a / "checkpoints").glob("round-*.safetensors"))[0]))
        last = load_file(str(sorted((a / "checkpoints").glob("round-*.safetensors"))[-1]))
        a_keys = [k for k in last if lora_factor(k) == "A"]
        assert a_keys and all(np.array_equal(ckpt[k], last[k]) for k in a_keys)
        assert any(not np.array_equal(ckpt[k], last[k]) for k in last if lora_factor(k) == "B")
    if method == "fedra-subnetwork":
        assert RunDir(a).read_summary()["strategy"] == "fedra"
    summary = RunDir(a).read_summary()
    assert peft_test_accuracy(a, tiny_bert_dir) == pytest.approx(summary["test_accuracy"])
    # the adapter says its scaling: PEFT's alpha / r with the global r (clients' slices too)
    peft_config = json.loads((a / "adapter/adapter_config.json").read_text())
    note = json.loads((a / "adapter/fedhello.json").read_text())
    assert peft_config["r"] == note["r"] == R and note["lora_alpha"] == peft_config["lora_alpha"]
    assert note["method"] == summary["strategy"] and "global r" in note["scaling"]


def test_a_resumed_hetlora_run_equals_an_uninterrupted_one(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    ov = method_overrides(tiny_bert_dir, tiny_text_csv, "hetlora", federation__rounds=4)
    ref = tmp_path / "ref"
    assert run(ref, ov) == 0
    records = RunDir(ref).read_metrics()
    assert any(c["rank"] < first["rank"] for r in records[1:] for c in r["clients"]
               for first in records[0]["clients"] if first["client"] == c["client"]), (
        "no client pruned: the resume would not exercise the pruned ranks"
    )  # fmt: skip
    crashed = crash_after(ref, tmp_path / "crashed", 2)
    assert main(["run", "--resume", str(crashed)]) == 0
    assert [without_machine(x) for x in RunDir(crashed).read_metrics()] == [
        without_machine(x) for x in records
    ]
    x, y = (
        load_file(str(ref / "adapter/adapter_model.safetensors")),
        load_file(str(crashed / "adapter/adapter_model.safetensors")),
    )
    assert all(np.array_equal(x[k], y[k]) for k in x)
