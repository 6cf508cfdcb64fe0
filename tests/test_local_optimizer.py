"""The local optimizer (``train.optimizer``): SGD steps as written by hand, AdamW as before (bit
for bit), the training memory each keeps, the settings refused, and the cost probe stepping
with the same optimizer the clients do."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedhello.core.config import TrainConfig, load_config
from fedhello.core.errors import ConfigError
from fedhello.model.accelerator import CPU_FP32
from fedhello.model.meters import SavedTensorMeter, train_memory_mb
from fedhello.model.step import LocalStep, local_optimizer


class _Linear(torch.nn.Module):
    """A linear classifier answering like a transformers head (``.loss``, ``.logits``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.head(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(5, 3, generator=g), "labels": torch.randint(0, 4, (5,), generator=g)}
            for _ in range(n)]  # fmt: skip


def _train(model: _Linear, cfg: TrainConfig, lr: float, steps: int) -> list[torch.Tensor]:
    params = list(model.parameters())
    optimizer = local_optimizer(params, lr, cfg)
    step = LocalStep(model, params, optimizer, CPU_FP32.grad_scaler(), SavedTensorMeter(model),
                     CPU_FP32)  # fmt: skip
    for batch in _batches(steps):
        step(batch, 0.0)  # no clipping: the update is the optimizer's alone
    return [p.detach().clone() for p in params]


