"""Skew-aware client losses (FedRS, FedLC) and FedProx's proximal term, each against the
formula computed independently (numpy), declared from the train config, refused where they
mean nothing, and run end to end in a tiny federation (the default path bit for bit as before)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError
from fedhello.core.hooks import HookSpec
from fedhello.model.hooks import HookChain, HookContext, build_hooks, hooks_for, train_hooks
from fedhello.model.hooks.losses import (
    LogitAdjustedHook,
    RestrictedSoftmaxHook,
    calibration_margins,
    logit_adjusted_loss,
    restricted_softmax_loss,
)
from fedhello.model.hooks.proximal import ProximalHook
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir


def _np_cross_entropy(z: np.ndarray, y: np.ndarray) -> float:
    """Mean of -log softmax(z)[y], in float64, written out."""
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return float(np.mean(-np.log(p[np.arange(len(y)), y])))


def _ctx(counts: list[int] | None, params: list[torch.nn.Parameter] | None = None) -> HookContext:
    return HookContext(torch.nn.Linear(1, 1), {}, None, params or [], 0, 1, 0,  # type: ignore[arg-type]
                       None if counts is None else np.array(counts))  # fmt: skip


@pytest.fixture
def logits_labels() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return 3 * torch.randn(6, 5, generator=g), torch.tensor([0, 2, 2, 0, 3, 0])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_restricted_softmax_against_a_hand_built_softmax(
    logits_labels: tuple[torch.Tensor, torch.Tensor], alpha: float
) -> None:
    """FedRS: the logits of absent classes (1 and 4 here) times alpha, then the softmax
    cross-entropy; alpha 1 is plain cross-entropy; absent logits get no push at alpha 0."""
    logits, labels = logits_labels
    counts = [3, 0, 2, 1, 0]
    hook = RestrictedSoftmaxHook(alpha)
    hook.setup(_ctx(counts))
    loss_fn = HookChain([hook]).task_loss()
    assert loss_fn is not None and HookChain([hook]).loss_term() is None
    z = logits.double().numpy().copy()
    z[:, [1, 4]] *= alpha
    assert float(loss_fn(logits, labels)) == pytest.approx(_np_cross_entropy(z, labels.numpy()),
                                                           rel=1e-6)  # fmt: skip
    if alpha == 1.0:
        plain = torch.nn.functional.cross_entropy(logits, labels)
        torch.testing.assert_close(loss_fn(logits, labels), plain)
    if alpha == 0.0:
        x = logits.clone().requires_grad_(True)
        loss_fn(x, labels).backward()
        assert x.grad is not None and torch.all(x.grad[:, [1, 4]] == 0)
    present = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(restricted_softmax_loss(logits, labels, present, alpha),
                               loss_fn(logits, labels))  # fmt: skip


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_logit_adjusted_against_a_hand_computation(
    logits_labels: tuple[torch.Tensor, torch.Tensor], tau: float
) -> None:
    """FedLC: ``tau * n_c^(-1/4)`` subtracted from class c's logit; an absent class counts
    1e-8 (margin 100 tau), so it almost leaves the local softmax."""
    logits, labels = logits_labels
    counts = [16, 0, 81, 1, 0]
    margins = tau * np.array([16**-0.25, 100.0, 81**-0.25, 1.0, 100.0])
    np.testing.assert_allclose(calibration_margins(np.array(counts), tau), margins, rtol=1e-12)
    hook = LogitAdjustedHook(tau)
    hook.setup(_ctx(counts))
    loss_fn = hook.task_loss()
    assert loss_fn is not None
    z = logits.double().numpy() - margins
    assert float(loss_fn(logits, labels)) == pytest.approx(_np_cross_entropy(z, labels.numpy()),
                                                           rel=1e-6)  # fmt: skip
    x = logits.clone().requires_grad_(True)
    loss_fn(x, labels).backward()
    assert x.grad is not None and float(x.grad[:, [1, 4]].abs().max()) < 1e-15
    same = logit_adjusted_loss(logits, labels, torch.from_numpy(margins).float())
    torch.testing.assert_close(same, loss_fn(logits, labels))


def test_the_losses_need_class_counts_matching_the_logits(
    logits_labels: tuple[torch.Tensor, torch.Tensor],
) -> None:
    logits, labels = logits_labels
    with pytest.raises(ValueError, match="class counts"):
        RestrictedSoftmaxHook(0.5).setup(_ctx(None))
    hook = LogitAdjustedHook(1.0)
    hook.setup(_ctx([1, 2, 3]))
    with pytest.raises(ValueError, match=r"logits of shape \(6, 5\), expected \(batch, 3\)"):
        hook.loss(logits, labels)
    a, b = RestrictedSoftmaxHook(0.5), LogitAdjustedHook(1.0)
    a.setup(_ctx([1] * 5)), b.setup(_ctx([1] * 5))
    with pytest.raises(ConfigError, match="restricted-softmax, logit-adjusted each replace"):
        HookChain([a, b]).task_loss()


def test_the_proximal_term_is_the_formula_and_zero_at_the_start() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    start = [p.detach().numpy().copy() for p in params]
    hook = ProximalHook(mu=0.2)
    hook.setup(_ctx(None, params))
    term = hook.loss_term()
    assert term is not None and term().item() == 0.0
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape))
    now = [p.detach().numpy().astype(np.float64) for p in params]
    want = 0.1 * sum(float(((w - w0) ** 2).sum()) for w, w0 in zip(now, start, strict=True))
    assert term().item() == pytest.approx(want, rel=1e-6)
    term().backward()  # d/dw = mu (w - w_global)
    for p, w0 in zip(params, start, strict=True):
        np.testing.assert_allclose(p.grad.numpy(), 0.2 * (p.detach().numpy() - w0), rtol=1e-5)
    off = ProximalHook(mu=0.0)
    off.setup(_ctx(None, params))
    assert off.loss_term() is None


def test_the_train_config_declares_its_hooks_after_the_methods() -> None:
    assert train_hooks(load_config(None).train) == ()
    settings = ["allocation.strategy=hetlora", "train.proximal_mu=0.01",
                'train.loss="restricted-softmax"', "train.restricted_alpha=0.25"]  # fmt: skip
    cfg = load_config(None, settings)
    assert hooks_for(cfg)[0].name == "rank-pruning"
    assert hooks_for(cfg)[1:] == (HookSpec("proximal", {"mu": 0.01}),
                                  HookSpec("restricted-softmax", {"alpha": 0.25}))  # fmt: skip
    cfg = load_config(None, ['train.loss="logit-adjusted"', "train.calibration_tau=0.5"])
    assert hooks_for(cfg) == (HookSpec("logit-adjusted", {"tau": 0.5}),)
    build_hooks(hooks_for(cfg))


@pytest.mark.parametrize("loss", ["restricted-softmax", "logit-adjusted"])
def test_multiple_choice_refuses_a_class_loss(loss: str) -> None:
    from fedhello.tasks import check_config

    base = ['model.task="multiple-choice"', 'data.choice_columns=["a", "b"]',
            'data.question_column="q"']  # fmt: skip
    check_config(load_config(None, base))
    with pytest.raises(ConfigError, match=rf"train.loss = '{loss}'.*multiple-choice.*answer"):
        check_config(load_config(None, [*base, f'train.loss="{loss}"']))


def test_a_client_counts_its_shards_classes(tiny_bert_dir: Path) -> None:
    from test_training import _model, _text_data

    from fedhello.model.training import Shard, label_counts

    loaded, model = _model(tiny_bert_dir, ["class-0", "class-1", "class-2", "class-3", "x"])
    data = _text_data(loaded, 16)
    rows = np.array([0, 1, 2, 3, 3])
    counts = label_counts(Shard(data, rows), model)
    assert counts is not None and len(counts) == 5  # one per class of the head, absent ones 0
    assert counts.tolist() == np.bincount(data.labels.numpy()[rows], minlength=5).tolist()


def _run(out: Path, model: Path, data: Path, **extra: object) -> list[dict]:
    ov = tiny_overrides(model, data, data__text_column='"sentence"', data__label_column='"topic"',
                        data__partition='"pathological"', data__classes_per_client=2,
                        **extra)  # fmt: skip
    args = ["run", "--out", str(out)]
    for o in ov:
        args += ["--set", o]
    assert main(args) == 0
    return RunDir(out).read_metrics()


def test_tiny_federations_with_each_choice(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """2 rounds x 3 clients on 2 classes each: the defaults spelled out (AdamW's, and the skew
    recipe's head and loss) train exactly as the default config; SGD (momentum, Nesterov)
    with FedProx and FedRS, and plain SGD with FedLC, run end to end and train differently,
    recording the memory their state takes."""
    default = _run(tmp_path / "default", tiny_bert_dir, tiny_text_csv)
    explicit = _run(tmp_path / "adamw", tiny_bert_dir, tiny_text_csv, train__optimizer='"adamw"',
                    train__betas="[0.9, 0.999]", train__eps=1e-8, train__momentum=0.0,
                    train__loss='"logit-adjusted"', train__head='"class-means"',
                    train__head_finetune_rounds='"all"', train__proximal_mu=0.0)  # fmt: skip
    assert without_machine(explicit) == without_machine(default)
    fedrs = _run(tmp_path / "fedrs", tiny_bert_dir, tiny_text_csv, train__optimizer='"sgd"',
                 train__momentum=0.9, train__nesterov="true", train__lr=0.1,
                 train__proximal_mu=0.01, train__loss='"restricted-softmax"',
                 train__restricted_alpha=0.5)  # fmt: skip
    fedlc = _run(tmp_path / "fedlc", tiny_bert_dir, tiny_text_csv, train__optimizer='"sgd"',
                 train__lr=0.1, train__loss='"logit-adjusted"')  # fmt: skip
    for records in (fedrs, fedlc):
        clients = [c for r in records for c in r["clients"]]
        assert len(records) == 2 and len(clients) == 6 and all(c["accepted"] for c in clients)
        assert all(np.isfinite(c["train_loss"]) for c in clients)
        assert [r["allocation"] for r in records] == [r["allocation"] for r in default]
        assert [c["train_loss"] for c in clients] != [
            c["train_loss"] for r in default for c in r["clients"]
        ]

    def memory(records: list[dict]) -> np.ndarray:
        """train_memory_mb less the gradients: saved-for-backward peak + the state kept."""
        clients = [c for r in records for c in r["clients"]]
        return np.array([c["train_memory_mb"] - per(c) for c in clients])

    def per(c: dict) -> float:  # one fp32 tensor the size of the client's trainable ones
        return 4 * c["trainable_params"] / 2**20

    one = np.array([per(c) for r in default for c in r["clients"]])
    saved = memory(default) - 2 * one  # AdamW: two moments
    # plain SGD keeps nothing more; SGD-momentum keeps one moment, FedProx the global weights
    # and, for backward, w - w_global (the same peaks otherwise; records have 3 decimals)
    np.testing.assert_allclose(memory(fedlc), saved, atol=2e-3)
    np.testing.assert_allclose(memory(fedrs), saved + 3 * one, atol=2e-3)
    assert one.min() > 0.005  # what is compared is above the rounding
    config = (tmp_path / "fedrs" / "config.toml").read_text()
    assert 'optimizer = "sgd"' in config and 'loss = "restricted-softmax"' in config
    assert json.loads(json.dumps(fedlc))  # the records stay plain JSON
