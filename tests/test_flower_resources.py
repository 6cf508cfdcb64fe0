"""What Flower's simulation gives each virtual client (CPU cores, GPU share, how many at once)
and how a client inside a Ray actor names its GPU. No GPU here: the device's and Ray's answers
are faked (``torch.cuda.*``, ``ray.get_gpu_ids``, ``ray.nodes``), never fedhello's functions;
the pool size is checked against flwr's own ``pool_size_from_resources``."""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import torch
from flwr.simulation.ray_transport import ray_actor

from fedhello.core.config import Config, build_config
from fedhello.core.errors import ConfigError
from fedhello.engine.flower import simulation
from fedhello.engine.flower.client_app import node_accelerator
from fedhello.engine.flower.simulation import simulation_resources


def config(**sections: dict[str, Any]) -> Config:
    return build_config(dict(sections))


def flwr_pool_size(monkeypatch: pytest.MonkeyPatch, resources: Any) -> int:
    """How many actors flwr 1.41 starts for these resources on a Ray node with the cores and
    GPUs Ray is told (``init_args``): Ray's answer to ``ray.nodes()`` is faked."""
    init = resources.backend_config()["init_args"]
    node = {"Resources": {"CPU": float(init["num_cpus"]), "GPU": float(init["num_gpus"])}}
    monkeypatch.setattr(ray, "nodes", lambda: [node])
    return ray_actor.pool_size_from_resources(resources.backend_config()["client_resources"])


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """torch's answers on a machine (or in an actor) that sees ``count`` CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA Fake")


def fake_ray_actor(monkeypatch: pytest.MonkeyPatch, gpu_ids: list[str]) -> None:
    """Ray's answers inside an actor it gave ``gpu_ids`` (and set CUDA_VISIBLE_DEVICES to)."""
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    context = SimpleNamespace(get_actor_id=lambda: "c0ffee")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: list(gpu_ids))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(gpu_ids))
    simulation._say_mapped.cache_clear()


def test_a_quarter_gpu_share_trains_four_clients_at_once_on_16_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = config(federation={"client_gpus": 0.25})
    res = simulation_resources(cfg, cores=16, gpus=1)
    # 1 GPU / 0.25 = 4 slots; 16 cores // 4 = 4 cores each, so the cores fit 4 as well
    assert (res.client_cpus, res.client_gpus, res.at_once) == (4, 0.25, 4)
    assert flwr_pool_size(monkeypatch, res) == 4
    assert res.describe().startswith("4 clients at once: limited by the GPUs")


def test_the_default_share_is_a_gpu_per_client_and_the_cores_are_split_between_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    res = simulation_resources(config(train={"device": "cuda"}))
    assert (res.cores, res.gpus, res.client_cpus, res.client_gpus) == (16, 2, 8, 1.0)
    assert res.at_once == flwr_pool_size(monkeypatch, res) == 2


def test_an_explicit_client_cpus_is_kept_and_then_the_cores_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = config(federation={"client_gpus": 0.25, "client_cpus": 8})
    res = simulation_resources(cfg, cores=16, gpus=1)
    assert (res.client_cpus, res.at_once) == (8, 2)  # 16 // 8 = 2 < 1 / 0.25 = 4
    assert flwr_pool_size(monkeypatch, res) == 2
    assert "limited by the CPU cores" in res.describe()


def test_cpu_clients_keep_every_core_one_at_a_time() -> None:
    res = simulation_resources(config(train={"device": "cpu"}), cores=16, gpus=1)
    assert res.backend_config() == {
        "client_resources": {"num_cpus": 16, "num_gpus": 0.0},
        "init_args": {"num_cpus": 16, "num_gpus": 1},
    }
    assert res.at_once == 1


def test_gpu_shares_that_cannot_work_are_one_config_error() -> None:
    with pytest.raises(ConfigError, match=r"client_gpus = 0.25: this machine has no CUDA"):
        simulation_resources(config(federation={"client_gpus": 0.25}), cores=4, gpus=0)
    with pytest.raises(ConfigError, match=r"client_gpus = 0 with train.device = 'cuda:0'"):
        simulation_resources(
            config(train={"device": "cuda:0"}, federation={"client_gpus": 0}), cores=4, gpus=1
        )
    with pytest.raises(ConfigError, match=r"client_cpus = 8: this machine has 4 CPU cores"):
        simulation_resources(config(federation={"client_cpus": 8}), cores=4, gpus=0)


def test_cuda_1_inside_a_ray_actor_is_the_actors_cuda_0(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_gpus(monkeypatch, 1)  # Ray set CUDA_VISIBLE_DEVICES=1: torch sees one device
    fake_ray_actor(monkeypatch, ["1"])
    caplog.set_level(logging.INFO, logger="fedhello.engine.flower.simulation")
    acc = node_accelerator(config(train={"device": "cuda:1"}), {})
    assert acc.device == torch.device("cuda", 0)
    lines = [r.getMessage() for r in caplog.records if "Ray gave it" in r.getMessage()]
    assert lines == ["train.device = 'cuda:1' in a Ray actor: training on the GPU Ray gave it "
                     "(id 1), which the actor sees as cuda:0"]  # fmt: skip


def test_cuda_in_a_ray_actor_given_no_gpu_names_client_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_gpus(monkeypatch, 0)  # Ray set CUDA_VISIBLE_DEVICES="" for an actor with no GPU
    fake_ray_actor(monkeypatch, [])
    with pytest.raises(ConfigError, match=r"was given no GPU.*federation\.client_gpus > 0"):
        node_accelerator(config(train={"device": "cuda"}), {})


def test_outside_a_ray_actor_cuda_1_on_one_gpu_still_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_gpus(monkeypatch, 1)
    assert "ray" in sys.modules and not ray.is_initialized()  # the path that looks at Ray
    with pytest.raises(ConfigError, match=r"'cuda:1': this machine has 1 CUDA device"):
        node_accelerator(config(train={"device": "cuda:1"}), {})


def test_the_driver_with_ray_running_keeps_its_cuda_1(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # the ServerApp's process
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_actor_id=lambda: None))  # fmt: skip
    acc = node_accelerator(config(train={"device": "cuda:1"}), {})
    assert acc.device == torch.device("cuda", 1)
