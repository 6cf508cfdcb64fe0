"""What a user meets first, from a review of the user flows: the built-in defaults are said to
be the built-in defaults, a memory limit left at the layer fractions is refused before anything
is measured, ``validate`` refuses what ``plan`` and ``run`` refuse and warns about paths that
are not here, ``plan --rounds`` says the epsilon of the rounds it plans, and the one-line
errors say what to do."""

from __future__ import annotations

import inspect
import json
import logging
import os
import stat
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from helpers import FLWR_BOX

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError, DataError, UserError
from fedhello.core.privacy import accountant

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOML = str(ROOT / "configs" / "default.toml")
NOTE = "no CONFIG given: fedhello's built-in defaults"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own (its logging set up as a user gets it), and which
    heavy modules it imported, as the last line of stderr."""
    code = (
        "import json, sys\n"
        "from fedhello.cli import main\n"
        f"rc = main({list(args)!r})\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "print(json.dumps(sorted(heavy)), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _sets(*assignments: str) -> list[str]:
    return [x for kv in assignments for x in ("--set", kv)]


# ---- 1. no CONFIG: the built-in defaults, said ------------------------------------------------


def test_without_a_config_plan_and_validate_say_the_built_in_defaults_are_used() -> None:
    plan = _cli("plan", "--json", "--rounds", "1")
    assert plan.returncode == 0, plan.stderr
    notes = [line for line in plan.stderr.splitlines() if NOTE in line]
    assert len(notes) == 1 and notes[0].startswith("INFO "), plan.stderr
    # the strategy and the run's name are the built-in ones, independent of configs/default.toml
    assert "allocation.strategy = 'fedra'" in notes[0]
    assert "run name 'fedra-dirichlet-seed0'" in notes[0]
    assert "configs/default.toml" in notes[0]
    assert json.loads(plan.stdout)["strategy"] == "fedra"
    overridden = _cli("validate", "--set", "allocation.strategy=geometric")
    assert overridden.returncode == 0, overridden.stderr
    assert "allocation.strategy = 'geometric', run name 'geometric-dirichlet-seed0'" in (
        overridden.stderr
    )
    given = _cli("validate", DEFAULT_TOML)
    assert given.returncode == 0 and NOTE not in given.stderr, given.stderr


def test_a_config_that_fails_without_a_config_file_is_still_one_line() -> None:
    """The note comes once the config is checked: an error stays the only line."""
    bad = _cli("plan", "--set", "clients.per_round=99")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()[:-1]  # the last: the heavy modules' list
    assert len(lines) == 1 and lines[0].startswith("fedhello: error: "), lines


def test_a_run_without_a_config_says_so_as_it_starts(
    tiny_bert_dir: Path, tiny_text_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', federation__rounds=1,
                        train__local_steps=1)  # fmt: skip
    sets = _sets(*ov)
    caplog.set_level(logging.INFO, logger="fedhello")
    assert main(["run", *sets, "--out", str(tmp_path / "run")]) == 0
    notes = [r for r in caplog.records if NOTE in r.getMessage()]
    assert len(notes) == 1 and notes[0].name == "fedhello.cli"
    assert "run name 'fedra-dirichlet-seed0'" in notes[0].getMessage()


def test_compare_help_shows_the_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    import fedhello.api

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    params = inspect.signature(fedhello.api.compare).parameters
    assert params["strategies"].default == "all" and "(default: all)" in text
    seeds = ",".join(map(str, params["seeds"].default))
    assert f"comma-separated seeds (default: {seeds})" in text
    assert "compare-<run.name>, compare-default when run.name is unset" in text
    source = inspect.getsource(fedhello.api.compare)
    assert "f\"compare-{config.run.name or 'default'}\"" in source  # what the help describes


# ---- 2. memory limits left at the layer fractions -------------------------------------------


@pytest.mark.parametrize("base", [None, DEFAULT_TOML])
def test_memory_limits_left_at_the_layer_fractions_are_refused_at_config_time(
    base: str | None,
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(base, ["clients.budget-kind=memory-mb"])
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("config: clients.tiers = [0.5, 0.75, 1.0]")
    assert "'memory-mb'" in line and "layer fractions" in line
    assert "allowed: MB limits, e.g. clients.tiers = [100, 150, 200]" in line


def test_other_memory_limits_and_step_times_are_kept() -> None:
    """A tiny model trains in under 1 MB: small limits are no mistake; per-client budgets
    override the tiers; 0.5-1 s per step are plausible step-time limits."""
    small = load_config(None, ["clients.budget-kind=memory-mb", "clients.tiers=[0.2, 0.3, 0.43]"])
    assert small.clients.tiers == [0.2, 0.3, 0.43]
    per_client = ["clients.num_clients=3", "clients.per_round=2", "clients.budgets=[100, 150, 200]"]
    given = load_config(None, ["clients.budget-kind=memory-mb", *per_client])
    assert given.clients.budgets == [100, 150, 200]
    seconds = load_config(None, ["clients.budget-kind=step-seconds"])
    assert seconds.clients.tiers == [0.5, 0.75, 1.0]


# ---- 3. validate: the accountant's refusal, and paths that are not here ----------------------


def test_validate_refuses_a_target_epsilon_one_round_exceeds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    z, k, m = 1.0, 12, 6
    one_round = accountant.epsilon(1, k, m, z, 1 / k)
    dp = _sets(f"privacy.noise_multiplier={z}", f"privacy.target_epsilon={one_round / 2}")
    assert main(["validate", *dp]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedhello: error: privacy.target_epsilon"), err
    assert f"one round already spends epsilon {one_round:.3g}" in err[0]
    assert main(["plan", "--json", *dp]) == 2  # what plan (and run) refuse alike
    assert "one round already spends" in capsys.readouterr().err
    ok = _sets(f"privacy.noise_multiplier={z}", f"privacy.target_epsilon={one_round * 2}")
    assert main(["validate", *ok]) == 0


def test_validate_warns_about_local_paths_that_are_not_here(tmp_path: Path) -> None:
    model, data = tmp_path / "no-model", tmp_path / "no-data.csv"
    out = _cli("validate", "--set", f'model.name="{model}"', "--set", f'data.name="{data}"',
               "--set", "privacy.noise_multiplier=1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    warnings = [x for x in out.stderr.splitlines() if x.startswith("fedhello: warning: ")]
    assert len(warnings) == 2, out.stderr
    assert f"model.name = '{model}'" in warnings[0] and "does not exist" in warnings[0]
    assert f"data.name = '{data}'" in warnings[1] and "does not exist" in warnings[1]
    assert f'name = "{model}"' in out.stdout  # the resolved config all the same
    assert json.loads(out.stderr.strip().splitlines()[-1]) == []  # no torch, no transformers
    # a hub name is no local path, and a folder that is here is no warning
    data.write_text("text,label\na,b\n")
    hub = _cli("validate", "--set", 'model.name="org/some-model"', "--set", f'data.name="{data}"')
    assert hub.returncode == 0 and "warning" not in hub.stderr, hub.stderr


# ---- 5. plan --rounds: the epsilon of the planned rounds -------------------------------------


def test_plan_text_gives_epsilon_after_the_planned_rounds_and_each_round() -> None:
    from rich.console import Console

    from fedhello.planner import make_plan, render_plan

    z, k, m, rounds = 2.0, 12, 6, 6
    eps = [accountant.epsilon(t, k, m, z, 1 / k) for t in range(rounds + 1)]
    cfg = load_config(None, [f"privacy.noise_multiplier={z}", f"federation.rounds={rounds}"])
    shown = StringIO()
    render_plan(make_plan(cfg, rounds=2), Console(file=shown, width=1000))
    text = " ".join(shown.getvalue().split())
    assert f"epsilon {eps[2]:.3f} at delta {1 / k:.3g} after 2 rounds" in text
    assert f"(the run's {rounds} rounds spend {eps[rounds]:.3f})" in text
    assert f"Epsilon after each round: {eps[1]:.3f}, {eps[2]:.3f}." in text
    shown = StringIO()
    render_plan(make_plan(cfg), Console(file=shown, width=1000))
    text = " ".join(shown.getvalue().split())
    assert f"epsilon {eps[rounds]:.3f} at delta {1 / k:.3g} after {rounds} rounds (noise" in text
    assert "Epsilon after each round: " + ", ".join(f"{e:.3f}" for e in eps[1:]) + "." in text


# ---- 6. the proxy set's refusal says why and what to do ------------------------------------


def test_the_proxy_set_refusal_says_why_it_is_held_out_and_what_to_do() -> None:
    from fedhello.data.partition import hold_out_proxy

    with pytest.raises(DataError) as err:
        hold_out_proxy(np.arange(340), 256, 0)
    line = str(err.value)
    assert "\n" not in line and line.startswith("allocation.proxy_examples = 256: ")
    assert "only 340 examples" in line and "held out for every strategy" in line
    assert "same client shards" in line
    assert "allowed: at most half of it (170): lower allocation.proxy_examples" in line


# ---- 7. a deployment that cannot reach its SuperLink, without a CA --------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-ins")
def test_an_unavailable_superlink_without_root_certificates_hints_at_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedhello.engine.flower.runner import run_flower_deployment
    from fedhello.store.runs import RunDir

    bin_dir = tmp_path / "venv" / "bin"  # flwr is looked for beside this Python first
    bin_dir.mkdir(parents=True)
    (tmp_path / "box.txt").write_text(FLWR_BOX, encoding="utf-8")
    flwr = bin_dir / "flwr"
    flwr.write_text(f'#!/bin/sh\ncat "{tmp_path / "box.txt"}"\nexit 1\n')
    flwr.chmod(flwr.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    cfg = load_config()
    with pytest.raises(UserError) as err:
        run_flower_deployment(cfg, RunDir(tmp_path / "plain"), "10.0.0.1:9093")
    line = str(err.value)
    assert "\n" not in line and "Connection to the SuperLink is unavailable" in line
    assert "If the SuperLink uses TLS, give its CA certificate: --root-certificates" in line
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(UserError) as err:
        run_flower_deployment(cfg, RunDir(tmp_path / "tls"), "10.0.0.1:9093", str(ca))
    assert "unavailable" in str(err.value) and "--root-certificates" not in str(err.value)
