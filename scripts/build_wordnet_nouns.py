"""Rebuild ``src/fedhello/data/builtin/wordnet_nouns.tsv.gz`` from Debian's ``wordnet-base``.

Every noun synset of WordNet 3.0 becomes one example: the text is ``"lemma: gloss"`` (the
synset's first word, underscores turned into spaces, then its gloss) and the label is the
synset's lexicographer file (``noun.artifact``, ``noun.person``, ...: 26 supersenses).

Usage (needs ``apt-get install wordnet-base``)::

    python scripts/build_wordnet_nouns.py [/usr/share/wordnet/data.noun] [OUT]

The output is deterministic (rows in file order, gzip mtime 0), so a rebuild on any machine
gives the same bytes and the committed file can be checked against its source.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

# Lexicographer file numbers of the noun files (WordNet's lexnames, 03..28).
NOUN_LEXNAMES = {
    3: "Tops", 4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body",
    9: "cognition", 10: "communication", 11: "event", 12: "feeling", 13: "food",
    14: "group", 15: "location", 16: "motive", 17: "object", 18: "person",
    19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity",
    24: "relation", 25: "shape", 26: "state", 27: "substance", 28: "time",
}  # fmt: skip


def parse_line(line: str) -> tuple[str, str] | None:
    """Return ``(text, label)`` for one synset line, or None for a licence-header line."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    lex_filenum = int(fields[1])
    word_count = int(fields[3], 16)  # w_cnt is hexadecimal
    if word_count < 1:
        raise ValueError(f"synset {fields[0]} has no words")
    lemma = fields[4].replace("_", " ")
    text = f"{lemma}: {gloss.strip()}".replace("\t", " ")
    return text, f"noun.{NOUN_LEXNAMES[lex_filenum]}"


def main(argv: list[str]) -> int:
    src = Path(argv[1] if len(argv) > 1 else "/usr/share/wordnet/data.noun")
    root = Path(__file__).resolve().parents[1]
    out = (
        Path(argv[2]) if len(argv) > 2 else root / "src/fedhello/data/builtin/wordnet_nouns.tsv.gz"
    )
    rows = [r for r in map(parse_line, src.read_text(encoding="utf-8").splitlines()) if r]
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(b"text\tlabel\n")
        for text, label in rows:
            gz.write(f"{text}\t{label}\n".encode())
    print(f"wrote {len(rows)} examples, {len({r[1] for r in rows})} classes to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
