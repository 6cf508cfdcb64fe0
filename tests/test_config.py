from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedhello.core.budgets import client_budgets
from fedhello.core.config import Config, load_config
from fedhello.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_need_no_file() -> None:
    cfg = load_config()
    assert cfg.model.name == "minilm-l6" and cfg.data.name == "wordnet-nouns"
    assert cfg.lora.r == 16 and cfg.lora.alpha == 16 and cfg.lora.dropout == 0.1


def test_every_field_has_help() -> None:
    for section in Config.model_fields.values():
        for name, field in section.annotation.model_fields.items():  # type: ignore[union-attr]
            assert field.description, f"{name} has no help text"


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "configs").glob("*.toml")) + sorted((ROOT / "configs").glob("study/*.toml")),
    ids=lambda p: p.relative_to(ROOT / "configs").as_posix(),
)
def test_shipped_configs_validate(path: Path) -> None:
    """Every shipped config, the study's included (configs/paper/ has its own tests)."""
    load_config(path)


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ["federation.rounds=5", "data.partition=iid", "clients.tiers=[0.5, 1.0]", "lora.dropout=0"],
    )
    assert cfg.federation.rounds == 5 and cfg.data.partition == "iid"
    assert cfg.clients.tiers == [0.5, 1.0] and cfg.lora.dropout == 0.0


