"""Local training touches exactly the allocated layers' LoRA tensors and the head, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedhello.core.config import load_config
from fedhello.core.layers import AdapterSpec, layer_of_keys
from fedhello.model.accelerator import DTYPES, resolve
from fedhello.model.loading import load_model
from fedhello.model.lora import adapter_keys, apply_layer_mask, build_lora_model, get_state
from fedhello.model.training import LocalTask, Shard, train_client

# (device, compute precision, storage of the frozen base): every precision a CPU runs (bf16 is
# emulated where the CPU lacks the instructions, so it runs everywhere), and on a CUDA machine
# the GPU's (marked `gpu`: skipped with the reason elsewhere).
NO_CUDA = not torch.cuda.is_available()
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")]
PRECISIONS = [
    ("cpu", "fp32", "fp32"), ("cpu", "bf16", "fp32"), ("cpu", "bf16", "bf16"),
    pytest.param("cuda", "fp32", "fp32", marks=ON_GPU),
    pytest.param("cuda", "bf16", "bf16", marks=ON_GPU),
    pytest.param("cuda", "fp16", "fp16", marks=ON_GPU),
]  # fmt: skip


def _model(model_dir: Path, labels: list[str]):
    torch.manual_seed(0)
    loaded = load_model(str(model_dir), labels)
    model = build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])
    return loaded, model


def _text_data(loaded, n: int = 64):
    from conftest import make_texts

    from fedhello.data.encoding import encode
    from fedhello.data.loading import RawData
    from fedhello.tasks import task_for

    texts, labels = make_texts(n)
    names = sorted(set(labels))
    raw = RawData(texts, np.array([names.index(y) for y in labels]), names, task_for("text"), {})
    return encode(raw, loaded.processor, 16)


def _image_data(loaded, n: int = 32):
    from fedhello.data.encoding import encode
    from fedhello.data.loading import RawData
    from fedhello.tasks import task_for

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3)).astype(np.uint8) for _ in range(n)]
    raw = RawData(images, rng.integers(0, 3, n), ["a", "b", "c"], task_for("image"), {})
    return encode(raw, loaded.processor, 16)


@pytest.mark.parametrize("device,precision,base", PRECISIONS)
@pytest.mark.parametrize("kind,layers", [("text", (2,)), ("text", (0, 3)), ("image", (1,))])
def test_step_changes_exactly_allocated_lora_and_head(
    kind: str, layers: tuple[int, ...], device: str, precision: str, base: str,
    tiny_bert_dir: Path, tiny_vit_dir: Path,
) -> None:  # fmt: skip
    model_dir = tiny_bert_dir if kind == "text" else tiny_vit_dir
    labels = ["class-0", "class-1", "class-2", "class-3"] if kind == "text" else ["a", "b", "c"]
    loaded, model = _model(model_dir, labels)
    data = _text_data(loaded) if kind == "text" else _image_data(loaded)
    num_layers = model.config.num_hidden_layers
    keys = adapter_keys(model)
    layer_of = layer_of_keys(keys, num_layers)
    accelerator = resolve(device, precision, base)
    accelerator.place(model, set(keys))
    # A global state with non-zero B, so that every LoRA tensor has a gradient.
    rng = np.random.default_rng(1)
    state = {
        k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
        for k, v in get_state(model, keys).items()
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = load_config(None, ["train.local_steps=2", "train.batch_size=8"]).train
    task = LocalTask(client=0, round=1, spec=AdapterSpec(tuple(layers)), lr=1e-2, seed=0)
    shard = Shard(data, np.arange(len(data)))
    result = train_client(model, layer_of, shard, task, state, cfg, accelerator)
    after = dict(model.named_parameters())
    for name, old in before.items():
        start = torch.from_numpy(state[name]) if name in state else old.cpu()
        layer = layer_of.get(name, -1)
        allowed = name in layer_of and (layer is None or layer in layers)
        changed = not torch.equal(after[name].detach().cpu(), start)
        assert changed == allowed, f"{name}: changed={changed}, allocated={allowed}"
    uploaded = set(result.update.tensors)
    assert uploaded == {k for k, layer in layer_of.items() if layer is None or layer in layers}
    assert result.bytes_up == sum(v.nbytes for v in result.update.tensors.values())
    assert result.trainable_params == sum(p.numel() for n, p in after.items() if p.requires_grad)
    # the federated state stays fp32 whatever the compute precision; the frozen base is stored
    # as asked
    assert all(v.dtype == np.float32 for v in result.update.tensors.values())
    frozen = [p for n, p in after.items() if n not in layer_of and p.is_floating_point()]
    assert {p.dtype for p in frozen} == {DTYPES[base]}
    assert (result.precision, result.device) == (precision, str(accelerator.device))
    # the allocator's peak on CUDA, nothing pretended on the CPU
    assert (result.device_peak_memory_mb is not None) == (accelerator.device.type == "cuda")


def test_layer_map_covers_every_lora_tensor_once(tiny_bert_dir: Path) -> None:
    _, model = _model(tiny_bert_dir, ["a", "b"])
    keys = adapter_keys(model)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    layer_of = layer_of_keys(keys, 4)
    assert sorted(k for k, v in layer_of.items() if v is not None) == sorted(lora)
    per_layer = [sum(1 for v in layer_of.values() if v == i) for i in range(4)]
    assert per_layer == [4, 4, 4, 4]  # query + value, A + B
    heads = [k for k, v in layer_of.items() if v is None]
    assert heads and all("classifier.modules_to_save" in k for k in heads)


@pytest.mark.parametrize("device,precision,base", PRECISIONS)
def test_frozen_lora_below_the_top_block_gets_no_gradient(
    device: str, precision: str, base: str, tiny_bert_dir: Path
) -> None:
    loaded, model = _model(tiny_bert_dir, ["class-0", "class-1", "class-2", "class-3"])
    data = _text_data(loaded, 16)
    keys = adapter_keys(model)
    layer_of = layer_of_keys(keys, 4)
    accelerator = resolve(device, precision, base)
    accelerator.place(model, set(keys))
    params = apply_layer_mask(model, [3], layer_of)
    model.train()
    with accelerator.autocast():
        loss = model(**accelerator.to_device(data.batch(np.arange(8)))).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert layer_of.get(name, -1) in (3, None), name
    assert all(p.grad is not None for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()
    trained = {id(p) for p in params}
    assert all(id(p) in trained for p in optimizer.state)
    assert len(optimizer.state) == len(params)


@pytest.mark.parametrize("device,precision,base", PRECISIONS)
def test_training_only_the_top_block_keeps_less_for_backward(
    device: str, precision: str, base: str, tiny_bert_dir: Path
) -> None:
    labels = ["class-0", "class-1", "class-2", "class-3"]
    loaded, model = _model(tiny_bert_dir, labels)
    data = _text_data(loaded)
    keys = adapter_keys(model)
    layer_of = layer_of_keys(keys, 4)
    accelerator = resolve(device, precision, base)
    accelerator.place(model, set(keys))
    state = get_state(model, keys)
    cfg = load_config(None, ["train.local_steps=1", "train.batch_size=16"]).train
    idx = np.arange(len(data))
    mem = {
        layers: train_client(
            model,
            layer_of,
            Shard(data, idx),
            LocalTask(0, 1, AdapterSpec(layers), 1e-3, 0),
            state,
            cfg,
            accelerator,
        )
        for layers in [(3,), (0, 3), (0, 1, 2, 3)]
    }
    assert mem[(3,)].train_memory_mb < mem[(0, 3)].train_memory_mb
    # the lowest trained block decides how deep backward goes: (0, 3) keeps about what all do
    assert mem[(0, 3)].train_memory_mb <= mem[(0, 1, 2, 3)].train_memory_mb
    assert mem[(3,)].trainable_params < mem[(0, 1, 2, 3)].trainable_params
    if accelerator.device.type == "cuda":  # and where the allocator measures it, it agrees
        peak = {layers: r.device_peak_memory_mb or 0.0 for layers, r in mem.items()}
        assert 0 < peak[(3,)] < peak[(0, 1, 2, 3)]


def _client(tiny_bert_dir: Path, accelerator, steps: int = 2):
    """A tiny BERT on ``accelerator`` and a function training one client on it."""
    loaded, model = _model(tiny_bert_dir, ["class-0", "class-1", "class-2", "class-3"])
    data = _text_data(loaded)
    keys = adapter_keys(model)
    layer_of = layer_of_keys(keys, 4)
    accelerator.place(model, set(keys))
    state = get_state(model, keys)
    cfg = load_config(None, [f"train.local_steps={steps}", "train.batch_size=8"]).train
    shard = Shard(data, np.arange(len(data)))

    def train(client: int, *rest):
        task = LocalTask(client, 1, AdapterSpec((0, 1, 2, 3)), 1e-2, 0)
        return train_client(model, layer_of, shard, task, state, cfg, accelerator, *rest)

    return model, train


def test_gradients_are_freed_after_a_client(tiny_bert_dir: Path) -> None:
    """A client's gradients would otherwise stay on the device into the next client's
    training (and its measured peak)."""
    model, train = _client(tiny_bert_dir, resolve("cpu", "fp32", "fp32"))
    result = train(0)
    assert all(p.grad is None for p in model.parameters())
    assert result.skipped_steps is None  # not fp16: nothing scaled, nothing recorded


def test_fp16_loss_scale_carries_across_clients_and_skips_are_counted(tiny_bert_dir: Path) -> None:
    """fp16 with a real GradScaler, on the CPU (the config refuses fp16 there: a CPU has no
    fast fp16 path, but torch runs it, so the scaling logic can be checked here). Started at
    2**20, the scaled gradients overflow fp16: each overflow skips its step and halves the
    scale, the skips are counted in the client's result, and the next client starts from
    where the last one left the scale instead of rediscovering it."""
    from fedhello.model.accelerator import Accelerator
    from fedhello.model.step import LossScale

    fp16 = Accelerator(torch.device("cpu"), "fp16", "fp32", "fp16 on the CPU: scaling checks")
    _, train = _client(tiny_bert_dir, fp16, steps=4)
    scale = LossScale(scale=2.0**20)
    first = train(0, scale)
    assert first.skipped_steps is not None and first.skipped_steps >= 1
    assert scale.scale == 2.0 ** (20 - first.skipped_steps)  # halved once per skipped step
    assert np.isfinite(first.train_loss)  # an overflow skips the step, not the update
    assert all(np.isfinite(v).all() for v in first.update.tensors.values())
    second = train(1, scale)
    assert second.skipped_steps is not None and second.skipped_steps < first.skipped_steps
    assert scale.scale == 2.0 ** (20 - first.skipped_steps - second.skipped_steps)
    assert scale.growth_tracker >= 1  # successful steps since the last skip, carried on
    # without a kept scale every client starts afresh (today's 2**16, for a plain call)
    assert train(1).skipped_steps is not None