def _grads(params: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of the batch's mean cross-entropy at ``params`` (weight, bias), by hand."""
    w, b = (p.detach().clone().requires_grad_(True) for p in params)
    loss = F.cross_entropy(batch["x"] @ w.T + b, batch["labels"])
    return list(torch.autograd.grad(loss, [w, b]))


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_steps_as_written_by_hand(momentum: float, nesterov: bool) -> None:
    """Plain SGD: ``w - lr g``; with momentum ``v = m v + g``, ``w - lr v`` (Nesterov:
    ``w - lr (g + m v)``), the buffer starting at the first gradient."""
    cfg = TrainConfig(optimizer="sgd", momentum=momentum, nesterov=nesterov)
    lr, steps = 0.1, 3
    model = _Linear()
    w = [p.detach().clone() for p in model.parameters()]
    got = _train(model, cfg, lr, steps)
    v: list[torch.Tensor] | None = None
    for batch in _batches(steps):
        g = _grads(w, batch)
        if momentum:
            v = g if v is None else [momentum * vi + gi for vi, gi in zip(v, g, strict=True)]
            d = [gi + momentum * vi for gi, vi in zip(g, v, strict=True)] if nesterov else v
        else:
            d = g
        w = [wi - lr * di for wi, di in zip(w, d, strict=True)]
    for a, b in zip(got, w, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_is_built_as_before_bit_for_bit() -> None:
    """The default optimizer is the AdamW the clients always built (lr, the config's weight
    decay, torch's betas and eps): the same weights after a few steps, bit for bit."""
    cfg = TrainConfig(weight_decay=0.01)
    opt = local_optimizer(list(_Linear().parameters()), 0.01, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.01)
    new = _train(_Linear(), cfg, 0.01, 3)
    model = _Linear()
    params = list(model.parameters())
    before = torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)  # the former local_optimizer
    step = LocalStep(model, params, before, CPU_FP32.grad_scaler(), SavedTensorMeter(model),
                     CPU_FP32)  # fmt: skip
    for batch in _batches(3):
        step(batch, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(new, params, strict=True))
    custom = local_optimizer(params, 0.01, TrainConfig(betas=(0.5, 0.9), eps=1e-6))
    assert (custom.param_groups[0]["betas"], custom.param_groups[0]["eps"]) == ((0.5, 0.9), 1e-6)


@pytest.mark.parametrize(
    "settings,state",
    [({}, 2), ({"optimizer": "sgd"}, 0), ({"optimizer": "sgd", "momentum": 0.9}, 1),
     ({"optimizer": "sgd", "momentum": 0.9, "nesterov": True}, 1), ({"proximal_mu": 0.1}, 3),
     ({"optimizer": "sgd", "proximal_mu": 0.1}, 1)],
)  # fmt: skip
def test_memory_counts_each_optimizers_state(settings: dict[str, object], state: int) -> None:
    """Per trainable parameter: the fp32 gradient + AdamW's two moments, SGD-momentum's one,
    plain SGD's none (+ FedProx's copy of the global weights)."""
    cfg = TrainConfig(**settings)  # type: ignore[arg-type]
    assert cfg.state_per_param == state
    trainable, saved = 2**18, 3 * 2**20
    expected = (saved + (1 + state) * 4 * trainable) / 2**20
    assert train_memory_mb(saved, trainable, cfg.state_per_param) == expected
    assert train_memory_mb(saved, trainable) == (saved + 12 * trainable) / 2**20  # as before
    model = _Linear()  # the optimizer really keeps that many tensors per parameter
    params = list(model.parameters())
    opt = local_optimizer(params, 0.1, cfg)
    LocalStep(model, params, opt, CPU_FP32.grad_scaler(), SavedTensorMeter(model),
              CPU_FP32)(_batches(1)[0], 0.0)  # fmt: skip
    kept = sum(t.numel() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.numel() > 1)  # fmt: skip
    assert kept == cfg.optimizer_moments * sum(p.numel() for p in params)


@pytest.mark.parametrize(
    "overrides,message",
    [(["train.momentum=0.9"], r"train.momentum = 0.9.*'adamw'.*allowed: optimizer = 'sgd'"),
     (["train.nesterov=true"], r"nesterov = true.*'adamw'"),
     (['train.optimizer="sgd"', "train.nesterov=true"], r"Nesterov needs momentum"),
     (['train.optimizer="sgd"', "train.betas=[0.8, 0.99]"], r"train.betas.*'sgd'.*AdamW's"),
     (['train.optimizer="sgd"', "train.eps=1e-6"], r"train.eps = 1e-06.*'sgd'"),
     (["train.betas=[0.9, 1.0]"], r"train.betas.*each in \[0, 1\)"),
     (['train.optimizer="adam"'], r"train.optimizer = 'adam'"),
     (["train.momentum=1.0"], r"train.momentum = 1.0"),
     (["train.proximal_mu=-1"], r"train.proximal_mu = -1"),
     (['train.loss="focal"'], r"train.loss = 'focal'"),
     (["train.restricted_alpha=0.2"], r"restricted_alpha = 0.2.*loss = 'auto'"),
     (['train.loss="cross-entropy"', "train.calibration_tau=2"], r"tau = 2.*'cross-entropy'"),
     (['train.loss="restricted-softmax"', "train.restricted_alpha=1.5"], r"restricted_alpha"),
     (['train.loss="restricted-softmax"', "train.calibration_tau=2"], r"calibration_tau = 2"),
     (['train.loss="logit-adjusted"', "train.calibration_tau=0"], r"calibration_tau = 0")],
)  # fmt: skip
def test_meaningless_settings_are_refused_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_every_setting_of_the_chosen_optimizer_loads() -> None:
    t = load_config(None, ['train.optimizer="sgd"', "train.momentum=0.9", "train.nesterov=true",
                           "train.lr=0.05", "train.proximal_mu=0.01"]).train  # fmt: skip
    assert (t.optimizer, t.momentum, t.nesterov, t.state_per_param) == ("sgd", 0.9, True, 2)
    t = load_config(None, ["train.betas=[0.8, 0.99]", "train.eps=1e-6"]).train
    assert (t.betas, t.eps, t.state_per_param) == ((0.8, 0.99), 1e-6, 2)
    # a saved config spells every default out: it loads with either optimizer
    for optimizer in ("adamw", "sgd"):
        saved = TrainConfig(optimizer=optimizer).model_dump(mode="json")
        assert TrainConfig.model_validate(saved).optimizer == optimizer


def test_the_probe_steps_with_the_clients_optimizer(tiny_bert_dir: Path) -> None:
    """The probe builds the optimizer from the same train config (same step, same state):
    its memory differs between AdamW and plain SGD by exactly two fp32 moments per trainable
    parameter, and a non-default optimizer gets its own profile key (AdamW's is unchanged)."""
    from test_training import _model, _text_data

    from fedhello.core.layers import layer_of_keys
    from fedhello.model.lora import adapter_keys, apply_layer_mask
    from fedhello.model.probe import _measure
    from fedhello.store.profiles import profile_key

    loaded, model = _model(tiny_bert_dir, ["a", "b", "c", "d"])
    layer_of = layer_of_keys(adapter_keys(model), model.config.num_hidden_layers)
    data = _text_data(loaded, 8)
    batch = data.batch(np.arange(8))
    model.train()
    settings = {"adamw": [], "sgd": ['train.optimizer="sgd"'], "prox": ["train.proximal_mu=0.1"],
                "fedlc": ['train.loss="logit-adjusted"']}  # fmt: skip
    costs = {}
    for name, overrides in settings.items():
        cfg = load_config(None, overrides).train
        with torch.random.fork_rng():
            torch.manual_seed(0)
            costs[name] = _measure(model, range(3, 4), layer_of, batch, CPU_FP32, 1, 1.0, cfg)
    trainable = sum(p.numel() for p in apply_layer_mask(model, range(3, 4), layer_of))
    one = 4 * trainable / 2**20  # MiB of one fp32 copy of the trainable tensors
    assert costs["adamw"].memory_mb - costs["sgd"].memory_mb == pytest.approx(2 * one, rel=1e-9)
    # FedProx: the copy of the global weights, and w - w_global kept for backward
    assert costs["prox"].memory_mb - costs["adamw"].memory_mb == pytest.approx(2 * one, rel=1e-9)
    assert costs["fedlc"].memory_mb == pytest.approx(costs["adamw"].memory_mb, abs=1e-3)
    plain = _measure(model, range(3, 4), layer_of, batch, CPU_FP32, 1, 1.0)  # no train config
    assert plain.memory_mb == costs["adamw"].memory_mb

    def key(*settings: str) -> dict[str, object]:
        return profile_key(load_config(None, list(settings)), "m", "text", 4, 4, "cpu", "fp32",
                           "fp32", 16, on_cpu=True)  # fmt: skip

    assert "optimizer" not in key() and "optimizer" not in key("train.weight_decay=0.1")
    assert key('train.optimizer="sgd"')["optimizer"] == "sgd"
    assert key('train.optimizer="sgd"') != key('train.optimizer="sgd"', "train.momentum=0.9")
    assert key("train.proximal_mu=0.1")["state_per_param"] == 3
