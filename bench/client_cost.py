"""Client cost per local step: our masks vs the authors' way (lr 0 on unallocated LoRA tensors).

Every configuration runs in a fresh process (peak RSS only grows within one), on the real
MiniLM-L6 with LoRA r=16 on query/value and real WordNet batches (32 x up to 32 tokens).
Prints a table of ratios measured side by side in this one run and writes
bench/results/client_cost.json.   Usage: python bench/client_cost.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "results" / "client_cost.json"


def wordnet_rows() -> tuple[list[str], list[str]]:
    import gzip
    from importlib import resources

    shipped = resources.files("fedhello.data").joinpath("builtin", "wordnet_nouns.tsv.gz")
    with shipped.open("rb") as f:
        lines = gzip.decompress(f.read()).decode().splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines]
    return [r[0] for r in rows], [r[1] for r in rows]


def minilm_lora_and_batches(count: int) -> tuple[Any, list[str], dict, dict, Any]:
    """The benchmarks' subject: MiniLM-L6 with LoRA r=16 on query/value (seeded), its adapter
    keys and their blocks, and ``count`` random WordNet examples tokenised to 32 tokens with
    their labels. No pandas: keep the process lean and RSS honest. ``FEDHELLO_BENCH_MODEL``
    names another model folder (``make gpu-check`` on a machine without the MiniLM package
    passes MiniLM's architecture with random weights: the same cost, not the same accuracy)."""
    import numpy as np
    import torch

    from fedhello.core.layers import layer_of_keys
    from fedhello.model.loading import load_model
    from fedhello.model.lora import adapter_keys, build_lora_model

    torch.manual_seed(0)
    texts, names = wordnet_rows()
    label_names = sorted(set(names))
    loaded = load_model(os.environ.get("FEDHELLO_BENCH_MODEL", "minilm-l6"), label_names)
    model = build_lora_model(loaded.model, 16, 16, 0.1, ["auto"])
    keys = adapter_keys(model)
    pick = np.random.default_rng(0).choice(len(texts), count, replace=False)
    tok = loaded.processor([texts[i] for i in pick], padding="max_length", truncation=True,
                           max_length=32, return_tensors="pt")  # fmt: skip
    labels = torch.as_tensor([label_names.index(names[i]) for i in pick])
    return model, keys, layer_of_keys(keys, 6), dict(tok), labels


def measure(layers: list[int], mode: str, steps: int, queue: mp.Queue) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import psutil
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from fedhello.model.lora import apply_layer_mask
    from fedhello.model.meters import SavedTensorMeter

    model, _, layer_of, tok, labels = minilm_lora_and_batches(32 * (steps + 2))
    if mode == "ours":
        params = apply_layer_mask(model, layers, layer_of)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    else:  # the authors: every LoRA tensor trains, the unallocated ones with learning rate 0
        apply_layer_mask(model, range(6), layer_of)
        on = [
            p
            for n, p in model.named_parameters()
            if n in layer_of and (layer_of[n] is None or layer_of[n] in layers)
        ]
        off = [
            p
            for n, p in model.named_parameters()
            if n in layer_of and p.requires_grad and all(p is not q for q in on)
        ]
        optimizer = torch.optim.AdamW([{"params": on, "lr": 1e-3}, {"params": off, "lr": 0.0}])
    model.train()
    meter = SavedTensorMeter(model)
    rss0 = psutil.Process().memory_info().rss
    times = []
    for step in range(steps + 2):
        sl = slice(32 * step, 32 * (step + 1))
        batch = {k: v[sl] for k, v in tok.items()} | {"labels": labels[sl]}
        t0 = time.perf_counter()
        with meter.hooks():
            loss = model(**batch).loss
        meter.step_done()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({
        "step_seconds": statistics.median(times),
        "saved_mb": meter.peak / 2**20,
        "optimizer_tensors": len(optimizer.state),
        "rss_peak_mb": peak / 2**20,
        "rss_growth_mb": (peak - rss0) / 2**20,
    })  # fmt: skip


def run_one(layers: list[int], mode: str, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(layers, mode, steps, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    return result


def profile_fit(rows: list[dict]) -> list[float]:
    """Each set's step time relative to all layers, as fedhello's one cost model predicts it:
    the linear model of ``fedhello.core.profile`` (base + per block of depth + per layer)
    fitted to these measurements, keyed like a profile by (lowest block, count); two sets
    with the same key (bottom 3 and bottleneck 3) enter as their mean."""
    from collections import defaultdict

    from fedhello.core.profile import Cost, fit_analytic

    times: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in rows:
        times[min(r["layers"]), len(r["layers"])].append(r["ours"]["step_seconds"])
    table = {k: Cost(0.0, statistics.mean(v)) for k, v in times.items()}
    fit = fit_analytic(table, 6)
    full = fit.predict(0, 6, 6)[1]
    return [fit.predict(min(r["layers"]), len(r["layers"]), 6)[1] / full for r in rows]


def main() -> None:
    from fedhello.core.allocation.geometric import geometric_layers

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    sets = {
        "all 6": list(range(6)), "top 1": [5], "top 3": [3, 4, 5], "bottom 1": [0],
        "bottom 3": [0, 1, 2], "bottleneck 3": geometric_layers("bottleneck", 3, 6),
    }  # fmt: skip
    rows = []
    for name, layers in sets.items():
        ours = run_one(layers, "ours", args.steps)
        authors = run_one(layers, "authors", args.steps)
        rows.append({"set": name, "layers": layers, "ours": ours, "authors": authors})
    base = rows[0]["ours"]["step_seconds"]
    for r, predicted in zip(rows, profile_fit(rows), strict=True):
        r["predicted_cost"] = predicted
    header = (f"{'set':<13}{'layers':<16}{'ours s':>8}{'authors s':>10}{'speedup':>9}"
              f"{'ours RSS+':>10}{'auth RSS+':>10}{'mem saved':>10}{'saved MB':>9}"
              f"{'cost meas':>10}{'cost fit':>10}")  # fmt: skip
    print(header)
    for r in rows:
        o, a = r["ours"], r["authors"]
        r["speedup"] = a["step_seconds"] / o["step_seconds"]
        r["rss_peak_reduction"] = 1 - o["rss_peak_mb"] / a["rss_peak_mb"]
        r["measured_cost"] = o["step_seconds"] / base
        print(f"{r['set']:<13}{r['layers']!s:<16}{o['step_seconds']:>8.3f}{a['step_seconds']:>10.3f}"
              f"{r['speedup']:>8.2f}x{o['rss_growth_mb']:>10.0f}{a['rss_growth_mb']:>10.0f}"
              f"{100 * r['rss_peak_reduction']:>9.0f}%{o['saved_mb']:>9.1f}"
              f"{r['measured_cost']:>10.2f}{r['predicted_cost']:>10.2f}")  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    OUT.write_text(
        json.dumps({"machine": machine, "steps": args.steps, "rows": rows}, indent=2) + "\n"
    )
    print(f"(RSS+ = peak RSS growth during the steps, MB; mem saved = 1 - ours/authors peak RSS;"
          f" cost = step time / all-layers step time; cost fit = the cost profile's linear"
          f" model fitted to these times) -> {OUT}")  # fmt: skip


if __name__ == "__main__":
    main()
