"""Engine overhead and communication of the embedded engine, from one real run.

Runs a short federation of MiniLM-L6 on WordNet (4 rounds, 6 of 12 clients, 10 steps) and
reports, per round, wall time divided by the pure compute it contains (client training +
evaluation + Fisher scoring), and bytes moved against sending the full adapter both ways.
Writes bench/results/engine.json.   Usage: python bench/engine.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "results" / "engine.json"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--strategy", default="fed-hello")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from fedhello.core.config import load_config
    from fedhello.engine.embedded import run_embedded
    from fedhello.store.runs import RunDir

    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "default.toml",
        [f"federation.rounds={args.rounds}", f"allocation.strategy={args.strategy}",
         "allocation.fisher_warmup=1", "allocation.fisher_every=2"],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        run_embedded(cfg, run)
        records = run.read_metrics()
    rows = []
    print(f"{'round':>5}{'wall s':>9}{'compute s':>11}{'overhead':>10}"
          f"{'MB up':>8}{'MB down':>9}{'full MB':>9}{'comm vs full':>14}")  # fmt: skip
    for r in records:
        compute = sum(c["seconds"] for c in r["clients"]) + r.get("eval_seconds", 0.0)
        compute += r.get("fisher_seconds", 0.0)
        up = sum(c["bytes_up"] for c in r["clients"])
        down = sum(c["bytes_down"] for c in r["clients"])
        full = 2 * sum(c["bytes_down"] for c in r["clients"])  # full adapter up and down
        row = {
            "round": r["round"], "wall": r["round_seconds"], "compute": compute,
            "overhead": r["round_seconds"] / compute, "bytes_up": up, "bytes_down": down,
            "full_exchange": full, "comm_ratio": (up + down) / full,
            "per_client_up": [c["bytes_up"] for c in r["clients"]],
        }  # fmt: skip
        rows.append(row)
        print(
            f"{row['round']:>5}{row['wall']:>9.2f}{compute:>11.2f}{row['overhead']:>10.3f}"
            f"{up / 1e6:>8.2f}{down / 1e6:>9.2f}{full / 1e6:>9.2f}{row['comm_ratio']:>14.3f}"
        )
    total_wall = sum(r["wall"] for r in rows)
    total_compute = sum(r["compute"] for r in rows)
    moved = sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    full = sum(r["full_exchange"] for r in rows)
    print(
        f"overall engine overhead: {total_wall / total_compute:.3f} (target <= 1.05); "
        f"bytes moved / full-adapter exchange: {moved / full:.3f}"
    )
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "strategy": args.strategy, "rows": rows,
              "overhead": total_wall / total_compute}  # fmt: skip
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
