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
