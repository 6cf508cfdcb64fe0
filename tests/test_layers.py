from __future__ import annotations

import pytest

from fedhello.core.layers import (
    AllocationPlan,
    ClientAllocation,
    check_layers,
    keys_for_layers,
    layer_index_of,
)

PREFIX = "base_model.model.bert.encoder.layer"


@pytest.mark.parametrize("block", [0, 1, 2, 10, 11, 23])
def test_layer_index_parses_the_integer_not_a_substring(block: int) -> None:
    for part in ("query.lora_A.default.weight", "value.lora_B.default.weight"):
        assert layer_index_of(f"{PREFIX}.{block}.attention.self.{part}") == block


def test_layer_one_is_not_layer_eleven() -> None:
    names = [f"{PREFIX}.{b}.attention.self.query.lora_A.default.weight" for b in (1, 10, 11)]
    assert [layer_index_of(n) for n in names] == [1, 10, 11]
    mapping = {n: layer_index_of(n) for n in names}
    assert keys_for_layers(mapping, [1]) == [names[0]]


def test_head_and_frozen_tensors_have_no_layer() -> None:
    assert layer_index_of("base_model.model.classifier.modules_to_save.default.weight") is None
    assert layer_index_of(f"{PREFIX}.3.attention.self.query.base_layer.weight") is None


@pytest.mark.parametrize(
    "name,block",
    [
        ("base_model.model.vit.encoder.layer.7.attention.attention.query.lora_A.default.weight", 7),
        ("base_model.model.model.layers.29.self_attn.q_proj.lora_B.default.weight", 29),
        ("base_model.model.transformer.h.5.attn.c_attn.lora_A.default.weight", 5),
    ],
)
def test_other_architectures(name: str, block: int) -> None:
    assert layer_index_of(name) == block


def test_lora_tensor_without_block_is_an_error() -> None:
    with pytest.raises(ValueError, match="no block index"):
        layer_index_of("base_model.model.pooler.lora_A.default.weight")


def test_plan_coverage_and_table() -> None:
    plan = AllocationPlan(
        round=1,
        num_layers=4,
        clients=(ClientAllocation(0, 2, (0, 1)), ClientAllocation(3, 3, (1, 2, 3))),
    )
    assert plan.coverage() == [1, 2, 1, 1]
    assert plan.as_table() == [["0", "2", "x", "x", ".", "."], ["3", "3", ".", "x", "x", "x"]]
    assert plan.layers_of(3) == (1, 2, 3)


@pytest.mark.parametrize(
    "layers,reason",
    [([0, 0], r"\[0, 0\] repeats a layer"), ([-1], r"leaves the range 0\.\.3"),
     ([4], r"\[4\] leaves the range 0\.\.3")],
)  # fmt: skip
def test_check_layers_rejects_bad_sets(layers: list[int], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_layers(layers, 4)
    assert check_layers([3, 0, 2], 4) == (0, 2, 3)
