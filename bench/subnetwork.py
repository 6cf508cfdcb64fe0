"""What a weak client saves under each kind of heterogeneity: FedRA's subnetwork client (only
its allocated blocks run) against the full-forward client (Fed-HeLLo's: backward stops at the
lowest trained block, forward runs every block), and a rank slice (HetLoRA / FlexLoRA) against
the full rank.

One process, the real MiniLM-L6 with LoRA r=16 on query/value and real WordNet batches
(32 x 32 tokens), fp32 on the CPU. The two variants of a row alternate step by step, so that
both see the same machine load: the ratios are measured side by side in this run.
Prints a table and writes bench/results/subnetwork.json.
Usage: python bench/subnetwork.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from client_cost import minilm_lora_and_batches

OUT = Path(__file__).parent / "results" / "subnetwork.json"


def main() -> None:
    import numpy as np
    import torch

    from fedhello.core.layers import AdapterSpec
    from fedhello.core.ranks import truncate
    from fedhello.model.lora import apply_spec_mask, get_state, set_state
    from fedhello.model.meters import SavedTensorMeter
    from fedhello.model.subnetwork import subnetwork

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, keys, layer_of, tok, labels = minilm_lora_and_batches(32 * (args.steps + 2))
    full_state = get_state(model, keys)
    model.train()

    def variant(layers: list[int], sub: bool, rank: int | None) -> dict[str, Any]:
        set_state(model, truncate(full_state, rank))
        params = apply_spec_mask(model, AdapterSpec(tuple(layers), rank), layer_of)
        return {
            "layers": layers, "sub": sub, "params": params, "times": [], "saved": 0,
            "optimizer": torch.optim.AdamW(params, lr=1e-3), "rank": rank,
        }  # fmt: skip

    def step(v: dict[str, Any], i: int) -> None:
        set_state(model, truncate(full_state, v["rank"]))
        apply_spec_mask(model, AdapterSpec(tuple(v["layers"]), v["rank"]), layer_of)
        sl = slice(32 * i, 32 * (i + 1))
        batch = {k: t[sl] for k, t in tok.items()} | {"labels": labels[sl]}
        meter = SavedTensorMeter(model)
        blocks = subnetwork(model, v["layers"], 6) if v["sub"] else nullcontext()
        t0 = time.perf_counter()
        with blocks:
            with meter.hooks():
                loss = model(**batch).loss
            meter.step_done()
            v["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
        elapsed = time.perf_counter() - t0
        if i >= 2:  # two warm-up steps
            v["times"].append(elapsed)
        v["saved"] = max(v["saved"], meter.peak)

    rows = []
    sets = {"top 1": [5], "top 3": [3, 4, 5], "bottom 1": [0], "bottleneck 3": [0, 1, 5],
            "all 6": list(range(6))}  # fmt: skip
    pairs = [(f"{n}: full vs subnetwork", layers, (False, None), (True, None))
             for n, layers in sets.items()]  # fmt: skip
    pairs.append(("all 6: rank 16 vs rank 8 (a rank method's weak client)", list(range(6)),
                  (False, None), (False, 8)))  # fmt: skip
    for name, layers, (sub_a, rank_a), (sub_b, rank_b) in pairs:
        a, b = variant(layers, sub_a, rank_a), variant(layers, sub_b, rank_b)
        for i in range(args.steps + 2):
            step(a, i)
            step(b, i)
        ta, tb = statistics.median(a["times"]), statistics.median(b["times"])
        rows.append({
            "row": name, "layers": layers,
            "step_seconds": [round(ta, 4), round(tb, 4)], "time_ratio": round(tb / ta, 3),
            "saved_mb": [round(a["saved"] / 2**20, 1), round(b["saved"] / 2**20, 1)],
            "saved_ratio": round(b["saved"] / max(a["saved"], 1), 3),
        })  # fmt: skip
    set_state(model, full_state)
    print(f"{'row':55} {'step s (a / b)':>18} {'b/a':>6} {'saved MB (a / b)':>18} {'b/a':>6}")
    for r in rows:
        s, m = r["step_seconds"], r["saved_mb"]
        print(f"{r['row']:55} {s[0]:>8.3f} / {s[1]:<7.3f} {r['time_ratio']:>6.2f} "
              f"{m[0]:>8.1f} / {m[1]:<7.1f} {r['saved_ratio']:>6.2f}")  # fmt: skip
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "steps": args.steps, "precision": "fp32", "rows": rows, "numpy": np.__version__,
    }, indent=1) + "\n")  # fmt: skip
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
