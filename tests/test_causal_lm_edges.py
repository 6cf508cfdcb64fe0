"""Where a causal-lm run meets the rest of fedhello: a one-class training pool refused by any
partition but IID (also when a cached dataset is reused), a site file without the category
column, and compare refusing what it cannot tabulate yet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedhello.core.config import DataConfig, load_config
from fedhello.core.errors import ConfigError, DataError
from fedhello.data.partition import partition_indices
from fedhello.data.site import load_site_raw
from fedhello.studies.compare import refuse_generative
from fedhello.tasks import CausalLMTask

ROWS = [{"instruction": f"Define the word {w}.", "output": "a word"} for w in ["dog", "cat"] * 10]


@pytest.mark.parametrize("scheme", ["dirichlet", "pathological"])
def test_one_class_cannot_be_split_by_label(scheme: str) -> None:
    """The partition itself refuses: a cached label-less dataset reused with another
    partition never reaches the loader's check."""
    with pytest.raises(DataError) as err:
        partition_indices(np.zeros(40, dtype=np.int64), 4, scheme, seed=0, classes_per_client=1)
    assert str(err.value).startswith(f"data.partition = '{scheme}': the training pool has one")
    shards = partition_indices(np.zeros(40, dtype=np.int64), 4, "iid", seed=0)
    assert sorted(np.concatenate(shards).tolist()) == list(range(40))


def test_a_site_file_without_the_category_column_is_the_first_class(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    raw = load_site_raw(str(path), DataConfig(name="x", label_column="category"), CausalLMTask(),
                        ["noun.animal", "noun.artifact"])  # fmt: skip
    assert raw.labels.tolist() == [0] * len(ROWS)
    assert len(raw.inputs) == len(ROWS)
    # with the column, its values map onto the federation's classes as for a classifier
    path.write_text("".join(json.dumps(dict(r, category="noun.artifact")) + "\n" for r in ROWS))
    raw = load_site_raw(str(path), DataConfig(name="x", label_column="category"), CausalLMTask(),
                        ["noun.animal", "noun.artifact"])  # fmt: skip
    assert raw.labels.tolist() == [1] * len(ROWS)


def test_compare_refuses_a_causal_lm_in_one_line(tiny_llama_dir_for_edges: Path) -> None:
    cfg = load_config(None, [f'model.name="{tiny_llama_dir_for_edges}"'])
    with pytest.raises(ConfigError) as err:
        refuse_generative(cfg)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("compare: model.task = 'causal-lm'")
    refuse_generative(load_config(None, []))  # the default classifier passes


@pytest.fixture(scope="module")
def tiny_llama_dir_for_edges(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved config alone: compare reads the task from config.json, never the weights."""
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("llama-config")
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, architectures=["LlamaForCausalLM"],
                ).save_pretrained(out)  # fmt: skip
    return out
