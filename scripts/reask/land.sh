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
stage_cell() {  # a finished run folder's files (profile.json: a run under memory limits)
    git add -- "$1/config.toml" "$1/metrics.jsonl" "$1/summary.json"
    [ ! -f "$1/profile.json" ] || git add -- "$1/profile.json"
}
for root in docs/results-v2 docs/results-privacy; do
    [ -d "$root" ] || continue
    find "$root" -path '*/runs/*' -name summary.json -not -path '*/checkpoints/*' -print0 |
        while IFS= read -r -d '' summary; do
            stage_cell "$(dirname "$summary")"
        done
    find "$root" -type l -print0 | xargs -0 -r git add --
    find "$root" -maxdepth 3 \( -name compare.json -o -name '*.md' -o -name '*.csv' -o -name '*.png' \) \
        -not -path '*/runs/*' -print0 | xargs -0 -r git add --
done
# issue 27's single runs, copied there from $RUNS when they finish (scripts/reask/q1.txt)
for summary in docs/results-pooling/*/summary.json; do
    [ ! -f "$summary" ] || stage_cell "$(dirname "$summary")"
done
git diff --cached --stat | tail -n 1
