#!/usr/bin/env bash
# Stages what issue 28's and 31's studies have finished, for a commit: every finished cell's
# config.toml, metrics.jsonl and summary.json (and profile.json, the cost profile a cell under
# memory limits checked them against; a cell still running has no summary.json and is
# left out: a later session runs it again from round 1), each folder's report files once its
# comparison has written them (compare.json, results.md, paired.*, plots/) and the links to
# another folder's cells. Checkpoints and adapters stay out (.gitignore).
#   scripts/reask/land.sh && git commit -m "..."
set -eu
cd "$(git rev-parse --show-toplevel)"
for root in docs/results-v2 docs/results-privacy; do
    [ -d "$root" ] || continue
    find "$root" -path '*/runs/*' -name summary.json -not -path '*/checkpoints/*' -print0 |
        while IFS= read -r -d '' summary; do
            cell=$(dirname "$summary")
            git add -- "$cell/config.toml" "$cell/metrics.jsonl" "$cell/summary.json"
            [ ! -f "$cell/profile.json" ] || git add -- "$cell/profile.json"  # memory limits
        done
    find "$root" -type l -print0 | xargs -0 -r git add --
    find "$root" -maxdepth 3 \( -name compare.json -o -name '*.md' -o -name '*.csv' -o -name '*.png' \) \
        -not -path '*/runs/*' -print0 | xargs -0 -r git add --
done
# issue 27's single runs, copied there from $RUNS when they finish (scripts/reask/q1.txt)
for summary in docs/results-pooling/*/summary.json; do
    [ -f "$summary" ] || continue
    cell=$(dirname "$summary")
    git add -- "$cell/config.toml" "$cell/metrics.jsonl" "$cell/summary.json"
done
git diff --cached --stat | tail -n 1
