"""A decoder LLM federated on a real Flower deployment (a SuperLink and SuperNodes on
loopback): a tiny Llama loaded by each node from its folder (safetensors) trains a causal-LM
federation of 2 rounds, one node declaring a memory budget that affords only the top block of
the profile the test measured first; that node trains only that block, within its limit, and
the run records a language model's scores (perplexity each round, ROUGE-L and the zero-shot
reference in the summary)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import lm_overrides
from flower_harness import deployment, flower_env

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.store.runs import RunDir

pytestmark = pytest.mark.slow


def test_a_decoder_federation_on_a_loopback_deployment_trains_within_a_nodes_memory_budget(
    tmp_path: Path, tiny_llama_dir: Path, tiny_alpaca_jsonl: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import fedhello
    from fedhello.core.fit import MEMORY_TOLERANCE

    # the model is a plain folder, weights in safetensors: what every node loads by model.name
    assert (tiny_llama_dir / "model.safetensors").is_file()
    assert not list(tiny_llama_dir.glob("*.bin"))
    # every client's tier is the whole model (4 blocks): only the memory budget cuts node 0's
    ov = lm_overrides(
        tiny_llama_dir, tiny_alpaca_jsonl, clients__num_clients=2, clients__per_round=2,
        clients__tiers="[1.0]", allocation__strategy='"fedra"',
        run__profile_dir=f'"{tmp_path / "server-profiles"}"',
    )  # fmt: skip
    # the profile of this config (the nodes measure theirs the same way, on the same CPU)
    probe = fedhello.calibrate(load_config(None, ov), steps=1)["profile"]["entries"]
    memory = {(e["lowest"], e["count"]): e["memory_mb"] for e in probe}
    top = memory[3, 1]
    # a limit between the top block alone and every plan reaching block 2: exact, not luck
    above = min(m for (lowest, _), m in memory.items() if lowest <= 2)
    limit = round(top * 1.02, 4)
    assert limit * (1 + MEMORY_TOLERANCE) < above, (top, above, memory)
    node_profiles = tmp_path / "node-profiles"
    extra = {0: f'budget-memory-mb={limit} profile-dir="{node_profiles}"'}
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--engine", "flower"]
    with deployment(tmp_path, nodes=2, node_extra=extra) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        rc = main([*args, "--superlink", dep.address, *[a for o in ov for a in ("--set", o)]])
        assert rc == 0, (tmp_path / "logs" / "supernode0.log").read_text()[-3000:]
    assert all(p.poll() is not None for p in [dep.superlink, *dep.supernodes])
    # the node measured its own profile and the server allocated by it
    (stored,) = node_profiles.glob("profile-*.json")
    entries = json.loads(stored.read_text())["entries"]
    mine = {(e["lowest"], e["count"]): e["memory_mb"] for e in entries}
    assert mine.keys() == memory.keys() and mine[3, 1] <= limit
    assert min(m for (lowest, _), m in mine.items() if lowest <= 2) > limit
    records = RunDir(out).read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    assert all(not r["failed"] for r in records)
    clients = [c for r in records for c in r["clients"]]
    limited = [c for c in clients if c["client"] == 0]
    assert len(limited) == 2 and all(c["memory_limit_mb"] == limit for c in limited)
    assert all(c["layers"] == [3] for c in limited), [c["layers"] for c in limited]
    assert all(c["train_memory_mb"] <= limit * (1 + MEMORY_TOLERANCE) for c in limited)
    others = [c for c in clients if c["client"] == 1]
    assert len(others) == 2 and all("memory_limit_mb" not in c for c in others)
    assert all(c["layers"] == [0, 1, 2, 3] for c in others), [c["layers"] for c in others]
    for r in records:
        assert isinstance(r["test_perplexity"], float) and math.isfinite(r["test_perplexity"])
        assert r["test_perplexity"] == pytest.approx(math.exp(r["test_loss"]))
    summary = RunDir(out).read_summary()
    assert summary["engine"] == "flower"
    assert 0 <= summary["test_rouge_l"] <= 1 and 0 <= summary["zero_shot_rouge_l"] <= 1
    assert load_config(out / "config.toml").model.name == str(tiny_llama_dir)
