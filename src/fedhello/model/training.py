"""Local training of one client: its share of the adapter (``AdapterSpec``) and the head.

The model is shared by all clients of a run; a client only swaps the adapter state in and out,
so there is no deep copy per client. A spec's rank slices every LoRA factor (rank methods),
its ``tensors`` may freeze A (FFA-LoRA), HetLoRA adds its rank self-pruning regulariser
(``RankPruning``), and FedRA's subnetwork runs only the allocated blocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from fedhello.core.aggregation import ClientUpdate
from fedhello.core.allocation.hetlora import HetLoRAOptions
from fedhello.core.config import Config, TrainConfig
from fedhello.core.layers import AdapterSpec, keys_for_spec
from fedhello.core.ranks import lora_pairs, truncate
from fedhello.core.seeds import Purpose, derived_int, generator
from fedhello.data.encoding import ModelInputs
from fedhello.model.accelerator import CPU_FP32, Accelerator
from fedhello.model.lora import apply_spec_mask, get_state, set_state, state_nbytes
from fedhello.model.meters import PeakRSS, SavedTensorMeter
from fedhello.model.subnetwork import subnetwork


@dataclass(frozen=True)
class RankPruning:
    """HetLoRA's rank self-pruning: ``penalty * sum ||B[:, m:r]|| ||A[m:r, :]||`` joins the
    loss, ``m = max(min_rank, floor(decay * r))``; a client whose tail norm shrank uploads
    rank ``m``."""

    penalty: float
    decay: float
    min_rank: int

    def keep(self, rank: int) -> int:
        return max(self.min_rank, math.floor(self.decay * rank))

    @classmethod
    def of(cls, cfg: Config) -> RankPruning | None:
        o = cfg.allocation.options
        if not isinstance(o, HetLoRAOptions):
            return None
        return cls(o.rank_penalty, o.rank_decay, o.min_rank)


@dataclass(frozen=True)
class LocalTask:
    """What the server asks of one client in one round. Batch order and dropout derive from
    (``seed``, ``round``, ``client``), so the same task trains the same way on any engine."""

    client: int
    round: int
    layers: tuple[int, ...]
    lr: float
    seed: int  # the run's seed
    rank: int | None = None  # the spec's rank (None: full)
    tensors: str = "AB"  # "B": FFA-LoRA
    pruning: RankPruning | None = None  # HetLoRA
    subnetwork: bool = False  # FedRA's client model: only the allocated blocks run

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.layers, self.rank, self.tensors)

    @classmethod
    def of(cls, cfg: Config, client: int, round_: int, spec: AdapterSpec, lr: float) -> LocalTask:
        """The task of ``spec`` under ``cfg``'s method (the same on every engine)."""
        return cls(
            client, round_, spec.layers, lr, cfg.run.seed, spec.rank, spec.tensors,
            RankPruning.of(cfg), cfg.allocation.client_model == "subnetwork",
        )  # fmt: skip


@dataclass(frozen=True)
class Shard:
    """A client's examples: encoded inputs and the rows of them it trains on."""

    data: ModelInputs
    rows: np.ndarray


@dataclass
class ClientResult:
    update: ClientUpdate
    seconds: float
    peak_memory_mb: float  # process RSS peak while this client trained
    train_memory_mb: float  # tensors saved for backward (peak step) + grads + AdamW state
    trainable_params: int
    bytes_up: int
    bytes_down: int
    steps: int
    device: str = "cpu"
    precision: str = "fp32"
    device_peak_memory_mb: float | None = None  # the accelerator allocator's peak (CUDA)
    step_seconds: float = 0.0  # median time of a local step (batch, forward, backward, update)


