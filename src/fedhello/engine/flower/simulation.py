"""What Flower's simulation engine gives each virtual client, and how the client sees it.

Flower's simulation runs every virtual client in a Ray actor. Two facts of flwr 1.41 and Ray
2.55 shape the resources asked for here (read in the installed sources):

* ``flwr/simulation/ray_transport/ray_actor.py``, ``pool_size_from_resources``: the actor pool
  holds, per Ray node, ``int(CPU / num_cpus)`` actors, and where ``num_gpus > 0``
  ``min(that, int(GPU / num_gpus))`` (0 on a node without a GPU: "ActorPool is empty").
  ``RayBackend.build`` (``flwr/server/superlink/fleet/vce/backend/raybackend.py``) starts
  exactly that many, each with ``.options(**client_resources)``. So the scarcer resource
  decides how many clients train at once: ``num_gpus = 0.25`` with every core per client
  (``num_cpus = 16`` of 16) is ``min(16 / 16, 1 / 0.25) = min(1, 4) = 1`` at once.
* ``ray/_private/utils.py``, ``set_visible_accelerator_ids``: Ray sets an actor's
  ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned, and to ``""`` for an actor that asked
  for none. An actor sees its one GPU as ``cuda:0``, and a client that asked for no GPU
  sees none at all.

Hence :func:`simulation_resources` gives a client with a GPU share an equal split of the
cores, so that the share, not the cores, limits concurrency, and tells Ray the cores and GPUs
it counted (``init_args``), so that the pool is the size it computed; and
:func:`actor_device` maps a configured ``cuda:N`` to the actor's ``cuda:0``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from fedhello.core.config import Config
from fedhello.core.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimResources:
    """Ray's node as counted here, one virtual client's share, and how many run at once."""

    cores: int  # CPU cores Ray is told this machine has
    gpus: int  # CUDA devices Ray is told this machine has
    client_cpus: int
    client_gpus: float
    at_once: int  # flwr's actor pool: clients that train at the same time
    limit: str  # what limits ``at_once``

    def backend_config(self) -> dict[str, Any]:
        """``run_simulation``'s ``backend_config``: ``client_resources`` become each actor's
        ``.options()``; ``init_args`` go to ``ray.init`` (Ray would count the cores itself,
        from the container's CPU quota where there is one, and could find fewer than here)."""
        return {
            "client_resources": {"num_cpus": self.client_cpus, "num_gpus": self.client_gpus},
            "init_args": {"num_cpus": self.cores, "num_gpus": self.gpus},
        }

    def describe(self) -> str:
        per = f"{self.client_cpus} CPU core(s)"
        if self.client_gpus:
            per += f" and {self.client_gpus:g} GPU"
        return f"{self.at_once} clients at once: limited by {self.limit}; each gets {per}"


def simulation_resources(
    cfg: Config, cores: int | None = None, gpus: int | None = None
) -> SimResources:
    """The resources of one virtual client on a machine with ``cores`` CPU cores and ``gpus``
    CUDA devices (default: this machine's, as torch sees them).

    ``federation.client_gpus`` defaults to 1 where ``train.device`` finds CUDA: a whole GPU per
    client is the share that cannot run out of memory (a smaller one depends on the model, so
    it is the user's to choose), and a client asking for none would be shown no GPU by Ray.
    ``federation.client_cpus = 0`` is every core when the clients train on the CPU (one at a
    time, as before); with a GPU share it is ``cores // slots``, where ``slots = int(gpus /
    client_gpus)`` is how many shares the GPUs hold, so that ``int(cores / client_cpus) >=
    slots`` and the GPUs limit concurrency (16 cores, 1 GPU, 0.25: 4 slots, 4 cores each,
    4 at once)."""
    from fedhello.model.accelerator import cuda_count

    fed, spec = cfg.federation, cfg.train.device
    cores = max(1, os.cpu_count() or 1) if cores is None else cores
    gpus = cuda_count() if gpus is None else gpus
    share = fed.client_gpus
    if share is None:  # where train.device finds CUDA (``resolve_device``'s rule)
        share = 1.0 if spec.startswith("cuda") or (spec == "auto" and gpus) else 0.0
    if share > 0 and not gpus:
        asked = f"train.device = {spec!r}" if fed.client_gpus is None else (
            f"federation.client_gpus = {share:g}")  # fmt: skip
        raise ConfigError(
            f"{asked}: this machine has no CUDA device for Ray to give the virtual clients; "
            "allowed here: train.device = 'auto' / 'cpu' and client_gpus 0 or unset"
        )
    if share == 0 and spec.startswith("cuda"):
        raise ConfigError(
            f"federation.client_gpus = 0 with train.device = {spec!r}: Ray hides the GPUs "
            "from a virtual client that asks for none; allowed: a share in (0, 1] (e.g. 0.25: "
            "four clients per GPU) or train.device = 'auto' / 'cpu'"
        )
    if share == 0 and gpus and spec == "auto":
        logger.info("federation.client_gpus = 0: Ray hides the GPUs, the clients use the CPU")
    slots = int(gpus / share) if share > 0 else cores  # flwr's int(GPU / num_gpus)
    cpus = fed.client_cpus or (max(1, cores // slots) if share > 0 else cores)
    if cpus > cores:  # flwr would start no actor at all ("ActorPool is empty")
        raise ConfigError(
            f"federation.client_cpus = {cpus}: this machine has {cores} CPU cores; "
            f"allowed: 0 (decided here) or 1..{cores}"
        )
    by_cpu = int(cores / cpus)  # flwr's int(CPU / num_cpus)
    at_once = min(by_cpu, slots) if share > 0 else by_cpu
    if share > 0 and slots <= by_cpu:
        limit = f"the GPUs ({gpus} GPU(s) / client_gpus {share:g} = {slots})"
    else:
        limit = f"the CPU cores ({cores} cores / client_cpus {cpus} = {by_cpu})"
    if share > 0 and spec.startswith("cuda:") and spec != "cuda:0":
        logger.warning(
            "train.device = %r: in Flower's simulation Ray assigns each virtual client a GPU, "
            "which it sees as cuda:0, so the index is not honoured by the clients (to pick "
            "GPUs, set CUDA_VISIBLE_DEVICES before starting)", spec,
        )  # fmt: skip
    return SimResources(cores, gpus, cpus, float(share), at_once, limit)


def ray_actor_gpus() -> list[str] | None:
    """The GPU ids Ray assigned to this process if it is a Ray actor (Flower's simulation runs
    each virtual client in one), else None. Ray is looked up, not imported: an actor's
    process has loaded it, and any other process (a SuperNode, the embedded engine) pays no
    import. The driver, where the ServerApp runs, has Ray initialised but no actor id."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    if ray.get_runtime_context().get_actor_id() is None:
        return None
    return [str(i) for i in ray.get_gpu_ids()]


def actor_device(spec: str) -> str:
    """``train.device`` as this process must name it: inside a Ray actor given a GPU, a
    ``cuda:N`` is the actor's own GPU, ``cuda:0`` (Ray sets ``CUDA_VISIBLE_DEVICES`` to it and
    a client has at most one: ``client_gpus <= 1``); anywhere else, unchanged."""
    gpus = ray_actor_gpus()
    if gpus is None or not spec.startswith("cuda"):
        return spec
    if not gpus:
        raise ConfigError(
            f"train.device = {spec!r}: this virtual client of Flower's simulation was given "
            "no GPU, and Ray hides the GPUs from it; allowed: federation.client_gpus > 0 "
            "(e.g. 0.25: four clients per GPU) or train.device = 'auto' / 'cpu'"
        )
    if spec in ("cuda", "cuda:0"):
        return spec
    _say_mapped(spec, gpus[0])
    return "cuda:0"


@functools.cache
def _say_mapped(spec: str, gpu: str) -> None:
    """Once per process (an actor serves many messages)."""
    logger.info(
        "train.device = %r in a Ray actor: training on the GPU Ray gave it (id %s), which "
        "the actor sees as cuda:0", spec, gpu,
    )  # fmt: skip