def test_resolved_toml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.max_grad_norm=0", "clients.budgets=" + str([1] * 12)])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override,words",
    [
        ("allocation.strategy=nope", ["allocation.strategy", "'nope'", "fedra", "full"]),
        ("federation.rounds=0", ["federation.rounds", "0", "greater than or equal to 1"]),
        ("data.partitionn=iid", ["unknown key", "data.partitionn", "partition"]),
        ("data.partition=zipf", ["data.partition", "'zipf'", "dirichlet"]),
        (
            "allocation.shape=circle",
            [
                "allocation.shape",
                "'circle'",
                "uniform",
                "triangle",
                "inverted-triangle",
                "bottleneck",
            ],
        ),
        ("clients.per_round=50", ["clients.per_round = 50", "num_clients = 12"]),
        ("clients.tiers=[0.5, 1.5]", ["clients.tiers", "1.5"]),
        ("clients.budgets=[1, 2]", ["clients.budgets", "one per client"]),
        ("nosection.x=1", ["unknown key", "nosection"]),
        ("noequals", ["KEY=VALUE"]),
        # a boolean where a number is meant (pydantic would read true as 1)
        ("federation.rounds=true", ["federation.rounds = True", "a boolean; allowed: a number"]),
        ("train.lr=true", ["train.lr = True", "a boolean"]),
        ("clients.tiers=[true, 1.0]", ["clients.tiers = [True, 1.0]", "a boolean"]),
        ("federation.min_replies=7", ["federation.min_replies = 7", "per_round = 6", "1 to 6"]),
        ('run.name="../../etc"', ["run.name = '../../etc'", "one folder name"]),
        ('run.name=".."', ["run.name = '..'", "one folder name"]),
        ('model="minilm-l6"', ["model = 'minilm-l6'", "a section, not a value", "[model]"]),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_allowed(
    override: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_privacy_moves_the_model_every_round_so_min_replies_stays_1() -> None:
    with pytest.raises(ConfigError, match=r"federation.min_replies = 2 with privacy: .* allowed: "
                       r"min_replies = 1 with privacy"):  # fmt: skip
        load_config(None, ["privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0",
                           "federation.min_replies=2"])  # fmt: skip


def test_a_config_path_that_is_a_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a directory; allowed: a TOML file"):
        load_config(tmp_path)


def test_budget_larger_than_the_model() -> None:
    with pytest.raises(
        ConfigError, match=r"clients.budgets .* 8 layers .* 6 LoRA layers; allowed: 1..6"
    ):
        client_budgets(3, 6, [1.0], [2, 8, 6])


def test_tiers_round_up() -> None:
    assert client_budgets(12, 12, [0.5, 0.75, 1.0]) == [6] * 4 + [9] * 4 + [12] * 4
    assert client_budgets(6, 6, [0.5, 0.75, 1.0]) == [3, 3, 5, 5, 6, 6]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedhello.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_the_retired_tier_kind_stays_readable_where_it_said_layers(tmp_path: Path) -> None:
    """Every config and run folder written before the retirement says tier-kind = "layers"
    (the default): it loads as before, and the key is no longer written."""
    old = tmp_path / "old.toml"
    old.write_text('[clients]\ntier-kind = "layers"\ntiers = [0.5, 1.0]\n')
    cfg = load_config(old)
    assert cfg.clients.tiers == [0.5, 1.0] and "tier-kind" not in cfg.to_toml()
    assert cfg.outcome_dict() == load_config(None, ["clients.tiers=[0.5, 1.0]"]).outcome_dict()


def test_every_published_run_and_comparison_config_still_loads() -> None:
    """``fedhello report`` and ``compare`` read the run folders under docs/ (written with
    clients.tier-kind and without the keys added since): all of them still load."""
    import json

    from fedhello.core.config import build_saved_config, load_saved_config

    runs = sorted((ROOT / "docs").glob("results*/**/config.toml"))
    comparisons = sorted((ROOT / "docs").glob("results*/**/compare.json"))
    assert len(runs) > 100 and comparisons
    assert any("tier-kind" in p.read_text() for p in runs)
    for path in runs:
        load_saved_config(path)
    for path in comparisons:
        build_saved_config(json.loads(path.read_text())["base_config"])


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli("validate", "--set", "allocation.strategy=nope")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "allocation.strategy" in proc.stderr
    missing = run_cli("validate", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[federation\nrounds = 3")
    proc = run_cli("validate", str(broken))
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_cli_validate_prints_resolved_config() -> None:
    proc = run_cli("validate", str(ROOT / "configs/default.toml"), "--set", "federation.rounds=3")
    assert proc.returncode == 0, proc.stderr
    assert "rounds = 3" in proc.stdout and "[allocation]" in proc.stdout


def test_every_strategy_option_has_help() -> None:
    from fedhello.core.allocation import strategy_class, strategy_names

    for name in strategy_names():
        for option, field in strategy_class(name).Options.model_fields.items():
            assert field.description, f"{name}: option {option} has no help text"


def test_strategy_options_are_typed_and_owned_by_the_strategy() -> None:
    cfg = load_config(None, ["allocation.strategy=fed-hello", "allocation.fisher-mix=0.5"])
    opts = cfg.allocation.options
    assert type(opts).__name__ == "HelloOptions"
    assert opts.fisher_mix == 0.5 and opts.shape == "bottleneck"  # type: ignore[attr-defined]
    # every default of the chosen strategy is spelled out in the resolved config
    assert "fisher-every = 5" in cfg.to_toml() and 'sampler = "exact"' in cfg.to_toml()
    plain = load_config(None, ["allocation.strategy=full"])
    assert "shape" not in plain.to_toml() and plain.allocation.options.model_dump() == {}


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["allocation.shpe=triangle"], ["'allocation.shpe'", "allowed with strategy 'fedra'",
                                        "sampler"]),
        (["allocation.strategy=geometric", "allocation.shape=round"],
         ["allocation.shape = 'round'", "'triangle'", "strategy 'geometric'"]),
        (["allocation.strategy=fed-hello", "allocation.fisher_levels=[0.1, -1]"],
         ["allocation.fisher_levels", "must be positive"]),
        (["allocation.strategy=nope"], ["allocation.strategy = 'nope'", "fed-hello, fedra"]),
    ],
)  # fmt: skip
def test_bad_allocation_options_are_one_line_errors(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_an_option_of_another_strategy_is_kept_flagged_and_not_applied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fedhello.core.budgets import strategy_for

    cfg = load_config(None, ["allocation.shape=triangle", "allocation.fisher-every=3"])
    assert cfg.allocation.strategy == "fedra"
    assert cfg.allocation.foreign_options() == ["shape", "fisher_every"]
    with caplog.at_level("WARNING"):
        strategy = strategy_for(cfg, 6)
    assert "do not apply to strategy 'fedra'" in caplog.text and "shape (of " in caplog.text
    assert strategy.options.model_dump() == {"sampler": "exact"}
    # results do not depend on them: a run with them is reusable as one without
    assert cfg.outcome_dict() == load_config().outcome_dict()


def test_options_kept_for_another_strategy_apply_when_it_is_chosen() -> None:
    """One file serves several strategies (a comparison's base config)."""
    cfg = load_config(ROOT / "configs" / "compare.toml", ["allocation.strategy=fisher"])
    assert cfg.allocation.options.fisher_every == 2  # type: ignore[attr-defined]
    assert cfg.allocation.foreign_options() == []


def test_the_validate_command_warns_about_options_that_do_not_apply() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedhello.cli", "validate", "--set", "allocation.shape=triangle"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "warning: allocation options that do not apply to strategy 'fedra'" in out.stderr
    assert 'shape = "triangle"' in out.stdout


def test_a_runs_own_config_reruns_with_the_settings_of_its_time(tmp_path: Path) -> None:
    """A published run's config.toml written before train.precision existed reruns in fp32
    (what it ran in), not in today's "auto" (bf16 on a CPU with native bf16): the rerun of
    docs/results/runs/dirichlet/fisher/seed2 differed from round 1 for that reason. The same
    file outside a run folder is a plain config and takes today's defaults."""
    published = Path(__file__).parents[1] / "docs/results/runs/dirichlet/fisher/seed2"
    text = (published / "config.toml").read_text()
    assert "precision" not in text  # written before the setting existed
    cfg = load_config(published / "config.toml")
    assert (cfg.train.precision, cfg.train.base_precision) == ("fp32", "fp32")
    assert load_config(published / "config.toml", ["train.precision=bf16"]).train.precision == (
        "bf16"
    )  # an explicit override still wins
    (tmp_path / "config.toml").write_text(text)  # no metrics beside it: a plain config
    assert load_config(tmp_path / "config.toml").train.precision == "auto"
