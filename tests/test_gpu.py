"""A federation on a CUDA GPU: the GPU checks of the accelerators issue.

Marked ``gpu`` and skipped, with the reason, on a machine without CUDA (this project's machines
and CI have none). The per-step properties (only allocated tensors change, optimizer state only
for trained tensors, a top-block client below an all-layer one in the allocator's peak) run on
the GPU in test_training.py's ``cuda`` parameters; here a whole 2-round run in each precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from safetensors.numpy import load_file

from fedhello.cli import main
from fedhello.model.accelerator import cuda_native_bf16
from fedhello.store.runs import RunDir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_two_round_federation_on_cuda(
    precision: str, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    if precision == "bf16" and not cuda_native_bf16(0):
        pytest.skip("this GPU has no bf16")
    out = tmp_path / precision
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', train__device='"cuda"',
                        train__precision=f'"{precision}"', clients__tiers="[0.25, 1.0]",
                        allocation__strategy='"fed-hello"', allocation__fisher_warmup=1,
                        train__local_steps=15, train__lr=0.02, data__partition="iid")  # fmt: skip
    args = ["run", "--out", str(out)]
    for o in ov:
        args += ["--set", o]
    assert main(args) == 0
    run = RunDir(out)
    summary = run.read_summary()
    assert summary["device"] == "cuda:0" and summary["precision"] == precision
    assert summary["base_precision"] == precision  # stored low on the GPU (auto)
    clients = [c for r in run.read_metrics() for c in r["clients"]]
    assert {(c["device"], c["precision"]) for c in clients} == {("cuda:0", precision)}
    assert all(c["device_peak_memory_mb"] > 0 for c in clients)
    # a 1-layer client's allocator peak is below a 4-layer client's whose set starts lower
    small = [c for c in clients if len(c["layers"]) == 1 and c["layers"][0] > 0]
    full = [c for c in clients if len(c["layers"]) == 4]
    if small and full:
        assert max(c["device_peak_memory_mb"] for c in small) < min(
            c["device_peak_memory_mb"] for c in full
        )
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {np.dtype(np.float32)}
    assert all(np.isfinite(v).all() for v in adapter.values())
    assert summary["test_accuracy"] > 0.3  # 4 classes: it learned, in this precision
