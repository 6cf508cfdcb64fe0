#!/usr/bin/env bash
# Runs one line file of issue 28's and 31's studies (docs/RESULTS.md sections 2-5 and 7), top
# to bottom, one line at a time, from the repository root:
#   scripts/reask/queue.sh scripts/reask/q1.txt
# Every line is a `fedhello compare` into a docs/results-* folder, which reuses the cells that
# are finished there (committed: config.toml, metrics.jsonl, summary.json), so the file can be
# run again from the top in any later session: finished lines take seconds, the first
# unfinished one goes on. Lines are independent of each other's order except where a line
# links another folder's runs (`ln -sfn`), which it does itself. Blank and # lines are skipped.
#
# FEDHELLO: the command to run (default .venv/bin/fedhello); a long study runs a snapshot of
# the code (`git worktree add`) with PYTHONPATH=<snapshot>/src so that editing the checkout
# changes nothing under it. CACHE: the folder FedNCM's round 0 is kept in between processes
# (`--cache-dir`, machine-specific, never committed). RUNS: where a line's single `fedhello run`
# keeps its run folder (checkpoints) before its three files are copied to docs/: such a run
# cut off with the session starts again from round 1 in the next (a comparison's cells too:
# their checkpoints are not committed either). Two of these files can run side by side
# (the run lock makes a cell that both name safe) when each line sets run.threads = 1.
#
# PYTHONHASHSEED (default 1): the snapshot c5bcd00 that computed the study fingerprints round 0
# with str() of PEFT's target-module set, whose order follows Python's per-process string
# hashing, so a process shared another's round 0 only by chance (fixed in main since: sets are
# sorted). Fixing the hashing changes no number (section 2's pathological seed 2, rerun under
# it with round 0 recomputed: 0 differences) and makes every queue process fingerprint alike.
set -u
export PYTHONHASHSEED=${PYTHONHASHSEED:-1}
file=${1:?usage: scripts/reask/queue.sh LINEFILE}
FEDHELLO=${FEDHELLO:-.venv/bin/fedhello}
CACHE=${CACHE:-/tmp/fedhello-round0}
RUNS=${RUNS:-/tmp/fedhello-runs}
export FEDHELLO CACHE RUNS
fedhello() { "$FEDHELLO" "$@"; }
export -f fedhello
mapfile -t lines < "$file"  # read once: editing the file changes the next run, not this one
for line in "${lines[@]}"; do
    case "$line" in '' | '#'*) continue ;; esac
    echo "$(date -u +%FT%TZ) start: $line"
    bash -c "$line" < /dev/null
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "$(date -u +%FT%TZ) done: $line"
    else
        echo "$(date -u +%FT%TZ) FAILED ($rc): $line"
    fi
done
