from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedhello.core.config import load_config
from fedhello.core.errors import DataError
from fedhello.data.loading import load_raw
from fedhello.tasks import task_for


def _cfg(**kw: object):
    return load_config(None, [f"data.{k}={v!r}".replace("'", '"') for k, v in kw.items()]).data


def test_shipped_wordnet_nouns() -> None:
    raw = load_raw(_cfg(), task_for("text"), allow_download=False)
    assert len(raw.inputs) == 82115 and len(raw.label_names) == 26
    assert raw.label_names[0] == "noun.Tops" and "noun.artifact" in raw.label_names
    assert raw.inputs[0].startswith("entity: ")
    sizes = {k: len(v) for k, v in raw.splits.items()}
    assert sizes["test"] == round(0.1 * 82115) and sum(sizes.values()) == 82115
    joined = np.concatenate(list(raw.splits.values()))
    assert len(np.unique(joined)) == 82115  # the splits are disjoint
    again = load_raw(_cfg(), task_for("text"), allow_download=False)
    assert np.array_equal(again.splits["test"], raw.splits["test"])
    other = load_raw(_cfg(split_seed=1), task_for("text"), allow_download=False)
    assert not np.array_equal(other.splits["test"], raw.splits["test"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", ".tsv"])
def test_local_files_with_configured_columns(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"body": [f"text {i}" for i in range(40)], "y": ["a", "b"] * 20})
    path = tmp_path / f"d{suffix}"
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".tsv": lambda: frame.to_csv(path, index=False, sep="\t"),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    raw = load_raw(
        _cfg(name=str(path), text_column="body", label_column="y"), task_for("text"), False
    )
    assert raw.label_names == ["a", "b"] and len(raw.inputs) == 40
    assert raw.inputs[raw.labels.tolist().index(1)].startswith("text")


def test_missing_column_names_the_column_and_lists_the_others(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": ["x", "y"], "y": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_raw(_cfg(name=str(path)), task_for("text"), False)
    assert "data.text_column = 'text'" in str(err.value) and "body, y" in str(err.value)
    with pytest.raises(DataError, match="label_column = 'label'"):
        load_raw(_cfg(name=str(path), text_column="body"), task_for("text"), False)


def test_a_table_without_rows_says_so(tmp_path: Path) -> None:
    """A header alone: the problem is the data, not a setting that later runs out of it."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match=r"d.csv': no rows; allowed: a table with examples"):
        load_raw(_cfg(name=str(path)), task_for("text"), False)


def test_missing_file_and_offline_hub_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_raw(_cfg(name=str(tmp_path / "nope.csv")), task_for("text"), False)
    with pytest.raises(DataError, match="hub downloads are off"):
        load_raw(_cfg(name="ag_news"), task_for("text"), False)
    bad = tmp_path / "d.xlsx"
    bad.write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_raw(_cfg(name=str(bad)), task_for("text"), False)


def test_encoding_a_subset_equals_the_same_rows_of_the_whole(tiny_bert_dir: Path) -> None:
    from conftest import make_texts
    from transformers import AutoTokenizer

    from fedhello.data.encoding import encode, encode_positions
    from fedhello.data.loading import RawData

    texts, labels = make_texts(40)
    names = sorted(set(labels))
    raw = RawData(texts, np.array([names.index(y) for y in labels]), names, task_for("text"),
                  {"train": np.arange(40)})  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    whole = encode(raw, tok, 16)
    positions = np.array([31, 2, 17, 17, 0])
    part = encode_positions(raw, positions, tok, 16)
    assert len(part) == 5
    for i, pos in enumerate(positions):
        assert all(part.features[k][i].equal(whole.features[k][pos]) for k in whole.features)
    assert part.labels.tolist() == whole.labels[positions].tolist()
    batch, ref = part.batch([0, 1, 2]), whole.batch(positions[:3])
    assert all(batch[k].equal(ref[k]) for k in ref)
