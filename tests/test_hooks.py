"""Client hooks: the built-in methods declare theirs as plain data, hooks compose in order, and
a user's hook, registered in a few lines, runs on every client of a federation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from safetensors.numpy import load_file

import fedhello.core.allocation.base as allocation_registry
import fedhello.model.hooks.registry as hook_registry
from fedhello.cli import main
from fedhello.core.allocation import register, strategy_class
from fedhello.core.allocation.fedra import FedRAAllocation
from fedhello.core.allocation.options import StrategyOptions
from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError
from fedhello.core.hooks import HookSpec
from fedhello.model.hooks import ClientHook, HookChain, HookContext, build_hooks, hooks_for
from fedhello.model.hooks import register_hook as register_client_hook
from fedhello.store.runs import RunDir


@pytest.mark.parametrize(
    "settings,names",
    [(["allocation.strategy=fedra"], []),
     (["allocation.strategy=fedra", "allocation.client_model=subnetwork"], ["subnetwork"]),
     (["allocation.strategy=hetlora", "allocation.rank_penalty=0.5"], ["rank-pruning"]),
     (["allocation.strategy=flexlora"], []), (["allocation.strategy=ffa-lora"], [])],
)  # fmt: skip
def test_each_method_declares_its_client_hooks(settings: list[str], names: list[str]) -> None:
    hooks = hooks_for(load_config(None, settings))
    assert [h.name for h in hooks] == names
    if names == ["rank-pruning"]:  # HetLoRA's options reach its hook
        assert dict(hooks[0].params) == {"penalty": 0.5, "decay": 0.9, "min_rank": 1}
    build_hooks(hooks)  # every declared name is registered and takes its params


def test_an_unknown_or_misconfigured_hook_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'no-such-hook' is not registered.*rank-pruning"):
        build_hooks([HookSpec("no-such-hook")])
    with pytest.raises(ConfigError, match=r"rank-pruning\(penalty=1.0\)"):
        build_hooks([HookSpec("rank-pruning", {"penalty": 1.0})])


class _Log(ClientHook):
    name = "log"

    def __init__(self, tag: str, log: list[str], term: float | None = None) -> None:
        self.tag, self.log, self.term = tag, log, term

    def setup(self, ctx: HookContext) -> None:
        self.log.append(f"setup {self.tag}")

    def loss_term(self):
        return None if self.term is None else (lambda: torch.tensor(self.term))

    def local_loop(self, ctx: HookContext):
        from contextlib import contextmanager

        @contextmanager
        def around():
            self.log.append(f"enter {self.tag}")
            yield
            self.log.append(f"exit {self.tag}")

        return around()

    def finish_upload(self, upload):
        self.log.append(f"finish {self.tag}")
        return {**upload, "by": np.array([*upload.get("by", []), ord(self.tag)])}


def test_hooks_compose_in_their_declared_order() -> None:
    log: list[str] = []
    chain = HookChain([_Log("a", log, 1.0), _Log("b", log), _Log("c", log, 2.0)])
    ctx = HookContext(torch.nn.Linear(1, 1), {}, None, [], 0, 1, 0)  # type: ignore[arg-type]
    chain.setup(ctx)
    term = chain.loss_term()
    assert term is not None and float(term()) == 3.0
    with chain.local_loop(ctx):
        log.append("steps")
    upload = chain.finish_upload({})
    assert log == ["setup a", "setup b", "setup c", "enter a", "enter b", "enter c", "steps",
                   "exit c", "exit b", "exit a", "finish a", "finish b", "finish c"]  # fmt: skip
    assert upload["by"].tolist() == [ord("a"), ord("b"), ord("c")]
    assert HookChain([_Log("x", [])]).loss_term() is None


def _run(out: Path, strategy: str, model: Path, data: Path) -> RunDir:
    ov = tiny_overrides(model, data, data__text_column='"sentence"', data__label_column='"topic"',
                        allocation__strategy=f'"{strategy}"', train__lr=0.05)  # fmt: skip
    args = ["run", "--out", str(out)]
    for o in ov:
        args += ["--set", o]
    assert main(args) == 0
    return RunDir(out)


def test_a_user_hook_runs_on_every_client_of_a_federation(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook pulling the trained B factors to zero, declared by a FedRA variant: every client
    of the embedded run calls it, and the federation ends with smaller B's than plain FedRA
    (same seed: same clients, layers and batches; only the hook differs)."""
    # both registries as they were after the test
    monkeypatch.setattr(hook_registry, "_HOOKS", dict(hook_registry._HOOKS))
    monkeypatch.setattr(allocation_registry, "_REGISTRY", dict(allocation_registry._REGISTRY))
    seen: list[tuple[int, int]] = []

    @register_client_hook
    class PullBToZero(ClientHook):
        name = "pull-b-to-zero"

        def __init__(self, weight: float) -> None:
            self.weight = weight

        def setup(self, ctx: HookContext) -> None:
            self.b = [
                p for n, p in ctx.model.named_parameters() if p.requires_grad and "lora_B" in n
            ]
            self.who = (ctx.round, ctx.client)

        def loss_term(self):
            return lambda: self.weight * torch.stack([b.square().sum() for b in self.b]).sum()

        def finish_upload(self, upload):
            seen.append(self.who)
            return upload

    @register
    class PulledFedRA(FedRAAllocation):
        name = "fedra-pulled"

        @classmethod
        def client_hooks(cls, options: StrategyOptions, client_model: str = "full"):
            own = HookSpec("pull-b-to-zero", {"weight": 100.0})
            return (own, *super().client_hooks(options, client_model))

    assert strategy_class("fedra-pulled") is PulledFedRA
    plain = _run(tmp_path / "plain", "fedra", tiny_bert_dir, tiny_text_csv)
    assert seen == []  # plain FedRA does not run it
    pulled = _run(tmp_path / "pulled", "fedra-pulled", tiny_bert_dir, tiny_text_csv)
    records = pulled.read_metrics()
    trained = [(r["round"], c["client"]) for r in records for c in r["clients"]]
    assert seen == trained and len(trained) == 6  # 2 rounds x 3 clients, each once
    assert [r["allocation"] for r in records] == [r["allocation"] for r in plain.read_metrics()]
    assert all(c["accepted"] for r in records for c in r["clients"])

    def b_norm(run: RunDir) -> float:
        adapter = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
        return float(sum(np.linalg.norm(v) for k, v in adapter.items() if "lora_B" in k))

    assert b_norm(pulled) < 0.5 * b_norm(plain), (b_norm(pulled), b_norm(plain))
