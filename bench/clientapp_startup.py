"""Start-up of a deployed partition node's ClientApp: the experiment it built until now against
the light node it builds now.

In a Flower deployment every train message runs in a fresh ``flwr-clientapp`` process (one
process per task in flwr 1.41), so what the ClientApp builds before training is paid on
every round by every sampled node. This measures, in fresh Python processes alternating
between the two ways, MiniLM-L6 on the full WordNet nouns (default config, partition 0):

* experiment (before): imports + ``build_experiment(cfg, encode_data=False)`` (the model, the
  whole dataset read and split into every client's shard and the proxy set, the strategy)
  + ``encode_positions`` of the node's shard: what the ClientApp did until the light node
* light (now): imports + the ClientApp's own ``node_model_for`` (the model alone) and
  ``partition_shard`` with the rows the server sends (the dataset read, never split; only
  those rows tokenised)

Both end with the same encoded shard (checked: same labels, same token ids).
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
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "results" / "clientapp_startup.json"
CONFIG = Path(__file__).parents[1] / "configs" / "default.toml"

CHILD = """
import hashlib, json, sys, time
import numpy as np
t0 = time.perf_counter()
import torch, transformers, peft, flwr.clientapp  # what the ClientApp module imports
from fedhello.core.config import load_config
from fedhello.data.encoding import encode_positions
from fedhello.engine.experiment import build_experiment
from fedhello.engine.flower import client_app
t1 = time.perf_counter()
config, way, server = sys.argv[1:4]
cfg = load_config(config)
sent = np.load(server + "/rows.npy")  # what the server sends with a train message
labels = json.loads(open(server + "/labels.json").read())
if way == "experiment":
    exp = build_experiment(cfg, encode_data=False)
    data = encode_positions(exp.raw, exp.shards[0], exp.processor, cfg.model.max_length)
else:
    node = client_app.node_model_for(cfg.to_toml(), labels, {})
    data = client_app.partition_shard(node, 0, sent).data
t2 = time.perf_counter()
ids, y = data.features["input_ids"].numpy(), data.labels.numpy()
digest = hashlib.sha256(ids.tobytes() + y.tobytes())
print(json.dumps({"imports": t1 - t0, "build": t2 - t1, "encoded_examples": len(data),
                  "digest": digest.hexdigest()}))
"""


def server_side(folder: str) -> None:
    """What the server knows and sends: the class names and partition 0's rows."""
    import numpy as np

    from fedhello.core.config import load_config
    from fedhello.engine.experiment import model_task, split_data

    cfg = load_config(str(CONFIG))
    raw, _, shards = split_data(cfg, model_task(cfg)[1])
    np.save(Path(folder) / "rows.npy", shards[0])
    (Path(folder) / "labels.json").write_text(json.dumps(raw.label_names))


def measure(way: str, folder: str) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(CONFIG), way, folder],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    ways = ("experiment", "light")
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory() as folder:
        server_side(folder)
        for rep in range(args.reps):
            for way in ways if rep % 2 == 0 else ways[::-1]:
                runs[way].append(measure(way, folder))
                r = runs[way][-1]
                print(
                    f"rep {rep} {way:>10}: imports {r['imports']:.2f} s, build "
                    f"{r['build']:.2f} s ({r['encoded_examples']} examples tokenised)"
                )
    digests = {r["digest"] for rs in runs.values() for r in rs}
    assert len(digests) == 1, "the two ways encoded different shards"
    med = {
        way: {k: statistics.median(r[k] for r in rs) for k in ("imports", "build")}
        for way, rs in runs.items()
    }
    total = {way: m["imports"] + m["build"] for way, m in med.items()}
    print(
        f"median start-up: experiment {total['experiment']:.2f} s, light {total['light']:.2f} s "
        f"(light / experiment = {total['light'] / total['experiment']:.2f}); build alone "
        f"{med['experiment']['build']:.2f} -> {med['light']['build']:.2f} s; same shard encoded"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    result = {"machine": machine, "runs": runs, "median": med, "startup": total}
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
