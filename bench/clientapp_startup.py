"""Start-up of a deployed ClientApp: tokenising the whole dataset vs only the node's shard.

In a Flower deployment every train message runs in a fresh ``flwr-clientapp`` process (one
process per task in flwr 1.41), so what the ClientApp builds before training is paid on
every round by every sampled node. This measures, in fresh Python processes alternating
between the two ways, MiniLM-L6 on the full WordNet nouns (default config, partition 0):

* whole: imports + ``build_experiment(cfg)`` (every example tokenised; what the ClientApp did)
* shard: imports + ``build_experiment(cfg, encode_data=False)`` + ``encode_positions`` of the
  node's shard (what it does now)

Writes bench/results/clientapp_startup.json.   Usage: python bench/clientapp_startup.py [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "clientapp_startup.json"
CONFIG = Path(__file__).parents[1] / "configs" / "default.toml"

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers, peft, flwr.clientapp  # what the ClientApp module imports
from fedhello.core.config import load_config
from fedhello.data.encoding import encode_positions
from fedhello.engine.experiment import build_experiment
t1 = time.perf_counter()
cfg = load_config(sys.argv[1])
whole = sys.argv[2] == "whole"
exp = build_experiment(cfg, encode_data=whole)
if not whole:
    data = encode_positions(exp.raw, exp.shards[0], exp.processor, cfg.model.max_length)
t2 = time.perf_counter()
n = len(exp.data) if whole else len(data)
print(json.dumps({"imports": t1 - t0, "build": t2 - t1, "encoded_examples": n}))
"""


def measure(way: str) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(CONFIG), way],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"whole": [], "shard": []}
    for rep in range(args.reps):
        for way in ("whole", "shard") if rep % 2 == 0 else ("shard", "whole"):
            runs[way].append(measure(way))
            r = runs[way][-1]
            print(f"rep {rep} {way:>5}: imports {r['imports']:.2f} s, build {r['build']:.2f} s "
                  f"({r['encoded_examples']} examples tokenised)")  # fmt: skip
    med = {
        way: {k: statistics.median(r[k] for r in rs) for k in ("imports", "build")}
        for way, rs in runs.items()
    }
    total = {way: m["imports"] + m["build"] for way, m in med.items()}
    print(
        f"median start-up: whole {total['whole']:.2f} s, shard {total['shard']:.2f} s "
        f"(shard / whole = {total['shard'] / total['whole']:.2f}); build alone "
        f"{med['whole']['build']:.2f} -> {med['shard']['build']:.2f} s"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    result = {"machine": machine, "runs": runs, "median": med, "startup": total}
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