@dataclass
class LocalStep:
    """One local step as every client takes it (and the cost probe measures it): forward
    under autocast with the saved-for-backward meter on, backward (loss-scaled under fp16),
    gradient clipping on the true gradients, AdamW update."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    meter: SavedTensorMeter
    acc: Accelerator
    penalty: Callable[[], torch.Tensor] | None = None  # a regulariser added to the loss

    def __call__(self, batch: Mapping[str, torch.Tensor], max_grad_norm: float) -> torch.Tensor:
        with self.meter.hooks(), self.acc.autocast():
            loss = self.model(**batch).loss
            total = loss if self.penalty is None else loss + self.penalty()
        self.meter.step_done()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()  # the task's loss (a regulariser is not part of the record)


def num_local_steps(num_examples: int, batch_size: int, steps: int, epochs: float | None) -> int:
    if epochs is None:
        return steps
    return max(1, math.ceil(epochs * num_examples / batch_size))


def batch_order(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """``steps`` batches walking through fresh permutations of the client's data."""
    order = np.concatenate(
        [rng.permutation(n) for _ in range(math.ceil(steps * batch_size / n) + 1)]
    )
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_client(
    model: torch.nn.Module,
    layer_of: Mapping[str, int | None],
    shard: Shard,
    task: LocalTask,
    global_state: Mapping[str, np.ndarray],
    train_cfg: TrainConfig,
    acc: Accelerator = CPU_FP32,
) -> ClientResult:
    """Train ``task.layers`` (and the head) on ``shard`` from the global state; return the
    upload and what it cost. ``model`` is already on ``acc``'s device (``Accelerator.place``);
    the forward runs under its autocast, the trainable tensors and AdamW's state are fp32."""
    layers, indices = task.layers, shard.rows
    start = time.perf_counter()
    acc.reset_peak_memory()
    with PeakRSS() as rss:
        set_state(model, truncate(global_state, task.rank))  # a no-op slice when sent sliced
        params = apply_spec_mask(model, task.spec, layer_of)
        tails = TailNorm(model, task) if task.pruning is not None else None
        optimizer = torch.optim.AdamW(params, lr=task.lr, weight_decay=train_cfg.weight_decay)
        scaler = acc.grad_scaler()  # fp16 only; a no-op otherwise
        steps = num_local_steps(
            len(indices), train_cfg.batch_size, train_cfg.local_steps, train_cfg.local_epochs
        )
        rng = generator(task.seed, Purpose.TRAIN, task.round, task.client)
        torch.manual_seed(derived_int(task.seed, Purpose.TRAIN, task.round, task.client))  # dropout
        model.train()
        losses = []
        meter = SavedTensorMeter(model)
        penalty = tails.penalty if tails is not None and tails.pairs else None
        step = LocalStep(model, params, optimizer, scaler, meter, acc, penalty)
        step_times = []
        blocks = (
            subnetwork(model, layers, num_blocks(layer_of)) if task.subnetwork else nullcontext()
        )
        with blocks:
            order = batch_order(rng, len(indices), train_cfg.batch_size, steps)
            for i, batch_pos in enumerate(order):
                step_start = time.perf_counter()
                # images are augmented by (seed, round, client, step): paired across strategies
                augment = (task.seed, task.round, task.client, i)
                batch = acc.to_device(shard.data.batch(indices[batch_pos], augment))
                losses.append(step(batch, train_cfg.max_grad_norm))
                acc.synchronize()  # a step's time on CUDA is known once its queue has run
                step_times.append(time.perf_counter() - step_start)
        upload = get_state(model, keys_for_spec(layer_of, task.spec))
        if tails is not None:
            upload = truncate(upload, tails.pruned_rank())
        del optimizer
        device_peak = acc.peak_memory_mb()
    update = ClientUpdate(
        client=task.client,
        layers=tuple(layers),
        num_examples=len(indices),
        tensors=upload,
        # one transfer at the end rather than a device sync per step; float64 mean as before
        train_loss=float(np.mean(torch.stack(losses).double().cpu().numpy())),
        rank=task.rank,
        kind=task.tensors,
    )
    trainable = sum(p.numel() for p in params)
    return ClientResult(
        update=update,
        seconds=time.perf_counter() - start,
        peak_memory_mb=rss.peak_mb,
        # float32 gradient + AdamW's two moments per trainable parameter (fp32 in every precision)
        train_memory_mb=(meter.peak + 3 * 4 * trainable) / 2**20,
        trainable_params=trainable,
        bytes_up=state_nbytes(upload),
        bytes_down=state_nbytes(truncate(global_state, task.rank)),  # what the spec needs
        steps=steps,
        device=str(acc.device),
        precision=acc.precision,
        device_peak_memory_mb=device_peak,
        # the median, as the profile measures it (the first step also warms caches up)
        step_seconds=float(np.median(step_times)),
    )


def num_blocks(layer_of: Mapping[str, int | None]) -> int:
    return 1 + max(v for v in layer_of.values() if v is not None)


class TailNorm:
    """HetLoRA's tail of a rank-``r`` client: components ``m..r`` of every trained module,
    ``m = pruning.keep(r)``. ``penalty`` is the regulariser (differentiable), ``pruned_rank``
    the rank to upload: ``m`` if the tail's norm shrank since construction, else ``r``."""

    def __init__(self, model: torch.nn.Module, task: LocalTask) -> None:
        assert task.pruning is not None and task.rank is not None
        self.pruning, self.rank = task.pruning, task.rank
        self.keep = task.pruning.keep(task.rank)
        params = dict(model.named_parameters())
        trained = [(params[a], params[b]) for a, b in lora_pairs(params).values()
                   if params[b].requires_grad]  # fmt: skip
        self.pairs = trained if self.keep < self.rank else []
        self.start = self.norm()

    def _terms(self) -> Iterator[torch.Tensor]:
        for a, b in self.pairs:
            yield torch.linalg.norm(b[:, self.keep :]) * torch.linalg.norm(a[self.keep :, :])

    def penalty(self) -> torch.Tensor:
        return self.pruning.penalty * torch.stack(list(self._terms())).sum()

    @torch.no_grad()
    def norm(self) -> float:
        return float(sum(float(t) for t in self._terms())) if self.pairs else 0.0

    def pruned_rank(self) -> int:
        return self.keep if self.pairs and self.norm() < self.start else self.rank
