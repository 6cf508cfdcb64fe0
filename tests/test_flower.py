"""The Flower engine: simulation, a real loopback deployment (plain and TLS), a node killed
mid-run, a node training on its own file; the global adapter equals the embedded engine's for
the same config and seed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_texts, peft_test_accuracy, tiny_overrides
from flower_harness import BIN, deployment, flower_env
from safetensors.numpy import load_file

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

pytestmark = pytest.mark.slow


def _overrides(model: Path, data: Path, **extra: object) -> list[str]:
    settings: dict[str, object] = {
        "data__text_column": '"sentence"', "data__label_column": '"topic"',
        "clients__num_clients": 3, "clients__per_round": 2,
    }  # fmt: skip
    return tiny_overrides(model, data, **(settings | extra))


def _run(out: Path, overrides: list[str], *extra: str) -> int:
    args = ["run", "--out", str(out), *extra]
    for o in overrides:
        args += ["--set", o]
    return main(args)


def _adapter(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6)


def crash_after_round(src: Path, dst: Path, last_round: int) -> Path:
    """A copy of the finished run ``src`` as a crash right after ``last_round``'s checkpoint
    (and partway into the next round: its metrics line written, its checkpoint not) leaves it."""
    import shutil

    shutil.copytree(src, dst)
    run = RunDir(dst)
    run.summary_path.unlink()
    shutil.rmtree(run.adapter_dir)
    for ckpt in run.checkpoint_dir.glob("round-*"):
        if int(ckpt.stem.removeprefix("round-")) > last_round:
            ckpt.unlink()
    # a resume from scratch would equal the uninterrupted run too: the checkpoint must be there
    kept = [int(c.stem.removeprefix("round-")) for c in run.checkpoint_dir.glob("round-*")]
    assert last_round in kept, f"round {last_round}'s checkpoint was rotated out: kept {kept}"
    return dst


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_text_csv: Path
) -> Path:
    out = tmp_path_factory.mktemp("emb") / "run"
    assert _run(out, _overrides(tiny_bert_dir, tiny_text_csv)) == 0
    return out


def test_flower_simulation_equals_embedded(embedded: Path, tmp_path: Path, tiny_bert_dir: Path,
                                           tiny_text_csv: Path) -> None:  # fmt: skip
    out = tmp_path / "sim"
    assert _run(out, _overrides(tiny_bert_dir, tiny_text_csv), "--engine", "flower-sim") == 0
    assert_same_adapter(embedded, out)
    ours = [without_machine(r) for r in RunDir(out).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(embedded).read_metrics()]
    assert RunDir(out).read_summary()["engine"] == "flower"


def test_fedadam_on_the_flower_simulation_equals_embedded(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """A server optimizer with state (FedAdam's moments) and the examples each client trained
    on (``examples-seen``, carried in the report) give the embedded engine's run."""
    ov = _overrides(tiny_bert_dir, tiny_text_csv, federation__server_optimizer='"fedadam"',
                    federation__weighting='"examples-seen"', train__local_epochs=0.3)  # fmt: skip
    emb, sim = tmp_path / "emb", tmp_path / "sim"
    assert _run(emb, ov) == 0
    assert _run(sim, ov, "--engine", "flower-sim") == 0
    assert_same_adapter(emb, sim)
    ours = [without_machine(r) for r in RunDir(sim).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(emb).read_metrics()]


def test_a_crashed_run_resumes_on_the_flower_simulation(embedded: Path, tmp_path: Path) -> None:
    """The checkpoint holds the whole server state, so a run continues on Flower where it
    stopped (here one started by the embedded engine) and ends as the uninterrupted run."""
    out = crash_after_round(embedded, tmp_path / "crashed", last_round=1)
    assert main(["run", "--resume", str(out), "--engine", "flower-sim"]) == 0
    assert_same_adapter(embedded, out)
    ours = [without_machine(r) for r in RunDir(out).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(embedded).read_metrics()]
    summary = RunDir(out).read_summary()
    assert summary["resumed_at_round"] == 2 and summary["engine"] == "flower"


def test_bad_data_stops_the_simulation_before_ray_starts(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import flwr.simulation

    def started(**_: object) -> None:
        raise AssertionError("the simulation started before the data was checked")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)
    ov = _overrides(tiny_bert_dir, tiny_text_csv, allocation__proxy_examples=100_000)
    assert _run(tmp_path / "run", ov, "--engine", "flower-sim") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "allocation.proxy_examples = 100000" in err, err
    assert not (tmp_path / "run").exists()


def test_loopback_deployment_equals_embedded(
    embedded: Path, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    with deployment(tmp_path, nodes=3) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        out = tmp_path / "dep"
        rc = _run(
            out,
            _overrides(tiny_bert_dir, tiny_text_csv),
            "--engine",
            "flower",
            "--superlink",
            dep.address,
        )
        assert rc == 0
    # (a run resumed through the SuperLink: the HetLoRA deployment test below)
    assert all(p.poll() is not None for p in [dep.superlink, *dep.supernodes])
    assert_same_adapter(embedded, out)
    assert [r["sampled"] for r in RunDir(out).read_metrics()] == [
        r["sampled"] for r in RunDir(embedded).read_metrics()
    ]


def test_tls_deployment_with_node_authentication_sites_and_their_own_budgets(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README steps 4 and 5 on one TLS deployment. With --enable-supernode-auth only the
    registered SuperNodes 0 and 1 join: node 2 is not registered, and had it joined, its
    partition-id=2 (outside this federation's two clients) would have stopped the run."""
    # the nodes declare their own budgets: a layer count, and a tier (0: half of 4 layers);
    # node 1 is a site: its own file instead of a partition, and no partition id (it gets 1)
    site = tmp_path / "site1.csv"
    texts, labels = make_texts(60, seed=11)
    pd.DataFrame({"sentence": texts, "topic": labels}).to_csv(site, index=False)
    # and each its own precision: what each used is recorded per client
    extra = {
        0: 'budget-layers=1 precision="bf16"',
        1: f'budget-tier=0 data="{site}" precision="fp32"',
    }
    with deployment(tmp_path, nodes=3, tls=True, node_extra=extra, registered={0, 1}) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        ov = _overrides(tiny_bert_dir, tiny_text_csv, clients__num_clients=2, federation__rounds=1)
        # README step 5 verbatim, from the folder holding ca.crt: relative paths everywhere
        assert dep.ca is not None and dep.ca.name == "ca.crt"
        monkeypatch.chdir(dep.ca.parent)
        Path("my-task.toml").write_text(load_config(None, ov).to_toml())
        rc = main(["run", "my-task.toml", "--engine", "flower", "--superlink", dep.address,
                   "--root-certificates", "ca.crt", "--out", "runs/site-run"])  # fmt: skip
        assert rc == 0
        out = dep.ca.parent / "runs" / "site-run"
        listed = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "auth-admin", "--format", "json"],
            env=flower_env(dep.home), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    nodes = json.loads(listed.stdout)["nodes"]
    assert len(nodes) == 2 and {n["status"] for n in nodes} == {"online"}, nodes
    refused = (tmp_path / "logs" / "supernode2.log").read_text()
    assert "Failed to activate SuperNode" in refused, refused[-2000:]
    records = RunDir(out).read_metrics()
    assert len(records) == 1 and not records[0]["failed"]
    budgets = {c["client"]: (c["budget"], len(c["layers"])) for c in records[0]["clients"]}
    assert budgets == {0: (1, 1), 1: (2, 2)}
    examples = {c["client"]: c["num_examples"] for c in records[0]["clients"]}
    assert examples[1] == 57 and examples[0] > 60  # 3 of the site's 60 rows held out
    used = {c["client"]: (c["device"], c["precision"]) for c in records[0]["clients"]}
    assert used == {0: ("cpu", "bf16"), 1: ("cpu", "fp32")}
    # the site evaluated the final model on its held-out rows: what the exported adapter scores
    summary = RunDir(out).read_summary()
    assert summary["site_validation"]["1"]["num_examples"] == 3
    assert summary["site_validation_examples"] == 3
    assert summary["site_validation_accuracy"] == pytest.approx(
        peft_test_accuracy(out, tiny_bert_dir, site=site, precision="fp32"), abs=1e-6
    )


def test_a_supernode_killed_mid_run_is_recorded_and_the_run_finishes(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 rounds: the node dies after round 1, so round 2 waits out its timeout without it
    ov = _overrides(tiny_bert_dir, tiny_text_csv, clients__per_round=3, federation__rounds=2,
                    federation__round_timeout=30)  # fmt: skip
    out = tmp_path / "kill"
    with deployment(tmp_path, nodes=3) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        victim = dep.supernodes[1]

        def kill_after_first_round() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
                time.sleep(0.2)
            victim.kill()

        killer = threading.Thread(target=kill_after_first_round, daemon=True)
        killer.start()
        rc = _run(out, ov, "--engine", "flower", "--superlink", dep.address)
        killer.join(timeout=5)
        assert rc == 0
    records = RunDir(out).read_metrics()
    assert len(records) == 2
    # the final adapter is the aggregate of the surviving clients: what a user reloads scores
    # what the summary says
    assert RunDir(out).read_summary()["test_accuracy"] == pytest.approx(
        peft_test_accuracy(out, tiny_bert_dir), abs=1e-6
    )
    later = records[1:]
    assert all("1" in r["failed"] for r in later), [r["failed"] for r in records]
    assert all(1 not in [c["client"] for c in r["clients"]] for r in later)
    assert all(sorted(c["client"] for c in r["clients"]) == [0, 2] for r in later)


@pytest.mark.parametrize("problem", ["label", "device"])
def test_a_bad_site_stops_a_deployment_with_one_line(
    problem: str, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A site file with a label the federation lacks, or a node declaring a GPU it does not
    have: the run stops before round 1 with one line naming the node and the problem."""
    site = tmp_path / "site0.csv"
    pd.DataFrame({"sentence": ["red fox", "oak"], "topic": ["class-0", "mineral"]}).to_csv(
        site, index=False
    )
    # (the harness gives a node without data= its partition-id)
    node = f'data="{site}"' if problem == "label" else 'device="cuda:5"'
    with deployment(tmp_path, nodes=1, node_extra={0: node}) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        ov = _overrides(tiny_bert_dir, tiny_text_csv, clients__num_clients=1,
                        clients__per_round=1, federation__rounds=1)  # fmt: skip
        rc = _run(tmp_path / "bad", ov, "--engine", "flower", "--superlink", dep.address)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    if problem == "label":
        assert err[-1].startswith(f"fedhello: error: the SuperNode with data='{site}': site data ")
        assert "row 1 has label 'mineral'" in err[-1] and "allowed: class-0" in err[-1]
    else:
        assert err[-1].startswith("fedhello: error: partition 0: train.device = 'cuda:5': ")
        assert err[-1].endswith("(from its --node-config)")
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_a_failing_flwr_is_one_line_exit_2(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Whatever flwr prints when it fails (a traceback here), the user sees one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flwr"
    fake.write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo '  File \"x.py\", line 1, in <module>' >&2\n"
        "echo 'grpc.RpcError: failed to connect to all addresses' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    # fedhello runs the flwr beside its interpreter first: make the fake one that
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    ov = _overrides(tiny_bert_dir, tiny_text_csv)
    rc = _run(tmp_path / "run", ov, "--engine", "flower", "--superlink", "127.0.0.1:9")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "flwr run failed (exit 1, SuperLink 127.0.0.1:9)" in err
    assert "grpc.RpcError: failed to connect to all addresses" in err
    rc = _run(tmp_path / "run2", ov, "--engine", "flower", "--superlink", "127.0.0.1:9",
              "--root-certificates", "nope.crt")  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--root-certificates 'nope.crt': no such file" in err


def test_a_supernode_with_a_memory_limit_trains_within_it(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedhello
    from fedhello.core.fit import MEMORY_TOLERANCE

    # full-width batches (6 tokens), so the node's measured memory is its profile's
    ov = _overrides(tiny_bert_dir, tiny_text_csv, clients__num_clients=2, federation__rounds=1,
                    model__max_length=6, train__precision='"fp32"', allocation__strategy="fedra",
                    run__profile_dir=f'"{tmp_path / "server-profiles"}"')  # fmt: skip
    probe = fedhello.calibrate(load_config(None, ov), steps=1)["profile"]["entries"]
    top = next(e["memory_mb"] for e in probe if (e["lowest"], e["count"]) == (3, 1))
    limit = round(top * 1.02, 4)  # the top block alone: blocks 0-2 are out of reach
    node_profiles = tmp_path / "node-profiles"
    extra = {0: f'budget-memory-mb={limit} profile-dir="{node_profiles}"'}
    with deployment(tmp_path, nodes=2, node_extra=extra) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        out = tmp_path / "limited"
        assert _run(out, ov, "--engine", "flower", "--superlink", dep.address) == 0
    # the node measured its own profile, on its own device, and the server used it
    assert len(list(node_profiles.glob("profile-*.json"))) == 1
    clients = [c for r in RunDir(out).read_metrics() for c in r["clients"]]
    limited = [c for c in clients if c["client"] == 0]
    assert limited and all(c["memory_limit_mb"] == limit for c in limited)
    assert all(c["layers"] == [3] for c in limited)
    assert all(c["train_memory_mb"] <= limit * (1 + MEMORY_TOLERANCE) for c in limited)
    assert all("memory_limit_mb" not in c for c in clients if c["client"] == 1)


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "ffa-lora"])
def test_baselines_on_the_flower_simulation_equal_embedded(
    method: str, tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Messages carry factors of a different rank per client, replies come back at theirs
    (HetLoRA's pruned) or with B alone (FFA-LoRA), nodes run FedRA's subnetwork when the
    config says so (here with FFA-LoRA: one simulation for both), and the server's
    aggregation gives the embedded engine's adapter."""
    from test_baselines import method_overrides

    extra = {"allocation__client_model": '"subnetwork"'} if method == "ffa-lora" else {}
    ov = method_overrides(tiny_bert_dir, tiny_text_csv, method, **extra)
    emb, sim = tmp_path / "emb", tmp_path / "sim"
    assert _run(emb, ov) == 0
    assert _run(sim, ov, "--engine", "flower-sim") == 0
    assert_same_adapter(emb, sim)
    ours = [without_machine(r) for r in RunDir(sim).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(emb).read_metrics()]
    if method in ("hetlora", "flexlora"):
        ranks = {c["rank"] for r in RunDir(sim).read_metrics() for c in r["clients"]}
        assert len(ranks) > 1  # heterogeneous ranks really went over the wire


def test_hetlora_on_a_loopback_deployment_equals_embedded_and_resumes(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real SuperNodes train the rank the server hands them (its pruned-rank record is
    checkpointed); a run resumed through the SuperLink ends as the uninterrupted embedded run."""
    from test_baselines import method_overrides

    # 3 rounds: a client prunes in round 2 and another in round 3, after the crash
    ov = method_overrides(tiny_bert_dir, tiny_text_csv, "hetlora", federation__rounds=3)
    emb = tmp_path / "emb"
    assert _run(emb, ov) == 0
    with deployment(tmp_path, nodes=3) as dep:
        for k, v in flower_env(dep.home).items():
            monkeypatch.setenv(k, v)
        out = tmp_path / "dep"
        assert _run(out, ov, "--engine", "flower", "--superlink", dep.address) == 0
        crashed = crash_after_round(out, tmp_path / "crashed", last_round=2)
        resume = ["run", "--resume", str(crashed), "--engine", "flower", "--superlink"]
        assert main([*resume, dep.address]) == 0
    assert_same_adapter(emb, out)
    assert_same_adapter(emb, crashed)
    assert RunDir(crashed).read_summary()["resumed_at_round"] == 3
    ranks = [[c["rank"] for c in r["clients"]] for r in RunDir(emb).read_metrics()]
    assert [[c["rank"] for c in r["clients"]] for r in RunDir(out).read_metrics()] == ranks
    assert [[c["rank"] for c in r["clients"]] for r in RunDir(crashed).read_metrics()] == ranks
    assert len({tuple(r) for r in ranks}) > 1  # ranks were pruned along the way
