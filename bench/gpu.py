"""Step time and the allocator's peak memory per layer set, on a CUDA GPU, in each precision.

The GPU counterpart of bench/client_cost.py: the real MiniLM-L6 with LoRA r=16 on query/value,
real WordNet batches (``--batch`` x up to 32 tokens), the engines' own training step
(``Accelerator`` autocast, GradScaler for fp16, ``apply_layer_mask``). For every precision
(fp32; bf16 where the GPU has it; fp16) and layer set: the median step time and the allocator's
peak during the steps (``torch.cuda.max_memory_allocated``, reset per set), both also as ratios
to training every layer in fp32. Writes bench/results/gpu.json. On a machine without CUDA it
says so and exits 0 (``make bench-gpu``).   Usage: python bench/gpu.py [--steps N] [--batch B]
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
from client_cost import minilm_lora_and_batches

OUT = Path(__file__).parent / "results" / "gpu.json"
SETS = {"all 6": list(range(6)), "top 1": [5], "top 3": [3, 4, 5], "bottom 1": [0]}


def measure(steps: int, batch_size: int) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from fedhello.model.accelerator import cuda_native_bf16, resolve
    from fedhello.model.lora import apply_layer_mask

    base, keys, layer_of, tok, labels = minilm_lora_and_batches(batch_size * (steps + 2))
    precisions = ["fp32", "fp16"] + (["bf16"] if cuda_native_bf16(0) else [])
    rows = []
    for precision in precisions:
        accelerator = resolve("cuda", precision)  # auto base: stored in the compute precision
        model = accelerator.place(copy.deepcopy(base), set(keys))
        model.train()
        for set_name, layers in SETS.items():
            params = apply_layer_mask(model, layers, layer_of)
            opt = torch.optim.AdamW(params, lr=1e-3)
            scaler = accelerator.grad_scaler()
            times = []
            accelerator.reset_peak_memory()
            for step in range(steps + 2):
                sl = slice(batch_size * step, batch_size * (step + 1))
                batch = accelerator.to_device(
                    {k: v[sl] for k, v in tok.items()} | {"labels": labels[sl]}
                )
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with accelerator.autocast():
                    loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                torch.cuda.synchronize()
                if step >= 2:
                    times.append(time.perf_counter() - t0)
            base = accelerator.base_precision
            rows.append({"precision": precision, "base": base, "set": set_name,
                         "layers": layers, "step_s": statistics.median(times),
                         "peak_mb": accelerator.peak_memory_mb()})  # fmt: skip
            del opt
        del model
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(0), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=OUT, help=f"the JSON result (default {OUT})")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}): nothing to measure")
        return
    result = measure(args.steps, args.batch)
    ref = next(r for r in result["rows"] if r["precision"] == "fp32" and r["set"] == "all 6")
    print(f"{result['device']}; batch {args.batch} x 32 tokens; median of {args.steps} steps")
    print(
        f"{'precision':<10}{'set':<10}{'step ms':>9}{'speedup':>9}{'peak MB':>9}{'mem ratio':>10}"
    )
    for r in result["rows"]:
        r["speedup"] = ref["step_s"] / r["step_s"]
        r["memory_ratio"] = r["peak_mb"] / ref["peak_mb"]
        print(f"{r['precision']:<10}{r['set']:<10}{1000 * r['step_s']:>9.1f}"
              f"{r['speedup']:>8.2f}x{r['peak_mb']:>9.0f}{r['memory_ratio']:>10.2f}")  # fmt: skip
    result |= {"batch": args.batch, "steps": args.steps, "platform": platform.platform(),
               "torch": torch.__version__}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"(speedup, mem ratio: against every layer in fp32) -> {args.out}")


if __name__ == "__main__":
    main()
