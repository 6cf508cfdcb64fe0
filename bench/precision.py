"""fp32 against reduced precision, side by side, on this machine's device.

Part 1, step times: the real MiniLM-L6 with LoRA r=16 on query/value, real WordNet batches
(32 x up to 32 tokens), the code the engines run (``Accelerator`` autocast, GradScaler for fp16,
``apply_layer_mask``). Each variant is a model of its own in one process; the variants are
measured in turns (one step of each, round-robin, after warm-up), so drift in the machine's
speed hits all alike. Per variant: median seconds per local step training every block, per step
training the top block only, per evaluation forward (64 examples, inference mode), and the
tensors saved for backward. On a CPU the variants are fp32, bf16 autocast over fp32 base
weights, bf16 autocast over bf16 base weights; on CUDA also fp16.

Part 2, accuracy: the default experiment (configs/default.toml) in fp32 and in the reduced
precision, a paired pair (same seed, same partition, same sampled clients), run with the
embedded engine into runs/bench-precision/ (finished runs are reused, interrupted ones
resumed; ``--no-accuracy`` skips this part).

Prints the ratios and writes bench/results/precision.json.
Usage: python bench/precision.py [--steps N] [--no-accuracy]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from client_cost import minilm_lora_and_batches  # the same subject as the other benchmarks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "precision.json"
RUNS = ROOT / "runs" / "bench-precision"


def variants(device: str) -> dict[str, tuple[str, str]]:
    """name -> (compute precision, base precision) worth comparing on ``device``."""
    out = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "fp32"), "bf16 base": ("bf16", "bf16")}
    if device.startswith("cuda"):
        out |= {"fp16": ("fp16", "fp32"), "fp16 base": ("fp16", "fp16")}
    return out


def step_times(device: str, steps: int) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from fedhello.model.accelerator import resolve
    from fedhello.model.lora import apply_layer_mask
    from fedhello.model.meters import SavedTensorMeter

    base, keys, layer_of, tok, labels = minilm_lora_and_batches(32 * (steps + 2))
    width = int(tok["attention_mask"].sum(dim=1).max())  # as Encoded.batch trims
    batches = [
        {k: v[32 * s : 32 * (s + 1), :width] for k, v in tok.items()}
        | {"labels": labels[32 * s : 32 * (s + 1)]}
        for s in range(steps + 2)
    ]
    eval_batch = {k: v[:64, :width] for k, v in tok.items()} | {"labels": labels[:64]}
    chosen = variants(device)
    models = {}
    for name, (prec, base_prec) in chosen.items():
        accelerator = resolve(device, prec, base_prec)
        models[name] = (accelerator, accelerator.place(copy.deepcopy(base), set(keys)))
    results: dict[str, dict[str, Any]] = {}
    for set_name, layers in (("all", list(range(6))), ("top", [5])):
        state = {}
        for name, (accelerator, model) in models.items():
            params = apply_layer_mask(model, layers, layer_of)
            opt = torch.optim.AdamW(params, lr=1e-3)
            state[name] = (
                accelerator,
                model,
                params,
                opt,
                accelerator.grad_scaler(),
                SavedTensorMeter(model),
                [],
            )
            model.train()
        for step in range(steps + 2):  # round-robin: one step of each variant in turn
            for accelerator, model, _params, opt, scaler, meter, times in state.values():
                batch = accelerator.to_device(batches[step])
                sync(accelerator)
                t0 = time.perf_counter()
                with meter.hooks(), accelerator.autocast():
                    loss = model(**batch).loss
                meter.step_done()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sync(accelerator)
                if step >= 2:  # two warm-up steps
                    times.append(time.perf_counter() - t0)
        for name, (accelerator, _model, _params, _opt, _scaler, meter, times) in state.items():
            row = results.setdefault(
                name, {"precision": accelerator.precision, "base": accelerator.base_precision}
            )
            row[f"{set_name}_step_s"] = statistics.median(times)
            row[f"{set_name}_saved_mb"] = meter.peak / 2**20
    eval_times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(steps + 2):
            for name, (accelerator, model) in models.items():
                model.eval()
                batch = accelerator.to_device(eval_batch)
                sync(accelerator)
                t0 = time.perf_counter()
                with accelerator.autocast():
                    model(**batch)
                sync(accelerator)
                eval_times[name].append(time.perf_counter() - t0)
    for name, times in eval_times.items():
        results[name]["eval_batch_s"] = statistics.median(times[2:])
        accelerator, model = models[name]
        results[name]["model_mb"] = (
            sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        )
    return results


def sync(accelerator: Any) -> None:
    import torch

    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)


def accuracy_pair(low: str) -> dict[str, Any]:
    """The default experiment in fp32 and in ``low``: same seed, paired by construction."""
    import fedhello
    from fedhello.engine.core import RunOptions
    from fedhello.engine.embedded import run_embedded
    from fedhello.store.runs import RunDir

    out = {}
    for prec in ("fp32", low):
        cfg = fedhello.load_config(ROOT / "configs" / "default.toml", [f"train.precision={prec}"])
        run = RunDir(RUNS / prec)
        finished = run.summary_path.is_file()
        resume = run.config_path.is_file()
        summary = (
            run.read_summary() if finished
            else run_embedded(cfg, run, RunOptions(resume=resume))
        )  # fmt: skip
        records = run.read_metrics()
        out[prec] = {
            "test_accuracy": summary["test_accuracy"],
            "test_macro_f1": summary["test_macro_f1"],
            "client_seconds": summary["client_seconds"],
            "val_accuracy_by_round": [r.get("val_accuracy") for r in records],
            "run": str(run.path.relative_to(ROOT)),
            "reused": finished,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the JSON result (default {OUT})")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedhello.model.accelerator import cpu_has_bf16, resolve

    device = str(resolve(args.device, "fp32").device)
    rows = step_times(device, args.steps)
    ref = rows["fp32"]
    print(f"device {device}; median of {args.steps} steps; ratio = fp32 time / variant time")
    print(f"{'variant':<11}{'all-layer s':>12}{'ratio':>7}{'top-block s':>12}{'ratio':>7}"
          f"{'eval s':>8}{'ratio':>7}{'saved MB all':>13}{'model MB':>9}")  # fmt: skip
    for name, r in rows.items():
        for key in ("all_step", "top_step", "eval_batch"):
            r[f"{key}_speedup"] = ref[f"{key}_s"] / r[f"{key}_s"]
        print(f"{name:<11}{r['all_step_s']:>12.3f}{r['all_step_speedup']:>6.2f}x"
              f"{r['top_step_s']:>12.3f}{r['top_step_speedup']:>6.2f}x"
              f"{r['eval_batch_s']:>8.3f}{r['eval_batch_speedup']:>6.2f}x"
              f"{r['all_saved_mb']:>13.1f}{r['model_mb']:>9.1f}")  # fmt: skip
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "device": device,
            "cpu_native_bf16": cpu_has_bf16(),
        },
        "steps": args.steps,
        "rows": rows,
    }
    if not args.no_accuracy:
        pair = accuracy_pair("bf16" if device == "cpu" else resolve(device).precision)
        result["default_experiment"] = pair
        for prec, r in pair.items():
            print(f"default experiment, {prec}: test accuracy {r['test_accuracy']:.4f}, "
                  f"macro-F1 {r['test_macro_f1']:.4f}, client compute {r['client_seconds']:.0f} s"
                  f"{' (reused run)' if r['reused'] else ''}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
