"""``data.name = "wordnet-definitions"``: define a word, tested on words never trained on.

Built from the shipped WordNet nouns (``builtin/wordnet_nouns.tsv.gz``: ``text`` = "lemma:
gloss", ``label`` = the lexicographer file, e.g. ``noun.artifact``; WordNet's licence is beside
it), one row per synset:

- ``instruction``: ``Define the word <lemma>.``;
- ``output``: the gloss's definition. A WordNet gloss is ``definition; "example"; ...``: the
  text before the first quoted example (``; "``, and the few glosses that open their example
  with ``: "`` or ``, "``), stripped of spaces and a trailing ``;``;
- ``category``: the lexname (26 of them), the class ``data.label_column = "category"`` splits
  the clients' shards by.

The test split holds **held-out words**: ``data.test_fraction`` of the distinct lemmas (compared
case-insensitively), drawn from ``data.split_seed``, with every synset of each. A model that
scores well there defines words it never saw defined, rather than recalling training rows.
The tables come back as ``{"train", "test"}``, so the loader keeps this test split and carves
validation from the training rows (validation words may also be training words).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedhello.core.seeds import Purpose, generator

logger = logging.getLogger(__name__)

NAME = "wordnet-definitions"
SOURCE = "wordnet_nouns.tsv.gz"  # the shipped table it is built from
# The key of the held-out-words draw in the split stream (0 and 1 are the loader's).
_HELD_OUT_KEY = 2
# Where a gloss's first quoted example starts: '; "' (nearly all), ': "' or ', "'.
_EXAMPLE = r'\s*[;:,]\s*"'


def wordnet_definitions(table: Any, split_seed: int, test_fraction: float) -> dict[str, Any]:
    """``{"train", "test"}`` tables (columns instruction, output, category) of the WordNet
    nouns ``table`` (columns text, label), the test split holding ``test_fraction`` of the
    lemmas (at least one), drawn from ``split_seed``. Vectorised: well under a second."""
    import pandas as pd

    parts = table["text"].str.split(": ", n=1, expand=True)
    lemma, gloss = parts[0].str.strip(), parts[1].fillna("")
    definition = gloss.str.split(_EXAMPLE, n=1, regex=True).str[0].str.strip().str.rstrip(";")
    rows = pd.DataFrame(
        {
            "instruction": "Define the word " + lemma + ".",
            "output": definition.str.strip(),
            "category": table["label"].astype(str),
        }
    )
    # Lemma groups in the order of their first row, so the draw depends on the data and seed.
    key = lemma.str.lower()
    codes, uniques = pd.factorize(key, sort=False)
    n_lemmas = len(uniques)
    n_test = min(n_lemmas - 1, max(1, round(test_fraction * n_lemmas)))
    held_out = generator(split_seed, Purpose.SPLIT, _HELD_OUT_KEY).permutation(n_lemmas)[:n_test]
    is_test = np.zeros(n_lemmas, dtype=bool)
    is_test[held_out] = True
    test_rows = is_test[codes]
    train, test = rows[~test_rows].reset_index(drop=True), rows[test_rows].reset_index(drop=True)
    logger.info(
        "data %s: %d train rows (%d words), %d test rows (%d held-out words; split_seed %d)",
        NAME, len(train), n_lemmas - n_test, len(test), n_test, split_seed,
    )  # fmt: skip
    return {"train": train, "test": test}
